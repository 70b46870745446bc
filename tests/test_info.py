"""``anopilad info`` through the real command line entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_anopilad.cli import main


def run_info(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["info", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cmu_json(capsys: pytest.CaptureFixture[str], cmu_slide_path: Path) -> None:
    status, out, err = run_info(capsys, str(cmu_slide_path), "--json")
    assert status == 0
    assert err == ""
    info = json.loads(out)
    assert list(info) == [
        "format",
        "levels",
        "mpp",
        "objective_power",
        "associated_images",
        "grid_shape",
        "n_patches",
        "n_tissue_patches",
    ]
    assert info["format"] == "aperio"
    assert info["levels"] == [{"shape": [2967, 2220, 3], "downsample": 1.0}]
    assert info["mpp"] == pytest.approx(0.499)
    assert info["objective_power"] == 20.0
    assert info["associated_images"] == ["thumbnail", "label", "macro"]
    assert info["grid_shape"] == [11, 8]
    assert info["n_patches"] == 88
    assert 0 < info["n_tissue_patches"] < 88


def test_tcga_json_mpp_unknown(capsys: pytest.CaptureFixture[str], tcga_slide_path: Path) -> None:
    status, out, _ = run_info(capsys, str(tcga_slide_path), "--json")
    assert status == 0
    info = json.loads(out)
    assert info["format"] == "aperio"
    assert [level["shape"] for level in info["levels"]] == [[3567, 4443, 3], [1783, 2221, 3]]
    assert info["levels"][1]["downsample"] == pytest.approx((4443 / 2221 + 3567 / 1783) / 2, abs=1e-4)
    assert info["mpp"] is None
    assert info["objective_power"] is None
    assert info["grid_shape"] is None
    assert info["n_patches"] is None
    assert info["n_tissue_patches"] is None


def test_tcga_text_asks_for_mpp(capsys: pytest.CaptureFixture[str], tcga_slide_path: Path) -> None:
    status, out, _ = run_info(capsys, str(tcga_slide_path))
    assert status == 0
    assert "mpp: unknown" in out
    assert "give it with --mpp UM" in out
    assert "1: 2221 x 1783 px" in out


def test_mpp_option_gives_grid(capsys: pytest.CaptureFixture[str], tcga_slide_path: Path) -> None:
    status, out, _ = run_info(capsys, str(tcga_slide_path), "--json", "--mpp", "0.25")
    assert status == 0
    info = json.loads(out)
    assert info["mpp"] == 0.25
    assert info["grid_shape"] == [3567 // 512, 4443 // 512]
    assert info["n_patches"] == 6 * 8
    assert 0 < info["n_tissue_patches"] <= 48


def test_cmu_text(capsys: pytest.CaptureFixture[str], cmu_slide_path: Path) -> None:
    status, out, _ = run_info(capsys, str(cmu_slide_path))
    assert status == 0
    assert "format: aperio" in out
    assert "0: 2220 x 2967 px, downsample 1" in out
    assert "mpp: 0.499 um/px" in out
    assert "objective power: 20x" in out
    assert "associated images: thumbnail, label, macro" in out
    assert "88 (11 rows x 8 cols)" in out


def write_truncated(path: Path, source: Path) -> None:
    path.write_bytes(source.read_bytes()[:500_000])


def write_sixteen_bit(path: Path, _source: Path) -> None:
    tifffile.imwrite(path, np.zeros((256, 256, 3), np.uint16), tile=(128, 128), photometric="rgb")


def write_text(path: Path, _source: Path) -> None:
    path.write_text("not a slide\n")


@pytest.mark.parametrize(
    ("writer", "message"),
    [
        (None, "file not found"),
        (write_text, "not a readable TIFF"),
        (write_truncated, "truncated"),
        (write_sixteen_bit, "16-bit"),
    ],
)
def test_bad_input_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, cmu_slide_path: Path, writer: object, message: str
) -> None:
    path = tmp_path / "bad.svs"
    if callable(writer):
        writer(path, cmu_slide_path)
    status, out, err = run_info(capsys, str(path), "--json")
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("anopilad info: error: ")
    assert str(path) in err
    assert message in err
    assert "Traceback" not in err


def test_slide_smaller_than_patch_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "tiny.tif"
    tifffile.imwrite(path, np.full((200, 300, 3), 200, np.uint8), tile=(64, 64), photometric="rgb")
    status, _, err = run_info(capsys, str(path), "--mpp", "0.5")
    assert status == 2
    assert "smaller than one 256 px patch" in err
    assert err.count("\n") == 1
