"""The analysis dock with comparison bundles: tiny random-weight bundles on a real viewer and the CMU slide.

With MemAE, the dock disables the AnoPILaD-only controls and triage, lists MemAE's scores, analyses the
region in view and shows the reconstruction in the inspector. Switching to the AnoPILaD demo bundle
restores the form, and folders that are not bundles give a message in the dock instead of an exception.
A run's end that waits in Qt's queue behind its batches still leaves the final status line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_anopilad.method.baselines.autoencoders import AutoencoderConfig, build_network, default_settings
from napari_anopilad.method.baselines.base import BaselineSettings, save_baseline_bundle
from napari_anopilad.method.baselines.vae_density import ConvVAE, VaeConfig
from napari_anopilad.widgets.layers import cells_in_box, viewer_camera, visible_box_level0

# The 2x2 erosion written as a plain loop, and a canvas click through napari's own mouse dispatch.
from test_widget_analysis import click_and_wait_for_reconstruction, reference_eroded

pytestmark = pytest.mark.gui

# Centre of the view: the corner shared by tissue cells (4, 4), (4, 5), (5, 4) and (5, 5) of the CMU grid.
VIEW_CENTRE_LEVEL0 = (5 * 256.0, 5 * 256.0)
TIMEOUT_MS = 120_000
UNUSED_TIP = "The MemAE method does not use this setting"


def make_memae_bundle(folder: Path) -> Path:
    """Write a MemAE bundle with small random networks and no calibration."""
    config = AutoencoderConfig(channels=(4, 8), latent_channels=8, memory_items=6)
    torch.manual_seed(0)
    network = build_network("memae", config)
    return save_baseline_bundle(
        folder, "memae", config.to_dict(), {"model": network.state_dict()}, default_settings("memae")
    )


def make_vae_density_bundle(folder: Path) -> Path:
    """Write a VAE density bundle with two tiny random VAEs and few importance samples and Regret steps."""
    config = VaeConfig(latent_dim=8, channels=(4, 8, 8, 8))
    torch.manual_seed(0)
    model, background = ConvVAE(config), ConvVAE(config)
    options = {"importance_samples": 2, "regret_steps": 2, "regret_learning_rate": 0.05, "compressor": "png"}
    return save_baseline_bundle(
        folder,
        "vae-density",
        config.to_dict(),
        {"model": model.state_dict(), "background": background.state_dict()},
        BaselineSettings(method="vae-density", score="nll", options=options),
    )


@pytest.fixture
def dock_viewer(make_napari_viewer, qtbot, cmu_slide_path: Path, tmp_path: Path, monkeypatch):
    """A visible viewer with the CMU slide, the analysis dock and the inspector, zoomed in on cell (5, 5)."""
    from napari_anopilad.widgets.analysis import AnalysisWidget
    from napari_anopilad.widgets.inspector import InspectorWidget

    monkeypatch.setenv("NAPARI_ANOPILAD_STORE", str(tmp_path / "store"))
    viewer = make_napari_viewer(show=True)
    slide_layer = viewer.open(str(cmu_slide_path), plugin="napari-anopilad")[0]
    analysis_widget = AnalysisWidget(viewer)
    inspector_widget = InspectorWidget(viewer)
    viewer.window.add_dock_widget(analysis_widget, name="Anomaly analysis")
    viewer.window.add_dock_widget(inspector_widget, name="Patch inspector", area="left")
    analysis_widget.device_choice.setCurrentText("cpu")
    analysis_widget.batch_size.setValue(4)

    canvas_height, canvas_width = viewer.window._qt_viewer.canvas.size
    camera = viewer_camera(viewer)
    camera.center = VIEW_CENTRE_LEVEL0
    camera.zoom = max(canvas_height, canvas_width) / (1.5 * 256)
    qtbot.wait(50)
    return viewer, slide_layer, analysis_widget, inspector_widget


def load_bundle_in_dock(qtbot, widget, folder: Path) -> None:
    """Choose ``folder`` in the dock and wait until it is loaded and its stored results are shown."""
    widget.set_bundle_folder(folder)
    qtbot.waitUntil(
        lambda: (
            widget.loaded_bundle is not None
            and Path(widget.loaded_bundle.folder).resolve() == folder.resolve()
        ),
        timeout=TIMEOUT_MS,
    )
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)


def test_memae_bundle_in_dock(dock_viewer, qtbot, tmp_path: Path, demo_bundle_dir: Path) -> None:
    from napari_anopilad.method.heatmap import within_slide_stats
    from napari_anopilad.widgets.model import analyses_for

    viewer, slide_layer, widget, inspector = dock_viewer
    anopilad_tips = {name: control.toolTip() for name, control in widget.setting_controls().items()}
    memae_folder = make_memae_bundle(tmp_path / "memae-bundle")

    # 1. The form for MemAE: AnoPILaD-only controls and triage disabled, MemAE's scores listed.
    load_bundle_in_dock(qtbot, widget, memae_folder)
    assert widget.form_method == "memae"
    assert "scored by MemAE" in widget.status_label.text()
    for name, control in widget.setting_controls().items():
        assert not control.isEnabled(), name
        assert control.toolTip() == UNUSED_TIP, name
    scores = [widget.score_choice.itemText(index) for index in range(widget.score_choice.count())]
    assert scores == ["mse", "l1"]
    assert widget.score_choice.currentText() == "mse"
    assert not widget.triage_check.isEnabled()
    assert not widget.triage_check.isChecked()
    assert "AnoPILaD bundle" in widget.triage_check.toolTip()
    assert widget.settings_overrides() == {"score": "mse"}

    # 2. Analyse the region in view with the second score, l1.
    widget.score_choice.setCurrentText("l1")
    box = visible_box_level0(viewer, slide_layer.level_shapes[0][:2])
    widget.start_analysis(whole_slide=False)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    prepared = widget.prepared
    assert prepared.settings.method == "memae"
    assert prepared.settings.score == "l1"
    grid = prepared.grid
    expected = cells_in_box(box, grid.patch_size_level0, grid.shape, grid.tissue_cells())
    assert 1 <= len(expected) <= 12

    analysis = analyses_for(viewer).current
    assert analysis is not None
    assert analysis.method == "memae"
    assert analysis.heatmap_layer.metadata["anopilad"]["method"] == "memae"
    assert analysis.heatmap_layer.metadata["anopilad"]["method_label"] == "MemAE"
    assert analysis.anomalies_layer.metadata["anopilad"]["method"] == "memae"
    assert "MemAE" in widget.status_label.text()
    assert "AnoPILaD" not in widget.status_label.text()
    assert widget.coverage_text().startswith(f"MemAE covers {len(expected)} / ")

    # 3. The heatmap contains the eroded within-slide z-scores of the stored l1 scores.
    stored = analysis.store.load()
    assert len(stored) == len(expected)
    assert sorted(stored.score_names) == ["l1", "mse"]
    assert stored.keywords.shape == (len(expected), 0)
    l1 = stored.scores("l1")
    assert np.all(np.isfinite(l1))
    assert analysis.z_source == "within-slide"
    mean, std = within_slide_stats(l1)
    assert std > 0
    z_grid = np.full(grid.shape, np.nan)
    z_grid[stored.rows, stored.cols] = (l1 - mean) / std
    scored = ~np.isnan(analysis.z_grid)
    assert {(int(r), int(c)) for r, c in zip(*np.nonzero(scored))} == {(int(r), int(c)) for r, c in expected}
    assert np.all(np.isfinite(analysis.heatmap_layer.data[scored]))
    np.testing.assert_allclose(analysis.z_grid, z_grid, rtol=1e-5, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(
        analysis.heatmap_layer.data, reference_eroded(z_grid), rtol=1e-5, atol=1e-5, equal_nan=True
    )

    # 4. The inspector computes the reconstruction, and its prompt row shows that MemAE has no prompt.
    row, col = (int(value) for value in expected[0])
    before = analysis.patch_record(row, col)
    click_and_wait_for_reconstruction(qtbot, viewer, inspector, analysis, (row, col))
    assert inspector.current_images["reconstruction"].shape == (256, 256, 3)
    assert inspector.prompt_label.text() == "no prompt: MemAE"
    assert inspector.keyword_table.rowCount() == 0
    assert inspector.lpips_label.text() == "-"
    assert f"l1 {before['scores']['l1']:.4g}" in inspector.other_scores_label.text()
    assert analysis.store.read_reconstruction(row, col) is not None
    rescored = analysis.store.load()
    index = int(np.flatnonzero((rescored.rows == row) & (rescored.cols == col))[0])
    assert rescored.scores("l1")[index] == pytest.approx(before["scores"]["l1"], rel=1e-4)
    assert rescored.has_reconstruction[index]

    # 5. Back to an AnoPILaD bundle: the controls, their tooltips, the scores and triage return.
    load_bundle_in_dock(qtbot, widget, demo_bundle_dir)
    assert widget.form_method == "anopilad"
    for name, control in widget.setting_controls().items():
        assert control.isEnabled(), name
        assert control.toolTip() == anopilad_tips[name], name
    scores = [widget.score_choice.itemText(index) for index in range(widget.score_choice.count())]
    assert scores == ["lpips", "mse_latent"]
    assert widget.triage_check.isEnabled()
    assert set(widget.settings_overrides()) == {"start_timestep", "sampler", "guidance_scale", "score"}
    current = analyses_for(viewer).current
    assert current is not None and current.method == "anopilad"
    assert current.heatmap_layer.metadata["anopilad"]["method_label"] == "AnoPILaD"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (None, "bundle.json not found"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must contain a JSON object"),
        (json.dumps({"method": "not-a-method"}), "method 'not-a-method' is unknown"),
        (json.dumps({"method": "memae", "format_version": 1}), "needs a 'model' object"),
    ],
)
def test_bad_bundle_folder_message(
    dock_viewer, qtbot, tmp_path: Path, spec: str | None, message: str
) -> None:
    _, _, widget, _ = dock_viewer
    folder = tmp_path / "not-a-bundle"
    folder.mkdir()
    if spec is not None:
        (folder / "bundle.json").write_text(spec)

    # An exception raised in a Qt slot would fail the test through pytest-qt's exception capture.
    widget.set_bundle_folder(folder)
    qtbot.waitUntil(lambda: "Could not load the bundle" in widget.status_label.text(), timeout=TIMEOUT_MS)
    assert message in widget.status_label.text()
    assert widget.loaded_bundle is None
    assert widget.worker is None
    assert widget.form_method == "anopilad"
    assert all(control.isEnabled() for control in widget.setting_controls().values())


def test_worker_rejects_triage_for_memae(cmu_slide_path: Path, tmp_path: Path) -> None:
    from napari_anopilad.widgets.analysis import AnalysisControl, AnalysisRequest, ModelCache, analysis_worker

    request = AnalysisRequest(
        slide_path=str(cmu_slide_path),
        bundle_folder=make_memae_bundle(tmp_path / "memae-bundle"),
        device="cpu",
        overrides={},
        batch_size=4,
        whole_slide=False,
        save_reconstructions=False,
        visible_box_level0=None,
        store_root=tmp_path / "store",
        triage=True,
    )
    with pytest.raises(ValueError, match=r"Triage first needs an AnoPILaD bundle .* is a MemAE bundle"):
        next(analysis_worker(request, AnalysisControl(), ModelCache()))


def test_status_after_queued_run_end(dock_viewer, qtbot, tmp_path: Path) -> None:
    """The run's end is handled after its last batch even when both wait in Qt's queue together.

    napari's progress bar processes pending Qt events when it is created or updated, so the end of the
    run can be handled inside the handler of an earlier message. Blocking the GUI thread until the
    worker thread is done queues every message and the end together, the worst case.
    """
    from qtpy.QtCore import QThreadPool

    viewer, slide_layer, widget, _ = dock_viewer
    load_bundle_in_dock(qtbot, widget, make_vae_density_bundle(tmp_path / "vae-density-bundle"))

    box = visible_box_level0(viewer, slide_layer.level_shapes[0][:2])
    widget.start_analysis(whole_slide=False)
    assert QThreadPool.globalInstance().waitForDone(TIMEOUT_MS)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    qtbot.wait(100)

    grid = widget.prepared.grid
    expected = cells_in_box(box, grid.patch_size_level0, grid.shape, grid.tissue_cells())
    assert len(widget.accumulator) == len(expected)
    assert widget.status_label.text().startswith(f"Finished: {len(expected)} patches")
    assert widget.progress_bar is None
    assert widget.visible_button.isEnabled()
