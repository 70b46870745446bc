"""Triage maths: memory bank, kNN distance, keyword statistics, calibration and the diffusion order.

Checked against brute-force numpy loops, scikit-learn's Ledoit-Wolf estimator, scipy's Mahalanobis distance
and hand-worked cases.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import ledoit_wolf

from napari_anopilad.method.triage import (
    TriageReferenceError,
    build_triage_reference,
    order_cells_by_triage,
    read_triage_reference,
    save_triage_reference,
    triage_order,
)
from napari_anopilad.method.triage_bank import (
    build_memory_bank,
    greedy_coreset,
    knn_cosine_distances,
    spherical_kmeans,
)
from napari_anopilad.method.triage_stats import (
    ScoreStatistics,
    fit_keyword_statistics,
    ledoit_wolf_covariance,
    mahalanobis_distances,
)


def unit_rows(rng: np.random.Generator, count: int, width: int) -> np.ndarray:
    rows = rng.normal(size=(count, width))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def circle_points(degrees: list[float]) -> torch.Tensor:
    radians = np.deg2rad(degrees)
    return torch.tensor(np.stack([np.cos(radians), np.sin(radians)], axis=1), dtype=torch.float64)


def brute_force_knn(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    result = []
    for query in queries:
        distances = sorted(1.0 - float(np.dot(query, row)) for row in bank)
        result.append(sum(max(distance, 0.0) for distance in distances[:k]) / k)
    return np.array(result)


def brute_force_covering_radius(points: np.ndarray, centres: np.ndarray) -> float:
    return max(min(1.0 - float(np.dot(point, centre)) for centre in centres) for point in points)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_knn_matches_brute_force(k: int) -> None:
    rng = np.random.default_rng(k)
    bank = unit_rows(rng, 40, 12)
    queries = unit_rows(rng, 25, 12)

    expected = brute_force_knn(queries, bank, k)
    actual_float64 = knn_cosine_distances(torch.from_numpy(queries), torch.from_numpy(bank), k).numpy()
    actual_float32 = knn_cosine_distances(
        torch.from_numpy(queries).float(), torch.from_numpy(bank).float(), k
    )

    np.testing.assert_allclose(actual_float64, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(actual_float32.double().numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_knn_ties_match_brute_force(k: int) -> None:
    rng = np.random.default_rng(10 + k)
    distinct = unit_rows(rng, 5, 6)
    # Each bank row appears twice, and some queries are bank rows, so several neighbours are equally far.
    bank = np.concatenate([distinct, distinct, unit_rows(rng, 3, 6)])
    queries = np.concatenate([distinct[:3], unit_rows(rng, 4, 6)])

    expected = brute_force_knn(queries, bank, k)
    actual = knn_cosine_distances(torch.from_numpy(queries), torch.from_numpy(bank), k).numpy()

    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12)
    if k <= 2:
        np.testing.assert_allclose(actual[:3], 0.0, atol=1e-12)


def test_knn_rejects_invalid_k_and_width() -> None:
    bank = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="k = 4 is invalid"):
        knn_cosine_distances(bank, bank, 4)
    with pytest.raises(ValueError, match="another CONCH model"):
        knn_cosine_distances(torch.eye(4, dtype=torch.float64), bank, 1)


def test_coreset_hand_case() -> None:
    # Three clusters on the unit circle. From 0 degrees the farthest point is 200 degrees (1 - cos 200 = 1.94);
    # then 100 degrees (min distance 1 - cos 100 = 1.17) beats 102 degrees (min(1 - cos 102, 1 - cos 98) = 1.14).
    # The farthest remaining point is then 4 degrees, at 1 - cos 4 from the centre at 0.
    points = circle_points([0, 2, 4, 100, 102, 200])

    indices, radius, selection_radii = greedy_coreset(points, 3, start=0)

    assert indices.tolist() == [0, 5, 3]
    assert radius == pytest.approx(1 - math.cos(math.radians(4)), abs=1e-12)
    assert selection_radii[0] == math.inf
    assert selection_radii[1] == pytest.approx(1 - math.cos(math.radians(200)), abs=1e-12)
    assert selection_radii[2] == pytest.approx(1 - math.cos(math.radians(100)), abs=1e-12)
    assert radius == pytest.approx(
        brute_force_covering_radius(points.numpy(), points[indices].numpy()), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(6))
def test_coreset_covering_radius_properties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    points = torch.from_numpy(unit_rows(rng, 10, 3))
    size = 3

    indices, radius, selection_radii = greedy_coreset(points, size, seed=seed)
    centres = points[indices].numpy()

    assert len(set(indices.tolist())) == size
    assert radius == pytest.approx(brute_force_covering_radius(points.numpy(), centres), abs=1e-12)
    assert np.all(np.diff(selection_radii.numpy()[1:]) <= 1e-12)
    assert radius <= selection_radii[-1] + 1e-12
    for first, second in itertools.combinations(centres, 2):
        assert 1.0 - float(np.dot(first, second)) >= radius - 1e-12

    optimum = min(
        brute_force_covering_radius(points.numpy(), points.numpy()[list(subset)])
        for subset in itertools.combinations(range(len(points)), size)
    )
    # Greedy k-center is a 2-approximation in the chordal metric sqrt(2 (1 - cos)).
    assert math.sqrt(2 * radius) <= 2 * math.sqrt(2 * optimum) + 1e-12


def test_coreset_seeded_and_stops_on_duplicates() -> None:
    rng = np.random.default_rng(3)
    points = torch.from_numpy(unit_rows(rng, 30, 8))
    first, _, _ = greedy_coreset(points, 10, seed=5)
    second, _, _ = greedy_coreset(points, 10, seed=5)
    assert torch.equal(first, second)

    duplicated = torch.cat([points[:2]] * 4)
    indices, radius, _ = greedy_coreset(duplicated, 5, start=0)
    assert sorted(duplicated[indices].tolist()) == sorted(points[:2].tolist())
    assert radius == pytest.approx(0.0, abs=1e-12)


def test_kmeans_finds_separated_clusters() -> None:
    rng = np.random.default_rng(4)
    axes = np.eye(3)
    members = [axis + 0.05 * rng.normal(size=(8, 3)) for axis in axes]
    points = np.concatenate(members)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    expected = [points[8 * index : 8 * (index + 1)].mean(axis=0) for index in range(3)]
    expected = [centre / np.linalg.norm(centre) for centre in expected]

    centres = spherical_kmeans(torch.from_numpy(points), 3, seed=1).numpy()
    again = spherical_kmeans(torch.from_numpy(points), 3, seed=1).numpy()

    np.testing.assert_array_equal(centres, again)
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1.0, atol=1e-12)
    matched = sorted(centres.tolist(), key=lambda centre: int(np.argmax(centre)))
    np.testing.assert_allclose(matched, expected, atol=1e-12)


def test_memory_bank_methods() -> None:
    rng = np.random.default_rng(5)
    points = torch.from_numpy(unit_rows(rng, 50, 6)).float()

    coreset = build_memory_bank(points, 12, "coreset", seed=2)
    kmeans = build_memory_bank(points, 12, "kmeans", seed=2)
    everything = build_memory_bank(points, 80, "coreset")

    assert coreset.embeddings.shape == (12, 6)
    assert coreset.source_indices is not None
    assert torch.equal(coreset.embeddings, points[coreset.source_indices])
    assert coreset.covering_radius == pytest.approx(
        float(knn_cosine_distances(points, coreset.embeddings).max()), abs=1e-6
    )
    assert kmeans.embeddings.shape == (12, 6)
    assert kmeans.method == "kmeans"
    assert kmeans.covering_radius == pytest.approx(
        float(knn_cosine_distances(points, kmeans.embeddings).max()), abs=1e-6
    )
    assert everything.method == "all"
    assert torch.equal(everything.embeddings, points)
    with pytest.raises(ValueError, match="not L2-normalised"):
        build_memory_bank(points * 2, 5)
    with pytest.raises(ValueError, match="bank method 'median' is invalid"):
        build_memory_bank(points, 5, "median")


@pytest.mark.parametrize("count", [5, 40, 200])
def test_ledoit_wolf_matches_scikit_learn(count: int) -> None:
    rng = np.random.default_rng(count)
    # Correlated columns with a shared level, as keyword similarities have.
    samples = rng.normal(size=(count, 1)) + 0.3 * rng.normal(size=(count, 20)) @ rng.normal(size=(20, 20))

    covariance, shrinkage = ledoit_wolf_covariance(samples)
    expected_covariance, expected_shrinkage = ledoit_wolf(samples)

    assert shrinkage == pytest.approx(expected_shrinkage, rel=1e-10)
    np.testing.assert_allclose(covariance, expected_covariance, rtol=1e-10, atol=1e-12)


def test_mahalanobis_matches_scipy() -> None:
    rng = np.random.default_rng(7)
    normal = rng.normal(size=(30, 8)) @ rng.normal(size=(8, 8))
    statistics = fit_keyword_statistics(normal)
    queries = rng.normal(size=(6, 8))

    expected = [mahalanobis(query, statistics.centroid, statistics.precision) for query in queries]

    np.testing.assert_allclose(
        mahalanobis_distances(queries, statistics.centroid, statistics.precision), expected, rtol=1e-10
    )
    np.testing.assert_allclose(statistics.precision @ statistics.covariance, np.eye(8), atol=1e-8)


def test_keyword_statistics_with_fewer_patches_than_keywords() -> None:
    rng = np.random.default_rng(8)
    # 6 patches, 74 keywords: the sample covariance has rank 5, the shrunk one is invertible.
    statistics = fit_keyword_statistics(rng.normal(size=(6, 74)))
    assert 0 < statistics.shrinkage <= 1
    assert np.all(np.linalg.eigvalsh(statistics.covariance) > 0)
    with pytest.raises(ValueError, match="all identical"):
        fit_keyword_statistics(np.ones((4, 74)))


def test_score_statistics_population_std() -> None:
    values = [0.1, 0.4, 0.2, 0.9]
    statistics = ScoreStatistics.from_values(values, "test")
    assert statistics.mean == pytest.approx(np.mean(values))
    assert statistics.std == pytest.approx(np.std(values, ddof=0))
    np.testing.assert_allclose(statistics.zscores([0.4]), [(0.4 - np.mean(values)) / np.std(values)])
    with pytest.raises(ValueError, match="not all at the same distance"):
        ScoreStatistics.from_values([0.3, 0.3, 0.3], "test")
    with pytest.raises(ValueError, match="at least 2"):
        ScoreStatistics.from_values([0.3], "test")


def test_order_cells_hand_case() -> None:
    # A 3 x 4 tissue region with (1, 3) missing (background):
    #   row 0:  0.5  -1.0   2.0   0.1
    #   row 1:  0.0   3.0   NaN    -
    #   row 2: -2.0   0.2   1.0  -0.5
    cells = np.array([[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2], [2, 3]])
    z = np.array([0.5, -1.0, 2.0, 0.1, 0.0, 3.0, np.nan, -2.0, 0.2, 1.0, -0.5])

    # 5 % of 11 cells rounds up to 1: the top cell (1, 1) and its 8 neighbours, which excludes column 3.
    ordered = order_cells_by_triage(cells, z, budget_fraction=0.05)
    assert ordered.tolist() == [[1, 1], [0, 2], [2, 2], [0, 0], [2, 1], [1, 0], [0, 1], [2, 0], [1, 2]]

    # 10 % rounds up to 2 cells: (1, 1) and (0, 2), whose neighbours add (0, 3).
    ordered = order_cells_by_triage(cells, z, budget_fraction=0.1)
    assert ordered.tolist() == [
        [1, 1],
        [0, 2],
        [2, 2],
        [0, 0],
        [2, 1],
        [0, 3],
        [1, 0],
        [0, 1],
        [2, 0],
        [1, 2],
    ]

    alone = order_cells_by_triage(cells, z, budget_fraction=0.05, include_neighbours=False)
    assert alone.tolist() == [[1, 1]]

    # 20 % rounds up to 3 cells: (1, 1), (0, 2), (2, 2); (0, 2) and (2, 2) add column 3.
    wider = order_cells_by_triage(cells, z, budget_fraction=0.2)
    assert wider.tolist() == [
        [1, 1],
        [0, 2],
        [2, 2],
        [0, 0],
        [2, 1],
        [0, 3],
        [1, 0],
        [2, 3],
        [0, 1],
        [2, 0],
        [1, 2],
    ]

    everything = triage_order(cells, z, budget_fraction=1.0, include_neighbours=False)
    # Without neighbours the unscored (1, 2) stays out even at a fraction of 1.
    assert everything.tolist() == [5, 2, 9, 0, 8, 3, 4, 10, 1, 7]
    assert order_cells_by_triage(cells, z, budget_fraction=0.0).shape == (0, 2)


def test_order_cells_ties_and_errors() -> None:
    cells = np.array([[5, 5], [0, 9], [0, 1]])
    assert order_cells_by_triage(cells, [1.0, 1.0, 1.0], 1.0).tolist() == [[0, 1], [0, 9], [5, 5]]
    ten_cells = np.array([[0, 3 * col] for col in range(10)])
    assert len(order_cells_by_triage(ten_cells, np.arange(10.0), budget_fraction=0.3)) == 3
    assert len(order_cells_by_triage(ten_cells, np.full(10, np.nan), budget_fraction=0.3)) == 0
    with pytest.raises(ValueError, match="more than once"):
        order_cells_by_triage(np.array([[0, 0], [0, 0]]), [1.0, 2.0])
    with pytest.raises(ValueError, match="one z-score per cell"):
        order_cells_by_triage(cells, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"budget fraction 1\.5 is invalid"):
        order_cells_by_triage(cells, [1.0, 2.0, 3.0], budget_fraction=1.5)
    with pytest.raises(ValueError, match=r"integer \(n, 2\)"):
        order_cells_by_triage(np.array([[0.5, 1.0]]), [1.0])


def random_reference(seed: int = 0, k: int = 3):
    rng = np.random.default_rng(seed)
    train = torch.from_numpy(unit_rows(rng, 60, 16)).float()
    validation = torch.from_numpy(unit_rows(rng, 12, 16)).float()
    keywords = unit_rows(rng, 74, 16)
    return build_triage_reference(
        train,
        train.double().numpy() @ keywords.T,
        validation,
        validation.double().numpy() @ keywords.T,
        conch_hash="conch-hash",
        keyword_key="keyword-key",
        bank_size=20,
        k=k,
        seed=seed,
        sources={"train": "synthetic"},
    )


def test_reference_calibration_matches_validation() -> None:
    rng = np.random.default_rng(0)
    unit_rows(rng, 60, 16)
    validation = torch.from_numpy(unit_rows(rng, 12, 16)).float()
    reference = random_reference(0)

    assert reference.memory_bank.shape == (20, 16)
    assert sorted(reference.knn_calibration) == [1, 3, 5, 10]
    for k, statistics in reference.knn_calibration.items():
        distances = brute_force_knn(validation.double().numpy(), reference.memory_bank.double().numpy(), k)
        assert statistics.mean == pytest.approx(distances.mean(), abs=1e-6)
        assert statistics.std == pytest.approx(distances.std(ddof=0), abs=1e-6)
        assert statistics.count == 12


def test_reference_round_trip(tmp_path) -> None:
    reference = random_reference(1, k=5)
    save_triage_reference(reference, tmp_path)
    loaded = read_triage_reference(tmp_path)

    assert torch.equal(loaded.memory_bank, reference.memory_bank)
    np.testing.assert_array_equal(loaded.keyword_statistics.precision, reference.keyword_statistics.precision)
    np.testing.assert_array_equal(loaded.keyword_statistics.centroid, reference.keyword_statistics.centroid)
    assert loaded.knn_calibration == reference.knn_calibration
    assert loaded.keyword_calibration == reference.keyword_calibration
    assert loaded.k == 5
    assert loaded.bank_method == "coreset"
    assert loaded.covering_radius == reference.covering_radius
    assert loaded.sources == {"train": "synthetic"}
    assert loaded.identity == reference.identity
    assert random_reference(2).identity != reference.identity
    with pytest.raises(TriageReferenceError, match="no kNN calibration for k = 4"):
        loaded.knn_statistics(4)


def test_reference_files_checked(tmp_path) -> None:
    with pytest.raises(TriageReferenceError, match=r"build_triage_reference\.py"):
        read_triage_reference(tmp_path)

    save_triage_reference(random_reference(1), tmp_path)
    sidecar_path = tmp_path / "triage" / "reference.json"
    sidecar = json.loads(sidecar_path.read_text())

    save_triage_reference(random_reference(2), tmp_path / "other")
    (tmp_path / "triage" / "reference.safetensors").write_bytes(
        (tmp_path / "other" / "triage" / "reference.safetensors").read_bytes()
    )
    with pytest.raises(TriageReferenceError, match="does not match the SHA-256"):
        read_triage_reference(tmp_path)

    save_triage_reference(random_reference(1), tmp_path)
    sidecar_path.write_text(json.dumps({**sidecar, "format_version": 99}))
    with pytest.raises(TriageReferenceError, match="format_version 99"):
        read_triage_reference(tmp_path)

    sidecar_path.write_text(json.dumps({**sidecar, "keyword_count": 70}))
    with pytest.raises(TriageReferenceError, match="invalid"):
        read_triage_reference(tmp_path)
