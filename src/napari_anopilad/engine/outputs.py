"""Output files of one analysed slide: patches.csv, slide.json, heatmaps, overlays, regions, reconstructions.

``anopilad analyze`` and the cohort workers both write a slide's files with :func:`write_outputs`. With a
triage map, the triage heatmap and overlay are written next to the AnoPILaD ones, patches.csv gains the
triage columns, and slide.json carries the triage slide scores, each block naming its scorer and coverage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

ANOPILAD_SCORER = "anopilad"


def method_of(bundle: Any) -> str:
    """Return the scoring method of a loaded bundle (``"anopilad"`` or a comparison method's name)."""
    return str(getattr(bundle, "method", ANOPILAD_SCORER))


# Columns that patches.csv gains after the standard ones when a triage map is written.
TRIAGE_COLUMNS = (
    "triage_knn_distance",
    "triage_knn_z",
    "triage_keyword_distance",
    "triage_keyword_z",
    "triage_z_eroded",
)


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


def tissue_cells_of(grid: Any, region_level0: tuple[int, int, int, int] | None) -> NDArray[np.int64]:
    """Return the grid's tissue cells, only those overlapping ``region_level0`` when it is given."""
    cells = np.asarray(grid.tissue_cells(), dtype=np.int64).reshape(-1, 2)
    return cells if region_level0 is None else cells_in_region(grid, cells, region_level0)


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
    triage: Any | None = None,
    plan: Any | None = None,
    compile_mode: str | None = None,
) -> dict[str, Path]:
    """Write patches.csv, slide.json, heatmap.tif, overlay.png, regions.geojson and the reconstructions.

    Parameters
    ----------
    out : Path
        Output folder (exists).
    slide, grid : Slide, PatchGrid
        The slide and its patch grid.
    results : SlideResults
        The AnoPILaD results of the analysed cells.
    settings, bundle
        The inference settings and the bundle.
    region_level0 : tuple of int or None
        The analysed box ``(x, y, width, height)`` in level-0 pixels, or None for the whole slide.
    store : ResultStore or None
        The result store, when the reconstruction pairs are to be written.
    triage : TriageResults, optional
        A triage map: adds triage_heatmap.tif, triage_overlay.png, the triage columns of patches.csv and
        the ``triage`` block of slide.json.
    plan : TriagePlan, optional
        The diffusion plan the triage map gave; recorded in slide.json.
    compile_mode : str, optional
        The ``torch.compile`` mode of AnoPILaD's UNet, recorded in slide.json; None when not compiling.
    """
    from napari_anopilad.io.heatmap_tiff import write_heatmap_tiff
    from napari_anopilad.io.regions import mask_to_polygons, region_z_max, write_regions_geojson
    from napari_anopilad.io.tables import write_patches_csv

    files: dict[str, Path] = {}
    n_tissue = len(tissue_cells_of(grid, region_level0))
    summary = slide_summary(
        results=results,
        settings=settings,
        bundle=bundle,
        region_level0=region_level0,
        slide=slide,
        n_tissue_patches=n_tissue,
        triage=triage,
        plan=plan,
        compile_mode=compile_mode,
    )
    label = {"demo": str(bool(bundle.demo)).lower(), "bundle_identity": bundle.identity}

    records = patch_records(grid, results, triage=triage)
    files["patches.csv"] = write_patches_csv(out / "patches.csv", records)

    files["heatmap.tif"] = write_heatmap_tiff(
        out / "heatmap.tif",
        results.heatmap_eroded,
        patch_size_level0=grid.patch_size_level0,
        mpp=slide.mpp,
        metadata={
            "scorer": method_of(bundle),
            "demo": bool(bundle.demo),
            "z_source": results.z_source,
            "threshold": results.threshold,
            "slide_identity": slide.identity,
            "bundle_identity": bundle.identity,
            "coverage": summary["coverage"],
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

    if triage is not None:
        files["triage_heatmap.tif"] = write_heatmap_tiff(
            out / "triage_heatmap.tif",
            triage.heatmap_eroded,
            patch_size_level0=grid.patch_size_level0,
            mpp=slide.mpp,
            metadata={
                "scorer": triage.scorer_name,
                "demo": bool(bundle.demo),
                "z_source": "calibration",
                "threshold": triage.threshold,
                "slide_identity": slide.identity,
                "bundle_identity": bundle.identity,
                "coverage": summary["triage"]["coverage"],
            },
        )
        files["triage_overlay.png"] = write_triage_overlay(
            out / "triage_overlay.png", slide=slide, grid=grid, triage=triage, demo=bundle.demo
        )

    if store is not None:
        files["reconstructions/"] = write_reconstruction_pairs(
            out / "reconstructions", slide, grid, results, store
        )

    files["slide.json"] = out / "slide.json"
    write_json(files["slide.json"], summary)
    return files


def named_scores(patches: Any) -> dict[str, NDArray[np.float64]]:
    """Return every per-patch score that stored patches contain, by name.

    Stores that keep named scores (a ``values`` mapping) give all of them; older ones give ``lpips`` and
    ``mse_latent``.
    """
    values = getattr(patches, "values", None)
    if isinstance(values, dict):
        return {str(name): np.asarray(array, dtype=np.float64) for name, array in values.items()}
    return {
        "lpips": np.asarray(patches.lpips, dtype=np.float64),
        "mse_latent": np.asarray(patches.mse_latent, dtype=np.float64),
    }


def patch_records(grid: Any, results: Any, triage: Any | None = None) -> list[dict[str, Any]]:
    """Build one patches.csv record per patch, in row-major order.

    Without ``triage`` the records are the AnoPILaD-analysed patches. With a triage map they are every
    patch with either score: the AnoPILaD fields of a patch that only triage scored are None, and so are
    the triage fields of a patch without a triage score.
    """
    from napari_anopilad.io.tables import PATCH_COLUMNS

    patches = results.patches
    scores = named_scores(patches)
    anopilad_index = {
        (int(row), int(col)): index for index, (row, col) in enumerate(zip(patches.rows, patches.cols))
    }
    cells = set(anopilad_index)
    triage_index: dict[tuple[int, int], int] = {}
    if triage is not None:
        triage_patches = triage.patches
        triage_index = {
            (int(row), int(col)): index
            for index, (row, col) in enumerate(zip(triage_patches.rows, triage_patches.cols))
        }
        cells |= set(triage_index)

    records = []
    for row, col in sorted(cells):
        x_level0, y_level0, width_level0, height_level0 = grid.box_level0(row, col)
        record: dict[str, Any] = {
            "x": x_level0,
            "y": y_level0,
            "width": width_level0,
            "height": height_level0,
            "row": row,
            "col": col,
            "tissue_fraction": float(grid.tissue_fraction[row, col]),
        }
        # A patch that only triage scored, or a method without some standard score, leaves those fields empty.
        record.update({column: None for column in PATCH_COLUMNS if column not in record})
        record.update(dict.fromkeys(scores))
        index = anopilad_index.get((row, col))
        if index is not None:
            record["keywords"] = [str(keyword) for keyword in patches.keywords[index]]
            record["weights"] = [float(weight) for weight in patches.weights[index]]
            record["prompt"] = str(patches.prompts[index])
            record.update({name: float(values[index]) for name, values in scores.items()})
            record["z"] = float(results.z[index])
            record["z_eroded"] = float(results.z_eroded[index])
        if triage is not None:
            record.update(_triage_fields(triage, triage_index.get((row, col))))
        records.append(record)
    return records


def _triage_fields(triage: Any, index: int | None) -> dict[str, float | None]:
    if index is None:
        return dict.fromkeys(TRIAGE_COLUMNS)
    patches = triage.patches
    return {
        "triage_knn_distance": float(patches.knn_distance[index]),
        "triage_knn_z": float(patches.knn_z[index]),
        "triage_keyword_distance": float(patches.keyword_distance[index]),
        "triage_keyword_z": float(patches.keyword_z[index]),
        "triage_z_eroded": float(triage.z_eroded[index]),
    }


def _thumbnail(slide: Any) -> tuple[NDArray[np.uint8], float]:
    thumbnail = slide.thumbnail()
    width_level0, height_level0 = slide.dimensions
    # Level-0 pixels per thumbnail pixel, averaged over both axes as pyramid downsamples are.
    downsample = (width_level0 / thumbnail.shape[1] + height_level0 / thumbnail.shape[0]) / 2
    return thumbnail, downsample


def write_overlay(path: Path, *, slide: Any, grid: Any, results: Any, demo: bool) -> Path:
    """Render the eroded heatmap over a slide thumbnail, with a colour bar and the threshold contour."""
    from napari_anopilad.io.overlay import render_overlay_png

    thumbnail, downsample = _thumbnail(slide)
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


def write_triage_overlay(path: Path, *, slide: Any, grid: Any, triage: Any, demo: bool) -> Path:
    """Render the eroded triage map over a slide thumbnail, titled with its score and coverage."""
    from napari_anopilad.io.overlay import render_overlay_png

    thumbnail, downsample = _thumbnail(slide)
    return render_overlay_png(
        path,
        thumbnail,
        downsample,
        triage.heatmap_eroded,
        patch_size_level0=grid.patch_size_level0,
        threshold=triage.threshold,
        title=(
            f"{Path(slide.path).name}: eroded triage z-score ({triage.score_name}, "
            f"{triage.n_patches}/{triage.n_tissue_patches} patches)"
        ),
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


def coverage(n_patches: int, n_tissue_patches: int) -> dict[str, Any]:
    """Return the coverage block of slide.json: patches scored, tissue patches and their ratio."""
    return {
        "n_patches": int(n_patches),
        "n_tissue_patches": int(n_tissue_patches),
        "fraction": n_patches / n_tissue_patches if n_tissue_patches else 0.0,
    }


def slide_summary(
    *,
    results: Any,
    settings: Any,
    bundle: Any,
    region_level0: tuple[int, int, int, int] | None,
    slide: Any,
    n_tissue_patches: int | None = None,
    triage: Any | None = None,
    plan: Any | None = None,
    compile_mode: str | None = None,
) -> dict[str, Any]:
    """Build the content of slide.json.

    The top-level slide scores are the bundle's method's (``scorer`` is ``"anopilad"`` or a comparison
    method's name). ``coverage`` gives how many of
    the ``n_tissue_patches`` tissue patches they cover (all analysed patches when the count is not given).
    With a triage map, the ``triage`` block holds its slide scores, scorer, coverage and diffusion plan.
    """
    n_tissue = results.n_patches if n_tissue_patches is None else n_tissue_patches
    summary: dict[str, Any] = {
        "slide": str(slide.path) if hasattr(slide, "path") else None,
        "slide_identity": slide.identity,
        "scorer": method_of(bundle),
        "z_max": results.z_max,
        "z_99": results.z_99,
        "n_patches": results.n_patches,
        "n_anomalous_patches": int(np.count_nonzero(results.mask)),
        "coverage": coverage(results.n_patches, n_tissue),
        "threshold": results.threshold,
        "score": results.score_name,
        "z_source": results.z_source,
        "z_mean": results.z_mean,
        "z_std": results.z_std,
        "demo": bool(bundle.demo),
        "bundle_identity": bundle.identity,
        "settings": settings.to_dict(),
        "start_timestep_on_grid": start_timestep_on_grid(bundle, settings),
        "compile": compile_mode,
        "region_level0": list(region_level0) if region_level0 is not None else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if triage is not None:
        summary["triage"] = {
            "scorer": triage.scorer_name,
            "score": triage.score_name,
            "k": triage.k,
            "z_max": triage.z_max,
            "z_99": triage.z_99,
            "n_patches": triage.n_patches,
            "n_anomalous_patches": int(np.count_nonzero(triage.mask)),
            "coverage": coverage(triage.n_patches, triage.n_tissue_patches),
            "threshold": triage.threshold,
            "z_source": "calibration",
            "plan": plan.to_dict() if plan is not None else None,
        }
    return summary


def start_timestep_on_grid(bundle: Any, settings: Any) -> int | None:
    """Return the grid timestep that AnoPILaD's diffusion starts from; None for a comparison method's bundle."""
    if method_of(bundle) != ANOPILAD_SCORER:
        return None
    on_grid: int | None = bundle.start_timestep_on_grid(settings)
    return on_grid


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as indented JSON with a final newline."""
    path.write_text(json.dumps(content, indent=2) + "\n")
