"""Evaluation metrics against scikit-learn and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from napari_anopilad.training.metrics import (
    average_precision,
    bootstrap_indices,
    bootstrap_interval,
    dice,
    iou,
    roc_auc,
    true_negative_rate,
)

LABELS = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0])
SCORES = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.65, 0.3, 0.7, 0.05])


def test_roc_auc_equals_sklearn():
    assert roc_auc(LABELS, SCORES).value == pytest.approx(roc_auc_score(LABELS, SCORES))


def test_roc_auc_hand_computed():
    # Pairs (tumour, normal) ranked correctly: 0.9 and 0.8 beat both normals, 0.3 beats 0.1 only.
    value = roc_auc([0, 0, 1, 1, 1], [0.1, 0.5, 0.9, 0.8, 0.3]).value
    assert value == pytest.approx(5 / 6)


def test_roc_auc_counts_ties_as_half():
    assert roc_auc([0, 1], [0.5, 0.5]).value == pytest.approx(0.5)


def test_average_precision_equals_sklearn():
    assert average_precision(LABELS, SCORES).value == pytest.approx(average_precision_score(LABELS, SCORES))


def test_average_precision_hand_computed():
    # Ranked: 1 (P=1, R=1/2), 0, 1 (P=2/3, R=1): AP = 1/2 * 1 + 1/2 * 2/3.
    value = average_precision([1, 0, 1], [0.9, 0.8, 0.7]).value
    assert value == pytest.approx(0.5 + 1 / 3)


@pytest.mark.parametrize("metric", [roc_auc, average_precision])
def test_one_class_is_undefined(metric):
    result = metric([0, 0, 0], [0.1, 0.2, 0.3])
    assert result.value is None
    assert "one class only" in result.reason


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="same length"):
        roc_auc([0, 1], [0.1])


def test_nan_scores_raise():
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, np.nan])


def test_bootstrap_matches_resampling_by_hand():
    interval = bootstrap_interval(LABELS, SCORES, roc_auc, n_resamples=100, confidence=0.9, seed=3)

    draws = np.random.default_rng(3).integers(0, LABELS.size, size=(100, LABELS.size))
    values = [
        roc_auc_score(LABELS[indices], SCORES[indices])
        for indices in draws
        if 0 < LABELS[indices].sum() < LABELS.size
    ]
    assert interval.n_valid == len(values)
    assert interval.low == pytest.approx(np.percentile(values, 5))
    assert interval.high == pytest.approx(np.percentile(values, 95))
    assert interval.low <= roc_auc(LABELS, SCORES).value <= interval.high


def test_bootstrap_of_perfect_separation_is_one():
    interval = bootstrap_interval([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], roc_auc, n_resamples=100, seed=0)
    assert interval.low == 1.0
    assert interval.high == 1.0
    # With 4 slides, a resample is one class only with probability 2 / 16.
    assert 70 < interval.n_valid < 100


def test_bootstrap_is_seeded():
    first = bootstrap_interval(LABELS, SCORES, average_precision, n_resamples=50, seed=7)
    second = bootstrap_interval(LABELS, SCORES, average_precision, n_resamples=50, seed=7)
    assert first == second
    assert np.array_equal(bootstrap_indices(5, 3, 1), bootstrap_indices(5, 3, 1))


def test_bootstrap_of_one_class_is_undefined():
    interval = bootstrap_interval([1, 1], [0.1, 0.2], roc_auc, n_resamples=10)
    assert interval.low is None
    assert interval.n_valid == 0


PREDICTED = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
TRUTH = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=bool)


def test_dice_hand_computed():
    # |P| = 3, |T| = 3, |P ∩ T| = 2.
    assert dice(PREDICTED, TRUTH).value == pytest.approx(4 / 6)


def test_iou_hand_computed():
    # |P ∪ T| = 4.
    assert iou(PREDICTED, TRUTH).value == pytest.approx(2 / 4)


def test_true_negative_rate_hand_computed():
    # 6 negative cells, one of them predicted positive.
    assert true_negative_rate(PREDICTED, TRUTH).value == pytest.approx(5 / 6)


def test_valid_mask_drops_cells():
    valid = np.ones((3, 3), dtype=bool)
    valid[0, 1] = False  # the false positive
    valid[1, 2] = False  # the false negative
    assert dice(PREDICTED, TRUTH, valid).value == pytest.approx(1.0)
    assert iou(PREDICTED, TRUTH, valid).value == pytest.approx(1.0)
    assert true_negative_rate(PREDICTED, TRUTH, valid).value == pytest.approx(1.0)


def test_empty_truth_and_prediction_give_one():
    empty = np.zeros((2, 2), dtype=bool)
    assert dice(empty, empty).value == 1.0
    assert iou(empty, empty).value == 1.0


def test_empty_truth_with_prediction_gives_zero():
    empty = np.zeros((2, 2), dtype=bool)
    assert dice(~empty, empty).value == 0.0
    assert true_negative_rate(~empty, empty).value == 0.0


def test_true_negative_rate_without_negatives_is_undefined():
    full = np.ones((2, 2), dtype=bool)
    assert true_negative_rate(full, full).value is None


def test_segmentation_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        dice(np.zeros((2, 2)), np.zeros((3, 2)))
