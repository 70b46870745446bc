"""Tests of ``anopilad analyze-cohort`` on a local dask cluster of two CPU worker processes.

The cohort is the real CMU and TCGA slides, a copy of the CMU slide and a truncated copy (corrupt). One
worker is killed with SIGKILL while it scores a block, and the results must equal those of the
single-machine ``anopilad analyze`` on the same cells, value for value.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch

from napari_anopilad.cli import main
from napari_anopilad.commands.analyze import cells_in_region
from napari_anopilad.engine.cohort import (
    COHORT_COLUMNS,
    CohortOptions,
    CohortSlide,
    SlideOutcome,
    select_cells,
    unique_slide_names,
    write_cohort_csv,
)
from napari_anopilad.engine.cohort_cluster import start_local_cluster, worker_environments

# Settings that keep a patch to a few seconds on a CPU: one or two UNet steps, no guidance pass.
FAST_SETTINGS = ("--steps", "10", "--start-timestep", "100", "--guidance-scale", "1")
# Batch size 1 makes each patch its own batch, so a kill between batches is visible in the store and
# every patch's floating-point result is independent of how the patches were grouped.
MAX_PATCHES = 2
STORE_KEYS = ("score_lpips", "score_mse_latent", "keywords", "similarities", "weights", "prompts")
# Seconds a test waits at most for a cohort run.
RUN_TIMEOUT_S = 900


def _stored(store_dir: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """Read every batch file of a store folder into one entry per cell (a later batch wins)."""
    entries: dict[tuple[int, int], dict[str, Any]] = {}
    for path in sorted(store_dir.glob("batch-*.npz")):
        with np.load(path, allow_pickle=False) as batch:
            for index, (row, col) in enumerate(zip(batch["rows"], batch["cols"])):
                entries[(int(row), int(col))] = {key: batch[key][index] for key in STORE_KEYS}
    return entries


def _store_dir(slide_out: Path) -> Path:
    folders = [path for path in (slide_out / "store").iterdir() if path.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def _first_cells(slide_path: Path, mpp: float | None) -> tuple[np.ndarray, Any]:
    from napari_anopilad.slide import build_patch_grid, compute_tissue_mask, open_slide

    with open_slide(slide_path, mpp=mpp) as slide:
        grid = build_patch_grid(slide, tissue_mask=compute_tissue_mask(slide))
    cells = np.asarray(grid.tissue_cells(), dtype=np.int64).reshape(-1, 2)[:MAX_PATCHES]
    return cells, grid


def _region_of(cells: np.ndarray, grid: Any) -> tuple[int, int, int, int]:
    """The level-0 box (x, y, width, height) that covers exactly the given cells' bounding box."""
    size = grid.patch_size_level0
    row_min, col_min = cells.min(axis=0)
    row_max, col_max = cells.max(axis=0)
    return (
        int(col_min * size),
        int(row_min * size),
        int((col_max - col_min + 1) * size),
        int((row_max - row_min + 1) * size),
    )


def _read_cohort_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory, cmu_slide_path: Path) -> Path:
    """A folder with a copy of the CMU slide and a truncated copy of it."""
    folder = tmp_path_factory.mktemp("cohort-slides")
    copy = folder / "CMU-copy.svs"
    shutil.copyfile(cmu_slide_path, copy)
    data = cmu_slide_path.read_bytes()
    (folder / "truncated.svs").write_bytes(data[: len(data) // 4])
    return folder


@pytest.fixture(scope="module")
def cluster_client() -> Any:
    """A local cluster of two single-threaded CPU worker processes, started by the command's own code."""
    environments = worker_environments("cpu", [], n_workers=2, cpu_count=2)
    cluster, client = start_local_cluster(environments, dashboard_address=":0")
    yield cluster, client
    client.close()
    cluster.close()


def _cohort_argv(
    out: Path, bundle: Path, scheduler: str, cmu: Path, tcga: Path, cohort_dir: Path
) -> list[str]:
    return [
        "analyze-cohort",
        str(cmu),
        str(tcga),
        str(cohort_dir / "CMU-copy.svs"),
        str(cohort_dir / "truncated.svs"),
        "--bundle",
        str(bundle),
        "--out",
        str(out),
        "--scheduler",
        scheduler,
        "--mpp",
        "0.5",
        "--max-patches",
        str(MAX_PATCHES),
        "--batch-size",
        "1",
        "--block-size",
        str(MAX_PATCHES),
        "--device",
        "cpu",
        *FAST_SETTINGS,
    ]


def _run_command(argv: list[str]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``anopilad`` in a thread, keeping its exit status and what it printed."""
    result: dict[str, Any] = {}

    def target() -> None:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                result["status"] = main(argv)
        except BaseException as error:
            result["error"] = error
        result["stdout"] = printed.getvalue()

    thread = threading.Thread(target=target, name="analyze-cohort", daemon=True)
    thread.start()
    return thread, result


def _kill_worker_mid_block(client: Any, out: Path, thread: threading.Thread) -> dict[str, Any]:
    """SIGKILL the worker that scores a block whose store holds one of its two batches."""
    pids = client.run(os.getpid)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while thread.is_alive() and time.monotonic() < deadline:
        for store_dir in sorted(out.glob("*/store/*")):
            if len(list(store_dir.glob("batch-*.npz"))) != 1:
                continue
            for address, keys in client.processing().items():
                if any("score-block" in str(key) and str(store_dir) in str(key) for key in keys):
                    os.kill(pids[address], signal.SIGKILL)
                    return {"address": address, "pid": pids[address], "store_dir": store_dir}
        time.sleep(0.2)
    raise AssertionError("the cohort finished before any block was seen between its two batches")


@pytest.fixture(scope="module")
def killed_run(
    tmp_path_factory: pytest.TempPathFactory,
    cluster_client: Any,
    demo_bundle_dir: Path,
    cmu_slide_path: Path,
    tcga_slide_path: Path,
    cohort_dir: Path,
) -> dict[str, Any]:
    """The cohort run on the test cluster, with one worker killed while it scores a block."""
    cluster, client = cluster_client
    out = tmp_path_factory.mktemp("cohort") / "out"
    argv = _cohort_argv(
        out, demo_bundle_dir, cluster.scheduler_address, cmu_slide_path, tcga_slide_path, cohort_dir
    )
    thread, result = _run_command(argv)
    kill = _kill_worker_mid_block(client, out, thread)
    thread.join(timeout=RUN_TIMEOUT_S)
    assert not thread.is_alive(), "the cohort run did not finish after a worker was killed"
    if "error" in result:
        raise result["error"]
    return {"out": out, "kill": kill, **result}


@pytest.fixture(scope="module")
def reference_runs(
    tmp_path_factory: pytest.TempPathFactory,
    demo_bundle_dir: Path,
    cmu_slide_path: Path,
    tcga_slide_path: Path,
) -> dict[str, Path]:
    """``anopilad analyze`` on one machine over the cells the cohort analyses, per real slide.

    The cohort's CPU workers run torch with one thread each. float32 sums over two threads add in
    another order and differ in the last bits, so the reference runs use one thread too, which
    makes bit-identical results a fair expectation.
    """
    outs = {}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_references(outs, demo_bundle_dir, cmu_slide_path, tcga_slide_path, tmp_path_factory)
    finally:
        torch.set_num_threads(threads_before)
    return outs


def _run_references(
    outs: dict[str, Path],
    demo_bundle_dir: Path,
    cmu_slide_path: Path,
    tcga_slide_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    for name, path, mpp in (
        ("CMU-1-Small-Region", cmu_slide_path, None),
        ("TCGA-CR-7395-01A-01-TS1", tcga_slide_path, 0.5),
    ):
        cells, grid = _first_cells(path, mpp)
        region = _region_of(cells, grid)
        # The box must hold exactly the cohort's cells, or the z-scores within the slide would differ.
        tissue = np.asarray(grid.tissue_cells(), dtype=np.int64).reshape(-1, 2)
        assert sorted(map(tuple, cells_in_region(grid, tissue, region).tolist())) == sorted(
            map(tuple, cells.tolist())
        )
        out = tmp_path_factory.mktemp("reference") / name
        argv = ["analyze", str(path), "--bundle", str(demo_bundle_dir), "--out", str(out), "--region"]
        argv += [str(value) for value in region]
        argv += ["--batch-size", "1", "--device", "cpu", *FAST_SETTINGS]
        if mpp is not None:
            argv += ["--mpp", str(mpp)]
        assert main(argv) == 0
        outs[name] = out


# -- the cluster and the killed run -----------------------------------------------------------


@pytest.mark.slow
def test_cluster_has_two_cpu_workers(cluster_client: Any) -> None:
    _, client = cluster_client
    workers = client.scheduler_info()["workers"]
    assert len(workers) == 2
    assert [worker["nthreads"] for worker in workers.values()] == [1, 1]
    environments = client.run(
        lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_NUM_THREADS"))
    )
    assert sorted(environments.values()) == [("", "1"), ("", "1")]


@pytest.mark.slow
def test_cohort_reports_failed_slide(killed_run: dict[str, Any]) -> None:
    assert killed_run["status"] == 1
    rows = _read_cohort_csv(killed_run["out"] / "cohort.csv")
    by_slide = {row["slide"]: row for row in rows}
    assert set(by_slide) == {"CMU-1-Small-Region", "TCGA-CR-7395-01A-01-TS1", "CMU-copy", "truncated"}
    assert by_slide["truncated"]["status"] == "failed"
    assert "truncated.svs" in by_slide["truncated"]["error"]
    assert by_slide["truncated"]["z_99"] == ""
    for name in ("CMU-1-Small-Region", "TCGA-CR-7395-01A-01-TS1", "CMU-copy"):
        assert by_slide[name]["status"] == "ok", by_slide[name]["error"]
        assert by_slide[name]["error"] == ""
        assert int(by_slide[name]["n_patches"]) == MAX_PATCHES


@pytest.mark.slow
def test_cohort_csv_sorted_by_z99(killed_run: dict[str, Any]) -> None:
    out = killed_run["out"]
    rows = _read_cohort_csv(out / "cohort.csv")
    assert tuple(rows[0].keys()) == COHORT_COLUMNS
    analysed = [row for row in rows if row["status"] == "ok"]
    z_99 = [float(row["z_99"]) for row in analysed]
    assert z_99 == sorted(z_99, reverse=True)
    assert rows[-1]["slide"] == "truncated"
    for row in analysed:
        summary = json.loads((out / row["slide"] / "slide.json").read_text())
        assert float(row["z_max"]) == summary["z_max"]
        assert float(row["z_99"]) == summary["z_99"]
        # Cells of 256 level-0 pixels at 0.499 or 0.5 um per pixel.
        mpp = 0.499 if row["slide"].startswith("CMU") else 0.5
        cell_area_mm2 = (256 * mpp) ** 2 / 1e6
        assert float(row["anomaly_area_mm2"]) == pytest.approx(summary["n_anomalous_patches"] * cell_area_mm2)
        assert int(row["n_anomalous_patches"]) == summary["n_anomalous_patches"]


@pytest.mark.slow
def test_cohort_prints_dashboard_and_summary(killed_run: dict[str, Any]) -> None:
    printed = killed_run["stdout"]
    assert "Dask dashboard: http://" in printed
    assert "Analysed 3 of 4 slides" in printed
    assert "truncated" in printed
    assert "failed:" in printed


@pytest.mark.slow
def test_killed_worker_was_restarted(killed_run: dict[str, Any], cluster_client: Any) -> None:
    _, client = cluster_client
    client.wait_for_workers(2, timeout=120)
    assert killed_run["kill"]["pid"] not in client.run(os.getpid).values()


@pytest.mark.slow
def test_kill_loses_only_batch_in_flight(killed_run: dict[str, Any]) -> None:
    out = killed_run["out"]
    for name in ("CMU-1-Small-Region", "TCGA-CR-7395-01A-01-TS1", "CMU-copy"):
        store_dir = _store_dir(out / name)
        # Batch size 1: two batch files means no finished batch was scored twice after the kill.
        assert len(list(store_dir.glob("batch-*.npz"))) == MAX_PATCHES, name
        assert not list(store_dir.glob(".tmp-*")), name
    assert killed_run["kill"]["store_dir"].parent.parent.name in (
        "CMU-1-Small-Region",
        "TCGA-CR-7395-01A-01-TS1",
        "CMU-copy",
    )


@pytest.mark.slow
def test_slide_outputs_written(killed_run: dict[str, Any]) -> None:
    out = killed_run["out"]
    for name in ("CMU-1-Small-Region", "TCGA-CR-7395-01A-01-TS1", "CMU-copy"):
        for file_name in ("patches.csv", "slide.json", "heatmap.tif", "overlay.png", "regions.geojson"):
            assert (out / name / file_name).is_file(), f"{name}/{file_name}"
    assert not (out / "truncated" / "slide.json").exists()


# -- equality with the single-machine command ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("cohort_name", ["CMU-1-Small-Region", "CMU-copy", "TCGA-CR-7395-01A-01-TS1"])
def test_store_equals_single_machine(
    killed_run: dict[str, Any], reference_runs: dict[str, Path], cohort_name: str
) -> None:
    reference_name = "CMU-1-Small-Region" if cohort_name == "CMU-copy" else cohort_name
    cohort_store = _store_dir(killed_run["out"] / cohort_name)
    reference_store = _store_dir(reference_runs[reference_name])
    # Same folder key: slide identity, bundle identity, settings and grid.
    assert cohort_store.name == reference_store.name
    cohort_entries = _stored(cohort_store)
    reference_entries = _stored(reference_store)
    assert sorted(cohort_entries) == sorted(reference_entries)
    assert len(cohort_entries) == MAX_PATCHES
    for cell, expected in reference_entries.items():
        for key in STORE_KEYS:
            np.testing.assert_array_equal(cohort_entries[cell][key], expected[key], err_msg=f"{cell} {key}")


@pytest.mark.slow
@pytest.mark.parametrize("cohort_name", ["CMU-1-Small-Region", "CMU-copy", "TCGA-CR-7395-01A-01-TS1"])
def test_outputs_equal_single_machine(
    killed_run: dict[str, Any], reference_runs: dict[str, Path], cohort_name: str
) -> None:
    reference_name = "CMU-1-Small-Region" if cohort_name == "CMU-copy" else cohort_name
    cohort_out = killed_run["out"] / cohort_name
    reference_out = reference_runs[reference_name]
    cohort_summary = json.loads((cohort_out / "slide.json").read_text())
    reference_summary = json.loads((reference_out / "slide.json").read_text())
    for key in (
        "z_max",
        "z_99",
        "n_patches",
        "n_anomalous_patches",
        "z_source",
        "z_mean",
        "z_std",
        "settings",
    ):
        assert cohort_summary[key] == reference_summary[key], key
    assert cohort_summary["slide_identity"] == reference_summary["slide_identity"]
    assert cohort_summary["bundle_identity"] == reference_summary["bundle_identity"]
    assert (cohort_out / "patches.csv").read_text() == (reference_out / "patches.csv").read_text()
    np.testing.assert_array_equal(
        tifffile.imread(cohort_out / "heatmap.tif"), tifffile.imread(reference_out / "heatmap.tif")
    )


@pytest.mark.slow
def test_rerun_resumes_from_stores(
    killed_run: dict[str, Any],
    cluster_client: Any,
    demo_bundle_dir: Path,
    cmu_slide_path: Path,
    tcga_slide_path: Path,
    cohort_dir: Path,
) -> None:
    cluster, _ = cluster_client
    out = killed_run["out"]
    before = _read_cohort_csv(out / "cohort.csv")
    batches_before = sorted(path.name for path in out.glob("*/store/*/batch-*.npz"))
    argv = _cohort_argv(
        out, demo_bundle_dir, cluster.scheduler_address, cmu_slide_path, tcga_slide_path, cohort_dir
    )
    thread, result = _run_command(argv)
    thread.join(timeout=RUN_TIMEOUT_S)
    assert result.get("status") == 1, result
    assert sorted(path.name for path in out.glob("*/store/*/batch-*.npz")) == batches_before
    after = _read_cohort_csv(out / "cohort.csv")
    assert [(row["slide"], row["z_99"], row["status"]) for row in after] == [
        (row["slide"], row["z_99"], row["status"]) for row in before
    ]


# -- parts that need no cluster ---------------------------------------------------------------


def test_worker_environments_gpu_round_robin() -> None:
    environments = worker_environments("auto", ["0", "2"], n_workers=3, cpu_count=16)
    assert environments == [
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "2"},
        {"CUDA_VISIBLE_DEVICES": "0"},
    ]
    assert len(worker_environments("cuda", ["GPU-a", "GPU-b"], n_workers=None, cpu_count=16)) == 2


def test_worker_environments_cpu_split() -> None:
    environments = worker_environments("auto", [], n_workers=None, cpu_count=16)
    assert len(environments) == 4
    assert all(environment["OMP_NUM_THREADS"] == "4" for environment in environments)
    assert all(environment["CUDA_VISIBLE_DEVICES"] == "" for environment in environments)
    assert len(worker_environments("cpu", ["0"], n_workers=None, cpu_count=2)) == 1


@pytest.mark.parametrize(
    ("device", "gpus", "n_workers", "message"),
    [
        ("cuda:1", ["0", "1"], None, "CUDA_VISIBLE_DEVICES"),
        ("cuda", [], None, "no CUDA GPU"),
        ("tpu", [], None, "invalid"),
        ("cpu", [], 0, "--n-workers 0"),
    ],
)
def test_worker_environments_rejects(
    device: str, gpus: list[str], n_workers: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        worker_environments(device, gpus, n_workers=n_workers, cpu_count=4)


def test_unique_slide_names() -> None:
    paths = [Path("a/x.svs"), Path("b/x.svs"), Path("c/x-2.tif"), Path("d/y.ndpi")]
    assert unique_slide_names(paths) == ["x", "x-2", "x-2-2", "y"]


def test_select_cells_region_and_limit() -> None:
    class Grid:
        patch_size_level0 = 100

    cells = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [2, 2]], dtype=np.int64)
    # x 150..250 overlaps cols 1 and 2; y 0..150 overlaps rows 0 and 1.
    selected = select_cells(Grid(), cells, (150, 0, 100, 150), None)
    assert selected.tolist() == [[0, 1], [1, 1]]
    assert select_cells(Grid(), cells, None, 3).tolist() == [[0, 0], [0, 1], [1, 0]]


def test_cohort_csv_order_and_values(tmp_path: Path) -> None:
    def outcome(name: str, z_99: float | None, status: str = "ok", error: str = "") -> SlideOutcome:
        return SlideOutcome(
            slide=CohortSlide(path=Path(f"/data/{name}.svs"), name=name),
            status=status,
            error=error,
            z_max=None if z_99 is None else z_99 + 1,
            z_99=z_99,
            anomaly_area_mm2=None if z_99 is None else 0.125,
            n_anomalous_patches=0 if z_99 is None else 2,
            n_patches=0 if z_99 is None else 10,
        )

    outcomes = [
        outcome("low", -0.1),
        outcome("broken", None, "failed", "SlideError: broken.svs:\ntruncated"),
        outcome("high", 2.0000000000000004),
        outcome("mid", 0.5),
    ]
    rows = _read_cohort_csv(write_cohort_csv(tmp_path / "cohort.csv", outcomes))
    assert [row["slide"] for row in rows] == ["high", "mid", "low", "broken"]
    assert float(rows[0]["z_99"]) == 2.0000000000000004
    assert rows[0]["anomaly_area_mm2"] == "0.125"
    assert rows[3]["error"] == "SlideError: broken.svs: truncated"
    assert rows[3]["n_patches"] == ""
    assert not list(tmp_path.glob(".*.tmp"))


def test_command_needs_slides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["analyze-cohort", "--bundle", str(tmp_path), "--out", str(tmp_path / "out")])
    assert status == 2
    assert "no slides given" in capsys.readouterr().err


def test_command_slide_list_and_scheduler(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "slides.txt"
    listing.write_text("# cohort\n\nfirst.svs\n/elsewhere/second.svs\n")
    argv = [
        "analyze-cohort",
        "--list",
        str(listing),
        "--bundle",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
    ]
    # --n-workers with --scheduler fails after the list is read, before any cluster is contacted.
    status = main([*argv, "--scheduler", "tcp://127.0.0.1:1", "--n-workers", "2"])
    assert status == 2
    assert "--n-workers" in capsys.readouterr().err

    from napari_anopilad.commands.analyze_cohort import read_slide_list

    assert read_slide_list(listing) == [tmp_path / "first.svs", Path("/elsewhere/second.svs")]


def test_compile_mode_reaches_worker_scorer(
    tmp_path: Path, demo_bundle_dir: Path, cmu_slide_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from napari_anopilad.commands.analyze_cohort import add_parser, build_cohort
    from napari_anopilad.engine import cohort

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    argv = [str(cmu_slide_path), "--bundle", str(demo_bundle_dir), "--out", str(tmp_path / "out")]
    args = parser.parse_args([*argv, "--compile", "reduce-overhead"])
    _, options = build_cohort(args)
    eager_options = CohortOptions(bundle=demo_bundle_dir, out=tmp_path / "out")

    model = cohort._load_model(options, with_scorer=True)

    assert options.compile_mode == "reduce-overhead"
    assert cohort._model_key(options) != cohort._model_key(eager_options)
    assert model.scorer.compile_mode == "reduce-overhead"
    assert isinstance(model.scorer.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert "reduce-overhead replays CUDA graphs, which need a CUDA device; on cpu" in caplog.text
    with pytest.raises(SystemExit):
        parser.parse_args([str(cmu_slide_path), "--bundle", "b", "--out", "o", "--compile", "fast"])
    cohort._cache.clear()
