"""The VAE density family: its formulas on hand-computed cases, and a tiny model trained on the real slides.

The formula tests use a 1-D linear Gaussian model, p(z) = N(0, 1) and p(x | z) = N(z, sigma^2), where
p(x) = N(0, 1 + sigma^2) and the posterior N(x / (1 + sigma^2), sigma^2 / (1 + sigma^2)) are known in
closed form; the reference values come from scipy and plain numpy.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from scipy import stats

from napari_anopilad.method.baselines.base import BaselineSettings
from napari_anopilad.method.baselines.vae_density import (
    VaeDensityScorer,
    compressed_bits,
    discretised_logistic_log_likelihood,
    evidence_lower_bound,
    float32_convolutions,
    importance_weighted_log_likelihood,
    likelihood_regret,
    log_importance_weights,
    perturb_pixels,
)
from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.scorers import load_any_bundle, make_scorer, score_names
from napari_anopilad.training import calibrate, extract
from napari_anopilad.training.manifest import load_patches, read_manifest, select_rows
from napari_anopilad.training.vae_density_train import main as train_main

SIGMA2 = 0.5
X = 1.3
Q_MEAN = 0.2
Q_STD = 0.6
DIMENSIONS = 3 * 64 * 64
SPLIT_CSV = """slide,split,mpp
TCGA-CR-7395-01A-01-TS1,train,0.5
CMU-1-Small-Region,validation,
"""
# Small scoring options keep the CPU tests short; the defaults are for a GPU.
SMALL_OPTIONS = ["--importance-samples", "2", "--regret-steps", "2", "--regret-learning-rate", "0.05"]
TINY_TRAINING = [
    "--batch-size",
    "8",
    "--learning-rate",
    "5e-3",
    "--channels",
    "4,8,8,8",
    "--checkpoint-every",
    "2",
]


def gaussian_log_likelihood(latents: torch.Tensor) -> torch.Tensor:
    """log N(X; z, SIGMA2) for (m, 1) latents."""
    return -0.5 * math.log(2 * math.pi * SIGMA2) - (X - latents[:, 0]) ** 2 / (2 * SIGMA2)


def log_marginal() -> float:
    return float(stats.norm.logpdf(X, 0.0, math.sqrt(1 + SIGMA2)))


def posterior() -> tuple[float, float]:
    return X / (1 + SIGMA2), math.sqrt(SIGMA2 / (1 + SIGMA2))


def posterior_parameters(mean: float, std: float, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.full((m, 1), mean, dtype=torch.float64),
        torch.full((m, 1), 2 * math.log(std), dtype=torch.float64),
    )


def test_discretised_logistic_matches_scipy():
    rng = np.random.default_rng(0)
    intensity = rng.integers(0, 256, size=(2, 3, 4, 4))
    intensity[0, 0, 0, 0], intensity[1, 2, 3, 3] = 0, 255
    centre = intensity / 127.5 - 1
    location = centre + rng.uniform(-0.2, 0.2, size=intensity.shape)
    log_scale = rng.uniform(-3, -1, size=intensity.shape)
    scale = np.exp(log_scale)
    upper = stats.logistic.cdf((centre + 1 / 255 - location) / scale)
    lower = stats.logistic.cdf((centre - 1 / 255 - location) / scale)
    probability = np.where(intensity == 0, upper, np.where(intensity == 255, 1 - lower, upper - lower))
    expected = np.log(probability).reshape(2, -1).sum(axis=1)

    result = discretised_logistic_log_likelihood(
        torch.tensor(centre, dtype=torch.float64),
        torch.tensor(location, dtype=torch.float64),
        torch.tensor(log_scale, dtype=torch.float64),
    )
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-9)


def test_discretised_logistic_sums_to_one():
    intensity = torch.arange(256, dtype=torch.float64).reshape(256, 1)
    log_probability = discretised_logistic_log_likelihood(
        intensity / 127.5 - 1,
        torch.full((256, 1), 0.3, dtype=torch.float64),
        torch.full((256, 1), -3.0, dtype=torch.float64),
    )
    assert float(log_probability.exp().sum()) == pytest.approx(1.0, abs=1e-9)


def test_importance_weight_single_sample_is_elbo_sample():
    mean, log_var = posterior_parameters(Q_MEAN, Q_STD, 5)
    noise = torch.randn((1, 5, 1), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    estimate = importance_weighted_log_likelihood(gaussian_log_likelihood, mean, log_var, noise).numpy()

    z = Q_MEAN + Q_STD * noise[0, :, 0].numpy()
    elbo_sample = (
        stats.norm.logpdf(X, z, math.sqrt(SIGMA2))
        + stats.norm.logpdf(z, 0, 1)
        - stats.norm.logpdf(z, Q_MEAN, Q_STD)
    )
    np.testing.assert_allclose(estimate, elbo_sample, rtol=1e-12)


def test_importance_weight_single_sample_mean_is_elbo():
    m = 40000
    mean, log_var = posterior_parameters(Q_MEAN, Q_STD, m)
    noise = torch.randn((1, m, 1), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    estimates = importance_weighted_log_likelihood(gaussian_log_likelihood, mean, log_var, noise).numpy()

    kl = 0.5 * (Q_STD**2 + Q_MEAN**2 - 1 - math.log(Q_STD**2))
    expected_log_likelihood = -0.5 * math.log(2 * math.pi * SIGMA2) - ((X - Q_MEAN) ** 2 + Q_STD**2) / (
        2 * SIGMA2
    )
    elbo = expected_log_likelihood - kl
    standard_error = estimates.std() / math.sqrt(m)
    assert abs(estimates.mean() - elbo) < 4 * standard_error


def test_importance_weighting_approaches_log_marginal():
    m = 4000
    mean, log_var = posterior_parameters(Q_MEAN, Q_STD, m)
    generator = torch.Generator().manual_seed(3)
    gaps = []
    for samples in (1, 4, 16, 64, 256):
        noise = torch.randn((samples, m, 1), generator=generator, dtype=torch.float64)
        estimate = importance_weighted_log_likelihood(gaussian_log_likelihood, mean, log_var, noise)
        gaps.append(log_marginal() - float(estimate.mean()))
    assert all(later < earlier for earlier, later in itertools.pairwise(gaps)), gaps
    assert gaps[0] > 0.1
    assert abs(gaps[-1]) < 0.005


def test_importance_weighting_exact_posterior():
    mean, log_var = posterior_parameters(*posterior(), 3)
    noise = torch.randn((7, 3, 1), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    weights = log_importance_weights(gaussian_log_likelihood, mean, log_var, noise)
    np.testing.assert_allclose(weights.numpy(), log_marginal(), rtol=1e-12)


def gap_to_posterior(mean: float, std: float) -> float:
    """KL(N(mean, std^2) || posterior), which equals log p(x) - ELBO."""
    posterior_mean, posterior_std = posterior()
    return (
        math.log(posterior_std / std) + (std**2 + (mean - posterior_mean) ** 2) / (2 * posterior_std**2) - 0.5
    )


def test_elbo_matches_closed_form():
    # Each of the m identical inputs gets one draw, so the mean over inputs is a Monte Carlo ELBO.
    m = 100000
    mean, log_var = posterior_parameters(Q_MEAN, Q_STD, m)
    noise = torch.randn((1, m, 1), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    elbo = evidence_lower_bound(gaussian_log_likelihood, mean, log_var, noise).numpy()
    standard_error = elbo.std() / math.sqrt(m)
    assert abs(elbo.mean() - (log_marginal() - gap_to_posterior(Q_MEAN, Q_STD))) < 4 * standard_error


def test_regret_is_gap_to_exact_posterior():
    # Optimising q all the way reaches the exact posterior, where the ELBO is log p(x), so the Regret
    # is log p(x) - ELBO(q) = KL(q || posterior). Each of the m identical inputs is optimised on its own.
    m = 1000
    mean, log_var = posterior_parameters(Q_MEAN, Q_STD, m)
    generator = torch.Generator().manual_seed(6)
    step_noise = torch.randn((200, 4, m, 1), generator=generator, dtype=torch.float64)
    evaluation_noise = torch.randn((64, m, 1), generator=generator, dtype=torch.float64)
    regret = likelihood_regret(
        gaussian_log_likelihood, mean, log_var, step_noise, evaluation_noise, 0.02
    ).numpy()

    expected = gap_to_posterior(Q_MEAN, Q_STD)
    assert expected > 0.3
    # About 4 standard errors of the mean over the m inputs (0.003 with this seed).
    assert abs(regret.mean() - expected) < 0.015


def test_regret_is_after_minus_before():
    mean, log_var = posterior_parameters(Q_MEAN, Q_STD, 1)
    generator = torch.Generator().manual_seed(7)
    step_noise = torch.randn((1, 1, 1, 1), generator=generator, dtype=torch.float64)
    evaluation_noise = torch.randn((3, 1, 1), generator=generator, dtype=torch.float64)
    regret = float(
        likelihood_regret(gaussian_log_likelihood, mean, log_var, step_noise, evaluation_noise, 0.1)[0]
    )

    # One Adam step moves each parameter by the learning rate against the sign of its gradient.
    e = evaluation_noise[:, 0, 0].numpy()
    s = float(step_noise[0, 0, 0, 0])

    def elbo(mu: float, log_variance: float, draws: np.ndarray) -> float:
        std = math.exp(0.5 * log_variance)
        z = mu + std * draws
        reconstruction = np.mean(-0.5 * math.log(2 * math.pi * SIGMA2) - (X - z) ** 2 / (2 * SIGMA2))
        return float(reconstruction - 0.5 * (mu**2 + math.exp(log_variance) - 1 - log_variance))

    mu, log_variance = Q_MEAN, 2 * math.log(Q_STD)
    std = Q_STD
    residual = X - (mu + std * s)
    gradient_mean = -(residual / SIGMA2 - mu)
    gradient_log_variance = -(residual / SIGMA2 * 0.5 * std * s - 0.5 * (math.exp(log_variance) - 1))
    mu_after = mu - 0.1 * np.sign(gradient_mean)
    log_variance_after = log_variance - 0.1 * np.sign(gradient_log_variance)
    expected = elbo(mu_after, log_variance_after, e) - elbo(mu, log_variance, e)
    assert regret == pytest.approx(expected, rel=1e-6)


def test_regret_without_steps_is_zero():
    mean, log_var = posterior_parameters(Q_MEAN, Q_STD, 2)
    evaluation_noise = torch.randn((3, 2, 1), dtype=torch.float64)
    regret = likelihood_regret(
        gaussian_log_likelihood, mean, log_var, torch.empty((0, 1, 2, 1)), evaluation_noise, 0.1
    )
    assert regret.tolist() == [0.0, 0.0]


def test_perturbation_replaces_whole_pixels_at_rate():
    pixels = torch.full((4, 3, 64, 64), 2.0)  # outside [-1, 1], so a replaced value is always recognisable
    perturbed = perturb_pixels(pixels, 0.2, torch.Generator().manual_seed(8))
    replaced = perturbed != 2.0
    assert torch.equal(replaced.all(dim=1), replaced.any(dim=1))
    assert float(replaced[:, 0].float().mean()) == pytest.approx(0.2, abs=0.02)
    assert float(perturbed[replaced].min()) >= -1.0
    assert float(perturbed[replaced].max()) <= 1.0


def test_compressed_bits_match_compressors():
    crop = np.asarray(
        Image.open(sorted((Path(__file__).parent / "data" / "patches" / "pcam").glob("*.png"))[0]).convert(
            "RGB"
        )
    )
    crop = np.ascontiguousarray(crop[:64, :64])
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="PNG", compress_level=9)
    assert compressed_bits(crop, "png") == 8 * len(buffer.getvalue())
    assert compressed_bits(crop, "zlib") == 8 * len(zlib.compress(crop.tobytes(), 9))
    with pytest.raises(ValueError, match="compressor 'gzip' is invalid"):
        compressed_bits(crop, "gzip")


@pytest.fixture(scope="module")
def patches(tmp_path_factory, data_dir: Path) -> Path:
    """Normal training patches of the TCGA slide and validation patches of the CMU slide."""
    root = tmp_path_factory.mktemp("vae-density")
    (root / "slides").mkdir()
    for name in ("CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs"):
        shutil.copyfile(data_dir / "slides" / name, root / "slides" / name)
    (root / "split.csv").write_text(SPLIT_CSV)
    output = root / "patches"
    arguments = [str(root / "slides"), "--split", str(root / "split.csv"), "--output", str(output)]
    assert extract.main([*arguments, "--target-mpp", "1.0", "--max-patches-per-slide", "16"]) == 0
    return output


@pytest.fixture(scope="module")
def run(patches: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("vae-density-run")
    assert (
        train_main([str(patches), "--output", str(output), "--steps", "4", *TINY_TRAINING, *SMALL_OPTIONS])
        == 0
    )
    return output


@pytest.fixture()
def bundle_copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run / "bundle", tmp_path / "bundle"))


def validation_images(patches: Path, count: int) -> np.ndarray:
    rows = select_rows(read_manifest(patches), splits=["validation"], labels=["normal"])
    return load_patches(patches, rows["path"][:count])


def test_training_loss_decreases(run: Path):
    with open(run / "loss_log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3]
    for column in ("model_bits_per_dim", "background_bits_per_dim"):
        assert float(rows[-1][column]) < float(rows[0][column])


def test_training_resume_matches_uninterrupted(run: Path, patches: Path, tmp_path: Path):
    arguments = [str(patches), "--output", str(tmp_path), *TINY_TRAINING, *SMALL_OPTIONS]
    assert train_main([*arguments, "--steps", "2"]) == 0
    assert train_main([*arguments, "--steps", "4"]) == 0
    for part in ("model", "background"):
        resumed = load_file(str(tmp_path / "bundle" / f"{part}.safetensors"))
        uninterrupted = load_file(str(run / "bundle" / f"{part}.safetensors"))
        assert resumed.keys() == uninterrupted.keys()
        for key in resumed:
            assert torch.equal(resumed[key], uninterrupted[key]), f"{part} {key}"


def test_training_rejects_invalid_options(patches: Path, tmp_path: Path):
    arguments = [str(patches), "--output", str(tmp_path)]
    with pytest.raises(SystemExit, match="--crop-size 32 is invalid"):
        train_main([*arguments, "--crop-size", "32"])
    with pytest.raises(SystemExit, match="--channels '8,x' is invalid"):
        train_main([*arguments, "--channels", "8,x"])
    with pytest.raises(SystemExit, match=r"--perturbation-rate 1\.5 is invalid"):
        train_main([*arguments, "--perturbation-rate", "1.5"])
    with pytest.raises(SystemExit, match="input_size 64 does not halve 7 times"):
        train_main([*arguments, "--channels", "1,1,1,1,1,1,1"])


KEYS = [("slide", index, 0) for index in range(4)]


@pytest.fixture(scope="module")
def scored(run: Path, patches: Path) -> tuple[np.ndarray, Any]:
    """Four validation patches and their scores by the trained bundle, in one batch."""
    images = validation_images(patches, 4)
    return images, make_scorer(load_any_bundle(run / "bundle"), "cpu").score(images, KEYS)


def test_bundle_reloads_and_scores(run: Path, scored: tuple[np.ndarray, Any]):
    bundle = load_any_bundle(run / "bundle")
    assert bundle.method == "vae-density"
    assert score_names(bundle) == ("nll", "regret", "likelihood_ratio", "complexity")
    assert bundle.settings.options["importance_samples"] == 2
    assert bundle.model["latent_dim"] == 100
    scorer = make_scorer(bundle, "cpu")
    assert isinstance(scorer, VaeDensityScorer)

    images, batch = scored
    assert batch.reconstructions is None
    for name in score_names(bundle):
        values = batch.values(name)
        assert values.shape == (4,)
        assert np.isfinite(values).all(), name
    # A barely trained VAE gives about 9 bits per dimension; a uniform distribution over 256 values gives 8.
    assert (batch.values("nll") > 5).all()
    assert (batch.values("nll") < 12).all()

    for index in (0, 3):
        single = scorer.score(images[index : index + 1], KEYS[index : index + 1])
        for name in score_names(bundle):
            np.testing.assert_allclose(single.values(name), batch.values(name)[index : index + 1], rtol=1e-5)


def test_complexity_subtracts_png_bits(scored: tuple[np.ndarray, Any]):
    images, result = scored
    for index, image in enumerate(images):
        bits = []
        for y in range(0, 256, 64):
            for x in range(0, 256, 64):
                buffer = io.BytesIO()
                crop = np.ascontiguousarray(image[y : y + 64, x : x + 64])
                Image.fromarray(crop).save(buffer, format="PNG", compress_level=9)
                bits.append(8 * len(buffer.getvalue()) / DIMENSIONS)
        expected = result.values("nll")[index] - np.mean(bits)
        assert result.values("complexity")[index] == pytest.approx(expected, rel=1e-12)


def test_likelihood_ratio_is_nll_difference(
    bundle_copy: Path, scored: tuple[np.ndarray, Any], tmp_path: Path
):
    images, model_scores = scored
    images, keys = images[:2], KEYS[:2]

    # A bundle whose model part is the background network gives the background's NLL with the same noise.
    swapped = Path(shutil.copytree(bundle_copy, tmp_path / "swapped"))
    shutil.copyfile(bundle_copy / "background.safetensors", swapped / "model.safetensors")
    background_scores = make_scorer(load_any_bundle(swapped)).score(images, keys)

    expected = model_scores.values("nll")[:2] - background_scores.values("nll")
    np.testing.assert_allclose(model_scores.values("likelihood_ratio")[:2], expected, rtol=1e-10, atol=1e-12)
    assert not np.allclose(background_scores.values("nll"), model_scores.values("nll")[:2])


def test_scores_follow_options(run: Path, scored: tuple[np.ndarray, Any]):
    bundle = load_any_bundle(run / "bundle")
    images, base = scored
    images, keys = images[:1], KEYS[:1]
    no_regret = make_scorer(bundle, settings=bundle.settings.with_overrides(regret_steps=0)).score(
        images, keys
    )
    assert no_regret.values("regret").tolist() == [0.0]
    assert no_regret.values("nll")[0] == pytest.approx(base.values("nll")[0], rel=1e-12)
    assert no_regret.values("complexity")[0] == pytest.approx(base.values("complexity")[0], rel=1e-12)

    # zlib has no PNG headers or row filters, so its lengths differ.
    settings = bundle.settings.with_overrides(compressor="zlib", regret_steps=0)
    zlib_scores = make_scorer(bundle, settings=settings).score(images, keys)
    assert zlib_scores.values("complexity")[0] != pytest.approx(base.values("complexity")[0], rel=1e-6)


def test_calibration_is_used(bundle_copy: Path, patches: Path):
    assert calibrate.main([str(patches), "--bundle", str(bundle_copy), "--batch-size", "4"]) == 0
    bundle = load_any_bundle(bundle_copy, require_calibration=True)
    scorer = make_scorer(bundle)
    assert scorer.calibration is not None
    assert set(scorer.calibration.mean) == {"nll", "regret", "likelihood_ratio", "complexity"}
    z = scorer.z_scores([scorer.calibration.mean["nll"] + scorer.calibration.std["nll"]])
    assert z.source == "calibration"
    assert float(np.asarray(z.values)[0]) == pytest.approx(1.0)


def test_missing_weight_file_is_named(bundle_copy: Path):
    (bundle_copy / "background.safetensors").unlink()
    with pytest.raises(BundleError, match=r"background\.safetensors \(background\) not found; retrain"):
        load_any_bundle(bundle_copy)


def test_wrong_architecture_is_named(bundle_copy: Path):
    spec = json.loads((bundle_copy / "bundle.json").read_text())
    spec["model"]["channels"] = [4, 8, 8, 16]
    (bundle_copy / "bundle.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match=r"model\.safetensors \(model\) does not match the architecture"):
        make_scorer(load_any_bundle(bundle_copy))


def test_invalid_option_is_named(run: Path):
    bundle = load_any_bundle(run / "bundle")
    with pytest.raises(ValueError, match="importance_samples 0 is invalid"):
        make_scorer(bundle, settings=bundle.settings.with_overrides(importance_samples=0))
    settings = BaselineSettings(method="vae-density", score="nll", options={"samples": 4})
    with pytest.raises(ValueError, match=r"unknown vae-density options \['samples'\]"):
        make_scorer(bundle, settings=settings)


def test_float32_convolutions_restores_flag():
    convolutions = torch.backends.cudnn.conv
    before = convolutions.fp32_precision
    with float32_convolutions(torch.device("cuda")):
        assert convolutions.fp32_precision == "ieee"
    assert convolutions.fp32_precision == before
    with float32_convolutions(torch.device("cpu")):
        assert convolutions.fp32_precision == before


def test_analyze_rejects_saving_reconstructions(run: Path, cmu_slide_path: Path, tmp_path: Path, capsys):
    from napari_anopilad.cli import main

    out = tmp_path / "out"
    arguments = ["analyze", str(cmu_slide_path), "--bundle", str(run / "bundle"), "--out", str(out)]

    # The density family makes no reconstructions, so the option stops the command before any scoring.
    assert main([*arguments, "--device", "cpu", "--save-reconstructions"]) == 2
    error = capsys.readouterr().err
    assert "--save-reconstructions: the VAE density method" in error
    assert "makes no reconstructions" in error
    assert not (out / "store").exists()
