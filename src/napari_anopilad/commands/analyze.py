"""``anopilad analyze``: run AnoPILaD on one whole slide and write the heatmap, regions and tables."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_anopilad.cli import CommandError

logger = logging.getLogger(__name__)

DEMO_WARNING = (
    "DEMO output: the demo bundle has random weights, so these scores, heatmap and regions mean nothing"
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze",
        help="analyse one whole slide and write the heatmap, anomaly regions and patch table",
        description=(
            "Score every tissue patch of a slide with AnoPILaD, then write patches.csv, slide.json, "
            "heatmap.tif, overlay.png and regions.geojson to the output folder. Finished patches are "
            "kept in a result store, so an interrupted run resumes where it stopped."
        ),
    )
    parser.add_argument(
        "slide",
        type=Path,
        metavar="SLIDE",
        help="whole-slide image (Aperio SVS, generic or OME TIFF, NDPI, ...)",
    )
    parser.add_argument("--bundle", type=Path, required=True, metavar="DIR", help="model bundle folder")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="output folder (created when missing)"
    )
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help="download hub models named by the bundle that are not local (CONCH needs a Hugging Face token)",
    )
    add_analysis_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def add_analysis_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the region, threshold, device, batch size, resolution, inference and store options."""
    parser.add_argument(
        "--region",
        type=int,
        nargs=4,
        metavar=("X", "Y", "W", "H"),
        help="analyse only the patches that overlap this box, in level-0 pixels (x y width height)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        metavar="Z",
        default=0.0,
        help="anomaly threshold on the eroded z-score (default: 0, the published default)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default: auto)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="patches per device batch (default: 8)"
    )
    parser.add_argument(
        "--mpp",
        type=float,
        metavar="UM",
        help="level-0 microns per pixel, for slides whose metadata lacks it (for example 0.25)",
    )
    parser.add_argument(
        "--save-reconstructions",
        action="store_true",
        help="also write each patch and its reconstruction as PNG pairs to OUT/reconstructions/",
    )
    parser.add_argument(
        "--sampler", choices=("ddim", "plms"), help="denoising update (default: the bundle's, ddim)"
    )
    parser.add_argument(
        "--start-timestep",
        type=int,
        metavar="T",
        help="timestep the patch is noised to, 0-999 (default: the bundle's, 674)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        metavar="G",
        help="classifier-free guidance scale, 1 for none (default: the bundle's, 7.5)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="inference steps over the 1000 training timesteps (default: the bundle's, 100)",
    )
    parser.add_argument(
        "--score", choices=("lpips", "mse_latent"), help="patch score (default: the bundle's, lpips)"
    )
    parser.add_argument(
        "--precision",
        choices=("float32", "float16", "bfloat16"),
        help="UNet precision; half precisions need a GPU (default: the bundle's, float32)",
    )
    parser.add_argument(
        "--unprompted",
        action="store_true",
        help="ablation: reconstruct with the empty prompt and no guidance",
    )
    parser.add_argument(
        "--store",
        type=Path,
        metavar="DIR",
        help="result store folder, shared between runs (default: OUT/store)",
    )


@dataclass(frozen=True)
class AnalysisOutputs:
    """Summary of one analysis: patch counts, slide scores and the files written."""

    out: Path
    n_patches: int
    n_reused: int
    n_computed: int
    z_max: float | None
    z_99: float | None
    z_source: str
    demo: bool
    files: dict[str, Path]


def run(args: argparse.Namespace) -> int:
    outputs = analyze(
        slide_path=args.slide,
        bundle_folder=args.bundle,
        out=args.out,
        region_level0=tuple(args.region) if args.region else None,
        threshold=args.threshold,
        device=args.device,
        batch_size=args.batch_size,
        mpp=args.mpp,
        save_reconstructions=args.save_reconstructions,
        overrides=_setting_overrides(args),
        store_root=args.store,
        allow_download=args.allow_download,
    )
    print_summary(outputs)
    return 0


def _setting_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "sampler": args.sampler,
        "start_timestep": args.start_timestep,
        "guidance_scale": args.guidance_scale,
        "num_inference_steps": args.steps,
        "score": args.score,
        "precision": args.precision,
        "unprompted": True if args.unprompted else None,
    }


def print_summary(outputs: AnalysisOutputs) -> None:
    """Print where the outputs are and the slide scores."""
    if outputs.demo:
        print(f"WARNING: {DEMO_WARNING}.")
    z_max = "n/a" if outputs.z_max is None else f"{outputs.z_max:.3f}"
    z_99 = "n/a" if outputs.z_99 is None else f"{outputs.z_99:.3f}"
    print(
        f"Analysed {outputs.n_patches} patches ({outputs.n_computed} computed, {outputs.n_reused} reused "
        f"from the store): Z_max {z_max}, Z_99 {z_99}, z-scores from {outputs.z_source}."
    )
    print(f"Outputs in {outputs.out}:")
    for name, path in outputs.files.items():
        print(f"  {name:<16} {path}")


def cells_in_region(
    grid: Any, cells: NDArray[np.int64], region_level0: tuple[int, int, int, int]
) -> NDArray[np.int64]:
    """Keep the cells whose level-0 box overlaps ``region_level0`` (x, y, width, height)."""
    x_level0, y_level0, width_level0, height_level0 = region_level0
    size = int(grid.patch_size_level0)
    row = cells[:, 0].astype(np.int64)
    col = cells[:, 1].astype(np.int64)
    overlaps = (col * size < x_level0 + width_level0) & ((col + 1) * size > x_level0)
    overlaps &= (row * size < y_level0 + height_level0) & ((row + 1) * size > y_level0)
    return cells[overlaps]


def select_cells(slide: Any, grid: Any, region_level0: tuple[int, int, int, int] | None) -> NDArray[np.int64]:
    """Return the tissue cells to analyse, ``(n, 2)`` of ``(row, col)``: all, or those overlapping the region.

    Raises
    ------
    CommandError
        If the region is empty or outside the slide, or no tissue cell is left.
    """
    cells = np.asarray(grid.tissue_cells(), dtype=np.int64).reshape(-1, 2)
    if region_level0 is None:
        if cells.size == 0:
            raise CommandError(f"slide {slide.path} has no tissue patch: check that it is a tissue section")
        return cells

    width_level0, height_level0 = slide.dimensions
    _check_region(region_level0, width_level0, height_level0)
    cells = cells_in_region(grid, cells, region_level0)
    if cells.size == 0:
        raise CommandError(
            f"--region {' '.join(map(str, region_level0))} contains no tissue patch: choose a box over tissue"
        )
    return cells


def _check_region(region_level0: tuple[int, int, int, int], slide_width: int, slide_height: int) -> None:
    x_level0, y_level0, width_level0, height_level0 = region_level0
    if width_level0 <= 0 or height_level0 <= 0:
        raise CommandError(
            f"--region width and height must be positive, got {width_level0} x {height_level0}"
        )
    if (
        x_level0 >= slide_width
        or y_level0 >= slide_height
        or x_level0 + width_level0 <= 0
        or y_level0 + height_level0 <= 0
    ):
        raise CommandError(
            f"--region {x_level0} {y_level0} {width_level0} {height_level0} lies outside the slide, "
            f"which is {slide_width} x {slide_height} level-0 pixels"
        )


def analyze(
    slide_path: Path,
    bundle_folder: Path,
    out: Path,
    *,
    region_level0: tuple[int, int, int, int] | None = None,
    threshold: float = 0.0,
    device: str = "auto",
    batch_size: int = 8,
    mpp: float | None = None,
    save_reconstructions: bool = False,
    overrides: dict[str, Any] | None = None,
    store_root: Path | None = None,
    allow_download: bool = False,
    progress: bool = True,
) -> AnalysisOutputs:
    """Analyse one slide and write every output file; see ``anopilad analyze --help`` for the options.

    Raises
    ------
    CommandError, ValueError, FileNotFoundError
        For a missing or unreadable slide or bundle, an unknown mpp without ``mpp``, a region outside
        the slide or without tissue, or an unavailable device. Each message names the value and the fix.
    """
    from napari_anopilad.engine.device import check_precision, choose_device, describe_device
    from napari_anopilad.engine.results import calibration_reference, compute_slide_results
    from napari_anopilad.engine.session import AnalysisSession
    from napari_anopilad.engine.store import ResultStore, grid_description
    from napari_anopilad.method.bundle import load_bundle
    from napari_anopilad.method.scorer import AnoPILaDScorer
    from napari_anopilad.slide import build_patch_grid, compute_tissue_mask, open_slide

    if batch_size < 1:
        raise CommandError(f"--batch-size {batch_size} is invalid: use 1 or more")
    if not np.isfinite(threshold):
        raise CommandError(f"--threshold {threshold} is invalid: give a finite z-score, for example 0")
    if mpp is not None and not mpp > 0:
        raise CommandError(f"--mpp {mpp} is invalid: give the level-0 microns per pixel, a positive number")
    if not Path(slide_path).is_file():
        raise CommandError(f"slide {slide_path} not found: give the path of a whole-slide image file")
    if not Path(bundle_folder).is_dir():
        raise CommandError(
            f"bundle folder {bundle_folder} not found: give a model bundle folder "
            "(anopilad make-demo-bundle DIR makes a demo one)"
        )

    torch_device = choose_device(device)
    bundle = load_bundle(bundle_folder, allow_download=allow_download)
    settings = bundle.settings.with_overrides(**(overrides or {}))
    check_precision(torch_device, settings.precision)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(slide_path, mpp=mpp) as slide:
        tissue_mask = compute_tissue_mask(slide)
        grid = build_patch_grid(slide, tissue_mask=tissue_mask)
        cells = select_cells(slide, grid, region_level0)

        store = ResultStore(
            store_root if store_root is not None else out / "store",
            slide.identity,
            bundle.identity,
            settings,
            grid=grid_description(grid),
        )
        done = store.done_cells(need_reconstructions=save_reconstructions)
        n_reused = sum((int(row), int(col)) in done for row, col in cells)
        if n_reused:
            print(f"Reused {n_reused} of {len(cells)} patches from the store {store.folder}")
        if bundle.demo:
            print(f"WARNING: {DEMO_WARNING}.", file=sys.stderr)

        n_computed = 0
        if n_reused < len(cells):
            # Loading the models takes a while, so it happens only when some patch needs them.
            logger.info("Scoring on %s with %s", describe_device(torch_device), settings)
            scorer = AnoPILaDScorer(bundle, str(torch_device), settings)
            session = AnalysisSession(
                slide,
                grid,
                scorer,
                store,
                cells=cells,
                batch_size=batch_size,
                save_reconstructions=save_reconstructions,
                calibration=calibration_reference(bundle, settings),
            )
            n_computed = _run_with_progress(session, progress)

        results = compute_slide_results(store, grid, bundle, threshold, cells=cells, settings=settings)
        files = write_outputs(
            out,
            slide=slide,
            grid=grid,
            results=results,
            settings=settings,
            bundle=bundle,
            region_level0=region_level0,
            store=store if save_reconstructions else None,
        )

    return AnalysisOutputs(
        out=out,
        n_patches=results.n_patches,
        n_reused=n_reused,
        n_computed=n_computed,
        z_max=results.z_max,
        z_99=results.z_99,
        z_source=results.z_source,
        demo=bool(bundle.demo),
        files=files,
    )


def _run_with_progress(session: Any, progress: bool) -> int:
    from tqdm import tqdm

    n_computed = 0
    with (
        tqdm(
            total=session.n_total,
            initial=session.n_done,
            unit="patch",
            desc="analyze",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar,
        contextlib.closing(session.run()) as batches,
    ):
        for batch in batches:
            n_computed += len(batch.cells)
            bar.update(len(batch.cells))
            bar.set_postfix(patches_per_s=f"{batch.patches_per_s:.2f}", batch=batch.batch_size)
    return n_computed


def write_outputs(
    out: Path,
    *,
    slide: Any,
    grid: Any,
    results: Any,
    settings: Any,
    bundle: Any,
    region_level0: tuple[int, int, int, int] | None,
    store: Any | None,
) -> dict[str, Path]:
    """Write patches.csv, slide.json, heatmap.tif, overlay.png, regions.geojson and the reconstructions."""
    from napari_anopilad.io.heatmap_tiff import write_heatmap_tiff
    from napari_anopilad.io.regions import mask_to_polygons, region_z_max, write_regions_geojson
    from napari_anopilad.io.tables import write_patches_csv

    files: dict[str, Path] = {}
    summary = slide_summary(
        results=results, settings=settings, bundle=bundle, region_level0=region_level0, slide=slide
    )
    label = {"demo": str(bool(bundle.demo)).lower(), "bundle_identity": bundle.identity}

    files["patches.csv"] = write_patches_csv(out / "patches.csv", patch_records(grid, results))

    files["heatmap.tif"] = write_heatmap_tiff(
        out / "heatmap.tif",
        results.heatmap_eroded,
        patch_size_level0=grid.patch_size_level0,
        mpp=slide.mpp,
        metadata={
            "demo": bool(bundle.demo),
            "z_source": results.z_source,
            "threshold": results.threshold,
            "slide_identity": slide.identity,
            "bundle_identity": bundle.identity,
        },
    )

    polygons = mask_to_polygons(results.mask, grid.patch_size_level0)
    files["regions.geojson"] = write_regions_geojson(
        out / "regions.geojson",
        polygons,
        z_max_values=region_z_max(results.mask, results.heatmap_eroded),
        mpp=slide.mpp,
        properties=label,
    )
    summary["n_regions"] = len(polygons)

    files["overlay.png"] = write_overlay(
        out / "overlay.png", slide=slide, grid=grid, results=results, demo=bundle.demo
    )

    if store is not None:
        files["reconstructions/"] = write_reconstruction_pairs(
            out / "reconstructions", slide, grid, results, store
        )

    files["slide.json"] = out / "slide.json"
    _write_json(files["slide.json"], summary)
    return files


def patch_records(grid: Any, results: Any) -> list[dict[str, Any]]:
    """Build one patches.csv record per analysed patch, in row-major order."""
    patches = results.patches
    order = np.lexsort((patches.cols, patches.rows))
    records = []
    for index in order:
        row, col = int(patches.rows[index]), int(patches.cols[index])
        x_level0, y_level0, width_level0, height_level0 = grid.box_level0(row, col)
        records.append(
            {
                "x": x_level0,
                "y": y_level0,
                "width": width_level0,
                "height": height_level0,
                "row": row,
                "col": col,
                "tissue_fraction": float(grid.tissue_fraction[row, col]),
                "keywords": [str(keyword) for keyword in patches.keywords[index]],
                "weights": [float(weight) for weight in patches.weights[index]],
                "prompt": str(patches.prompts[index]),
                "lpips": float(patches.lpips[index]),
                "mse_latent": float(patches.mse_latent[index]),
                "z": float(results.z[index]),
                "z_eroded": float(results.z_eroded[index]),
            }
        )
    return records


def write_overlay(path: Path, *, slide: Any, grid: Any, results: Any, demo: bool) -> Path:
    """Render the eroded heatmap over a slide thumbnail, with a colour bar and the threshold contour."""
    from napari_anopilad.io.overlay import render_overlay_png

    thumbnail = slide.thumbnail()
    width_level0, height_level0 = slide.dimensions
    # Level-0 pixels per thumbnail pixel, averaged over both axes as pyramid downsamples are.
    downsample = (width_level0 / thumbnail.shape[1] + height_level0 / thumbnail.shape[0]) / 2
    return render_overlay_png(
        path,
        thumbnail,
        downsample,
        results.heatmap_eroded,
        patch_size_level0=grid.patch_size_level0,
        threshold=results.threshold,
        title=f"{Path(slide.path).name}: eroded z-score ({results.z_source} statistics)",
        demo=demo,
        mpp=slide.mpp,
    )


def write_reconstruction_pairs(folder: Path, slide: Any, grid: Any, results: Any, store: Any) -> Path:
    """Write ``r<row>_c<col>_original.png`` and ``r<row>_c<col>_reconstruction.png`` for every patch."""
    from PIL import Image

    from napari_anopilad.slide import read_patches

    folder.mkdir(parents=True, exist_ok=True)
    cells = results.patches.cells()
    for start in range(0, len(cells), 64):
        chunk = cells[start : start + 64]
        originals = read_patches(slide, grid, chunk)
        for (row, col), original in zip(chunk, originals):
            reconstruction = store.read_reconstruction(int(row), int(col))
            if reconstruction is None:
                raise RuntimeError(
                    f"the store {store.folder} lacks the reconstruction of patch ({row}, {col})"
                )
            Image.fromarray(original).save(folder / f"r{row}_c{col}_original.png")
            Image.fromarray(reconstruction).save(folder / f"r{row}_c{col}_reconstruction.png")
    return folder


def slide_summary(
    *, results: Any, settings: Any, bundle: Any, region_level0: tuple[int, int, int, int] | None, slide: Any
) -> dict[str, Any]:
    """Build the content of slide.json."""
    return {
        "slide": str(slide.path) if hasattr(slide, "path") else None,
        "slide_identity": slide.identity,
        "z_max": results.z_max,
        "z_99": results.z_99,
        "n_patches": results.n_patches,
        "n_anomalous_patches": int(np.count_nonzero(results.mask)),
        "threshold": results.threshold,
        "score": results.score_name,
        "z_source": results.z_source,
        "z_mean": results.z_mean,
        "z_std": results.z_std,
        "demo": bool(bundle.demo),
        "bundle_identity": bundle.identity,
        "settings": settings.to_dict(),
        "region_level0": list(region_level0) if region_level0 is not None else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")
