"""Take the screenshots of docs/plugin.md from a real napari window on the CMU sample slide.

Run it on a display, or under a virtual one:

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshots.py

It builds a demo bundle (tiny random models, so the heatmap shows the plugin working, not a
diagnosis), analyses the whole sample slide on the CPU (a few minutes on two cores), and writes
docs/images/plugin-heatmap.png, plugin-threshold.png and plugin-inspector.png. It then builds a MemAE
comparison bundle with small random networks, analyses the slide with it in a second window (seconds)
and writes docs/images/plugin-comparison.png. ``--pictures anopilad`` or ``--pictures comparison``
makes only one of the two sets.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGES_DIR = Path(__file__).resolve().parent / "images"
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


def save_small_window(viewer, path: Path, app) -> None:
    """Save the window as a PNG of at most 256 colours, which keeps a mostly flat screenshot small."""
    from PIL import Image

    save_window(viewer, path, app)
    with Image.open(path) as image:
        quantized = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    quantized.save(path, optimize=True)
    print(f"reduced {path} to 256 colours, {path.stat().st_size / 1024:.0f} KiB")


def make_memae_demo_bundle(folder: Path) -> Path:
    """Write a MemAE bundle with small random networks, marked as a demo, and no calibration."""
    import torch

    from napari_anopilad.method.baselines.autoencoders import (
        AutoencoderConfig,
        build_network,
        default_settings,
    )
    from napari_anopilad.method.baselines.base import save_baseline_bundle

    config = AutoencoderConfig(channels=(4, 8), latent_channels=8, memory_items=6)
    torch.manual_seed(0)
    network = build_network("memae", config)
    return save_baseline_bundle(
        folder,
        "memae",
        config.to_dict(),
        {"model": network.state_dict()},
        default_settings("memae"),
        name="MemAE demo bundle (random weights)",
        demo=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--slide", type=Path, default=None, help="slide file (default: the packaged CMU sample)"
    )
    parser.add_argument("--threshold", type=float, default=1.0, help="z threshold of the contours screenshot")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the analysis")
    parser.add_argument(
        "--pictures",
        choices=("all", "anopilad", "comparison"),
        default="all",
        help="which screenshots to make: the AnoPILaD ones, the comparison bundle's, or all (default all)",
    )
    args = parser.parse_args()

    work_dir = Path(tempfile.mkdtemp(prefix="anopilad-screenshots-"))
    os.environ["NAPARI_ANOPILAD_STORE"] = str(work_dir / "store")

    from napari_anopilad._sample_data import sample_slide_path

    slide_path = (args.slide or sample_slide_path()).resolve()
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    if args.pictures in ("all", "anopilad"):
        make_anopilad_pictures(slide_path, work_dir, args.threshold, args.timeout)
    if args.pictures in ("all", "comparison"):
        make_comparison_picture(slide_path, work_dir, args.timeout)


def make_anopilad_pictures(slide_path: Path, work_dir: Path, threshold: float, timeout_s: float) -> None:
    """Analyse the whole slide with an AnoPILaD demo bundle and save the heatmap, threshold and inspector views."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_anopilad.method.demo import make_demo_bundle
    from napari_anopilad.widgets.analysis import AnalysisWidget
    from napari_anopilad.widgets.inspector import InspectorWidget
    from napari_anopilad.widgets.model import analyses_for
    from napari_anopilad.widgets.threshold import ThresholdWidget

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
    wait_until(lambda: analysis_widget.worker is None, timeout_s, app)
    analysis = analyses_for(viewer).current
    assert analysis is not None, "the analysis produced no results"

    analysis.anomalies_layer.visible = False
    save_window(viewer, IMAGES_DIR / "plugin-heatmap.png", app)

    analysis.anomalies_layer.visible = True
    threshold_widget.set_threshold(threshold)
    save_window(viewer, IMAGES_DIR / "plugin-threshold.png", app)

    top_row, top_col = analysis.top_cells(1)[0]
    inspector_widget.top_list.setCurrentRow(0)
    wait_until(lambda: "reconstruction" in inspector_widget.current_images, timeout_s, app)
    size = analysis.patch_size_level0
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = ((top_row + 0.5) * size, (top_col + 0.5) * size)
    camera.zoom = camera.zoom * 2
    save_window(viewer, IMAGES_DIR / "plugin-inspector.png", app)

    viewer.close()


def make_comparison_picture(slide_path: Path, work_dir: Path, timeout_s: float) -> None:
    """Analyse the whole slide with a MemAE demo bundle and save the heatmap beside the dock's MemAE form."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_anopilad.widgets.analysis import AnalysisWidget
    from napari_anopilad.widgets.model import analyses_for

    # The dock shows the bundle folder relative to the working folder, not the temporary folder's name.
    os.chdir(work_dir)
    bundle_dir = make_memae_demo_bundle(Path("memae-demo-bundle"))

    viewer = napari.Viewer(show=True, title="napari-anopilad")
    app = QApplication.instance()
    viewer.window._qt_window.resize(*WINDOW_SIZE)
    viewer.open(str(slide_path), plugin="napari-anopilad")
    analysis_widget = AnalysisWidget(viewer)
    viewer.window.add_dock_widget(analysis_widget, name="Anomaly analysis", area="right")
    viewer.window._qt_viewer.dockLayerList.setVisible(False)
    viewer.window._qt_viewer.dockLayerControls.setVisible(False)

    analysis_widget.device_choice.setCurrentText("cpu")
    analysis_widget.batch_size.setValue(8)
    analysis_widget.set_bundle_folder(bundle_dir)
    wait_until(lambda: analysis_widget.loaded_bundle is not None and analysis_widget.worker is None, 300, app)
    assert analysis_widget.form_method == "memae", f"the dock shows the {analysis_widget.form_method} form"

    viewer.reset_view()
    analysis_widget.start_analysis(whole_slide=True)
    wait_until(lambda: analysis_widget.worker is None, timeout_s, app)
    analysis = analyses_for(viewer).current
    assert analysis is not None and analysis.method == "memae", "the MemAE analysis produced no results"

    analysis.anomalies_layer.visible = False
    save_small_window(viewer, IMAGES_DIR / "plugin-comparison.png", app)
    viewer.close()


if __name__ == "__main__":
    main()
