"""The analysis dock with "Triage first" on a real viewer: the triage layer comes first, then the diffusion
scores the patches in view and the triage budget, highest triage score first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_anopilad.widgets.layers import cells_in_box, viewer_camera, visible_box_level0

pytestmark = pytest.mark.gui

# Centre of the view: the corner shared by tissue cells (4, 4), (4, 5), (5, 4) and (5, 5) of the CMU grid.
VIEW_CENTRE_LEVEL0 = (5 * 256.0, 5 * 256.0)
ANALYSIS_TIMEOUT_MS = 300_000


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


def test_triage_first_in_dock(
    make_napari_viewer, qtbot, cmu_slide_path: Path, demo_bundle_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from napari_anopilad.engine.session import BatchResult
    from napari_anopilad.engine.triage_pass import TriageBatch, open_triage_store
    from napari_anopilad.widgets.analysis import TriageReady
    from napari_anopilad.widgets.model import analyses_for

    monkeypatch.setenv("NAPARI_ANOPILAD_STORE", str(tmp_path / "store"))
    viewer, slide_layer, widget = open_dock(make_napari_viewer, qtbot, cmu_slide_path, demo_bundle_dir)
    box = visible_box_level0(viewer, slide_layer.level_shapes[0][:2])

    # 1. The triage controls follow the checkbox.
    assert not widget.triage_budget.isEnabled()
    widget.triage_check.setChecked(True)
    assert widget.triage_budget.isEnabled()
    widget.triage_budget.setValue(0.05)
    widget.triage_neighbours.setValue(0)

    # 2. Run, and record the order of the worker's messages and whether the triage layer was there.
    triage_name = f"{slide_layer.name} triage"
    messages: list[tuple[str, bool, np.ndarray | None]] = []

    def record(message: object) -> None:
        cells = getattr(message, "cells", None)
        kind = type(message).__name__
        messages.append((kind, triage_name in viewer.layers, None if cells is None else np.asarray(cells)))

    widget.start_analysis(whole_slide=True)
    widget.worker.yielded.connect(record)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=ANALYSIS_TIMEOUT_MS)

    kinds = [kind for kind, _, _ in messages]
    assert TriageBatch.__name__ in kinds
    ready_index = kinds.index(TriageReady.__name__)
    first_batch = kinds.index(BatchResult.__name__)
    assert max(index for index, kind in enumerate(kinds) if kind == TriageBatch.__name__) < ready_index
    assert ready_index < first_batch
    # The widget's own handler runs first, so the layer exists when the TriageReady message is recorded.
    assert messages[ready_index][1] is True

    # 3. The triage layer shows the eroded triage z-scores of every tissue patch.
    prepared = widget.prepared
    grid = prepared.grid
    tissue = np.asarray(grid.tissue_cells())
    scorer = widget.models.triage_scorer(widget.request.bundle_folder, prepared.bundle, "cpu")
    stored = open_triage_store(tmp_path / "store", prepared.slide, prepared.bundle, scorer, grid).load()
    assert len(stored) == len(tissue)
    z_grid = np.full(grid.shape, np.nan)
    z_grid[stored.rows, stored.cols] = stored.knn_z
    layer = viewer.layers[triage_name]
    np.testing.assert_allclose(layer.data, reference_eroded(z_grid), rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(layer.scale, (grid.patch_size_level0, grid.patch_size_level0))
    assert viewer.layers[f"{slide_layer.name} z-score"] is not layer

    # 4. The diffusion scored the cells in view first, then the two highest triage cells (ceil(0.05 * 34) = 2).
    visible = {tuple(cell) for cell in cells_in_box(box, grid.patch_size_level0, grid.shape, tissue).tolist()}
    assert 1 <= len(visible) <= 4
    order = np.argsort(-stored.knn_z, kind="stable")
    top = {(int(stored.rows[index]), int(stored.cols[index])) for index in order[:2]}
    batches = [cells for kind, _, cells in messages if kind == BatchResult.__name__]
    diffused = [tuple(cell) for cells in batches for cell in cells.tolist()]
    assert set(diffused) == visible | top
    assert set(diffused[: len(visible)]) == visible
    analysis = analyses_for(viewer).current
    scored = {(int(row), int(col)) for row, col in zip(*np.nonzero(~np.isnan(analysis.z_grid)))}
    assert scored == visible | top

    # 5. The status line gives both coverages.
    status = widget.status_label.text()
    assert f"AnoPILaD covers {len(visible | top)} / {len(tissue)} tissue patches" in status
    assert f"triage (triage:knn_distance) {len(tissue)} / {len(tissue)}" in status


def open_triage_dock(make_napari_viewer, qtbot, slide_path: Path, bundle_dir: Path) -> tuple:
    """Open the slide in a new viewer and a new dock with "Triage first" on, viewing the CMU grid's centre."""
    viewer, slide_layer, widget = open_dock(make_napari_viewer, qtbot, slide_path, bundle_dir)
    widget.triage_check.setChecked(True)
    widget.triage_budget.setValue(0.05)
    widget.triage_neighbours.setValue(0)
    return viewer, slide_layer, widget


def open_dock(make_napari_viewer, qtbot, slide_path: Path, bundle_dir: Path) -> tuple:
    """Open the slide in a new viewer and a new dock on the CPU with the bundle loaded, viewing the CMU grid's centre."""
    from napari_anopilad.widgets.analysis import AnalysisWidget

    viewer = make_napari_viewer(show=True)
    slide_layer = viewer.open(str(slide_path), plugin="napari-anopilad")[0]
    widget = AnalysisWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Anomaly analysis")
    widget.device_choice.setCurrentText("cpu")
    widget.batch_size.setValue(4)
    widget.set_bundle_folder(bundle_dir)
    qtbot.waitUntil(lambda: widget.loaded_bundle is not None, timeout=120_000)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    canvas_height, canvas_width = viewer.window._qt_viewer.canvas.size
    camera = viewer_camera(viewer)
    camera.center = VIEW_CENTRE_LEVEL0
    camera.zoom = max(canvas_height, canvas_width) / (1.5 * 256)
    qtbot.wait(50)
    return viewer, slide_layer, widget


def run_recording_triage_layer(
    widget, viewer, triage_name: str, qtbot
) -> list[tuple[str, np.ndarray | None]]:
    """Run the whole slide and return each message's type name with a copy of the triage layer's data then."""
    messages: list[tuple[str, np.ndarray | None]] = []

    def record(message: object) -> None:
        data = np.array(viewer.layers[triage_name].data) if triage_name in viewer.layers else None
        messages.append((type(message).__name__, data))

    widget.start_analysis(whole_slide=True)
    widget.worker.yielded.connect(record)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=ANALYSIS_TIMEOUT_MS)
    return messages


def test_dock_reuses_stored_triage(
    make_napari_viewer, qtbot, cmu_slide_path: Path, demo_bundle_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from napari_anopilad.engine.session import BatchResult
    from napari_anopilad.engine.triage_pass import TriageBatch, compute_triage_results, open_triage_store
    from napari_anopilad.method.triage import TriageScorer
    from napari_anopilad.widgets.analysis import TriageReady, TriageStored

    store_root = tmp_path / "store"
    monkeypatch.setenv("NAPARI_ANOPILAD_STORE", str(store_root))
    embedded: list[int] = []
    original_score = TriageScorer.score

    def counting_score(self: TriageScorer, images_uint8: np.ndarray) -> object:
        embedded.append(len(images_uint8))
        return original_score(self, images_uint8)

    monkeypatch.setattr(TriageScorer, "score", counting_score)

    # 1. The first dock's run fills the triage store with every tissue patch.
    _, first_layer, first_widget = open_triage_dock(
        make_napari_viewer, qtbot, cmu_slide_path, demo_bundle_dir
    )
    run_recording_triage_layer(first_widget, first_widget.viewer, f"{first_layer.name} triage", qtbot)
    prepared = first_widget.prepared
    grid = prepared.grid
    tissue = np.asarray(grid.tissue_cells())
    scorer = first_widget.models.triage_scorer(first_widget.request.bundle_folder, prepared.bundle, "cpu")
    store = open_triage_store(store_root, prepared.slide, prepared.bundle, scorer, grid)
    assert len(store.load()) == len(tissue)
    assert sum(embedded) == len(tissue)
    batch_files = sorted(path.name for path in store.folder.glob("batch-*.npz"))

    # 2. A new dock on the same store shows the stored map at once and embeds no patch.
    embedded.clear()
    viewer, slide_layer, widget = open_triage_dock(make_napari_viewer, qtbot, cmu_slide_path, demo_bundle_dir)
    triage_name = f"{slide_layer.name} triage"
    assert triage_name not in viewer.layers
    messages = run_recording_triage_layer(widget, viewer, triage_name, qtbot)
    kinds = [kind for kind, _ in messages]
    assert TriageBatch.__name__ not in kinds
    assert TriageStored.__name__ not in kinds
    ready_index = kinds.index(TriageReady.__name__)
    assert BatchResult.__name__ not in kinds[:ready_index]
    assert embedded == []
    assert sorted(path.name for path in store.folder.glob("batch-*.npz")) == batch_files
    expected = compute_triage_results(store, grid, "knn_distance", cells=tissue)
    shown_at_ready = messages[ready_index][1]
    assert shown_at_ready is not None
    np.testing.assert_allclose(shown_at_ready, expected.heatmap_eroded, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(
        viewer.layers[triage_name].data, expected.heatmap_eroded, rtol=1e-6, equal_nan=True
    )
    assert f"triage (triage:knn_distance) {len(tissue)} / {len(tissue)}" in widget.status_label.text()

    # 3. With half of the tissue cells left in the store, their map shows before the pass scores the rest.
    full = store.load()
    half_stored = full.select(tissue[::2])
    for path in store.folder.glob("batch-*.npz"):
        path.unlink()
    store.write_batch(half_stored.cells(), half_stored)
    expected_partial = compute_triage_results(store, grid, "knn_distance", cells=tissue)
    assert np.isnan(expected_partial.heatmap_eroded).any()
    viewer.layers.remove(triage_name)
    embedded.clear()
    messages = run_recording_triage_layer(widget, viewer, triage_name, qtbot)
    kinds = [kind for kind, _ in messages]
    stored_index = kinds.index(TriageStored.__name__)
    assert stored_index < kinds.index(TriageBatch.__name__)
    shown_at_stored = messages[stored_index][1]
    assert shown_at_stored is not None
    np.testing.assert_allclose(shown_at_stored, expected_partial.heatmap_eroded, rtol=1e-6, equal_nan=True)
    assert sum(embedded) == len(tissue) - len(half_stored)
    assert len(store.load()) == len(tissue)
