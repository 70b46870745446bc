"""The patch manifest and slide table that every training step reads and extends, and the split file.

``manifest.csv`` has one row per patch; ``slides.csv`` one row per slide, with what the evaluation needs
to rebuild the slide's patch grid. Both live in the extraction output folder, and PNG paths in the
manifest are relative to it, so the folder can move.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

MANIFEST_NAME = "manifest.csv"
SLIDES_NAME = "slides.csv"
SPLITS = ("train", "validation", "test-in", "test-out")
LABELS = ("normal", "tumour", "excluded")
MANIFEST_COLUMNS = [
    "path",
    "slide",
    "slide_identity",
    "split",
    "x_level0",
    "y_level0",
    "width_level0",
    "height_level0",
    "row",
    "col",
    "tissue_fraction",
    "tumour_fraction",
    "excluded_fraction",
    "label",
    "caption",
]
SLIDE_COLUMNS = [
    "slide",
    "slide_path",
    "slide_identity",
    "split",
    "label",
    "annotation_path",
    "mpp",
    "rows",
    "cols",
    "patch_size_level0",
    "n_patches",
]


def read_split_file(path: str | Path) -> dict[str, dict[str, str]]:
    """Read the split file: which split each slide belongs to, and optionally its mpp.

    Parameters
    ----------
    path
        A CSV with columns ``slide`` and ``split`` (and optionally ``mpp``, level-0 microns per pixel for
        slides whose metadata lacks it), or a JSON object ``{"slide": "split"}`` or
        ``{"slide": {"split": ..., "mpp": ...}}``. ``slide`` is the slide file name without its suffix.

    Returns
    -------
    dict
        ``{slide: {"split": split, "mpp": mpp or ""}}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found")
    entries: dict[str, dict[str, str]] = {}
    if path.suffix.lower() == ".json":
        document = json.loads(path.read_text())
        if not isinstance(document, dict):
            raise ValueError(f"split file {path} must hold a JSON object mapping slide names to splits")
        for slide, value in document.items():
            entry = value if isinstance(value, dict) else {"split": value}
            entries[str(slide)] = {
                "split": str(entry.get("split", "")),
                "mpp": str(entry.get("mpp", "") or ""),
            }
    else:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = {"slide", "split"} - set(table.columns)
        if missing:
            raise ValueError(
                f"split file {path} lacks the columns {sorted(missing)}: it needs slide and split"
            )
        for record in table.to_dict("records"):
            entries[record["slide"]] = {"split": record["split"], "mpp": record.get("mpp", "")}
    for slide, entry in entries.items():
        if entry["split"] not in SPLITS:
            raise ValueError(
                f"split file {path}: slide {slide!r} has split {entry['split']!r}; use one of {', '.join(SPLITS)}"
            )
    return entries


def write_table_atomic(table: pd.DataFrame, path: Path) -> None:
    """Write a CSV through a temporary file and a rename, so an interrupted write never truncates it."""
    partial = path.with_name(path.name + ".partial")
    table.to_csv(partial, index=False)
    os.replace(partial, path)


def read_manifest(folder: str | Path) -> pd.DataFrame:
    """Read ``manifest.csv`` from an extraction folder; ``caption`` is an empty string where missing."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found: run the patch extraction step first")
    table = pd.read_csv(path, dtype={"slide": str, "caption": str, "path": str}, keep_default_na=False)
    missing = set(MANIFEST_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"manifest {path} lacks the columns {sorted(missing)}: rerun the extraction")
    return table


def read_slides(folder: str | Path) -> pd.DataFrame:
    """Read ``slides.csv`` from an extraction folder."""
    path = Path(folder) / SLIDES_NAME
    if not path.is_file():
        raise FileNotFoundError(f"slide table {path} not found: run the patch extraction step first")
    return pd.read_csv(path, dtype={"slide": str, "annotation_path": str}, keep_default_na=False)


def load_patches(folder: str | Path, relative_paths: Iterable[str]) -> np.ndarray:
    """Read manifest patches as ``(n, height, width, 3)`` uint8 RGB."""
    images = []
    for relative in relative_paths:
        path = Path(folder) / relative
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB")))
        except OSError as error:
            raise ValueError(
                f"patch {path} could not be read: {error}; rerun the extraction to rewrite it"
            ) from error
    return np.stack(images) if images else np.zeros((0, 256, 256, 3), dtype=np.uint8)


def select_rows(
    table: pd.DataFrame, splits: Sequence[str] | None = None, labels: Sequence[str] | None = None
) -> pd.DataFrame:
    """Return the manifest rows of the given splits and labels (all when None)."""
    keep = np.ones(len(table), dtype=bool)
    if splits is not None:
        keep &= table["split"].isin(list(splits)).to_numpy()
    if labels is not None:
        keep &= table["label"].isin(list(labels)).to_numpy()
    return table[keep]
