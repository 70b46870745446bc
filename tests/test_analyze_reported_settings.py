"""What ``anopilad analyze`` reports about the settings that actually ran, on one patch of the CMU slide."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from napari_anopilad.cli import main
from napari_anopilad.method.bundle import load_bundle
from napari_anopilad.method.diffusion import grid_start_timestep

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
    warnings = [line for line in off_grid_run["stderr"].splitlines() if "--start-timestep" in line]

    assert len(warnings) == 1
    assert warnings[0].startswith("WARNING: --start-timestep 21 is not a step of the 20-step denoising grid")
    assert "timestep 1 " in warnings[0]


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
