"""``anopilad info SLIDE``: a slide's format, pyramid, resolution and patch counts at 20x."""

from __future__ import annotations

import argparse
import json
from typing import Any

from napari_anopilad.slide import build_patch_grid, compute_tissue_mask, open_slide

# The method reads 256 px patches at 0.5 um/px (20x).
TARGET_MPP = 0.5
PATCH_SIZE = 256


def add_parser(subparsers: Any) -> None:
    """Add the ``info`` subcommand to the ``anopilad`` parser."""
    parser = subparsers.add_parser(
        "info",
        help="show a slide's format, levels, resolution and patch counts",
        description=(
            "Show a whole-slide image's format, pyramid levels, microns per pixel, objective power, "
            f"associated images, and how many {PATCH_SIZE} px patches at {TARGET_MPP} um/px (20x) it has "
            "in all and on tissue."
        ),
    )
    parser.add_argument(
        "slide", metavar="SLIDE", help="slide file (SVS, NDPI, Philips TIFF, OME-TIFF, tiled TIFF)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--mpp",
        type=float,
        metavar="UM",
        default=None,
        help="level-0 microns per pixel; overrides the file's metadata",
    )
    parser.set_defaults(run=run)


def slide_info(path: str, mpp: float | None = None) -> dict[str, Any]:
    """Collect the facts that ``anopilad info`` prints, as the JSON object it prints with ``--json``."""
    with open_slide(path, mpp=mpp) as slide:
        info: dict[str, Any] = {
            "format": slide.format,
            "levels": [
                {"shape": list(level.shape), "downsample": round(level.downsample, 4)}
                for level in slide.levels
            ],
            "mpp": slide.mpp,
            "objective_power": slide.objective_power,
            "associated_images": slide.associated_images,
            "grid_shape": None,
            "n_patches": None,
            "n_tissue_patches": None,
        }
        if slide.mpp is not None:
            grid = build_patch_grid(
                slide, target_mpp=TARGET_MPP, patch_size=PATCH_SIZE, tissue_mask=compute_tissue_mask(slide)
            )
            info["grid_shape"] = list(grid.shape)
            info["n_patches"] = grid.n_patches
            info["n_tissue_patches"] = len(grid.tissue_cells())
    return info


def format_text(path: str, info: dict[str, Any]) -> str:
    """Render the info as human-readable lines."""
    lines = [f"slide: {path}", f"format: {info['format']}", "levels:"]
    for index, level in enumerate(info["levels"]):
        height, width, _ = level["shape"]
        lines.append(f"  {index}: {width} x {height} px, downsample {level['downsample']:g}")
    lines.append(f"mpp: {info['mpp']:g} um/px" if info["mpp"] is not None else "mpp: unknown")
    power = info["objective_power"]
    lines.append(f"objective power: {power:g}x" if power is not None else "objective power: unknown")
    lines.append(f"associated images: {', '.join(info['associated_images']) or 'none'}")
    if info["grid_shape"] is None:
        lines.append(
            f"patches at {TARGET_MPP} um/px: unknown, because the resolution is not in the file's metadata; "
            "give it with --mpp UM"
        )
    else:
        rows, cols = info["grid_shape"]
        lines.append(
            f"patches at {TARGET_MPP} um/px ({PATCH_SIZE} px): {info['n_patches']} ({rows} rows x {cols} cols)"
        )
        lines.append(f"tissue patches: {info['n_tissue_patches']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the slide's info; errors propagate as SlideError (a ValueError) for ``cli.main``."""
    info = slide_info(args.slide, mpp=args.mpp)
    if args.json:
        print(json.dumps(info))
    else:
        print(format_text(args.slide, info))
    return 0
