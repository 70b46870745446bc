"""Cohort analysis: many slides scored by the workers of a dask.distributed cluster.

The work of one slide is three kinds of task:

1. ``prepare_slide`` opens the slide, builds its tissue mask and patch grid, opens its result store
   and splits the cells the store does not hold yet into blocks. With triage it first runs the triage
   pass over the cells, and the blocks hold only the diffusion plan's cells, highest triage z first.
2. ``score_block`` scores one block of cells with an :class:`AnalysisSession` into the same result
   store that ``anopilad analyze`` writes (same folder keys), one atomic batch file at a time. It
   skips cells the store already holds, so a block that dask runs again after its worker died
   recomputes only the batch that was in flight.
3. ``finish_slide`` computes the slide results from the store and writes the slide's output files
   (with the triage map and plan when there is one).

Each task catches its own errors and returns a status, so a corrupt slide fails alone. A worker
process loads the bundle and builds the scorer once and keeps them for later tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_anopilad.engine.triage_pass import TriageSettings

logger = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_FAILED = "failed"

# Dask runs tasks of higher priority first: every slide's plan first (so the progress total is known
# early), then the output writing of finished slides, then the blocks in the order of the slides.
_PRIORITY_PREPARE = 3_000_000
_PRIORITY_FINISH = 2_000_000


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a cohort.

    Attributes
    ----------
    path : Path
        The slide file, as the workers see it (absolute, so a worker's working folder does not matter).
    name : str
        Unique name in the cohort; the slide's outputs go to ``<out>/<name>/``.
    """

    path: Path
    name: str


@dataclass(frozen=True)
class CohortOptions:
    """Options shared by every slide of a cohort run.

    Attributes
    ----------
    bundle : Path
        Model bundle folder, as the workers see it.
    out : Path
        Output folder; slide ``name`` writes to ``out / name``.
    store_root : Path or None
        Result store folder shared by all slides; None gives each slide ``out / name / "store"``,
        which is where ``anopilad analyze --out out/name`` keeps its store.
    device : str
        Device request each worker resolves with ``choose_device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
    batch_size : int or "auto"
        Patches per device batch; ``"auto"`` fits it to each worker's free device memory.
    block_size : int
        Patches per task; a slide with more remaining patches is split into several tasks.
    threshold : float
        Anomaly threshold on the eroded z-score.
    mpp : float or None
        Level-0 microns per pixel for slides whose metadata lacks it; slides that have it keep theirs.
    overrides : dict
        Inference setting overrides on top of the bundle's settings (None values keep the bundle's).
    region_level0 : tuple of int or None
        Analyse only the cells overlapping this ``(x, y, width, height)`` box of every slide.
    max_patches : int or None
        Analyse only the first this many tissue cells of every slide (row-major order), for quick looks.
    save_reconstructions : bool
        Store each patch's reconstruction and write the original/reconstruction PNG pairs.
    triage : TriageSettings or None
        Run the triage pass over every slide's cells first and score only its diffusion plan's cells
        (``anopilad analyze --triage``); None scores every cell.
    compile_mode : str or None
        ``torch.compile`` mode of AnoPILaD's UNet in each worker (``anopilad analyze --compile``); None runs
        it eagerly.
    """

    bundle: Path
    out: Path
    store_root: Path | None = None
    device: str = "auto"
    batch_size: int | str = 8
    block_size: int = 256
    threshold: float = 0.0
    mpp: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    region_level0: tuple[int, int, int, int] | None = None
    max_patches: int | None = None
    save_reconstructions: bool = False
    triage: TriageSettings | None = None
    compile_mode: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size != "auto" and (isinstance(self.batch_size, str) or self.batch_size < 1):
            raise ValueError(f"batch size {self.batch_size} is invalid: use 1 or more, or auto")
        if self.block_size < 1:
            raise ValueError(f"block size {self.block_size} is invalid: use 1 or more")
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(
                f"mpp {self.mpp} is invalid: give the level-0 microns per pixel, a positive number"
            )
        if self.max_patches is not None and self.max_patches < 1:
            raise ValueError(f"max patches {self.max_patches} is invalid: use 1 or more")

    def slide_out(self, name: str) -> Path:
        """Return the output folder of slide ``name``."""
        return self.out / name

    def slide_store_root(self, name: str) -> Path:
        """Return the result store root of slide ``name``."""
        return self.store_root if self.store_root is not None else self.out / name / "store"


@dataclass(frozen=True)
class SlidePlan:
    """The plan of one slide, as ``prepare_slide`` returns it.

    Attributes
    ----------
    slide : CohortSlide
        The slide.
    status, error : str
        ``"ok"`` or ``"failed"``, and the error message of a failed slide.
    mpp_override : float or None
        The mpp passed to ``open_slide`` (the cohort's ``mpp`` when the file lacks one).
    grid : PatchGrid or None
        The slide's patch grid.
    cells : ndarray of int64, shape (n, 2)
        ``(row, col)`` of the cells to analyse: the tissue cells, of the region when one is given.
    blocks : list of ndarray
        The target cells the store lacked when planned, in the target's order, split into blocks of at
        most ``block_size``.
    store_folder : str
        The result store folder, the key that lets two slides with the same content share blocks.
    n_reused : int
        Target cells the store already held.
    triage : TriageResults or None
        The triage map of ``cells``, when the cohort runs with triage.
    triage_plan : TriagePlan or None
        The diffusion plan the triage map gave. Its ``priority`` cells (highest triage z first) are the
        target cells that AnoPILaD scores.
    n_triage_computed : int
        Cells the triage pass scored in this task (the rest came from the triage store).
    """

    slide: CohortSlide
    status: str
    error: str = ""
    mpp_override: float | None = None
    grid: Any = None
    cells: NDArray[np.int64] = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    blocks: list[NDArray[np.int64]] = field(default_factory=list)
    store_folder: str = ""
    n_reused: int = 0
    triage: Any = None
    triage_plan: Any = None
    n_triage_computed: int = 0

    @property
    def n_patches(self) -> int:
        return int(self.cells.shape[0])

    @property
    def target_cells(self) -> NDArray[np.int64]:
        """The cells AnoPILaD scores: the triage plan's budget, highest triage z first, or all ``cells``."""
        if self.triage_plan is None:
            return self.cells
        return np.asarray(self.triage_plan.priority, dtype=np.int64).reshape(-1, 2)


@dataclass(frozen=True)
class BlockOutcome:
    """The result of one ``score_block`` task: patches computed and reused, or the error."""

    status: str
    n_cells: int
    n_computed: int = 0
    n_reused: int = 0
    error: str = ""


@dataclass(frozen=True)
class SlideOutcome:
    """The cohort's result for one slide: a row of cohort.csv.

    Attributes
    ----------
    slide : CohortSlide
        The slide.
    status, error : str
        ``"ok"`` or ``"failed"``, and the error message of a failed slide.
    z_max, z_99 : float or None
        Slide scores over the analysed cells.
    anomaly_area_mm2 : float or None
        Area of the cells whose eroded z-score exceeds the threshold, in mm^2 at level-0 mpp.
    n_anomalous_patches, n_patches, n_computed : int
        Cells over the threshold, cells with an AnoPILaD score, and cells this run computed (the rest
        were reused).
    z_source : str
        ``"calibration"`` or ``"within-slide"``.
    files : dict of str to Path
        The output files written.
    n_tissue_patches : int
        Tissue cells of the slide, of the region when one is given: the denominator of the coverage in
        slide.json.
    triage_scorer : str
        ``"triage:<score>"`` when the cohort ran with triage, empty otherwise.
    triage_z_max, triage_z_99 : float or None
        The triage map's slide scores.
    n_triage_computed : int
        Cells the triage pass scored in this run.
    """

    slide: CohortSlide
    status: str
    error: str = ""
    z_max: float | None = None
    z_99: float | None = None
    anomaly_area_mm2: float | None = None
    n_anomalous_patches: int = 0
    n_patches: int = 0
    n_computed: int = 0
    z_source: str = ""
    files: dict[str, Path] = field(default_factory=dict)
    n_tissue_patches: int = 0
    triage_scorer: str = ""
    triage_z_max: float | None = None
    triage_z_99: float | None = None
    n_triage_computed: int = 0

    @property
    def coverage(self) -> float | None:
        """Fraction of the tissue cells with an AnoPILaD score; None when the count is unknown."""
        return self.n_patches / self.n_tissue_patches if self.n_tissue_patches else None


# -- per-process cache of the bundle and scorer ------------------------------------------------


@dataclass
class _LoadedModel:
    bundle: Any
    settings: Any
    scorer: Any = None
    # The CONCH triage scorer, built at the first triage task, and the k it was built with.
    triage_scorer: Any = None
    triage_k: int | None = None
    # One block at a time uses the scorer, also on workers that run several threads.
    lock: threading.Lock = field(default_factory=threading.Lock)


_cache_lock = threading.Lock()
_cache: dict[tuple[str, str, str, str], _LoadedModel] = {}


def _model_key(options: CohortOptions) -> tuple[str, str, str, str]:
    # A long-lived worker may serve cohorts with another bundle, other settings, device or compile mode.
    overrides = json.dumps(options.overrides, sort_keys=True, default=str)
    return str(Path(options.bundle).resolve()), overrides, options.device, str(options.compile_mode)


def _load_model(options: CohortOptions, with_scorer: bool, with_triage: bool = False) -> _LoadedModel:
    """Return this process's bundle, settings and (when asked) scorers for ``options``, loading them once.

    ``with_triage`` builds the triage scorer of ``options.triage``. It raises ValueError for a bundle
    that is not AnoPILaD's, and TriageReferenceError (a ValueError) for one without a valid triage
    reference.

    The cache keeps one model per process, so a worker that meets another bundle frees the previous
    one's device memory instead of holding both.
    """
    from napari_anopilad.method.scorers import load_any_bundle, make_scorer, method_of, score_names

    key = _model_key(options)
    with _cache_lock:
        model = _cache.get(key)
        if model is None:
            _cache.clear()
            bundle = load_any_bundle(options.bundle)
            settings = bundle.settings.with_overrides(**options.overrides)
            if settings.score not in score_names(bundle):
                raise ValueError(
                    f"score {settings.score!r} is not a {method_of(bundle)} score: "
                    f"use one of {', '.join(score_names(bundle))}"
                )
            model = _LoadedModel(bundle=bundle, settings=settings)
            _cache[key] = model
            logger.info("Loaded the bundle %s (identity %s)", options.bundle, bundle.identity)
        if with_scorer and model.scorer is None:
            from napari_anopilad.engine.device import check_precision, choose_device, describe_device

            device = choose_device(options.device)
            check_precision(device, model.settings.precision)
            model.scorer = make_scorer(model.bundle, str(device), model.settings, options.compile_mode)
            logger.info("Built the scorer on %s with %s", describe_device(device), model.settings)
        triage = options.triage
        if with_triage and triage is not None and (model.triage_scorer is None or model.triage_k != triage.k):
            from napari_anopilad.engine.device import choose_device
            from napari_anopilad.engine.triage_pass import check_triage_method
            from napari_anopilad.method.triage import TriageScorer

            check_triage_method(method_of(model.bundle), options.bundle)
            model.triage_scorer = TriageScorer(model.bundle, str(choose_device(options.device)), k=triage.k)
            model.triage_k = triage.k
            logger.info("Built the triage scorer with %s", triage)
    return model


def describe_bundle(options: CohortOptions) -> dict[str, Any]:
    """Load the bundle and build its scorer on a worker; return its identity, demo flag and the run's settings.

    The command runs this once before the slides, so a missing or invalid bundle, corrupt weights, a
    score the method lacks, an unusable device or (with triage) a missing triage reference stops the run
    with one message instead of failing every slide. The worker keeps the scorers for the slides it
    scores next.
    """
    # The triage scorer first: it is the quicker to build, so a missing reference fails fast.
    model = _load_model(options, with_scorer=False, with_triage=True)
    model = _load_model(options, with_scorer=True, with_triage=True)
    description = {
        "identity": model.bundle.identity,
        "demo": bool(model.bundle.demo),
        "settings": model.settings.to_dict(),
    }
    if model.triage_scorer is not None:
        description["triage_reference"] = model.triage_scorer.reference.identity
    return description


# -- the three tasks ---------------------------------------------------------------------------


def _error_text(error: BaseException) -> str:
    text = str(error).strip() or repr(error)
    return f"{type(error).__name__}: {text}"


def _log_failure(action: str, path: Path, error: Exception) -> None:
    """Log a task's caught error; bad input (a ValueError such as SlideError, or an OSError) without a traceback."""
    if isinstance(error, (ValueError, OSError)):
        logger.warning("Failed to %s %s: %s", action, path, error)
    else:
        logger.error("Failed to %s %s", action, path, exc_info=error)


def _open(slide: CohortSlide, mpp_override: float | None) -> Any:
    from napari_anopilad.slide import open_slide

    return open_slide(slide.path, mpp=mpp_override)


def _open_store(options: CohortOptions, plan: SlidePlan, slide: Any, model: _LoadedModel) -> Any:
    from napari_anopilad.engine.store import ResultStore, grid_description

    store = ResultStore(
        options.slide_store_root(plan.slide.name),
        slide.identity,
        model.bundle.identity,
        model.settings,
        grid=grid_description(plan.grid),
    )
    if plan.store_folder and str(store.folder) != plan.store_folder:
        raise RuntimeError(
            f"the slide {plan.slide.path} changed while the cohort ran (its result store moved from "
            f"{plan.store_folder} to {store.folder}); run the cohort again"
        )
    return store


def select_cells(
    grid: Any,
    cells: NDArray[np.int64],
    region_level0: tuple[int, int, int, int] | None,
    max_patches: int | None,
) -> NDArray[np.int64]:
    """Keep the cells that overlap ``region_level0`` (when given), then the first ``max_patches`` of them."""
    if region_level0 is not None:
        x_level0, y_level0, width_level0, height_level0 = region_level0
        size = int(grid.patch_size_level0)
        rows, cols = cells[:, 0], cells[:, 1]
        overlaps = (cols * size < x_level0 + width_level0) & ((cols + 1) * size > x_level0)
        overlaps &= (rows * size < y_level0 + height_level0) & ((rows + 1) * size > y_level0)
        cells = cells[overlaps]
    if max_patches is not None:
        cells = cells[:max_patches]
    return cells


def prepare_slide(slide: CohortSlide, options: CohortOptions) -> SlidePlan:
    """Open a slide, build its patch grid and result store, and split its remaining cells into blocks.

    Returns a failed plan (never raises for a bad slide) whose ``error`` names the file and the cause.
    """
    from napari_anopilad.slide import build_patch_grid, compute_tissue_mask

    try:
        model = _load_model(options, with_scorer=False)
        mpp_override = None
        with _open(slide, None) as opened:
            needs_mpp = opened.mpp is None
        if needs_mpp:
            if options.mpp is None:
                raise ValueError(
                    f"{slide.path}: the file does not give its microns per pixel; pass --mpp (for example 0.25)"
                )
            mpp_override = options.mpp

        with _open(slide, mpp_override) as opened:
            grid = build_patch_grid(opened, tissue_mask=compute_tissue_mask(opened))
            tissue = np.asarray(grid.tissue_cells(), dtype=np.int64).reshape(-1, 2)
            cells = select_cells(grid, tissue, options.region_level0, options.max_patches)
            if cells.size == 0:
                where = "in the region" if options.region_level0 is not None else "on the slide"
                raise ValueError(f"{slide.path}: no tissue patch {where}; check that it is a tissue section")
            plan = SlidePlan(slide=slide, status=STATUS_OK, mpp_override=mpp_override, grid=grid, cells=cells)
            store = _open_store(options, plan, opened, model)
            triage = triage_plan = None
            n_triage_computed = 0
            target = cells
            if options.triage is not None:
                triage, triage_plan, n_triage_computed = _run_triage(options, opened, grid, cells, store.root)
                target = triage_plan.priority

        done = store.done_cells(need_reconstructions=options.save_reconstructions)
        # The blocks keep the target's order, and a session scores its cells in the order given, so a
        # triage budget is scored highest triage z-score first.
        remaining = np.array([cell for cell in target.tolist() if tuple(cell) not in done], dtype=np.int64)
        remaining = remaining.reshape(-1, 2)
        blocks = [
            remaining[start : start + options.block_size]
            for start in range(0, len(remaining), options.block_size)
        ]
        return SlidePlan(
            slide=slide,
            status=STATUS_OK,
            mpp_override=mpp_override,
            grid=grid,
            cells=cells,
            blocks=blocks,
            store_folder=str(store.folder),
            n_reused=len(target) - len(remaining),
            triage=triage,
            triage_plan=triage_plan,
            n_triage_computed=n_triage_computed,
        )
    except Exception as error:
        _log_failure("plan the slide", slide.path, error)
        return SlidePlan(slide=slide, status=STATUS_FAILED, error=_error_text(error))


def _run_triage(
    options: CohortOptions, slide: Any, grid: Any, cells: NDArray[np.int64], store_root: Path
) -> tuple[Any, Any, int]:
    """Run the triage pass over ``cells`` into the triage store under ``store_root``; return map, plan and count."""
    from napari_anopilad.engine.triage_pass import run_slide_triage

    assert options.triage is not None
    model = _load_model(options, with_scorer=False, with_triage=True)
    with model.lock:
        return run_slide_triage(
            store_root,
            slide,
            grid,
            model.bundle,
            model.triage_scorer,
            cells,
            settings=options.triage,
            threshold=options.threshold,
        )


def score_block(plan: SlidePlan, cells: NDArray[np.int64], options: CohortOptions) -> BlockOutcome:
    """Score the cells of one block that the slide's store lacks, writing each batch to the store.

    Safe to run again (dask reruns the tasks of a worker that died): stored cells are skipped.
    """
    from napari_anopilad.engine.results import calibration_reference
    from napari_anopilad.engine.session import AnalysisSession

    try:
        model = _load_model(options, with_scorer=True)
        with model.lock, _open(plan.slide, plan.mpp_override) as slide:
            store = _open_store(options, plan, slide, model)
            session = AnalysisSession(
                slide,
                plan.grid,
                model.scorer,
                store,
                cells=cells,
                batch_size=options.batch_size,
                save_reconstructions=options.save_reconstructions,
                calibration=calibration_reference(model.bundle, model.settings),
            )
            n_computed = 0
            for batch in session.run():
                n_computed += len(batch.cells)
        return BlockOutcome(
            status=STATUS_OK, n_cells=len(cells), n_computed=n_computed, n_reused=session.n_reused
        )
    except Exception as error:
        _log_failure(f"score a block of {len(cells)} patches of", plan.slide.path, error)
        return BlockOutcome(status=STATUS_FAILED, n_cells=len(cells), error=_error_text(error))


def finish_slide(plan: SlidePlan, blocks: Sequence[BlockOutcome], options: CohortOptions) -> SlideOutcome:
    """Compute the slide results from the store and write the slide's output files.

    The files are those of ``anopilad analyze`` (:func:`napari_anopilad.engine.outputs.write_outputs`).
    Returns a failed outcome when a block failed or the store lacks cells; never raises for a bad slide.
    """
    from napari_anopilad.engine.outputs import tissue_cells_of, write_outputs
    from napari_anopilad.engine.results import compute_slide_results

    failed = [block for block in blocks if block.status != STATUS_OK]
    n_computed = sum(block.n_computed for block in blocks)
    if failed:
        return SlideOutcome(
            slide=plan.slide, status=STATUS_FAILED, error=failed[0].error, n_computed=n_computed
        )
    try:
        model = _load_model(options, with_scorer=False)
        out = options.slide_out(plan.slide.name)
        out.mkdir(parents=True, exist_ok=True)
        with _open(plan.slide, plan.mpp_override) as slide:
            store = _open_store(options, plan, slide, model)
            # As in analyze, the results take every stored cell of the slide's cells, so a triage
            # budget's results also keep cells that an earlier run with a larger budget scored.
            results = compute_slide_results(
                store, plan.grid, model.bundle, options.threshold, cells=plan.cells, settings=model.settings
            )
            done = store.done_cells()
            target = plan.target_cells
            n_stored = sum((int(row), int(col)) in done for row, col in target)
            if n_stored < len(target):
                raise RuntimeError(
                    f"the result store {store.folder} contains {n_stored} of the slide's "
                    f"{len(target)} patches to score; run the cohort again to score the rest"
                )
            files = write_outputs(
                out,
                slide=slide,
                grid=plan.grid,
                results=results,
                settings=model.settings,
                bundle=model.bundle,
                region_level0=options.region_level0,
                store=store if options.save_reconstructions else None,
                triage=plan.triage,
                plan=plan.triage_plan,
                compile_mode=options.compile_mode,
            )
            n_tissue = len(tissue_cells_of(plan.grid, options.region_level0))
            n_anomalous = int(np.count_nonzero(results.mask))
            # The grid needs a known mpp, so the level-0 cell side converts to microns here.
            cell_side_um = float(plan.grid.patch_size_level0) * float(slide.mpp)
        return SlideOutcome(
            slide=plan.slide,
            status=STATUS_OK,
            z_max=results.z_max,
            z_99=results.z_99,
            anomaly_area_mm2=n_anomalous * cell_side_um**2 / 1e6,
            n_anomalous_patches=n_anomalous,
            n_patches=results.n_patches,
            n_computed=n_computed,
            z_source=results.z_source,
            files=files,
            n_tissue_patches=n_tissue,
            triage_scorer=plan.triage.scorer_name if plan.triage is not None else "",
            triage_z_max=plan.triage.z_max if plan.triage is not None else None,
            triage_z_99=plan.triage.z_99 if plan.triage is not None else None,
            n_triage_computed=plan.n_triage_computed,
        )
    except Exception as error:
        _log_failure("write the results of", plan.slide.path, error)
        return SlideOutcome(
            slide=plan.slide, status=STATUS_FAILED, error=_error_text(error), n_computed=n_computed
        )


# -- the client side ---------------------------------------------------------------------------


def _task_key(kind: str, run_token: str, *parts: Any) -> str:
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]
    return f"{kind}-{run_token}-{digest}"


def block_key(run_token: str, store_folder: str, cells: NDArray[np.int64]) -> tuple[str, str, str]:
    """Return the dask key of a block task: ``("score-block-<run>", store folder, hash of the cells)``.

    The dashboard groups the tasks by the first element, and the store folder identifies the slide
    that a running block writes to.
    """
    digest = hashlib.sha256(np.ascontiguousarray(cells, dtype=np.int64).tobytes()).hexdigest()[:16]
    return (f"score-block-{run_token}", store_folder, digest)


@dataclass
class CohortProgress:
    """Counts a cohort run reports as it goes: patches planned, patches finished and slides finished."""

    n_patches: int = 0
    n_patches_done: int = 0
    n_slides_done: int = 0


def run_cohort(
    client: Any,
    slides: Sequence[CohortSlide],
    options: CohortOptions,
    *,
    on_progress: Callable[[CohortProgress, SlideOutcome | None], None] | None = None,
) -> list[SlideOutcome]:
    """Analyse every slide on the cluster behind ``client`` and return one outcome per slide.

    Parameters
    ----------
    client : distributed.Client
        A client of the cluster whose workers run the tasks. Workers must import this package and
        see the slide, bundle and output paths.
    slides : sequence of CohortSlide
        The slides, with unique names.
    options : CohortOptions
        Options shared by every slide.
    on_progress : callable, optional
        Called on the client after each finished task with the counts so far and, when a slide has
        just finished, its outcome.

    Returns
    -------
    list of SlideOutcome
        In the order of ``slides``. A slide whose tasks raised or whose worker died too often is a
        failed outcome with the error; the others are unaffected.
    """
    from distributed import as_completed

    names = [slide.name for slide in slides]
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"slide names must be unique in a cohort, but {', '.join(duplicates)} repeat")

    run_token = uuid.uuid4().hex[:8]
    progress = CohortProgress()
    outcomes: dict[str, SlideOutcome] = {}
    # What each future is: ("prepare" | "block" | "finish", slide index, number of cells).
    roles: dict[Any, tuple[str, int, int]] = {}
    # Futures stay referenced here until the end, so a block that two slides share is kept for both.
    held: list[Any] = []

    prepares = []
    for index, slide in enumerate(slides):
        future = client.submit(
            prepare_slide,
            slide,
            options,
            key=_task_key("prepare-slide", run_token, index, str(slide.path)),
            priority=_PRIORITY_PREPARE,
            pure=False,
        )
        roles[future.key] = ("prepare", index, 0)
        prepares.append(future)
    held.extend(prepares)

    pending = as_completed(prepares)
    for future in pending:
        role, index, n_cells = roles[future.key]
        slide = slides[index]
        try:
            result = future.result()
        except Exception as error:
            logger.error("A %s task of %s failed: %s", role, slide.path, _error_text(error))
            if role == "block":
                # The finish task depends on this block and reports the error for the slide.
                continue
            result = SlideOutcome(slide=slide, status=STATUS_FAILED, error=_error_text(error))
            role = "finish"

        if role == "prepare":
            plan: SlidePlan = result
            if plan.status != STATUS_OK:
                outcomes[slide.name] = SlideOutcome(slide=slide, status=STATUS_FAILED, error=plan.error)
                progress.n_slides_done += 1
                if on_progress is not None:
                    on_progress(progress, outcomes[slide.name])
                continue
            blocks = []
            for block_cells in plan.blocks:
                # Slides with the same store (copies of one file, a shared --store) share block tasks.
                key = block_key(run_token, plan.store_folder, block_cells)
                block = client.submit(
                    score_block, plan, block_cells, options, key=key, priority=len(slides) - index
                )
                roles.setdefault(block.key, ("block", index, len(block_cells)))
                blocks.append(block)
                pending.add(block)
            finish = client.submit(
                finish_slide,
                plan,
                blocks,
                options,
                key=_task_key("finish-slide", run_token, index, str(slide.path)),
                priority=_PRIORITY_FINISH,
                pure=False,
            )
            roles[finish.key] = ("finish", index, 0)
            pending.add(finish)
            held.extend([*blocks, finish])
            progress.n_patches += len(plan.target_cells)
            progress.n_patches_done += plan.n_reused
            if on_progress is not None:
                on_progress(progress, None)
        elif role == "block":
            progress.n_patches_done += n_cells
            if on_progress is not None:
                on_progress(progress, None)
        else:
            outcome: SlideOutcome = result
            outcomes[slide.name] = outcome
            progress.n_slides_done += 1
            if on_progress is not None:
                on_progress(progress, outcome)

    return [outcomes[slide.name] for slide in slides]


def unique_slide_names(paths: Sequence[Path]) -> list[str]:
    """Name each slide by its file stem, appending ``-2``, ``-3``... to stems that repeat."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for path in paths:
        stem = Path(path).stem or "slide"
        count = seen.get(stem, 0) + 1
        seen[stem] = count
        names.append(stem if count == 1 else f"{stem}-{count}")
    # A suffixed name can collide with a real stem ("a-2.svs" next to two "a.svs"); count up past it.
    taken: set[str] = set()
    for index, name in enumerate(names):
        candidate, number = name, 2
        while candidate in taken:
            candidate = f"{name}-{number}"
            number += 1
        taken.add(candidate)
        names[index] = candidate
    return names


COHORT_COLUMNS = (
    "slide",
    "z_max",
    "z_99",
    "anomaly_area_mm2",
    "n_anomalous_patches",
    "n_patches",
    "status",
    "error",
    "z_source",
    "n_tissue_patches",
    "coverage",
    "triage_scorer",
    "triage_z_max",
    "triage_z_99",
    "path",
)


def sort_outcomes(outcomes: Sequence[SlideOutcome]) -> list[SlideOutcome]:
    """Order outcomes by Z_99, highest first; slides without a Z_99 (failed ones) follow, by name."""

    def key(outcome: SlideOutcome) -> tuple[int, float, str]:
        if outcome.z_99 is None or not math.isfinite(outcome.z_99):
            return (1, 0.0, outcome.slide.name)
        return (0, -outcome.z_99, outcome.slide.name)

    return sorted(outcomes, key=key)


def _csv_number(value: float | None) -> str:
    # repr keeps every digit, so the table gives back exactly the value in each slide's slide.json.
    return "" if value is None else repr(float(value))


def write_cohort_csv(path: str | Path, outcomes: Sequence[SlideOutcome]) -> Path:
    """Write cohort.csv: one row per slide, sorted by :func:`sort_outcomes`, columns :data:`COHORT_COLUMNS`.

    The file is written to a temporary name and renamed, so a reader never sees half a table.
    """
    import csv
    import io
    import os

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COHORT_COLUMNS)
    for outcome in sort_outcomes(outcomes):
        writer.writerow(
            [
                outcome.slide.name,
                _csv_number(outcome.z_max),
                _csv_number(outcome.z_99),
                _csv_number(outcome.anomaly_area_mm2),
                outcome.n_anomalous_patches if outcome.status == STATUS_OK else "",
                outcome.n_patches if outcome.status == STATUS_OK else "",
                outcome.status,
                " ".join(outcome.error.split()),
                outcome.z_source,
                outcome.n_tissue_patches if outcome.status == STATUS_OK else "",
                _csv_number(outcome.coverage) if outcome.status == STATUS_OK else "",
                outcome.triage_scorer,
                _csv_number(outcome.triage_z_max),
                _csv_number(outcome.triage_z_99),
                str(outcome.slide.path),
            ]
        )
    path = Path(path)
    temp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temp_path.write_text(buffer.getvalue())
    os.replace(temp_path, path)
    return path
