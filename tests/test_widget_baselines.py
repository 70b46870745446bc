"""The analysis dock with comparison bundles: tiny random-weight bundles on a real viewer and the CMU slide.

With MemAE, the dock disables the AnoPILaD-only controls and triage, lists MemAE's scores, analyses the
region in view and shows the reconstruction in the inspector. Switching to the AnoPILaD demo bundle
restores the form, and folders that are not bundles give a message in the dock instead of an exception.
AnoDDPM keeps the start timestep and sampler, and the dock's values reach its scorer. VAE density makes
no reconstructions, so the dock and the inspector run without any.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_anopilad.method.baselines.anoddpm import check_options
from napari_anopilad.method.baselines.autoencoders import AutoencoderConfig, build_network, default_settings
from napari_anopilad.method.baselines.base import BaselineSettings, save_baseline_bundle
from napari_anopilad.method.baselines.vae_density import ConvVAE, VaeConfig
from napari_anopilad.method.perceptual import build_backbone_features
from napari_anopilad.training.anoddpm_train import scheduler_config, unet_config
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


def make_anoddpm_bundle(folder: Path) -> Path:
    """Write an AnoDDPM bundle with a tiny random UNet, a random AlexNet LPIPS backbone and few steps."""
    from diffusers import UNet2DModel

    unet = unet_config([8, 16], 1, [], 4, mid_attention=False)
    torch.manual_seed(0)
    network = UNet2DModel(**unet)
    backbone = build_backbone_features("alex")
    options = check_options(
        {"start_timestep": 150, "num_inference_steps": 10, "sampler": "ddim", "noise": "gaussian"}
    )
    model = {"unet": unet, "scheduler": scheduler_config(), "lpips": {"net": "alex"}}
    return save_baseline_bundle(
        folder,
        "anoddpm",
        model,
        {"model": network.state_dict(), "lpips": backbone.state_dict()},
        BaselineSettings(method="anoddpm", score="mse", options=options),
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


def analyse_visible_region(qtbot, viewer, slide_layer, widget) -> np.ndarray:
    """Analyse the region in view, wait for the run to finish and return the tissue cells it covers."""
    box = visible_box_level0(viewer, slide_layer.level_shapes[0][:2])
    widget.start_analysis(whole_slide=False)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    grid = widget.prepared.grid
    return cells_in_box(box, grid.patch_size_level0, grid.shape, grid.tissue_cells())


def click_patch(qtbot, viewer, inspector, analysis, cell: tuple[int, int]) -> None:
    """Click the centre of a patch through napari's mouse callbacks and wait until the inspector shows it."""
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    row, col = cell
    size = analysis.patch_size_level0
    world_position = ((row + 0.5) * size - 0.5, (col + 0.5) * size - 0.5)
    press = read_only_mouse_event(type="mouse_press", button=1, position=world_position)
    release = read_only_mouse_event(type="mouse_release", button=1, position=world_position)
    mouse_press_callbacks(viewer, press)
    mouse_release_callbacks(viewer, release)
    qtbot.waitUntil(lambda: inspector.current_cell == (row, col), timeout=10_000)


def test_anoddpm_bundle_in_dock(dock_viewer, qtbot, tmp_path: Path) -> None:
    from napari_anopilad.method.scorers import load_any_bundle, make_scorer
    from napari_anopilad.slide import read_patches
    from napari_anopilad.widgets.model import analyses_for

    viewer, slide_layer, widget, inspector = dock_viewer
    folder = make_anoddpm_bundle(tmp_path / "anoddpm-bundle")

    # 1. AnoDDPM uses the start timestep and sampler, filled in from its bundle, but not the guidance scale.
    load_bundle_in_dock(qtbot, widget, folder)
    assert widget.form_method == "anoddpm"
    assert widget.start_timestep.isEnabled()
    assert widget.sampler_choice.isEnabled()
    assert not widget.guidance_scale.isEnabled()
    assert widget.guidance_scale.toolTip() == "The AnoDDPM method does not use this setting"
    assert widget.start_timestep.value() == 150
    assert widget.sampler_choice.currentText() == "ddim"
    scores = [widget.score_choice.itemText(index) for index in range(widget.score_choice.count())]
    assert scores == ["mse", "lpips"]
    assert widget.save_reconstructions.isEnabled()
    assert not widget.triage_check.isEnabled()

    # 2. A start timestep and sampler changed in the dock reach the scorer's settings.
    widget.start_timestep.setValue(250)
    widget.sampler_choice.setCurrentText("plms")
    widget.score_choice.setCurrentText("lpips")
    assert widget.settings_overrides() == {"start_timestep": 250, "sampler": "plms", "score": "lpips"}
    expected = analyse_visible_region(qtbot, viewer, slide_layer, widget)
    assert 1 <= len(expected) <= 12
    prepared = widget.prepared
    assert prepared.settings.method == "anoddpm"
    assert prepared.settings.score == "lpips"
    assert prepared.settings.options["start_timestep"] == 250
    assert prepared.settings.options["sampler"] == "plms"
    assert prepared.settings.options["num_inference_steps"] == 10
    scorer = widget.models.scorer(folder, prepared.bundle, "cpu", prepared.settings)
    assert scorer.options["start_timestep"] == 250
    assert scorer.options["sampler"] == "plms"

    # 3. The stored scores match a direct scorer call under the same settings on the same patches.
    analysis = analyses_for(viewer).current
    assert analysis is not None and analysis.method == "anoddpm"
    stored = analysis.store.load()
    assert len(stored) == len(expected)
    cells = np.stack([stored.rows, stored.cols], axis=1)
    patches = read_patches(prepared.slide, prepared.grid, cells)
    keys = [(prepared.slide.identity, int(row), int(col)) for row, col in cells]
    bundle = load_any_bundle(folder)
    direct = make_scorer(bundle, "cpu", prepared.settings).score(patches, keys)
    for name in ("mse", "lpips"):
        np.testing.assert_allclose(stored.scores(name), direct.values(name), rtol=1e-4, atol=1e-6)
    # The bundle's own start timestep and sampler give other scores, so the comparison above can fail.
    bundle_default = make_scorer(bundle, "cpu").score(patches, keys)
    assert not np.allclose(stored.scores("mse"), bundle_default.values("mse"), rtol=1e-4, atol=1e-6)

    # 4. The inspector reconstructs under the dock's settings: the patch keeps its stored score.
    row, col = (int(value) for value in cells[0])
    click_and_wait_for_reconstruction(qtbot, viewer, inspector, analysis, (row, col))
    assert inspector.current_images["reconstruction"].shape == (256, 256, 3)
    rescored = analysis.store.load()
    index = int(np.flatnonzero((rescored.rows == row) & (rescored.cols == col))[0])
    assert rescored.scores("lpips")[index] == pytest.approx(float(stored.scores("lpips")[0]), rel=1e-4)


def test_vae_density_bundle_in_dock(dock_viewer, qtbot, tmp_path: Path) -> None:
    from napari_anopilad.method.heatmap import within_slide_stats
    from napari_anopilad.widgets.model import analyses_for

    viewer, slide_layer, widget, inspector = dock_viewer
    folder = make_vae_density_bundle(tmp_path / "vae-density-bundle")

    # 1. VAE density makes no reconstructions: "Store reconstructions" is cleared and disabled.
    widget.save_reconstructions.setChecked(True)
    load_bundle_in_dock(qtbot, widget, folder)
    assert widget.form_method == "vae-density"
    assert not widget.save_reconstructions.isEnabled()
    assert not widget.save_reconstructions.isChecked()
    assert "without reconstructing" in widget.save_reconstructions.toolTip()
    for name, control in widget.setting_controls().items():
        assert not control.isEnabled(), name
    scores = [widget.score_choice.itemText(index) for index in range(widget.score_choice.count())]
    assert scores == ["nll", "regret", "likelihood_ratio", "complexity"]
    assert widget.settings_overrides() == {"score": "nll"}

    # 2. The region in view is analysed to the end, with a score other than the default.
    widget.score_choice.setCurrentText("likelihood_ratio")
    expected = analyse_visible_region(qtbot, viewer, slide_layer, widget)
    assert 1 <= len(expected) <= 12
    assert widget.request is not None and not widget.request.save_reconstructions
    assert widget.status_label.text().startswith(f"Finished: {len(expected)} patches")
    assert "VAE density" in widget.status_label.text()
    analysis = analyses_for(viewer).current
    assert analysis is not None
    assert analysis.method == "vae-density"
    assert not analysis.can_reconstruct()

    # 3. The heatmap contains the eroded within-slide z-scores of the stored likelihood ratios.
    grid = widget.prepared.grid
    stored = analysis.store.load()
    assert len(stored) == len(expected)
    assert sorted(stored.score_names) == ["complexity", "likelihood_ratio", "nll", "regret"]
    assert not stored.has_reconstruction.any()
    ratio = stored.scores("likelihood_ratio")
    assert np.all(np.isfinite(ratio))
    mean, std = within_slide_stats(ratio)
    assert std > 0
    z_grid = np.full(grid.shape, np.nan)
    z_grid[stored.rows, stored.cols] = (ratio - mean) / std
    np.testing.assert_allclose(analysis.z_grid, z_grid, rtol=1e-5, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(
        analysis.heatmap_layer.data, reference_eroded(z_grid), rtol=1e-5, atol=1e-5, equal_nan=True
    )

    # 4. A click shows the patch and its scores, with no reconstruction and no exception in a Qt slot.
    row, col = int(stored.rows[0]), int(stored.cols[0])
    click_patch(qtbot, viewer, inspector, analysis, (row, col))
    record = analysis.patch_record(row, col)
    assert record is not None
    assert inspector.current_images["original"].shape == (256, 256, 3)
    assert "reconstruction" not in inspector.current_images
    assert "difference" not in inspector.current_images
    assert inspector.image_labels["reconstruction"].text() == "none: VAE density does not reconstruct"
    assert inspector.prompt_label.text() == "no prompt: VAE density"
    assert inspector.lpips_label.text() == "-"
    other_scores = inspector.other_scores_label.text()
    for name in ("nll", "regret", "likelihood_ratio", "complexity"):
        assert f"{name} {record['scores'][name]:.4g}" in other_scores, name
    assert inspector.z_label.text() == f"{record['z']:+.2f} ({record['z_eroded']:+.2f})"
    assert analysis.store.read_reconstruction(row, col) is None


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
