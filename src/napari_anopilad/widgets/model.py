"""Analysis state of one slide layer: the patch grid, the stored scores and the layers drawn from them.

Everything here runs on napari's GUI thread. The analysis worker only yields results; the dock widget
passes them to :meth:`SlideAnalysis.show_results`, which updates the layers in place.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from psygnal import Signal
from scipy import ndimage

from napari_anopilad._reader import METADATA_KEY
from napari_anopilad.engine.results import SlideResults
from napari_anopilad.engine.store import StoredPatches
from napari_anopilad.method import heatmap
from napari_anopilad.method.scorers import ANOPILAD, method_label
from napari_anopilad.widgets.layers import (
    HEATMAP_COLORMAP,
    HEATMAP_OPACITY,
    Z_CONTRAST_LIMITS,
    grid_layer_transform,
    world_to_cell,
)

logger = logging.getLogger(__name__)

# The anomaly labels layer draws each grid cell as a block of this many label pixels per side (fewer on
# very large grids), so that its one-pixel contour is a thin line rather than a whole cell.
LABEL_PIXELS_PER_CELL = 8
MAX_LABEL_PIXELS = 16_000_000

# Regions are 4-connected, as in the GeoJSON export: cells that touch only at a corner are two regions.
FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


@dataclass(frozen=True)
class RegionSummary:
    """Regions of the eroded heatmap above the threshold.

    Attributes
    ----------
    count : int
        Number of regions (cells joined through shared edges).
    cells : int
        Number of grid cells above the threshold.
    area_level0 : float
        Total area in level-0 pixels squared.
    area_mm2 : float or None
        Total area in mm^2, None when the slide's microns per pixel are unknown.
    """

    count: int
    cells: int
    area_level0: float
    area_mm2: float | None


def slide_metadata(layer: Any) -> dict[str, Any] | None:
    """Return the plugin's metadata of a slide layer opened by the plugin reader, else None."""
    metadata = getattr(layer, "metadata", None)
    if not isinstance(metadata, dict):
        return None
    value = metadata.get(METADATA_KEY)
    return value if isinstance(value, dict) and "path" in value else None


def label_pixels_per_cell(grid_shape: tuple[int, int]) -> int:
    """Return how many label pixels per side draw one grid cell, at most ``LABEL_PIXELS_PER_CELL``."""
    cells = max(int(grid_shape[0]) * int(grid_shape[1]), 1)
    per_cell = LABEL_PIXELS_PER_CELL
    while per_cell > 1 and cells * per_cell * per_cell > MAX_LABEL_PIXELS:
        per_cell //= 2
    return per_cell


class SlideAnalysis:
    """Results of one slide under one bundle and settings, and the two layers that show them.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer that shows the slide layer.
    slide_layer : napari.layers.Image
        The slide, opened by the plugin reader (world frame: level-0 pixels).
    slide : Slide
        The open slide behind the layer.
    grid : PatchGrid
        The patch grid analysed.
    method : str
        The scoring method (``"anopilad"`` or a comparison method's name), recorded in the layers'
        metadata.

    Notes
    -----
    ``z_grid`` contains each patch's z-score and ``eroded`` the 2x2-eroded heatmap, both ``(rows, cols)``
    float32 arrays with NaN where no score exists. The heatmap layer shows ``eroded`` itself, so a
    refresh after an in-place update redraws it.
    """

    results_changed = Signal()
    threshold_changed = Signal(float)
    patch_selected = Signal(int, int)

    def __init__(
        self,
        viewer: Any,
        slide_layer: Any,
        slide: Any,
        grid: Any,
        method: str = ANOPILAD,
        previous: SlideAnalysis | None = None,
    ) -> None:
        self.viewer = viewer
        self.method = method
        self.slide_layer = slide_layer
        self.slide = slide
        self.grid = grid
        self.mpp: float | None = slide.mpp
        # Set by the analysis widget once a bundle is loaded.
        self.store: Any = None
        self.reconstructor: Callable[[int, int, NDArray[np.uint8]], NDArray[np.uint8]] | None = None
        # False for a method that scores patches without reconstructing them, such as VAE density.
        self.reconstructs = True
        self.patch_size_level0 = int(grid.patch_size_level0)
        self.grid_shape = (int(grid.shape[0]), int(grid.shape[1]))
        self.threshold = 0.0
        self.demo = False
        self.z_source = "none"
        self.results: SlideResults | None = None
        self.cell_index: dict[tuple[int, int], int] = {}

        if previous is not None and previous.can_hand_over(slide_layer, self.grid_shape):
            self._take_over_layers(previous)
            return
        self.z_grid = np.full(self.grid_shape, np.nan, dtype=np.float32)
        self.eroded = np.full(self.grid_shape, np.nan, dtype=np.float32)
        self.label_scale = label_pixels_per_cell(self.grid_shape)
        self.labels = np.zeros(
            (self.grid_shape[0] * self.label_scale, self.grid_shape[1] * self.label_scale), dtype=np.int32
        )

        self.heatmap_layer = self._add_heatmap_layer()
        self.anomalies_layer = self._add_anomalies_layer()

    # -- layers ----------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self.slide_layer.name)

    def _add_heatmap_layer(self) -> Any:
        scale, translate = grid_layer_transform(self.patch_size_level0)
        name = f"{self.name} z-score"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        return self.viewer.add_image(
            self.eroded,
            name=name,
            scale=scale,
            translate=translate,
            colormap=HEATMAP_COLORMAP,
            contrast_limits=Z_CONTRAST_LIMITS,
            opacity=HEATMAP_OPACITY,
            blending="translucent",
            interpolation2d="nearest",
            metadata={
                METADATA_KEY: {
                    "role": "z-score",
                    "slide": self.name,
                    "method": self.method,
                    "method_label": method_label(self.method),
                    "world_unit": "level-0 pixel",
                }
            },
        )

    def _add_anomalies_layer(self) -> Any:
        # A label pixel is P / k level-0 pixels. The heatmap's half-pixel reasoning then places label
        # pixel i over level-0 pixels [i * P / k, (i + 1) * P / k).
        scale, translate = grid_layer_transform(self.patch_size_level0 / self.label_scale)
        name = f"{self.name} anomalies"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        layer = self.viewer.add_labels(
            self.labels,
            name=name,
            scale=scale,
            translate=translate,
            opacity=1.0,
            blending="translucent",
            metadata={
                METADATA_KEY: {
                    "role": "anomalies",
                    "slide": self.name,
                    "method": self.method,
                    "method_label": method_label(self.method),
                    "world_unit": "level-0 pixel",
                }
            },
        )
        layer.contour = 1
        layer.editable = False
        return layer

    def can_hand_over(self, slide_layer: Any, grid_shape: tuple[int, int]) -> bool:
        """Return whether an analysis of ``slide_layer`` on a grid of ``grid_shape`` can take over these layers.

        Both layers must still be in the viewer and show this analysis's arrays.
        """
        return (
            self.slide_layer is slide_layer
            and self.grid_shape == tuple(grid_shape)
            and self.heatmap_layer in self.viewer.layers
            and self.anomalies_layer in self.viewer.layers
            and self.heatmap_layer.data is self.eroded
            and self.anomalies_layer.data is self.labels
        )

    def _take_over_layers(self, previous: SlideAnalysis) -> None:
        """Show this analysis in ``previous``'s layers, emptied, and keep its threshold.

        Adding a layer builds napari's layer controls and vispy visuals on the GUI thread, which took a
        quarter to half a second a layer on a 2-core CPU, so a change of settings keeps the layers.
        """
        self.z_grid, self.eroded, self.labels = previous.z_grid, previous.eroded, previous.labels
        self.label_scale = previous.label_scale
        self.heatmap_layer, self.anomalies_layer = previous.heatmap_layer, previous.anomalies_layer
        self.threshold = previous.threshold
        self.z_grid[...] = np.nan
        self.eroded[...] = np.nan
        self.labels[...] = 0
        for layer in (self.heatmap_layer, self.anomalies_layer):
            layer.metadata[METADATA_KEY] = {
                **layer.metadata[METADATA_KEY],
                "method": self.method,
                "method_label": method_label(self.method),
            }
            layer.refresh()

    def remove_layers(self) -> None:
        """Remove the heatmap and anomaly layers from the viewer, if they are still there."""
        for layer in (self.anomalies_layer, self.heatmap_layer):
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)

    # -- results ---------------------------------------------------------------------------------

    def show_results(self, results: SlideResults) -> None:
        """Show new slide results: copy their heatmaps into the layers' arrays and redraw in place.

        Parameters
        ----------
        results : SlideResults
            From ``compute_slide_results`` over every finished patch of this slide.
        """
        self.results = results
        patches = results.patches
        self.cell_index = {
            (int(row), int(col)): index for index, (row, col) in enumerate(zip(patches.rows, patches.cols))
        }
        self.z_source = results.z_source
        self.z_grid[...] = results.heatmap
        self.eroded[...] = results.heatmap_eroded

        self.heatmap_layer.refresh()
        self._update_anomalies()
        self.results_changed.emit()

    def set_threshold(self, threshold: float) -> None:
        """Set the z threshold of the anomaly regions and redraw them."""
        self.threshold = float(threshold)
        self._update_anomalies()
        self.threshold_changed.emit(self.threshold)

    def _update_anomalies(self) -> None:
        regions, _ = ndimage.label(self.anomaly_mask(), structure=FOUR_CONNECTED)
        per_cell = self.label_scale
        self.labels[...] = np.repeat(np.repeat(regions, per_cell, axis=0), per_cell, axis=1)
        self.anomalies_layer.refresh()

    # -- read-outs -------------------------------------------------------------------------------

    def anomaly_mask(self) -> NDArray[np.bool_]:
        """Return the ``(rows, cols)`` mask of cells whose eroded z-score exceeds the threshold."""
        return heatmap.anomaly_mask(self.eroded, self.threshold)

    def region_summary(self) -> RegionSummary:
        """Count and measure the regions above the threshold."""
        mask = self.anomaly_mask()
        _, count = ndimage.label(mask, structure=FOUR_CONNECTED)
        cells = int(mask.sum())
        area_level0 = float(cells) * self.patch_size_level0**2
        area_mm2 = area_level0 * (self.mpp / 1000.0) ** 2 if self.mpp else None
        return RegionSummary(count=int(count), cells=cells, area_level0=area_level0, area_mm2=area_mm2)

    def slide_scores(self) -> tuple[float | None, float | None]:
        """Return ``(Z_max, Z_99)`` of the eroded heatmap, None before any patch is scored."""
        return heatmap.z_max(self.eroded), heatmap.z_99(self.eroded)

    def cell_at_world(self, world_position: Any) -> tuple[int, int] | None:
        """Return the grid cell under a world position (level-0 pixels), or None outside the grid."""
        return world_to_cell(world_position, self.patch_size_level0, self.grid_shape)

    def top_cells(self, count: int = 20) -> list[tuple[int, int]]:
        """Return up to ``count`` analysed cells, highest z-score first."""
        if self.results is None or not self.cell_index:
            return []
        order = np.argsort(-self.results.z, kind="stable")[:count]
        patches = self.results.patches
        return [(int(patches.rows[i]), int(patches.cols[i])) for i in order]

    def patch_record(self, row: int, col: int) -> dict[str, Any] | None:
        """Return the stored scores of one patch, or None when it has not been analysed."""
        index = self.cell_index.get((int(row), int(col)))
        results = self.results
        if index is None or results is None:
            return None
        stored = results.patches
        return {
            "row": int(row),
            "col": int(col),
            "keywords": [str(keyword) for keyword in stored.keywords[index]],
            "weights": [float(weight) for weight in stored.weights[index]],
            "similarities": [float(value) for value in stored.similarities[index]],
            "prompt": str(stored.prompts[index]),
            "scores": {name: float(values[index]) for name, values in stored.values.items()},
            **{name: float(values[index]) for name, values in stored.values.items()},
            "z": float(results.z[index]),
            "z_eroded": float(results.z_eroded[index]),
            "has_reconstruction": bool(stored.has_reconstruction[index]),
        }

    def read_patch(self, row: int, col: int) -> NDArray[np.uint8]:
        """Read patch ``(row, col)`` as the model receives it: ``(patch_size, patch_size, 3)`` uint8 RGB."""
        from napari_anopilad.slide import read_patches

        return read_patches(self.slide, self.grid, np.array([[row, col]]))[0]

    def stored_reconstruction(self, row: int, col: int) -> NDArray[np.uint8] | None:
        """Return the reconstruction of patch ``(row, col)`` from the result store, or None."""
        if self.store is None:
            return None
        return self.store.read_reconstruction(int(row), int(col))

    def can_reconstruct(self) -> bool:
        """Tell whether a loaded model can reconstruct patches on demand."""
        return self.reconstructor is not None

    def compute_reconstruction(self, row: int, col: int) -> NDArray[np.uint8]:
        """Reconstruct patch ``(row, col)`` with the loaded model; runs in a worker thread, never touches Qt."""
        if self.reconstructor is None:
            raise RuntimeError("no model is loaded: start an analysis with a bundle first")
        return self.reconstructor(int(row), int(col), self.read_patch(row, col))

    def select_patch(self, row: int, col: int) -> None:
        """Announce the patch that the inspector should show."""
        self.patch_selected.emit(int(row), int(col))


class ViewerAnalyses:
    """The analysis that the plugin's dock widgets of one viewer show, shared between them."""

    analysis_changed = Signal(object)

    def __init__(self) -> None:
        self.current: SlideAnalysis | None = None

    def set_current(self, analysis: SlideAnalysis | None) -> None:
        """Make ``analysis`` the one the widgets show."""
        if self.current is analysis:
            return
        self.current = analysis
        self.analysis_changed.emit(analysis)


_VIEWER_ANALYSES: weakref.WeakKeyDictionary[Any, ViewerAnalyses] = weakref.WeakKeyDictionary()


def analyses_for(viewer: Any) -> ViewerAnalyses:
    """Return the shared analysis state of ``viewer``, creating it on first use."""
    state = _VIEWER_ANALYSES.get(viewer)
    if state is None:
        state = ViewerAnalyses()
        _VIEWER_ANALYSES[viewer] = state
    return state


class PatchAccumulator:
    """The finished patches of one slide, gathered from the result store and then batch by batch.

    Rebuilding :class:`StoredPatches` from memory after each batch avoids reloading every batch file of
    the store, which grows with the slide.
    """

    def __init__(self, stored: StoredPatches) -> None:
        self._records: dict[tuple[int, int], tuple[Any, ...]] = {}
        self._top_k = int(stored.keywords.shape[1]) if stored.keywords.ndim == 2 else 0
        for index in range(len(stored)):
            self._records[(int(stored.rows[index]), int(stored.cols[index]))] = (
                {name: float(values[index]) for name, values in stored.values.items()},
                list(stored.keywords[index]),
                list(stored.similarities[index]),
                list(stored.weights[index]),
                str(stored.prompts[index]),
                bool(stored.has_reconstruction[index]),
            )

    def __len__(self) -> int:
        return len(self._records)

    def add_batch(self, cells: NDArray[np.integer], scores: Any, has_reconstruction: bool) -> None:
        """Add the scorer's output for a finished batch of cells (a later batch replaces a cell's entry)."""
        prompts = getattr(scores, "prompts", None)
        if prompts is None:
            prompts = scores.prompt
        named = scores.score_values()
        for index, (row, col) in enumerate(np.asarray(cells, dtype=np.int64).reshape(-1, 2)):
            keywords = list(np.asarray(scores.keywords[index]).reshape(-1))
            self._top_k = max(self._top_k, len(keywords))
            self._records[(int(row), int(col))] = (
                {name: float(values[index]) for name, values in named.items()},
                keywords,
                list(np.asarray(scores.similarities[index], dtype=np.float64).reshape(-1)),
                list(np.asarray(scores.weights[index], dtype=np.float64).reshape(-1)),
                str(prompts[index]),
                has_reconstruction,
            )

    def mark_reconstructed(self, row: int, col: int) -> None:
        """Record that the store now contains the reconstruction of cell ``(row, col)``."""
        record = self._records.get((int(row), int(col)))
        if record is not None:
            self._records[(int(row), int(col))] = (*record[:5], True)

    def to_stored(self) -> StoredPatches:
        """Return every gathered patch as :class:`StoredPatches`, in row-major cell order."""
        if not self._records:
            return StoredPatches.empty(self._top_k)
        cells = sorted(self._records)
        records = [self._records[cell] for cell in cells]
        top_k = self._top_k

        def padded(values: list[Any], fill: Any) -> list[Any]:
            return (list(values) + [fill] * top_k)[:top_k]

        return StoredPatches(
            rows=np.array([row for row, _ in cells], dtype=np.int64),
            cols=np.array([col for _, col in cells], dtype=np.int64),
            values={
                name: np.array([record[0].get(name, np.nan) for record in records], dtype=np.float64)
                for name in dict.fromkeys(name for record in records for name in record[0])
            },
            keywords=np.array([padded(record[1], "") for record in records], dtype=np.str_).reshape(
                len(cells), top_k
            ),
            similarities=np.array(
                [padded(record[2], np.nan) for record in records], dtype=np.float64
            ).reshape(len(cells), top_k),
            weights=np.array([padded(record[3], np.nan) for record in records], dtype=np.float64).reshape(
                len(cells), top_k
            ),
            prompts=np.array([record[4] for record in records], dtype=np.str_),
            has_reconstruction=np.array([record[5] for record in records], dtype=bool),
        )
