"""Keyword prompt text encoding: Compel on the prompt strings against the batched encoder, in one run.

Both sides encode the same keyword prompts with the same CLIP tokenizer and text encoder:

- Compel, called once with the batch's prompt strings (it parses each string and runs the text encoder once
  per prompt plus once per down-weighted keyword, at batch size 1);
- :class:`KeywordPromptEncoder`, which builds the fragments from the keywords, runs all passes of the batch in
  one text encoder call, and keeps recent prompts' embeddings. It is timed with an empty cache (every prompt
  new) and again on the same prompts (every prompt cached).

The prompts come from seeded random similarities over the bundle's keyword bank, spread so that the
keywords take ``+`` and ``-`` marks as real patches do. The largest difference between the two sides'
embeddings shows that they computed the same thing.

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


def run(
    arguments: argparse.Namespace, tokenizer: Any, text_encoder: Any, keywords: list[str]
) -> dict[str, Any]:
    device = torch.device(arguments.device)
    prompts = spread_prompts(keywords, arguments.prompts, arguments.seed)
    strings = [prompt.prompt for prompt in prompts]
    compel = build_compel(tokenizer, text_encoder)
    encoder = KeywordPromptEncoder(tokenizer, text_encoder)

    # Warm-up outside the timing: first calls allocate, and each side parses or tokenizes the bank once.
    warm_up = spread_prompts(keywords, 2, arguments.seed + 1)
    with torch.no_grad():
        compel([prompt.prompt for prompt in warm_up])
    encoder.encode(warm_up)
    for prompt in prompts:
        encoder.fragments(prompt)

    with torch.no_grad():
        compel_seconds, from_compel = timed(device, lambda: compel(strings))
    cold_seconds, from_encoder = timed(device, lambda: encoder.encode(prompts))
    cached_seconds, from_cache = timed(device, lambda: encoder.encode(prompts))

    passes = sum(1 + len(encoder.encoded_tokens(encoder.fragments(p)).masked_ranges) for p in prompts)
    difference = float((from_encoder.float() - from_compel.float()).abs().max())
    rows = [
        ("Compel on the prompt strings", compel_seconds, passes, 1),
        ("KeywordPromptEncoder, empty cache", cold_seconds, passes, passes),
        ("KeywordPromptEncoder, prompts cached", cached_seconds, 0, 0),
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
                "encoder_passes": passes_run,
                "passes_per_call": per_call,
            }
            for name, seconds, passes_run, per_call in rows
        ],
        "speed_up_empty_cache": compel_seconds / cold_seconds,
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
        "| run | seconds | ms per prompt | text encoder passes | passes per call |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['run']} | {row['seconds']:.3f} | {1000 * row['seconds_per_prompt']:.1f} "
            f"| {row['encoder_passes']} | {row['passes_per_call']} |"
        )
    lines += [
        "",
        f"Speed-up {report['speed_up_empty_cache']:.1f}x with an empty cache, "
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
