"""AE and MemAE comparison methods: the memory addressing by hand, tiny training runs on real patches, scoring.

The formulas are checked against numbers computed here with plain Python. The training runs use tiny
networks of the real classes on patches extracted from the real test slides.
"""

from __future__ import annotations

import csv
import json
import math
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from napari_anopilad.method.baselines.autoencoders import (
    AutoencoderConfig,
    ConvAutoencoder,
    MemAE,
    MemoryModule,
    addressing_entropy,
    hard_shrink,
    memory_attention,
    reconstruction_errors,
)
from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.scorers import load_any_bundle, make_scorer, score_names
from napari_anopilad.training import autoencoders_train, calibrate, extract
from napari_anopilad.training.manifest import load_patches, read_manifest, select_rows

SPLIT_CSV = """slide,split,mpp
TCGA-CR-7395-01A-01-TS1,train,0.5
CMU-validation,validation,
"""
TINY = ["--channels", "4,8", "--latent-channels", "4"]
TRAINING = ["--batch-size", "2", "--learning-rate", "0.003", "--seed", "3"]


# The memory module by hand: three items and one query with known cosine similarities.


def test_attention_softmax_of_cosine():
    # Item norms differ, so only the directions count: cosines 0.6, 0.8 and -0.6.
    memory = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-0.5, 0.0]], dtype=torch.float64)
    query = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    exponentials = [math.exp(0.6), math.exp(0.8), math.exp(-0.6)]
    expected = [value / sum(exponentials) for value in exponentials]

    weights = memory_attention(query, memory)

    assert weights.shape == (1, 3)
    assert weights[0].tolist() == pytest.approx(expected, rel=1e-12)


def test_hard_shrink_by_hand():
    weights = [0.5, 0.3, 0.2]
    threshold = 0.25
    # A large epsilon makes the shrinkage visibly different from plain thresholding.
    epsilon = 0.05
    shrunk = [max(w - threshold, 0.0) * w / (abs(w - threshold) + epsilon) for w in weights]
    # 0.5: 0.25 * 0.5 / 0.30; 0.3: 0.05 * 0.3 / 0.10; 0.2 is below the threshold.
    assert shrunk == pytest.approx([0.125 / 0.3, 0.15, 0.0])
    expected = [value / sum(shrunk) for value in shrunk]

    result = hard_shrink(torch.tensor([weights], dtype=torch.float64), threshold, epsilon)

    assert result[0].tolist() == pytest.approx(expected, rel=1e-12)
    assert float(result.sum()) == pytest.approx(1.0)


def test_hard_shrink_all_below_threshold_is_zero():
    result = hard_shrink(torch.tensor([[0.25, 0.25, 0.25, 0.25]]), threshold=0.3)

    assert torch.equal(result, torch.zeros(1, 4))


def test_addressing_entropy_by_hand():
    weights = torch.tensor([[0.45, 0.55, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    expected = [-(0.45 * math.log(0.45) + 0.55 * math.log(0.55)), math.log(3.0)]

    entropy = addressing_entropy(weights)

    assert entropy.tolist() == pytest.approx(expected, rel=1e-12)


def test_memory_read_per_position_by_hand():
    items = [[2.0, 0.0], [0.0, 3.0], [-0.5, 0.0]]
    threshold = 1 / 3
    module = MemoryModule(memory_items=3, item_channels=2, shrink_threshold=threshold).double()
    with torch.no_grad():
        module.items.copy_(torch.tensor(items, dtype=torch.float64))
    # Two positions of a 1 x 2 feature map: the query (3, 4) and the query (0, -1).
    features = torch.tensor([[[[3.0, 0.0]], [[4.0, -1.0]]]], dtype=torch.float64)
    queries = [(3.0, 4.0), (0.0, -1.0)]

    read, weights = module(features)

    assert read.shape == (1, 2, 1, 2)
    assert weights.shape == (1, 1, 2, 3)
    for position, (x, y) in enumerate(queries):
        norm = math.hypot(x, y)
        cosines = [(x * mx + y * my) / (norm * math.hypot(mx, my)) for mx, my in items]
        exponentials = [math.exp(value) for value in cosines]
        attention = [value / sum(exponentials) for value in exponentials]
        shrunk = [max(w - threshold, 0.0) * w / (abs(w - threshold) + 1e-12) for w in attention]
        expected = [value / sum(shrunk) for value in shrunk]
        expected_read = [sum(w * item[axis] for w, item in zip(expected, items)) for axis in range(2)]
        assert weights[0, 0, position].tolist() == pytest.approx(expected, rel=1e-9)
        assert read[0, :, 0, position].tolist() == pytest.approx(expected_read, rel=1e-9)
    # The second query is closest to no item (cosines 0, -1 and 0): two items share the weight.
    assert weights[0, 0, 1].tolist() == pytest.approx([0.5, 0.0, 0.5])


def test_reconstruction_errors_by_hand():
    pixels = torch.zeros(2, 3, 2, 2)
    reconstructions = torch.zeros(2, 3, 2, 2)
    reconstructions[0, 0, 0, 0] = 0.5
    reconstructions[0, 2, 1, 1] = -1.0
    reconstructions[1] = 0.25

    errors = reconstruction_errors(pixels, reconstructions)

    # Twelve values per input: (0.25 + 1) / 12 and 12 * 0.0625 / 12.
    assert errors["mse"].tolist() == pytest.approx([1.25 / 12, 0.0625])
    assert errors["l1"].tolist() == pytest.approx([1.5 / 12, 0.25])


def test_config_rejects_stage_count_that_does_not_divide():
    with pytest.raises(ValueError, match="do not divide a 256 px patch"):
        AutoencoderConfig(channels=(4,) * 9)


# Training, bundles and scoring on real patches.


@pytest.fixture(scope="module")
def patches(tmp_path_factory, data_dir: Path) -> Path:
    """A small extraction: normal training patches from the TCGA slide, validation patches from CMU."""
    root = tmp_path_factory.mktemp("autoencoder-patches")
    slides = root / "slides"
    slides.mkdir()
    shutil.copyfile(
        data_dir / "slides" / "TCGA-CR-7395-01A-01-TS1.svs", slides / "TCGA-CR-7395-01A-01-TS1.svs"
    )
    shutil.copyfile(data_dir / "slides" / "CMU-1-Small-Region.svs", slides / "CMU-validation.svs")
    (root / "split.csv").write_text(SPLIT_CSV)
    output = root / "patches"
    arguments = [
        str(slides),
        "--split",
        str(root / "split.csv"),
        "--output",
        str(output),
        "--target-mpp",
        "1.0",
        "--max-patches-per-slide",
        "4",
    ]
    assert extract.main(arguments) == 0
    return output


def train(method: str, patches: Path, output: Path, steps: int, *extra: str) -> Path:
    extra_options = list(extra)
    if method == "memae" and "--memory-items" not in extra_options:
        extra_options += ["--memory-items", "6"]
    argv = [str(patches), "--output", str(output), "--steps", str(steps), *TINY, *TRAINING, *extra_options]
    assert autoencoders_train.main(argv, method=method) == 0
    return output / "bundle"


def read_losses(output: Path) -> list[float]:
    with open(output / "loss_log.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


@pytest.fixture(scope="module", params=["ae", "memae"])
def trained(request, patches: Path, tmp_path_factory) -> tuple[str, Path]:
    """An uninterrupted 8-step run of each method; returns the method and the run folder."""
    method = request.param
    output = tmp_path_factory.mktemp(f"{method}-run")
    train(method, patches, output, 8)
    return method, output


def test_training_lowers_loss(trained: tuple[str, Path]):
    _method, output = trained
    losses = read_losses(output)

    assert len(losses) == 8
    assert all(math.isfinite(value) for value in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_training_lowers_error_on_all_patches(trained: tuple[str, Path], patches: Path):
    # The logged losses are of different random batches; this compares the same patches before and after.
    method, output = trained
    images = real_patches(patches, "train")
    bundle = load_any_bundle(output / "bundle")
    initial = autoencoders_train.AutoencoderTrainer(
        method, AutoencoderConfig.from_dict(bundle.model, method, "bundle.json"), learning_rate=0.003, seed=3
    ).network.eval()
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        reconstructed = initial(pixels)
    if method == "memae":
        reconstructed = reconstructed[0]
    initial_mse = reconstruction_errors(pixels, reconstructed)["mse"]

    trained_mse = make_scorer(bundle, "cpu").score(images).values("mse")

    assert float(trained_mse.mean()) < float(initial_mse.mean())


def test_memae_log_has_entropy(trained: tuple[str, Path]):
    method, output = trained
    with open(output / "loss_log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if method == "ae":
        assert set(rows[0]) == {"step", "loss", "mse"}
        return
    assert set(rows[0]) == {"step", "loss", "mse", "entropy"}
    for row in rows:
        # The entropy of weights over 6 items lies in [0, log 6]; the loss adds 0.0002 of it.
        assert 0.0 <= float(row["entropy"]) <= math.log(6) + 1e-6
        expected = float(row["mse"]) + 0.0002 * float(row["entropy"])
        assert float(row["loss"]) == pytest.approx(expected, rel=1e-5)


def test_resume_matches_uninterrupted_run(trained: tuple[str, Path], patches: Path, tmp_path: Path):
    method, output = trained
    train(method, patches, tmp_path, 4, "--checkpoint-every", "2")
    train(method, patches, tmp_path, 8, "--checkpoint-every", "2")

    resumed = load_file(str(tmp_path / "bundle" / "model.safetensors"))
    uninterrupted = load_file(str(output / "bundle" / "model.safetensors"))

    assert sorted(resumed) == sorted(uninterrupted)
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-6, atol=1e-7, msg=name)
    assert read_losses(tmp_path) == pytest.approx(read_losses(output), rel=1e-5)


def test_bundle_records_architecture(trained: tuple[str, Path]):
    method, output = trained
    spec = json.loads((output / "bundle" / "bundle.json").read_text())

    assert spec["method"] == method
    assert spec["settings"] == {"method": method, "score": "mse", "seed": 0, "options": {}}
    assert spec["model"]["channels"] == [4, 8]
    assert spec["model"]["latent_channels"] == 4
    if method == "memae":
        assert spec["model"]["memory_items"] == 6
        assert spec["model"]["shrink_threshold"] == pytest.approx(1 / 6)
        assert spec["training"]["entropy_weight"] == pytest.approx(0.0002)
    else:
        assert "memory_items" not in spec["model"]
        assert "entropy_weight" not in spec["training"]


def real_patches(patches: Path, split: str) -> np.ndarray:
    rows = select_rows(read_manifest(patches), splits=[split], labels=["normal"])
    return load_patches(patches, rows["path"])


def test_scorer_scores_real_patches(trained: tuple[str, Path], patches: Path):
    _method, output = trained
    bundle = load_any_bundle(output / "bundle")
    scorer = make_scorer(bundle, "cpu")
    images = real_patches(patches, "validation")[:4]
    assert images.shape == (4, 256, 256, 3)
    keys = [("slide", index, 0) for index in range(4)]

    together = scorer.score(images, keys, return_reconstructions=True)
    alone = [scorer.score(images[index : index + 1], keys[index : index + 1]) for index in range(4)]

    assert score_names(bundle) == ("mse", "l1")
    assert together.reconstructions is not None
    assert together.reconstructions.shape == images.shape
    assert together.reconstructions.dtype == np.uint8
    for name in ("mse", "l1"):
        values = together.values(name)
        assert values.shape == (4,)
        assert np.isfinite(values).all()
        assert (values > 0).all()
        single = np.concatenate([result.values(name) for result in alone])
        np.testing.assert_allclose(single, values, rtol=1e-5)


def test_scores_match_numpy_reconstruction_error(trained: tuple[str, Path], patches: Path):
    method, output = trained
    scorer = make_scorer(load_any_bundle(output / "bundle"), "cpu")
    images = real_patches(patches, "validation")[:2]
    pixels = images.astype(np.float64) / 127.5 - 1.0
    with torch.no_grad():
        network_input = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
        output_pixels = scorer.network(network_input)
        if method == "memae":
            output_pixels = output_pixels[0]
    reconstruction = output_pixels.permute(0, 2, 3, 1).double().numpy()

    scores = scorer.score(images)

    expected_mse = ((reconstruction - pixels) ** 2).mean(axis=(1, 2, 3))
    expected_l1 = np.abs(reconstruction - pixels).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(scores.values("mse"), expected_mse, rtol=1e-5)
    np.testing.assert_allclose(scores.values("l1"), expected_l1, rtol=1e-5)


def test_network_classes_match_method(trained: tuple[str, Path]):
    method, output = trained
    scorer = make_scorer(load_any_bundle(output / "bundle"), "cpu")

    assert isinstance(scorer.network, MemAE if method == "memae" else ConvAutoencoder)
    assert not scorer.network.training


def test_calibration_is_used_after_reload(trained: tuple[str, Path], patches: Path, tmp_path: Path):
    _method, output = trained
    bundle_folder = tmp_path / "bundle"
    shutil.copytree(output / "bundle", bundle_folder)

    assert calibrate.main([str(patches), "--bundle", str(bundle_folder), "--batch-size", "2"]) == 0

    bundle = load_any_bundle(bundle_folder, require_calibration=True)
    scorer = make_scorer(bundle, "cpu")
    validation = real_patches(patches, "validation")
    reference = make_scorer(load_any_bundle(output / "bundle"), "cpu").score(validation)
    assert bundle.calibration is not None
    assert bundle.calibration.count == len(validation)
    for name in ("mse", "l1"):
        values = reference.values(name)
        assert bundle.calibration.mean[name] == pytest.approx(float(np.mean(values)), rel=1e-5)
        assert bundle.calibration.std[name] == pytest.approx(float(np.std(values, ddof=0)), rel=1e-4)
    z = scorer.z_scores(reference.values("mse"))
    assert z.source == "calibration"
    expected = (reference.values("mse") - bundle.calibration.mean["mse"]) / bundle.calibration.std["mse"]
    np.testing.assert_allclose(z.values, expected, rtol=1e-6)


# Clear errors.


def test_missing_weight_file_names_file(trained: tuple[str, Path], tmp_path: Path):
    _method, output = trained
    shutil.copytree(output / "bundle", tmp_path / "bundle")
    (tmp_path / "bundle" / "model.safetensors").unlink()

    with pytest.raises(BundleError, match=r"model\.safetensors \(model\) not found; retrain"):
        load_any_bundle(tmp_path / "bundle")


def test_wrong_architecture_names_file(trained: tuple[str, Path], tmp_path: Path):
    _method, output = trained
    folder = tmp_path / "bundle"
    shutil.copytree(output / "bundle", folder)
    spec = json.loads((folder / "bundle.json").read_text())
    spec["model"]["channels"] = [4, 16]
    (folder / "bundle.json").write_text(json.dumps(spec))
    bundle = load_any_bundle(folder)

    with pytest.raises(
        BundleError, match=r"model\.safetensors does not match the architecture in .*bundle\.json"
    ):
        make_scorer(bundle, "cpu")


def test_memory_entries_checked_per_method(trained: tuple[str, Path], tmp_path: Path):
    method, output = trained
    folder = tmp_path / "bundle"
    shutil.copytree(output / "bundle", folder)
    spec = json.loads((folder / "bundle.json").read_text())
    if method == "ae":
        spec["model"]["memory_items"] = 6
        message = "an AE has no memory"
    else:
        del spec["model"]["memory_items"]
        message = "needs 'memory_items'"
    (folder / "bundle.json").write_text(json.dumps(spec))

    with pytest.raises(BundleError, match=message):
        make_scorer(load_any_bundle(folder), "cpu")


def test_training_rejects_crops(patches: Path, tmp_path: Path):
    with pytest.raises(SystemExit, match="--crop-size 64 is invalid for ae"):
        train("ae", patches, tmp_path, 2, "--crop-size", "64")


def test_resume_rejects_other_memory_size(patches: Path, tmp_path: Path):
    train("memae", patches, tmp_path, 1)

    with pytest.raises(SystemExit) as exit_info:
        train("memae", patches, tmp_path, 2, "--memory-items", "8", "--latent-channels", "6")

    message = str(exit_info.value)
    assert "model.memory_items was 6, now 8" in message
    assert "model.latent_channels was 4, now 6" in message
    assert "model.channels" not in message
    assert "entropy_weight" not in message


def test_resume_rejects_other_batch_size(patches: Path, tmp_path: Path):
    train("ae", patches, tmp_path, 1)

    with pytest.raises(SystemExit, match="batch_size was 2, now 3"):
        train("ae", patches, tmp_path, 2, "--batch-size", "3")


def test_training_rejects_invalid_channels(patches: Path, tmp_path: Path):
    with pytest.raises(SystemExit, match="--channels '4,x' is invalid"):
        autoencoders_train.main([str(patches), "--output", str(tmp_path), "--channels", "4,x"], method="ae")


@pytest.mark.parametrize(("script", "memory_option"), [("train_ae.py", False), ("train_memae.py", True)])
def test_training_scripts_parse_options(script, memory_option, monkeypatch, capsys):
    path = Path(__file__).parent.parent / "training" / script
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])

    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(path), run_name="__main__")

    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--latent-channels" in help_text
    assert ("--memory-items" in help_text) == memory_option
    assert ("--entropy-weight" in help_text) == memory_option
