"""Render the eroded z-score heatmap over a slide thumbnail as a PNG for a pathologist.

Uses matplotlib's object API with the Agg canvas, so no GUI backend and no global pyplot state are
involved and rendering is safe in worker threads and on headless machines.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patheffects import Normal, Stroke
from numpy.typing import ArrayLike, NDArray

from napari_anopilad.io.atomic import atomic_output

from .regions import mask_to_polygons

DEMO_LABEL = "DEMO BUNDLE: scores are meaningless"
COLORMAP = "RdBu_r"
CONTOUR_COLOR = "#111111"
HEATMAP_ALPHA = 0.6
# Smallest half-range of the colour scale, so a slide with only small z-scores is not painted in
# saturated colours.
MIN_Z_LIMIT = 3.0
# A white rim keeps the black threshold outline visible over dark red cells and dark tissue.
_HALO = [Stroke(linewidth=3.6, foreground="white"), Normal()]


def symmetric_z_limit(eroded: ArrayLike, threshold: float = 0.0) -> float:
    """Choose the half-range ``L`` of a colour scale ``[-L, L]`` centred at z = 0.

    ``L`` is the 99th percentile of ``|z|`` over the scored cells, rounded up to an integer, and at
    least `MIN_Z_LIMIT` and ``|threshold| + 1``.
    """
    values = np.asarray(eroded, dtype=np.float64)
    values = np.abs(values[np.isfinite(values)])
    limit = max(MIN_Z_LIMIT, abs(float(threshold)) + 1.0)
    if values.size:
        limit = max(limit, float(math.ceil(np.percentile(values, 99))))
    return limit


def _check_inputs(
    thumbnail: NDArray[np.uint8], thumbnail_downsample: float, grid: NDArray[np.float64]
) -> None:
    if thumbnail.ndim != 3 or thumbnail.shape[2] not in (3, 4) or thumbnail.dtype != np.uint8:
        raise ValueError(
            f"Thumbnail must be a (height, width, 3) uint8 RGB array, got shape {thumbnail.shape} and "
            f"dtype {thumbnail.dtype}."
        )
    if not thumbnail_downsample > 0:
        raise ValueError(
            f"Thumbnail downsample (level-0 pixels per thumbnail pixel) must be positive, got {thumbnail_downsample}."
        )
    if grid.ndim != 2:
        raise ValueError(f"Heatmap grid must be 2-D (rows, cols), got shape {grid.shape}.")


def render_overlay_png(
    path: str | Path,
    thumbnail: ArrayLike,
    thumbnail_downsample: float,
    eroded: ArrayLike,
    patch_size_level0: float,
    threshold: float = 0.0,
    title: str = "",
    demo: bool = False,
    origin_level0: tuple[float, float] = (0.0, 0.0),
    mpp: float | None = None,
    z_limit: float | None = None,
    dpi: int = 150,
) -> Path:
    """Draw the heatmap over the slide thumbnail and save it as PNG, atomically.

    The heatmap uses a diverging colour map centred at z = 0 (blue below, red above) with explicit
    limits ``[-z_limit, z_limit]`` and is transparent where a cell has no score. The outline of the
    cells with eroded z above ``threshold`` is drawn along cell edges. Axes are in millimetres when
    ``mpp`` is known and in level-0 pixels otherwise.

    Parameters
    ----------
    path : str or Path
        Output PNG.
    thumbnail : array_like
        ``(height, width, 3)`` uint8 RGB thumbnail whose top-left corner is level-0 ``(0, 0)``.
    thumbnail_downsample : float
        Level-0 pixels per thumbnail pixel.
    eroded : array_like
        ``(rows, cols)`` eroded z-scores, NaN where there is no score.
    patch_size_level0 : float
        Cell side in level-0 pixels.
    threshold : float
        Anomaly threshold on the eroded z-score.
    title : str
        Title line, for example the slide name.
    demo : bool
        Whether the scores come from a demo bundle with random weights; adds a red warning banner.
    origin_level0 : tuple of float
        Level-0 ``(x, y)`` of the top-left corner of cell ``(0, 0)``.
    mpp : float, optional
        Level-0 microns per pixel, for millimetre axes.
    z_limit : float, optional
        Half-range of the colour scale; by default from `symmetric_z_limit`.
    dpi : int
        Resolution of the PNG.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    image = np.asarray(thumbnail)
    grid = np.asarray(eroded, dtype=np.float64)
    _check_inputs(image, thumbnail_downsample, grid)
    limit = float(z_limit) if z_limit is not None else symmetric_z_limit(grid, threshold)
    if not limit > 0:
        raise ValueError(f"z_limit must be positive, got {z_limit}.")

    # Axis unit: level-0 pixels times this scale.
    scale, unit = (mpp / 1000.0, "mm") if mpp else (1.0, "level-0 pixels")
    height_level0 = image.shape[0] * thumbnail_downsample
    width_level0 = image.shape[1] * thumbnail_downsample
    x0_level0, y0_level0 = float(origin_level0[0]), float(origin_level0[1])
    grid_extent = (
        x0_level0 * scale,
        (x0_level0 + grid.shape[1] * patch_size_level0) * scale,
        (y0_level0 + grid.shape[0] * patch_size_level0) * scale,
        y0_level0 * scale,
    )

    # About 7 inches of image width plus the colour bar, and room for the titles above.
    aspect = height_level0 / width_level0
    image_width = 7.0 if aspect <= 1.6 else 11.0 / aspect
    figure = Figure(figsize=(image_width + 2.0, image_width * aspect + 1.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(
        image[..., :3],
        extent=(0, width_level0 * scale, height_level0 * scale, 0),
        interpolation="antialiased",
    )

    colormap = colormaps[COLORMAP].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    heatmap = axes.imshow(
        np.ma.masked_invalid(grid),
        cmap=colormap,
        norm=Normalize(vmin=-limit, vmax=limit),
        alpha=HEATMAP_ALPHA,
        interpolation="nearest",
        extent=grid_extent,
    )

    with np.errstate(invalid="ignore"):
        anomalous = np.greater(grid, threshold) & np.isfinite(grid)
    for polygon in mask_to_polygons(anomalous, patch_size_level0, (x0_level0, y0_level0)):
        for ring in polygon.rings_level0:
            closed = np.vstack([ring, ring[:1]]) * scale
            axes.plot(closed[:, 0], closed[:, 1], color=CONTOUR_COLOR, linewidth=1.8, path_effects=_HALO)

    colorbar = figure.colorbar(heatmap, ax=axes, shrink=0.8, extend="both")
    colorbar.set_label("z-score")
    if -limit < threshold < limit:
        colorbar.ax.axhline(threshold, color=CONTOUR_COLOR, linewidth=1.4)

    axes.set_xlim(0, width_level0 * scale)
    axes.set_ylim(height_level0 * scale, 0)
    axes.set_xlabel(f"x ({unit})")
    axes.set_ylabel(f"y ({unit})")
    n_anomalous = int(np.count_nonzero(anomalous))
    n_scored = int(np.count_nonzero(np.isfinite(grid)))
    legend_label = f"eroded z > {threshold:g} ({n_anomalous} of {n_scored} patches)"
    axes.legend(
        handles=[Line2D([], [], color=CONTOUR_COLOR, linewidth=1.8, path_effects=_HALO, label=legend_label)],
        loc="lower right",
        framealpha=0.85,
        fontsize="small",
    )

    heading = title or "AnoPILaD anomaly heatmap"
    if demo:
        figure.suptitle(
            DEMO_LABEL,
            color="white",
            fontsize="x-large",
            fontweight="bold",
            bbox={"boxstyle": "round", "facecolor": "#c00000", "edgecolor": "none"},
        )
        axes.text(
            0.5,
            0.5,
            "DEMO",
            transform=axes.transAxes,
            fontsize=72,
            color="#c00000",
            alpha=0.25,
            ha="center",
            va="center",
            rotation=30,
            fontweight="bold",
        )
    axes.set_title(heading)

    with atomic_output(path, suffix=".png") as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
    return path
