"""Placement of the heatmap and anomaly layers over the real CMU slide, and the cells in view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_anopilad.slide import build_patch_grid
from napari_anopilad.widgets.layers import (
    cells_in_box,
    grid_layer_transform,
    viewer_camera,
    visible_box_level0,
    world_to_cell,
)


def test_grid_transform_half_pixel_offset() -> None:
    scale, translate = grid_layer_transform(256)
    assert scale == (256.0, 256.0)
    assert translate == (127.5, 127.5)

    # Cell 0's data-pixel edges lie at -0.5 and 0.5 in data coordinates.
    top_edge_world = -0.5 * scale[0] + translate[0]
    bottom_edge_world = 0.5 * scale[0] + translate[0]
    # Level-0 pixel y covers world [y - 0.5, y + 0.5), so cell 0 covers world [-0.5, 255.5).
    assert top_edge_world == -0.5
    assert bottom_edge_world == 255.5


def test_grid_transform_rejects_zero() -> None:
    with pytest.raises(ValueError, match="patch_size_level0"):
        grid_layer_transform(0)


def test_world_to_cell_edges() -> None:
    shape = (11, 8)
    # Level-0 pixel 256 (world 256 +- 0.5) is the first pixel of row 1; pixel 255 the last of row 0.
    assert world_to_cell((256.0, 0.0), 256, shape) == (1, 0)
    assert world_to_cell((255.49, 0.0), 256, shape) == (0, 0)
    assert world_to_cell((255.5, 511.4), 256, shape) == (1, 1)
    assert world_to_cell((-0.5, -0.5), 256, shape) == (0, 0)
    assert world_to_cell((-0.6, 10.0), 256, shape) is None
    assert world_to_cell((10.0, 8 * 256 - 0.5), 256, shape) is None
    assert world_to_cell((0.0, 5.0, 300.0, 600.0), 256, shape) == (1, 2)


def test_cells_in_box_centre_first() -> None:
    cells = cells_in_box((300.0, 300.0, 800.0, 700.0), 256, (11, 8))
    assert sorted(map(tuple, cells.tolist())) == [(row, col) for row in (1, 2, 3) for col in (1, 2)]
    # The box centre (550, 500) lies in cell (2, 1).
    assert tuple(cells[0]) == (2, 1)


def test_cells_in_box_candidates_and_clipping() -> None:
    candidates = np.array([[0, 0], [1, 1], [10, 7], [3, 3]])
    cells = cells_in_box((-100.0, -100.0, 600.0, 600.0), 256, (11, 8), candidates)
    assert sorted(map(tuple, cells.tolist())) == [(0, 0), (1, 1)]
    assert cells_in_box((5000.0, 5000.0, 6000.0, 6000.0), 256, (11, 8)).shape == (0, 2)


@pytest.mark.gui
def test_layers_cover_cell_boxes(make_napari_viewer, cmu_slide_path: Path) -> None:
    from napari_anopilad._reader import opened_slide
    from napari_anopilad.widgets.model import SlideAnalysis

    viewer = make_napari_viewer()
    slide_layer = viewer.open(str(cmu_slide_path), plugin="napari-anopilad")[0]
    slide = opened_slide(cmu_slide_path)
    grid = build_patch_grid(slide)
    analysis = SlideAnalysis(viewer, slide_layer, slide, grid)

    assert analysis.heatmap_layer.name == "CMU-1-Small-Region z-score"
    assert analysis.anomalies_layer.name == "CMU-1-Small-Region anomalies"
    assert analysis.heatmap_layer.data.shape == grid.shape
    for row, col in [(0, 0), (3, 4), (10, 7)]:
        x_level0, y_level0, width_level0, height_level0 = grid.box_level0(row, col)
        # Edges of level-0 pixels [y, y + h) in the slide layer's world frame.
        top_left_world = slide_layer.data_to_world((y_level0 - 0.5, x_level0 - 0.5))
        bottom_right_world = slide_layer.data_to_world(
            (y_level0 + height_level0 - 0.5, x_level0 + width_level0 - 0.5)
        )

        # The heatmap's data pixel (row, col) spans data [row - 0.5, row + 0.5).
        heatmap = analysis.heatmap_layer
        np.testing.assert_allclose(heatmap.data_to_world((row - 0.5, col - 0.5)), top_left_world)
        np.testing.assert_allclose(heatmap.data_to_world((row + 0.5, col + 0.5)), bottom_right_world)

        # The anomaly labels draw each cell as a block of label_scale x label_scale pixels.
        labels = analysis.anomalies_layer
        k = analysis.label_scale
        np.testing.assert_allclose(labels.data_to_world((row * k - 0.5, col * k - 0.5)), top_left_world)
        np.testing.assert_allclose(
            labels.data_to_world(((row + 1) * k - 0.5, (col + 1) * k - 0.5)), bottom_right_world
        )

        # A click on the first or last level-0 pixel of the box picks this cell.
        assert analysis.cell_at_world(slide_layer.data_to_world((y_level0, x_level0))) == (row, col)
        last_pixel = (y_level0 + height_level0 - 1, x_level0 + width_level0 - 1)
        assert analysis.cell_at_world(slide_layer.data_to_world(last_pixel)) == (row, col)


@pytest.mark.gui
def test_visible_box_follows_camera(make_napari_viewer, cmu_slide_path: Path) -> None:
    viewer = make_napari_viewer(show=True)
    layer = viewer.open(str(cmu_slide_path), plugin="napari-anopilad")[0]
    canvas_height, canvas_width = viewer.window._qt_viewer.canvas.size
    camera = viewer_camera(viewer)

    camera.center = (1000.0, 1100.0)
    camera.zoom = 2.0
    y_min, x_min, y_max, x_max = visible_box_level0(viewer, layer.level_shapes[0][:2])

    assert y_min == pytest.approx(1000.0 - canvas_height / 4 + 0.5)
    assert y_max == pytest.approx(1000.0 + canvas_height / 4 + 0.5)
    assert x_min == pytest.approx(1100.0 - canvas_width / 4 + 0.5)
    assert x_max == pytest.approx(1100.0 + canvas_width / 4 + 0.5)

    camera.zoom = 0.01
    assert visible_box_level0(viewer, layer.level_shapes[0][:2]) == (0.0, 0.0, 2967.0, 2220.0)
