"""Fréchet Inception distance (FID) between two sets of patches, with Inception weights from a local file.

The Inception v3 network is torchvision's ``inception_v3`` built with ``weights=None`` and filled from a
state-dict file (loaded with ``weights_only=True``), e.g. torchvision's ImageNet checkpoint
``inception_v3_google-0cc3c7bd.pth``. Nothing is downloaded. Features are the 2048 average-pooled
activations before the classifier. Values from these weights are comparable with each other (checkpoint
selection), not with FIDs published from the TensorFlow Inception graph that pytorch-fid ports.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torchvision.models import inception_v3

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# ImageNet normalisation that torchvision's Inception weights expect before ``transform_input``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def feature_statistics(features: NDArray[np.floating]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Return the mean and the sample covariance (``ddof=1``) of features shaped ``(n, dim)``."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID needs features shaped (n >= 2, dim), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mean_a: NDArray[np.floating],
    covariance_a: NDArray[np.floating],
    mean_b: NDArray[np.floating],
    covariance_b: NDArray[np.floating],
    eps: float = 1e-6,
) -> float:
    """Compute the Fréchet distance between two Gaussians.

    ``|mean_a - mean_b|^2 + Tr(covariance_a + covariance_b - 2 (covariance_a covariance_b)^(1/2))``,
    with the matrix square root from ``scipy.linalg.sqrtm``. When that fails, ``eps`` is added to both
    diagonals first. The small imaginary part that rounding leaves is dropped. When the covariances are
    singular (fewer samples than dimensions) and sqrtm is still inaccurate, the trace is computed from
    the eigenvalues of the symmetric ``sqrt(A) B sqrt(A)``.
    """
    mean_a = np.atleast_1d(np.asarray(mean_a, dtype=np.float64))
    mean_b = np.atleast_1d(np.asarray(mean_b, dtype=np.float64))
    covariance_a = np.atleast_2d(np.asarray(covariance_a, dtype=np.float64))
    covariance_b = np.atleast_2d(np.asarray(covariance_b, dtype=np.float64))
    if mean_a.shape != mean_b.shape or covariance_a.shape != covariance_b.shape:
        raise ValueError(
            f"the two feature sets differ in dimension: means {mean_a.shape} and {mean_b.shape}, "
            f"covariances {covariance_a.shape} and {covariance_b.shape}"
        )

    trace_sqrt = _trace_sqrt_product(covariance_a, covariance_b, eps)

    mean_difference = mean_a - mean_b
    return float(
        mean_difference @ mean_difference + np.trace(covariance_a) + np.trace(covariance_b) - 2.0 * trace_sqrt
    )


def _trace_sqrt_product(
    covariance_a: NDArray[np.floating], covariance_b: NDArray[np.floating], eps: float
) -> float:
    product_sqrt = scipy.linalg.sqrtm(covariance_a @ covariance_b)
    if not np.isfinite(product_sqrt).all():
        offset = np.eye(covariance_a.shape[0]) * eps
        product_sqrt = scipy.linalg.sqrtm((covariance_a + offset) @ (covariance_b + offset))
    if np.isfinite(product_sqrt).all() and np.max(np.abs(np.imag(product_sqrt))) < 1e-3:
        return float(np.trace(np.real(product_sqrt)))

    # With fewer samples than dimensions the covariances are singular and sqrtm of their product can be
    # far off. The eigenvalues of A B equal those of the symmetric sqrt(A) B sqrt(A), which eigh handles.
    eigenvalues_a, vectors_a = scipy.linalg.eigh(covariance_a)
    sqrt_a = (vectors_a * np.sqrt(np.clip(eigenvalues_a, 0, None))) @ vectors_a.T
    middle = sqrt_a @ covariance_b @ sqrt_a
    return float(np.sum(np.sqrt(np.clip(scipy.linalg.eigvalsh((middle + middle.T) / 2), 0, None))))


def fid_from_features(features_a: NDArray[np.floating], features_b: NDArray[np.floating]) -> float:
    """Compute the FID between two feature sets shaped ``(n, dim)``.

    With at least as many samples as dimensions, this is :func:`frechet_distance` of the sample means and
    covariances. With fewer, the covariances are singular and ``sqrtm`` of their product is inaccurate
    and slow, so the trace term is computed exactly in sample space: with ``A = Ya^T Ya`` and
    ``B = Yb^T Yb`` (centred features over ``sqrt(n - 1)``), ``Tr((A B)^(1/2))`` is the sum of the
    singular values of ``Ya Yb^T``.
    """
    mean_a, covariance_a = feature_statistics(features_a)
    mean_b, covariance_b = feature_statistics(features_b)
    n_a, dim = np.shape(features_a)
    n_b = np.shape(features_b)[0]
    if min(n_a, n_b) > dim:
        return frechet_distance(mean_a, covariance_a, mean_b, covariance_b)
    if np.shape(features_b)[1] != dim:
        raise ValueError(f"the two feature sets differ in dimension: {dim} and {np.shape(features_b)[1]}")

    centred_a = (np.asarray(features_a, dtype=np.float64) - mean_a) / np.sqrt(n_a - 1)
    centred_b = (np.asarray(features_b, dtype=np.float64) - mean_b) / np.sqrt(n_b - 1)
    trace_sqrt = float(scipy.linalg.svdvals(centred_a @ centred_b.T).sum())
    mean_difference = mean_a - mean_b
    return float(
        mean_difference @ mean_difference + np.sum(centred_a**2) + np.sum(centred_b**2) - 2.0 * trace_sqrt
    )


class InceptionFeatures:
    """Inception v3 pool features of RGB patches, with weights from a local state-dict file.

    Parameters
    ----------
    weights_path
        A ``.pth`` or ``.pt`` state dict of torchvision's ``Inception3`` (with or without the
        auxiliary classifier), loaded with ``torch.load(..., weights_only=True)``.
    device
        Torch device to run on.
    input_size
        Side in pixels that patches are resized to. The weights were trained at 299; smaller sides
        (75 at least) run faster and suit dry runs only.
    """

    def __init__(
        self, weights_path: str | Path, device: str | torch.device = "cpu", input_size: int = INCEPTION_SIZE
    ) -> None:
        if input_size < 75:
            raise ValueError(
                f"input_size {input_size} is invalid: Inception v3 needs 75 px or more (299 by default)"
            )
        self.input_size = input_size
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise FileNotFoundError(
                f"Inception weights {weights_path} not found: pass a local state-dict file of torchvision's "
                "inception_v3 (e.g. inception_v3_google-0cc3c7bd.pth)"
            )
        try:
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"Inception weights {weights_path} could not be loaded as a plain state dict: {error}"
            ) from error
        if not isinstance(state_dict, dict):
            raise ValueError(
                f"Inception weights {weights_path} hold a {type(state_dict).__name__}, not a state dict"
            )

        has_aux = any(key.startswith("AuxLogits.") for key in state_dict)
        model = inception_v3(weights=None, aux_logits=has_aux, transform_input=True, init_weights=False)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"Inception weights {weights_path} do not match torchvision's inception_v3: {error}"
            ) from error
        model.fc = torch.nn.Identity()
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, images_uint8: NDArray[np.uint8]) -> NDArray[np.float64]:
        """Return the ``(n, 2048)`` pool features of uint8 RGB images shaped ``(n, height, width, 3)``."""
        images_uint8 = np.asarray(images_uint8)
        if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3 or images_uint8.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 RGB shaped (n, height, width, 3), got {images_uint8.dtype} {images_uint8.shape}"
            )
        pixels = torch.from_numpy(images_uint8).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        pixels = F.interpolate(
            pixels, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
        )
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        features = self.model((pixels - mean) / std)
        return features.double().cpu().numpy()

    def features_of(self, batches: Iterable[NDArray[np.uint8]]) -> NDArray[np.float64]:
        """Return the features of all images in an iterable of uint8 batches, stacked."""
        collected = [self(batch) for batch in batches]
        if not collected:
            return np.zeros((0, FEATURE_DIM))
        return np.concatenate(collected, axis=0)


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write the state dict of a randomly initialised ``inception_v3`` to ``path``.

    For tests and dry runs only: FIDs from random weights are meaningless.
    """
    torch.manual_seed(seed)
    # torchvision's own initialisation (truncated normal, std 0.1) keeps the random features from collapsing.
    model = inception_v3(weights=None, aux_logits=False, init_weights=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
