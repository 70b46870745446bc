"""End-to-end tests of ``anopilad analyze`` on the real CMU slide with the demo bundle."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from matplotlib.path import Path as MplPath
from PIL import Image
from scipy import ndimage

from napari_anopilad.cli import main
from napari_anopilad.io.tables import PATCH_COLUMNS, read_patches_csv
from napari_anopilad.method.heatmap import erode_heatmap

# Level-0 box (x y width height) over tissue of CMU-1-Small-Region: 256 px cells at 0.5 um/px are
# 256 level-0 pixels, so this box overlaps rows 8-9 and cols 3-6, eight tissue cells.
REGION = ("800", "2100", "900", "400")
N_REGION = 8
# A box inside REGION for the runs that compare scores: rows 8-9 of col 5, two tissue cells.
SMALL_REGION = ("1300", "2100", "200", "400")
N_SMALL_REGION = 2
# Scores of one patch in batches of different sizes agree to float32 rounding on the CPU, not
# bitwise: oneDNN's convolutions in LPIPS and the VAE decoder round differently per batch shape
# (relative differences up to about 1e-6 measured with the demo bundle).
RELATIVE_TOLERANCE = 1e-5

OUTPUT_FILES = ("patches.csv", "slide.json", "heatmap.tif", "overlay.png", "regions.geojson")


def _analyze(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str, str]:
    status = main(["analyze", *arguments])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _table(out: Path) -> list[dict]:
    return read_patches_csv(out / "patches.csv")


def _scores_by_cell(records: list[dict]) -> dict[tuple[int, int], dict]:
    return {(record["row"], record["col"]): record for record in records}


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory: pytest.TempPathFactory, cmu_slide_path: Path, demo_bundle_dir: Path) -> Path:
    """One uninterrupted run over REGION with batch size 8, and what it printed."""
    out = tmp_path_factory.mktemp("analyze") / "out"
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
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--save-reconstructions",
        ]
    )
    assert status == 0
    return out


def test_analyze_writes_all_outputs(analyzed: Path) -> None:
    out = analyzed
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name


def test_analyze_table_matches_region(analyzed: Path, cmu_slide_path: Path) -> None:
    from napari_anopilad.slide import build_patch_grid, open_slide

    out = analyzed
    records = _table(out)
    with open_slide(cmu_slide_path) as slide:
        grid = build_patch_grid(slide)
    tissue = {(int(row), int(col)) for row, col in grid.tissue_cells()}
    x0, y0, width, height = (int(value) for value in REGION)
    expected = {
        (row, col)
        for row, col in tissue
        if col * 256 < x0 + width
        and (col + 1) * 256 > x0
        and row * 256 < y0 + height
        and (row + 1) * 256 > y0
    }
    assert {(record["row"], record["col"]) for record in records} == expected
    assert len(expected) == N_REGION
    for record in records:
        assert (record["x"], record["y"]) == (record["col"] * 256, record["row"] * 256)
        assert record["width"] == record["height"] == 256
        assert record["tissue_fraction"] >= 0.5
        assert len(record["keywords"]) == 5
        assert len(record["weights"]) == 5
        assert record["weights"][2] == pytest.approx(1.0)
        assert record["prompt"].startswith("a histopathological photograph of")
        assert np.isfinite(record["lpips"])
        assert np.isfinite(record["mse_latent"])
    with open(out / "patches.csv") as file:
        assert file.readline().strip() == ",".join(PATCH_COLUMNS)


def test_analyze_slide_scores_agree(analyzed: Path) -> None:
    out = analyzed
    records = _table(out)
    summary = json.loads((out / "slide.json").read_text())
    z_eroded = np.array([record["z_eroded"] for record in records])

    assert summary["n_patches"] == len(records)
    assert summary["z_max"] == pytest.approx(z_eroded.max(), abs=1e-6)
    ascending = np.sort(z_eroded)
    assert summary["z_99"] == pytest.approx(
        ascending[int(np.floor(0.99 * ascending.size)) :].mean(), abs=1e-6
    )
    assert summary["threshold"] == 0.0
    assert summary["demo"] is True
    assert summary["z_source"] in ("calibration", "within-slide")
    assert summary["settings"]["num_inference_steps"] == 20
    assert summary["region_level0"] == [int(value) for value in REGION]
    assert isinstance(summary["bundle_identity"], str) and summary["bundle_identity"]


def test_analyze_z_scores_use_calibration(analyzed: Path, demo_bundle_dir: Path) -> None:
    out = analyzed
    spec = json.loads((demo_bundle_dir / "bundle.json").read_text())
    statistics = spec["calibration"]["scores"]["lpips"]
    summary = json.loads((out / "slide.json").read_text())
    assert summary["z_source"] == "calibration"
    for record in _table(out):
        expected = (record["lpips"] - statistics["mean"]) / statistics["std"]
        assert record["z"] == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_analyze_erosion_matches_scipy(analyzed: Path) -> None:
    out = analyzed
    records = _table(out)
    heatmap = tifffile.imread(out / "heatmap.tif")
    assert heatmap.dtype == np.float32
    assert heatmap.shape == (11, 8)
    assert np.count_nonzero(np.isfinite(heatmap)) == N_REGION

    z_grid = np.full(heatmap.shape, np.nan)
    for record in records:
        z_grid[record["row"], record["col"]] = record["z"]
    # A 2x2 window at origin 0 covers the cell, its up, left and up-left neighbours; +inf keeps
    # empty cells and the outside from lowering a neighbour.
    reference = ndimage.grey_erosion(
        np.where(np.isnan(z_grid), np.inf, z_grid), size=(2, 2), mode="constant", cval=np.inf
    )
    reference[np.isnan(z_grid)] = np.nan
    np.testing.assert_allclose(heatmap, reference, rtol=1e-6, atol=1e-6, equal_nan=True)
    for record in records:
        assert record["z_eroded"] == pytest.approx(float(heatmap[record["row"], record["col"]]), abs=1e-6)


def test_analyze_regions_cover_anomalous_cells(analyzed: Path) -> None:
    out = analyzed
    records = _table(out)
    collection = json.loads((out / "regions.geojson").read_text())
    summary = json.loads((out / "slide.json").read_text())
    anomalous = {
        (record["row"], record["col"]) for record in records if record["z_eroded"] > summary["threshold"]
    }

    covered: set[tuple[int, int]] = set()
    centres = np.array([[(col + 0.5) * 256, (row + 0.5) * 256] for row in range(11) for col in range(8)])
    for feature in collection["features"]:
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["classification"]["name"] == "Anomaly"
        rings = [np.asarray(ring, dtype=float) for ring in feature["geometry"]["coordinates"]]
        for ring in rings:
            assert np.all(ring[:, 0] >= 0)
            assert np.all(ring[:, 0] <= 2220)
            assert np.all(ring[:, 1] >= 0)
            assert np.all(ring[:, 1] <= 2967)
        inside = MplPath(rings[0]).contains_points(centres)
        for hole in rings[1:]:
            inside &= ~MplPath(hole).contains_points(centres)
        covered |= {(index // 8, index % 8) for index in np.flatnonzero(inside)}
    assert covered == anomalous
    assert summary["n_regions"] == len(collection["features"])


def test_analyze_overlay_is_a_picture(analyzed: Path) -> None:
    out = analyzed
    with Image.open(out / "overlay.png") as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width > 300
    assert height > 300
    # Heatmap colours, the thumbnail and the text: far more than a handful of colours.
    packed = (pixels[..., 0].astype(np.int32) << 16) | (pixels[..., 1].astype(np.int32) << 8) | pixels[..., 2]
    assert np.unique(packed).size > 100


def test_analyze_saves_reconstruction_pairs(analyzed: Path) -> None:
    out = analyzed
    for record in _table(out):
        stem = f"r{record['row']}_c{record['col']}"
        with Image.open(out / "reconstructions" / f"{stem}_original.png") as original:
            assert original.size == (256, 256)
        with Image.open(out / "reconstructions" / f"{stem}_reconstruction.png") as reconstruction:
            assert reconstruction.size == (256, 256)


def test_analyze_rerun_reuses_store(
    analyzed: Path, cmu_slide_path: Path, demo_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = analyzed
    before = (out / "patches.csv").read_text()
    status, printed, _ = _analyze(
        capsys,
        str(cmu_slide_path),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(out),
        "--region",
        *REGION,
        "--device",
        "cpu",
    )
    assert status == 0
    assert f"Reused {N_REGION} of {N_REGION} patches" in printed
    assert f"0 computed, {N_REGION} from the store" in printed
    assert (out / "patches.csv").read_text() == before


def test_analyze_changed_settings_skip_store(
    analyzed: Path,
    cmu_slide_path: Path,
    demo_bundle_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = analyzed
    store_folders_before = set((out / "store").iterdir())
    copy = tmp_path / "copy"
    status, printed, _ = _analyze(
        capsys,
        str(cmu_slide_path),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(copy),
        "--store",
        str(out / "store"),
        "--region",
        *SMALL_REGION,
        "--start-timestep",
        "300",
        "--steps",
        "10",
        "--device",
        "cpu",
    )
    assert status == 0
    assert "Reused" not in printed
    assert f"{N_SMALL_REGION} computed, 0 from the store" in printed
    new_folders = set((out / "store").iterdir()) - store_folders_before
    assert len(new_folders) == 1
    summary = json.loads((copy / "slide.json").read_text())
    assert summary["settings"]["start_timestep"] == 300
    assert summary["settings"]["num_inference_steps"] == 10
    # Calibration was measured at the bundle's start timestep, so it no longer applies.
    assert summary["z_source"] == "within-slide"


_KILLABLE_RUN = """
import sys
from napari_anopilad.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def killed_and_resumed(
    tmp_path_factory: pytest.TempPathFactory,
    cmu_slide_path: Path,
    demo_bundle_dir: Path,
) -> dict:
    """A run over SMALL_REGION with batch size 1, killed with SIGKILL once a batch is stored, then rerun
    in this process."""
    out = tmp_path_factory.mktemp("killed") / "out"
    arguments = [
        "analyze",
        str(cmu_slide_path),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(out),
        "--region",
        *SMALL_REGION,
        "--batch-size",
        "1",
        "--device",
        "cpu",
    ]
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE_RUN, *arguments],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if list((out / "store").glob("*/batch-*.npz")):
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no batch landed in the store within 240 s")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    n_stored = len(list((out / "store").glob("*/batch-*.npz")))
    csv_after_kill = (out / "patches.csv").exists()

    printed, error = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(error):
        status = main(arguments)
    return {
        "out": out,
        "n_stored": n_stored,
        "csv_after_kill": csv_after_kill,
        "status": status,
        "printed": printed.getvalue(),
        "error": error.getvalue(),
    }


def test_analyze_resumes_after_sigkill(killed_and_resumed: dict, analyzed: Path) -> None:
    assert killed_and_resumed["n_stored"] == 1
    assert not killed_and_resumed["csv_after_kill"]
    assert killed_and_resumed["status"] == 0, killed_and_resumed["error"]
    assert f"Reused 1 of {N_SMALL_REGION} patches" in killed_and_resumed["printed"]

    # The same patches of the uninterrupted run give the same z-scores and, eroded within the
    # smaller region, the same heatmap.
    reference = _scores_by_cell(_table(analyzed))
    resumed = _scores_by_cell(_table(killed_and_resumed["out"]))
    assert len(resumed) == N_SMALL_REGION
    summary = json.loads((analyzed / "slide.json").read_text())
    z_tolerance = RELATIVE_TOLERANCE * max(record["lpips"] for record in resumed.values()) / summary["z_std"]
    z_grid = np.full((11, 8), np.nan)
    for row, col in resumed:
        z_grid[row, col] = reference[(row, col)]["z"]
    eroded = erode_heatmap(z_grid)
    for (row, col), record in resumed.items():
        assert record["z"] == pytest.approx(reference[(row, col)]["z"], abs=z_tolerance)
        assert record["z_eroded"] == pytest.approx(float(eroded[row, col]), abs=z_tolerance)


def test_analyze_batch_size_invariance(killed_and_resumed: dict, analyzed: Path) -> None:
    # Batch size 8 in the reference run, 1 in the resumed one.
    reference = _scores_by_cell(_table(analyzed))
    for cell, record in _scores_by_cell(_table(killed_and_resumed["out"])).items():
        expected = reference[cell]
        assert record["keywords"] == expected["keywords"]
        assert record["prompt"] == expected["prompt"]
        np.testing.assert_allclose(record["weights"], expected["weights"], rtol=RELATIVE_TOLERANCE)
        assert record["lpips"] == pytest.approx(expected["lpips"], rel=RELATIVE_TOLERANCE)
        assert record["mse_latent"] == pytest.approx(expected["mse_latent"], rel=RELATIVE_TOLERANCE)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-slide", "not found"),
        ("unknown-mpp", "--mpp"),
        ("missing-bundle", "bundle folder"),
        ("region-outside", "outside the slide"),
    ],
)
def test_analyze_bad_input_exits_2(
    case: str,
    expected: str,
    tmp_path: Path,
    cmu_slide_path: Path,
    tcga_slide_path: Path,
    demo_bundle_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    slide, bundle, extra = str(cmu_slide_path), str(demo_bundle_dir), []
    if case == "missing-slide":
        slide = str(tmp_path / "absent.svs")
    elif case == "unknown-mpp":
        slide = str(tcga_slide_path)
    elif case == "missing-bundle":
        bundle = str(tmp_path / "no-bundle")
    else:
        extra = ["--region", "5000", "5000", "100", "100"]
    status, _, error = _analyze(
        capsys, slide, "--bundle", bundle, "--out", str(tmp_path / "out"), "--device", "cpu", *extra
    )
    assert status == 2
    lines = error.strip().splitlines()
    assert len(lines) == 1, error
    assert lines[0].startswith("anopilad analyze: error:")
    assert expected in lines[0]
