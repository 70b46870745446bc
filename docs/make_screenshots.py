"""Take the screenshots of docs/plugin.md from a real napari window on the CMU sample slide.

Run it on a display, or under a virtual one:

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshots.py

It builds a demo bundle (tiny random models, so the heatmap shows the plugin working, not a
diagnosis), analyses the whole sample slide on the CPU (a few minutes on two cores), and writes
docs/images/plugin-heatmap.png, plugin-threshold.png and plugin-inspector.png.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGES_DIR = Path(__file__).parent / "images"
WINDOW_SIZE = (1600, 1000)


def wait_until(condition, timeout_s: float, app) -> None:
    """Process Qt events until ``condition()`` is true; raise TimeoutError after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout_s:.0f} s waiting for {condition.__doc__ or condition}"
            )
        app.processEvents()
        time.sleep(0.05)


def save_window(viewer, path: Path, app) -> None:
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    from skimage.io import imsave

    image = viewer.screenshot(canvas_only=False, flash=False)
    imsave(path, np.asarray(image)[..., :3], check_contrast=False)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--slide", type=Path, default=None, help="slide file (default: the packaged CMU sample)"
    )
    parser.add_argument("--threshold", type=float, default=1.0, help="z threshold of the contours screenshot")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the analysis")
    args = parser.parse_args()

    work_dir = Path(tempfile.mkdtemp(prefix="anopilad-screenshots-"))
    os.environ["NAPARI_ANOPILAD_STORE"] = str(work_dir / "store")

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_anopilad._sample_data import sample_slide_path
    from napari_anopilad.method.demo import make_demo_bundle
    from napari_anopilad.widgets.analysis import AnalysisWidget
    from napari_anopilad.widgets.inspector import InspectorWidget
    from napari_anopilad.widgets.model import analyses_for
    from napari_anopilad.widgets.threshold import ThresholdWidget

    slide_path = args.slide or sample_slide_path()
    bundle_dir = make_demo_bundle(work_dir / "demo-bundle")

    viewer = napari.Viewer(show=True, title="napari-anopilad")
    app = QApplication.instance()
    viewer.window._qt_window.resize(*WINDOW_SIZE)
    viewer.open(str(slide_path), plugin="napari-anopilad")
    analysis_widget = AnalysisWidget(viewer)
    threshold_widget = ThresholdWidget(viewer)
    inspector_widget = InspectorWidget(viewer)
    viewer.window.add_dock_widget(analysis_widget, name="Anomaly analysis", area="right")
    viewer.window.add_dock_widget(threshold_widget, name="Anomaly threshold", area="right")
    viewer.window.add_dock_widget(inspector_widget, name="Patch inspector", area="left")
    viewer.window._qt_viewer.dockLayerList.setVisible(False)
    viewer.window._qt_viewer.dockLayerControls.setVisible(False)

    analysis_widget.device_choice.setCurrentText("cpu")
    analysis_widget.batch_size.setValue(8)
    analysis_widget.set_bundle_folder(bundle_dir)
    wait_until(lambda: analysis_widget.loaded_bundle is not None and analysis_widget.worker is None, 300, app)

    viewer.reset_view()
    analysis_widget.start_analysis(whole_slide=True)
    wait_until(lambda: analysis_widget.worker is None, args.timeout, app)
    analysis = analyses_for(viewer).current
    assert analysis is not None, "the analysis produced no results"

    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    analysis.anomalies_layer.visible = False
    save_window(viewer, IMAGES_DIR / "plugin-heatmap.png", app)

    analysis.anomalies_layer.visible = True
    threshold_widget.set_threshold(args.threshold)
    save_window(viewer, IMAGES_DIR / "plugin-threshold.png", app)

    top_row, top_col = analysis.top_cells(1)[0]
    inspector_widget.top_list.setCurrentRow(0)
    wait_until(lambda: "reconstruction" in inspector_widget.current_images, args.timeout, app)
    size = analysis.patch_size_level0
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = ((top_row + 0.5) * size, (top_col + 0.5) * size)
    camera.zoom = camera.zoom * 2
    save_window(viewer, IMAGES_DIR / "plugin-inspector.png", app)

    viewer.close()


if __name__ == "__main__":
    main()
