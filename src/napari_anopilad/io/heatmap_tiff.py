"""Write and read the z-score heatmap as a float32 TIFF with its level-0 placement.

One TIFF pixel is one patch cell. The ImageDescription tag contains a JSON object with the placement
(``origin_level0``, ``patch_size_level0``) and any extra metadata. When the slide's microns per
pixel are known, the resolution tags give the cell size, so image viewers show physical units.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from numpy.typing import ArrayLike, NDArray

from napari_anopilad.io.atomic import atomic_output

HEATMAP_FORMAT = "napari-anopilad heatmap"
HEATMAP_FORMAT_VERSION = 1

_MICRONS_PER_CENTIMETRE = 10_000.0


@dataclass
class HeatmapTiff:
    """Heatmap grid read from a TIFF, with its placement on the slide."""

    grid: NDArray[np.float32]
    patch_size_level0: float
    origin_level0: tuple[float, float] = (0.0, 0.0)
    mpp: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def write_heatmap_tiff(
    path: str | Path,
    eroded: ArrayLike,
    patch_size_level0: float,
    origin_level0: tuple[float, float] = (0.0, 0.0),
    mpp: float | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a heatmap grid as a single-page float32 TIFF, atomically.

    Parameters
    ----------
    path : str or Path
        Output file.
    eroded : array_like
        ``(rows, cols)`` eroded z-scores, NaN where there is no score.
    patch_size_level0 : float
        Side of one cell (one TIFF pixel) in level-0 pixels.
    origin_level0 : tuple of float
        Level-0 ``(x, y)`` of the top-left corner of cell ``(0, 0)``.
    mpp : float, optional
        Level-0 microns per pixel. When given, XResolution and YResolution hold cells per centimetre.
    metadata : dict, optional
        Extra JSON-serialisable entries for the ImageDescription.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    grid = np.asarray(eroded, dtype=np.float32)
    if grid.ndim != 2:
        raise ValueError(f"Heatmap grid must be 2-D (rows, cols), got shape {grid.shape}.")
    if not patch_size_level0 > 0:
        raise ValueError(f"Patch size must be positive (level-0 pixels), got {patch_size_level0}.")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"Microns per pixel must be positive, got {mpp}.")

    description: dict[str, Any] = dict(metadata or {})
    description.update(
        {
            "format": HEATMAP_FORMAT,
            "format_version": HEATMAP_FORMAT_VERSION,
            "values": "eroded z-score, NaN where no patch was scored",
            "grid_shape": [int(grid.shape[0]), int(grid.shape[1])],
            "patch_size_level0": float(patch_size_level0),
            "origin_level0": [float(origin_level0[0]), float(origin_level0[1])],
            "mpp": None if mpp is None else float(mpp),
        }
    )
    try:
        description_text = json.dumps(description, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Heatmap metadata must be JSON-serialisable without NaN: {error}.") from error

    options: dict[str, Any] = {}
    if mpp is not None:
        cells_per_centimetre = _MICRONS_PER_CENTIMETRE / (float(patch_size_level0) * float(mpp))
        options["resolution"] = (cells_per_centimetre, cells_per_centimetre)
        options["resolutionunit"] = tifffile.RESUNIT.CENTIMETER

    with atomic_output(path) as temporary:
        # metadata=None stops tifffile from writing its own JSON description in place of ours.
        tifffile.imwrite(
            temporary, grid, photometric="minisblack", description=description_text, metadata=None, **options
        )
    return path


def read_heatmap_tiff(path: str | Path) -> HeatmapTiff:
    """Read a heatmap TIFF written by `write_heatmap_tiff`.

    Raises
    ------
    ValueError
        If the file is missing, not a TIFF, or lacks the heatmap description.
    """
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages.first
            description_text = page.description
            grid = page.asarray()
    except (OSError, tifffile.TiffFileError) as error:
        raise ValueError(f"Failed to read heatmap TIFF {path}: {error}.") from error

    try:
        description = json.loads(description_text)
    except json.JSONDecodeError:
        description = None
    if not isinstance(description, dict) or description.get("format") != HEATMAP_FORMAT:
        raise ValueError(
            f"TIFF {path} is not a napari-anopilad heatmap: its ImageDescription lacks the "
            f"'{HEATMAP_FORMAT}' JSON header."
        )
    if grid.ndim != 2:
        raise ValueError(f"Heatmap TIFF {path} has an image of shape {grid.shape}; expected (rows, cols).")

    origin = description.get("origin_level0", [0.0, 0.0])
    known = {"format", "format_version", "values", "grid_shape", "patch_size_level0", "origin_level0", "mpp"}
    return HeatmapTiff(
        grid=grid.astype(np.float32, copy=False),
        patch_size_level0=float(description["patch_size_level0"]),
        origin_level0=(float(origin[0]), float(origin[1])),
        mpp=None if description.get("mpp") is None else float(description["mpp"]),
        metadata={key: value for key, value in description.items() if key not in known},
    )
