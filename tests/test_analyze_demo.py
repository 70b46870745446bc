"""Tests of ``anopilad demo``: the packaged sample slide, the cached demo bundle, the napari layers."""

from __future__ import annotations

import json
import shutil
from importlib.resources import as_file, files
from pathlib import Path

import numpy as np
import pytest

from napari_anopilad.cli import main
from napari_anopilad.commands.analyze import AnalysisOutputs
from napari_anopilad.commands.demo import add_result_layers, display_unavailable_reason
from napari_anopilad.io.heatmap_tiff import read_heatmap_tiff

# Rows 8-9 of col 5 of the sample slide: two tissue cells, so the run stays short.
REGION = ["1300", "2100", "200", "400"]
OUTPUT_FILES = ("patches.csv", "slide.json", "heatmap.tif", "overlay.png", "regions.geojson")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, demo_bundle_dir: Path) -> tuple[Path, str]:
    """``anopilad demo --no-viewer`` with the session's demo bundle copied to where the demo caches its own."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "out"
    shutil.copytree(demo_bundle_dir, out / "demo-bundle")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["demo", "--out", str(out), "--no-viewer", "--region", *REGION, "--device", "cpu"])
    assert status == 0
    return out, printed.getvalue()


def test_demo_reuses_cached_bundle(demo_run: tuple[Path, str]) -> None:
    _, printed = demo_run
    assert "Using the demo bundle in" in printed
    assert "Making a demo bundle" not in printed


def test_demo_writes_labelled_outputs(demo_run: tuple[Path, str]) -> None:
    out, printed = demo_run
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
    summary = json.loads((out / "slide.json").read_text())
    assert summary["demo"] is True
    assert summary["n_patches"] == 2
    assert "DEMO output" in printed
    assert "scores, heatmap and regions mean nothing" in printed
    assert "All of these files are DEMO output" in printed
    assert "To view the result" in printed
    assert str(out / "overlay.png") in printed


def test_demo_rejects_foreign_bundle(tmp_path: Path, demo_bundle_dir: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(demo_bundle_dir, out / "demo-bundle")
    spec_path = out / "demo-bundle" / "bundle.json"
    spec = json.loads(spec_path.read_text())
    spec["demo"] = False
    spec_path.write_text(json.dumps(spec))
    assert main(["demo", "--out", str(out), "--no-viewer", "--device", "cpu"]) == 2


def test_display_reason_without_display(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    reason = display_unavailable_reason()
    assert reason is not None
    assert "no display" in reason


@pytest.mark.gui
def test_demo_layers_align_with_slide(demo_run: tuple[Path, str], make_napari_viewer) -> None:
    out, _ = demo_run
    outputs = AnalysisOutputs(
        out=out,
        n_patches=2,
        n_reused=0,
        n_computed=2,
        z_max=None,
        z_99=None,
        z_source="calibration",
        demo=True,
        files={name: out / name for name in OUTPUT_FILES},
    )
    heatmap = read_heatmap_tiff(out / "heatmap.tif")
    viewer = make_napari_viewer()
    with as_file(files("napari_anopilad") / "data" / "CMU-1-Small-Region.svs") as slide_path:
        layers = add_result_layers(viewer, slide_path, outputs, heatmap)

    slide_layer, heatmap_layer = layers[0], layers[1]
    assert heatmap_layer.name.startswith("DEMO")
    np.testing.assert_array_equal(heatmap_layer.data, heatmap.grid)
    # Cell (8, 5) covers level-0 pixels [2048, 2304) x [1280, 1536). The slide layer puts level-0
    # pixel j's centre at world j, so the cell's centre is at (2048 + 127.5, 1280 + 127.5).
    np.testing.assert_allclose(heatmap_layer.data_to_world((8, 5)), (2175.5, 1407.5))
    np.testing.assert_allclose(slide_layer.data_to_world((2175.5, 1407.5)), (2175.5, 1407.5))
    # The layers' extents run from the first to the last pixel centre, so their outer edges are half
    # a pixel further out. Both edges are at world -0.5, the top-left corner of level-0 pixel (0, 0).
    heatmap_edge = heatmap_layer.extent.world[0] - np.asarray(heatmap_layer.scale) / 2
    slide_edge = slide_layer.extent.world[0] - np.asarray(slide_layer.scale) / 2
    np.testing.assert_allclose(heatmap_edge, (-0.5, -0.5))
    np.testing.assert_allclose(slide_edge, (-0.5, -0.5))
