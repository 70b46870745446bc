"""Dock widget "Anomaly threshold": the z threshold, slide scores, regions and exports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from superqt import QDoubleSlider

from napari_anopilad.widgets.exports import export_heatmap_tiff, export_regions_geojson
from napari_anopilad.widgets.model import SlideAnalysis, analyses_for

# Range of the threshold controls in z units; the published default threshold is 0.
THRESHOLD_RANGE = (-4.0, 10.0)
THRESHOLD_STEP = 0.05


class ThresholdWidget(QWidget):
    """Set the z threshold of the anomaly regions and export them.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer whose current analysis this widget controls.
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.analyses = analyses_for(napari_viewer)
        self._analysis: SlideAnalysis | None = None

        self.slider = QDoubleSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(*THRESHOLD_RANGE)
        self.slider.setSingleStep(THRESHOLD_STEP)
        self.spin_box = QDoubleSpinBox()
        self.spin_box.setRange(*THRESHOLD_RANGE)
        self.spin_box.setSingleStep(THRESHOLD_STEP)
        self.spin_box.setDecimals(2)
        self.slider.setValue(0.0)
        self.spin_box.setValue(0.0)
        self.slider.valueChanged.connect(self._on_slider_changed)
        self.spin_box.valueChanged.connect(self._on_spin_box_changed)

        threshold_row = QHBoxLayout()
        threshold_row.addWidget(self.slider, stretch=1)
        threshold_row.addWidget(self.spin_box)

        self.z_max_label = QLabel("-")
        self.z_99_label = QLabel("-")
        self.regions_label = QLabel("-")
        self.area_label = QLabel("-")
        self.z_source_label = QLabel("-")
        self.z_source_label.setWordWrap(True)
        form = QFormLayout()
        form.addRow("z threshold", threshold_row)
        form.addRow("Z_max", self.z_max_label)
        form.addRow("Z_99", self.z_99_label)
        form.addRow("Regions", self.regions_label)
        form.addRow("Area", self.area_label)
        form.addRow("z-scores", self.z_source_label)

        self.export_regions_button = QPushButton("Export regions (QuPath GeoJSON)...")
        self.export_heatmap_button = QPushButton("Export heatmap (TIFF)...")
        self.export_regions_button.clicked.connect(self._choose_regions_file)
        self.export_heatmap_button.clicked.connect(self._choose_heatmap_file)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.export_regions_button)
        layout.addWidget(self.export_heatmap_button)
        layout.addStretch(1)

        self.analyses.analysis_changed.connect(self._set_analysis)
        self._set_analysis(self.analyses.current)

    # -- analysis --------------------------------------------------------------------------------

    @property
    def threshold(self) -> float:
        return float(self.spin_box.value())

    def set_threshold(self, threshold: float) -> None:
        """Set the threshold as if the user had typed it in the number box."""
        self.spin_box.setValue(float(threshold))

    def _set_analysis(self, analysis: SlideAnalysis | None) -> None:
        if self._analysis is not None:
            self._analysis.results_changed.disconnect(self.refresh)
            self._analysis.threshold_changed.disconnect(self._on_threshold_changed)
        self._analysis = analysis
        if analysis is not None:
            analysis.results_changed.connect(self.refresh)
            analysis.threshold_changed.connect(self._on_threshold_changed)
            analysis.set_threshold(self.threshold)
        self.refresh()

    def _on_slider_changed(self, value: float) -> None:
        if abs(self.spin_box.value() - value) > 1e-9:
            self.spin_box.setValue(value)

    def _on_spin_box_changed(self, value: float) -> None:
        if abs(self.slider.value() - value) > 1e-9:
            self.slider.blockSignals(True)
            self.slider.setValue(value)
            self.slider.blockSignals(False)
        if self._analysis is not None:
            self._analysis.set_threshold(value)
        else:
            self.refresh()

    def _on_threshold_changed(self, threshold: float) -> None:
        # Show a threshold set elsewhere without feeding the box's rounded value back to the analysis.
        for control in (self.spin_box, self.slider):
            control.blockSignals(True)
            control.setValue(threshold)
            control.blockSignals(False)
        self.refresh()

    def refresh(self) -> None:
        """Show the current analysis's slide scores and regions."""
        analysis = self._analysis
        has_scores = analysis is not None and analysis.cell_index
        self.export_regions_button.setEnabled(bool(has_scores))
        self.export_heatmap_button.setEnabled(bool(has_scores))
        if analysis is None or not has_scores:
            for label in (self.z_max_label, self.z_99_label, self.regions_label, self.area_label):
                label.setText("-")
            self.z_source_label.setText("no analysed patches yet")
            return

        z_max, z_99 = analysis.slide_scores()
        self.z_max_label.setText(_format_z(z_max))
        self.z_99_label.setText(_format_z(z_99))
        summary = analysis.region_summary()
        self.regions_label.setText(f"{summary.count} ({summary.cells} patches)")
        if summary.area_mm2 is not None:
            self.area_label.setText(f"{summary.area_mm2:.3f} mm²")
        else:
            self.area_label.setText(f"{summary.area_level0:.0f} px² (level 0; microns per pixel unknown)")
        source = analysis.z_source
        if source == "calibration":
            text = "against the bundle's calibration on normal patches"
        elif source.startswith("within-slide"):
            text = "within this slide (the bundle has no calibration measured under these settings)"
            if "too few" in source:
                text += ": needs at least two patches with different scores"
        else:
            text = source
        if analysis.demo:
            text = "DEMO bundle (random weights): " + text
        self.z_source_label.setText(text)

    # -- exports ---------------------------------------------------------------------------------

    def _choose_regions_file(self) -> None:
        if self._analysis is None:
            return
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Export anomaly regions",
            f"{self._analysis.name}-anomalies.geojson",
            "GeoJSON (*.geojson *.json)",
        )
        if path:
            self.export_regions(Path(path))

    def _choose_heatmap_file(self) -> None:
        if self._analysis is None:
            return
        path, _ = QFileDialog.getSaveFileName(
            self, "Export z-score heatmap", f"{self._analysis.name}-zscore.tif", "TIFF (*.tif *.tiff)"
        )
        if path:
            self.export_heatmap(Path(path))

    def export_regions(self, path: Path) -> Path | None:
        """Write the regions above the threshold to ``path``; errors become napari notifications."""
        if self._analysis is None:
            return None
        try:
            written = export_regions_geojson(self._analysis, path)
        except (OSError, ValueError) as error:
            show_error(f"Could not export the anomaly regions to {path}: {error}")
            return None
        show_info(f"Exported the anomaly regions (z > {self.threshold:g}) to {written}")
        return written

    def export_heatmap(self, path: Path) -> Path | None:
        """Write the eroded z-score heatmap to ``path``; errors become napari notifications."""
        if self._analysis is None:
            return None
        try:
            written = export_heatmap_tiff(self._analysis, path)
        except (OSError, ValueError) as error:
            show_error(f"Could not export the heatmap to {path}: {error}")
            return None
        show_info(f"Exported the z-score heatmap to {written}")
        return written


def _format_z(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
