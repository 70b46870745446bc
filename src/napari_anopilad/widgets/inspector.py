"""Dock widget "Patch inspector": one patch beside its reconstruction, the prompt that guided it and its scores."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error
from numpy.typing import NDArray
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_anopilad.method.scorers import ANOPILAD, method_label
from napari_anopilad.widgets.model import SlideAnalysis, analyses_for

logger = logging.getLogger(__name__)

IMAGE_SIZE_SCREEN = 192
DEFAULT_TOP_COUNT = 25
CHOOSE_PATCH_TEXT = "Click a patch on the slide or choose one in the list."


def difference_image(original: NDArray[np.uint8], reconstruction: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Return the absolute difference of two RGB patches as a uint8 RGB heat image.

    The per-pixel difference is the mean absolute difference over the channels, scaled so that the
    patch's largest difference is white-hot, through matplotlib's ``inferno`` colormap.
    """
    if original.shape != reconstruction.shape:
        raise ValueError(
            f"original {original.shape} and reconstruction {reconstruction.shape} patches differ in shape"
        )
    from matplotlib import colormaps

    difference = np.abs(original.astype(np.float32) - reconstruction.astype(np.float32)).mean(axis=2)
    scale = max(float(difference.max()), 1.0)
    colours = colormaps["inferno"](difference / scale)[..., :3]
    return (colours * 255).round().astype(np.uint8)


def _pixmap(image: NDArray[np.uint8]) -> QPixmap:
    rgb = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    height, width = rgb.shape[:2]
    qimage = QImage(rgb.tobytes(), width, height, 3 * width, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(qimage).scaled(
        IMAGE_SIZE_SCREEN,
        IMAGE_SIZE_SCREEN,
        Qt.AspectRatioMode.KeepAspectRatio,
        Qt.TransformationMode.SmoothTransformation,
    )


class InspectorWidget(QWidget):
    """Show one patch of the current analysis: original, reconstruction, difference, prompt and scores.

    Click a patch on the canvas (without dragging), or pick one in the list of the highest z-scores;
    the arrow keys step through the list. A reconstruction that the result store lacks is computed in
    a background thread.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer whose current analysis this widget inspects.
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.analyses = analyses_for(napari_viewer)
        self._analysis: SlideAnalysis | None = None
        self.current_cell: tuple[int, int] | None = None
        # Whether the patch on show had scores when it was shown.
        self._shown_scored = False
        self.current_images: dict[str, NDArray[np.uint8]] = {}
        self._reconstruction_worker: Any = None

        self.demo_label = QLabel("DEMO bundle: random weights, the scores mean nothing")
        self.demo_label.setStyleSheet("color: black; background: #ffcc00; font-weight: bold; padding: 2px;")
        self.demo_label.setVisible(False)

        self.top_list = QListWidget()
        self.top_list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.top_list.currentRowChanged.connect(self._on_list_row_changed)
        self.top_count = QSpinBox()
        self.top_count.setRange(1, 1000)
        self.top_count.setValue(DEFAULT_TOP_COUNT)
        self.top_count.valueChanged.connect(self.refresh_top_list)
        top_header = QHBoxLayout()
        top_header.addWidget(QLabel("Highest z-scores"))
        top_header.addStretch(1)
        top_header.addWidget(QLabel("show"))
        top_header.addWidget(self.top_count)

        self.title_label = QLabel(CHOOSE_PATCH_TEXT)
        self.title_label.setWordWrap(True)
        self.image_labels: dict[str, QLabel] = {}
        images = QGridLayout()
        for column, (key, caption) in enumerate(
            (("original", "Original"), ("reconstruction", "Reconstruction"), ("difference", "|Difference|"))
        ):
            caption_label = QLabel(caption)
            caption_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
            image_label = QLabel()
            image_label.setFixedSize(IMAGE_SIZE_SCREEN, IMAGE_SIZE_SCREEN)
            image_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
            image_label.setStyleSheet("background: #202020;")
            images.addWidget(caption_label, 0, column)
            images.addWidget(image_label, 1, column)
            self.image_labels[key] = image_label

        self.keyword_table = QTableWidget(0, 3)
        self.keyword_table.setHorizontalHeaderLabels(["Keyword", "Weight", "Similarity"])
        vertical_header = self.keyword_table.verticalHeader()
        if vertical_header is not None:
            vertical_header.setVisible(False)
        horizontal_header = self.keyword_table.horizontalHeader()
        if horizontal_header is not None:
            horizontal_header.setStretchLastSection(True)
        self.keyword_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)

        self.prompt_label = QLabel("-")
        self.prompt_label.setWordWrap(True)
        self.prompt_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.lpips_label = QLabel("-")
        self.mse_label = QLabel("-")
        self.z_label = QLabel("-")
        # The scores of a comparison method (which has no LPIPS or latent MSE of its own).
        self.other_scores_label = QLabel("-")
        self.other_scores_label.setWordWrap(True)
        scores = QFormLayout()
        scores.addRow("Prompt", self.prompt_label)
        scores.addRow("LPIPS", self.lpips_label)
        scores.addRow("Latent MSE", self.mse_label)
        scores.addRow("Other scores", self.other_scores_label)
        scores.addRow("z (eroded z)", self.z_label)

        self.previous_button = QPushButton("Previous")
        self.next_button = QPushButton("Next")
        self.previous_button.clicked.connect(lambda: self.step(-1))
        self.next_button.clicked.connect(lambda: self.step(1))
        buttons = QHBoxLayout()
        buttons.addWidget(self.previous_button)
        buttons.addWidget(self.next_button)

        layout = QVBoxLayout(self)
        layout.addWidget(self.demo_label)
        layout.addLayout(top_header)
        layout.addWidget(self.top_list, stretch=1)
        layout.addLayout(buttons)
        layout.addWidget(self.title_label)
        layout.addLayout(images)
        layout.addWidget(self.keyword_table)
        layout.addLayout(scores)

        self.viewer.mouse_drag_callbacks.append(self._on_mouse_drag)
        self.analyses.analysis_changed.connect(self._set_analysis)
        self._set_analysis(self.analyses.current)

    # -- analysis --------------------------------------------------------------------------------

    def _set_analysis(self, analysis: SlideAnalysis | None) -> None:
        previous, cell = self._analysis, self.current_cell
        if previous is not None:
            previous.results_changed.disconnect(self._on_results_changed)
            previous.patch_selected.disconnect(self.show_patch)
        self._analysis = analysis
        self.current_cell = None
        if analysis is not None:
            analysis.results_changed.connect(self._on_results_changed)
            analysis.patch_selected.connect(self.show_patch)
        self.refresh_top_list()

        # Other settings on the same slide and grid: the patch on show is shown again with the new
        # analysis's scores, so no number from the earlier settings stays on screen. Another grid (another
        # microns per pixel) puts other pixels under the same cell, so the panel is cleared.
        same_grid = (
            analysis is not None
            and previous is not None
            and analysis.slide_layer is previous.slide_layer
            and analysis.grid_shape == previous.grid_shape
            and analysis.patch_size_level0 == previous.patch_size_level0
        )
        if same_grid and cell is not None and analysis is not None:
            self.show_patch(*cell)
        else:
            self._clear_patch()

    def _on_results_changed(self) -> None:
        self.refresh_top_list()
        analysis, cell = self._analysis, self.current_cell
        if analysis is None or cell is None:
            return
        record = analysis.patch_record(*cell)
        if record is None:
            return
        if self._shown_scored:
            # Another score, or within-slide statistics moved by new batches: the z-scores change.
            self._show_record(record)
        else:
            # A patch shown before it was scored is shown again once its scores arrive.
            self.show_patch(*cell)

    def _clear_patch(self) -> None:
        self._shown_scored = False
        self.title_label.setText(CHOOSE_PATCH_TEXT)
        for name in ("original", "reconstruction", "difference"):
            self._clear_image(name)
        self._show_record(None)

    def refresh_top_list(self) -> None:
        """List the patches with the highest z-scores, keeping the current one selected."""
        analysis = self._analysis
        self.demo_label.setVisible(bool(analysis is not None and analysis.demo))
        self.top_list.blockSignals(True)
        self.top_list.clear()
        if analysis is not None:
            for row, col in analysis.top_cells(self.top_count.value()):
                record = analysis.patch_record(row, col)
                z_text = "n/a" if record is None or np.isnan(record["z"]) else f"{record['z']:+.2f}"
                item = QListWidgetItem(f"row {row}, col {col}   z {z_text}")
                item.setData(Qt.ItemDataRole.UserRole, (row, col))
                self.top_list.addItem(item)
                if (row, col) == self.current_cell:
                    self.top_list.setCurrentItem(item)
        self.top_list.blockSignals(False)

    def _list_cell(self, index: int) -> tuple[int, int] | None:
        item = self.top_list.item(index)
        if item is None:
            return None
        row, col = item.data(Qt.ItemDataRole.UserRole)
        return int(row), int(col)

    def _list_cells(self) -> list[tuple[int, int] | None]:
        return [self._list_cell(index) for index in range(self.top_list.count())]

    def _on_list_row_changed(self, index: int) -> None:
        cell = self._list_cell(index)
        if cell is not None:
            self.show_patch(*cell)

    def step(self, offset: int) -> None:
        """Show the previous (``-1``) or next (``+1``) patch of the list."""
        count = self.top_list.count()
        if count == 0:
            return
        index = self.top_list.currentRow()
        index = 0 if index < 0 else min(max(index + offset, 0), count - 1)
        self.top_list.setCurrentRow(index)

    def keyPressEvent(self, event: Any) -> None:
        if event.key() in (Qt.Key.Key_Down, Qt.Key.Key_Right):
            self.step(1)
        elif event.key() in (Qt.Key.Key_Up, Qt.Key.Key_Left):
            self.step(-1)
        else:
            super().keyPressEvent(event)

    # -- canvas clicks ---------------------------------------------------------------------------

    def _on_mouse_drag(self, viewer: Any, event: Any) -> Any:
        # A press and release without movement is a click; a drag pans the view and selects nothing.
        if event.type != "mouse_press" or event.button != 1 or self._analysis is None:
            return
        dragged = False
        yield
        while event.type == "mouse_move":
            dragged = True
            yield
        if not dragged and self._analysis is not None:
            cell = self._analysis.cell_at_world(event.position)
            if cell is not None:
                self.show_patch(*cell)

    # -- one patch -------------------------------------------------------------------------------

    def show_patch(self, row: int, col: int) -> None:
        """Show patch ``(row, col)``; its reconstruction is computed in the background if it is missing."""
        analysis = self._analysis
        if analysis is None:
            return
        self.current_cell = (int(row), int(col))
        record = analysis.patch_record(row, col)
        demo = "DEMO  " if analysis.demo else ""
        self.title_label.setText(f"{demo}Patch row {row}, col {col} of {analysis.name}")
        self._select_in_list(row, col)

        try:
            original = analysis.read_patch(row, col)
        except Exception as error:
            show_error(f"Could not read patch (row {row}, col {col}) of {analysis.name}: {error}")
            return
        self._set_image("original", original)
        self._clear_image("reconstruction")
        self._clear_image("difference")
        self._show_record(record)
        self._shown_scored = record is not None
        if record is None:
            self.title_label.setText(f"{self.title_label.text()}: not analysed yet")
            return

        reconstruction = analysis.stored_reconstruction(row, col)
        if reconstruction is not None:
            self._show_reconstruction(row, col, original, reconstruction)
        elif not analysis.reconstructs:
            self.image_labels["reconstruction"].setText(
                f"none: {method_label(analysis.method)} does not reconstruct"
            )
        elif analysis.can_reconstruct():
            self._start_reconstruction(row, col, original)
        else:
            self.image_labels["reconstruction"].setText("not stored")

    def _select_in_list(self, row: int, col: int) -> None:
        for index, cell in enumerate(self._list_cells()):
            if cell == (row, col):
                if self.top_list.currentRow() != index:
                    self.top_list.blockSignals(True)
                    self.top_list.setCurrentRow(index)
                    self.top_list.blockSignals(False)
                return
        self.top_list.clearSelection()

    def _show_record(self, record: dict[str, Any] | None) -> None:
        self.keyword_table.setRowCount(0)
        if record is None:
            for label in (
                self.prompt_label,
                self.lpips_label,
                self.mse_label,
                self.other_scores_label,
                self.z_label,
            ):
                label.setText("-")
            return
        self.keyword_table.setRowCount(len(record["keywords"]))
        for index, (keyword, weight, similarity) in enumerate(
            zip(record["keywords"], record["weights"], record["similarities"])
        ):
            self.keyword_table.setItem(index, 0, QTableWidgetItem(keyword))
            self.keyword_table.setItem(index, 1, QTableWidgetItem(f"{weight:.3f}"))
            self.keyword_table.setItem(index, 2, QTableWidgetItem(f"{similarity:.3f}"))
        self.keyword_table.resizeColumnsToContents()
        self.prompt_label.setText(record["prompt"] or self._empty_prompt_text())
        named = dict(record.get("scores", {}))
        self.lpips_label.setText(f"{named.pop('lpips'):.4f}" if "lpips" in named else "-")
        self.mse_label.setText(f"{named.pop('mse_latent'):.4f}" if "mse_latent" in named else "-")
        self.other_scores_label.setText(
            ", ".join(f"{name} {value:.4g}" for name, value in named.items()) if named else "-"
        )
        z, z_eroded = record["z"], record["z_eroded"]
        self.z_label.setText("n/a" if np.isnan(z) else f"{z:+.2f} ({z_eroded:+.2f})")

    def _empty_prompt_text(self) -> str:
        # Comparison methods reconstruct without any prompt; AnoPILaD's unprompted runs use the empty one.
        method = self._analysis.method if self._analysis is not None else ANOPILAD
        return "(empty prompt)" if method == ANOPILAD else f"no prompt: {method_label(method)}"

    def _start_reconstruction(self, row: int, col: int, original: NDArray[np.uint8]) -> None:
        analysis = self._analysis
        assert analysis is not None
        self.image_labels["reconstruction"].setText("computing...")
        if self._reconstruction_worker is not None:
            self._reconstruction_worker.quit()

        # _on_reconstruction_error shows the error: ignore_errors keeps it from being raised again in Qt.
        worker = thread_worker(analysis.compute_reconstruction, start_thread=False, ignore_errors=True)(
            row, col
        )
        worker.returned.connect(lambda image: self._on_reconstruction(analysis, row, col, original, image))
        worker.errored.connect(lambda error: self._on_reconstruction_error(analysis, row, col, error))
        self._reconstruction_worker = worker
        worker.start()

    def _on_reconstruction(
        self,
        analysis: SlideAnalysis,
        row: int,
        col: int,
        original: NDArray[np.uint8],
        image: NDArray[np.uint8],
    ) -> None:
        # A reconstruction under earlier settings is not shown next to the current analysis's scores.
        if self._analysis is analysis and self.current_cell == (row, col):
            self._show_reconstruction(row, col, original, image)

    def _on_reconstruction_error(
        self, analysis: SlideAnalysis, row: int, col: int, error: BaseException
    ) -> None:
        if self._analysis is analysis and self.current_cell == (row, col):
            self.image_labels["reconstruction"].setText("failed")
        show_error(f"Could not reconstruct patch (row {row}, col {col}): {error}")

    def _show_reconstruction(
        self, row: int, col: int, original: NDArray[np.uint8], reconstruction: NDArray[np.uint8]
    ) -> None:
        self._set_image("reconstruction", reconstruction)
        if reconstruction.shape == original.shape:
            self._set_image("difference", difference_image(original, reconstruction))
        else:
            self.image_labels["difference"].setText("sizes differ")

    def _set_image(self, key: str, image: NDArray[np.uint8]) -> None:
        self.current_images[key] = image
        self.image_labels[key].setPixmap(_pixmap(image))

    def _clear_image(self, key: str) -> None:
        self.current_images.pop(key, None)
        self.image_labels[key].clear()

    def closeEvent(self, event: Any) -> None:
        if self._on_mouse_drag in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._on_mouse_drag)
        super().closeEvent(event)
