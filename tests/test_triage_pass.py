"""Tests of the triage pass: its store, the pass over the real CMU slide, the map and the diffusion plan."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from napari_anopilad.engine.store import grid_description
from napari_anopilad.engine.triage_pass import (
    TriagePass,
    TriagePatches,
    TriageSettings,
    TriageStore,
    compute_triage_results,
    diffusion_budget,
    open_triage_store,
    plan_diffusion,
    run_triage_pass,
)
from napari_anopilad.method.heatmap import erode_heatmap
from napari_anopilad.method.triage import TriageScorer, order_cells_by_triage

# Level-0 box over tissue of CMU-1-Small-Region (x, y, width, height): rows 8-9, cols 3-6, eight tissue cells.
REGION_LEVEL0 = (800, 2100, 900, 400)


@pytest.fixture(scope="module")
def opened(cmu_slide_path: Path, demo_bundle_dir: Path):
    from napari_anopilad.engine.outputs import cells_in_region
    from napari_anopilad.method.bundle import load_bundle
    from napari_anopilad.slide import build_patch_grid, open_slide

    slide = open_slide(cmu_slide_path)
    grid = build_patch_grid(slide)
    bundle = load_bundle(demo_bundle_dir)
    scorer = TriageScorer(bundle, "cpu", batch_size=4)
    cells = cells_in_region(grid, np.asarray(grid.tissue_cells(), dtype=np.int64), REGION_LEVEL0)
    yield slide, grid, bundle, scorer, cells
    slide.close()


def _store(root: Path, opened) -> TriageStore:
    slide, grid, bundle, scorer, _ = opened
    return open_triage_store(root, slide, bundle, scorer, grid)


def test_demo_bundle_has_triage_reference(demo_bundle_dir: Path) -> None:
    from napari_anopilad.method.triage import read_triage_reference

    reference = read_triage_reference(demo_bundle_dir)

    assert reference.demo is True
    # Three normal tiles, rotated by 0 and 180 degrees for the bank and by 90 and 270 for calibration.
    assert reference.train_count == 6
    assert reference.knn_calibration[reference.k].count == 6


def test_pass_matches_scorer(opened, tmp_path: Path) -> None:
    from napari_anopilad.slide import read_patches

    slide, grid, _, scorer, cells = opened
    store = _store(tmp_path, opened)
    triage_pass = TriagePass(slide, grid, scorer, store, cells=cells, batch_size=3)

    batches = list(triage_pass.run())

    assert [len(batch.cells) for batch in batches] == [3, 3, 2]
    assert batches[-1].n_done == batches[-1].n_total == len(cells) == 8
    stored = store.load()
    expected = scorer.score(read_patches(slide, grid, stored.cells()))
    np.testing.assert_allclose(stored.knn_distance, expected.knn_distance, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stored.keyword_distance, expected.keyword_distance, rtol=1e-6)
    np.testing.assert_allclose(stored.knn_z, expected.knn_z, rtol=1e-5)
    np.testing.assert_allclose(stored.keyword_z, expected.keyword_z, rtol=1e-6)
    assert {tuple(cell) for cell in stored.cells().tolist()} == {tuple(cell) for cell in cells.tolist()}


class MemoryLimitedTriageScorer:
    """The real triage scorer behind a patch limit that raises torch's out-of-memory error above it."""

    def __init__(self, scorer: TriageScorer, max_patches: int) -> None:
        self.scorer = scorer
        self.max_patches = max_patches
        self.device = scorer.device
        self.batch_sizes: list[int] = []

    def score(self, images_uint8: np.ndarray):
        import torch

        self.batch_sizes.append(len(images_uint8))
        if len(images_uint8) > self.max_patches:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 1.00 GiB for {len(images_uint8)}"
            )
        return self.scorer.score(images_uint8)

    def __getattr__(self, name: str):
        return getattr(self.scorer, name)


def test_pass_halves_batch_after_out_of_memory(opened, tmp_path: Path, caplog) -> None:
    from napari_anopilad.engine.session import OutOfMemoryAtBatchSizeOne
    from napari_anopilad.slide import read_patches

    slide, grid, _, scorer, cells = opened
    store = _store(tmp_path, opened)
    limited = MemoryLimitedTriageScorer(scorer, max_patches=2)
    triage_pass = TriagePass(slide, grid, limited, store, cells=cells, batch_size=5)

    batches = list(triage_pass.run())

    # 5 fails and goes on as 2 + 2 + 1; the second read batch of 3 is split at the new size, 2 + 1.
    assert limited.batch_sizes == [5, 2, 2, 1, 2, 1]
    assert [len(batch.cells) for batch in batches] == [2, 2, 1, 2, 1]
    assert triage_pass.batch_size == 2
    assert batches[-1].n_done == len(cells)
    assert any("ran out of memory on a batch of 5 patches" in record.message for record in caplog.records)
    stored = store.load()
    assert len(stored) == len(cells)
    expected = scorer.score(read_patches(slide, grid, stored.cells()))
    np.testing.assert_allclose(stored.knn_distance, expected.knn_distance, rtol=1e-5, atol=1e-7)

    # Out of memory on a single patch cannot be helped by halving.
    single = TriagePass(
        slide, grid, MemoryLimitedTriageScorer(scorer, 0), _store(tmp_path / "b", opened), cells=cells
    )
    with pytest.raises(OutOfMemoryAtBatchSizeOne, match="single patch"):
        list(single.run())


def test_pass_resumes_after_cancel(opened, tmp_path: Path) -> None:
    slide, grid, _, scorer, cells = opened
    store = _store(tmp_path, opened)
    first = TriagePass(slide, grid, scorer, store, cells=cells, batch_size=3)
    run = first.run()
    next(run)
    first.cancel()
    assert list(run) == []
    assert len(store.load()) == 3

    second = TriagePass(slide, grid, scorer, _store(tmp_path, opened), cells=cells, batch_size=3)
    batches = list(second.run())

    assert second.n_reused == 3
    assert sum(len(batch.cells) for batch in batches) == 5
    assert len(store.load()) == 8


def test_store_ignores_unfinished_files(opened, tmp_path: Path) -> None:
    slide, grid, _, scorer, cells = opened
    store = _store(tmp_path, opened)
    list(TriagePass(slide, grid, scorer, store, cells=cells[:2], batch_size=2).run())
    # A temporary file of a killed write and a truncated batch file count as missing, not as scores.
    (store.folder / ".tmp-1-abcd-batch-00000009-00000000.npz").write_bytes(b"partial")
    (store.folder / "batch-00000005-0123abcd.npz").write_bytes(b"PK\x03\x04 truncated")

    assert len(store.load()) == 2
    assert store.done_cells() == {tuple(cell) for cell in cells[:2].tolist()}


def test_store_rejects_other_keys(opened, tmp_path: Path) -> None:
    slide, grid, bundle, scorer, _ = opened
    store = _store(tmp_path, opened)
    manifest = store.folder / "manifest.json"
    manifest.write_text(manifest.read_text().replace(slide.identity, "another-slide"))

    with pytest.raises(ValueError, match="belongs to another slide"):
        _store(tmp_path, opened)
    other_k = TriageStore(
        tmp_path, slide.identity, bundle.identity, scorer.reference.identity, 3, grid_description(grid)
    )
    assert other_k.folder != store.folder


def test_results_match_heatmap_maths(opened, tmp_path: Path) -> None:
    slide, grid, _, scorer, cells = opened
    store = _store(tmp_path, opened)
    list(TriagePass(slide, grid, scorer, store, cells=cells[:6]).run())

    results = compute_triage_results(store, grid, "keyword_distance", cells=cells, threshold=0.5)

    stored = store.load()
    expected = np.full(grid.shape, np.nan, dtype=np.float32)
    expected[stored.rows, stored.cols] = stored.keyword_z
    np.testing.assert_array_equal(results.heatmap, expected)
    np.testing.assert_array_equal(results.heatmap_eroded, erode_heatmap(expected))
    finite = results.heatmap_eroded[np.isfinite(results.heatmap_eroded)]
    assert results.z_max == pytest.approx(float(finite.max()))
    assert results.n_patches == 6
    assert results.n_tissue_patches == 8
    assert results.coverage == pytest.approx(0.75)
    assert results.scorer_name == "triage:keyword_distance"
    assert results.k == scorer.k
    np.testing.assert_array_equal(results.mask, np.nan_to_num(results.heatmap_eroded, nan=-np.inf) > 0.5)


def _brute_force_budget(
    cells: np.ndarray, z: np.ndarray, fraction: float, radius: int
) -> list[tuple[int, int]]:
    scored = [index for index in range(len(cells)) if np.isfinite(z[index])]
    ranked = sorted(scored, key=lambda index: (-z[index], cells[index][0], cells[index][1]))
    top = ranked[: min(int(np.ceil(round(fraction * len(cells), 9))), len(scored))]
    chosen = set(top)
    for index in range(len(cells)):
        for top_index in top:
            if (
                max(abs(cells[index][0] - cells[top_index][0]), abs(cells[index][1] - cells[top_index][1]))
                <= radius
            ):
                chosen.add(index)
    missing_last = sorted(
        chosen,
        key=lambda index: (
            not np.isfinite(z[index]),
            -np.nan_to_num(z[index]),
            cells[index][0],
            cells[index][1],
        ),
    )
    return [(int(cells[index][0]), int(cells[index][1])) for index in missing_last]


@pytest.mark.parametrize(("fraction", "radius"), [(0.1, 0), (0.1, 1), (0.05, 2), (0.3, 3), (0.0, 1)])
def test_budget_matches_brute_force(fraction: float, radius: int) -> None:
    generator = np.random.default_rng(7)
    all_cells = np.array(list(itertools.product(range(12), range(15))), dtype=np.int64)
    cells = all_cells[generator.random(len(all_cells)) < 0.6]
    z = generator.normal(size=len(cells)).round(1)  # rounded, so that equal z-scores occur
    z[generator.random(len(cells)) < 0.1] = np.nan

    budget, n_top = diffusion_budget(cells, z, fraction, radius)

    assert [tuple(cell) for cell in budget.tolist()] == _brute_force_budget(cells, z, fraction, radius)
    assert n_top == min(int(np.ceil(fraction * len(cells))), int(np.isfinite(z).sum()))


def test_budget_radius_one_equals_method_order() -> None:
    generator = np.random.default_rng(3)
    cells = np.array(list(itertools.product(range(9), range(9))), dtype=np.int64)
    z = generator.normal(size=len(cells))

    budget, _ = diffusion_budget(cells, z, 0.1, 1)

    np.testing.assert_array_equal(budget, order_cells_by_triage(cells, z, 0.1, include_neighbours=True))


def test_full_budget_keeps_every_cell() -> None:
    cells = np.array([[0, 0], [0, 5], [4, 4], [9, 9]], dtype=np.int64)
    z = np.array([0.5, np.nan, 2.0, -1.0])

    budget, n_top = diffusion_budget(cells, z, 1.0, 0)

    assert budget.tolist() == [[4, 4], [0, 0], [9, 9], [0, 5]]
    assert n_top == 3


def test_budget_rejects_invalid_values() -> None:
    cells = np.array([[0, 0]], dtype=np.int64)
    with pytest.raises(ValueError, match=r"triage budget 1\.5 is invalid"):
        diffusion_budget(cells, np.zeros(1), 1.5, 1)
    with pytest.raises(ValueError, match="neighbour radius -1 is invalid"):
        diffusion_budget(cells, np.zeros(1), 0.1, -1)
    with pytest.raises(ValueError, match="got \\(2,\\) z-scores for 1 cells"):
        diffusion_budget(cells, np.zeros(2), 0.1, 1)
    with pytest.raises(ValueError, match="triage score 'lpips' is invalid"):
        TriageSettings(score="lpips")


def test_plan_from_pass(opened, tmp_path: Path) -> None:
    slide, grid, _, scorer, cells = opened
    store = _store(tmp_path, opened)
    settings = TriageSettings(score="knn_distance", budget_fraction=0.25, neighbour_radius=0)

    results, plan, n_computed = run_triage_pass(slide, grid, scorer, store, cells, settings=settings)

    assert n_computed == 8
    assert plan.n_top == plan.n_budget == 2
    z_by_cell = {
        (int(r), int(c)): value for r, c, value in zip(results.patches.rows, results.patches.cols, results.z)
    }
    highest = sorted(z_by_cell, key=lambda cell: -z_by_cell[cell])[:2]
    assert [tuple(cell) for cell in plan.priority.tolist()] == highest
    assert [tuple(cell) for cell in plan.cells.tolist()] == sorted(highest)
    assert plan.to_dict()["n_budget"] == 2

    # A second run reuses every stored score.
    _, again, n_again = run_triage_pass(slide, grid, scorer, store, cells, settings=settings)
    assert n_again == 0
    np.testing.assert_array_equal(again.priority, plan.priority)


def test_plan_puts_unscored_cells_last() -> None:
    class Grid:
        shape = (3, 3)

        @staticmethod
        def tissue_cells() -> np.ndarray:
            return np.array(list(itertools.product(range(3), range(3))), dtype=np.int64)

    patches = TriagePatches(
        rows=np.array([1, 0]),
        cols=np.array([1, 0]),
        knn_distance=np.array([0.2, 0.1]),
        keyword_distance=np.array([5.0, 1.0]),
        knn_z=np.array([3.0, 1.0]),
        keyword_z=np.array([2.0, 0.0]),
    )
    results = compute_triage_results(patches, Grid(), "knn_distance")

    plan = plan_diffusion(results, Grid.tissue_cells(), budget_fraction=0.1, neighbour_radius=1)

    assert plan.priority[:2].tolist() == [[1, 1], [0, 0]]
    assert plan.n_budget == 9
    assert results.coverage == pytest.approx(2 / 9)
