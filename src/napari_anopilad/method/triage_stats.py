"""Statistics of the normal keyword-similarity vectors and the calibration of triage distances (numpy only).

Each patch has a vector of raw cosine similarities between its CONCH image embedding and the text embedding
of each keyword in the bank (74 for the normal lymph node bank). The keyword distance of a patch is the
Mahalanobis distance of that vector from the mean vector of normal training patches, under the normal
covariance shrunk towards a multiple of the identity by Ledoit and Wolf's estimator:

    d(v) = sqrt((v - mean)^T inverse(covariance) (v - mean))

Why Mahalanobis rather than the Euclidean distance: the keywords are all normal lymph node terms, so their
text embeddings lie close together and the similarities of one patch rise and fall together. The Euclidean
distance would be dominated by that shared level and by the keywords with the widest spread. Whitening by the
normal covariance makes a patch far when its pattern of similarities is unusual for normal tissue, also along
directions in which normal patches hardly vary. Why shrinkage: the similarity vectors are linear images of
the image embedding, so their covariance has rank at most the embedding width, and with few normal patches
the sample covariance is singular or ill-conditioned. The Ledoit-Wolf estimate (Ledoit and Wolf, "A
well-conditioned estimator for large-dimensional covariance matrices", J. Multivariate Anal. 88, 2004) is
always invertible for non-constant data and takes its shrinkage from the data, with no parameter to tune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from napari_anopilad.method.heatmap import zscores


@dataclass(frozen=True)
class ScoreStatistics:
    """Mean and population std of one triage score on normal validation patches."""

    mean: float
    std: float
    count: int

    @classmethod
    def from_values(cls, values: ArrayLike, name: str) -> ScoreStatistics:
        """Measure the statistics of ``values``; raise a ValueError when they cannot give z-scores."""
        array = np.asarray(values, dtype=np.float64).ravel()
        if array.size < 2:
            raise ValueError(
                f"calibration of {name} needs at least 2 normal validation patches, got {array.size}"
            )
        if not np.all(np.isfinite(array)):
            raise ValueError(f"calibration of {name}: the distances contain NaN or infinity")
        statistics = cls(mean=float(array.mean()), std=float(array.std(ddof=0)), count=int(array.size))
        statistics.check(name)
        return statistics

    def check(self, name: str) -> None:
        """Raise a ValueError unless the mean is finite, the std positive and the count at least 2."""
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0 and self.count >= 2):
            raise ValueError(
                f"calibration of {name}: mean {self.mean}, std {self.std} over {self.count} patches are invalid; "
                "the normal validation patches must be at least 2 and not all at the same distance"
            )

    def zscores(self, values: ArrayLike) -> NDArray[np.float64]:
        """Return ``(values - mean) / std`` as float64; NaN stays NaN."""
        return zscores(values, self.mean, self.std)


@dataclass(frozen=True)
class KeywordStatistics:
    """Mean vector and shrunk covariance of the keyword-similarity vectors of normal training patches.

    Attributes
    ----------
    centroid
        ``(n_keywords,)`` float64 mean of the normal vectors.
    covariance
        ``(n_keywords, n_keywords)`` float64 Ledoit-Wolf covariance.
    precision
        The inverse of ``covariance``.
    shrinkage
        Weight of the scaled identity in ``covariance``, in [0, 1].
    """

    centroid: NDArray[np.float64]
    covariance: NDArray[np.float64]
    precision: NDArray[np.float64]
    shrinkage: float


def ledoit_wolf_covariance(samples: ArrayLike) -> tuple[NDArray[np.float64], float]:
    """Estimate the covariance of ``samples`` ``(n, p)`` shrunk towards ``mu * identity``.

    With ``S`` the sample covariance (divided by ``n``) of the centred samples ``x_i``, ``mu = trace(S) / p``,
    ``d2 = |S - mu I|^2 / p`` and ``b2 = min(d2, sum_i |x_i x_i^T - S|^2 / (p n^2))`` (Frobenius norms), the
    shrinkage is ``b2 / d2`` and the estimate is ``(1 - shrinkage) S + shrinkage mu I``.

    Returns
    -------
    covariance, shrinkage
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"the covariance needs an (n, p) array with n >= 2 samples, got shape {x.shape}")
    count, dimensions = x.shape
    centred = x - x.mean(axis=0)

    sample_covariance = centred.T @ centred / count
    mu = float(np.trace(sample_covariance)) / dimensions
    if not mu > 0:
        raise ValueError(
            "the normal keyword-similarity vectors are all identical, so they have no covariance"
        )
    d2 = float(np.sum((sample_covariance - mu * np.eye(dimensions)) ** 2)) / dimensions
    # sum_i |x_i x_i^T - S|^2 = sum_i |x_i|^4 - n |S|^2, because the x_i x_i^T sum to n S.
    spread = float(np.sum(np.sum(centred**2, axis=1) ** 2)) - count * float(np.sum(sample_covariance**2))
    b2 = min(d2, spread / (dimensions * count**2))
    shrinkage = 0.0 if d2 == 0 else b2 / d2

    covariance = (1.0 - shrinkage) * sample_covariance + shrinkage * mu * np.eye(dimensions)
    return covariance, shrinkage


def fit_keyword_statistics(similarities: ArrayLike) -> KeywordStatistics:
    """Fit the centroid and Ledoit-Wolf covariance of normal keyword-similarity vectors ``(n, n_keywords)``."""
    vectors = np.asarray(similarities, dtype=np.float64)
    if vectors.ndim != 2 or not np.all(np.isfinite(vectors)):
        raise ValueError(
            f"keyword similarities have shape {vectors.shape} or contain NaN: expected finite (n, n_keywords)"
        )
    covariance, shrinkage = ledoit_wolf_covariance(vectors)
    return KeywordStatistics(
        centroid=vectors.mean(axis=0),
        covariance=covariance,
        precision=symmetric_inverse(covariance),
        shrinkage=shrinkage,
    )


def symmetric_inverse(matrix: NDArray[np.float64]) -> NDArray[np.float64]:
    """Invert a symmetric positive-definite matrix through its eigendecomposition; raise if it is singular."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    if not eigenvalues.min() > eigenvalues.max() * 1e-12:
        raise ValueError(
            f"the keyword covariance is singular (eigenvalues {eigenvalues.min():.3g} to {eigenvalues.max():.3g}); "
            "use more, and more varied, normal training patches"
        )
    inverse = (eigenvectors / eigenvalues) @ eigenvectors.T
    return (inverse + inverse.T) / 2


def mahalanobis_distances(
    vectors: ArrayLike, centroid: NDArray[np.float64], precision: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Return ``sqrt((v - centroid)^T precision (v - centroid))`` for each row ``v`` of ``vectors``."""
    differences = np.asarray(vectors, dtype=np.float64) - centroid
    if differences.ndim != 2 or differences.shape[1] != len(centroid):
        raise ValueError(
            f"keyword-similarity vectors have shape {np.shape(vectors)} but the reference has {len(centroid)} "
            "keywords: the reference was built with another keyword bank"
        )
    squared = np.einsum("ij,jk,ik->i", differences, precision, differences)
    # A positive-definite precision gives squares >= 0; rounding can give tiny negatives.
    return np.sqrt(np.clip(squared, 0.0, None))
