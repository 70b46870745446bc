"""FID against closed forms and a direct computation, and Inception features from a local file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models import inception_v3

from napari_anopilad.training.fid import (
    FEATURE_DIM,
    InceptionFeatures,
    fid_from_features,
    frechet_distance,
    save_random_inception_weights,
)


def test_diagonal_gaussians_closed_form():
    mean_a, mean_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    variances_a, variances_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    # For diagonal covariances the trace term is sum((sqrt(a) - sqrt(b))^2).
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(variances_a) - np.sqrt(variances_b)) ** 2)
    value = frechet_distance(mean_a, np.diag(variances_a), mean_b, np.diag(variances_b))
    assert value == pytest.approx(expected)
    assert expected == pytest.approx(5 + 1 + 1 + 4)


def test_full_covariances_against_eigenvalues():
    rng = np.random.default_rng(0)
    factor_a, factor_b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    covariance_a, covariance_b = factor_a @ factor_a.T + np.eye(5), factor_b @ factor_b.T + np.eye(5)
    mean_a, mean_b = rng.normal(size=5), rng.normal(size=5)
    # Tr((AB)^(1/2)) is the sum of square roots of AB's eigenvalues, which are real and positive.
    trace_sqrt = np.sum(np.sqrt(np.linalg.eigvals(covariance_a @ covariance_b).real))
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(covariance_a + covariance_b) - 2 * trace_sqrt
    assert frechet_distance(mean_a, covariance_a, mean_b, covariance_b) == pytest.approx(expected)


def test_equal_feature_sets_give_zero():
    features = np.random.default_rng(1).normal(size=(50, 8))
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-6)


def test_gaussian_samples_approach_closed_form():
    rng = np.random.default_rng(2)
    features_a = rng.normal(loc=0.0, scale=1.0, size=(20000, 3))
    features_b = rng.normal(loc=0.5, scale=2.0, size=(20000, 3))
    expected = 3 * 0.5**2 + 3 * (2.0 - 1.0) ** 2
    assert fid_from_features(features_a, features_b) == pytest.approx(expected, rel=0.03)


def test_fewer_samples_than_dimensions_match_sqrtm_path():
    rng = np.random.default_rng(3)
    features_a, features_b = rng.normal(size=(12, 10)), rng.normal(loc=0.2, size=(12, 10))
    full = fid_from_features(features_a, features_b)
    # Eleven padded zero columns make the covariances singular and take the sample-space path.
    padded_a = np.hstack([features_a, np.zeros((12, 11))])
    padded_b = np.hstack([features_b, np.zeros((12, 11))])
    assert fid_from_features(padded_a, padded_b) == pytest.approx(full, rel=1e-6)


def test_singular_covariances_match_eigenvalue_form():
    rng = np.random.default_rng(4)
    features_a, features_b = rng.normal(size=(3, 64)), rng.normal(loc=0.3, size=(3, 64)) * 2
    covariance_a, covariance_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    # Tr((AB)^(1/2)) from the nonzero eigenvalues of AB (rank 2 here), which are real and non-negative.
    eigenvalues = np.linalg.eigvals(covariance_a @ covariance_b).real
    trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0, None)))
    mean_difference = features_a.mean(axis=0) - features_b.mean(axis=0)
    expected = mean_difference @ mean_difference + np.trace(covariance_a + covariance_b) - 2 * trace_sqrt
    assert fid_from_features(features_a, features_b) == pytest.approx(expected, rel=1e-6)


def test_dimension_mismatch_raises():
    with pytest.raises(ValueError, match="differ in dimension"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth")


def test_inception_features_match_torchvision(inception_weights, data_dir):
    from PIL import Image

    paths = sorted((data_dir / "patches" / "pcam").glob("*.png"))[:2]
    images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])
    extractor = InceptionFeatures(inception_weights)
    features = extractor(images)
    assert features.shape == (2, FEATURE_DIM)

    reference = inception_v3(weights=None, aux_logits=False, transform_input=True, init_weights=False)
    reference.load_state_dict(torch.load(inception_weights, weights_only=True))
    reference.fc = torch.nn.Identity()
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pixels = torch.nn.functional.interpolate(pixels, size=(299, 299), mode="bilinear", align_corners=False)
    pixels = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference.eval()(pixels).double().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


def test_inception_too_small_input_size_raises(inception_weights):
    with pytest.raises(ValueError, match="75 px or more"):
        InceptionFeatures(inception_weights, input_size=64)


def test_inception_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        InceptionFeatures(tmp_path / "missing.pth")


def test_inception_wrong_state_dict_is_rejected(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="do not match"):
        InceptionFeatures(path)
