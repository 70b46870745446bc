"""Keyword prompt text encoding: Compel on the prompt strings against the batched encoder, in one run.

Both sides encode the same keyword prompts with the same CLIP tokenizer and text encoder:

- Compel, called once with the batch's prompt strings (it parses each string and runs the text encoder once
  per prompt plus once per down-weighted keyword, at batch size 1);
- :class:`KeywordPromptEncoder`, which builds the fragments from the keywords, runs all passes of the batch in
  one text encoder call, and keeps recent prompts' embeddings. A new encoder is timed (nothing parsed, nothing
  cached), then the same encoder again on the same prompts (every prompt cached).

The prompts come from seeded random similarities over the bundle's keyword bank, spread so that the
keywords take ``+`` and ``-`` marks as real patches do. A forward pre-hook on the text encoder counts its
calls and the token sequences they encode. The largest difference between the two sides' embeddings shows
that they computed the same thing.

Examples
--------
Both text encoder sizes on the CPU (the figures in docs/benchmarks.md)::

    python benchmarks/prompt_encoding.py --threads 1
    python benchmarks/prompt_encoding.py --threads 1 --full-clip

On a GPU::

    python benchmarks/prompt_encoding.py --full-clip --device cuda --prompts 64
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from napari_anopilad.method.prompt_encoding import KeywordPromptEncoder
from napari_anopilad.method.prompts import KeywordPrompt, build_compel, build_keyword_prompt
from sd15_bundle import SD15_TEXT_CONFIG
from throughput import hardware_description, synchronize

RESULTS_DIR = Path(__file__).parent / "results"
TOP_K = 5


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", type=Path, default=None, help="bundle folder (default: a new demo bundle)"
    )
    parser.add_argument(
        "--full-clip",
        action="store_true",
        help="use a text encoder of Stable Diffusion 1.5's size (random weights) instead of the bundle's",
    )
    parser.add_argument("--prompts", type=int, default=32, help="prompts in the batch (default 32)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random similarities (default 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="output folder (default benchmarks/results)"
    )
    parser.add_argument("--label", default="", help="file name label (default: device and encoder size)")
    return parser.parse_args(argv)


def spread_prompts(keywords: list[str], count: int, seed: int) -> list[KeywordPrompt]:
    """Prompts whose five chosen similarities stand apart from the rest, so their weights take marks."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        similarities = rng.uniform(0.05, 0.2, len(keywords))
        similarities[rng.choice(len(keywords), TOP_K, replace=False)] = rng.uniform(0.22, 0.6, TOP_K)
        prompts.append(build_keyword_prompt(similarities, keywords, TOP_K))
    return prompts


def load_text_model(arguments: argparse.Namespace, bundle_folder: Path) -> tuple[Any, Any, list[str]]:
    """Load the bundle's tokenizer and keywords, with its text encoder or a full-size random one."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from napari_anopilad.method.bundle import load_bundle

    device = torch.device(arguments.device)
    bundle = load_bundle(bundle_folder)
    pipeline = bundle.load_pipeline(device)
    text_encoder = pipeline.text_encoder
    if arguments.full_clip:
        torch.manual_seed(arguments.seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)).to(device).eval()
    return pipeline.tokenizer, text_encoder, bundle.keywords


def timed(device: torch.device, function: Any) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


class EncoderCalls:
    """Counts the text encoder's calls and the token sequences they encode, with a forward pre-hook."""

    def __init__(self, text_encoder: Any) -> None:
        self.calls = 0
        self.sequences = 0
        self._handle = text_encoder.register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: tuple[Any, ...]) -> None:
        self.calls += 1
        self.sequences += int(args[0].shape[0])

    def take(self) -> tuple[int, int]:
        """Return the counts since the last call and start again from zero."""
        counts = (self.calls, self.sequences)
        self.calls = self.sequences = 0
        return counts

    def remove(self) -> None:
        self._handle.remove()


def run(
    arguments: argparse.Namespace, tokenizer: Any, text_encoder: Any, keywords: list[str]
) -> dict[str, Any]:
    device = torch.device(arguments.device)
    prompts = spread_prompts(keywords, arguments.prompts, arguments.seed)
    strings = [prompt.prompt for prompt in prompts]
    compel = build_compel(tokenizer, text_encoder)

    # Warm-up outside the timing, on other prompts and a throwaway encoder: first calls allocate.
    warm_up = spread_prompts(keywords, 2, arguments.seed + 1)
    with torch.no_grad():
        compel([prompt.prompt for prompt in warm_up])
    KeywordPromptEncoder(tokenizer, text_encoder).encode(warm_up)
    # The timed encoder starts with nothing parsed and nothing cached.
    encoder = KeywordPromptEncoder(tokenizer, text_encoder)

    counter = EncoderCalls(text_encoder)
    try:
        with torch.no_grad():
            compel_seconds, from_compel = timed(device, lambda: compel(strings))
        compel_counts = counter.take()
        cold_seconds, from_encoder = timed(device, lambda: encoder.encode(prompts))
        cold_counts = counter.take()
        cached_seconds, from_cache = timed(device, lambda: encoder.encode(prompts))
        cached_counts = counter.take()
    finally:
        counter.remove()

    difference = float((from_encoder.float() - from_compel.float()).abs().max())
    rows = [
        ("Compel on the prompt strings", compel_seconds, compel_counts),
        ("KeywordPromptEncoder, new (nothing parsed or cached)", cold_seconds, cold_counts),
        ("KeywordPromptEncoder, the same prompts again (cached)", cached_seconds, cached_counts),
    ]
    return {
        "command": "python benchmarks/prompt_encoding.py " + shlex.join(arguments.argv or sys.argv[1:]),
        "hardware": hardware_description(device),
        "settings": {
            "device": str(device),
            "prompts": arguments.prompts,
            "text_encoder": "SD1.5 size, random weights" if arguments.full_clip else "the bundle's",
            "text_encoder_parameters": sum(parameter.numel() for parameter in text_encoder.parameters()),
            "hidden_size": int(text_encoder.config.hidden_size),
        },
        "rows": [
            {
                "run": name,
                "seconds": seconds,
                "seconds_per_prompt": seconds / arguments.prompts,
                "text_encoder_calls": calls,
                "sequences_encoded": sequences,
            }
            for name, seconds, (calls, sequences) in rows
        ],
        "speed_up_new_encoder": compel_seconds / cold_seconds,
        "speed_up_cached": compel_seconds / cached_seconds,
        "max_abs_difference": difference,
        "cached_equals_fresh": bool(torch.equal(from_cache, from_encoder)),
    }


def markdown_table(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        f"{settings['prompts']} keyword prompts, text encoder {settings['text_encoder']} "
        f"({settings['text_encoder_parameters'] / 1e6:.1f} M parameters), {settings['device']}.",
        "",
        "| run | seconds | ms per prompt | text encoder calls | sequences encoded |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['run']} | {row['seconds']:.3f} | {1000 * row['seconds_per_prompt']:.2f} "
            f"| {row['text_encoder_calls']} | {row['sequences_encoded']} |"
        )
    lines += [
        "",
        f"Speed-up {report['speed_up_new_encoder']:.1f}x for a new encoder, "
        f"{report['speed_up_cached']:.0f}x with the prompts cached. Largest difference from Compel's "
        f"embeddings {report['max_abs_difference']:.1e}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    arguments = parse_arguments(argv)
    arguments.argv = argv
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    with tempfile.TemporaryDirectory() as temporary:
        bundle_folder = arguments.bundle
        if bundle_folder is None:
            from napari_anopilad.method.demo import make_demo_bundle

            bundle_folder = make_demo_bundle(Path(temporary) / "demo-bundle")
        tokenizer, text_encoder, keywords = load_text_model(arguments, bundle_folder)
        report = run(arguments, tokenizer, text_encoder, keywords)

    label = (
        arguments.label
        or f"{torch.device(arguments.device).type}-{'sd15' if arguments.full_clip else 'bundle'}"
    )
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / f"prompt-encoding-{label}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    (arguments.out / f"prompt-encoding-{label}.md").write_text(f"`{report['command']}`\n\n{table}")
    print(table)
    return report


if __name__ == "__main__":
    main()
