"""What ``anopilad analyze`` reports about the settings that actually ran, on one patch of the CMU slide."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from napari_anopilad.cli import main
from napari_anopilad.engine.results import compute_slide_results
from napari_anopilad.engine.store import ResultStore
from napari_anopilad.io.heatmap_tiff import read_heatmap_tiff
from napari_anopilad.io.tables import read_patches_csv
from napari_anopilad.method.baselines.base import BaselineSettings
from napari_anopilad.method.bundle import load_bundle
from napari_anopilad.method.diffusion import grid_start_timestep
from napari_anopilad.slide import build_patch_grid, open_slide

# Level-0 box over one tissue cell of CMU-1-Small-Region: row 8, col 5 of the 256 px grid.
ONE_PATCH_REGION = ("1300", "2100", "200", "200")


def _run_analyze(*arguments: str) -> dict[str, object]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(["analyze", *arguments])
    return {"status": status, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


@pytest.fixture(scope="module")
def off_grid_run(
    tmp_path_factory: pytest.TempPathFactory, cmu_slide_path: Path, demo_bundle_dir: Path
) -> dict[str, object]:
    """One patch with --start-timestep 21 and 20 steps, which the grid rounds to timestep 1 (one step)."""
    out = tmp_path_factory.mktemp("off-grid") / "out"
    arguments = (
        str(cmu_slide_path),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(out),
        "--region",
        *ONE_PATCH_REGION,
        "--device",
        "cpu",
        "--start-timestep",
        "21",
        "--steps",
        "20",
    )
    run = _run_analyze(*arguments)
    run["out"] = out
    run["arguments"] = arguments
    run["summary"] = json.loads((out / "slide.json").read_text())
    return run


def test_grid_start_timestep_rounds() -> None:
    from napari_anopilad.method.demo import SD15_SCHEDULER_CONFIG

    # Stable Diffusion 1.5's 20-step grid is 951, 901, ..., 51, 1.
    assert grid_start_timestep(SD15_SCHEDULER_CONFIG, 20, 21) == 1
    assert grid_start_timestep(SD15_SCHEDULER_CONFIG, 20, 30) == 51
    assert grid_start_timestep(SD15_SCHEDULER_CONFIG, 20, 901) == 901
    assert grid_start_timestep(SD15_SCHEDULER_CONFIG, 100, 674) == 671


def test_bundle_start_timestep_on_grid(demo_bundle_dir: Path) -> None:
    bundle = load_bundle(demo_bundle_dir)

    settings = bundle.settings.with_overrides(num_inference_steps=100)

    assert bundle.start_timestep_on_grid(settings.with_overrides(start_timestep=674)) == 671
    assert bundle.start_timestep_on_grid(settings.with_overrides(start_timestep=671)) == 671


def test_slide_json_records_grid_start(off_grid_run: dict) -> None:
    summary = off_grid_run["summary"]

    assert off_grid_run["status"] == 0
    assert summary["settings"]["start_timestep"] == 21
    assert summary["settings"]["num_inference_steps"] == 20
    assert summary["start_timestep_on_grid"] == 1


def test_analyze_warns_off_grid_start(off_grid_run: dict) -> None:
    warning_lines = [line for line in off_grid_run["stderr"].splitlines() if "--start-timestep" in line]

    assert len(warning_lines) == 1
    assert warning_lines[0].startswith(
        "WARNING: --start-timestep 21 is not a step of the 20-step denoising grid"
    )
    assert "timestep 1 " in warning_lines[0]


def test_analyze_on_grid_start_no_warning(
    tmp_path: Path, cmu_slide_path: Path, demo_bundle_dir: Path
) -> None:
    out = tmp_path / "out"
    run = _run_analyze(
        str(cmu_slide_path),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(out),
        "--region",
        *ONE_PATCH_REGION,
        "--device",
        "cpu",
        "--start-timestep",
        "1",
        "--steps",
        "20",
    )
    summary = json.loads((out / "slide.json").read_text())

    assert run["status"] == 0
    assert "--start-timestep" not in run["stderr"]
    assert summary["start_timestep_on_grid"] == 1


# The off-grid run's settings differ from the demo bundle's calibration, so its one patch is z-scored
# within the slide, where one patch gives no standard deviation.
TOO_FEW_ONE_PATCH = "within-slide (too few patches: 1 scored, 2 with different scores needed)"


def test_one_patch_slide_json_too_few(off_grid_run: dict) -> None:
    summary = off_grid_run["summary"]

    assert summary["n_patches"] == 1
    assert summary["z_source"] == TOO_FEW_ONE_PATCH
    assert summary["z_std"] == 0.0
    assert summary["z_max"] == 0.0
    assert summary["z_99"] == 0.0
    assert summary["n_anomalous_patches"] == 0


def test_one_patch_csv_and_tiff_zero(off_grid_run: dict) -> None:
    out = off_grid_run["out"]
    records = read_patches_csv(out / "patches.csv")
    tiff = read_heatmap_tiff(out / "heatmap.tif")
    record = records[0]

    assert len(records) == 1
    assert record["z"] == 0.0
    assert record["z_eroded"] == 0.0
    assert tiff.metadata["z_source"] == TOO_FEW_ONE_PATCH
    assert tiff.grid[record["row"], record["col"]] == 0.0
    assert np.count_nonzero(~np.isnan(tiff.grid)) == 1


def test_one_patch_summary_warns(off_grid_run: dict) -> None:
    warning_lines = [line for line in off_grid_run["stderr"].splitlines() if "z-scores are undefined" in line]

    assert f"z-scores from {TOO_FEW_ONE_PATCH}." in off_grid_run["stdout"]
    assert len(warning_lines) == 1
    assert warning_lines[0].startswith("WARNING: the AnoPILaD z-scores are undefined")


def test_equal_scores_too_few(tmp_path: Path, cmu_slide_path: Path) -> None:
    settings = BaselineSettings("memae", "mse")
    store = ResultStore(tmp_path, "slide-id", "bundle-id", settings)
    store.write_batch([(8, 4), (8, 5), (9, 5)], scores={"mse": [0.5, 0.5, 0.5], "l1": [0.1, 0.2, 0.3]})
    with open_slide(cmu_slide_path) as slide:
        grid = build_patch_grid(slide)

    results = compute_slide_results(store, grid)
    by_l1 = compute_slide_results(store, grid, settings=settings.with_overrides(score="l1"))

    assert results.z_source == "within-slide (too few patches: all 3 scores are equal)"
    assert results.z_std == 0.0
    assert results.z_mean == 0.5
    assert results.z.tolist() == [0.0, 0.0, 0.0]
    assert results.z_max == 0.0
    assert by_l1.z_source == "within-slide"
    assert by_l1.z_std > 0


def test_slide_json_compile_null(off_grid_run: dict) -> None:
    assert off_grid_run["summary"]["compile"] is None


def test_slide_json_records_compile(off_grid_run: dict, tmp_path: Path) -> None:
    arguments = list(off_grid_run["arguments"])
    arguments[arguments.index("--out") + 1] = str(tmp_path / "out")
    store = off_grid_run["out"] / "store"

    # Every patch is in the store, so the rerun builds no scorer and compiles nothing.
    run = _run_analyze(*arguments, "--store", str(store), "--compile", "reduce-overhead")
    summary = json.loads((tmp_path / "out" / "slide.json").read_text())

    assert run["status"] == 0
    assert "Reused 1 of 1 patches" in run["stdout"]
    assert summary["compile"] == "reduce-overhead"
