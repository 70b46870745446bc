"""``anopilad make-demo-bundle DIR``: a tiny bundle of random models for trying the plugin and for tests."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_anopilad.cli import prepare_output_folder


def add_parser(subparsers: Any) -> None:
    """Add the ``make-demo-bundle`` subcommand to the ``anopilad`` parser."""
    parser = subparsers.add_parser(
        "make-demo-bundle",
        help="write a tiny demo model bundle (random weights; its scores mean nothing)",
        description=(
            "Write a model bundle built from the real model classes (Stable Diffusion UNet, VAE and CLIP text "
            "encoder, CONCH, LPIPS) with tiny random weights, in their real on-disk layouts, with calibration "
            "statistics measured on real normal patches. It runs on a CPU in seconds; everything it produces "
            "is marked as demo output."
        ),
    )
    parser.add_argument("folder", metavar="DIR", help="new or empty folder to write the bundle to")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from napari_anopilad.method.demo import make_demo_bundle

    folder = prepare_output_folder(Path(args.folder), "bundle folder")
    folder = make_demo_bundle(folder)
    print(f"demo bundle written to {folder} (tiny random models: its scores mean nothing)")
    return 0
