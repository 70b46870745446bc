"""f-AnoGAN: the izi_f score and the gradient penalty against hand computations, the two-stage training
on real slide patches, resuming, the bundle, scoring through the shared entry points, and calibration.

The networks are the real classes at a tiny width (4 channels, an 8-dimensional latent), so the numbers
mean nothing; the tests check what the code computes and that it matches independent computations.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from napari_anopilad.method.baselines.base import to_crops
from napari_anopilad.method.baselines.fanogan import (
    Discriminator,
    FAnoGANConfig,
    FAnoGANScorer,
    gradient_penalty,
    izif_residuals,
)
from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.scorers import load_any_bundle, make_scorer, score_names
from napari_anopilad.training import calibrate, extract, fanogan_train
from napari_anopilad.training.baselines import training_batch
from napari_anopilad.training.fanogan_train import FAnoGANTrainer, FAnoGANTrainingOptions
from napari_anopilad.training.manifest import load_patches, read_manifest, select_rows

SPLIT_CSV = """slide,split,mpp
TCGA-CR-7395-01A-01-TS1,train,0.5
CMU-1-Small-Region,validation,
"""
TINY = {"latent_dim": 8, "channels": 4}
GAN_STEPS = 2
ENCODER_STEPS = 2


def tiny_arguments(patches: Path, output: Path, steps: int) -> list[str]:
    return [
        str(patches),
        "--output",
        str(output),
        "--steps",
        str(steps),
        "--gan-steps",
        str(GAN_STEPS),
        "--n-critic",
        "2",
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--encoder-learning-rate",
        "2e-3",
        "--latent-dim",
        str(TINY["latent_dim"]),
        "--channels",
        str(TINY["channels"]),
        "--checkpoint-every",
        "3",
    ]


@pytest.fixture(scope="module")
def patches(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """Normal training patches of the TCGA slide and validation patches of the CMU slide."""
    root = tmp_path_factory.mktemp("fanogan-patches")
    (root / "split.csv").write_text(SPLIT_CSV)
    output = root / "patches"
    arguments = [str(data_dir / "slides"), "--split", str(root / "split.csv"), "--output", str(output)]
    arguments += ["--target-mpp", "1.0", "--max-patches-per-slide", "8"]
    assert extract.main(arguments) == 0
    return output


@pytest.fixture(scope="module")
def run(patches: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted tiny run of both stages."""
    output = tmp_path_factory.mktemp("fanogan-run") / "run"
    assert fanogan_train.main(tiny_arguments(patches, output, GAN_STEPS + ENCODER_STEPS)) == 0
    return output


@pytest.fixture(scope="module")
def validation_images(patches: Path) -> np.ndarray:
    rows = select_rows(read_manifest(patches), splits=["validation"], labels=["normal"])
    return load_patches(patches, rows["path"])


def numpy_residuals(
    images: np.ndarray, reconstructions: np.ndarray, features: np.ndarray, reconstruction_features: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample means of the squared image and feature differences, in float64."""
    n = images.shape[0]
    image = ((images.astype(np.float64) - reconstructions) ** 2).reshape(n, -1).mean(axis=1)
    feature = ((features.astype(np.float64) - reconstruction_features) ** 2).reshape(n, -1).mean(axis=1)
    return image, feature


def test_izif_residuals_hand_computed():
    images = torch.tensor([[[[0.0, 1.0], [-1.0, 0.5]]], [[[0.2, 0.2], [0.2, 0.2]]]])
    reconstructions = torch.tensor([[[[0.0, 0.0], [0.0, 0.5]]], [[[0.0, 0.4], [0.2, -0.2]]]])
    features = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    reconstruction_features = torch.tensor([[1.0, 0.0, 0.0], [0.3, -0.3, 0.6]])

    scores = izif_residuals(images, reconstructions, features, reconstruction_features, kappa=0.5)

    # Sample 0: pixel differences 0, 1, -1, 0 give (0 + 1 + 1 + 0) / 4 = 0.5; feature differences
    # 0, 2, 3 give (0 + 4 + 9) / 3 = 13 / 3. Sample 1: 0.2, -0.2, 0, 0.4 give (0.04 + 0.04 + 0 + 0.16) / 4
    # = 0.06; features 0.3, 0.3, 0.6 give (0.09 + 0.09 + 0.36) / 3 = 0.18.
    np.testing.assert_allclose(scores["image_residual"].numpy(), [0.5, 0.06], rtol=1e-6)
    np.testing.assert_allclose(scores["feature_residual"].numpy(), [13 / 3, 0.18], rtol=1e-6)
    np.testing.assert_allclose(scores["izif"].numpy(), [0.5 + 0.5 * 13 / 3, 0.06 + 0.5 * 0.18], rtol=1e-6)


def test_gradient_penalty_linear_critic():
    # A linear critic D(x) = <w, x> + b has the gradient w at every input, so the penalty is
    # (||w|| - 1)^2 whatever the interpolation weights, and its gradient in w is 2 (||w|| - 1) w / ||w||.
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1), torch.nn.Flatten(0))
    w = np.arange(1, 13, dtype=np.float64).reshape(1, 12) / 20.0
    with torch.no_grad():
        critic[1].weight.copy_(torch.from_numpy(w))
        critic[1].bias.fill_(0.3)
    real = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    fake = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    epsilon = torch.tensor([0.0, 0.25, 1.0])

    penalty = gradient_penalty(critic, real, fake, epsilon)
    penalty.backward()

    norm = float(np.sqrt((w**2).sum()))
    assert float(penalty.detach()) == pytest.approx((norm - 1.0) ** 2, rel=1e-6)
    expected_gradient = 2.0 * (norm - 1.0) * w / norm
    np.testing.assert_allclose(critic[1].weight.grad.numpy(), expected_gradient, rtol=1e-5)


def test_gradient_penalty_rejects_mismatched_shapes():
    critic = Discriminator(FAnoGANConfig(**TINY))
    with pytest.raises(ValueError, match="differ in shape"):
        gradient_penalty(critic, torch.zeros(2, 3, 64, 64), torch.zeros(3, 3, 64, 64), torch.zeros(2))
    with pytest.raises(ValueError, match="one weight per sample"):
        gradient_penalty(critic, torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 64, 64), torch.zeros(3))


def test_encoder_stage_trains_only_the_encoder(patches: Path):
    trainer = FAnoGANTrainer(
        FAnoGANConfig(**TINY),
        FAnoGANTrainingOptions(gan_steps=1, n_critic=1, encoder_learning_rate=1e-3),
        learning_rate=1e-3,
    )
    generator = torch.Generator().manual_seed(0)
    rows = select_rows(read_manifest(patches), splits=["train"], labels=["normal"])
    # One fixed batch of real crops, so the loss values of successive steps are comparable.
    pixels = training_batch(load_patches(patches, rows["path"]), 0, 4, 64, 0)
    for module in trainer.modules().values():
        module.train()
    gan_losses = trainer.training_step(pixels, 0, generator)
    assert np.isfinite(gan_losses["generator_loss"])
    frozen = {
        name: {key: value.clone() for key, value in trainer.modules()[name].state_dict().items()}
        for name in ("generator", "discriminator")
    }
    encoder_before = {key: value.clone() for key, value in trainer.encoder.state_dict().items()}

    encoder_losses = []
    for step in (1, 2, 3):
        # The shared trainer puts every network in training mode before each step.
        for module in trainer.modules().values():
            module.train()
        losses = trainer.training_step(pixels, step, generator)
        assert np.isnan(losses["critic_loss"])
        encoder_losses.append(losses["encoder_loss"])

    assert np.isfinite(encoder_losses).all()
    assert encoder_losses[-1] < encoder_losses[0]

    for name, before in frozen.items():
        after = trainer.modules()[name].state_dict()
        for key, value in before.items():
            assert torch.equal(after[key], value), f"{name}.{key} changed in the encoder stage"
    changed = [
        key
        for key, value in encoder_before.items()
        if not torch.equal(trainer.encoder.state_dict()[key], value)
    ]
    assert changed, "the encoder stage did not update the encoder"


def test_training_logs_both_stages(run: Path):
    log = pd.read_csv(run / "loss_log.csv")
    assert log["step"].tolist() == list(range(GAN_STEPS + ENCODER_STEPS))
    gan = log[log["step"] < GAN_STEPS]
    encoder = log[log["step"] >= GAN_STEPS]
    assert np.isfinite(gan["critic_loss"]).all()
    assert np.isfinite(gan["gradient_penalty"]).all()
    # With --n-critic 2 the generator is updated after the second critic step.
    assert np.isfinite(gan["generator_loss"]).tolist() == [False, True]
    assert gan["encoder_loss"].isna().all()
    assert encoder["critic_loss"].isna().all()
    np.testing.assert_allclose(
        encoder["encoder_loss"], encoder["image_residual"] + 1.0 * encoder["feature_residual"], rtol=1e-4
    )


def test_bundle_records_parts_and_options(run: Path):
    spec = json.loads((run / "bundle" / "bundle.json").read_text())
    assert spec["method"] == "f-anogan"
    assert spec["model"] == {**TINY, "image_size": 64}
    assert sorted(spec["weights"]) == ["discriminator", "encoder", "generator"]
    assert spec["settings"]["score"] == "izif"
    assert spec["settings"]["options"] == {"kappa": 1.0}
    assert spec["training"]["gan_steps"] == GAN_STEPS
    assert spec["training"]["encoder_steps"] == ENCODER_STEPS
    assert spec["training"]["n_critic"] == 2


def test_resume_matches_uninterrupted_run(run: Path, patches: Path, tmp_path: Path):
    output = tmp_path / "resumed"
    assert fanogan_train.main(tiny_arguments(patches, output, GAN_STEPS + 1)) == 0
    assert fanogan_train.main(tiny_arguments(patches, output, GAN_STEPS + ENCODER_STEPS)) == 0

    for part in ("generator", "discriminator", "encoder"):
        expected = load_file(str(run / "bundle" / f"{part}.safetensors"))
        resumed = load_file(str(output / "bundle" / f"{part}.safetensors"))
        assert expected.keys() == resumed.keys()
        for key, value in expected.items():
            assert torch.equal(resumed[key], value), f"{part}.{key} differs after resuming"
    log = pd.read_csv(output / "loss_log.csv")
    assert log["step"].tolist() == list(range(GAN_STEPS + ENCODER_STEPS))


def test_resume_rejects_other_options(run: Path, patches: Path, tmp_path: Path):
    output = tmp_path / "copy"
    shutil.copytree(run, output)
    arguments = tiny_arguments(patches, output, GAN_STEPS + ENCODER_STEPS + 2)
    arguments[arguments.index("--n-critic") + 1] = "3"
    arguments[arguments.index("--latent-dim") + 1] = "16"
    with pytest.raises(SystemExit) as exit_info:
        fanogan_train.main(arguments)

    message = str(exit_info.value)
    assert "model.latent_dim was 8, now 16" in message
    assert "n_critic was 2, now 3" in message
    assert "model.channels" not in message


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--encoder-steps", "5"], "is not --gan-steps 2 plus --encoder-steps 5"),
        (["--gan-steps", "4"], "the encoder stage has 0 steps"),
        (["--crop-size", "32"], "trains on 64 px crops"),
        (["--kappa", "-1"], "kappa"),
    ],
)
def test_main_rejects_invalid_options(patches: Path, tmp_path: Path, extra: list[str], message: str):
    with pytest.raises(SystemExit, match=message):
        fanogan_train.main(tiny_arguments(patches, tmp_path / "run", GAN_STEPS + ENCODER_STEPS) + extra)


def test_scorer_matches_numpy_formula(run: Path, validation_images: np.ndarray):
    bundle = load_any_bundle(run / "bundle")
    scorer = make_scorer(bundle, "cpu", bundle.settings.with_overrides(kappa=2.5))
    assert isinstance(scorer, FAnoGANScorer)
    images = validation_images[:2]

    result = scorer.score(images, return_reconstructions=True)

    # Independent reference: run the three networks on the 16 crops of each patch, then form the
    # residual means with numpy and average each patch's crops.
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    crops, per_patch = to_crops(pixels, 64)
    with torch.no_grad():
        reconstructions = scorer.generator(scorer.encoder(crops))
        features = scorer.discriminator.features(crops)
        reconstruction_features = scorer.discriminator.features(reconstructions)
    image, feature = numpy_residuals(
        crops.numpy(), reconstructions.numpy(), features.numpy(), reconstruction_features.numpy()
    )
    image = image.reshape(len(images), per_patch).mean(axis=1)
    feature = feature.reshape(len(images), per_patch).mean(axis=1)
    np.testing.assert_allclose(result.values("image_residual"), image, rtol=1e-5)
    np.testing.assert_allclose(result.values("feature_residual"), feature, rtol=1e-5)
    np.testing.assert_allclose(result.values("izif"), image + 2.5 * feature, rtol=1e-5)
    assert result.reconstructions is not None
    assert result.reconstructions.shape == images.shape
    assert result.reconstructions.dtype == np.uint8


def test_scores_are_finite_and_batch_independent(run: Path, validation_images: np.ndarray):
    bundle = load_any_bundle(run / "bundle")
    assert score_names(bundle) == ("izif", "image_residual", "feature_residual")
    scorer = make_scorer(bundle, "cpu")
    images = validation_images[:4]
    keys = [("slide", index, 0) for index in range(4)]

    together = scorer.score(images, keys)
    alone = [scorer.score(images[index : index + 1], keys[index : index + 1]) for index in range(4)]

    for name in scorer.score_names:
        values = together.values(name)
        assert np.isfinite(values).all()
        assert (values > 0).all()
        single = np.concatenate([result.values(name) for result in alone])
        np.testing.assert_allclose(single, values, rtol=1e-5)


def test_calibration_is_used_after_reload(
    run: Path, patches: Path, tmp_path: Path, validation_images: np.ndarray
):
    folder = tmp_path / "bundle"
    shutil.copytree(run / "bundle", folder)

    assert calibrate.main([str(patches), "--bundle", str(folder), "--batch-size", "4"]) == 0

    bundle = load_any_bundle(folder, require_calibration=True)
    scorer = make_scorer(bundle, "cpu")
    assert scorer.calibration is not None
    assert scorer.calibration.count == len(validation_images)
    values = scorer.score(validation_images).values("izif")
    assert scorer.calibration.mean["izif"] == pytest.approx(float(np.mean(values)), rel=1e-5)
    assert scorer.calibration.std["izif"] == pytest.approx(float(np.std(values)), rel=1e-4)
    zscores = scorer.z_scores(values)
    assert zscores.source == "calibration"


def test_missing_weight_file_is_named(run: Path, tmp_path: Path):
    folder = tmp_path / "bundle"
    shutil.copytree(run / "bundle", folder)
    (folder / "encoder.safetensors").unlink()
    with pytest.raises(BundleError, match=r"encoder\.safetensors \(encoder\) not found; retrain"):
        load_any_bundle(folder)


def test_wrong_architecture_is_named(run: Path, tmp_path: Path):
    folder = tmp_path / "bundle"
    shutil.copytree(run / "bundle", folder)
    spec_path = folder / "bundle.json"
    spec = json.loads(spec_path.read_text())
    spec["model"]["channels"] = 8
    spec_path.write_text(json.dumps(spec))
    bundle = load_any_bundle(folder)
    with pytest.raises(BundleError, match=r"generator\.safetensors \(generator\) does not match.*retrain"):
        make_scorer(bundle, "cpu")


def test_invalid_model_entry_is_named(run: Path, tmp_path: Path):
    folder = tmp_path / "bundle"
    shutil.copytree(run / "bundle", folder)
    spec_path = folder / "bundle.json"
    spec = json.loads(spec_path.read_text())
    spec["model"]["image_size"] = 128
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(BundleError, match=r"bundle\.json: image_size 128 is invalid"):
        make_scorer(load_any_bundle(folder), "cpu")


def test_invalid_kappa_setting_is_rejected(run: Path):
    bundle = load_any_bundle(run / "bundle")
    with pytest.raises(ValueError, match="kappa -1 is invalid"):
        make_scorer(bundle, "cpu", bundle.settings.with_overrides(kappa=-1))
