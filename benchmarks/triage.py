"""Triage against the diffusion: patches/s of both scorers on the same patches, and time to a slide map.

Both scorers get the same tissue patches of the same slide in one run, after one warm-up call each:

- the triage scorer (CONCH image embedding, kNN distance to the normal memory bank, keyword distance);
- the AnoPILaD scorer (keyword prompt, partial diffusion, VAE decode, LPIPS) at the bundle's settings.

Then the triage pass (slide reading included) maps every tissue patch of the slide into a fresh triage
store, which is the time to a complete triage map. The times to a complete AnoPILaD map and to the
triage-guided map (triage pass plus the diffusion on the budget) are estimated from the measured
diffusion rate, and are labelled as estimates.

The demo bundle's CONCH is a one-layer model of width 16, so its rate says nothing about the real CONCH.
The benchmark therefore also counts the FLOPs of the real CONCH ViT-B/16 image encoder at 448 px (the
architecture from the conch package's config, built on torch's meta device, so no weights are needed)
for a compute-bound comparison with AnoPILaD's cost per patch.

Examples
--------
Demo bundle on the CPU (the figures in docs/triage.md)::

    python benchmarks/triage.py --device cpu --patches 4 --threads 2

A real bundle on a GPU::

    python benchmarks/triage.py --bundle BUNDLE --device cuda --patches 64 --slide SLIDE.svs

Each run prints a markdown table and writes it, with the raw figures as JSON, to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS_DIR = Path(__file__).parent / "results"
# AnoPILaD's cost per patch at the published defaults: about 68 guided UNet steps of 172 GFLOP each, plus
# the VAE, LPIPS and CONCH (torch's FLOP counter on the SD1.5 architecture; see benchmarks/throughput.py).
ANOPILAD_TFLOP_PER_PATCH = 25.0
SAMPLE_SLIDE = Path(__file__).resolve().parents[1] / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", type=Path, help="bundle folder with triage/ (default: a fresh demo bundle)"
    )
    parser.add_argument(
        "--slide", type=Path, default=SAMPLE_SLIDE, help="slide (default: the CMU sample slide)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--patches", type=int, default=4, help="tissue patches both scorers score (default: 4)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="patches per diffusion batch (default: 4)")
    parser.add_argument(
        "--triage-batch-size", type=int, default=64, help="patches per triage batch (default: 64)"
    )
    parser.add_argument(
        "--budget", type=float, default=0.1, help="triage budget of the guided-map estimate (default: 0.1)"
    )
    parser.add_argument(
        "--mpp", type=float, help="level-0 microns per pixel, for a slide whose metadata lacks it"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="results folder (default: benchmarks/results)"
    )
    arguments = parser.parse_args(argv)
    if not arguments.slide.is_file():
        parser.error(f"--slide {arguments.slide}: file not found")
    if arguments.mpp is not None and not arguments.mpp > 0:
        parser.error(f"--mpp {arguments.mpp} is invalid: give a positive number, for example 0.25")
    return arguments


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, action: Any) -> tuple[float, Any]:
    """Run ``action`` once and return the wall seconds (device work finished) and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = action()
    synchronize(device)
    return time.perf_counter() - start, result


def conch_image_gflop() -> float:
    """Count the GFLOP of one real-size CONCH ViT-B/16 image embedding at 448 px (meta device, no weights)."""
    from importlib.resources import files

    from torch.utils.flop_counter import FlopCounterMode

    from napari_anopilad.method.conch_model import build_conch

    config_file = files("conch") / "open_clip_custom" / "model_configs" / "conch_ViT-B-16.json"
    config = json.loads(config_file.read_text())
    model = build_conch(config, "meta")
    size = int(config["vision_cfg"]["image_size"])
    images = torch.zeros((1, 3, size, size), device="meta")
    with FlopCounterMode(display=False) as counter:
        model.encode_image(images, proj_contrast=True, normalize=True)
    return counter.get_total_flops() / 1e9


def hardware_description(device: torch.device) -> dict[str, Any]:
    description: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from napari_anopilad.engine.triage_pass import (
        TriagePass,
        compute_triage_results,
        open_triage_store,
        plan_diffusion,
    )
    from napari_anopilad.method.bundle import load_bundle
    from napari_anopilad.method.scorer import AnoPILaDScorer
    from napari_anopilad.method.triage import TriageScorer
    from napari_anopilad.slide import build_patch_grid, open_slide, read_patches

    args = parse_arguments(argv)
    if args.patches < 1:
        raise SystemExit(f"error: --patches {args.patches} is invalid: use 1 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # The grid needs the slide's resolution: checked here, before the models load.
    with open_slide(args.slide, mpp=args.mpp) as slide:
        if slide.mpp is None:
            raise SystemExit(
                f"error: {args.slide} has no microns per pixel in its metadata: give --mpp UM (0.25 for 40x)"
            )

    with tempfile.TemporaryDirectory(prefix="anopilad-triage-benchmark-") as scratch:
        bundle_folder = args.bundle
        if bundle_folder is None:
            from napari_anopilad.method.demo import make_demo_bundle

            bundle_folder = make_demo_bundle(Path(scratch) / "demo-bundle")
        bundle = load_bundle(bundle_folder)

        # 1. Models: loading time is reported apart from the scoring rates.
        load_triage_s, triage_scorer = timed(
            device, lambda: TriageScorer(bundle, str(device), batch_size=args.triage_batch_size)
        )
        load_diffusion_s, diffusion_scorer = timed(device, lambda: AnoPILaDScorer(bundle, str(device)))

        with open_slide(args.slide, mpp=args.mpp) as slide:
            grid = build_patch_grid(slide)
            tissue = np.asarray(grid.tissue_cells(), dtype=np.int64).reshape(-1, 2)
            if len(tissue) < args.patches:
                raise SystemExit(
                    f"error: {args.slide} has {len(tissue)} tissue patches, fewer than --patches {args.patches}"
                )
            cells = tissue[: args.patches]
            images = read_patches(slide, grid, cells)
            keys = [(slide.identity, int(row), int(col)) for row, col in cells]

            # 2. The same patches through both scorers, after one warm-up patch each.
            triage_scorer.score(images[:1])
            diffusion_scorer.score(images[:1], keys[:1])
            triage_s, _ = timed(device, lambda: triage_scorer.score(images))
            diffusion_s = 0.0
            for start in range(0, len(images), args.batch_size):
                seconds, _ = timed(
                    device,
                    lambda start=start: diffusion_scorer.score(
                        images[start : start + args.batch_size], keys[start : start + args.batch_size]
                    ),
                )
                diffusion_s += seconds

            # 3. The triage pass over the whole slide into a fresh store: the time to a complete triage map.
            store = open_triage_store(Path(scratch) / "store", slide, bundle, triage_scorer, grid)
            triage_pass = TriagePass(
                slide, grid, triage_scorer, store, cells=tissue, batch_size=args.triage_batch_size
            )
            map_s, _ = timed(device, lambda: list(triage_pass.run()))
            results = compute_triage_results(store, grid, cells=tissue)
            plan = plan_diffusion(results, tissue, args.budget, 1)
            slide_name = Path(args.slide).name

    conch_gflop = conch_image_gflop()
    triage_rate = len(images) / triage_s
    diffusion_rate = len(images) / diffusion_s
    report: dict[str, Any] = {
        "command": "python benchmarks/triage.py "
        + " ".join(shlex.quote(value) for value in (argv or sys.argv[1:])),
        "hardware": hardware_description(device),
        "bundle": "demo" if bundle.demo else Path(bundle_folder).name,
        "demo": bool(bundle.demo),
        "settings": bundle.settings.to_dict(),
        "patches": len(images),
        "load_s": {"triage": load_triage_s, "diffusion": load_diffusion_s},
        "patches_per_s": {"triage": triage_rate, "diffusion": diffusion_rate},
        "speed_up": triage_rate / diffusion_rate,
        "real_size_flops": {
            "conch_image_gflop_per_patch": conch_gflop,
            "anopilad_tflop_per_patch": ANOPILAD_TFLOP_PER_PATCH,
            "ratio": ANOPILAD_TFLOP_PER_PATCH * 1000 / conch_gflop,
        },
        "slide": {
            "name": slide_name,
            "tissue_patches": len(tissue),
            "triage_map_s": map_s,
            "triage_map_patches_per_s": len(tissue) / map_s,
            "budget_fraction": args.budget,
            "budget_patches": plan.n_budget,
            "estimated_anopilad_map_s": len(tissue) / diffusion_rate,
            "estimated_guided_map_s": map_s + plan.n_budget / diffusion_rate,
        },
    }
    write_report(report, args.out)
    return report


def markdown_table(report: dict[str, Any]) -> str:
    rates = report["patches_per_s"]
    slide = report["slide"]
    hardware = report["hardware"]
    demo = " (demo bundle: tiny random models)" if report["demo"] else ""
    lines = [
        f"Device {hardware['device']}, {hardware['threads']} threads, torch {hardware['torch']}{demo}; "
        f"{report['patches']} tissue patches of {slide['name']}; `{report['command']}`",
        "",
        "| scorer | patches/s | seconds per patch |",
        "|---|---|---|",
        f"| triage (CONCH kNN and keyword distance) | {rates['triage']:.2f} | {1 / rates['triage']:.3f} |",
        f"| AnoPILaD diffusion | {rates['diffusion']:.3f} | {1 / rates['diffusion']:.2f} |",
        "",
        f"Triage is {report['speed_up']:.0f} times faster per patch here.",
        "",
        f"Real-size models (FLOP count, not a timing): the CONCH ViT-B/16 image embedding at 448 px costs "
        f"{report['real_size_flops']['conch_image_gflop_per_patch']:.0f} GFLOP per patch and AnoPILaD about "
        f"{ANOPILAD_TFLOP_PER_PATCH:.0f} TFLOP, {report['real_size_flops']['ratio']:.0f} times more.",
        "",
        "| slide map | seconds |",
        "|---|---|",
        f"| triage map, all {slide['tissue_patches']} tissue patches (measured, slide reading included) | "
        f"{slide['triage_map_s']:.1f} |",
        f"| AnoPILaD map, all tissue patches (estimate from the rate above) | {slide['estimated_anopilad_map_s']:.0f} |",
        f"| triage map, then AnoPILaD on the {slide['budget_patches']} budget patches "
        f"({slide['budget_fraction']:g} plus neighbours; estimate) | {slide['estimated_guided_map_s']:.0f} |",
    ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    device = report["hardware"]["device"].split(":")[0]
    name = f"triage-{device}-{'demo' if report['demo'] else 'bundle'}"
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    (folder / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
