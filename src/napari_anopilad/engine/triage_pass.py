"""Triage pass: CONCH triage scores for every tissue patch of a slide, and the diffusion order they give.

The pass embeds the tissue patches with the bundle's CONCH in batches (:class:`TriagePass`) and stores
each finished batch atomically in a :class:`TriageStore` next to the AnoPILaD result store. The stored
scores then give a slide map (:func:`compute_triage_results`) and a diffusion plan
(:func:`plan_diffusion`): the cells with the highest triage z-scores, plus their grid neighbours, highest
first. The plan's ``priority`` goes to ``AnalysisSession.prioritize`` and its ``cells`` restrict the
session.

Layout of one triage store folder (``<root>/triage/<slide>_<bundle>_<reference>_k<k>_<grid>/``)::

    manifest.json                  slide, bundle and reference identities, k and grid, written first
    batch-00000001-<token>.npz     one file per finished batch (rows, cols, distances, z-scores)

As in the result store, every file is written to a temporary name and renamed, so a killed pass loses
at most the batch it was writing and a rerun scores only the cells that are missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import zipfile
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_anopilad.method import heatmap

logger = logging.getLogger(__name__)

TRIAGE_STORE_FOLDER = "triage"
TRIAGE_STORE_FORMAT_VERSION = 1
TRIAGE_SCORE_NAMES = ("knn_distance", "keyword_distance")
DEFAULT_TRIAGE_SCORE = "knn_distance"
DEFAULT_BUDGET_FRACTION = 0.1
DEFAULT_NEIGHBOUR_RADIUS = 1
DEFAULT_TRIAGE_BATCH_SIZE = 64

_MANIFEST_NAME = "manifest.json"
_BATCH_PATTERN = re.compile(r"^batch-(\d{8})-([0-9a-f]+)\.npz$")
_TEMP_PREFIX = ".tmp-"
_ARRAY_NAMES = ("knn_distance", "keyword_distance", "knn_z", "keyword_z")


@dataclass(frozen=True)
class TriageSettings:
    """Triage settings: the score that steers the diffusion, and the share of the slide the diffusion covers.

    Attributes
    ----------
    score : str
        ``"knn_distance"`` or ``"keyword_distance"``: the z-score that orders the cells and forms the map.
    k : int or None
        Neighbours of the kNN distance; the reference's default when None.
    budget_fraction : float
        Fraction of the tissue patches, highest triage z-score first, that the diffusion scores, in [0, 1];
        1 scores every tissue patch.
    neighbour_radius : int
        Grid neighbours of each budget cell within this many cells (Chebyshev distance) join the budget;
        0 adds none, 1 adds the 8 neighbours.
    """

    score: str = DEFAULT_TRIAGE_SCORE
    k: int | None = None
    budget_fraction: float = DEFAULT_BUDGET_FRACTION
    neighbour_radius: int = DEFAULT_NEIGHBOUR_RADIUS

    def __post_init__(self) -> None:
        check_triage_score(self.score)
        if self.k is not None and self.k < 1:
            raise ValueError(f"triage k = {self.k} is invalid: use 1 or more")
        check_budget(self.budget_fraction, self.neighbour_radius)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict."""
        return {
            "score": self.score,
            "k": self.k,
            "budget_fraction": self.budget_fraction,
            "neighbour_radius": self.neighbour_radius,
        }


def check_triage_score(score: str) -> None:
    """Raise ValueError unless ``score`` names a triage score."""
    if score not in TRIAGE_SCORE_NAMES:
        raise ValueError(f"triage score {score!r} is invalid: use one of {', '.join(TRIAGE_SCORE_NAMES)}")


def check_budget(budget_fraction: float, neighbour_radius: int) -> None:
    """Raise ValueError for a budget fraction outside [0, 1] or a negative neighbour radius."""
    if not (math.isfinite(budget_fraction) and 0.0 <= budget_fraction <= 1.0):
        raise ValueError(
            f"triage budget {budget_fraction!r} is invalid: give the fraction of tissue patches from 0 to 1"
        )
    if int(neighbour_radius) != neighbour_radius or neighbour_radius < 0:
        raise ValueError(f"neighbour radius {neighbour_radius!r} is invalid: give 0 or more grid cells")


# -- the store -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TriagePatches:
    """Stored triage scores, one entry per ``(row, col)`` cell, in the store's order.

    Attributes
    ----------
    rows, cols : ndarray of int64, shape (n,)
        Patch grid index.
    knn_distance, keyword_distance : ndarray of float64, shape (n,)
        Raw triage distances.
    knn_z, keyword_z : ndarray of float64, shape (n,)
        Their z-scores against the reference's normal calibration.
    """

    rows: NDArray[np.int64]
    cols: NDArray[np.int64]
    knn_distance: NDArray[np.float64]
    keyword_distance: NDArray[np.float64]
    knn_z: NDArray[np.float64]
    keyword_z: NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.rows.size)

    def cells(self) -> NDArray[np.int64]:
        """Return the ``(n, 2)`` array of ``(row, col)``."""
        return np.stack([self.rows, self.cols], axis=1)

    def values(self, score: str) -> NDArray[np.float64]:
        """Return the raw distances of ``score``."""
        check_triage_score(score)
        return self.knn_distance if score == "knn_distance" else self.keyword_distance

    def z(self, score: str) -> NDArray[np.float64]:
        """Return the z-scores of ``score``."""
        check_triage_score(score)
        return self.knn_z if score == "knn_distance" else self.keyword_z

    def select(self, cells: Iterable[tuple[int, int]] | NDArray[np.integer]) -> TriagePatches:
        """Return the entries of the given cells, in the store's order."""
        wanted = {(int(row), int(col)) for row, col in np.asarray(cells, dtype=np.int64).reshape(-1, 2)}
        keep = np.array([(int(r), int(c)) in wanted for r, c in zip(self.rows, self.cols)], dtype=bool)
        return TriagePatches(
            rows=self.rows[keep],
            cols=self.cols[keep],
            **{name: getattr(self, name)[keep] for name in _ARRAY_NAMES},
        )

    @classmethod
    def empty(cls) -> TriagePatches:
        return cls(
            rows=np.zeros(0, np.int64),
            cols=np.zeros(0, np.int64),
            **{name: np.zeros(0, np.float64) for name in _ARRAY_NAMES},
        )


class TriageStore:
    """Append-only store of triage scores for one slide, bundle, triage reference, k and patch grid.

    Parameters
    ----------
    root : str or Path
        Folder of result stores; this store uses ``root / "triage" / <keys>``, so it can share the root of
        the AnoPILaD result store.
    slide_identity, bundle_identity : str
        ``Slide.identity`` and ``Bundle.identity``.
    reference_identity : str
        ``TriageReference.identity``: a rebuilt reference gives another folder.
    k : int
        Neighbours of the kNN distance.
    grid : dict
        ``grid_description(grid)`` of the patch grid.

    Raises
    ------
    ValueError
        If the folder cannot be created, or contains a manifest for other keys.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        slide_identity: str,
        bundle_identity: str,
        reference_identity: str,
        k: int,
        grid: dict[str, Any],
    ) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._manifest: dict[str, Any] = {
            "format_version": TRIAGE_STORE_FORMAT_VERSION,
            "slide_identity": str(slide_identity),
            "bundle_identity": str(bundle_identity),
            "reference_identity": str(reference_identity),
            "k": int(k),
            "grid": dict(grid),
        }
        name = "_".join(
            [
                _folder_part(str(slide_identity)),
                _folder_part(str(bundle_identity)),
                _folder_part(str(reference_identity)),
                f"k{int(k)}",
                _short_hash(self._manifest["grid"]),
            ]
        )
        self.folder = self.root / TRIAGE_STORE_FOLDER / name
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(
                f"cannot create the triage store folder {self.folder}: {error.strerror}; "
                "choose another output or store folder"
            ) from error
        manifest_path = self.folder / _MANIFEST_NAME
        if manifest_path.exists():
            self._check_manifest(manifest_path)
        else:
            self._write_atomic(manifest_path, json.dumps(self._manifest, indent=2).encode())

    def _check_manifest(self, manifest_path: Path) -> None:
        try:
            existing = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(
                f"the triage store manifest {manifest_path} is unreadable ({error}); "
                "delete the folder to compute the triage scores afresh"
            ) from error
        keys = ("slide_identity", "bundle_identity", "reference_identity", "k", "grid")
        if any(existing.get(key) != self._manifest[key] for key in keys):
            raise ValueError(
                f"the triage store {self.folder} belongs to another slide, bundle, reference or grid; "
                "delete the folder or use another store folder"
            )

    def _write_atomic(self, path: Path, data: bytes) -> None:
        temp_path = path.with_name(f"{_TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
        try:
            with open(temp_path, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp_path, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temp_path.unlink()
            raise

    @property
    def k(self) -> int:
        """Neighbours of the stored kNN distances."""
        return int(self._manifest["k"])

    def write_batch(self, cells: NDArray[np.integer] | Iterable[tuple[int, int]], scores: Any) -> Path:
        """Write the triage scores of one batch atomically and return the batch file's path.

        Parameters
        ----------
        cells : array_like, shape (n, 2)
            ``(row, col)`` of each patch.
        scores : TriageScores
            The scorer's output for these patches, in the same order.
        """
        import io

        cell_array = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
        arrays: dict[str, NDArray[Any]] = {"rows": cell_array[:, 0], "cols": cell_array[:, 1]}
        for name in _ARRAY_NAMES:
            values = np.asarray(getattr(scores, name), dtype=np.float64)
            if values.shape != (len(cell_array),):
                raise ValueError(f"triage batch: {name} has shape {values.shape} for {len(cell_array)} cells")
            arrays[name] = values
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        with self._lock:
            numbers = [
                int(match.group(1))
                for match in (_BATCH_PATTERN.match(path.name) for path in self.folder.glob("batch-*.npz"))
                if match
            ]
            path = self.folder / f"batch-{max(numbers, default=0) + 1:08d}-{secrets.token_hex(4)}.npz"
            self._write_atomic(path, buffer.getvalue())
        return path

    def load(self) -> TriagePatches:
        """Merge every batch file into one entry per cell; a later batch replaces an earlier one.

        An unreadable batch file is skipped with a warning, so its cells are scored again.
        """
        names = sorted(
            (path.name for path in self.folder.glob("batch-*.npz") if _BATCH_PATTERN.match(path.name)),
            key=lambda name: (int(name[6:14]), name),
        )
        batches = []
        for name in names:
            path = self.folder / name
            try:
                with np.load(path, allow_pickle=False) as data:
                    batches.append({key: data[key] for key in ("rows", "cols", *_ARRAY_NAMES)})
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
                logger.warning("Skipped the unreadable triage batch %s: %s", path, error)
        if not batches:
            return TriagePatches.empty()
        merged = {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}
        rows = merged["rows"].astype(np.int64)
        cols = merged["cols"].astype(np.int64)
        # Keep the last entry of each cell: unique over the reversed order finds last occurrences.
        flat = rows * (int(cols.max()) + 1 if cols.size else 1) + cols
        _, first_in_reversed = np.unique(flat[::-1], return_index=True)
        keep = np.sort(flat.size - 1 - first_in_reversed)
        return TriagePatches(
            rows=rows[keep],
            cols=cols[keep],
            **{name: merged[name][keep].astype(np.float64) for name in _ARRAY_NAMES},
        )

    def done_cells(self) -> set[tuple[int, int]]:
        """Return the cells with stored triage scores."""
        stored = self.load()
        return {(int(row), int(col)) for row, col in zip(stored.rows, stored.cols)}

    def __repr__(self) -> str:
        return f"TriageStore({str(self.folder)!r})"


def open_triage_store(
    root: str | os.PathLike[str], slide: Any, bundle: Any, scorer: Any, grid: Any
) -> TriageStore:
    """Open the triage store of ``slide``, ``bundle``, the scorer's reference and k, and ``grid`` under ``root``."""
    from napari_anopilad.engine.store import grid_description

    return TriageStore(
        root, slide.identity, bundle.identity, scorer.reference.identity, scorer.k, grid_description(grid)
    )


def _folder_part(identity: str, length: int = 16) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9]", "", identity)
    return cleaned[:length] if cleaned else _short_hash(identity)


def _short_hash(value: Any, length: int = 8) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# -- the pass ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TriageBatch:
    """One finished batch of the triage pass, as :meth:`TriagePass.run` yields it.

    Attributes
    ----------
    cells : ndarray of int64, shape (n, 2)
        ``(row, col)`` of the batch's patches; already in the store when yielded.
    scores : TriageScores
        The triage scorer's output for these patches.
    n_done, n_total, n_reused : int
        Patches with triage scores (reused ones included), patches the pass covers, patches taken from
        the store instead of being computed.
    elapsed_s : float
        Seconds since :meth:`TriagePass.run` started.
    patches_per_s : float
        Patches computed in this run per second of ``elapsed_s``, reading from the slide included.
    """

    cells: NDArray[np.int64]
    scores: Any
    n_done: int
    n_total: int
    n_reused: int
    elapsed_s: float
    patches_per_s: float


class TriagePass:
    """Score the tissue patches of one slide with the triage scorer, batch by batch, into a triage store.

    Parameters
    ----------
    slide : Slide
        The open slide.
    grid : PatchGrid
        Its patch grid.
    scorer : TriageScorer
        The triage scorer (CONCH and the bundle's normal reference).
    store : TriageStore
        Where finished batches go and where earlier scores are reused from.
    cells : array_like of int, shape (n, 2), optional
        ``(row, col)`` of the patches to score; all tissue cells of ``grid`` by default.
    batch_size : int
        Patches read from the slide and scored per batch.
    prefetch : bool
        Read the next batch in a background thread while the current one is scored.
    """

    def __init__(
        self,
        slide: Any,
        grid: Any,
        scorer: Any,
        store: TriageStore,
        *,
        cells: Iterable[tuple[int, int]] | NDArray[np.integer] | None = None,
        batch_size: int = DEFAULT_TRIAGE_BATCH_SIZE,
        prefetch: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"triage batch size {batch_size} is invalid: use 1 or more")
        self.slide = slide
        self.grid = grid
        self.scorer = scorer
        self.store = store
        self.batch_size = int(batch_size)
        self.prefetch = prefetch
        target = grid.tissue_cells() if cells is None else cells
        target_array = np.asarray(target, dtype=np.int64).reshape(-1, 2)
        self.cells: list[tuple[int, int]] = list(dict.fromkeys((int(r), int(c)) for r, c in target_array))
        done = store.done_cells()
        self.remaining = [cell for cell in self.cells if cell not in done]
        self.n_reused = len(self.cells) - len(self.remaining)
        self._cancel = threading.Event()

    @property
    def n_total(self) -> int:
        return len(self.cells)

    def cancel(self) -> None:
        """Stop the pass after the batch being scored (thread-safe); finished batches stay in the store."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def run(self) -> Generator[TriageBatch, None, None]:
        """Score the cells the store does not hold, yielding a :class:`TriageBatch` after each stored batch."""
        start = time.perf_counter()
        batches = [
            self.remaining[index : index + self.batch_size]
            for index in range(0, len(self.remaining), self.batch_size)
        ]
        n_done = self.n_reused
        n_computed = 0
        reader = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="anopilad-triage-reader")
            if self.prefetch
            else None
        )
        try:
            upcoming: Future[NDArray[np.uint8]] | None = None
            if reader is not None and batches:
                upcoming = reader.submit(self._read, batches[0])
            for index, cells in enumerate(batches):
                if self._cancel.is_set():
                    logger.info("Triage pass cancelled with %d of %d patches scored", n_done, self.n_total)
                    return
                if reader is not None and upcoming is not None:
                    images = upcoming.result()
                    # The next batch is read from the slide while this one is scored.
                    if index + 1 < len(batches):
                        upcoming = reader.submit(self._read, batches[index + 1])
                else:
                    images = self._read(cells)

                for part_cells, scores in self._score_in_parts(cells, images):
                    self.store.write_batch(part_cells, scores)

                    n_done += len(part_cells)
                    n_computed += len(part_cells)
                    elapsed = time.perf_counter() - start
                    yield TriageBatch(
                        cells=np.asarray(part_cells, dtype=np.int64).reshape(-1, 2),
                        scores=scores,
                        n_done=n_done,
                        n_total=self.n_total,
                        n_reused=self.n_reused,
                        elapsed_s=elapsed,
                        patches_per_s=n_computed / elapsed if elapsed > 0 else 0.0,
                    )
        finally:
            if reader is not None:
                reader.shutdown(wait=True, cancel_futures=True)

    def _score_in_parts(
        self, cells: list[tuple[int, int]], images: NDArray[np.uint8]
    ) -> list[tuple[list[tuple[int, int]], Any]]:
        """Score a read batch in chunks of the current batch size, which an out-of-memory error lowers."""
        parts: list[tuple[list[tuple[int, int]], Any]] = []
        step = self.batch_size
        for offset in range(0, len(cells), step):
            parts.extend(
                self._score_with_retry(cells[offset : offset + step], images[offset : offset + step])
            )
        return parts

    def _score_with_retry(
        self, cells: list[tuple[int, int]], images: NDArray[np.uint8]
    ) -> list[tuple[list[tuple[int, int]], Any]]:
        """Score a batch; on an out-of-memory error halve the batch size and score the halves."""
        from napari_anopilad.engine.session import score_halving_on_out_of_memory

        def lower_batch_size(half: int) -> None:
            self.batch_size = min(self.batch_size, half)

        return score_halving_on_out_of_memory(
            lambda _cells, batch: self.scorer.score(batch),
            cells,
            images,
            device=getattr(self.scorer, "device", None),
            on_halve=lower_batch_size,
            single_patch_advice="free the GPU of other processes or run on another device",
        )

    def _read(self, cells: list[tuple[int, int]]) -> NDArray[np.uint8]:
        from napari_anopilad.slide import read_patches

        return read_patches(self.slide, self.grid, np.asarray(cells, dtype=np.int64).reshape(-1, 2))


# -- the map and the plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class TriageResults:
    """The triage map of a slide: z-scores of one triage score on the grid and the slide scores.

    The map is eroded like the AnoPILaD heatmap (2x2 minimum), and Z_max and Z_99 are taken over the eroded
    values, so triage and AnoPILaD slide scores are computed alike.

    Attributes
    ----------
    patches : TriagePatches
        The stored entries of the scored cells, in the order of ``z`` and ``z_eroded``.
    score_name : str
        ``"knn_distance"`` or ``"keyword_distance"``.
    z, z_eroded : ndarray of float64, shape (n,)
        Per patch: the triage z-score and the eroded map value at its cell.
    heatmap, heatmap_eroded : ndarray of float32, shape (rows, cols)
        Z-scores on the patch grid before and after the erosion, NaN where no patch was scored.
    z_max, z_99 : float or None
        Slide scores over the scored cells; None when none was scored.
    threshold : float
        The anomaly threshold on the eroded z-score.
    mask : ndarray of bool, shape (rows, cols)
        Cells whose eroded triage z-score exceeds ``threshold``.
    n_tissue_patches : int
        Tissue patches of the analysed slide or region; ``n_patches / n_tissue_patches`` is the coverage.
    k : int or None
        Neighbours of the kNN distance, when known (from the store).
    """

    patches: TriagePatches
    score_name: str
    z: NDArray[np.float64]
    z_eroded: NDArray[np.float64]
    heatmap: NDArray[np.float32]
    heatmap_eroded: NDArray[np.float32]
    z_max: float | None
    z_99: float | None
    threshold: float
    mask: NDArray[np.bool_]
    n_tissue_patches: int
    k: int | None = None

    @property
    def n_patches(self) -> int:
        return len(self.patches)

    @property
    def coverage(self) -> float:
        """Fraction of the tissue patches with a triage score."""
        return self.n_patches / self.n_tissue_patches if self.n_tissue_patches else 0.0

    @property
    def scorer_name(self) -> str:
        """The scorer the map and slide scores come from, for example ``"triage:knn_distance"``."""
        return f"triage:{self.score_name}"


def compute_triage_results(
    store: TriageStore | TriagePatches,
    grid: Any,
    score: str = DEFAULT_TRIAGE_SCORE,
    cells: Iterable[tuple[int, int]] | NDArray[np.integer] | None = None,
    threshold: float = 0.0,
) -> TriageResults:
    """Build the triage map, Z_max, Z_99 and the anomaly mask of one triage score from stored scores.

    Parameters
    ----------
    store : TriageStore or TriagePatches
        The stored triage scores (or an already loaded copy).
    grid : PatchGrid
        The patch grid; gives the map's shape.
    score : str
        ``"knn_distance"`` or ``"keyword_distance"``.
    cells : array_like, shape (n, 2), optional
        The tissue cells of the slide or region: the map keeps only these, and their count is the coverage's
        denominator. All tissue cells of ``grid`` by default.
    threshold : float
        Anomaly threshold on the eroded z-score.
    """
    check_triage_score(score)
    patches = store.load() if isinstance(store, TriageStore) else store
    tissue = np.asarray(grid.tissue_cells() if cells is None else cells, dtype=np.int64).reshape(-1, 2)
    patches = patches.select(tissue)
    z = patches.z(score)
    grid_z = heatmap.heatmap_grid(tuple(grid.shape), patches.rows, patches.cols, z)
    eroded = heatmap.erode_heatmap(grid_z)
    return TriageResults(
        patches=patches,
        score_name=score,
        z=z,
        z_eroded=eroded[patches.rows, patches.cols].astype(np.float64),
        heatmap=grid_z,
        heatmap_eroded=eroded,
        z_max=heatmap.z_max(eroded),
        z_99=heatmap.z_99(eroded),
        threshold=float(threshold),
        mask=heatmap.anomaly_mask(eroded, threshold),
        n_tissue_patches=len(tissue),
        k=store.k if isinstance(store, TriageStore) else None,
    )


@dataclass(frozen=True)
class TriagePlan:
    """The cells that the diffusion scores after triage, and in which order.

    Attributes
    ----------
    priority : ndarray of int64, shape (m, 2)
        The budget cells, highest triage z-score first: the list for ``AnalysisSession.prioritize``.
    cells : ndarray of int64, shape (m, 2)
        The same cells in row-major order: the restricted cell set of the session.
    n_tissue_patches, n_top : int
        Tissue cells considered, and the cells in the top fraction before the neighbours join.
    score : str
        The triage score that ordered the cells.
    budget_fraction : float
        The fraction of tissue cells in the top set.
    neighbour_radius : int
        Neighbours within this many grid cells joined the budget.
    """

    priority: NDArray[np.int64]
    cells: NDArray[np.int64]
    n_tissue_patches: int
    n_top: int
    score: str
    budget_fraction: float
    neighbour_radius: int

    @property
    def n_budget(self) -> int:
        return len(self.priority)

    def to_dict(self) -> dict[str, Any]:
        """Return the plan's sizes and settings (not its cells) as a JSON-ready dict."""
        return {
            "score": self.score,
            "budget_fraction": self.budget_fraction,
            "neighbour_radius": self.neighbour_radius,
            "n_tissue_patches": self.n_tissue_patches,
            "n_top": self.n_top,
            "n_budget": self.n_budget,
        }


def diffusion_budget(
    cells: NDArray[np.integer],
    z: NDArray[np.floating],
    budget_fraction: float = DEFAULT_BUDGET_FRACTION,
    neighbour_radius: int = DEFAULT_NEIGHBOUR_RADIUS,
) -> tuple[NDArray[np.int64], int]:
    """Return the budget cells ``(m, 2)``, highest triage z-score first, and the size of the top set.

    The top set is the ``ceil(budget_fraction * n)`` cells with the highest z-scores (every cell when the
    fraction is 1). Every cell of ``cells`` within ``neighbour_radius`` grid cells of a top cell (Chebyshev
    distance, so 1 is the 8-neighbourhood) joins it. All budget cells are ordered by their own z-score,
    highest first, and equal z-scores keep row-major order. Cells without a z-score (NaN) come last and
    are never in the top set. With radius 1 the result equals
    :func:`napari_anopilad.method.triage.order_cells_by_triage`.
    """
    check_budget(budget_fraction, neighbour_radius)
    grid_cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    values = np.asarray(z, dtype=np.float64).reshape(-1)
    if values.shape != (len(grid_cells),):
        raise ValueError(f"got {values.shape} z-scores for {len(grid_cells)} cells: give one per cell")
    if len(grid_cells) == 0:
        return grid_cells, 0

    # np.lexsort sorts by the last key first: NaN last, then z descending, then row, then col.
    missing = ~np.isfinite(values)
    order = np.lexsort((grid_cells[:, 1], grid_cells[:, 0], -np.where(missing, 0.0, values), missing))
    if budget_fraction >= 1.0:
        return grid_cells[order], int(np.count_nonzero(~missing))

    scored = int(np.count_nonzero(~missing))
    # Rounded before the ceiling so that 0.3 of 10 cells is 3 and not 4 (0.3 * 10 = 3.0000000000000004).
    n_top = min(math.ceil(round(budget_fraction * len(grid_cells), 9)), scored)
    in_budget = np.zeros(len(grid_cells), dtype=bool)
    in_budget[order[:n_top]] = True
    if neighbour_radius > 0 and n_top:
        from scipy import ndimage

        origin = grid_cells.min(axis=0)
        shape = tuple(grid_cells.max(axis=0) - origin + 1)
        top_grid = np.zeros(shape, dtype=bool)
        top_cells = grid_cells[order[:n_top]] - origin
        top_grid[top_cells[:, 0], top_cells[:, 1]] = True
        window = np.ones((2 * neighbour_radius + 1, 2 * neighbour_radius + 1), dtype=bool)
        near_top = ndimage.binary_dilation(top_grid, structure=window)
        local = grid_cells - origin
        in_budget |= near_top[local[:, 0], local[:, 1]]
    return grid_cells[order[in_budget[order]]], n_top


def plan_diffusion(
    triage: TriageResults,
    cells: NDArray[np.integer],
    budget_fraction: float = DEFAULT_BUDGET_FRACTION,
    neighbour_radius: int = DEFAULT_NEIGHBOUR_RADIUS,
) -> TriagePlan:
    """Return the diffusion plan over ``cells`` (the tissue cells) from the triage map's z-scores.

    Cells without a triage score (a cancelled pass) have a NaN z-score: they join the budget only as
    neighbours, or when the budget is 1.
    """
    grid_cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    z_by_cell = {
        (int(row), int(col)): float(value)
        for row, col, value in zip(triage.patches.rows, triage.patches.cols, triage.z)
    }
    z = np.array([z_by_cell.get((int(row), int(col)), np.nan) for row, col in grid_cells], dtype=np.float64)
    priority, n_top = diffusion_budget(grid_cells, z, budget_fraction, neighbour_radius)
    row_major = priority[np.lexsort((priority[:, 1], priority[:, 0]))] if len(priority) else priority
    return TriagePlan(
        priority=priority,
        cells=row_major,
        n_tissue_patches=len(grid_cells),
        n_top=n_top,
        score=triage.score_name,
        budget_fraction=float(budget_fraction),
        neighbour_radius=int(neighbour_radius),
    )


def run_triage_pass(
    slide: Any,
    grid: Any,
    scorer: Any,
    store: TriageStore,
    cells: NDArray[np.integer],
    *,
    settings: TriageSettings | None = None,
    batch_size: int = DEFAULT_TRIAGE_BATCH_SIZE,
    threshold: float = 0.0,
    on_batch: Callable[[TriageBatch], None] | None = None,
) -> tuple[TriageResults, TriagePlan, int]:
    """Score ``cells`` with the triage scorer (reusing stored scores) and return the map, the plan and the count computed.

    Parameters
    ----------
    slide, grid, scorer, store
        As for :class:`TriagePass`.
    cells : ndarray, shape (n, 2)
        The tissue cells of the slide or region.
    settings : TriageSettings, optional
        Score, budget and neighbour radius of the plan; the defaults when None.
    batch_size : int
        Patches per triage batch.
    threshold : float
        Anomaly threshold of the triage map's mask.
    on_batch : callable, optional
        Called with each finished :class:`TriageBatch` (for progress).
    """
    settings = settings or TriageSettings()
    triage_pass = TriagePass(slide, grid, scorer, store, cells=cells, batch_size=batch_size)
    n_computed = 0
    with contextlib.closing(triage_pass.run()) as batches:
        for batch in batches:
            n_computed += len(batch.cells)
            if on_batch is not None:
                on_batch(batch)
    results = compute_triage_results(store, grid, settings.score, cells=cells, threshold=threshold)
    plan = plan_diffusion(results, cells, settings.budget_fraction, settings.neighbour_radius)
    return results, plan, n_computed


def check_triage_method(method: str, bundle_folder: str | os.PathLike[str]) -> None:
    """Raise ValueError unless ``method`` is AnoPILaD, the only method whose bundles carry a triage reference."""
    from napari_anopilad.method.scorers import ANOPILAD

    if method != ANOPILAD:
        raise ValueError(
            f"--triage needs an AnoPILaD bundle with a triage reference; {bundle_folder} is a {method} bundle"
        )


def run_slide_triage(
    store_root: str | os.PathLike[str],
    slide: Any,
    grid: Any,
    bundle: Any,
    scorer: Any,
    cells: NDArray[np.integer],
    *,
    settings: TriageSettings,
    threshold: float = 0.0,
    on_batch: Callable[[TriageBatch], None] | None = None,
) -> tuple[TriageResults, TriagePlan, int]:
    """Open the slide's triage store under ``store_root`` and run :func:`run_triage_pass` over ``cells``.

    ``anopilad analyze`` and the cohort's prepare-slide task both call this, so a slide gets the same
    triage store folder, map and plan from either.
    """
    store = open_triage_store(store_root, slide, bundle, scorer, grid)
    return run_triage_pass(
        slide, grid, scorer, store, cells, settings=settings, threshold=threshold, on_batch=on_batch
    )
