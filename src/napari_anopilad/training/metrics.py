"""Evaluation metrics: AUC and AUPR with undefined cases, bootstrap intervals over slides,
and patch-grid segmentation scores (Dice, IoU, TNR).

AUC and AUPR come from scikit-learn (``roc_auc_score`` and ``average_precision_score``). A metric
that is undefined for its input (one class only, no negative cells) is returned as ``None`` with
the reason, never as an exception, so a report can show it and leave it out of averages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import average_precision_score, roc_auc_score


@dataclass(frozen=True)
class MetricValue:
    """A metric's value, or ``None`` with the reason it is undefined."""

    value: float | None
    reason: str = ""

    @property
    def defined(self) -> bool:
        return self.value is not None


@dataclass(frozen=True)
class BootstrapInterval:
    """A percentile bootstrap confidence interval of a ranking metric over resampled slides.

    ``n_valid`` counts the resamples in which the metric was defined (both classes present); the
    others are left out of the percentiles.
    """

    low: float | None
    high: float | None
    confidence: float
    n_resamples: int
    n_valid: int


def _binary_inputs(labels: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.int_], NDArray[np.float64]]:
    labels_array = np.asarray(labels)
    scores_array = np.asarray(scores, dtype=np.float64)
    if labels_array.ndim != 1 or scores_array.ndim != 1 or labels_array.shape != scores_array.shape:
        raise ValueError(
            f"labels and scores must be 1-D arrays of the same length, got shapes {labels_array.shape} "
            f"and {scores_array.shape}"
        )
    if not np.isin(labels_array, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (tumour), got values {np.unique(labels_array)}")
    if not np.isfinite(scores_array).all():
        raise ValueError("scores contain NaN or infinity: drop those items before computing the metric")
    return labels_array.astype(int), scores_array


def _undefined_reason(labels: NDArray[np.int_]) -> str:
    if labels.size == 0:
        return "no items"
    if labels.min() == labels.max():
        only = "tumour" if labels[0] == 1 else "normal"
        return f"one class only ({labels.size} {only} items)"
    return ""


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> MetricValue:
    """Compute the area under the ROC curve with tumour (1) as the positive class.

    Returns an undefined value when the labels hold one class only.
    """
    labels_array, scores_array = _binary_inputs(labels, scores)
    reason = _undefined_reason(labels_array)
    if reason:
        return MetricValue(None, reason)
    return MetricValue(float(roc_auc_score(labels_array, scores_array)))


def average_precision(labels: ArrayLike, scores: ArrayLike) -> MetricValue:
    """Compute the area under the precision-recall curve (average precision) for tumour (1).

    Returns an undefined value when the labels hold one class only: with no tumour items recall is
    undefined, and with no normal items it measures no ranking.
    """
    labels_array, scores_array = _binary_inputs(labels, scores)
    reason = _undefined_reason(labels_array)
    if reason:
        return MetricValue(None, reason)
    return MetricValue(float(average_precision_score(labels_array, scores_array)))


def bootstrap_indices(n_items: int, n_resamples: int, seed: int) -> NDArray[np.int64]:
    """Draw ``n_resamples`` resamples of ``n_items`` indices with replacement.

    The draw is ``numpy.random.default_rng(seed).integers(0, n_items, (n_resamples, n_items))``,
    so a result can be reproduced from the seed alone.
    """
    if n_items < 1:
        raise ValueError("bootstrap needs at least one item")
    if n_resamples < 1:
        raise ValueError(f"n_resamples {n_resamples} is invalid: use 1 or more")
    return np.random.default_rng(seed).integers(0, n_items, size=(n_resamples, n_items))


def bootstrap_interval(
    labels: ArrayLike,
    scores: ArrayLike,
    metric: Callable[[ArrayLike, ArrayLike], MetricValue],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapInterval:
    """Compute a percentile bootstrap interval of ``metric`` by resampling items (slides).

    Parameters
    ----------
    labels, scores
        One label (0 normal, 1 tumour) and one score per slide.
    metric
        :func:`roc_auc` or :func:`average_precision`.
    n_resamples
        Number of resamples drawn with :func:`bootstrap_indices`.
    confidence
        Central coverage of the interval, e.g. 0.95 for the 2.5th and 97.5th percentiles.
    seed
        Seed of the resampling, so the interval is reproducible.

    Returns
    -------
    BootstrapInterval
        ``low`` and ``high`` are ``None`` when no resample had both classes.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} is invalid: use a value between 0 and 1, e.g. 0.95")
    labels_array, scores_array = _binary_inputs(labels, scores)
    if labels_array.size == 0:
        return BootstrapInterval(None, None, confidence, n_resamples, 0)

    values = []
    for indices in bootstrap_indices(labels_array.size, n_resamples, seed):
        value = metric(labels_array[indices], scores_array[indices]).value
        if value is not None:
            values.append(value)
    if not values:
        return BootstrapInterval(None, None, confidence, n_resamples, 0)

    tail_percent = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail_percent, 100 - tail_percent])
    return BootstrapInterval(float(low), float(high), confidence, n_resamples, len(values))


def _segmentation_inputs(
    predicted: ArrayLike, truth: ArrayLike, valid: ArrayLike | None
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    predicted_array = np.asarray(predicted, dtype=bool)
    truth_array = np.asarray(truth, dtype=bool)
    if predicted_array.shape != truth_array.shape:
        raise ValueError(
            f"prediction and truth grids differ in shape: {predicted_array.shape} and {truth_array.shape}"
        )
    if valid is None:
        return predicted_array.ravel(), truth_array.ravel()
    valid_array = np.asarray(valid, dtype=bool)
    if valid_array.shape != truth_array.shape:
        raise ValueError(f"valid-cell grid has shape {valid_array.shape}, expected {truth_array.shape}")
    return predicted_array[valid_array], truth_array[valid_array]


def dice(predicted: ArrayLike, truth: ArrayLike, valid: ArrayLike | None = None) -> MetricValue:
    """Compute the Dice coefficient 2|P∩T| / (|P| + |T|) over the valid cells of a patch grid.

    An empty prediction of an empty truth is a perfect result, so it gives 1.
    """
    predicted_cells, truth_cells = _segmentation_inputs(predicted, truth, valid)
    total = int(predicted_cells.sum() + truth_cells.sum())
    if total == 0:
        return MetricValue(1.0, "empty truth and empty prediction")
    return MetricValue(2.0 * int((predicted_cells & truth_cells).sum()) / total)


def iou(predicted: ArrayLike, truth: ArrayLike, valid: ArrayLike | None = None) -> MetricValue:
    """Compute the intersection over union |P∩T| / |P∪T| over the valid cells; 1 when both are empty."""
    predicted_cells, truth_cells = _segmentation_inputs(predicted, truth, valid)
    union = int((predicted_cells | truth_cells).sum())
    if union == 0:
        return MetricValue(1.0, "empty truth and empty prediction")
    return MetricValue(int((predicted_cells & truth_cells).sum()) / union)


def true_negative_rate(predicted: ArrayLike, truth: ArrayLike, valid: ArrayLike | None = None) -> MetricValue:
    """Compute the true negative rate TN / (TN + FP) over the valid cells whose truth is negative.

    Undefined when no valid cell is negative.
    """
    predicted_cells, truth_cells = _segmentation_inputs(predicted, truth, valid)
    negatives = ~truth_cells
    n_negative = int(negatives.sum())
    if n_negative == 0:
        return MetricValue(None, "no negative cells")
    return MetricValue(int((negatives & ~predicted_cells).sum()) / n_negative)
