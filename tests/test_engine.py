"""Tests of the analysis session, slide results and device choice, with the demo bundle on the CMU slide."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from napari_anopilad.engine.device import check_precision, choose_device, is_out_of_memory
from napari_anopilad.engine.results import compute_slide_results
from napari_anopilad.engine.session import AnalysisSession, OutOfMemoryAtBatchSizeOne
from napari_anopilad.engine.store import ResultStore, grid_description
from napari_anopilad.method.bundle import load_bundle
from napari_anopilad.method.heatmap import erode_heatmap
from napari_anopilad.method.scorer import AnoPILaDScorer
from napari_anopilad.slide import build_patch_grid, open_slide

# A 2x2 block of tissue cells of CMU-1-Small-Region (rows 8-9, cols 4-5, all fully tissue).
CELLS = [(8, 4), (8, 5), (9, 4), (9, 5)]


@pytest.fixture(scope="module")
def slide_and_grid(cmu_slide_path: Path) -> Iterator[tuple[Any, Any]]:
    with open_slide(cmu_slide_path) as slide:
        yield slide, build_patch_grid(slide)


@pytest.fixture(scope="module")
def bundle(demo_bundle_dir: Path) -> Any:
    return load_bundle(demo_bundle_dir)


@pytest.fixture(scope="module")
def scorer(bundle: Any) -> AnoPILaDScorer:
    return AnoPILaDScorer(bundle, "cpu")


def _store(root: Path, slide: Any, grid: Any, bundle: Any) -> ResultStore:
    return ResultStore(root, slide.identity, bundle.identity, bundle.settings, grid=grid_description(grid))


class CancelAtFirstStep:
    """The real scorer, with a user pressing cancel after the first denoising step of batch ``at_batch``."""

    def __init__(self, scorer: AnoPILaDScorer, at_batch: int) -> None:
        self.scorer = scorer
        self.settings = scorer.settings
        self.device = scorer.device
        self.at_batch = at_batch
        self.n_batches = 0
        self.session: AnalysisSession | None = None

    def score(
        self, images_uint8: Any, noise_keys: Any, return_reconstructions: bool = False, callback: Any = None
    ):
        self.n_batches += 1

        def press_cancel_then_continue(step: int, n_steps: int) -> bool | None:
            if self.session is not None and self.n_batches == self.at_batch and step == 0:
                self.session.cancel()
            return callback(step, n_steps) if callback is not None else None

        return self.scorer.score(images_uint8, noise_keys, return_reconstructions, press_cancel_then_continue)


class LimitedMemoryScorer:
    """The real scorer on a device that fits at most ``max_patches`` patches, as a small GPU would."""

    def __init__(self, scorer: AnoPILaDScorer, max_patches: int) -> None:
        self.scorer = scorer
        self.settings = scorer.settings
        self.device = scorer.device
        self.max_patches = max_patches
        self.batch_sizes: list[int] = []

    def score(
        self, images_uint8: Any, noise_keys: Any, return_reconstructions: bool = False, callback: Any = None
    ):
        self.batch_sizes.append(len(images_uint8))
        if len(images_uint8) > self.max_patches:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB for {len(images_uint8)} patches"
            )
        return self.scorer.score(images_uint8, noise_keys, return_reconstructions, callback)


def test_choose_device_auto_and_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_device("auto").type == expected
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device(" CPU ") == torch.device("cpu")


def test_choose_device_rejects_bad_requests() -> None:
    with pytest.raises(ValueError, match="is invalid"):
        choose_device("gpu")
    with pytest.raises(ValueError, match="not available"):
        choose_device(f"cuda:{torch.cuda.device_count() + 3}")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            choose_device("cuda")


def test_half_precision_only_on_gpu() -> None:
    check_precision(torch.device("cpu"), "float32")
    for precision in ("float16", "bfloat16"):
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            check_precision(torch.device("cpu"), precision)
        check_precision(torch.device("cuda", 0), precision)


def test_out_of_memory_detection() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_grid_description_of_real_grid(slide_and_grid: tuple[Any, Any]) -> None:
    _, grid = slide_and_grid
    description = grid_description(grid)
    assert description["patch_size_level0"] == 256
    assert description["shape"] == [11, 8]
    assert description["patch_size"] == 256
    assert description["read_level"] == 0


@pytest.fixture(scope="module")
def prioritized_run(
    tmp_path_factory: pytest.TempPathFactory,
    slide_and_grid: tuple[Any, Any],
    bundle: Any,
    scorer: AnoPILaDScorer,
) -> dict[str, Any]:
    """A session over CELLS with batch size 2 and two cells prioritised, cancelled after its first batch,
    then a second session on the same store that finishes the rest."""
    slide, grid = slide_and_grid
    store = _store(tmp_path_factory.mktemp("store"), slide, grid, bundle)
    session = AnalysisSession(slide, grid, scorer, store, cells=CELLS, batch_size=2)
    counts_before = (session.n_total, session.n_done, session.n_reused)
    session.prioritize([(9, 5), (9, 4), (0, 0)])

    first = []
    for batch in session.run():
        first.append(batch)
        session.cancel()
    after_cancel = {"remaining": session.n_remaining, "done_cells": store.done_cells()}

    resumed = AnalysisSession(slide, grid, scorer, store, cells=CELLS, batch_size=2)
    reused = resumed.n_reused
    later = list(resumed.run())
    return {
        "store": store,
        "counts_before": counts_before,
        "first": first,
        "after_cancel": after_cancel,
        "reused": reused,
        "later": later,
    }


def test_session_prioritized_cells_go_first(prioritized_run: dict[str, Any]) -> None:
    assert prioritized_run["counts_before"] == (4, 0, 0)
    first = prioritized_run["first"]
    assert len(first) == 1
    assert first[0].cells.tolist() == [[9, 5], [9, 4]]
    assert first[0].n_done == 2
    assert first[0].n_total == 4
    assert first[0].z_source == "calibration"
    assert first[0].patches_per_s > 0


def test_session_cancel_keeps_finished_batches(prioritized_run: dict[str, Any]) -> None:
    assert prioritized_run["after_cancel"]["remaining"] == 2
    assert prioritized_run["after_cancel"]["done_cells"] == {(9, 5), (9, 4)}


def test_session_resumes_from_store(prioritized_run: dict[str, Any]) -> None:
    store = prioritized_run["store"]
    later = prioritized_run["later"]
    assert prioritized_run["reused"] == 2
    assert [batch.cells.tolist() for batch in later] == [[[8, 4], [8, 5]]]
    assert later[-1].n_done == 4
    assert later[-1].n_reused == 2
    assert store.done_cells() == set(CELLS)
    # The first batch's scores come back unchanged from the store.
    stored = store.load()
    by_cell = {(int(r), int(c)): value for r, c, value in zip(stored.rows, stored.cols, stored.lpips)}
    first = prioritized_run["first"][0]
    for (row, col), value in zip(first.cells.tolist(), first.scores.lpips):
        assert by_cell[(row, col)] == value


def test_session_cancel_inside_batch(
    tmp_path: Path, slide_and_grid: tuple[Any, Any], bundle: Any, scorer: AnoPILaDScorer
) -> None:
    slide, grid = slide_and_grid
    store = _store(tmp_path, slide, grid, bundle)
    cancelling = CancelAtFirstStep(scorer, at_batch=2)
    session = AnalysisSession(slide, grid, cancelling, store, cells=CELLS, batch_size=2)
    cancelling.session = session

    batches = list(session.run())
    # The second batch stopped after one denoising step; the first one is stored.
    assert [batch.cells.tolist() for batch in batches] == [[[8, 4], [8, 5]]]
    assert cancelling.n_batches == 2
    assert store.done_cells() == {(8, 4), (8, 5)}
    assert session.n_remaining == 2
    assert not session.cancelled


def test_session_halves_batch_on_out_of_memory(
    tmp_path: Path,
    slide_and_grid: tuple[Any, Any],
    bundle: Any,
    scorer: AnoPILaDScorer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    slide, grid = slide_and_grid
    store = _store(tmp_path, slide, grid, bundle)
    limited = LimitedMemoryScorer(scorer, max_patches=2)
    session = AnalysisSession(slide, grid, limited, store, cells=CELLS, batch_size=4)

    with caplog.at_level(logging.WARNING, logger="napari_anopilad.engine.session"):
        batches = list(session.run())
    # The batch of 4 fails, so the session halves the batch size to 2 and scores it as 2 + 2.
    assert limited.batch_sizes == [4, 2, 2]
    assert [len(batch.cells) for batch in batches] == [2, 2]
    assert session.batch_size == 2
    assert store.done_cells() == set(CELLS)
    assert any("ran out of memory on a batch of 4 patches" in record.message for record in caplog.records)


def test_session_out_of_memory_at_batch_size_one(
    tmp_path: Path, slide_and_grid: tuple[Any, Any], bundle: Any, scorer: AnoPILaDScorer
) -> None:
    slide, grid = slide_and_grid
    store = _store(tmp_path, slide, grid, bundle)
    limited = LimitedMemoryScorer(scorer, max_patches=0)
    session = AnalysisSession(slide, grid, limited, store, cells=CELLS[:2], batch_size=2)
    with pytest.raises(OutOfMemoryAtBatchSizeOne, match="single patch"):
        list(session.run())
    assert limited.batch_sizes == [2, 1]
    assert store.done_cells() == set()
    assert session.n_remaining == 2


def test_slide_results_from_store(
    prioritized_run: dict[str, Any], slide_and_grid: tuple[Any, Any], bundle: Any
) -> None:
    _, grid = slide_and_grid
    store = prioritized_run["store"]
    calibration = bundle.calibration
    assert calibration is not None

    results = compute_slide_results(store, grid, bundle, threshold=0.0)
    assert results.z_source == "calibration"
    assert results.n_patches == 4
    expected_z = (results.scores - calibration.mean["lpips"]) / calibration.std["lpips"]
    np.testing.assert_allclose(results.z, expected_z, rtol=1e-12)
    first = prioritized_run["first"][0]
    np.testing.assert_allclose(
        first.z, (first.scores.lpips - calibration.mean["lpips"]) / calibration.std["lpips"]
    )

    assert results.heatmap.shape == grid.shape
    assert np.count_nonzero(~np.isnan(results.heatmap)) == 4
    np.testing.assert_array_equal(results.heatmap_eroded, erode_heatmap(results.heatmap))
    # The 2x2 block's bottom-right cell (9, 5) is the minimum of all four.
    assert results.heatmap_eroded[9, 5] == pytest.approx(float(np.nanmin(results.heatmap)))
    assert results.z_max == pytest.approx(float(np.nanmax(results.heatmap_eroded)))
    assert results.z_99 == pytest.approx(float(np.nanmax(results.heatmap_eroded)))

    threshold = float(np.median(results.z_eroded))
    raised = results.with_threshold(threshold)
    assert raised.mask.sum() == int(np.count_nonzero(results.z_eroded > threshold))
    assert not raised.mask[np.isnan(results.heatmap_eroded)].any()

    subset = compute_slide_results(store, grid, bundle, cells=CELLS[:3])
    assert subset.n_patches == 3
    within = compute_slide_results(store, grid, None)
    assert within.z_source == "within-slide"
    assert within.z.mean() == pytest.approx(0.0, abs=1e-9)
    assert within.z.std() == pytest.approx(1.0, rel=1e-9)


def test_session_rejects_cells_outside_grid(
    tmp_path: Path, slide_and_grid: tuple[Any, Any], bundle: Any, scorer: AnoPILaDScorer
) -> None:
    slide, grid = slide_and_grid
    store = _store(tmp_path, slide, grid, bundle)
    with pytest.raises(ValueError, match="outside the 11 x 8 patch grid"):
        AnalysisSession(slide, grid, scorer, store, cells=[(11, 0)])
    with pytest.raises(ValueError, match="batch_size 0 is invalid"):
        AnalysisSession(slide, grid, scorer, store, cells=CELLS, batch_size=0)


def test_batch_size_auto_and_invalid_values(
    tmp_path: Path, slide_and_grid: tuple[Any, Any], bundle: Any, scorer: AnoPILaDScorer
) -> None:
    from napari_anopilad.engine.device import CPU_BATCH_SIZE

    slide, grid = slide_and_grid
    store = _store(tmp_path, slide, grid, bundle)
    session = AnalysisSession(slide, grid, scorer, store, cells=CELLS, batch_size="auto")
    assert session.batch_size == CPU_BATCH_SIZE
    for bad in (0, "big"):
        with pytest.raises(ValueError, match=r"batch_size .* is invalid: use 1 or more, or 'auto'"):
            AnalysisSession(slide, grid, scorer, store, cells=CELLS, batch_size=bad)
