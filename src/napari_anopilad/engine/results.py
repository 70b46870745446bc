"""Slide results from the stored patch scores: z-scores, eroded heatmap, Z_max, Z_99, anomaly mask."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_anopilad.engine.store import ResultStore, StoredPatches
from napari_anopilad.method import heatmap
from napari_anopilad.method.baselines.base import BaselineSettings
from napari_anopilad.method.settings import InferenceSettings

logger = logging.getLogger(__name__)

Z_SOURCE_CALIBRATION = "calibration"
Z_SOURCE_WITHIN_SLIDE = "within-slide"
# Within-slide statistics need two patches with different scores. Without them every z-score is 0 and
# z_source starts with this text, which the threshold dock looks for.
Z_SOURCE_TOO_FEW = "within-slide (too few patches"


def too_few_patches_source(scores: NDArray[np.float64]) -> str | None:
    """Return the z_source of scores whose within-slide standard deviation is undefined or 0, else None."""
    n = len(scores)
    if n < 2:
        return f"{Z_SOURCE_TOO_FEW}: {n} scored, 2 with different scores needed)"
    if np.all(scores == scores[0]):
        return f"{Z_SOURCE_TOO_FEW}: all {n} scores are equal)"
    return None


_warned_calibrations: set[tuple[str, str]] = set()


def calibration_reference(
    bundle: Any, settings: InferenceSettings | BaselineSettings
) -> tuple[float, float] | None:
    """Return the bundle's ``(mean, std)`` of the chosen score if it was measured under these settings.

    Parameters
    ----------
    bundle : Bundle
        A loaded bundle.
    settings : InferenceSettings
        The settings of the analysis; ``settings.score`` names the score.

    Returns
    -------
    tuple of float or None
        None when the bundle has no calibration or one measured under settings that change the scores
        (``Bundle.calibration_for``); the caller then z-scores within the slide.
    """
    calibration = bundle.calibration_for(settings)
    if calibration is None:
        warning_key = (str(bundle.identity), settings.score_key())
        if bundle.calibration is not None and warning_key not in _warned_calibrations:
            # One analysis calls this several times (scorer, session, results), so the warning is logged once.
            _warned_calibrations.add(warning_key)
            logger.warning(
                "The bundle's calibration was measured under other settings (%s), so z-scores are within the slide",
                "; ".join(bundle.calibration.differences(settings)),
            )
        return None
    return float(calibration.mean[settings.score]), float(calibration.std[settings.score])


@dataclass(frozen=True)
class SlideResults:
    """The slide-level results of the analysed patches.

    Attributes
    ----------
    patches : StoredPatches
        The stored entries of the analysed cells, in the order of every per-patch array below.
    score_name : str
        ``"lpips"`` or ``"mse_latent"``.
    scores, z, z_eroded : ndarray of float64, shape (n,)
        Per patch: the score, its z-score and the eroded heatmap value at its cell.
    z_source : str
        ``"calibration"``, ``"within-slide"``, or ``"within-slide (too few patches: ...)"`` when fewer than
        two patches or only equal scores were analysed. The z-scores are then all 0 by convention, so
        the slide scores mean nothing.
    z_mean, z_std : float
        The statistics the z-scores used: the scores' mean and standard deviation (0) when there are
        too few patches, 0 and 0 when there is none.
    heatmap, heatmap_eroded : ndarray of float32, shape (rows, cols)
        Z-scores on the patch grid before and after the 2x2 erosion, NaN where no patch was analysed.
    z_max, z_99 : float or None
        Slide scores over the analysed cells; None when no patch was analysed.
    threshold : float
        The anomaly threshold on the eroded z-score.
    mask : ndarray of bool, shape (rows, cols)
        Cells whose eroded z-score exceeds ``threshold``.
    """

    patches: StoredPatches
    score_name: str
    scores: NDArray[np.float64]
    z: NDArray[np.float64]
    z_eroded: NDArray[np.float64]
    z_source: str
    z_mean: float
    z_std: float
    heatmap: NDArray[np.float32]
    heatmap_eroded: NDArray[np.float32]
    z_max: float | None
    z_99: float | None
    threshold: float
    mask: NDArray[np.bool_]

    @property
    def n_patches(self) -> int:
        return len(self.patches)

    def with_threshold(self, threshold: float) -> SlideResults:
        """Return these results with another anomaly threshold (the heatmap is unchanged)."""
        from dataclasses import replace

        return replace(
            self, threshold=float(threshold), mask=heatmap.anomaly_mask(self.heatmap_eroded, threshold)
        )


def compute_slide_results(
    store: ResultStore | StoredPatches,
    grid: Any,
    bundle: Any = None,
    threshold: float = 0.0,
    cells: Iterable[tuple[int, int]] | NDArray[np.integer] | None = None,
    settings: InferenceSettings | BaselineSettings | None = None,
) -> SlideResults:
    """Compute z-scores, the eroded heatmap, Z_max, Z_99 and the anomaly mask from stored scores.

    Parameters
    ----------
    store : ResultStore or StoredPatches
        The stored scores (or an already loaded copy).
    grid : PatchGrid
        The patch grid the scores belong to; gives the heatmap's shape.
    bundle : Bundle, optional
        Its calibration gives the z-score statistics when they hold for ``settings``; otherwise the
        z-scores are within the slide (over the analysed cells).
    threshold : float
        Anomaly threshold on the eroded z-score; 0 is the published default.
    cells : array_like, shape (n, 2), optional
        Restrict the results to these cells (a region); all stored cells by default.
    settings : InferenceSettings, optional
        The analysis settings; the store's settings by default.

    Raises
    ------
    ValueError
        If no settings are given with a StoredPatches.
    """
    if isinstance(store, ResultStore):
        patches = store.load()
        settings = settings or store.settings
    else:
        patches = store
        if settings is None:
            raise ValueError("compute_slide_results needs settings when given loaded patches")
    if cells is not None:
        patches = patches.select(cells)

    score_name = settings.score
    scores = patches.scores(score_name)
    reference = calibration_reference(bundle, settings) if bundle is not None else None
    too_few = too_few_patches_source(scores)
    if reference is not None:
        z_mean, z_std = reference
        z_source = Z_SOURCE_CALIBRATION
        z = heatmap.zscores(scores, z_mean, z_std)
    elif too_few is not None:
        z_mean, z_std = heatmap.within_slide_stats(scores) if len(scores) else (0.0, 0.0)
        z_source = too_few
        z = np.zeros(len(scores), dtype=np.float64)
    else:
        z_mean, z_std = heatmap.within_slide_stats(scores)
        z_source = Z_SOURCE_WITHIN_SLIDE
        z = heatmap.zscores(scores, z_mean, z_std)

    grid_z = heatmap.heatmap_grid(tuple(grid.shape), patches.rows, patches.cols, z)
    eroded = heatmap.erode_heatmap(grid_z)
    z_eroded = eroded[patches.rows, patches.cols].astype(np.float64)
    return SlideResults(
        patches=patches,
        score_name=score_name,
        scores=scores,
        z=z,
        z_eroded=z_eroded,
        z_source=z_source,
        z_mean=float(z_mean),
        z_std=float(z_std),
        heatmap=grid_z,
        heatmap_eroded=eroded,
        z_max=heatmap.z_max(eroded),
        z_99=heatmap.z_99(eroded),
        threshold=float(threshold),
        mask=heatmap.anomaly_mask(eroded, threshold),
    )
