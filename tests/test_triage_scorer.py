"""Triage end to end: build the reference from the real test patches with the demo bundle, then score.

The demo bundle's CONCH has random weights, so the values mean nothing. The tests check that the builder and
the scorer compute the same quantities, that these match independent computations, and that a reference
from another CONCH is rejected.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import mahalanobis

from napari_anopilad.method.bundle import load_bundle
from napari_anopilad.method.triage import TriageReferenceError, TriageScorer, read_triage_reference
from napari_anopilad.training.triage_reference import main

PCAM_LABELS = {"0": "normal", "1": "tumour", "-1": "excluded"}
CAMELYON_LABELS = {"non_cancer": "normal", "cancer": "tumour", "background": "excluded"}


def read_rgb_256(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((256, 256), Image.Resampling.BICUBIC))


def write_manifest(data_dir: Path, folder: Path) -> dict[str, list[Path]]:
    """Write a manifest of the real patches: PCam tiles are the training split, Camelyon17 tiles validation."""
    rows = []
    with (data_dir / "patches" / "pcam" / "labels.csv").open(newline="") as handle:
        for record in csv.reader(handle):
            if record[0] == "file":
                continue
            rows.append(
                {"path": f"pcam/{record[0]}", "label": PCAM_LABELS[record[-1].strip()], "split": "train"}
            )
    with (data_dir / "patches" / "camelyon17" / "labels.csv").open(newline="") as handle:
        for record in csv.DictReader(handle):
            label = CAMELYON_LABELS.get(record["label_from_notebook"])
            if label is not None:
                rows.append({"path": f"camelyon17/{record['file']}", "label": label, "split": "validation"})
    # A normal patch of another split, which the builder must leave out.
    rows.append(
        {"path": "camelyon17/tile_noncancer_x12297_y88478_L0.png", "label": "normal", "split": "test-in"}
    )

    folder.mkdir(parents=True, exist_ok=True)
    for source in ("pcam", "camelyon17"):
        shutil.copytree(data_dir / "patches" / source, folder / source, dirs_exist_ok=True)
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)

    selected: dict[str, list[Path]] = {}
    for row in rows:
        if row["label"] == "normal" and row["split"] in ("train", "validation"):
            selected.setdefault(row["split"], []).append(folder / row["path"])
    return selected


@pytest.fixture(scope="module")
def built(demo_bundle_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("triage")
    bundle_dir = folder / "bundle"
    shutil.copytree(demo_bundle_dir, bundle_dir)
    selected = write_manifest(data_dir, folder / "patches")
    status = main(
        [
            "--bundle",
            str(bundle_dir),
            "--manifest",
            str(folder / "patches" / "manifest.csv"),
            "--bank-size",
            "12",
            "--device",
            "cpu",
            "--batch-size",
            "16",
        ]
    )
    assert status == 0
    return bundle_dir, selected


def test_builder_writes_reference(built) -> None:
    bundle_dir, selected = built
    sidecar = json.loads((bundle_dir / "triage" / "reference.json").read_text())
    bundle = load_bundle(bundle_dir)

    assert (bundle_dir / "triage" / "reference.safetensors").is_file()
    assert len(selected["train"]) == 31
    assert len(selected["validation"]) == 3
    assert sidecar["memory_bank"]["train_count"] == 31
    assert sidecar["memory_bank"]["size"] == 12
    assert sidecar["memory_bank"]["method"] == "coreset"
    assert sidecar["calibration"]["keyword_distance"]["count"] == 3
    assert sidecar["conch_hash"] == bundle.part_hashes["conch"]
    assert sidecar["demo"] is True
    assert sidecar["k"] == 1


def test_scorer_matches_calibration(built) -> None:
    bundle_dir, selected = built
    bundle = load_bundle(bundle_dir)
    validation = np.stack([read_rgb_256(path) for path in selected["validation"]])

    for k in (1, 3):
        scores = TriageScorer(bundle, k=k, batch_size=2).score(validation)
        # The calibration is the mean and population std of these same patches, so z has mean 0 and std 1.
        # The embeddings are float32 and the reference was built in other batches, so they agree to ~1e-5.
        np.testing.assert_allclose(scores.knn_z.mean(), 0.0, atol=1e-4)
        np.testing.assert_allclose(scores.knn_z.std(), 1.0, atol=1e-4)
        np.testing.assert_allclose(scores.keyword_z.mean(), 0.0, atol=1e-4)
        np.testing.assert_allclose(scores.keyword_z.std(), 1.0, atol=1e-4)
        assert scores.k == k
        assert scores.demo is True


def test_scorer_matches_brute_force(built) -> None:
    from napari_anopilad.method.conch_model import encode_images

    bundle_dir, selected = built
    bundle = load_bundle(bundle_dir)
    reference = read_triage_reference(bundle_dir)
    images = np.stack([read_rgb_256(path) for path in selected["train"][:6] + selected["validation"]])
    scorer = TriageScorer(bundle, k=3)

    scores = scorer.score(images)

    embeddings = encode_images(bundle.load_conch(), images).double().numpy()
    bank = reference.memory_bank.double().numpy()
    keyword_embeddings = scorer.keyword_embeddings.double().numpy()
    for index, embedding in enumerate(embeddings):
        distances = sorted(1.0 - float(np.dot(embedding, row)) for row in bank)
        assert scores.knn_distance[index] == pytest.approx(sum(distances[:3]) / 3, abs=1e-5)

        similarities = [float(np.dot(embedding, keyword)) for keyword in keyword_embeddings]
        np.testing.assert_allclose(scores.keyword_similarities[index], similarities, atol=1e-5)
        statistics = reference.keyword_statistics
        expected = mahalanobis(scores.keyword_similarities[index], statistics.centroid, statistics.precision)
        assert scores.keyword_distance[index] == pytest.approx(expected, rel=1e-9)

    knn_statistics = reference.knn_calibration[3]
    np.testing.assert_allclose(scores.knn_z, (scores.knn_distance - knn_statistics.mean) / knn_statistics.std)


def test_training_patches_within_covering_radius(built) -> None:
    bundle_dir, selected = built
    reference = read_triage_reference(bundle_dir)
    images = np.stack([read_rgb_256(path) for path in selected["train"]])

    scores = TriageScorer(load_bundle(bundle_dir), k=1).score(images)

    # Every training patch is within the covering radius of the bank, and the farthest one is at it.
    assert scores.knn_distance.max() == pytest.approx(reference.covering_radius, abs=1e-5)
    assert np.sum(scores.knn_distance < 1e-5) >= len(reference.memory_bank)


def test_scorer_rejects_other_conch(built, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from napari_anopilad.method.conch_model import build_conch

    bundle_dir, _ = built
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    original = load_bundle(copy)
    torch.manual_seed(1)
    model = build_conch(original.conch_config)
    state_dict = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(state_dict, str(original.conch_checkpoint))

    with pytest.raises(TriageReferenceError, match="built with CONCH weights"):
        TriageScorer(load_bundle(copy))


def test_scorer_rejects_invalid_input(built) -> None:
    bundle_dir, _ = built
    scorer = TriageScorer(load_bundle(bundle_dir))

    with pytest.raises(ValueError, match="uint8 RGB"):
        scorer.score(np.zeros((2, 256, 256, 3), dtype=np.float32))
    with pytest.raises(TriageReferenceError, match="no kNN calibration for k = 4"):
        TriageScorer(load_bundle(bundle_dir), k=4)
    empty = scorer.score(np.zeros((0, 256, 256, 3), dtype=np.uint8))
    assert len(empty) == 0


def test_builder_from_folder_with_kmeans(built, data_dir: Path, tmp_path: Path) -> None:
    bundle_dir, selected = built
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    shutil.rmtree(copy / "triage")
    normal = tmp_path / "normal"
    normal.mkdir()
    for path in selected["train"] + selected["validation"]:
        shutil.copy(path, normal / path.name)

    status = main(
        [
            "--bundle",
            str(copy),
            "--patches",
            str(normal),
            "--bank-method",
            "kmeans",
            "--bank-size",
            "5",
            "--k",
            "3",
            "--device",
            "cpu",
        ]
    )

    sidecar = json.loads((copy / "triage" / "reference.json").read_text())
    assert status == 0
    assert sidecar["memory_bank"]["method"] == "kmeans"
    assert sidecar["memory_bank"]["size"] == 5
    assert sidecar["k"] == 3
    # 20 % of 34 files, rounded, held out for calibration.
    assert sidecar["sources"]["validation_count"] == 7
    assert sidecar["sources"]["train_count"] == 27


def test_builder_help_and_errors(
    tmp_path: Path, demo_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--bank-method" in capsys.readouterr().out

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,label\na.png,normal\n")
    with pytest.raises(SystemExit, match=r"lacks the columns \['path', 'split'\]"):
        main(["--bundle", str(demo_bundle_dir), "--manifest", str(manifest)])

    manifest.write_text(
        "path,label,split\nmissing-1.png,normal,train\nmissing-2.png,normal,train\n"
        "missing-3.png,normal,validation\nmissing-4.png,normal,validation\n"
    )
    with pytest.raises(SystemExit, match=r"lists 4 patches that are not found, e\.g\. \[.*missing-1\.png"):
        main(["--bundle", str(demo_bundle_dir), "--manifest", str(manifest), "--device", "cpu"])
