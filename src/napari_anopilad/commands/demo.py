"""``anopilad demo``: analyse the packaged sample slide with a demo bundle, then show the result in napari."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

from napari_anopilad.cli import prepare_output_folder
from napari_anopilad.commands.analyze import AnalysisOutputs, analyze, print_summary

logger = logging.getLogger(__name__)

SAMPLE_SLIDE = "CMU-1-Small-Region.svs"
DEFAULT_OUT = Path("anopilad-demo")
BUNDLE_SUBFOLDER = "demo-bundle"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="analyse the packaged sample slide with a demo bundle and open the result in napari",
        description=(
            "Make a demo bundle (tiny models with random weights, so no download and no GPU are needed), "
            f"analyse the packaged sample slide {SAMPLE_SLIDE} (CC0, Carnegie Mellon University) with it, "
            "and open the slide and heatmap in napari when a display is available. The scores of a demo "
            "bundle mean nothing: the demo shows the workflow and the output files."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"output folder (default: ./{DEFAULT_OUT})",
    )
    parser.add_argument("--no-viewer", action="store_true", help="do not open napari at the end")
    parser.add_argument(
        "--region",
        type=int,
        nargs=4,
        metavar=("X", "Y", "W", "H"),
        help="analyse only the patches that overlap this box, in level-0 pixels (default: the whole slide)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default: auto)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="patches per device batch (default: 8)"
    )
    parser.set_defaults(run=run)
    return parser


def demo_bundle(folder: Path) -> Path:
    """Return a demo bundle in ``folder``, making it when the folder contains none that loads."""
    from napari_anopilad.method.bundle import load_bundle
    from napari_anopilad.method.demo import make_demo_bundle

    if folder.is_dir():
        try:
            bundle = load_bundle(folder)
        except ValueError as error:
            logger.warning("Remaking the demo bundle in %s, because it failed to load: %s", folder, error)
        else:
            if bundle.demo:
                print(f"Using the demo bundle in {folder}")
                return folder
            raise ValueError(
                f"{folder} contains a bundle that is not a demo bundle: choose another --out for the demo"
            )
        _remove_tree(folder)
    print(f"Making a demo bundle (tiny models with random weights) in {folder}")
    return Path(make_demo_bundle(folder))


def _remove_tree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder)


def run(args: argparse.Namespace) -> int:
    out = prepare_output_folder(args.out, "--out")
    bundle_folder = demo_bundle(out / BUNDLE_SUBFOLDER)

    with as_file(files("napari_anopilad") / "data" / SAMPLE_SLIDE) as slide_path:
        print(f"Analysing the sample slide {SAMPLE_SLIDE}")
        outputs = analyze(
            slide_path=slide_path,
            bundle_folder=bundle_folder,
            out=out,
            region_level0=tuple(args.region) if args.region else None,
            device=args.device,
            batch_size=args.batch_size,
        )
        print_summary(outputs)
        print("All of these files are DEMO output: their scores mean nothing.")

        if args.no_viewer:
            print(_how_to_view(slide_path, outputs))
            return 0
        reason = display_unavailable_reason()
        if reason is not None:
            print(f"Not opening napari: {reason}.")
            print(_how_to_view(slide_path, outputs))
            return 0
        show_in_napari(slide_path, outputs)
    return 0


def display_unavailable_reason() -> str | None:
    """Return why napari cannot open a window here, or None when it can."""
    if importlib.util.find_spec("napari") is None:
        return "napari is not installed (pip install 'napari[pyqt6]')"
    if importlib.util.find_spec("qtpy") is None:
        return "no Qt binding is installed (pip install 'napari[pyqt6]')"
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return "no display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    return None


def _how_to_view(slide_path: Path, outputs: AnalysisOutputs) -> str:
    return (
        f"To view the result, open {outputs.files['overlay.png']} in any image viewer, or on a machine with a "
        f"display run: napari --plugin napari-anopilad {slide_path} and import "
        f"{outputs.files['regions.geojson']} in QuPath (File > Import objects from file)."
    )


def show_in_napari(slide_path: Path, outputs: AnalysisOutputs) -> None:
    """Open the slide, the eroded heatmap and the anomaly regions in a napari viewer and run it."""
    import napari

    from napari_anopilad.io.heatmap_tiff import read_heatmap_tiff

    viewer = napari.Viewer(title="AnoPILaD demo (DEMO output: the scores mean nothing)")
    add_result_layers(viewer, slide_path, outputs, read_heatmap_tiff(outputs.files["heatmap.tif"]))
    napari.run()


def add_result_layers(viewer: Any, slide_path: Path, outputs: AnalysisOutputs, heatmap: Any) -> list[Any]:
    """Add the slide, the heatmap and the regions to ``viewer``, all in level-0 pixel world coordinates."""
    import json

    import numpy as np

    layers = list(viewer.open(str(slide_path), plugin="napari-anopilad"))

    # Heatmap cell (row, col) covers level-0 pixels [row * P, (row + 1) * P). napari places a pixel's
    # centre at translate + index * scale, and the slide's pixel j has its centre at j.
    size_level0 = float(heatmap.patch_size_level0)
    x_origin_level0, y_origin_level0 = heatmap.origin_level0
    translate = (y_origin_level0 + (size_level0 - 1) / 2, x_origin_level0 + (size_level0 - 1) / 2)
    finite = heatmap.grid[np.isfinite(heatmap.grid)]
    limit = float(np.max(np.abs(finite))) if finite.size else 1.0
    label = "DEMO " if outputs.demo else ""
    layers.append(
        viewer.add_image(
            heatmap.grid,
            name=f"{label}eroded z-score",
            scale=(size_level0, size_level0),
            translate=translate,
            colormap="bwr",
            contrast_limits=(-max(limit, 1e-6), max(limit, 1e-6)),
            opacity=0.5,
        )
    )

    collection = json.loads(Path(outputs.files["regions.geojson"]).read_text())
    # NOTE: only each region's outer ring is drawn; holes of a ring-shaped region are not shown.
    shapes = [
        np.asarray(feature["geometry"]["coordinates"][0], dtype=float)[:, ::-1]
        for feature in collection["features"]
    ]
    if shapes:
        layers.append(
            viewer.add_shapes(
                shapes,
                shape_type="polygon",
                name=f"{label}anomaly regions",
                edge_color="yellow",
                face_color="transparent",
                edge_width=max(2.0, size_level0 / 32),
            )
        )
    with contextlib.suppress(AttributeError):
        viewer.reset_view()
    return layers
