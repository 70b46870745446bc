"""Z-scores, the eroded patch heatmap, slide scores and the anomaly mask (numpy only).

The heatmap has one cell per patch on the level-0 patch grid, indexed ``(row, col)``. Cells without a
score (background, or tissue not yet analysed) are NaN. They stay NaN through erosion and never lower
a neighbour, so the tissue border is not eroded by the background around it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

# Slide score Z_99 averages the eroded values from this quantile up (the top 1 %).
Z99_QUANTILE_PERCENT = 99


def within_slide_stats(values: ArrayLike) -> tuple[float, float]:
    """Compute the mean and population standard deviation of one slide's patch scores.

    Used when no calibration statistics from held-out normal patches are available, so the
    z-scores are relative to the slide itself.

    Parameters
    ----------
    values : array_like
        Patch scores (any shape); every value must be finite.

    Returns
    -------
    mean, std : float
        Mean and standard deviation with ``ddof=0``.

    Raises
    ------
    ValueError
        If there are no values or any value is NaN or infinite.
    """
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError("Cannot compute within-slide statistics from zero patch scores.")
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f"Within-slide statistics need finite patch scores, but {bad} are NaN or infinite.")
    return float(array.mean()), float(array.std(ddof=0))


def zscores(values: ArrayLike, mean: float, std: float) -> NDArray[np.float64]:
    """Convert patch scores to z-scores ``(value - mean) / std``.

    Parameters
    ----------
    values : array_like
        Patch scores; NaN stays NaN.
    mean, std : float
        Statistics of the same score, from calibration on normal patches or from the slide itself.

    Returns
    -------
    numpy.ndarray
        Float64 z-scores with the shape of ``values``.

    Raises
    ------
    ValueError
        If ``std`` is not a positive finite number or ``mean`` is not finite.
    """
    if not np.isfinite(mean):
        raise ValueError(f"Z-score mean must be finite, got {mean!r}.")
    if not (np.isfinite(std) and std > 0):
        raise ValueError(
            f"Z-score standard deviation must be positive and finite, got {std!r}. "
            "All calibration scores are identical or the statistics are corrupt: recalibrate the bundle."
        )
    return (np.asarray(values, dtype=np.float64) - mean) / std


def heatmap_grid(
    shape: tuple[int, int],
    rows: Sequence[int] | NDArray[np.integer],
    cols: Sequence[int] | NDArray[np.integer],
    values: ArrayLike,
) -> NDArray[np.float32]:
    """Place per-patch values on the patch grid.

    Parameters
    ----------
    shape : tuple of int
        Grid shape ``(rows, cols)``.
    rows, cols : sequence of int
        Grid index of each patch.
    values : array_like
        One value per patch.

    Returns
    -------
    numpy.ndarray
        Float32 array of ``shape``, NaN in every cell without a value.

    Raises
    ------
    ValueError
        If the lengths differ, a cell lies outside the grid or a cell appears twice.
    """
    n_rows, n_cols = (int(shape[0]), int(shape[1]))
    row_index = np.asarray(rows, dtype=np.int64).ravel()
    col_index = np.asarray(cols, dtype=np.int64).ravel()
    value_array = np.asarray(values, dtype=np.float64).ravel()
    if not (row_index.size == col_index.size == value_array.size):
        raise ValueError(
            f"rows, cols and values must have one entry per patch, got {row_index.size}, "
            f"{col_index.size} and {value_array.size}."
        )

    outside = (row_index < 0) | (row_index >= n_rows) | (col_index < 0) | (col_index >= n_cols)
    if np.any(outside):
        first = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"Patch (row {row_index[first]}, col {col_index[first]}) lies outside the "
            f"{n_rows} x {n_cols} patch grid."
        )

    flat_index = row_index * n_cols + col_index
    unique, counts = np.unique(flat_index, return_counts=True)
    if np.any(counts > 1):
        row, col = divmod(int(unique[counts > 1][0]), n_cols)
        raise ValueError(f"Patch (row {row}, col {col}) has more than one value.")

    grid = np.full((n_rows, n_cols), np.nan, dtype=np.float32)
    grid.ravel()[flat_index] = value_array
    return grid


def erode_heatmap(grid: ArrayLike) -> NDArray[np.float32]:
    """Apply the 2x2 grey erosion of AnoPILaD to a z-score grid.

    Each scored cell becomes the minimum of itself and its up, left and up-left neighbours, over the
    neighbours that are scored. NaN cells stay NaN and are skipped as neighbours, as are neighbours
    outside the grid.

    Parameters
    ----------
    grid : array_like
        ``(rows, cols)`` z-scores, NaN where there is no score.

    Returns
    -------
    numpy.ndarray
        Float32 eroded grid of the same shape.
    """
    values = np.asarray(grid, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"Heatmap grid must be 2-D (rows, cols), got shape {values.shape}.")

    # +inf padding on the top and left makes missing neighbours neutral for the minimum.
    padded = np.full((values.shape[0] + 1, values.shape[1] + 1), np.inf, dtype=np.float32)
    padded[1:, 1:] = np.where(np.isnan(values), np.inf, values)
    eroded = np.minimum(
        np.minimum(padded[1:, 1:], padded[:-1, 1:]),
        np.minimum(padded[1:, :-1], padded[:-1, :-1]),
    )
    eroded[np.isnan(values)] = np.nan
    return eroded


def _tissue_values(eroded: ArrayLike) -> NDArray[np.float64]:
    values = np.asarray(eroded, dtype=np.float64).ravel()
    return values[~np.isnan(values)]


def z_max(eroded: ArrayLike) -> float | None:
    """Return the slide score Z_max, the maximum of the eroded heatmap over scored cells.

    Returns None when no cell is scored.
    """
    values = _tissue_values(eroded)
    if values.size == 0:
        return None
    return float(values.max())


def z_99(eroded: ArrayLike) -> float | None:
    """Return the slide score Z_99, the mean of the top 1 % of the eroded heatmap.

    The scored values are sorted ascending and averaged from index ``floor(0.99 * n)`` to the end,
    which is at least one value. The index is computed in integer arithmetic so that ``n = 100``
    gives exactly 99. Returns None when no cell is scored.
    """
    values = np.sort(_tissue_values(eroded))
    if values.size == 0:
        return None
    start = (Z99_QUANTILE_PERCENT * values.size) // 100
    return float(values[start:].mean())


def anomaly_mask(eroded: ArrayLike, threshold: float = 0.0) -> NDArray[np.bool_]:
    """Segment anomalies as the cells whose eroded z-score exceeds ``threshold``.

    The published default threshold is 0. NaN cells are never anomalous.
    """
    values = np.asarray(eroded, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.greater(values, threshold) & ~np.isnan(values)
