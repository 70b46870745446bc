"""The seven training steps run through their command-line entry points on the real test slides.

The demo bundle's numbers are meaningless; these tests check that each step produces what it must, resumes,
and that its outputs agree with independent computations (scikit-learn, numpy).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from napari_anopilad.training import calibrate, caption, evaluate, extract, lora, select_checkpoint, sweep
from napari_anopilad.training.fid import save_random_inception_weights

# A tumour rectangle over the middle of CMU-1-Small-Region, in level-0 pixels. The slide is skin, not
# lymph node: the label only exercises the evaluation code.
TUMOUR_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="Tumor" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="1000" Y="400" />
        <Coordinate Order="1" X="1600" Y="400" />
        <Coordinate Order="2" X="1600" Y="1600" />
        <Coordinate Order="3" X="1000" Y="1600" />
      </Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups><Group Name="Tumor" PartOfGroup="None" Color="#00ff00"><Attributes /></Group></AnnotationGroups>
</ASAP_Annotations>
"""
SPLIT_CSV = """slide,split,mpp
TCGA-CR-7395-01A-01-TS1,train,0.5
CMU-validation,validation,
CMU-1-Small-Region,test-in,
TCGA-normal,test-out,0.5
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, data_dir: Path, demo_bundle_dir: Path) -> Path:
    """Slides (copies under new names give four slides from the two real ones), split, annotation and bundle."""
    root = tmp_path_factory.mktemp("training-steps")
    slides = root / "slides"
    slides.mkdir()
    cmu = data_dir / "slides" / "CMU-1-Small-Region.svs"
    tcga = data_dir / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"
    shutil.copyfile(cmu, slides / cmu.name)
    shutil.copyfile(cmu, slides / "CMU-validation.svs")
    shutil.copyfile(tcga, slides / tcga.name)
    shutil.copyfile(tcga, slides / "TCGA-normal.svs")
    (root / "annotations").mkdir()
    (root / "annotations" / "CMU-1-Small-Region.xml").write_text(TUMOUR_XML)
    (root / "split.csv").write_text(SPLIT_CSV)
    shutil.copytree(demo_bundle_dir, root / "base-bundle")
    return root


@pytest.fixture(scope="module")
def patches(workspace: Path) -> Path:
    output = workspace / "patches"
    arguments = [
        str(workspace / "slides"),
        "--split",
        str(workspace / "split.csv"),
        "--annotations",
        str(workspace / "annotations"),
        "--output",
        str(output),
        "--target-mpp",
        "1.0",
        "--max-patches-per-slide",
        "3",
    ]
    assert extract.main(arguments) == 0
    assert extract.main(arguments) == 0
    return output


def test_extract_manifest_and_labels(patches: Path):
    manifest = pd.read_csv(patches / "manifest.csv", keep_default_na=False)
    slides = pd.read_csv(patches / "slides.csv", keep_default_na=False).set_index("slide")
    assert set(manifest["split"]) == {"train", "validation", "test-in", "test-out"}
    assert slides.loc["CMU-1-Small-Region", "label"] == "tumour"
    assert slides.loc["TCGA-normal", "label"] == "normal"
    assert (manifest.groupby("slide").size() <= 3).all()
    for path in manifest["path"]:
        assert (patches / path).is_file()
    cmu = manifest[manifest["slide"] == "CMU-1-Small-Region"].set_index(["row", "col"])
    # Cell (1, 2) covers level-0 x [1026, 1539), y [513, 1026), inside the tumour rectangle; cell (3, 2)
    # reaches 61 px into it (excluded as partly tumorous), and cell (4, 3) lies below it.
    assert cmu.loc[(1, 2), "label"] == "tumour"
    assert cmu.loc[(1, 2), "tumour_fraction"] == pytest.approx(1.0)
    assert cmu.loc[(3, 2), "label"] == "excluded"
    assert cmu.loc[(4, 3), "label"] == "normal"
    box = cmu.loc[(1, 2), ["x_level0", "y_level0", "width_level0", "height_level0"]].tolist()
    assert box == [1026, 513, 513, 513]


def test_extract_rejects_slide_missing_from_split(workspace: Path, tmp_path: Path):
    (tmp_path / "split.csv").write_text("slide,split\nCMU-1-Small-Region,train\n")
    with pytest.raises(SystemExit, match="no entry in the split file"):
        extract.main(
            [str(workspace / "slides"), "--split", str(tmp_path / "split.csv"), "--output", str(tmp_path)]
        )


@pytest.fixture(scope="module")
def captioned(patches: Path, workspace: Path) -> Path:
    assert caption.main([str(patches), "--bundle", str(workspace / "base-bundle"), "--batch-size", "16"]) == 0
    return patches


def test_caption_writes_keyword_prompts(captioned: Path):
    manifest = pd.read_csv(captioned / "manifest.csv", keep_default_na=False)
    assert (manifest["caption"] != "").all()
    assert all(text.startswith("a histopathological photograph of (") for text in manifest["caption"])
    assert all(text.count(" and ") == 4 for text in manifest["caption"])


@pytest.fixture(scope="module")
def checkpoints(captioned: Path, workspace: Path) -> Path:
    output = workspace / "lora"
    arguments = [str(captioned), "--bundle", str(workspace / "base-bundle"), "--output", str(output)]
    arguments += ["--max-steps", "2", "--checkpoint-every", "1", "--batch-size", "2", "--grad-accum", "1"]
    assert lora.main(arguments) == 0
    return output


def test_train_writes_checkpoints(checkpoints: Path):
    assert sorted(path.name for path in checkpoints.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    log = pd.read_csv(checkpoints / "loss_log.csv")
    assert log["step"].tolist() == [1, 2]
    assert np.isfinite(log["loss"]).all()


@pytest.fixture(scope="module")
def selected(captioned: Path, checkpoints: Path, workspace: Path) -> Path:
    inception = save_random_inception_weights(workspace / "inception.pth")
    output = workspace / "bundle"
    arguments = [
        str(captioned),
        "--bundle",
        str(workspace / "base-bundle"),
        "--checkpoints",
        str(checkpoints),
    ]
    arguments += ["--inception", str(inception), "--inception-size", "75", "--output", str(output)]
    # Start timestep 100 on the demo's 20-step grid is 2 UNet steps: fast, and enough to compare checkpoints.
    arguments += ["--start-timestep", "100"]
    assert select_checkpoint.main(arguments) == 0
    return output


def test_select_keeps_lowest_fid(selected: Path, checkpoints: Path):
    fid = pd.read_csv(selected.parent / "bundle-fid.csv")
    assert fid["checkpoint"].tolist() == ["checkpoint-1", "checkpoint-2"]
    assert np.isfinite(fid["fid"]).all()
    best = fid.loc[fid["fid"].idxmin(), "checkpoint"]
    spec = json.loads((selected / "bundle.json").read_text())
    assert "calibration" not in spec
    assert (selected / spec["lora"]["path"]).read_bytes() == (
        checkpoints / best / lora.LORA_WEIGHTS_NAME
    ).read_bytes()


def test_sweep_reports_each_timestep(captioned: Path, selected: Path, workspace: Path):
    output = workspace / "sweep"
    arguments = [
        str(captioned),
        "--bundle",
        str(selected),
        "--output",
        str(output),
        "--start-timesteps",
        "100",
        "300",
    ]
    assert sweep.main(arguments) == 0
    table = pd.read_csv(output / "sweep.csv")
    assert table["start_timestep"].tolist() == [100, 300]
    assert table["slide_auc_z_99"].between(0, 1).all()
    scores_100 = pd.read_csv(output / "scores_t100.csv")
    scores_300 = pd.read_csv(output / "scores_t300.csv")
    assert not np.allclose(scores_100["lpips"], scores_300["lpips"])


@pytest.fixture(scope="module")
def calibrated(captioned: Path, selected: Path) -> Path:
    assert calibrate.main([str(captioned), "--bundle", str(selected), "--start-timestep", "100"]) == 0
    return selected


def test_calibrate_writes_population_statistics(calibrated: Path, captioned: Path):
    spec = json.loads((calibrated / "bundle.json").read_text())
    scores = pd.read_csv(calibrated / calibrate.CALIBRATION_SCORES_NAME)
    manifest = pd.read_csv(captioned / "manifest.csv", keep_default_na=False)
    validation = manifest[(manifest["split"] == "validation") & (manifest["label"] == "normal")]
    assert sorted(scores["path"]) == sorted(validation["path"])
    assert spec["calibration"]["count"] == len(validation)
    assert spec["settings"]["start_timestep"] == 100
    assert spec["calibration"]["settings"]["start_timestep"] == 100
    for name in ("lpips", "mse_latent"):
        assert spec["calibration"]["scores"][name]["mean"] == pytest.approx(scores[name].mean())
        assert spec["calibration"]["scores"][name]["std"] == pytest.approx(np.std(scores[name], ddof=0))


@pytest.fixture(scope="module")
def report(captioned: Path, calibrated: Path, workspace: Path) -> Path:
    folder = workspace / "report"
    arguments = [str(captioned), "--bundle", str(calibrated), "--report", str(folder), "--bootstrap", "50"]
    assert evaluate.main(arguments) == 0
    return folder


def test_evaluate_writes_report(report: Path, workspace: Path):
    for name in ("results.md", "results.csv", "per_slide.csv", "curves_patch.png", "curves_slide_z99.png"):
        assert (report / name).is_file()
    # The bundle is WORKSPACE/bundle, so the report names it after WORKSPACE.
    label = workspace.name
    assert sorted(path.name for path in (report / "heatmaps").glob("*.png")) == [
        f"{label}_CMU-1-Small-Region.png",
        f"{label}_TCGA-normal.png",
    ]
    assert list(pd.read_csv(report / "results.csv")["Method"]) == [f"{label} (demo)"]
    text = (report / "results.md").read_text()
    assert "meaningless" in text
    assert "| Method | Patch AUC | Patch AUPR | Slide AUC (Z_max) |" in text


def test_evaluate_numbers_match_sklearn(report: Path, captioned: Path, calibrated: Path, workspace: Path):
    from napari_anopilad.method.heatmap import erode_heatmap, heatmap_grid, z_99

    spec = json.loads((calibrated / "bundle.json").read_text())
    mean = spec["calibration"]["scores"]["lpips"]["mean"]
    std = spec["calibration"]["scores"]["lpips"]["std"]
    scores = pd.read_csv(report / "scores" / f"{workspace.name}.csv", keep_default_na=False)
    slides = pd.read_csv(captioned / "slides.csv", keep_default_na=False).set_index("slide")
    scores["z"] = (scores["lpips"] - mean) / std

    # Patch level: tumour patches against the normal patches of normal slides.
    normal_slides = set(slides.index[slides["label"] == "normal"])
    tumour = scores[scores["label"] == "tumour"]
    normal = scores[(scores["label"] == "normal") & scores["slide"].isin(normal_slides)]
    expected_auc = roc_auc_score([1] * len(tumour) + [0] * len(normal), [*tumour["z"], *normal["z"]])
    results = pd.read_csv(report / "results.csv", keep_default_na=False)
    assert float(results.loc[0, "Patch AUC"]) == pytest.approx(expected_auc, abs=5e-4)

    # Slide level: Z_99 of the eroded heatmap, one slide of each class, so the AUC is 0 or 1.
    per_slide = pd.read_csv(report / "per_slide.csv").set_index("slide")
    for slide, patches in scores.groupby("slide"):
        grid = heatmap_grid(
            (slides.loc[slide, "rows"], slides.loc[slide, "cols"]),
            patches["row"],
            patches["col"],
            patches["z"],
        )
        assert per_slide.loc[slide, "z_99"] == pytest.approx(z_99(erode_heatmap(grid)), rel=1e-5)
    tumour_wins = per_slide.loc["CMU-1-Small-Region", "z_99"] > per_slide.loc["TCGA-normal", "z_99"]
    assert results.loc[0, "Slide AUC (Z_99)"].startswith("1.000" if tumour_wins else "0.000")
    assert np.isfinite(per_slide.loc["CMU-1-Small-Region", "dice"])
    assert np.isfinite(per_slide.loc["TCGA-normal", "tnr"])


def test_evaluate_resumes_from_cached_scores(
    report: Path, captioned: Path, calibrated: Path, workspace: Path
):
    cache = report / "scores" / f"{workspace.name}.csv"
    before = cache.read_text()
    arguments = [str(captioned), "--bundle", str(calibrated), "--report", str(report), "--bootstrap", "50"]
    assert evaluate.main(arguments) == 0
    assert cache.read_text() == before
