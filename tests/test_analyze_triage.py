"""End-to-end tests of ``anopilad analyze --triage`` on the real CMU slide with the demo bundle."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_anopilad.cli import main
from napari_anopilad.engine.outputs import TRIAGE_COLUMNS
from napari_anopilad.io.tables import PATCH_COLUMNS
from napari_anopilad.method.heatmap import erode_heatmap

# Level-0 box over tissue of CMU-1-Small-Region (x y width height): rows 8-9, cols 3-6, eight tissue cells.
REGION = ("800", "2100", "900", "400")
N_REGION = 8


def _read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _number(text: str) -> float:
    return float(text) if text else float("nan")


def _run(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str, str]:
    status = main(["analyze", *arguments])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def triaged(tmp_path_factory: pytest.TempPathFactory, cmu_slide_path: Path, demo_bundle_dir: Path) -> dict:
    """A triage run over REGION whose budget is the single highest triage patch, and what it printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("triage") / "out"
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        status = main(
            [
                "analyze",
                str(cmu_slide_path),
                "--bundle",
                str(demo_bundle_dir),
                "--out",
                str(out),
                "--region",
                *REGION,
                "--device",
                "cpu",
                "--triage",
                "--triage-budget",
                "0.1",
                "--triage-neighbours",
                "0",
            ]
        )
    assert status == 0
    return {
        "out": out,
        "printed": printed.getvalue(),
        "errors": errors.getvalue(),
        "slide": cmu_slide_path,
        "bundle": demo_bundle_dir,
    }


def test_triage_writes_both_maps(triaged: dict) -> None:
    out = triaged["out"]
    for name in ("patches.csv", "slide.json", "heatmap.tif", "overlay.png", "regions.geojson"):
        assert (out / name).is_file(), name
    for name in ("triage_heatmap.tif", "triage_overlay.png"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name


def test_triage_table_has_both_scores(triaged: dict) -> None:
    out = triaged["out"]
    with open(out / "patches.csv") as file:
        header = file.readline().strip().split(",")
    records = _read_table(out / "patches.csv")

    assert header == [*PATCH_COLUMNS, *TRIAGE_COLUMNS]
    assert len(records) == N_REGION
    for record in records:
        for column in TRIAGE_COLUMNS:
            assert np.isfinite(_number(record[column])), column
    with_lpips = [record for record in records if record["lpips"]]
    assert len(with_lpips) == 1
    # ceil(0.1 * 8) = 1: the diffusion scored the patch with the highest triage kNN z-score.
    highest = max(records, key=lambda record: _number(record["triage_knn_z"]))
    assert (with_lpips[0]["row"], with_lpips[0]["col"]) == (highest["row"], highest["col"])
    assert with_lpips[0]["prompt"].startswith("a histopathological photograph of")
    assert all(record["prompt"] == "" for record in records if record is not with_lpips[0])


def test_triage_heatmap_matches_table(triaged: dict) -> None:
    out = triaged["out"]
    records = _read_table(out / "patches.csv")
    heatmap = tifffile.imread(out / "triage_heatmap.tif")

    grid = np.full(heatmap.shape, np.nan, dtype=np.float32)
    for record in records:
        grid[int(record["row"]), int(record["col"])] = _number(record["triage_knn_z"])
    np.testing.assert_allclose(heatmap, erode_heatmap(grid), equal_nan=True, rtol=1e-6)
    for record in records:
        assert _number(record["triage_z_eroded"]) == pytest.approx(
            float(heatmap[int(record["row"]), int(record["col"])]), rel=1e-6
        )
    description = json.loads(tifffile.TiffFile(out / "triage_heatmap.tif").pages[0].description)
    assert description["scorer"] == "triage:knn_distance"


def test_triage_summary_names_scorer_and_coverage(triaged: dict) -> None:
    out = triaged["out"]
    summary = json.loads((out / "slide.json").read_text())
    heatmap = tifffile.imread(out / "triage_heatmap.tif")

    assert summary["scorer"] == "anopilad"
    assert summary["coverage"] == {"n_patches": 1, "n_tissue_patches": N_REGION, "fraction": 1 / N_REGION}
    triage = summary["triage"]
    assert triage["scorer"] == "triage:knn_distance"
    assert triage["k"] == 1
    assert triage["coverage"] == {"n_patches": N_REGION, "n_tissue_patches": N_REGION, "fraction": 1.0}
    assert triage["z_max"] == pytest.approx(float(np.nanmax(heatmap)), rel=1e-6)
    assert triage["plan"]["n_top"] == triage["plan"]["n_budget"] == 1
    assert triage["plan"]["neighbour_radius"] == 0

    printed = triaged["printed"]
    assert f"Triage (triage:knn_distance, k = 1): {N_REGION} / {N_REGION} tissue patches" in printed
    assert f"AnoPILaD: 1 / {N_REGION} tissue patches (1 computed, 0 from the store)" in printed
    assert "cover 12.5% of the tissue patches" in printed
    # Z-scores from the budget's own statistics get a warning, calibrated ones do not.
    warned = "which triage chose as the most anomalous" in triaged["errors"]
    assert warned == (summary["z_source"] == "within-slide")


def test_triage_rerun_reuses_stores(triaged: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = triaged["out"]
    status, printed, _ = _run(
        capsys,
        str(triaged["slide"]),
        "--bundle",
        str(triaged["bundle"]),
        "--out",
        str(out),
        "--region",
        *REGION,
        "--device",
        "cpu",
        "--triage",
        "--triage-budget",
        "0.25",
        "--triage-neighbours",
        "0",
        "--triage-score",
        "keyword_distance",
    )
    summary = json.loads((out / "slide.json").read_text())
    records = _read_table(out / "patches.csv")

    assert status == 0
    assert f"Triage (triage:keyword_distance): {N_REGION} / {N_REGION} tissue patches (0 computed)" in printed
    assert summary["triage"]["scorer"] == "triage:keyword_distance"
    # The table's AnoPILaD patches are this run's budget plus the first run's patch, all counted.
    n_scored = summary["coverage"]["n_patches"]
    assert f"AnoPILaD: {n_scored} / {N_REGION} tissue patches" in printed
    assert "from the store)" in printed
    top_two = sorted(records, key=lambda record: -_number(record["triage_keyword_z"]))[:2]
    scored = {(record["row"], record["col"]) for record in records if record["lpips"]}
    # The patch of the first run stays in the store and in the table next to this run's budget.
    assert {(record["row"], record["col"]) for record in top_two} <= scored
    assert summary["coverage"]["n_patches"] == len(scored)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--triage", "--triage-budget", "1.5"], "--triage-budget: triage budget 1.5 is invalid"),
        (["--triage", "--triage-neighbours", "-2"], "--triage-neighbours: neighbour radius -2 is invalid"),
        (
            ["--triage-budget", "0.5", "--triage-score", "keyword_distance"],
            "--triage-budget, --triage-score apply only with --triage",
        ),
    ],
)
def test_triage_invalid_options_exit_2(
    extra: list[str],
    expected: str,
    tmp_path: Path,
    cmu_slide_path: Path,
    demo_bundle_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, _, error = _run(
        capsys,
        str(cmu_slide_path),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(tmp_path / "out"),
        *extra,
    )
    assert status == 2
    assert expected in error
    assert not (tmp_path / "out").exists()


def test_triage_without_reference_exits_2(
    tmp_path: Path, cmu_slide_path: Path, demo_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_dir, bundle)
    shutil.rmtree(bundle / "triage")

    status, _, error = _run(
        capsys,
        str(cmu_slide_path),
        "--bundle",
        str(bundle),
        "--out",
        str(tmp_path / "out"),
        "--region",
        *REGION,
        "--device",
        "cpu",
        "--triage",
    )
    assert status == 2
    assert "triage reference" in error
    assert "build_triage_reference.py" in error


def test_patch_table_extra_columns(tmp_path: Path) -> None:
    from napari_anopilad.io.tables import read_patches_csv, write_patches_csv

    record = {
        "x": 0,
        "y": 256,
        "width": 256,
        "height": 256,
        "row": 1,
        "col": 0,
        "tissue_fraction": 0.75,
        "keywords": ["a", "b"],
        "weights": [1.1, 1.0],
        "prompt": "a histopathological photograph of (a)+ and (b)",
        "lpips": 0.25,
        "mse_latent": None,
        "z": 1.5,
        "z_eroded": 1.0,
    }

    # A further named score and a missing triage value follow the standard columns.
    write_patches_csv(tmp_path / "wide.csv", [{**record, "ssim": 0.5, "triage_knn_z": None}])
    rows = _read_table(tmp_path / "wide.csv")
    with open(tmp_path / "wide.csv") as file:
        header = file.readline().strip().split(",")
    assert header == [*PATCH_COLUMNS, "ssim", "triage_knn_z"]
    assert rows[0]["ssim"] == "0.5"
    assert rows[0]["triage_knn_z"] == ""
    assert rows[0]["mse_latent"] == ""
    assert rows[0]["keywords"] == "a;b"

    # The reader gives the further columns back as floats, NaN where empty.
    (back,) = read_patches_csv(tmp_path / "wide.csv")
    assert list(back)[-2:] == ["ssim", "triage_knn_z"]
    assert back["ssim"] == 0.5
    assert np.isnan(back["triage_knn_z"])
    assert np.isnan(back["mse_latent"])
    assert back["keywords"] == ["a", "b"]
    assert back["lpips"] == 0.25
