"""Tests for tracing anomaly masks into polygons and writing them as QuPath GeoJSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from scipy import ndimage

from napari_anopilad.io.annotations import TUMOUR, read_annotations
from napari_anopilad.io.geometry import coverage_fraction, signed_ring_area
from napari_anopilad.io.regions import (
    mask_to_polygons,
    region_z_max,
    regions_feature_collection,
    write_regions_geojson,
)

QUPATH = Path(__file__).parent / "data" / "annotations" / "qupath"
FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def _rasterize_with_matplotlib(polygons, shape, patch_size, origin=(0.0, 0.0)) -> np.ndarray:
    """Independent check: a cell is inside when its centre is inside an exterior and no hole."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    centres = np.column_stack(
        [origin[0] + (cols.ravel() + 0.5) * patch_size, origin[1] + (rows.ravel() + 0.5) * patch_size]
    )
    inside = np.zeros(len(centres), dtype=bool)
    for polygon in polygons:
        in_polygon = MplPath(polygon.exterior_level0).contains_points(centres)
        for hole in polygon.holes_level0:
            in_polygon &= ~MplPath(hole).contains_points(centres)
        inside |= in_polygon
    return inside.reshape(shape)


def _check_polygons(mask: np.ndarray, patch_size: float = 256.0, origin=(0.0, 0.0)) -> None:
    polygons = mask_to_polygons(mask, patch_size, origin)
    _, count = ndimage.label(mask, structure=FOUR)
    assert len(polygons) == count

    np.testing.assert_array_equal(_rasterize_with_matplotlib(polygons, mask.shape, patch_size, origin), mask)
    # Sub-cell sampling sees every part of each cell, so it also catches polygons that spill over edges.
    fraction = coverage_fraction(polygons, mask.shape, patch_size, origin, samples_per_cell=4)
    np.testing.assert_array_equal(fraction, mask.astype(np.float32))

    total_area = sum(polygon.area_level0 for polygon in polygons)
    assert total_area == pytest.approx(mask.sum() * patch_size**2)
    for polygon in polygons:
        assert signed_ring_area(polygon.exterior_level0) < 0
        for hole in polygon.holes_level0:
            assert signed_ring_area(hole) > 0
        for ring in polygon.rings_level0:
            # Simple rings: no vertex visited twice.
            assert len({tuple(vertex) for vertex in ring}) == len(ring)
            # Vertices on cell corners.
            np.testing.assert_array_equal((ring - origin) % patch_size, 0)


def test_single_cell_square():
    mask = np.zeros((3, 3), dtype=bool)
    mask[1, 2] = True
    polygons = mask_to_polygons(mask, 100)
    assert len(polygons) == 1
    exterior = polygons[0].exterior_level0
    assert {tuple(v) for v in exterior} == {(200, 100), (300, 100), (300, 200), (200, 200)}
    assert polygons[0].holes_level0 == ()


def test_rectangle_drops_collinear_vertices():
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 1:5] = True
    (polygon,) = mask_to_polygons(mask, 10, origin_level0=(1000, 2000))
    assert len(polygon.exterior_level0) == 4
    assert polygon.bounds_level0 == (1010, 2010, 1050, 2030)


def test_ring_has_one_hole():
    mask = np.ones((3, 3), dtype=bool)
    mask[1, 1] = False
    (polygon,) = mask_to_polygons(mask, 1)
    assert len(polygon.holes_level0) == 1
    assert polygon.area_level0 == 8
    _check_polygons(mask)


def test_corner_touching_cells_are_separate():
    mask = np.array([[True, False], [False, True]])
    polygons = mask_to_polygons(mask, 1)
    assert len(polygons) == 2
    assert all(polygon.area_level0 == 1 for polygon in polygons)
    _check_polygons(mask)


def test_hole_touching_exterior_at_corner():
    # The empty cell (1, 1) is enclosed on four sides; its corner touches the outside at (2, 2).
    mask = np.array(
        [
            [1, 1, 1],
            [1, 0, 1],
            [1, 1, 0],
        ],
        dtype=bool,
    )
    (polygon,) = mask_to_polygons(mask, 1)
    assert len(polygon.holes_level0) == 1
    assert len(polygon.exterior_level0) == 6
    _check_polygons(mask)


def test_two_holes_touching_at_corner():
    mask = np.ones((4, 4), dtype=bool)
    mask[1, 1] = False
    mask[2, 2] = False
    (polygon,) = mask_to_polygons(mask, 1)
    assert len(polygon.holes_level0) == 2
    _check_polygons(mask)


def test_island_inside_hole():
    mask = np.ones((5, 5), dtype=bool)
    mask[1:4, 1:4] = False
    mask[2, 2] = True
    polygons = mask_to_polygons(mask, 1)
    assert len(polygons) == 2
    assert len(polygons[0].holes_level0) == 1
    assert polygons[1].area_level0 == 1
    _check_polygons(mask)


def test_empty_and_full_masks():
    assert mask_to_polygons(np.zeros((4, 4), dtype=bool), 1) == []
    (polygon,) = mask_to_polygons(np.ones((4, 4), dtype=bool), 2)
    assert polygon.area_level0 == 64


@pytest.mark.parametrize("seed", range(25))
def test_random_masks_round_trip(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 25, size=2))
    mask = rng.random(shape) < rng.uniform(0.2, 0.8)
    _check_polygons(mask, patch_size=float(rng.choice([1, 224, 256, 512])), origin=(512.0, 1024.0))


@pytest.mark.parametrize("seed", range(5))
def test_checkerboard_like_masks(seed):
    rng = np.random.default_rng(1000 + seed)
    rows, cols = np.mgrid[0:16, 0:16]
    mask = ((rows + cols) % 2 == 0) | (rng.random((16, 16)) < 0.3)
    _check_polygons(mask)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_polygons(np.zeros(3, dtype=bool), 1)
    with pytest.raises(ValueError, match="positive"):
        mask_to_polygons(np.zeros((2, 2), dtype=bool), 0)


def test_region_z_max_order():
    mask = np.array([[1, 0, 1], [1, 0, 0]], dtype=bool)
    eroded = np.array([[0.5, np.nan, 3.0], [1.5, -1.0, -2.0]])
    assert region_z_max(mask, eroded) == [1.5, 3.0]
    polygons = mask_to_polygons(mask, 1)
    assert polygons[0].bounds_level0 == (0, 0, 1, 2)


def test_geojson_matches_qupath_export_layout():
    reference = json.loads((QUPATH / "histoqc-tumor-example.geojson").read_text())[0]
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    collection = regions_feature_collection(mask_to_polygons(mask, 256), [2.5], mpp=0.25)
    feature = collection["features"][0]
    assert collection["type"] == "FeatureCollection"
    assert set(reference) <= set(feature)
    assert set(reference["properties"]) <= set(feature["properties"])
    assert feature["properties"]["objectType"] == "annotation"
    classification = feature["properties"]["classification"]
    assert classification["name"] == "Anomaly"
    assert classification["color"] == [220, 40, 40]
    # Same packing as QuPath's colorRGB, for example -3670016 is (200, 0, 0).
    assert classification["colorRGB"] & 0xFFFFFF == (220 << 16) | (40 << 8) | 40
    assert classification["colorRGB"] < 0
    ring = feature["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]
    measurements = {item["name"]: item["value"] for item in feature["properties"]["measurements"]}
    assert measurements["Z_max"] == 2.5
    assert measurements["Area (level-0 px^2)"] == 512 * 512
    assert measurements["Area µm^2"] == pytest.approx(512 * 512 * 0.25**2)
    assert "Z_max 2.50" in feature["properties"]["name"]


def test_write_and_read_back(tmp_path):
    rng = np.random.default_rng(7)
    mask = rng.random((12, 15)) < 0.45
    eroded = rng.normal(size=mask.shape)
    polygons = mask_to_polygons(mask, 512, origin_level0=(2048, 0))
    path = write_regions_geojson(
        tmp_path / "out" / "regions.geojson", polygons, region_z_max(mask, eroded), properties={"demo": True}
    )
    assert path.exists()
    assert not list(path.parent.glob("*.tmp"))

    annotations = read_annotations(path, tumour_classes={"anomaly"})
    assert len(annotations.regions) == len(polygons)
    assert all(region.label == TUMOUR for region in annotations.regions)
    assert all(region.classification == "Anomaly" for region in annotations.regions)
    for read, written in zip(annotations.tumour, polygons):
        np.testing.assert_array_equal(read.exterior_level0, written.exterior_level0)
        assert len(read.holes_level0) == len(written.holes_level0)
    tumour, _ = annotations.coverage_grid(mask.shape, 512, origin_level0=(2048, 0))
    np.testing.assert_array_equal(tumour, mask.astype(np.float32))


def test_write_rejects_mismatched_z_values(tmp_path):
    polygons = mask_to_polygons(np.ones((1, 1), dtype=bool), 1)
    with pytest.raises(ValueError, match="2 Z_max values for 1 regions"):
        write_regions_geojson(tmp_path / "r.geojson", polygons, [1.0, 2.0])
    assert not (tmp_path / "r.geojson").exists()
