"""Tests for reading annotation files and measuring their coverage of the patch grid."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath

from napari_anopilad.io.annotations import (
    EXCLUDED,
    LABEL_EXCLUDED,
    LABEL_NORMAL,
    LABEL_TUMOUR,
    OTHER,
    TUMOUR,
    AnnotatedRegion,
    AnnotationError,
    Annotations,
    read_annotations,
)
from napari_anopilad.io.geometry import Polygon, coverage_fraction, signed_ring_area

DATA = Path(__file__).parent / "data"
ANNOTATIONS = DATA / "annotations"


def _rectangle(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _rectangle_overlap(box: tuple[float, float, float, float], shape, patch_size) -> np.ndarray:
    """Exact fraction of each cell covered by an axis-aligned box (x0, y0, x1, y1)."""
    rows, cols = shape
    fraction = np.zeros(shape)
    for row in range(rows):
        for col in range(cols):
            width = min(box[2], (col + 1) * patch_size) - max(box[0], col * patch_size)
            height = min(box[3], (row + 1) * patch_size) - max(box[1], row * patch_size)
            fraction[row, col] = max(width, 0) * max(height, 0) / patch_size**2
    return fraction


# Geometry --------------------------------------------------------------------------------------------


def test_polygon_drops_closing_vertex():
    polygon = Polygon(np.array([[0, 0], [4, 0], [4, 2], [0, 0]]))
    assert len(polygon.exterior_level0) == 3
    assert polygon.area_level0 == 4.0


def test_polygon_area_subtracts_holes():
    polygon = Polygon(_rectangle(0, 0, 10, 10), (_rectangle(2, 2, 4, 5),))
    assert polygon.area_level0 == 100 - 6


def test_polygon_rejects_degenerate_ring():
    with pytest.raises(ValueError, match="at least 3"):
        Polygon(np.array([[0, 0], [1, 1]]))
    with pytest.raises(ValueError, match="NaN"):
        Polygon(np.array([[0, 0], [1, np.nan], [2, 0]]))


def test_signed_area_orientation():
    # Counter-clockwise with y up is positive.
    assert signed_ring_area(np.array([[0, 0], [1, 0], [1, 1], [0, 1]])) == 1.0
    assert signed_ring_area(np.array([[0, 0], [0, 1], [1, 1], [1, 0]])) == -1.0


def test_coverage_rectangle_hand_computed():
    polygon = Polygon(_rectangle(64, 32, 320, 160))
    fraction = coverage_fraction([polygon], (2, 3), 128)
    # Cell (0, 0): x 64..128 by y 32..128 = 64 * 96 / 128**2.
    expected = (
        np.array(
            [
                [64 * 96, 128 * 96, 64 * 96],
                [64 * 32, 128 * 32, 64 * 32],
            ]
        )
        / 128**2
    )
    np.testing.assert_array_equal(fraction, expected.astype(np.float32))


@pytest.mark.parametrize("seed", range(10))
def test_coverage_random_aligned_rectangles(seed):
    rng = np.random.default_rng(seed)
    patch_size, shape = 64, (5, 7)
    # Edges on multiples of the 4 px sample spacing (64 / 16) give exact fractions.
    x0, x1 = np.sort(rng.choice(np.arange(-8, 7 * 16 + 8) * 4, size=2, replace=False))
    y0, y1 = np.sort(rng.choice(np.arange(-8, 5 * 16 + 8) * 4, size=2, replace=False))
    fraction = coverage_fraction([Polygon(_rectangle(x0, y0, x1, y1))], shape, patch_size)
    np.testing.assert_allclose(fraction, _rectangle_overlap((x0, y0, x1, y1), shape, patch_size), atol=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_coverage_unaligned_rectangle_within_bound(seed):
    rng = np.random.default_rng(100 + seed)
    patch_size, shape, k = 50.0, (4, 4), 16
    x0, x1 = np.sort(rng.uniform(-10, 210, size=2))
    y0, y1 = np.sort(rng.uniform(-10, 210, size=2))
    fraction = coverage_fraction([Polygon(_rectangle(x0, y0, x1, y1))], shape, patch_size, samples_per_cell=k)
    exact = _rectangle_overlap((x0, y0, x1, y1), shape, patch_size)
    # Four straight edges, each off by at most (2k - 1) / k**2 of a cell.
    assert np.max(np.abs(fraction - exact)) <= 4 * (2 * k - 1) / k**2


def test_coverage_hole_and_subtract():
    outer = Polygon(_rectangle(0, 0, 256, 128), (_rectangle(0, 0, 64, 64),))
    cut = Polygon(_rectangle(128, 0, 256, 128))
    fraction = coverage_fraction([outer], (1, 2), 128, subtract=[cut])
    np.testing.assert_array_equal(fraction, np.array([[0.75, 0.0]], dtype=np.float32))


def test_coverage_origin_shifts_grid():
    polygon = Polygon(_rectangle(1000, 2000, 1100, 2100))
    fraction = coverage_fraction([polygon], (2, 2), 100, origin_level0=(950, 2000))
    np.testing.assert_array_equal(fraction, np.array([[0.5, 0.5], [0.0, 0.0]], dtype=np.float32))


def test_coverage_union_counts_overlap_once():
    first = Polygon(_rectangle(0, 0, 96, 128))
    second = Polygon(_rectangle(32, 0, 128, 128))
    np.testing.assert_array_equal(coverage_fraction([first, second], (1, 1), 128), [[1.0]])


def test_coverage_bands_match_single_pass(monkeypatch):
    import napari_anopilad.io.geometry as geometry

    annotations = read_annotations(ANNOTATIONS / "camelyon16-json" / "Tumor_017.json")
    x_min = min(p.bounds_level0[0] for p in annotations.tumour)
    y_min = min(p.bounds_level0[1] for p in annotations.tumour)
    origin = (x_min - 300, y_min - 300)
    single = coverage_fraction(annotations.tumour, (12, 10), 256, origin)
    monkeypatch.setattr(geometry, "_MAX_BAND_SAMPLES", 3 * 10 * 16 * 16)
    banded = coverage_fraction(annotations.tumour, (12, 10), 256, origin)
    np.testing.assert_array_equal(banded, single)


def test_coverage_matches_matplotlib_path():
    annotations = read_annotations(ANNOTATIONS / "camelyon16-json" / "Tumor_002.json")
    polygon = annotations.tumour[0]
    x_min, y_min, x_max, y_max = polygon.bounds_level0
    patch_size, k = 256.0, 8
    origin = (np.floor(x_min) - 100.0, np.floor(y_min) - 100.0)
    shape = (int((y_max - origin[1]) // patch_size) + 2, int((x_max - origin[0]) // patch_size) + 2)
    fraction = coverage_fraction([polygon], shape, patch_size, origin, samples_per_cell=k)

    step = patch_size / k
    ys = origin[1] + (np.arange(shape[0] * k) + 0.5) * step
    xs = origin[0] + (np.arange(shape[1] * k) + 0.5) * step
    grid_x, grid_y = np.meshgrid(xs, ys)
    inside = MplPath(polygon.exterior_level0).contains_points(
        np.column_stack([grid_x.ravel(), grid_y.ravel()])
    )
    reference = inside.reshape(shape[0], k, shape[1], k).mean(axis=(1, 3))
    # Only samples exactly on the boundary may differ between the two point-in-polygon tests.
    np.testing.assert_allclose(fraction, reference, atol=2 / k**2)
    assert fraction.sum() > 0


def test_coverage_area_matches_shoelace():
    annotations = read_annotations(ANNOTATIONS / "camelyon17" / "patient_004_node_4.xml")
    for polygon in annotations.tumour:
        x_min, y_min, _, _ = polygon.bounds_level0
        fraction = coverage_fraction([polygon], (8, 8), 64, (x_min - 10, y_min - 10), samples_per_cell=32)
        assert float(fraction.sum()) * 64**2 == pytest.approx(polygon.area_level0, rel=0.01)


# Formats --------------------------------------------------------------------------------------------


def test_camelyon17_xml_tumour_polygons():
    annotations = read_annotations(ANNOTATIONS / "camelyon17" / "patient_004_node_4.xml")
    assert len(annotations.tumour) == 3
    assert annotations.excluded == []
    assert [region.classification for region in annotations.regions] == ["Tumor"] * 3
    first = annotations.tumour[0].exterior_level0
    assert len(first) == 8
    np.testing.assert_allclose(first[0], [12711.2998, 88778.1016])


def test_camelyon17_tiles_overlap_tumour():
    annotations = read_annotations(ANNOTATIONS / "camelyon17" / "patient_004_node_4.xml")
    with open(DATA / "patches" / "camelyon17" / "labels.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["file"].startswith("tile_")]
    assert len(rows) == 7
    for row in rows:
        origin = (float(row["x0"]), float(row["y0"]))
        tumour, excluded = annotations.coverage_grid((1, 1), int(row["width"]), origin)
        if row["label_from_notebook"] == "cancer":
            assert tumour[0, 0] > 0.3, row["file"]
        else:
            assert tumour[0, 0] == 0.0, row["file"]
        assert excluded[0, 0] == 0.0


def test_camelyon17_roi_is_bbox_of_first_polygon():
    annotations = read_annotations(ANNOTATIONS / "camelyon17" / "patient_004_node_4.xml")
    x_min, y_min, x_max, y_max = annotations.tumour[0].bounds_level0
    # The crop is named roi_x12597_y88778_341x382: the polygon's bounding box in level-0 pixels.
    assert (int(x_min), int(y_min)) == (12597, 88778)
    assert (round(x_max - x_min), round(y_max - y_min)) == (341, 382)


def test_camelyon16_json_positive_and_negative():
    tumour_017 = read_annotations(ANNOTATIONS / "camelyon16-json" / "Tumor_017.json")
    assert [region.name for region in tumour_017.regions] == ["_0", "_1"]
    assert {region.label for region in tumour_017.regions} == {TUMOUR}
    normal_017 = read_annotations(ANNOTATIONS / "camelyon16-json" / "Normal_017.json")
    assert len(normal_017.excluded) == 2
    assert normal_017.tumour == []


def test_camelyon16_json_label_grid():
    annotations = read_annotations(ANNOTATIONS / "camelyon16-json" / "Tumor_002.json")
    x_min, y_min, x_max, y_max = annotations.tumour[0].bounds_level0
    origin = (x_min - 512, y_min - 512)
    shape = (int((y_max - y_min) // 256) + 5, int((x_max - x_min) // 256) + 5)
    labels = annotations.label_grid(shape, 256, origin_level0=origin)
    tumour, _ = annotations.coverage_grid(shape, 256, origin_level0=origin)
    np.testing.assert_array_equal(labels == LABEL_TUMOUR, tumour >= 0.5)
    np.testing.assert_array_equal(labels == LABEL_NORMAL, tumour == 0)
    np.testing.assert_array_equal(labels == LABEL_EXCLUDED, (tumour > 0) & (tumour < 0.5))
    assert np.count_nonzero(labels == LABEL_TUMOUR) > 0


def test_label_grid_excluded_region():
    annotations = Annotations(
        regions=[
            AnnotatedRegion(Polygon(_rectangle(0, 0, 300, 100)), TUMOUR),
            AnnotatedRegion(Polygon(_rectangle(100, 0, 200, 100)), EXCLUDED),
        ]
    )
    labels = annotations.label_grid((1, 4), 100)
    np.testing.assert_array_equal(labels, [[LABEL_TUMOUR, LABEL_EXCLUDED, LABEL_TUMOUR, LABEL_NORMAL]])
    tumour, excluded = annotations.coverage_grid((1, 4), 100)
    np.testing.assert_array_equal(tumour, [[1, 0, 1, 0]])
    np.testing.assert_array_equal(excluded, [[0, 1, 0, 0]])


def test_label_grid_rejects_bad_fractions():
    with pytest.raises(ValueError, match="min_fraction"):
        Annotations().label_grid((1, 1), 100, min_fraction=0.2, max_normal_fraction=0.3)


def test_asap_polygon_dot_and_pointset(caplog):
    polygon = read_annotations(ANNOTATIONS / "asap" / "asap-polygon.xml")
    assert len(polygon.regions) == 1
    assert polygon.regions[0].label == TUMOUR  # group "None" is unclassified
    assert len(polygon.regions[0].polygon.exterior_level0) == 6
    with caplog.at_level(logging.WARNING):
        assert read_annotations(ANNOTATIONS / "asap" / "asap-dot.xml").regions == []
        assert read_annotations(ANNOTATIONS / "asap" / "asap-pointset.xml").regions == []
    assert "Dot" in caplog.text
    assert "PointSet" in caplog.text


def test_asap_unclassified_as_other():
    annotations = read_annotations(ANNOTATIONS / "asap" / "asap-polygon.xml", unclassified_as=OTHER)
    assert annotations.tumour == []


def test_asap_camelyon16_groups_and_comma_decimals(tmp_path):
    xml = """<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
<Annotation Name="a" Type="Polygon" PartOfGroup="_0"><Coordinates>
<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="200" Y="0"/>
<Coordinate Order="3" X="0" Y="100"/><Coordinate Order="2" X="200" Y="100"/>
</Coordinates></Annotation>
<Annotation Name="b" Type="Polygon" PartOfGroup="_2"><Coordinates>
<Coordinate Order="0" X="0,5" Y="0"/><Coordinate Order="1" X="100,5" Y="0"/>
<Coordinate Order="2" X="100,5" Y="100"/><Coordinate Order="3" X="0,5" Y="100"/>
</Coordinates></Annotation>
<Annotation Name="c" Type="Polygon" PartOfGroup="Child"><Coordinates>
<Coordinate Order="0" X="300" Y="0"/><Coordinate Order="1" X="400" Y="0"/>
<Coordinate Order="2" X="400" Y="100"/>
</Coordinates></Annotation>
</Annotations><AnnotationGroups>
<Group Name="_0" PartOfGroup="None"/><Group Name="Child" PartOfGroup="Exclusion"/>
</AnnotationGroups></ASAP_Annotations>"""
    path = tmp_path / "camelyon16.xml"
    path.write_text(xml)
    annotations = read_annotations(path)
    assert [region.label for region in annotations.regions] == [TUMOUR, EXCLUDED, EXCLUDED]
    np.testing.assert_array_equal(annotations.tumour[0].exterior_level0, _rectangle(0, 0, 200, 100))
    assert annotations.excluded[0].exterior_level0[0, 0] == 0.5


def test_qupath_drawing_tools(caplog):
    folder = ANNOTATIONS / "qupath"
    areas = {"brush", "ellipse", "polygon", "rectangle", "wand"}
    for name in areas:
        annotations = read_annotations(folder / f"qupath-{name}.json")
        assert [region.name for region in annotations.regions] == [name]
        assert annotations.regions[0].label == TUMOUR
    rectangle = read_annotations(folder / "qupath-rectangle.json").tumour[0]
    assert rectangle.bounds_level0 == (26268, 15298, 26478, 15474)
    assert rectangle.area_level0 == 210 * 176
    with caplog.at_level(logging.WARNING):
        for name in ("line", "multipoint", "point", "polyline"):
            assert read_annotations(folder / f"qupath-{name}.json").regions == []
    assert "LineString" in caplog.text
    assert "MultiPoint" in caplog.text


def test_qupath_polygon_with_hole():
    annotations = read_annotations(ANNOTATIONS / "qupath" / "histoqc-holed.geojson")
    assert len(annotations.tumour) == 1
    polygon = annotations.tumour[0]
    assert len(polygon.holes_level0) == 1
    assert polygon.bounds_level0 == (10098, 16763, 13369, 19491)
    hole_area = abs(signed_ring_area(polygon.holes_level0[0]))
    assert polygon.area_level0 == pytest.approx(3271 * 2728 - hole_area)


def test_qupath_multipolygon_list_classified():
    annotations = read_annotations(ANNOTATIONS / "qupath" / "histoqc-tumor-example.geojson")
    labels = [(region.classification, region.label) for region in annotations.regions]
    assert labels == [("Tumor", TUMOUR)] * 3 + [("Invborder", OTHER)] * 5
    assert sum(len(polygon.holes_level0) for polygon in annotations.tumour) == 0
    assert len(annotations.regions[3].polygon.holes_level0) == 1


def test_qupath_other_classes_not_tumour():
    annotations = read_annotations(
        ANNOTATIONS / "qupath" / "advanced" / "qupath-polygon-cell-classified.json"
    )
    assert [region.classification for region in annotations.regions] == ["Cell", "Cell", "Nucleus", "Nucleus"]
    assert annotations.tumour == []
    custom = read_annotations(
        ANNOTATIONS / "qupath" / "advanced" / "qupath-polygon-cell-classified.json", tumour_classes={"cell"}
    )
    assert len(custom.tumour) == 2


def _feature(geometry, properties=None, feature_id=None):
    feature = {"type": "Feature", "geometry": geometry, "properties": properties or {}}
    if feature_id is not None:
        feature["id"] = feature_id
    return feature


SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}


def test_geojson_variants(tmp_path):
    features = [
        _feature(SQUARE, {"objectType": "annotation", "classification": {"name": "Tumor"}}),
        _feature(SQUARE, {"objectType": "annotation", "classification": {"names": ["Tumor", "Positive"]}}),
        _feature(SQUARE, {"objectType": "detection", "classification": {"name": "Tumor"}}),
        _feature(SQUARE, {"classification": {"name": "Tumor"}}, feature_id="PathCellObject"),
        _feature(
            SQUARE,
            {"classification": {"name": "Exclusion", "color": [0, 0, 0]}},
            feature_id="PathAnnotationObject",
        ),
        _feature(
            {"type": "GeometryCollection", "geometries": [SQUARE, {"type": "Point", "coordinates": [1, 1]}]}
        ),
    ]
    path = tmp_path / "collection.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    annotations = read_annotations(path)
    assert [region.label for region in annotations.regions] == [TUMOUR, TUMOUR, EXCLUDED, TUMOUR]
    assert annotations.regions[1].classification == "Tumor: Positive"

    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(SQUARE))
    assert len(read_annotations(bare).tumour) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("hello", "Unknown annotation format"),
        ("{not json", "not valid JSON"),
        ("<root/>", "expected <ASAP_Annotations>"),
        ("<ASAP_Annotations><unclosed>", "not well-formed"),
        ('{"type": "Banana"}', "unknown type"),
        ('[{"no_type": 1}]', "Feature or FeatureCollection"),
        ('{"type": "FeatureCollection"}', "'features' list"),
        ('{"type": "Feature", "properties": {}}', "no geometry"),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}',
            "invalid Polygon",
        ),
        ('{"type": "Feature", "geometry": {"type": "Circle"}}', "unknown geometry type"),
        ('{"positive": [{"name": "a"}]}', "no 'vertices'"),
        ('{"positive": [{"name": "a", "vertices": [[0, "x"], [1, 1], [2, 0]]}]}', "not a polygon"),
        ('{"positive": 3}', "must be a list"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "broken.annotation"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=message) as error:
        read_annotations(path)
    assert "broken.annotation" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_asap_invalid_coordinate(tmp_path):
    path = tmp_path / "bad.xml"
    path.write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon" PartOfGroup="_0">'
        '<Coordinates><Coordinate Order="0" X="abc" Y="0"/></Coordinates></Annotation>'
        "</Annotations></ASAP_Annotations>"
    )
    with pytest.raises(AnnotationError, match="invalid coordinate 'abc'"):
        read_annotations(path)


def test_missing_file(tmp_path):
    with pytest.raises(AnnotationError, match=r"missing\.xml"):
        read_annotations(tmp_path / "missing.xml")
