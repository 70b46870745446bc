"""Tests for the z-score heatmap maths, checked against scipy.ndimage and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from napari_anopilad.method.heatmap import (
    anomaly_mask,
    erode_heatmap,
    heatmap_grid,
    within_slide_stats,
    z_99,
    z_max,
    zscores,
)

nan = np.nan


def _scipy_erosion(grid: np.ndarray) -> np.ndarray:
    """Reference erosion: NaN as +inf, +inf outside the grid, window over rows r-1..r and cols c-1..c."""
    filled = np.where(np.isnan(grid), np.inf, grid).astype(np.float64)
    footprint = np.ones((2, 2), dtype=bool)
    # For an even-sized footprint scipy centres on index 1, so origin 0 covers offsets -1 and 0.
    eroded = ndimage.grey_erosion(filled, footprint=footprint, origin=(0, 0), mode="constant", cval=np.inf)
    eroded[np.isnan(grid)] = np.nan
    return eroded


def test_scipy_footprint_covers_up_and_left():
    grid = np.zeros((3, 3))
    grid[1, 1] = -1.0
    eroded = _scipy_erosion(grid)
    expected = np.zeros((3, 3))
    expected[1:, 1:] = -1.0
    np.testing.assert_array_equal(eroded, expected)


@pytest.mark.parametrize("seed", range(20))
def test_erosion_matches_scipy_with_holes(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 30, size=2))
    grid = rng.normal(size=shape).astype(np.float32)
    grid[rng.random(shape) < rng.uniform(0.0, 0.6)] = np.nan
    eroded = erode_heatmap(grid)
    assert eroded.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(eroded), np.isnan(grid))
    np.testing.assert_array_equal(eroded, _scipy_erosion(grid).astype(np.float32))


def test_erosion_hand_computed():
    grid = np.array(
        [
            [1.0, 2.0, nan],
            [3.0, -1.0, 5.0],
            [nan, 4.0, 0.5],
        ],
        dtype=np.float32,
    )
    expected = np.array(
        [
            [1.0, 1.0, nan],
            [1.0, -1.0, -1.0],
            [nan, -1.0, -1.0],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(erode_heatmap(grid), expected)


def test_erosion_background_never_lowers():
    grid = np.array([[nan, nan], [nan, 2.5]], dtype=np.float32)
    eroded = erode_heatmap(grid)
    assert eroded[1, 1] == 2.5
    assert np.isnan(eroded[0, 0])


def test_erosion_isolated_cell_and_first_row():
    grid = np.array([[3.0, 1.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(erode_heatmap(grid), [[3.0, 1.0, 1.0]])


def test_erosion_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        erode_heatmap(np.zeros(4))


def test_zscores_values():
    z = zscores([1.0, 2.0, nan], mean=1.5, std=0.5)
    np.testing.assert_allclose(z[:2], [-1.0, 1.0])
    assert np.isnan(z[2])


@pytest.mark.parametrize("std", [0.0, -1.0, nan, math.inf])
def test_zscores_reject_bad_std(std):
    with pytest.raises(ValueError, match="standard deviation"):
        zscores([1.0], mean=0.0, std=std)


def test_within_slide_stats_population_std():
    mean, std = within_slide_stats([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt(1.25))
    assert std == pytest.approx(float(np.std([1, 2, 3, 4], ddof=0)))


def test_within_slide_stats_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="zero"):
        within_slide_stats([])
    with pytest.raises(ValueError, match="NaN"):
        within_slide_stats([1.0, nan])


def test_heatmap_grid_places_values():
    grid = heatmap_grid((2, 3), rows=[0, 1], cols=[2, 0], values=[0.5, -1.5])
    assert grid.dtype == np.float32
    assert grid[0, 2] == 0.5
    assert grid[1, 0] == -1.5
    assert int(np.count_nonzero(np.isnan(grid))) == 4


def test_heatmap_grid_rejects_bad_cells():
    with pytest.raises(ValueError, match="outside"):
        heatmap_grid((2, 2), rows=[2], cols=[0], values=[1.0])
    with pytest.raises(ValueError, match="more than one"):
        heatmap_grid((2, 2), rows=[0, 0], cols=[1, 1], values=[1.0, 2.0])
    with pytest.raises(ValueError, match="one entry per patch"):
        heatmap_grid((2, 2), rows=[0], cols=[0, 1], values=[1.0])


def test_z_max_ignores_nan_and_handles_empty():
    assert z_max(np.array([[nan, 1.5], [-2.0, nan]])) == 1.5
    assert z_max(np.full((2, 2), nan)) is None


def test_z99_single_value():
    assert z_99(np.array([[nan, 4.0]])) == 4.0


def test_z99_hundred_values_takes_max():
    # floor(0.99 * 100) = 99: only the largest value.
    values = np.arange(100, dtype=np.float64)
    np.random.default_rng(0).shuffle(values)
    assert z_99(values.reshape(10, 10)) == 99.0


def test_z99_hundred_fifty_values_takes_two():
    # floor(0.99 * 150) = 148: indices 148 and 149 of 0..149.
    values = np.arange(150, dtype=np.float64)
    assert z_99(values.reshape(10, 15)) == pytest.approx((148 + 149) / 2)


def test_z99_two_hundred_fifty_values_takes_three():
    # floor(0.99 * 250) = 247: indices 247, 248, 249, with NaN cells ignored.
    grid = np.full((20, 20), nan)
    grid.ravel()[:250] = np.arange(250)[::-1]
    assert z_99(grid) == pytest.approx((247 + 248 + 249) / 3)


def test_z99_empty_is_none():
    assert z_99(np.full((3, 3), nan)) is None


def test_anomaly_mask_threshold():
    eroded = np.array([[nan, 0.0, 0.1], [-1.0, 2.0, nan]])
    np.testing.assert_array_equal(anomaly_mask(eroded), [[False, False, True], [False, True, False]])
    np.testing.assert_array_equal(
        anomaly_mask(eroded, threshold=1.0), [[False, False, False], [False, True, False]]
    )
