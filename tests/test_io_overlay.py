"""Tests for the overlay picture, drawn over a thumbnail of the real CMU slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from matplotlib.image import imread

from napari_anopilad.io.overlay import render_overlay_png, symmetric_z_limit

SLIDE = Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs"
DOWNSAMPLE = 8
PATCH_SIZE = 256


@pytest.fixture(scope="module")
def thumbnail() -> np.ndarray:
    with tifffile.TiffFile(SLIDE) as tiff:
        level0 = tiff.pages.first.asarray()
    # Block mean over 8 x 8 level-0 pixels, cropped to whole blocks.
    height, width = (level0.shape[0] // DOWNSAMPLE) * DOWNSAMPLE, (level0.shape[1] // DOWNSAMPLE) * DOWNSAMPLE
    blocks = level0[:height, :width].reshape(
        height // DOWNSAMPLE, DOWNSAMPLE, width // DOWNSAMPLE, DOWNSAMPLE, 3
    )
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8)


def _synthetic_grid(thumbnail: np.ndarray) -> np.ndarray:
    """Z-scores for the level-0 grid: background cells NaN, a hot spot of positive z."""
    rows = -(-thumbnail.shape[0] * DOWNSAMPLE // PATCH_SIZE)
    cols = -(-thumbnail.shape[1] * DOWNSAMPLE // PATCH_SIZE)
    row_index, col_index = np.mgrid[0:rows, 0:cols]
    grid = np.random.default_rng(3).normal(-1.0, 0.6, size=(rows, cols))
    grid += 4.0 * np.exp(-((row_index - 4) ** 2 + (col_index - 5) ** 2) / 3.0)
    cell_means = np.array(
        [
            [
                thumbnail[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32].mean()
                if r * 32 < thumbnail.shape[0]
                else 255
                for c in range(cols)
            ]
            for r in range(rows)
        ]
    )
    grid[cell_means > 215] = np.nan
    return grid.astype(np.float32)


def test_real_thumbnail_overlay(tmp_path, thumbnail):
    grid = _synthetic_grid(thumbnail)
    assert np.isnan(grid).any()
    assert (grid > 0).any()
    path = render_overlay_png(
        tmp_path / "overlay.png",
        thumbnail,
        DOWNSAMPLE,
        grid,
        PATCH_SIZE,
        threshold=0.0,
        title="CMU-1-Small-Region.svs",
        demo=True,
        mpp=0.499,
    )
    picture = imread(path)
    assert picture.ndim == 3
    assert picture.shape[0] > 600
    assert picture.shape[1] > 600
    # The demo banner is saturated red, which the slide and the heatmap at alpha 0.6 never reach.
    red = (picture[..., 0] > 0.7) & (picture[..., 1] < 0.1) & (picture[..., 2] < 0.1)
    assert red[: picture.shape[0] // 10].sum() > 500
    # Keep a copy next to the tests' temporary files for a visual check.
    assert path.stat().st_size > 50_000


def test_not_demo_has_no_banner(tmp_path, thumbnail):
    grid = _synthetic_grid(thumbnail)
    path = render_overlay_png(tmp_path / "overlay.png", thumbnail, DOWNSAMPLE, grid, PATCH_SIZE, demo=False)
    picture = imread(path)
    red = (picture[..., 0] > 0.7) & (picture[..., 1] < 0.1) & (picture[..., 2] < 0.1)
    assert red[: picture.shape[0] // 10].sum() < 50


def test_nan_cells_are_transparent(tmp_path):
    thumbnail = np.full((64, 64, 3), 255, dtype=np.uint8)
    grid = np.full((4, 4), np.nan, dtype=np.float32)
    grid[0, 0] = 3.0
    path = render_overlay_png(tmp_path / "o.png", thumbnail, 4.0, grid, 64, dpi=50)
    picture = imread(path)
    # Near-white stays where no cell is scored: the plot's centre lies in NaN cells.
    height, width = picture.shape[:2]
    assert picture[height // 2, width // 2 - width // 10, :3].min() > 0.95


def test_symmetric_limit():
    assert symmetric_z_limit(np.array([np.nan, 0.5])) == 3.0
    assert symmetric_z_limit(np.array([np.nan, -7.2, 1.0])) >= 7.0
    assert symmetric_z_limit(np.array([0.0]), threshold=4.0) == 5.0


def test_rejects_bad_thumbnail(tmp_path):
    with pytest.raises(ValueError, match="uint8 RGB"):
        render_overlay_png(tmp_path / "o.png", np.zeros((4, 4)), 1.0, np.zeros((1, 1)), 4)
    with pytest.raises(ValueError, match="downsample"):
        render_overlay_png(tmp_path / "o.png", np.zeros((4, 4, 3), np.uint8), 0, np.zeros((1, 1)), 4)
