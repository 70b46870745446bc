"""The plugin's docks on a real viewer: analyse the region in view of the CMU slide with the demo bundle,
then check the heatmap's placement and values, the threshold, the exports and the patch inspector.

One module-scoped run keeps the CPU time down: the tiny demo model still takes seconds per patch here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from napari_anopilad.engine.store import StoredPatches
from napari_anopilad.widgets.layers import cells_in_box, viewer_camera, visible_box_level0

pytestmark = pytest.mark.gui

# Centre of the view: the corner shared by tissue cells (4, 4), (4, 5), (5, 4) and (5, 5) of the CMU grid.
VIEW_CENTRE_LEVEL0 = (5 * 256.0, 5 * 256.0)
ANALYSIS_TIMEOUT_MS = 240_000


def reference_eroded(z_grid: np.ndarray) -> np.ndarray:
    """Erode by the 2x2 minimum over scored cells, written as a plain loop (independent of the package)."""
    eroded = np.full(z_grid.shape, np.nan)
    for row in range(z_grid.shape[0]):
        for col in range(z_grid.shape[1]):
            if np.isnan(z_grid[row, col]):
                continue
            neighbours = [
                z_grid[r, c]
                for r, c in ((row, col), (row - 1, col), (row, col - 1), (row - 1, col - 1))
                if r >= 0 and c >= 0 and not np.isnan(z_grid[r, c])
            ]
            eroded[row, col] = min(neighbours)
    return eroded


@pytest.fixture
def plugin_viewer(
    make_napari_viewer, qtbot, cmu_slide_path: Path, demo_bundle_dir: Path, tmp_path, monkeypatch
):
    """A visible viewer with the CMU slide and the three docks, zoomed in on four tissue patches."""
    from napari_anopilad.widgets.analysis import AnalysisWidget
    from napari_anopilad.widgets.inspector import InspectorWidget
    from napari_anopilad.widgets.threshold import ThresholdWidget

    monkeypatch.setenv("NAPARI_ANOPILAD_STORE", str(tmp_path / "store"))
    viewer = make_napari_viewer(show=True)
    slide_layer = viewer.open(str(cmu_slide_path), plugin="napari-anopilad")[0]
    analysis_widget = AnalysisWidget(viewer)
    threshold_widget = ThresholdWidget(viewer)
    inspector_widget = InspectorWidget(viewer)
    viewer.window.add_dock_widget(analysis_widget, name="Anomaly analysis")
    viewer.window.add_dock_widget(threshold_widget, name="Anomaly threshold")
    viewer.window.add_dock_widget(inspector_widget, name="Patch inspector", area="left")

    analysis_widget.device_choice.setCurrentText("cpu")
    analysis_widget.batch_size.setValue(4)
    analysis_widget.set_bundle_folder(demo_bundle_dir)
    qtbot.waitUntil(lambda: analysis_widget.loaded_bundle is not None, timeout=120_000)
    qtbot.waitUntil(lambda: analysis_widget.worker is None, timeout=120_000)

    # A view about 1.5 patches across, so that two to four tissue patches are in view.
    canvas_height, canvas_width = viewer.window._qt_viewer.canvas.size
    camera = viewer_camera(viewer)
    camera.center = VIEW_CENTRE_LEVEL0
    camera.zoom = max(canvas_height, canvas_width) / (1.5 * 256)
    qtbot.wait(50)
    return viewer, slide_layer, analysis_widget, threshold_widget, inspector_widget


def test_visible_region_analysis(plugin_viewer, qtbot, tmp_path: Path) -> None:
    from napari_anopilad.widgets.inspector import difference_image
    from napari_anopilad.widgets.model import analyses_for

    viewer, slide_layer, analysis_widget, threshold_widget, inspector_widget = plugin_viewer
    box = visible_box_level0(viewer, slide_layer.level_shapes[0][:2])

    # 1. Analyse the region in view and wait for the heatmap.
    analysis_widget.start_analysis(whole_slide=False)
    qtbot.waitUntil(lambda: analysis_widget.prepared is not None, timeout=60_000)
    grid = analysis_widget.prepared.grid
    expected = cells_in_box(box, grid.patch_size_level0, grid.shape, grid.tissue_cells())
    assert 1 <= len(expected) <= 6
    qtbot.waitUntil(lambda: analysis_widget.worker is None, timeout=ANALYSIS_TIMEOUT_MS)

    analysis = analyses_for(viewer).current
    assert analysis is not None
    assert analysis.demo
    scored = {(int(row), int(col)) for row, col in zip(*np.nonzero(~np.isnan(analysis.z_grid)))}
    assert scored == {(int(row), int(col)) for row, col in expected}
    assert "DEMO" in analysis_widget.status_label.text() or analysis_widget.demo_label.isVisible()

    # 2. The heatmap contains the eroded z-scores of the stored scores (independent arithmetic).
    stored: StoredPatches = analysis.store.load()
    assert len(stored) == len(expected)
    lpips = stored.lpips
    if analysis.z_source == "calibration":
        calibration = analysis_widget.prepared.calibration
        mean, std = calibration
    else:
        mean, std = float(np.mean(lpips)), float(np.std(lpips))
    z_grid = np.full(grid.shape, np.nan)
    z_grid[stored.rows, stored.cols] = (lpips - mean) / std if std > 0 else 0.0
    np.testing.assert_allclose(analysis.z_grid, z_grid, rtol=1e-5, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(
        analysis.heatmap_layer.data, reference_eroded(z_grid), rtol=1e-5, atol=1e-5, equal_nan=True
    )

    # 3. A finished cell's heatmap pixel covers exactly its level-0 box.
    row, col = (int(value) for value in expected[0])
    x_level0, y_level0, width_level0, height_level0 = grid.box_level0(row, col)
    np.testing.assert_allclose(
        analysis.heatmap_layer.data_to_world((row - 0.5, col - 0.5)),
        slide_layer.data_to_world((y_level0 - 0.5, x_level0 - 0.5)),
    )
    np.testing.assert_allclose(
        analysis.heatmap_layer.data_to_world((row + 0.5, col + 0.5)),
        slide_layer.data_to_world((y_level0 + height_level0 - 0.5, x_level0 + width_level0 - 0.5)),
    )

    # 4. The threshold moves the anomaly labels live.
    eroded_values = np.sort(analysis.eroded[~np.isnan(analysis.eroded)])
    threshold = (
        float(eroded_values[0] + eroded_values[-1]) / 2 if eroded_values[-1] > eroded_values[0] else -1.0
    )
    threshold_widget.set_threshold(threshold)
    assert analysis.threshold == pytest.approx(round(threshold, 2))
    expected_mask = analysis.eroded > analysis.threshold
    k = analysis.label_scale
    labels_per_cell = analysis.anomalies_layer.data[k // 2 :: k, k // 2 :: k]
    np.testing.assert_array_equal(labels_per_cell > 0, expected_mask)
    _, expected_count = ndimage.label(expected_mask)
    assert threshold_widget.regions_label.text().startswith(f"{expected_count} ")
    assert threshold_widget.z_max_label.text() == f"{eroded_values[-1]:.2f}"
    assert "mm²" in threshold_widget.area_label.text()

    analysis.set_threshold(float(eroded_values[-1]))
    assert not np.any(analysis.anomalies_layer.data)
    assert threshold_widget.regions_label.text() == "0 (0 patches)"
    threshold_widget.set_threshold(threshold)

    # 5. Exports: GeoJSON regions and the TIFF heatmap.
    geojson_path = threshold_widget.export_regions(tmp_path / "regions.geojson")
    assert geojson_path is not None
    features = json.loads(geojson_path.read_text())["features"]
    assert len(features) == expected_count
    tiff_path = threshold_widget.export_heatmap(tmp_path / "heatmap.tif")
    assert tiff_path is not None
    np.testing.assert_array_equal(tifffile.imread(tiff_path), analysis.eroded)

    # 6. The inspector: list of top patches, then a click on a patch computes its reconstruction.
    assert inspector_widget.top_list.count() == len(expected)
    assert inspector_widget.demo_label.isVisible()
    click_and_wait_for_reconstruction(qtbot, viewer, inspector_widget, analysis, (row, col))
    original = inspector_widget.current_images["original"]
    reconstruction = inspector_widget.current_images["reconstruction"]
    assert original.shape == reconstruction.shape == (256, 256, 3)
    np.testing.assert_array_equal(
        inspector_widget.current_images["difference"], difference_image(original, reconstruction)
    )
    record = analysis.patch_record(row, col)
    assert inspector_widget.keyword_table.rowCount() == len(record["keywords"]) == 5
    assert inspector_widget.prompt_label.text() == record["prompt"]
    assert inspector_widget.lpips_label.text() == f"{record['lpips']:.4f}"
    assert analysis.store.read_reconstruction(row, col) is not None

    # Arrow keys step through the list of top patches.
    inspector_widget.top_list.setCurrentRow(0)
    first = inspector_widget.current_cell
    inspector_widget.step(1)
    if len(expected) > 1:
        assert inspector_widget.current_cell != first

    # Another score reuses the stored patches: the inspector's z-scores follow it.
    analysis_widget.score_choice.setCurrentText("mse_latent")
    earlier_results = analysis.results
    analysis_widget.show_stored_results()
    qtbot.waitUntil(lambda: analysis.results is not earlier_results, timeout=60_000)
    qtbot.waitUntil(lambda: analysis_widget.worker is None, timeout=60_000)
    shown_record = analysis.patch_record(*inspector_widget.current_cell)
    assert analysis.results.score_name == "mse_latent"
    assert inspector_widget.z_label.text() == f"{shown_record['z']:+.2f} ({shown_record['z_eroded']:+.2f})"
    analysis_widget.score_choice.setCurrentText("lpips")
    earlier_results = analysis.results
    analysis_widget.show_stored_results()
    qtbot.waitUntil(lambda: analysis.results is not earlier_results, timeout=60_000)
    qtbot.waitUntil(lambda: analysis_widget.worker is None, timeout=60_000)

    # 7. Other settings show in the same layers: empty for a new result store, kept threshold, then the
    # first settings' scores again.
    heatmap_layer, anomalies_layer = analysis.heatmap_layer, analysis.anomalies_layer
    layer_count = len(viewer.layers)
    inspected_cell = inspector_widget.current_cell
    assert inspected_cell is not None
    first_start = analysis_widget.start_timestep.value()
    analysis_widget.start_timestep.setValue(first_start - 100)
    analysis_widget.show_stored_results()
    qtbot.waitUntil(lambda: analyses_for(viewer).current is not analysis, timeout=60_000)
    qtbot.waitUntil(lambda: analysis_widget.worker is None, timeout=60_000)
    other = analyses_for(viewer).current
    assert other.heatmap_layer is heatmap_layer
    assert other.anomalies_layer is anomalies_layer
    assert len(viewer.layers) == layer_count
    assert np.all(np.isnan(heatmap_layer.data))
    assert not np.any(anomalies_layer.data)
    assert other.threshold == analysis.threshold
    assert inspector_widget.top_list.count() == 0
    # The inspector shows the same patch, unscored under these settings, with no earlier number left.
    assert inspector_widget.current_cell == inspected_cell
    assert inspector_widget.title_label.text().endswith("not analysed yet")
    assert inspector_widget.lpips_label.text() == "-"
    assert inspector_widget.z_label.text() == "-"
    assert "reconstruction" not in inspector_widget.current_images

    analysis_widget.start_timestep.setValue(first_start)
    analysis_widget.show_stored_results()
    qtbot.waitUntil(lambda: analyses_for(viewer).current is not other, timeout=60_000)
    qtbot.waitUntil(lambda: analysis_widget.worker is None, timeout=60_000)
    again = analyses_for(viewer).current
    assert again.heatmap_layer is heatmap_layer
    assert inspector_widget.top_list.count() == len(expected)
    assert inspector_widget.current_cell == inspected_cell
    assert inspector_widget.lpips_label.text() == f"{again.patch_record(*inspected_cell)['lpips']:.4f}"
    # The inspected patch was scored again alone for its reconstruction, which moves its score by float
    # rounding only (a batch of one instead of four).
    np.testing.assert_allclose(
        heatmap_layer.data, reference_eroded(z_grid), rtol=1e-4, atol=1e-3, equal_nan=True
    )
    analysis = again

    # 8. Reopening the slide shows the stored results at once, without running the model.
    viewer.layers.clear()
    reopened = viewer.open(str(slide_layer.metadata["anopilad"]["path"]), plugin="napari-anopilad")[0]
    qtbot.waitUntil(lambda: f"{reopened.name} z-score" in viewer.layers, timeout=60_000)
    qtbot.waitUntil(lambda: analysis_widget.worker is None, timeout=60_000)
    reloaded = analyses_for(viewer).current
    assert reloaded is not None and reloaded is not analysis
    # The inspected patch was scored again alone for its reconstruction, which moves its score by float
    # rounding only (a batch of one instead of four).
    np.testing.assert_allclose(reloaded.z_grid, analysis.z_grid, rtol=1e-4, atol=1e-3, equal_nan=True)


def click_and_wait_for_reconstruction(qtbot, viewer, inspector_widget, analysis, cell) -> None:
    """Click the centre of a patch through napari's mouse callbacks and wait for its reconstruction.

    The click goes through napari's own event dispatch with a world position, as the canvas sends it.
    A synthetic Qt click on the canvas is not used because vispy's picking divides by zero under Xvfb.
    """
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    row, col = cell
    size = analysis.patch_size_level0
    world_position = ((row + 0.5) * size - 0.5, (col + 0.5) * size - 0.5)
    press = read_only_mouse_event(type="mouse_press", button=1, position=world_position)
    release = read_only_mouse_event(type="mouse_release", button=1, position=world_position)
    mouse_press_callbacks(viewer, press)
    mouse_release_callbacks(viewer, release)

    qtbot.waitUntil(lambda: inspector_widget.current_cell == (row, col), timeout=10_000)
    qtbot.waitUntil(lambda: "reconstruction" in inspector_widget.current_images, timeout=ANALYSIS_TIMEOUT_MS)
