"""Tests of ``anopilad analyze-cohort --triage`` on the real CMU slide with the demo bundle.

The cohort runs on an in-process dask cluster (one worker thread), and its outputs are compared with
those of ``anopilad analyze --triage`` on the same region and settings.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from napari_anopilad.cli import main
from napari_anopilad.engine.cohort import CohortOptions, CohortSlide, describe_bundle, prepare_slide
from napari_anopilad.engine.outputs import TRIAGE_COLUMNS
from napari_anopilad.engine.triage_pass import TriageSettings
from napari_anopilad.method.triage_store import TriageReferenceError

# Level-0 box over tissue of CMU-1-Small-Region (x y width height): rows 8-9, cols 3-6, eight tissue cells.
REGION = ("800", "2100", "900", "400")
N_REGION = 8
# One or two UNet steps and no guidance pass keep the diffusion short on a CPU.
FAST_SETTINGS = ("--steps", "10", "--start-timestep", "100", "--guidance-scale", "1")
# ceil(0.25 * 8) = 2 patches for AnoPILaD, no neighbours, one block each.
TRIAGE = ("--triage", "--triage-budget", "0.25", "--triage-neighbours", "0")
COMMON = ("--region", *REGION, "--batch-size", "1", "--device", "cpu", *FAST_SETTINGS, *TRIAGE)


def _read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _run(argv: list[str]) -> tuple[int, str, str]:
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        status = main(argv)
    return status, printed.getvalue(), errors.getvalue()


def _batch_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("batch-*.npz"))


@pytest.fixture(scope="module")
def scheduler() -> Any:
    """The address of an in-process dask cluster with one single-threaded worker."""
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0")
    yield cluster.scheduler_address
    cluster.close()


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, scheduler: str, cmu_slide_path: Path, demo_bundle_dir: Path
) -> dict[str, Any]:
    """A cohort triage run of the CMU slide and ``anopilad analyze --triage`` on the same settings."""
    root = tmp_path_factory.mktemp("cohort-triage")
    cohort_argv = [
        "analyze-cohort",
        str(cmu_slide_path),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(root / "cohort"),
        "--scheduler",
        scheduler,
        "--block-size",
        "1",
        *COMMON,
    ]
    status, printed, errors = _run(cohort_argv)
    assert status == 0, errors

    analyze_argv = ["analyze", str(cmu_slide_path), "--bundle", str(demo_bundle_dir)]
    assert _run([*analyze_argv, "--out", str(root / "analyze"), *COMMON])[0] == 0
    return {
        "cohort": root / "cohort",
        "slide_out": root / "cohort" / cmu_slide_path.stem,
        "analyze": root / "analyze",
        "argv": cohort_argv,
        "printed": printed,
    }


def test_cohort_triage_table_equals_analyze(runs: dict[str, Any]) -> None:
    cohort = _read_table(runs["slide_out"] / "patches.csv")
    single = _read_table(runs["analyze"] / "patches.csv")

    assert len(cohort) == N_REGION
    assert [(row["row"], row["col"]) for row in cohort] == [(row["row"], row["col"]) for row in single]
    for cohort_row, single_row in zip(cohort, single):
        for column in TRIAGE_COLUMNS:
            assert cohort_row[column] == single_row[column], column
        assert cohort_row["lpips"] == single_row["lpips"]
    assert sum(1 for row in cohort if row["lpips"]) == 2


def test_cohort_triage_summary_equals_analyze(runs: dict[str, Any]) -> None:
    cohort = json.loads((runs["slide_out"] / "slide.json").read_text())
    single = json.loads((runs["analyze"] / "slide.json").read_text())

    assert cohort["triage"] == single["triage"]
    assert cohort["coverage"] == single["coverage"]
    assert cohort["coverage"] == {"n_patches": 2, "n_tissue_patches": N_REGION, "fraction": 2 / N_REGION}
    assert cohort["triage"]["plan"]["n_budget"] == 2
    np.testing.assert_array_equal(
        tifffile.imread(runs["slide_out"] / "triage_heatmap.tif"),
        tifffile.imread(runs["analyze"] / "triage_heatmap.tif"),
    )
    assert (runs["slide_out"] / "triage_overlay.png").is_file()


def test_cohort_csv_has_triage_scores(runs: dict[str, Any]) -> None:
    (row,) = _read_table(runs["cohort"] / "cohort.csv")
    summary = json.loads((runs["slide_out"] / "slide.json").read_text())

    assert row["status"] == "ok"
    assert row["triage_scorer"] == "triage:knn_distance"
    assert float(row["triage_z_max"]) == summary["triage"]["z_max"]
    assert float(row["triage_z_99"]) == summary["triage"]["z_99"]
    assert float(row["coverage"]) == summary["coverage"]["fraction"]
    assert int(row["n_tissue_patches"]) == N_REGION
    assert int(row["n_patches"]) == 2
    assert "triage Z_99" in runs["printed"]
    assert f"(2 computed; triage pass: {N_REGION} computed)" in runs["printed"]


def test_cohort_triage_rerun_computes_nothing(runs: dict[str, Any]) -> None:
    store = runs["slide_out"] / "store"
    triage_before = _batch_files(store / "triage")
    before = _batch_files(store)

    status, printed, errors = _run(runs["argv"])

    assert status == 0, errors
    assert "(0 computed; triage pass: 0 computed)" in printed
    assert len(triage_before) >= 1
    assert _batch_files(store / "triage") == triage_before
    assert _batch_files(store) == before


def test_triage_blocks_are_plan_cells(tmp_path: Path, cmu_slide_path: Path, demo_bundle_dir: Path) -> None:
    options = CohortOptions(
        bundle=demo_bundle_dir,
        out=tmp_path / "out",
        device="cpu",
        block_size=3,
        region_level0=tuple(int(value) for value in REGION),
        triage=TriageSettings(budget_fraction=0.5, neighbour_radius=0),
    )
    plan = prepare_slide(CohortSlide(path=cmu_slide_path, name="cmu"), options)

    assert plan.status == "ok", plan.error
    assert plan.n_patches == N_REGION
    assert [len(block) for block in plan.blocks] == [3, 1]
    blocks = np.concatenate(plan.blocks)
    np.testing.assert_array_equal(blocks, plan.triage_plan.priority)
    assert sorted(map(tuple, blocks.tolist())) == sorted(map(tuple, plan.triage_plan.cells.tolist()))
    # The blocks go by the triage z-score, highest first.
    z_by_cell = {
        (int(row), int(col)): float(z)
        for row, col, z in zip(plan.triage.patches.rows, plan.triage.patches.cols, plan.triage.z)
    }
    z = [z_by_cell[(int(row), int(col))] for row, col in blocks]
    assert z == sorted(z, reverse=True)
    assert min(z) >= sorted(z_by_cell.values(), reverse=True)[3]


def test_cohort_triage_options_need_triage(
    tmp_path: Path, cmu_slide_path: Path, demo_bundle_dir: Path
) -> None:
    out = tmp_path / "out"
    argv = ["analyze-cohort", str(cmu_slide_path), "--bundle", str(demo_bundle_dir), "--out", str(out)]

    status, _, errors = _run([*argv, "--triage-budget", "0.5", "--triage-score", "keyword_distance"])
    assert status == 2
    assert "--triage-budget, --triage-score apply only with --triage" in errors

    status, _, errors = _run([*argv, "--triage", "--triage-neighbours", "-1"])
    assert status == 2
    assert "--triage-neighbours: neighbour radius -1 is invalid" in errors
    assert not out.exists()


def test_cohort_triage_without_reference_exits_2(
    tmp_path: Path, scheduler: str, cmu_slide_path: Path, demo_bundle_dir: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_dir, bundle)
    shutil.rmtree(bundle / "triage")
    out = tmp_path / "out"

    with pytest.raises(TriageReferenceError, match=r"build_triage_reference\.py"):
        describe_bundle(CohortOptions(bundle=bundle, out=out, device="cpu", triage=TriageSettings()))

    argv = ["analyze-cohort", str(cmu_slide_path), "--bundle", str(bundle), "--out", str(out)]
    status, _, errors = _run([*argv, "--scheduler", scheduler, *COMMON])
    assert status == 2
    assert "failed the check on a worker" in errors
    assert "triage reference" in errors
    assert "build_triage_reference.py" in errors
    assert not (out / "CMU-1-Small-Region").exists()
