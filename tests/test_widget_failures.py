"""The analysis dock on a real viewer when things go wrong or come early: a slide without microns per
pixel, an error raised once, and Analyse pressed while the stored results are still being read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def dock(make_napari_viewer, tmp_path: Path, monkeypatch):
    """A visible viewer with the analysis dock on the CPU, batch size 1, and an empty result store."""
    from napari_anopilad.widgets.analysis import AnalysisWidget

    monkeypatch.setenv("NAPARI_ANOPILAD_STORE", str(tmp_path / "store"))
    viewer = make_napari_viewer(show=True)
    widget = AnalysisWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Anomaly analysis")
    widget.device_choice.setCurrentText("cpu")
    widget.batch_size.setValue(1)
    return viewer, widget


def test_slide_without_mpp_needs_dock_value(
    dock, qtbot, tcga_slide_path: Path, demo_bundle_dir: Path, monkeypatch
) -> None:
    from napari.utils.notifications import notification_manager

    from napari_anopilad.widgets.analysis import MPP_LABEL

    viewer, widget = dock
    uncaught: list[BaseException] = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, trace: uncaught.append(error))
    viewer.open(str(tcga_slide_path), plugin="napari-anopilad")
    notified = len(notification_manager.records)

    # Choosing the bundle reads the stored results, which needs the grid and so the resolution. The
    # status line names what to set, and nothing has failed yet.
    widget.set_bundle_folder(demo_bundle_dir)
    qtbot.waitUntil(lambda: "has no microns per pixel" in widget.status_label.text(), timeout=120_000)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)

    assert widget.status_label.text() == (
        f"TCGA-CR-7395-01A-01-TS1 has no microns per pixel in its metadata: set '{MPP_LABEL}' to analyse it."
    )
    assert not widget.failed
    assert len(notification_manager.records) == notified

    # Analysing without the resolution fails once, with the fix in the message.
    widget.start_analysis(whole_slide=False)
    qtbot.waitUntil(lambda: widget.failed, timeout=120_000)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    qtbot.wait(200)

    status = widget.status_label.text()
    assert status.startswith("Failed: TCGA-CR-7395-01A-01-TS1.svs")
    assert f"set '{MPP_LABEL}' in the Anomaly analysis dock" in status
    assert len(notification_manager.records) == notified + 1
    assert uncaught == []
    assert widget.analysis is None

    # With the resolution given in the dock, the grid is built at 0.5 microns per pixel.
    widget.mpp.setValue(0.5)
    widget.show_stored_results()
    qtbot.waitUntil(lambda: widget.prepared is not None, timeout=120_000)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)

    assert not widget.failed
    assert widget.prepared.slide.mpp == 0.5
    assert widget.prepared.grid.patch_size_level0 == 256
    assert widget.analysis is not None
    assert widget.analysis.mpp == 0.5
    assert uncaught == []


def test_analyse_waits_for_stored_results(dock, qtbot, cmu_slide_path: Path, demo_bundle_dir: Path) -> None:
    viewer, widget = dock
    viewer.open(str(cmu_slide_path), plugin="napari-anopilad")
    widget.set_bundle_folder(demo_bundle_dir)
    qtbot.waitUntil(lambda: widget.loaded_bundle is not None, timeout=120_000)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)

    # Pressing Analyse right after a read of the stored results has started.
    widget.show_stored_results()
    assert widget.request.load_only
    widget.start_analysis(whole_slide=True)

    assert widget.status_label.text() == "Reading the stored results; the analysis starts next..."
    qtbot.waitUntil(lambda: widget.worker is not None and not widget.request.load_only, timeout=120_000)
    assert widget.request.whole_slide
    assert not widget.stop_button.isHidden()
    widget.stop()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=240_000)
    assert widget.status_label.text().startswith("Stopped: ")
