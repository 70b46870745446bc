"""Dock widget "Anomaly analysis": bundle, device and settings, and the analysis of the slide in view.

The model runs in a napari ``thread_worker`` generator (:func:`analysis_worker`) that never touches Qt:
it yields one message when the slide's grid and stored results are ready, then each finished batch.
The GUI thread turns those into layer updates. Pans and zooms are debounced and re-queue the patches
in view at the front.

The bundle may be AnoPILaD's or a comparison method's (``bundle.json`` names it): the form then
disables the AnoPILaD settings the method does not use, lists the method's scores and disables
triage, which needs an AnoPILaD bundle.

With "Triage first", the worker maps every tissue patch with the CONCH triage scorer before the
diffusion. The triage map becomes its own layer, and the diffusion then scores the patches in view and
the triage budget, highest triage score first. Scores already in the triage store are reused, so a
slide with a full store gets its triage map without scoring, and a partial store's map shows first.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from napari.qt.threading import thread_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from numpy.typing import NDArray
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_anopilad._reader import opened_slide
from napari_anopilad.engine.triage_pass import (
    DEFAULT_BUDGET_FRACTION,
    DEFAULT_NEIGHBOUR_RADIUS,
    DEFAULT_TRIAGE_SCORE,
    TRIAGE_SCORE_NAMES,
)
from napari_anopilad.method.baselines.base import BaselineSettings
from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.scorers import ANOPILAD, method_label
from napari_anopilad.method.settings import SAMPLERS, SCORES, InferenceSettings
from napari_anopilad.slide.errors import SlideError
from napari_anopilad.widgets.layers import cells_in_box, show_triage_layer, viewer_camera, visible_box_level0
from napari_anopilad.widgets.model import PatchAccumulator, SlideAnalysis, analyses_for, slide_metadata

logger = logging.getLogger(__name__)

# Pans and zooms within this many milliseconds of each other re-queue the view once.
REQUEUE_DELAY_MS = 300
DEFAULT_BATCH_SIZE = 8
MPP_LABEL = "Level-0 µm/pixel"


# -- messages from the worker --------------------------------------------------------------------


@dataclass
class AnalysisRequest:
    """Everything the worker needs, captured on the GUI thread when the user starts an analysis."""

    slide_path: str
    bundle_folder: Path
    device: str
    overrides: dict[str, Any]
    batch_size: int
    whole_slide: bool
    save_reconstructions: bool
    visible_box_level0: tuple[float, float, float, float] | None
    store_root: Path
    load_only: bool = False
    # Level-0 microns per pixel for a slide whose metadata lacks it; None keeps the slide's own.
    mpp: float | None = None
    triage: bool = False
    triage_score: str = DEFAULT_TRIAGE_SCORE
    triage_budget: float = DEFAULT_BUDGET_FRACTION
    triage_neighbours: int = DEFAULT_NEIGHBOUR_RADIUS


class MissingResolutionError(SlideError):
    """The slide has no microns per pixel in its metadata and the dock gives none."""


@dataclass
class Prepared:
    """First message of a run: the patch grid, the store and what it already holds."""

    slide: Any
    bundle: Any
    settings: InferenceSettings | BaselineSettings
    grid: Any
    store: Any
    stored: Any
    calibration: tuple[float, float] | None


@dataclass
class Started:
    """The model is loaded and a session over ``n_total`` patches starts on ``device_name``."""

    device_name: str
    n_total: int
    n_done: int


@dataclass
class TriageStored:
    """Map of the triage scores stored for some of the tissue patches, shown before the pass scores the others."""

    results: Any


@dataclass
class TriageReady:
    """The triage pass is done: its map of the slide and the diffusion plan it gave."""

    results: Any
    plan: Any
    n_computed: int
    patches_per_s: float


@dataclass
class AnalysisControl:
    """Thread-safe link between the GUI thread and the running worker.

    The GUI adds the cells that come into view, and the running session puts them at the front of its
    queue at once. The worker reads the ones still pending when a session ends.
    """

    wanted: list[tuple[int, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    session: Any = None
    triage_pass: Any = None

    def request_cells(self, cells: NDArray[np.integer]) -> None:
        """Queue these cells first, in this order."""
        cell_list = [(int(row), int(col)) for row, col in np.asarray(cells, dtype=np.int64).reshape(-1, 2)]
        with self._lock:
            known = set(self.wanted)
            self.wanted.extend(cell for cell in cell_list if cell not in known)
            session = self.session
        if session is not None and cell_list:
            session.prioritize(np.array(cell_list, dtype=np.int64))

    def pending(self, done: set[tuple[int, int]]) -> list[tuple[int, int]]:
        """Return the requested cells not yet done, in the order they were requested."""
        with self._lock:
            return [cell for cell in self.wanted if cell not in done]

    def stop(self) -> None:
        """Stop the worker within one batch."""
        self._stop.set()
        with self._lock:
            session = self.session
            triage_pass = self.triage_pass
        if session is not None:
            session.cancel()
        if triage_pass is not None:
            triage_pass.cancel()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def set_session(self, session: Any) -> None:
        with self._lock:
            self.session = session

    def set_triage_pass(self, triage_pass: Any) -> None:
        with self._lock:
            self.triage_pass = triage_pass
        if triage_pass is not None and self.stopped:
            triage_pass.cancel()


class ModelCache:
    """Loaded bundles and scorers, kept between runs so that a pan does not reload the model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bundles: dict[str, Any] = {}
        self._scorers: dict[tuple[str, str, str], Any] = {}
        self._triage_scorers: dict[tuple[str, str], Any] = {}

    def bundle(self, folder: Path) -> Any:
        """Return the bundle in ``folder`` (AnoPILaD's or a comparison method's), loading it on first use."""
        from napari_anopilad.method.scorers import load_any_bundle

        key = str(Path(folder).resolve())
        with self._lock:
            if key not in self._bundles:
                self._bundles[key] = load_any_bundle(folder)
            return self._bundles[key]

    def scorer(
        self, folder: Path, bundle: Any, device: Any, settings: InferenceSettings | BaselineSettings
    ) -> Any:
        """Return the bundle's scorer on ``device`` under ``settings``, building it on first use."""
        from napari_anopilad.method.scorers import make_scorer

        key = (str(Path(folder).resolve()), str(device), settings.score_key())
        with self._lock:
            if key not in self._scorers:
                # One model in memory at a time. A setting that leaves the models as they are (the start
                # timestep, for one) reuses them, and any other setting or device loads them again.
                reused = None
                for (other_folder, other_device, _), other in self._scorers.items():
                    if (other_folder, other_device) == key[:2] and hasattr(other, "with_settings"):
                        reused = other.with_settings(settings)
                if reused is None and self._scorers:
                    # The old models were frozen with everything else: unfrozen, the collector can free
                    # those of them that are in reference cycles.
                    gc.unfreeze()
                self._scorers.clear()
                self._scorers[key] = reused or make_scorer(bundle, str(device), settings)
                freeze_objects()
            return self._scorers[key]

    def triage_scorer(self, folder: Path, bundle: Any, device: Any) -> Any:
        """Return the triage scorer (CONCH and the bundle's triage reference) of this bundle and device."""
        from napari_anopilad.method.triage import TriageScorer

        key = (str(Path(folder).resolve()), str(device))
        with self._lock:
            if key not in self._triage_scorers:
                self._triage_scorers.clear()
                self._triage_scorers[key] = TriageScorer(bundle, str(device))
            return self._triage_scorers[key]


def analysis_worker(
    request: AnalysisRequest, control: AnalysisControl, models: ModelCache
) -> Generator[Any, None, None]:
    """Run one analysis; yields :class:`Prepared`, :class:`Started`, then each ``BatchResult``.

    With ``request.triage``, a :class:`TriageStored` (only for a partly filled triage store), each
    ``TriageBatch`` of the triage pass and a :class:`TriageReady` come between :class:`Prepared` and
    :class:`Started`. Runs in a worker thread and never touches Qt or
    napari layers.
    """
    from napari_anopilad.engine.device import choose_device, describe_device
    from napari_anopilad.engine.results import calibration_reference
    from napari_anopilad.engine.session import AnalysisSession
    from napari_anopilad.engine.store import ResultStore, grid_description
    from napari_anopilad.method.scorers import method_of
    from napari_anopilad.slide import build_patch_grid

    # 1. The slide's grid, the bundle and what the store already holds: shown before any model runs.
    slide = opened_slide(request.slide_path, mpp=request.mpp)
    if slide.mpp is None:
        raise MissingResolutionError(
            f"{Path(request.slide_path).name}: the slide's resolution (microns per pixel) is not in its "
            f"metadata; set '{MPP_LABEL}' in the Anomaly analysis dock (for example 0.25 for a 40x scan, "
            "0.5 for 20x) and analyse again"
        )
    bundle = models.bundle(request.bundle_folder)
    method = method_of(bundle)
    if request.triage and method != ANOPILAD:
        raise ValueError(
            f"Triage first needs an AnoPILaD bundle with a triage reference, but {request.bundle_folder} "
            f"is a {method_label(method)} bundle. Clear Triage first or choose an AnoPILaD bundle"
        )
    settings = bundle.settings.with_overrides(**request.overrides)
    grid = build_patch_grid(slide)
    store = ResultStore(
        request.store_root, slide.identity, bundle.identity, settings, grid=grid_description(grid)
    )
    calibration = calibration_reference(bundle, settings)
    yield Prepared(slide, bundle, settings, grid, store, store.load(), calibration)
    if request.load_only or control.stopped:
        return

    # 2. The model, and the cells in view first.
    device = choose_device(request.device)
    scorer = models.scorer(request.bundle_folder, bundle, device, settings)
    tissue_cells = grid.tissue_cells()
    if request.visible_box_level0 is not None:
        visible = cells_in_box(request.visible_box_level0, grid.patch_size_level0, grid.shape, tissue_cells)
        control.request_cells(visible)

    # 3. With triage, the triage map of every tissue patch and the diffusion plan it gives.
    plan = None
    if request.triage:
        plan = yield from _triage_first(request, control, models, slide, bundle, grid, device)
        if plan is None:
            return

    # 4. Sessions: the whole slide in one, the triage budget and the cells in view in one, or the cells in
    # view, again as long as new ones come into view.
    while not control.stopped:
        done = store.done_cells(need_reconstructions=request.save_reconstructions)
        pending = np.array(control.pending(done), dtype=np.int64).reshape(-1, 2)
        if plan is not None:
            cells = np.concatenate([plan.cells, pending])
        else:
            cells = tissue_cells if request.whole_slide else pending
        if len(cells) == 0:
            return
        session = AnalysisSession(
            slide,
            grid,
            scorer,
            store,
            cells=cells,
            batch_size=request.batch_size,
            save_reconstructions=request.save_reconstructions,
            calibration=calibration,
        )
        control.set_session(session)
        if plan is not None:
            session.prioritize(plan.priority)
        # A later prioritize goes first, so the cells in view come before the triage order.
        session.prioritize(np.array(control.pending(done), dtype=np.int64).reshape(-1, 2))
        if session.n_remaining == 0:
            return
        yield Started(describe_device(device), session.n_total, session.n_done)
        yield from session.run()
        control.set_session(None)
        if request.whole_slide:
            return


def _triage_first(
    request: AnalysisRequest,
    control: AnalysisControl,
    models: ModelCache,
    slide: Any,
    bundle: Any,
    grid: Any,
    device: Any,
) -> Generator[Any, None, Any]:
    """Run the triage pass over every tissue cell, yielding each batch, then :class:`TriageReady`.

    Stored triage scores are reused, not computed again. When the store contains some but not all tissue cells,
    a :class:`TriageStored` with their map comes before the first batch.

    Returns the diffusion plan, or None when the pass was stopped before it finished.
    """
    from napari_anopilad.engine.triage_pass import (
        TriagePass,
        compute_triage_results,
        open_triage_store,
        plan_diffusion,
    )

    scorer = models.triage_scorer(request.bundle_folder, bundle, device)
    triage_store = open_triage_store(request.store_root, slide, bundle, scorer, grid)
    tissue_cells = np.asarray(grid.tissue_cells(), dtype=np.int64).reshape(-1, 2)
    triage_pass = TriagePass(slide, grid, scorer, triage_store, cells=tissue_cells)
    if triage_pass.n_reused and triage_pass.remaining:
        # A full store goes straight to TriageReady below, but a partial one is shown while the rest is scored.
        yield TriageStored(
            compute_triage_results(triage_store, grid, request.triage_score, cells=tissue_cells)
        )
    control.set_triage_pass(triage_pass)
    n_computed = 0
    patches_per_s = 0.0
    try:
        for batch in triage_pass.run():
            n_computed += len(batch.cells)
            patches_per_s = batch.patches_per_s
            yield batch
    finally:
        control.set_triage_pass(None)
    if control.stopped:
        return None

    results = compute_triage_results(triage_store, grid, request.triage_score, cells=tissue_cells)
    plan = plan_diffusion(results, tissue_cells, request.triage_budget, request.triage_neighbours)
    yield TriageReady(results, plan, n_computed, patches_per_s)
    return plan


# -- the dock widget -----------------------------------------------------------------------------


class AnalysisWidget(QWidget):
    """Choose a bundle and settings, and analyse the slide in view or the whole slide.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer with the slide layer (opened by this plugin's reader).
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.analyses = analyses_for(napari_viewer)
        self.models = ModelCache()
        self.analysis: SlideAnalysis | None = None
        self.worker: Any = None
        self.control: AnalysisControl | None = None
        self.request: AnalysisRequest | None = None
        self.accumulator: PatchAccumulator | None = None
        self.prepared: Prepared | None = None
        self.progress_bar: Any = None
        self.follow_view = False
        # Set when the user presses Analyse while the stored results are read: whole slide or not.
        self._queued_start: bool | None = None
        # Whether the last run ended with an error.
        self.failed = False
        self.device_name = ""
        self._last_batch_time = 0.0
        self._bundle_worker: Any = None
        self.loaded_bundle: Any = None
        # The method the form is set up for, and the AnoPILaD controls that method uses.
        self.form_method = ANOPILAD
        self.applicable_settings: set[str] = set()
        self.triage_layer: Any = None
        self.triage_ready: TriageReady | None = None
        # Handlers of the worker's messages and of the run's end, waiting to run in order.
        self._pending_handlers: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._handling_messages = False

        self._build_form()
        self.applicable_settings = set(self.setting_controls())
        self.requeue_timer = QTimer(self)
        self.requeue_timer.setSingleShot(True)
        self.requeue_timer.setInterval(REQUEUE_DELAY_MS)
        self.requeue_timer.timeout.connect(self.requeue_visible)
        camera = viewer_camera(self.viewer)
        camera.events.center.connect(self._on_view_changed)
        camera.events.zoom.connect(self._on_view_changed)
        self.viewer.layers.events.inserted.connect(self._refresh_slide_choices)
        self.viewer.layers.events.removed.connect(self._refresh_slide_choices)
        self._refresh_slide_choices()

    # -- layout ----------------------------------------------------------------------------------

    def _build_form(self) -> None:
        defaults = InferenceSettings()

        self.slide_choice = QComboBox()
        self.bundle_edit = QLineEdit()
        self.bundle_edit.setPlaceholderText("model bundle folder")
        self.bundle_edit.editingFinished.connect(self._on_bundle_folder_set)
        browse_button = QPushButton("Browse...")
        browse_button.clicked.connect(self._browse_bundle)
        self.demo_button = QPushButton("Make demo bundle")
        self.demo_button.setToolTip(
            "Build a tiny bundle with random weights to try the plugin (its scores mean nothing)"
        )
        self.demo_button.clicked.connect(self._make_demo_bundle)
        bundle_row = QHBoxLayout()
        bundle_row.addWidget(self.bundle_edit, stretch=1)
        bundle_row.addWidget(browse_button)

        self.device_choice = QComboBox()
        self.device_choice.setEditable(True)
        self.device_choice.addItems(_device_choices())
        self.start_timestep = QSpinBox()
        self.start_timestep.setRange(0, 999)
        self.start_timestep.setValue(defaults.start_timestep)
        self.start_timestep.setToolTip("Timestep the patch latent is noised to before denoising (of 1000)")
        self.sampler_choice = QComboBox()
        self.sampler_choice.addItems(list(SAMPLERS))
        self.sampler_choice.setCurrentText(defaults.sampler)
        self.guidance_scale = QDoubleSpinBox()
        self.guidance_scale.setRange(1.0, 30.0)
        self.guidance_scale.setSingleStep(0.5)
        self.guidance_scale.setValue(defaults.guidance_scale)
        self.guidance_scale.setToolTip("Classifier-free guidance scale; 1 skips the unconditional pass")
        self.score_choice = QComboBox()
        self.score_choice.addItems(list(SCORES))
        self.score_choice.setCurrentText(defaults.score)
        self.score_choice.setToolTip("Patch score behind the z-scores, the heatmap and the slide scores")
        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 512)
        self.batch_size.setValue(DEFAULT_BATCH_SIZE)
        self.mpp = QDoubleSpinBox()
        self.mpp.setRange(0.0, 100.0)
        self.mpp.setDecimals(4)
        self.mpp.setSingleStep(0.01)
        self.mpp.setSpecialValueText("from the slide")
        self.mpp.setValue(0.0)
        self.mpp.setToolTip(
            "Level-0 microns per pixel, for a slide whose metadata lacks it (0.25 for a 40x scan, 0.5 for 20x); "
            "'from the slide' uses the slide's own"
        )
        self.save_reconstructions = QCheckBox("Store reconstructions")
        self.save_reconstructions.setToolTip(
            "Keep every reconstructed patch on disk for the inspector; otherwise it recomputes one on demand"
        )

        form = QFormLayout()
        form.addRow("Slide", self.slide_choice)
        form.addRow("Bundle", bundle_row)
        form.addRow("", self.demo_button)
        form.addRow("Device", self.device_choice)
        form.addRow("Start timestep", self.start_timestep)
        form.addRow("Sampler", self.sampler_choice)
        form.addRow("Guidance scale", self.guidance_scale)
        form.addRow("Score", self.score_choice)
        form.addRow("Batch size", self.batch_size)
        form.addRow(MPP_LABEL, self.mpp)
        form.addRow("", self.save_reconstructions)
        self._add_triage_rows(form)
        # The tooltips of the controls that a comparison method may not use, restored for AnoPILaD.
        self._anopilad_tooltips = {
            control: control.toolTip()
            for control in (*self.setting_controls().values(), self.save_reconstructions, self.triage_check)
        }

        self.visible_button = QPushButton("Analyse visible region")
        self.whole_button = QPushButton("Analyse whole slide")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.visible_button.clicked.connect(lambda: self.start_analysis(whole_slide=False))
        self.whole_button.clicked.connect(lambda: self.start_analysis(whole_slide=True))
        self.stop_button.clicked.connect(self.stop)
        buttons = QHBoxLayout()
        buttons.addWidget(self.visible_button)
        buttons.addWidget(self.whole_button)
        buttons.addWidget(self.stop_button)

        self.demo_label = QLabel("DEMO bundle: random weights, the heatmap means nothing")
        self.demo_label.setStyleSheet("color: black; background: #ffcc00; font-weight: bold; padding: 2px;")
        self.demo_label.setVisible(False)
        self.status_label = QLabel("Open a slide with this plugin's reader and choose a bundle.")
        self.status_label.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.demo_label)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

    def _add_triage_rows(self, form: QFormLayout) -> None:
        self.triage_check = QCheckBox("Triage first")
        self.triage_check.setToolTip(
            "Map every tissue patch with the bundle's CONCH triage reference first (its own layer), then run "
            "the diffusion on the patches in view and on the triage budget, highest triage score first"
        )
        self.triage_budget = QDoubleSpinBox()
        self.triage_budget.setRange(0.0, 1.0)
        self.triage_budget.setDecimals(2)
        self.triage_budget.setSingleStep(0.05)
        self.triage_budget.setValue(DEFAULT_BUDGET_FRACTION)
        self.triage_budget.setToolTip(
            "Fraction of the tissue patches that the diffusion scores, highest triage score first; 1 scores all"
        )
        self.triage_neighbours = QSpinBox()
        self.triage_neighbours.setRange(0, 10)
        self.triage_neighbours.setValue(DEFAULT_NEIGHBOUR_RADIUS)
        self.triage_neighbours.setToolTip(
            "Also score the tissue patches within this many grid cells of each budget patch"
        )
        self.triage_score = QComboBox()
        self.triage_score.addItems(list(TRIAGE_SCORE_NAMES))
        self.triage_score.setCurrentText(DEFAULT_TRIAGE_SCORE)
        for control in (self.triage_budget, self.triage_neighbours, self.triage_score):
            control.setEnabled(False)
            self.triage_check.toggled.connect(control.setEnabled)
        form.addRow("", self.triage_check)
        form.addRow("Triage budget", self.triage_budget)
        form.addRow("Triage neighbours", self.triage_neighbours)
        form.addRow("Triage score", self.triage_score)

    # -- slide and bundle choice -----------------------------------------------------------------

    def _slide_layers(self) -> list[Any]:
        return [layer for layer in self.viewer.layers if slide_metadata(layer) is not None]

    def _refresh_slide_choices(self, event: Any = None) -> None:
        current = self.slide_choice.currentText()
        names = [layer.name for layer in self._slide_layers()]
        self.slide_choice.blockSignals(True)
        self.slide_choice.clear()
        self.slide_choice.addItems(names)
        if current in names:
            self.slide_choice.setCurrentText(current)
        self.slide_choice.blockSignals(False)

        # Stored results of a newly opened slide show at once when a bundle is chosen.
        inserted = getattr(event, "value", None) if event is not None and event.type == "inserted" else None
        if inserted is not None and slide_metadata(inserted) is not None and self.worker is None:
            self.slide_choice.setCurrentText(inserted.name)
            if self.bundle_edit.text().strip():
                self.show_stored_results()

    def slide_layer(self) -> Any:
        """Return the chosen slide layer, or None."""
        name = self.slide_choice.currentText()
        for layer in self._slide_layers():
            if layer.name == name:
                return layer
        return None

    def _browse_bundle(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "Choose a model bundle folder", self.bundle_edit.text()
        )
        if folder:
            self.set_bundle_folder(folder)

    def set_bundle_folder(self, folder: str | Path) -> None:
        """Choose the bundle folder and load its settings as the form's defaults (in a worker thread)."""
        self.bundle_edit.setText(str(folder))
        self._on_bundle_folder_set()

    def _on_bundle_folder_set(self) -> None:
        from napari_anopilad.method.baselines.base import bundle_method

        text = self.bundle_edit.text().strip()
        if not text:
            return
        folder = Path(text).expanduser()
        # Reading only bundle.json reports a folder without a valid one at once, before any model code loads.
        try:
            bundle_method(folder)
        except (BundleError, OSError) as error:
            self._on_bundle_error(folder, error)
            return
        import_model_code()
        # Errors go to _on_bundle_error only: ignore_errors stops the worker from raising them again in Qt.
        worker = thread_worker(self.models.bundle, start_thread=False, ignore_errors=True)(folder)
        worker.returned.connect(self._apply_bundle_defaults)
        worker.errored.connect(lambda error: self._on_bundle_error(folder, error))
        self._bundle_worker = worker
        self.status_label.setText(f"Loading the bundle {folder}...")
        worker.start()

    def _on_bundle_error(self, folder: Path, error: BaseException) -> None:
        """Report a bundle that failed to load in the status line and a notification, and reset the form."""
        if self._chosen_folder() != folder.resolve():
            return
        logger.warning("Could not load the bundle %s: %s", folder, error)
        self.loaded_bundle = None
        self.configure_form(None)
        self.demo_label.setVisible(False)
        message = f"Could not load the bundle {folder}: {error}"
        self.status_label.setText(message)
        show_error(message)

    def _chosen_folder(self) -> Path | None:
        text = self.bundle_edit.text().strip()
        return Path(text).expanduser().resolve() if text else None

    def _apply_bundle_defaults(self, bundle: Any) -> None:
        # A bundle that finished loading after another folder was chosen is not shown.
        if self._chosen_folder() != Path(bundle.folder).resolve():
            return
        self.loaded_bundle = bundle
        self.configure_form(bundle)
        demo = bool(getattr(bundle, "demo", False))
        self.demo_label.setVisible(demo)
        kind = "DEMO bundle" if demo else "Bundle"
        self.status_label.setText(
            f"{kind} loaded ({method_label(self.form_method)}): {self.bundle_edit.text()}"
        )
        if self.slide_layer() is not None and self.worker is None:
            self.show_stored_results()

    def setting_controls(self) -> dict[str, QWidget]:
        """Return the form's AnoPILaD inference controls, by the setting each one overrides."""
        return {
            "start_timestep": self.start_timestep,
            "sampler": self.sampler_choice,
            "guidance_scale": self.guidance_scale,
        }

    def configure_form(self, bundle: Any) -> None:
        """Set the form up for a loaded bundle, or for an AnoPILaD bundle when ``bundle`` is None.

        A comparison method uses only the AnoPILaD controls whose setting is one of its options, such as
        AnoDDPM's start timestep and sampler. The others are disabled and send no override. The score
        list is the method's own, with the bundle's score selected.
        """
        from napari_anopilad.method.scorers import method_of, reconstructs, score_names

        method = ANOPILAD if bundle is None else method_of(bundle)
        label = method_label(method)
        controls = self.setting_controls()
        if bundle is None:
            values: dict[str, Any] = {}
            applicable = set(controls)
        elif method == ANOPILAD:
            values = bundle.settings.to_dict()
            applicable = set(controls)
        else:
            values = dict(bundle.settings.options)
            applicable = {name for name in controls if name in values}
        self.form_method = method
        self.applicable_settings = applicable

        unused_tip = f"The {label} method does not use this setting"
        for name, control in controls.items():
            used = name in applicable
            control.setEnabled(used)
            control.setToolTip(self._anopilad_tooltips[control] if used else unused_tip)
            if used and name in values:
                _set_control_value(control, values[name])

        scores = list(SCORES) if bundle is None else list(score_names(bundle))
        self.score_choice.clear()
        self.score_choice.addItems(scores)
        self.score_choice.setCurrentText(scores[0] if bundle is None else bundle.settings.score)

        can_reconstruct = bundle is None or reconstructs(bundle)
        if not can_reconstruct:
            self.save_reconstructions.setChecked(False)
        self.save_reconstructions.setEnabled(can_reconstruct)
        self.save_reconstructions.setToolTip(
            self._anopilad_tooltips[self.save_reconstructions]
            if can_reconstruct
            else f"The {label} method scores patches without reconstructing them"
        )

        can_triage = method == ANOPILAD
        if not can_triage:
            # Unchecking also disables the triage budget, neighbour and score controls.
            self.triage_check.setChecked(False)
        self.triage_check.setEnabled(can_triage)
        self.triage_check.setToolTip(
            self._anopilad_tooltips[self.triage_check]
            if can_triage
            else f"Triage needs an AnoPILaD bundle with a triage reference, so the {label} method cannot use it"
        )

    def _make_demo_bundle(self) -> None:
        from napari_anopilad.engine.store import default_store_root

        folder = default_store_root().parent / "demo-bundle"
        import_model_code()

        def build() -> Path:
            from napari_anopilad.method.demo import make_demo_bundle

            return Path(make_demo_bundle(folder))

        # The errored handler shows the error: ignore_errors keeps it from being raised again in Qt.
        worker = thread_worker(build, start_thread=False, ignore_errors=True)()
        worker.returned.connect(self.set_bundle_folder)
        worker.errored.connect(
            lambda error: show_error(f"Could not build the demo bundle in {folder}: {error}")
        )
        self.status_label.setText(f"Building a demo bundle in {folder}...")
        self._bundle_worker = worker
        worker.start()

    def settings_overrides(self) -> dict[str, Any]:
        """Return the form's settings that override the bundle's: the score and the enabled controls only."""
        values = {
            "start_timestep": int(self.start_timestep.value()),
            "sampler": self.sampler_choice.currentText(),
            "guidance_scale": float(self.guidance_scale.value()),
        }
        overrides: dict[str, Any] = {
            name: value for name, value in values.items() if name in self.applicable_settings
        }
        overrides["score"] = self.score_choice.currentText() or None
        return overrides

    # -- runs ------------------------------------------------------------------------------------

    def _make_request(self, whole_slide: bool, load_only: bool = False) -> AnalysisRequest | None:
        from napari_anopilad.engine.store import default_store_root

        layer = self.slide_layer()
        if layer is None:
            show_error(
                "Open a slide with the napari-anopilad reader first (File > Open, or the sample data)."
            )
            return None
        folder_text = self.bundle_edit.text().strip()
        if not folder_text:
            show_error("Choose a model bundle folder, or make a demo bundle, before analysing.")
            return None
        bundle_folder = Path(folder_text).expanduser()
        loaded = self.loaded_bundle
        if loaded is not None and Path(loaded.folder).resolve() == bundle_folder.resolve():
            overrides = self.settings_overrides()
        else:
            # The form shows another bundle's settings, or none has loaded yet: run the bundle's own.
            overrides = {}
        save_reconstructions = self.save_reconstructions.isChecked() and self.save_reconstructions.isEnabled()
        metadata = slide_metadata(layer)
        assert metadata is not None
        box = None
        try:
            box = visible_box_level0(self.viewer, tuple(layer.level_shapes[0][:2]))
        except (AttributeError, ValueError) as error:
            logger.warning("Could not compute the region in view: %s", error)
        return AnalysisRequest(
            slide_path=metadata["path"],
            bundle_folder=bundle_folder,
            device=self.device_choice.currentText(),
            overrides=overrides,
            batch_size=int(self.batch_size.value()),
            whole_slide=whole_slide,
            save_reconstructions=save_reconstructions,
            visible_box_level0=box,
            store_root=default_store_root(),
            load_only=load_only,
            mpp=float(self.mpp.value()) if self.mpp.value() > 0 else None,
            triage=self.triage_check.isChecked() and self.triage_check.isEnabled(),
            triage_score=self.triage_score.currentText(),
            triage_budget=float(self.triage_budget.value()),
            triage_neighbours=int(self.triage_neighbours.value()),
        )

    def start_analysis(self, whole_slide: bool) -> None:
        """Analyse the patches in view (and those that come into view), or the whole slide, in view first."""
        if self.worker is not None:
            if self.request is not None and self.request.load_only:
                # Only the stored results are being read: the analysis starts as soon as that ends.
                self._queued_start = whole_slide
                self.status_label.setText("Reading the stored results; the analysis starts next...")
                return
            show_info("An analysis is running: press Stop first.")
            return
        request = self._make_request(whole_slide)
        if request is None:
            return
        self.follow_view = not whole_slide
        self._start_worker(request)

    def show_stored_results(self) -> None:
        """Show what the result store holds for the chosen slide, bundle and settings, without running."""
        request = self._make_request(whole_slide=False, load_only=True)
        if request is not None and self.worker is None:
            self._start_worker(request)

    def _start_worker(self, request: AnalysisRequest) -> None:
        import_model_code()
        self.request = request
        if request.triage and not request.load_only:
            self.triage_ready = None
        self.control = AnalysisControl()
        self.failed = False
        # _on_error shows the error once: ignore_errors keeps it from being raised again in Qt, which
        # would reach sys.excepthook a second time and abort a process without napari's hook.
        worker = thread_worker(analysis_worker, start_thread=False, ignore_errors=True)(
            request, self.control, self.models
        )
        worker.yielded.connect(lambda message: self._handle_in_order(self._on_message, message))
        worker.errored.connect(lambda error: self._handle_in_order(self._on_error, error))
        worker.finished.connect(lambda: self._handle_in_order(self._on_finished))
        self.worker = worker
        self._set_running(not request.load_only)
        self.status_label.setText("Reading the slide's tissue and the stored results...")
        worker.start()

    def stop(self) -> None:
        """Stop the analysis within one batch; finished batches stay in the result store."""
        self.follow_view = False
        if self.control is not None:
            self.control.stop()
        if self.worker is not None:
            self.status_label.setText("Stopping after the current batch...")

    def _set_running(self, running: bool) -> None:
        self.visible_button.setEnabled(not running)
        self.whole_button.setEnabled(not running)
        self.stop_button.setEnabled(running or self.follow_view)

    # -- messages on the GUI thread --------------------------------------------------------------

    def _handle_in_order(self, handler: Callable[..., None], *args: Any) -> None:
        """Run ``handler(*args)`` for a worker signal once the handlers of earlier signals have finished.

        napari's progress bar and layer controls process pending Qt events inside their own calls. Without
        this queue, the next message or the end of the run would be handled in the middle of an earlier
        message's handler, and the earlier handler would then overwrite the final status line.
        """
        self._pending_handlers.append((handler, args))
        self._run_pending_handlers()

    def _run_pending_handlers(self) -> None:
        if self._handling_messages:
            return
        self._handling_messages = True
        try:
            while self._pending_handlers:
                handler, args = self._pending_handlers.popleft()
                handler(*args)
        finally:
            self._handling_messages = False
            if self._pending_handlers:
                # A handler raised: Qt reports the exception, and the later handlers still run.
                QTimer.singleShot(0, self._run_pending_handlers)

    def _on_message(self, message: Any) -> None:
        from napari_anopilad.engine.triage_pass import TriageBatch

        if isinstance(message, Prepared):
            self._on_prepared(message)
        elif isinstance(message, TriageBatch):
            self._on_triage_batch(message)
        elif isinstance(message, TriageStored):
            self._on_triage_stored(message)
        elif isinstance(message, TriageReady):
            self._on_triage_ready(message)
        elif isinstance(message, Started):
            self._on_started(message)
        else:
            self._on_batch(message)

    def _on_triage_batch(self, batch: Any) -> None:
        self.status_label.setText(
            f"Triage: {batch.n_done} / {batch.n_total} tissue patches, {batch.patches_per_s:.1f} patches/s..."
        )

    def _on_triage_stored(self, stored: TriageStored) -> None:
        """Show the stored part of the triage map while the triage pass scores the missing patches."""
        results = stored.results
        if not self._show_triage_map(results):
            return
        self.status_label.setText(
            f"Stored triage map ({results.scorer_name}): {results.n_patches} / {results.n_tissue_patches} "
            "tissue patches. Scoring the missing ones..."
        )

    def _on_triage_ready(self, ready: TriageReady) -> None:
        """Show the triage map as its own layer and say what the diffusion covers next."""
        self.triage_ready = ready
        results = ready.results
        if not self._show_triage_map(results):
            return
        z_max = "n/a" if results.z_max is None else f"{results.z_max:.2f}"
        self.status_label.setText(
            f"Triage map ({results.scorer_name}): {results.n_patches} / {results.n_tissue_patches} tissue "
            f"patches, Z_max {z_max}. The diffusion scores the patches in view, then {ready.plan.n_budget} "
            "budget patches in triage order."
        )

    def _show_triage_map(self, results: Any) -> bool:
        """Show ``results`` (TriageResults) as the slide's triage layer and return True, or False without a slide or grid."""
        layer = self.slide_layer()
        prepared = self.prepared
        if layer is None or prepared is None:
            return False
        self.triage_layer = show_triage_layer(
            self.viewer,
            f"{layer.name} triage",
            results.heatmap_eroded,
            prepared.grid.patch_size_level0,
            metadata={
                "role": "triage",
                "slide": layer.name,
                "scorer": results.scorer_name,
                "coverage": results.coverage,
                "world_unit": "level-0 pixel",
            },
        )
        # The slide stays the active layer, so that the inspector and the threshold follow the analysis.
        self.viewer.layers.selection.active = layer
        return True

    def scoring_method(self) -> str:
        """Return the display name of the method behind the current results (AnoPILaD before any run)."""
        from napari_anopilad.method.scorers import method_of

        prepared = self.prepared
        return method_label(ANOPILAD if prepared is None else method_of(prepared.bundle))

    def coverage_text(self) -> str:
        """Return the status line's coverage: the scoring method's and, after a triage pass, the triage map's."""
        prepared = self.prepared
        if prepared is None or self.accumulator is None:
            return ""
        n_tissue = len(prepared.grid.tissue_cells())
        text = f"{self.scoring_method()} covers {len(self.accumulator)} / {n_tissue} tissue patches"
        if self.triage_ready is not None:
            triage = self.triage_ready.results
            text += f", triage ({triage.scorer_name}) {triage.n_patches} / {n_tissue}"
        return text

    def _on_prepared(self, prepared: Prepared) -> None:
        from napari_anopilad.method.scorers import method_of, reconstructs

        self.prepared = prepared
        method = method_of(prepared.bundle)
        layer = self.slide_layer()
        analysis = self.analysis
        same = (
            analysis is not None
            and analysis.slide_layer is layer
            and analysis.grid_shape == tuple(prepared.grid.shape)
            and analysis.store is not None
            and analysis.store.folder == prepared.store.folder
            and analysis.method == method
        )
        if not same:
            # Other settings or another method on the same slide and grid show in the same layers.
            grid_shape = (int(prepared.grid.shape[0]), int(prepared.grid.shape[1]))
            previous = (
                analysis if analysis is not None and analysis.can_hand_over(layer, grid_shape) else None
            )
            if analysis is not None and previous is None:
                analysis.remove_layers()
            analysis = SlideAnalysis(
                self.viewer, layer, prepared.slide, prepared.grid, method=method, previous=previous
            )
            self.analysis = analysis
        assert analysis is not None
        analysis.store = prepared.store
        analysis.demo = bool(getattr(prepared.bundle, "demo", False))
        analysis.reconstructs = reconstructs(prepared.bundle)
        analysis.reconstructor = self._make_reconstructor(prepared)
        self.demo_label.setVisible(analysis.demo)
        self.accumulator = PatchAccumulator(prepared.stored)
        self.viewer.layers.selection.active = layer
        self.analyses.set_current(analysis)
        self._update_results()
        n_stored = len(self.accumulator)
        self.status_label.setText(
            f"{n_stored} patches of {layer.name} scored by {method_label(method)} were already in the result store."
        )

    def _on_started(self, started: Started) -> None:
        self.device_name = started.device_name
        if self.progress_bar is not None:
            self.progress_bar.close()
        self.progress_bar = progress(total=started.n_total, desc=f"{self.scoring_method()} patches")
        self.progress_bar.update(started.n_done)
        self._last_batch_time = time.perf_counter()
        self.status_label.setText(
            f"Analysing {started.n_total - started.n_done} patches with {self.scoring_method()} "
            f"on {started.device_name}..."
        )

    def _on_batch(self, result: Any) -> None:
        assert self.accumulator is not None and self.request is not None
        self.accumulator.add_batch(result.cells, result.scores, self.request.save_reconstructions)
        self._update_results()
        if self.progress_bar is not None:
            self.progress_bar.update(max(result.n_done - self.progress_bar.n, 0))
        demo = "DEMO bundle, " if self.analysis is not None and self.analysis.demo else ""
        self.status_label.setText(
            f"{result.n_done} / {result.n_total} patches done, {result.patches_per_s:.2f} patches/s, "
            f"{demo}{self.device_name}, batch size {result.batch_size}. {self.coverage_text()}."
        )

    def _update_results(self) -> None:
        from napari_anopilad.engine.results import compute_slide_results

        prepared = self.prepared
        if self.analysis is None or self.accumulator is None or prepared is None:
            return
        results = compute_slide_results(
            self.accumulator.to_stored(),
            prepared.grid,
            bundle=prepared.bundle,
            threshold=self.analysis.threshold,
            settings=prepared.settings,
        )
        self.analysis.show_results(results)

    def _on_error(self, error: BaseException) -> None:
        if self.request is not None and self.request.load_only and isinstance(error, MissingResolutionError):
            # Reading stored results needs the grid, so a slide without a resolution cannot show any.
            # That is no failure until the user analyses, so the status line only names what to set.
            logger.info("No stored results shown: %s", error)
            self.status_label.setText(
                f"{self.slide_choice.currentText()} has no microns per pixel in its metadata: set "
                f"'{MPP_LABEL}' to analyse it."
            )
            return
        logger.error("Analysis failed", exc_info=error)
        show_error(f"The analysis failed: {error}")
        self.status_label.setText(f"Failed: {error}")
        self.failed = True
        self.follow_view = False
        self._queued_start = None

    def _on_finished(self) -> None:
        stopped = self.control is not None and self.control.stopped
        self.worker = None
        if self.progress_bar is not None:
            self.progress_bar.close()
            self.progress_bar = None
        self._set_running(False)
        if self._queued_start is not None:
            whole_slide, self._queued_start = self._queued_start, None
            self.start_analysis(whole_slide)
            return
        if self.request is not None and not self.request.load_only and not self.failed:
            done = len(self.accumulator) if self.accumulator is not None else 0
            state = "Stopped" if stopped else "Finished"
            follow = " Pan or zoom to analyse more of the slide." if self.follow_view else ""
            coverage = f" {self.coverage_text()}." if self.triage_ready is not None else ""
            self.status_label.setText(
                f"{state}: {done} patches of this slide analysed with {self.scoring_method()}.{coverage}{follow}"
            )

    # -- the view --------------------------------------------------------------------------------

    def _on_view_changed(self, event: Any = None) -> None:
        if self.worker is not None or self.follow_view:
            self.requeue_timer.start()

    def requeue_visible(self) -> None:
        """Queue the tissue patches in view first; in visible-region mode, analyse new ones."""
        prepared = self.prepared
        layer = self.slide_layer()
        if (
            prepared is None
            or layer is None
            or (self.analysis is not None and self.analysis.slide_layer is not layer)
        ):
            return
        box = visible_box_level0(self.viewer, tuple(layer.level_shapes[0][:2]))
        cells = cells_in_box(
            box, prepared.grid.patch_size_level0, prepared.grid.shape, prepared.grid.tissue_cells()
        )
        if self.worker is not None and self.control is not None:
            self.control.request_cells(cells)
            return
        if self.follow_view and self.request is not None and self.accumulator is not None:
            done = set(
                zip(self.accumulator.to_stored().rows.tolist(), self.accumulator.to_stored().cols.tolist())
            )
            if any((int(row), int(col)) not in done for row, col in cells):
                request = self.request
                request.visible_box_level0 = box
                request.load_only = False
                self._start_worker(request)

    # -- on-demand reconstruction ----------------------------------------------------------------

    def _make_reconstructor(self, prepared: Prepared) -> Any:
        """Return the inspector's single-patch reconstruction, or None when the method does not reconstruct."""
        from napari_anopilad.method.scorers import reconstructs

        if not reconstructs(prepared.bundle):
            return None
        request = self.request
        assert request is not None
        models = self.models
        slide_identity = prepared.slide.identity
        accumulator_owner = self

        def reconstruct(row: int, col: int, patch: NDArray[np.uint8]) -> NDArray[np.uint8]:
            # Runs in a worker thread: loads the scorer if needed, scores the one patch with its own
            # seeded noise (so the scores match the stored ones) and stores the reconstruction.
            from napari_anopilad.engine.device import choose_device

            device = choose_device(request.device)
            scorer = models.scorer(request.bundle_folder, prepared.bundle, device, prepared.settings)
            scores = scorer.score(
                patch[np.newaxis], noise_keys=[(slide_identity, row, col)], return_reconstructions=True
            )
            if scores.reconstructions is None:
                raise RuntimeError(f"the {type(scorer).__name__} scorer returned no reconstruction")
            image = np.asarray(scores.reconstructions[0], dtype=np.uint8)
            # AnoPILaD's scores have "prompts"; a comparison method's have empty "prompt" entries.
            prompts = getattr(scores, "prompts", None)
            prepared.store.write_batch(
                [(row, col)],
                scores=scores.score_values(),
                keywords=scores.keywords,
                similarities=scores.similarities,
                weights=scores.weights,
                prompts=prompts if prompts is not None else scores.prompt,
                reconstructions=image[np.newaxis],
            )
            accumulator = accumulator_owner.accumulator
            if accumulator is not None:
                accumulator.mark_reconstructed(row, col)
            return image

        return reconstruct

    def closeEvent(self, event: Any) -> None:
        self.stop()
        super().closeEvent(event)


def import_model_code() -> None:
    """Import the model stack (torch, diffusers, the scorer) on the GUI thread, once.

    diffusers imports torch's compiler stack, which imports triton when it is installed. Loading
    triton's LLVM into a process that already has an OpenGL context from Mesa's llvmpipe (napari's
    canvas under Xvfb or a remote desktop) crashes the process (seen with torch 2.14, triton and Mesa
    22.3). The plugin never compiles models, so triton is hidden from imports unless another package
    loaded it before the window opened. Importing here, not in a worker thread, keeps the first
    import of these large C extensions on the main thread.
    """
    if "triton" not in sys.modules:
        logger.info("napari-anopilad hides triton from torch: it crashes next to Mesa's OpenGL in napari")
        sys.modules["triton"] = None  # type: ignore[assignment]

    import diffusers  # noqa: F401

    import napari_anopilad.method.bundle
    import napari_anopilad.method.demo
    import napari_anopilad.method.scorer
    import napari_anopilad.method.scorers
    import napari_anopilad.method.triage  # noqa: F401

    freeze_objects()


def freeze_objects() -> None:
    """Move every object alive now out of the garbage collector's reach (``gc.freeze``).

    A full collection walks every tracked object: with napari, Qt, torch and the models loaded, more
    than a million. It runs in whichever thread allocates, holding the GIL, and a collection in the
    analysis worker stopped the GUI thread for 0.4 to 0.5 s. Modules, classes and loaded models live as
    long as the process, so leaving them out costs nothing. Garbage among them stays until exit.
    """
    gc.freeze()


def _set_control_value(control: QWidget, value: Any) -> None:
    if isinstance(control, QComboBox):
        control.setCurrentText(str(value))
    elif isinstance(control, QSpinBox):
        control.setValue(int(value))
    elif isinstance(control, QDoubleSpinBox):
        control.setValue(float(value))


def _device_choices() -> list[str]:
    choices = ["auto", "cpu"]
    try:
        import torch

        choices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return choices
