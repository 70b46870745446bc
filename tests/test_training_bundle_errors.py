"""06_calibrate.py and 07_evaluate.py stop with one ``error:`` line on a folder that is not a usable bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from napari_anopilad.training import calibrate, evaluate
from test_evaluate_side_by_side import _extraction, _tiny_memae

TRAINING = Path(__file__).parent.parent / "training"


@pytest.fixture()
def extraction(tmp_path: Path, data_dir: Path) -> Path:
    """The two-slide extraction with its normal slide moved to the validation split, so it can calibrate."""
    folder = _extraction(tmp_path / "extracted", data_dir)
    manifest = pd.read_csv(folder / "manifest.csv", keep_default_na=False)
    manifest.loc[manifest["slide"] == "slide-n", "split"] = "validation"
    manifest.to_csv(folder / "manifest.csv", index=False)
    return folder


def _corrupt_weights(bundle: Path) -> Path:
    (bundle / "model.safetensors").write_bytes(b"not a safetensors file")
    return bundle


def _other_architecture(bundle: Path) -> Path:
    spec = json.loads((bundle / "bundle.json").read_text())
    spec["model"]["memory_items"] = 7
    (bundle / "bundle.json").write_text(json.dumps(spec))
    return bundle


def test_calibrate_script_prints_one_error_line(extraction: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(TRAINING / "06_calibrate.py"), str(extraction), "--bundle", str(extraction)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: --bundle {extraction}: ")
    assert "bundle.json not found" in lines[0]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_corrupt_weights, "is not a valid safetensors file"),
        (_other_architecture, "does not match the architecture"),
    ],
)
def test_calibrate_rejects_unusable_weights(extraction: Path, tmp_path: Path, damage, message: str) -> None:
    bundle = damage(_tiny_memae(tmp_path / "memae", seed=0))

    with pytest.raises(SystemExit) as exit_info:
        calibrate.main([str(extraction), "--bundle", str(bundle)])

    text = str(exit_info.value)
    assert text.startswith(f"error: --bundle {bundle}: ")
    assert message in text
    assert not (bundle / calibrate.CALIBRATION_SCORES_NAME).exists()


def test_evaluate_rejects_non_bundle_folder(extraction: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(extraction), "--bundle", str(extraction), "--report", str(report)])

    text = str(exit_info.value)
    assert text.startswith(f"error: --bundle {extraction}: ")
    assert "bundle.json not found" in text


def test_evaluate_checks_weights_before_scoring(extraction: Path, tmp_path: Path) -> None:
    usable = _tiny_memae(tmp_path / "usable", seed=0)
    corrupt = _corrupt_weights(_tiny_memae(tmp_path / "corrupt", seed=1))
    report = tmp_path / "report"
    arguments = [str(extraction), "--report", str(report), "--bootstrap", "5"]

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([*arguments, "--bundle", str(usable), "--bundle", str(corrupt)])

    text = str(exit_info.value)
    assert text.startswith(f"error: --bundle {corrupt}: ")
    assert "is not a valid safetensors file" in text
    assert not (report / "scores").exists()


def test_evaluate_rejects_other_architecture(extraction: Path, tmp_path: Path) -> None:
    bundle = _other_architecture(_tiny_memae(tmp_path / "memae", seed=0))
    report = tmp_path / "report"

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(extraction), "--bundle", str(bundle), "--report", str(report)])

    text = str(exit_info.value)
    assert text.startswith(f"error: --bundle {bundle}: ")
    assert "does not match the architecture" in text


def test_evaluate_rejects_repeated_bundle(extraction: Path, tmp_path: Path) -> None:
    bundle = _tiny_memae(tmp_path / "memae", seed=0)

    with pytest.raises(SystemExit, match="is given twice"):
        evaluate.main(
            [
                str(extraction),
                "--bundle",
                str(bundle),
                "--bundle",
                str(bundle),
                "--report",
                str(tmp_path / "r"),
            ]
        )


def test_evaluate_triage_needs_reference(extraction: Path, tmp_path: Path, demo_bundle_dir: Path) -> None:
    import shutil

    bundle = tmp_path / "demo"
    shutil.copytree(demo_bundle_dir, bundle)
    shutil.rmtree(bundle / "triage")

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(
            [
                str(extraction),
                "--bundle",
                str(bundle),
                "--report",
                str(tmp_path / "r"),
                "--triage",
                "--bootstrap",
                "5",
            ]
        )

    text = str(exit_info.value)
    assert text.startswith(f"error: --triage with --bundle {bundle}: ")
    assert "triage reference" in text
