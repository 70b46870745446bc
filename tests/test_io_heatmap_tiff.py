"""Tests for the heatmap TIFF, checked with tifffile's own reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_anopilad.io import read_heatmap_tiff, write_heatmap_tiff


def _grid() -> np.ndarray:
    grid = np.random.default_rng(0).normal(size=(7, 9)).astype(np.float32)
    grid[0, :3] = np.nan
    return grid


def test_round_trip_with_placement(tmp_path):
    grid = _grid()
    path = write_heatmap_tiff(
        tmp_path / "heatmap.tif",
        grid,
        patch_size_level0=512,
        origin_level0=(1024, 2048),
        mpp=0.25,
        metadata={"slide": "CMU-1", "demo": True},
    )
    heatmap = read_heatmap_tiff(path)
    np.testing.assert_array_equal(heatmap.grid, grid)
    assert heatmap.grid.dtype == np.float32
    assert heatmap.patch_size_level0 == 512
    assert heatmap.origin_level0 == (1024, 2048)
    assert heatmap.mpp == 0.25
    assert heatmap.metadata == {"slide": "CMU-1", "demo": True}


def test_tifffile_reads_pixels_and_tags(tmp_path):
    grid = _grid()
    path = write_heatmap_tiff(tmp_path / "heatmap.tif", grid, patch_size_level0=256, mpp=0.5)
    np.testing.assert_array_equal(tifffile.imread(path), grid)
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages.first
        assert page.dtype == np.float32
        assert page.shape == (7, 9)
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        # One cell is 256 px * 0.5 um = 128 um, so 10000 / 128 = 78.125 cells per centimetre.
        numerator, denominator = page.tags["XResolution"].value
        assert numerator / denominator == pytest.approx(78.125)
        numerator, denominator = page.tags["YResolution"].value
        assert numerator / denominator == pytest.approx(78.125)
        description = json.loads(page.description)
    assert description["origin_level0"] == [0.0, 0.0]
    assert description["patch_size_level0"] == 256.0
    assert description["grid_shape"] == [7, 9]


def test_no_resolution_without_mpp(tmp_path):
    path = write_heatmap_tiff(tmp_path / "heatmap.tif", _grid(), patch_size_level0=256)
    with tifffile.TiffFile(path) as tiff:
        unit = tiff.pages.first.tags.get("ResolutionUnit")
        assert unit is None or unit.value != tifffile.RESUNIT.CENTIMETER
    assert read_heatmap_tiff(path).mpp is None


def test_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        write_heatmap_tiff(tmp_path / "a.tif", np.zeros(3), patch_size_level0=256)
    with pytest.raises(ValueError, match="positive"):
        write_heatmap_tiff(tmp_path / "a.tif", np.zeros((2, 2)), patch_size_level0=0)
    with pytest.raises(ValueError, match="JSON"):
        write_heatmap_tiff(
            tmp_path / "a.tif", np.zeros((2, 2)), patch_size_level0=1, metadata={"x": object()}
        )
    assert not list(tmp_path.iterdir())


def test_read_rejects_other_tiffs(tmp_path):
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"other\.tif is not a napari-anopilad heatmap"):
        read_heatmap_tiff(other)
    text = tmp_path / "text.tif"
    text.write_text("not a tiff")
    with pytest.raises(ValueError, match=r"text\.tif"):
        read_heatmap_tiff(text)
    with pytest.raises(ValueError, match=r"missing\.tif"):
        read_heatmap_tiff(tmp_path / "missing.tif")
