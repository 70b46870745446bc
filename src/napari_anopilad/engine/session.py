"""Analysis session: one slide, one scorer, a reprioritisable patch queue and one device worker.

The session is Qt-free so that the napari widgets and the command line drive the same code: the
widgets wrap :meth:`AnalysisSession.run` in a napari ``thread_worker`` and call :meth:`prioritize` and
:meth:`cancel` from the GUI thread; the command line iterates the generator directly.

Per batch, the thread that iterates :meth:`AnalysisSession.run` owns the device and scores patches,
a reader thread reads and decodes the next batch from the slide meanwhile, and a writer thread
stores the previous batch.
"""

from __future__ import annotations

import heapq
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_anopilad.engine.device import is_out_of_memory, release_cached_memory
from napari_anopilad.engine.results import Z_SOURCE_CALIBRATION, Z_SOURCE_WITHIN_SLIDE, too_few_patches_source
from napari_anopilad.engine.store import ResultStore
from napari_anopilad.method.heatmap import within_slide_stats, zscores
from napari_anopilad.slide import read_patches

logger = logging.getLogger(__name__)

# Seconds between checks of the cancel flag while the reader waits for room in its queue.
_POLL_S = 0.1


class OutOfMemoryAtBatchSizeOne(RuntimeError):
    """The device ran out of memory on a single patch, so halving the batch cannot help."""


def score_halving_on_out_of_memory(
    score: Callable[[list[tuple[int, int]], NDArray[np.uint8]], Any],
    cells: list[tuple[int, int]],
    images: NDArray[np.uint8],
    *,
    device: Any,
    on_halve: Callable[[int], None],
    single_patch_advice: str,
) -> list[tuple[list[tuple[int, int]], Any]]:
    """Score a batch with ``score(cells, images)``, halving it after each device out-of-memory error.

    Returns ``(cells, scores)`` per part that was scored, in order. ``on_halve(half)`` is called with the
    new batch size so that the caller scores later batches at that size. An out-of-memory error on a
    single patch raises :class:`OutOfMemoryAtBatchSizeOne`, whose message ends with ``single_patch_advice``.
    """
    try:
        return [(cells, score(cells, images))]
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        if device is not None:
            release_cached_memory(device)
        if len(cells) == 1:
            raise OutOfMemoryAtBatchSizeOne(
                f"the device {device} ran out of memory on a single patch: {single_patch_advice}"
            ) from error
        half = max(1, len(cells) // 2)
        on_halve(half)
        logger.warning(
            "The device %s ran out of memory on a batch of %d patches; going on with batch size %d",
            device,
            len(cells),
            half,
        )
    parts: list[tuple[list[tuple[int, int]], Any]] = []
    for offset in range(0, len(cells), half):
        parts.extend(
            score_halving_on_out_of_memory(
                score,
                cells[offset : offset + half],
                images[offset : offset + half],
                device=device,
                on_halve=on_halve,
                single_patch_advice=single_patch_advice,
            )
        )
    return parts


@dataclass(frozen=True)
class BatchResult:
    """One finished batch, as :meth:`AnalysisSession.run` yields it.

    A writer thread stores the batch while the next one is scored; it is in the store before the next
    batch is yielded and before the run ends.

    Attributes
    ----------
    cells : ndarray of int64, shape (n, 2)
        ``(row, col)`` of the batch's patches.
    scores : PatchScores
        The scorer's output for these patches (keywords, weights, prompt, lpips, mse_latent).
    z : ndarray of float64, shape (n,)
        Z-scores of these patches under the statistics known so far (see ``z_source``).
    z_source : str
        ``"calibration"`` (the bundle's statistics of normal patches) or ``"within-slide"``
        (statistics of the patches finished so far, which change as the run goes on). Until two
        finished patches differ in score, ``"within-slide (too few patches: ...)"`` with z-scores of 0.
    n_done, n_total, n_reused : int
        Patches finished (reused ones included), patches the session covers, patches taken from
        the store instead of being computed.
    batch_size : int
        The batch size now in use, lower than requested after an out-of-memory error.
    elapsed_s : float
        Seconds since :meth:`AnalysisSession.run` started.
    patches_per_s : float
        Patches computed (not reused) in this run per second of ``elapsed_s``.
    """

    cells: NDArray[np.int64]
    scores: Any
    z: NDArray[np.float64]
    z_source: str
    n_done: int
    n_total: int
    n_reused: int
    batch_size: int
    elapsed_s: float
    patches_per_s: float


class AnalysisSession:
    """Score the tissue patches of one slide that the store does not hold yet, batch by batch.

    Parameters
    ----------
    slide : Slide
        The open slide.
    grid : PatchGrid
        Its patch grid.
    scorer : AnoPILaDScorer or BaselineScorer
        The scorer (``napari_anopilad.method.scorers.make_scorer``); its ``settings.score`` picks the
        score that z-scores use.
    store : ResultStore
        Where finished batches go and where earlier results are reused from.
    cells : array_like of int, shape (n, 2), optional
        ``(row, col)`` of the patches to analyse; all tissue cells of ``grid`` by default.
    batch_size : int or "auto"
        Patches per device batch. ``"auto"`` chooses it from the device's free memory
        (:func:`napari_anopilad.engine.device.choose_batch_size`). It halves after each out-of-memory error.
    save_reconstructions : bool
        Also store each patch's reconstruction; stored patches without one are analysed again.
    calibration : tuple of float, optional
        ``(mean, std)`` of the score on normal patches. By default the scorer's calibration for its
        settings (``scorer.calibration``); without either, z-scores are within the slide.
    prefetch : bool
        Read the next batch in a background thread while the current one is scored.
    """

    def __init__(
        self,
        slide: Any,
        grid: Any,
        scorer: Any,
        store: ResultStore,
        *,
        cells: Iterable[tuple[int, int]] | NDArray[np.integer] | None = None,
        batch_size: int | str = 8,
        save_reconstructions: bool = False,
        calibration: tuple[float, float] | None = None,
        prefetch: bool = True,
    ) -> None:
        batch_size = resolve_batch_size(batch_size, scorer)
        self.slide = slide
        self.grid = grid
        self.scorer = scorer
        self.store = store
        self.save_reconstructions = save_reconstructions
        self.score_name: str = scorer.settings.score
        if calibration is None and getattr(scorer, "calibration", None) is not None:
            calibration = (
                float(scorer.calibration.mean[self.score_name]),
                float(scorer.calibration.std[self.score_name]),
            )
        self.calibration = calibration
        self.prefetch = prefetch

        target = grid.tissue_cells() if cells is None else cells
        target_array = np.asarray(target, dtype=np.int64).reshape(-1, 2)
        n_rows, n_cols = grid.shape
        outside = (target_array[:, 0] < 0) | (target_array[:, 0] >= n_rows)
        outside |= (target_array[:, 1] < 0) | (target_array[:, 1] >= n_cols)
        if np.any(outside):
            row, col = target_array[np.flatnonzero(outside)[0]]
            raise ValueError(f"cell (row {row}, col {col}) lies outside the {n_rows} x {n_cols} patch grid")
        self.cells: list[tuple[int, int]] = list(dict.fromkeys((int(r), int(c)) for r, c in target_array))

        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._batch_size = int(batch_size)

        stored = store.load()
        has = stored.has_reconstruction if save_reconstructions else np.ones(len(stored), dtype=bool)
        stored_scores = stored.scores(self.score_name)
        target_set = set(self.cells)
        # Scores of the finished cells of this session, for within-slide z-scores.
        self._done_scores: dict[tuple[int, int], float] = {}
        for row, col, value, usable in zip(stored.rows, stored.cols, stored_scores, has):
            cell = (int(row), int(col))
            if usable and cell in target_set:
                self._done_scores[cell] = float(value)
        self.n_reused = len(self._done_scores)

        self._remaining: set[tuple[int, int]] = target_set - set(self._done_scores)
        self._heap: list[tuple[int, int, int, int]] = []
        self._generation = 0
        for order, cell in enumerate(self.cells):
            if cell in self._remaining:
                self._heap.append((0, order, cell[0], cell[1]))
        heapq.heapify(self._heap)
        self._n_computed = 0

    # -- thread-safe controls ------------------------------------------------------------------

    def prioritize(self, cells: Iterable[tuple[int, int]] | NDArray[np.integer]) -> None:
        """Move these cells to the front of the queue, in the given order (thread-safe).

        Cells outside the session or already finished are ignored. A later call goes before an earlier
        one. Batches already read ahead of the device keep their cells.
        """
        with self._lock:
            self._generation += 1
            for order, (row, col) in enumerate(np.asarray(cells, dtype=np.int64).reshape(-1, 2)):
                cell = (int(row), int(col))
                if cell in self._remaining:
                    heapq.heappush(self._heap, (-self._generation, order, cell[0], cell[1]))

    def cancel(self) -> None:
        """Stop the run within one batch, keeping every finished batch in the store (thread-safe)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def n_total(self) -> int:
        return len(self.cells)

    @property
    def n_done(self) -> int:
        with self._lock:
            return len(self._done_scores)

    @property
    def n_remaining(self) -> int:
        with self._lock:
            return len(self._remaining)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def done_scores(self) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """Return the finished cells ``(n, 2)`` and their scores, a snapshot safe to use from any thread."""
        with self._lock:
            items = list(self._done_scores.items())
        cells = np.array([cell for cell, _ in items], dtype=np.int64).reshape(-1, 2)
        return cells, np.array([value for _, value in items], dtype=np.float64)

    # -- queue ---------------------------------------------------------------------------------

    def _take_batch(self) -> list[tuple[int, int]]:
        """Pop up to one batch of cells off the queue; they leave ``_remaining`` until scored or released."""
        with self._lock:
            batch: list[tuple[int, int]] = []
            while self._heap and len(batch) < self._batch_size:
                _, _, row, col = heapq.heappop(self._heap)
                cell = (row, col)
                if cell in self._remaining:
                    self._remaining.discard(cell)
                    batch.append(cell)
            return batch

    def _release(self, cells: Iterable[tuple[int, int]]) -> None:
        """Put cells that were taken but not scored back at the front, so a later run still covers them."""
        with self._lock:
            for cell in cells:
                if cell not in self._done_scores and cell not in self._remaining:
                    self._remaining.add(cell)
                    heapq.heappush(self._heap, (-(self._generation + 1), 0, cell[0], cell[1]))

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> Iterator[BatchResult]:
        """Score the remaining patches, yielding a :class:`BatchResult` after each finished batch.

        The generator ends when every patch is done or after :meth:`cancel`. Closing it early (``close()``
        or dropping it) also stops the reader and waits for the last write, so nothing finished is lost.

        Raises
        ------
        OutOfMemoryAtBatchSizeOne
            When the device cannot hold even one patch.
        """
        start = time.perf_counter()
        self._n_computed = 0
        batches: queue.Queue[tuple[list[tuple[int, int]], Any]] = queue.Queue(maxsize=1)
        stop_reader = threading.Event()
        reader = None
        if self.prefetch:
            reader = threading.Thread(
                target=self._read_ahead, args=(batches, stop_reader), name="anopilad-reader", daemon=True
            )
            reader.start()
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anopilad-writer")
        pending_write: Future[Any] | None = None
        in_hand: list[tuple[int, int]] = []

        try:
            while not self._cancel.is_set():
                cells, images = self._next_batch(batches) if self.prefetch else self._read_batch()
                if not cells:
                    break
                in_hand = cells

                try:
                    parts = self._score_with_retry(cells, images)
                except InterruptedError:
                    logger.info("Analysis cancelled during a batch of %d patches", len(cells))
                    break

                for part_cells, scores in parts:
                    # Surface a failed write of the previous batch before more work piles up.
                    if pending_write is not None:
                        pending_write.result()
                    pending_write = writer.submit(self._write, part_cells, scores)
                    yield self._finish(part_cells, scores, start)
                in_hand = []
        finally:
            stop_reader.set()
            self._cancel.set()
            if reader is not None:
                reader.join()
            self._release(in_hand)
            self._release_prefetched(batches)
            writer.shutdown(wait=True)
            self._cancel.clear()
            if pending_write is not None and pending_write.exception() is not None:
                raise pending_write.exception()  # type: ignore[misc]

    def _finish(self, cells: list[tuple[int, int]], scores: Any, start: float) -> BatchResult:
        values = np.asarray(scores.values(self.score_name), dtype=np.float64)
        with self._lock:
            for cell, value in zip(cells, values):
                self._done_scores[cell] = float(value)
            self._n_computed += len(cells)
            n_done = len(self._done_scores)
            all_values = np.fromiter(self._done_scores.values(), dtype=np.float64)
        too_few = too_few_patches_source(all_values)
        if self.calibration is not None:
            mean, std = self.calibration
            z_source = Z_SOURCE_CALIBRATION
            z = zscores(values, mean, std)
        elif too_few is not None:
            z_source = too_few
            z = np.zeros_like(values)
        else:
            mean, std = within_slide_stats(all_values)
            z_source = Z_SOURCE_WITHIN_SLIDE
            z = zscores(values, mean, std)
        elapsed = time.perf_counter() - start
        return BatchResult(
            cells=np.asarray(cells, dtype=np.int64).reshape(-1, 2),
            scores=scores,
            z=z,
            z_source=z_source,
            n_done=n_done,
            n_total=self.n_total,
            n_reused=self.n_reused,
            batch_size=self._batch_size,
            elapsed_s=elapsed,
            patches_per_s=self._n_computed / elapsed if elapsed > 0 else 0.0,
        )

    def _read_batch(self) -> tuple[list[tuple[int, int]], Any]:
        cells = self._take_batch()
        if not cells:
            return [], None
        try:
            return cells, read_patches(self.slide, self.grid, np.asarray(cells, dtype=np.int64))
        except BaseException:
            self._release(cells)
            raise

    def _read_ahead(
        self, batches: queue.Queue[tuple[list[tuple[int, int]], Any]], stop: threading.Event
    ) -> None:
        while not stop.is_set():
            try:
                item: tuple[list[tuple[int, int]], Any] = self._read_batch()
            except BaseException as error:
                item = ([], error)
            while not stop.is_set():
                try:
                    batches.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            else:
                self._release(item[0])
                return
            if not item[0]:
                return

    def _next_batch(
        self, batches: queue.Queue[tuple[list[tuple[int, int]], Any]]
    ) -> tuple[list[tuple[int, int]], Any]:
        while True:
            try:
                cells, payload = batches.get(timeout=_POLL_S)
            except queue.Empty:
                if self._cancel.is_set():
                    return [], None
                continue
            if not cells and isinstance(payload, BaseException):
                raise payload
            return cells, payload

    def _release_prefetched(self, batches: queue.Queue[tuple[list[tuple[int, int]], Any]]) -> None:
        while True:
            try:
                cells, _ = batches.get_nowait()
            except queue.Empty:
                return
            self._release(cells)

    # -- scoring -------------------------------------------------------------------------------

    def _score(self, cells: list[tuple[int, int]], images: NDArray[np.uint8]) -> Any:
        noise_keys = [(self.slide.identity, row, col) for row, col in cells]
        kwargs: dict[str, Any] = {"noise_keys": noise_keys}
        parameters = inspect.signature(self.scorer.score).parameters
        if self.save_reconstructions:
            kwargs["return_reconstructions"] = True
        if "callback" in parameters:
            # Returning False from the step callback makes the reconstruction raise InterruptedError.
            kwargs["callback"] = lambda step, n_steps: not self._cancel.is_set()
        return self.scorer.score(images, **kwargs)

    def _score_with_retry(
        self, cells: list[tuple[int, int]], images: NDArray[np.uint8]
    ) -> list[tuple[list[tuple[int, int]], Any]]:
        """Score a batch; on an out-of-memory error halve the batch size and score the halves."""

        def lower_batch_size(half: int) -> None:
            with self._lock:
                self._batch_size = min(self._batch_size, half)

        return score_halving_on_out_of_memory(
            self._score,
            cells,
            images,
            device=getattr(self.scorer, "device", None),
            on_halve=lower_batch_size,
            single_patch_advice=(
                "free the GPU of other processes, use --precision float16 or bfloat16, or run on another device"
            ),
        )

    def _write(self, cells: list[tuple[int, int]], scores: Any) -> None:
        reconstructions = getattr(scores, "reconstructions", None) if self.save_reconstructions else None
        self.store.write_batch(
            cells,
            scores=scores.score_values(),
            keywords=scores.keywords,
            similarities=scores.similarities,
            weights=scores.weights,
            prompts=_prompts(scores),
            reconstructions=None if reconstructions is None else np.asarray(reconstructions),
        )


def resolve_batch_size(batch_size: int | str, scorer: Any) -> int:
    """Return ``batch_size`` checked, or for ``"auto"`` the size that fits the scorer's device memory."""
    if batch_size == "auto":
        import torch

        from napari_anopilad.engine.device import choose_batch_size
        from napari_anopilad.method.settings import InferenceSettings

        settings = scorer.settings if isinstance(scorer.settings, InferenceSettings) else None
        return choose_batch_size(torch.device(getattr(scorer, "device", "cpu")), settings)
    if isinstance(batch_size, str) or int(batch_size) < 1:
        raise ValueError(f"batch_size {batch_size!r} is invalid: use 1 or more, or 'auto'")
    return int(batch_size)


def _prompts(scores: Any) -> Any:
    prompts = getattr(scores, "prompts", None)
    return prompts if prompts is not None else scores.prompt
