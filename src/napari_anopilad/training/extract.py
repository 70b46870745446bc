"""Step 1: cut the tissue patches of whole slides into PNG files, with a manifest and a slide table.

For each slide the tissue cells of the patch grid (256 px at 0.5 microns per pixel, i.e. 20x, by default)
are read and saved as ``patches/<slide>/r<row>_c<col>.png``. A patch whose PNG exists is not read again,
so an interrupted run resumes. An annotation file next to the slides, or in ``--annotations``, named like
the slide (``<slide>.xml``, ``.json`` or ``.geojson``) labels each patch from the area it covers:
``tumour`` (tumour fraction at least ``--min-label-fraction``), ``normal`` (no tumour, excluded fraction
below it) or ``excluded``. A slide without an annotation is normal throughout.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from napari_anopilad.training.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    SLIDE_COLUMNS,
    SLIDES_NAME,
    read_split_file,
    write_table_atomic,
)

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".dcm")
ANNOTATION_SUFFIXES = (".xml", ".json", ".geojson")
LABEL_NAMES = {0: "normal", 1: "tumour", -1: "excluded"}


def find_slides(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders into the slide files they name, sorted, without duplicates."""
    slides: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            slides.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES))
        elif path.is_file():
            slides.append(path)
        else:
            raise FileNotFoundError(f"slide or folder {path} not found")
    return sorted(dict.fromkeys(slides))


def find_annotation(slide_path: Path, folders: Sequence[Path]) -> Path | None:
    """Return the annotation file named like the slide, searched in ``folders`` then beside the slide."""
    for folder in [*folders, slide_path.parent]:
        for suffix in ANNOTATION_SUFFIXES:
            candidate = folder / (slide_path.stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def extract_slide(
    slide_path: Path,
    output: Path,
    split: str,
    annotation_path: Path | None,
    mpp: float | None = None,
    target_mpp: float = 0.5,
    patch_size: int = 256,
    min_tissue_fraction: float = 0.5,
    min_label_fraction: float = 0.5,
    max_patches: int | None = None,
    progress: object | None = None,
) -> tuple[list[dict[str, object]], dict[str, object]]:
    """Write the tissue patches of one slide and return its manifest rows and slide-table row."""
    from napari_anopilad.io.annotations import read_annotations
    from napari_anopilad.slide import build_patch_grid, open_slide, read_patches

    name = slide_path.stem
    with open_slide(slide_path, mpp=mpp) as slide:
        grid = build_patch_grid(
            slide, target_mpp=target_mpp, patch_size=patch_size, min_tissue_fraction=min_tissue_fraction
        )
        cells = grid.tissue_cells()
        if max_patches is not None and len(cells) > max_patches:
            # Evenly spaced in row-major order, so a dry run still spans the slide.
            cells = cells[np.linspace(0, len(cells) - 1, max_patches).round().astype(int)]
        tumour_fraction = np.zeros(grid.shape, dtype=np.float32)
        excluded_fraction = np.zeros(grid.shape, dtype=np.float32)
        labels = np.zeros(grid.shape, dtype=np.int8)
        slide_label = "normal"
        if annotation_path is not None:
            annotations = read_annotations(annotation_path)
            tumour_fraction, excluded_fraction = annotations.coverage_grid(grid.shape, grid.patch_size_level0)
            labels = annotations.label_grid(
                grid.shape, grid.patch_size_level0, min_fraction=min_label_fraction
            )
            if annotations.tumour:
                slide_label = "tumour"

        patch_folder = output / "patches" / name
        patch_folder.mkdir(parents=True, exist_ok=True)
        relative_paths = [Path("patches") / name / f"r{row:04d}_c{col:04d}.png" for row, col in cells]
        missing = [
            index for index, relative in enumerate(relative_paths) if not (output / relative).is_file()
        ]
        batch_size = 32
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            images = read_patches(slide, grid, cells[batch])
            for index, image in zip(batch, images):
                target = output / relative_paths[index]
                partial = target.with_name(target.stem + ".partial.png")
                Image.fromarray(image).save(partial)
                partial.replace(target)
            if progress is not None:
                progress.update(len(batch))  # type: ignore[attr-defined]

        rows = []
        for (row, col), relative in zip(cells, relative_paths):
            x_level0, y_level0, width_level0, height_level0 = grid.box_level0(int(row), int(col))
            rows.append(
                {
                    "path": relative.as_posix(),
                    "slide": name,
                    "slide_identity": slide.identity,
                    "split": split,
                    "x_level0": x_level0,
                    "y_level0": y_level0,
                    "width_level0": width_level0,
                    "height_level0": height_level0,
                    "row": int(row),
                    "col": int(col),
                    "tissue_fraction": round(float(grid.tissue_fraction[row, col]), 4),
                    "tumour_fraction": round(float(tumour_fraction[row, col]), 4),
                    "excluded_fraction": round(float(excluded_fraction[row, col]), 4),
                    "label": LABEL_NAMES[int(labels[row, col])],
                    "caption": "",
                }
            )
        slide_row: dict[str, object] = {
            "slide": name,
            "slide_path": str(slide_path),
            "slide_identity": slide.identity,
            "split": split,
            "label": slide_label,
            "annotation_path": "" if annotation_path is None else str(annotation_path),
            "mpp": slide.mpp,
            "rows": grid.shape[0],
            "cols": grid.shape[1],
            "patch_size_level0": grid.patch_size_level0,
            "n_patches": len(cells),
        }
    return rows, slide_row


def _merge_captions(rows: list[dict[str, object]], output: Path) -> None:
    # A rerun keeps the captions that the captioning step already wrote.
    manifest_path = output / MANIFEST_NAME
    if not manifest_path.is_file():
        return
    previous = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    captions = dict(zip(previous["path"], previous["caption"]))
    for row in rows:
        row["caption"] = captions.get(str(row["path"]), "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="01_extract_patches.py",
        description="Cut the tissue patches of whole slides into PNG files with a manifest (step 1 of training).",
    )
    parser.add_argument("slides", nargs="+", help="slide files or folders of slides")
    parser.add_argument(
        "--split", required=True, type=Path, help="split file (CSV slide,split[,mpp] or JSON)"
    )
    parser.add_argument("--output", required=True, type=Path, help="output folder for patches/ and the CSVs")
    parser.add_argument(
        "--annotations",
        type=Path,
        action="append",
        default=[],
        help="folder of annotation files named like the slides (repeatable)",
    )
    parser.add_argument(
        "--target-mpp", type=float, default=0.5, help="microns per pixel of the patches (0.5 is 20x)"
    )
    parser.add_argument("--patch-size", type=int, default=256, help="patch side in pixels")
    parser.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a patch")
    parser.add_argument(
        "--min-label-fraction",
        type=float,
        default=0.5,
        help="tumour (or excluded) area fraction that labels a patch",
    )
    parser.add_argument(
        "--max-patches-per-slide",
        type=int,
        default=None,
        help="keep at most this many tissue patches per slide (dry runs)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the patch extraction from command-line arguments; return the exit status."""
    from tqdm.auto import tqdm

    from napari_anopilad.slide import SlideError

    args = build_parser().parse_args(argv)
    splits = read_split_file(args.split)
    slides = find_slides(args.slides)
    unassigned = [path.stem for path in slides if path.stem not in splits]
    if unassigned:
        raise SystemExit(f"error: slides {unassigned} have no entry in the split file {args.split}; add them")
    args.output.mkdir(parents=True, exist_ok=True)

    manifest_rows: list[dict[str, object]] = []
    slide_rows: list[dict[str, object]] = []
    failed = []
    with tqdm(desc="patches", unit="patch") as progress:
        for slide_path in slides:
            entry = splits[slide_path.stem]
            mpp = float(entry["mpp"]) if entry["mpp"] else None
            annotation = find_annotation(slide_path, args.annotations)
            try:
                rows, slide_row = extract_slide(
                    slide_path,
                    args.output,
                    entry["split"],
                    annotation,
                    mpp=mpp,
                    target_mpp=args.target_mpp,
                    patch_size=args.patch_size,
                    min_tissue_fraction=args.min_tissue,
                    min_label_fraction=args.min_label_fraction,
                    max_patches=args.max_patches_per_slide,
                    progress=progress,
                )
            except (SlideError, ValueError, OSError) as error:
                logger.error("slide %s skipped: %s", slide_path, error)
                progress.write(f"slide {slide_path} skipped: {error}")
                failed.append(slide_path.name)
                continue
            manifest_rows.extend(rows)
            slide_rows.append(slide_row)

    _merge_captions(manifest_rows, args.output)
    write_table_atomic(pd.DataFrame(manifest_rows, columns=MANIFEST_COLUMNS), args.output / MANIFEST_NAME)
    write_table_atomic(pd.DataFrame(slide_rows, columns=SLIDE_COLUMNS), args.output / SLIDES_NAME)
    print(f"{len(manifest_rows)} patches of {len(slide_rows)} slides in {args.output / MANIFEST_NAME}")
    if failed:
        print(f"skipped slides (see the messages above): {', '.join(failed)}")
        return 1
    return 0
