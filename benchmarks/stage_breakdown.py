"""Time of one batch by stage: slide reading, tissue mask, CONCH, text encoding, VAE, UNet, LPIPS, store.

The batch runs through the real scorer (:class:`AnoPILaDScorer`). The scorer's own steps are timed from
outside: its methods ``_keyword_prompts`` (CONCH image embedding, similarities and prompt strings),
``_prompt_embeds`` (text encoding of the keyword prompts), ``_encode`` and ``_decode`` (VAE), and the functions it calls,
``reconstruct_latents`` (the UNet loop) and ``lpips_distances``, are wrapped with timers for the timed
batch. The wrappers call the originals unchanged. On a GPU each timer synchronises the device before it
reads the clock, so asynchronous kernels are counted in the stage that launched them.

The stages run one after another here. In an analysis session the reader thread reads the next batch and
the writer thread stores the previous one while the device scores, so their share of wall time is hidden
there as long as it stays below the device's.

Examples
--------
The demo bundle on the CPU (the figures in docs/benchmarks.md)::

    python benchmarks/stage_breakdown.py --threads 1

A full-size bundle on a GPU, the UNet in bfloat16::

    python benchmarks/stage_breakdown.py --bundle BUNDLE --device cuda --precision bfloat16 --batch-size 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import napari_anopilad.method.conch_model as conch_model
import napari_anopilad.method.scorer as scorer_module
from napari_anopilad.engine.store import ResultStore, grid_description
from napari_anopilad.method.bundle import load_bundle
from napari_anopilad.method.scorer import AnoPILaDScorer
from napari_anopilad.slide import build_patch_grid, compute_tissue_mask, open_slide, read_patches

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import hardware_description, synchronize

RESULTS_DIR = Path(__file__).parent / "results"
SAMPLE_SLIDE = (
    Path(__file__).resolve().parents[1] / "src" / "napari_anopilad" / "data" / "CMU-1-Small-Region.svs"
)

# Stages in the order a batch passes them, with the label printed in the table. "tissue mask" is
# computed once per slide, the others once per batch.
STAGES = {
    "tissue_mask": "tissue mask (once per slide)",
    "read": "reading and decoding",
    "conch": "CONCH keyword prompts",
    "conch_preprocess": "  of which CONCH preprocessing (CPU)",
    "text_encoding": "text encoding (keyword prompts)",
    "vae_encode": "VAE encode",
    "unet_loop": "UNet loop",
    "vae_decode": "VAE decode",
    "lpips": "LPIPS",
    "scorer_other": "rest of the scorer",
    "store": "store write",
}
# Stages that run a model on the device; the others are the overhead around them.
MODEL_STAGES = ("conch", "text_encoding", "vae_encode", "unet_loop", "vae_decode", "lpips")
# Timed inside another stage, so they are left out of the sums.
NESTED_STAGES = {"conch_preprocess": "conch"}


class StageTimer:
    """Accumulates the seconds of named stages, synchronising the device around each."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - started

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return function(*args, **kwargs)

        return timed


@contextlib.contextmanager
def timed_scorer(scorer: AnoPILaDScorer, timer: StageTimer) -> Iterator[None]:
    """Wrap the scorer's steps with the timer for the duration of the block, then restore them."""
    methods = {
        "_keyword_prompts": "conch",
        "_prompt_embeds": "text_encoding",
        "_encode": "vae_encode",
        "_decode": "vae_decode",
    }
    functions = [
        (scorer_module, "reconstruct_latents", "unet_loop"),
        (scorer_module, "lpips_distances", "lpips"),
        (conch_model, "preprocess_images", "conch_preprocess"),
    ]
    originals = [(module, name, getattr(module, name)) for module, name, _ in functions]
    for method, stage in methods.items():
        setattr(scorer, method, timer.wrap(stage, getattr(scorer, method)))
    for module, name, stage in functions:
        setattr(module, name, timer.wrap(stage, getattr(module, name)))
    try:
        yield
    finally:
        for method in methods:
            delattr(scorer, method)
        for module, name, original in originals:
            setattr(module, name, original)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", type=Path, default=None, help="bundle folder (default: a new demo bundle)"
    )
    parser.add_argument("--slide", type=Path, default=SAMPLE_SLIDE, help="slide file (default: CMU sample)")
    parser.add_argument("--device", default="cpu", help="torch device, for example cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=4, help="patches in the timed batch (default 4)")
    parser.add_argument(
        "--precision", choices=("float32", "float16", "bfloat16"), default=None, help="UNet precision"
    )
    parser.add_argument(
        "--num-inference-steps", type=int, default=None, help="grid steps (default: bundle's)"
    )
    parser.add_argument("--start-timestep", type=int, default=None, help="start timestep (default: bundle's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-warm-up", action="store_true", help="time the first batch (no untimed batch)")
    parser.add_argument("--label", default=None, help="name of the result files (default: from the device)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and markdown")
    arguments = parser.parse_args(argv)
    if arguments.batch_size < 1:
        parser.error(f"--batch-size {arguments.batch_size} is invalid: use 1 or more")
    if not arguments.slide.is_file():
        parser.error(f"--slide {arguments.slide}: file not found")
    if arguments.start_timestep is not None and not 0 <= arguments.start_timestep <= 999:
        parser.error(f"--start-timestep {arguments.start_timestep} is invalid: use 0 to 999")
    if arguments.num_inference_steps is not None and not 1 <= arguments.num_inference_steps <= 1000:
        parser.error(f"--num-inference-steps {arguments.num_inference_steps} is invalid: use 1 to 1000")
    return arguments


def pick_cells(grid: Any, count: int, offset: int) -> np.ndarray:
    """Return ``count`` tissue cells from the middle of the slide's tissue, starting ``offset`` cells on.

    The tissue cells are taken in grid order from about the middle and wrap around. A batch larger than
    the slide's tissue (the sample slide has 34 tissue patches) repeats cells. Every repeat is scored
    again, so the timing is still that of a batch of ``count`` patches.
    """
    tissue = grid.tissue_cells()
    if len(tissue) == 0:
        raise ValueError("the slide has no tissue patches to time")
    first = len(tissue) // 2 + offset
    return tissue[(first + np.arange(count)) % len(tissue)]


def load_scorer(arguments: argparse.Namespace, bundle_folder: Path) -> tuple[Any, AnoPILaDScorer]:
    """Load the bundle and its scorer under the settings that the arguments override."""
    device = torch.device(arguments.device)
    bundle = load_bundle(bundle_folder)
    settings = bundle.settings.with_overrides(
        precision=arguments.precision,
        num_inference_steps=arguments.num_inference_steps,
        start_timestep=arguments.start_timestep,
    )
    started = time.perf_counter()
    scorer = AnoPILaDScorer(bundle, str(device), settings)
    synchronize(device)
    scorer.load_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    return bundle, scorer


def run_breakdown(arguments: argparse.Namespace, bundle: Any, scorer: AnoPILaDScorer) -> dict[str, Any]:
    """Time one batch of the sample slide stage by stage and return the report."""
    device = torch.device(arguments.device)
    settings = scorer.settings
    load_seconds = float(getattr(scorer, "load_seconds", math.nan))
    timer = StageTimer(device)

    with open_slide(arguments.slide) as slide, tempfile.TemporaryDirectory() as store_root:
        with timer.stage("tissue_mask"):
            grid = build_patch_grid(slide, tissue_mask=compute_tissue_mask(slide))
        store = ResultStore(
            Path(store_root), slide.identity, bundle.identity, settings, grid=grid_description(grid)
        )

        if not arguments.no_warm_up:
            # First calls pay for lazy initialisation (kernel selection, allocator growth, caches).
            warm_cells = pick_cells(grid, arguments.batch_size, arguments.batch_size)
            warm_images = read_patches(slide, grid, warm_cells)
            scorer.score(warm_images, [(slide.identity, int(r), int(c)) for r, c in warm_cells])

        cells = pick_cells(grid, arguments.batch_size, 0)
        batch_started = time.perf_counter()
        with timer.stage("read"):
            images = read_patches(slide, grid, cells)
        noise_keys = [(slide.identity, int(row), int(col)) for row, col in cells]
        with timed_scorer(scorer, timer):
            synchronize(device)
            score_started = time.perf_counter()
            scores = scorer.score(images, noise_keys)
            synchronize(device)
            score_seconds = time.perf_counter() - score_started
        with timer.stage("store"):
            store.write_batch(
                [(int(row), int(col)) for row, col in cells],
                lpips=scores.lpips,
                mse_latent=scores.mse_latent,
                keywords=scores.keywords,
                similarities=scores.similarities,
                weights=scores.weights,
                prompts=scores.prompt,
            )
        batch_seconds = time.perf_counter() - batch_started
        n_tissue = len(grid.tissue_cells())

    seconds = timer.seconds
    inside_scorer = sum(seconds[name] for name in MODEL_STAGES)
    seconds["scorer_other"] = max(0.0, score_seconds - inside_scorer)
    top_level = [name for name in STAGES if name not in NESTED_STAGES]
    wall_with_tissue = sum(seconds[name] for name in top_level)
    wall_batch = wall_with_tissue - seconds["tissue_mask"]
    rows = [
        {
            "stage": name,
            "label": label,
            "seconds": seconds[name],
            "fraction_with_tissue": seconds[name] / wall_with_tissue,
            "fraction_of_batch": None if name == "tissue_mask" else seconds[name] / wall_batch,
        }
        for name, label in STAGES.items()
    ]
    model_seconds = sum(seconds[name] for name in MODEL_STAGES)
    return {
        "command": "python "
        + shlex.join(
            ["benchmarks/stage_breakdown.py", *(sys.argv[1:] if arguments.argv is None else arguments.argv)]
        ),
        "hardware": hardware_description(device),
        "settings": {**settings.to_dict(), "device": str(device), "batch_size": arguments.batch_size},
        "bundle": {"name": bundle.folder.name, "demo": bundle.demo, "identity": bundle.identity},
        "slide": {"file": arguments.slide.name, "tissue_patches": n_tissue},
        "model_load_seconds": load_seconds,
        "stages": rows,
        "batch_seconds_measured": batch_seconds,
        "batch_seconds_sum": wall_batch,
        "patches_per_second": arguments.batch_size / wall_batch,
        "model_fraction_of_batch": model_seconds / wall_batch,
        "outside_model_fraction_of_batch": 1.0 - model_seconds / wall_batch,
        "lpips_mean": float(np.mean(scores.lpips)),
    }


def markdown_table(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        f"{report['bundle']['name']} ({'demo, random weights' if report['bundle']['demo'] else 'trained'}), "
        f"{settings['device']}, UNet {settings['precision']}, batch of {settings['batch_size']} patches, "
        f"{settings['sampler'].upper()} {settings['num_inference_steps']}-step grid from "
        f"{settings['start_timestep']}, guidance {settings['guidance_scale']}; slide {report['slide']['file']}.",
        "",
        "| stage | seconds | share of the batch | share with the tissue mask |",
        "|---|---|---|---|",
    ]
    for row in report["stages"]:
        batch_share = "-" if row["fraction_of_batch"] is None else f"{100 * row['fraction_of_batch']:.1f}%"
        lines.append(
            f"| {row['label'].strip()} | {row['seconds']:.3f} | {batch_share} "
            f"| {100 * row['fraction_with_tissue']:.1f}% |"
        )
    lines += [
        "",
        f"Batch: {report['batch_seconds_sum']:.2f} s ({report['patches_per_second']:.2f} patches/s); "
        f"model calls {100 * report['model_fraction_of_batch']:.1f}% of it, everything else "
        f"{100 * report['outside_model_fraction_of_batch']:.1f}%. "
        f"Model loading (not in the table): {report['model_load_seconds']:.1f} s.",
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
        bundle, scorer = load_scorer(arguments, bundle_folder)
        report = run_breakdown(arguments, bundle, scorer)
    write_report(arguments, report)
    return report


def write_report(arguments: argparse.Namespace, report: dict[str, Any]) -> None:
    """Print the table and write it, with the JSON, to the output folder."""
    label = arguments.label or f"{torch.device(arguments.device).type}-{report['settings']['precision']}"
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / f"stage-breakdown-{label}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    (arguments.out / f"stage-breakdown-{label}.md").write_text(f"`{report['command']}`\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
