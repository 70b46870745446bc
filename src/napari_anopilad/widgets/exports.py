"""File exports of an analysis, callable without any dialog: QuPath GeoJSON regions and a TIFF heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_anopilad.widgets.model import SlideAnalysis


def export_regions_geojson(analysis: SlideAnalysis, path: str | Path) -> Path:
    """Write the regions whose eroded z-score exceeds the analysis's threshold as QuPath GeoJSON.

    Coordinates are level-0 pixels, as QuPath expects for the same slide. Each region carries its
    Z_max, and its area in square microns when the slide's microns per pixel are known.

    Returns
    -------
    Path
        The written file.
    """
    from napari_anopilad.io.regions import mask_to_polygons, region_z_max, write_regions_geojson

    mask = analysis.anomaly_mask()
    polygons = mask_to_polygons(mask, analysis.patch_size_level0)
    z_max_values = region_z_max(mask, analysis.eroded)
    return write_regions_geojson(
        path,
        polygons,
        z_max_values,
        mpp=analysis.mpp,
        properties=_export_properties(analysis),
    )


def export_heatmap_tiff(analysis: SlideAnalysis, path: str | Path) -> Path:
    """Write the eroded z-score heatmap, one float32 pixel per grid cell (NaN without a score), as TIFF.

    Returns
    -------
    Path
        The written file.
    """
    from napari_anopilad.io import write_heatmap_tiff

    return Path(
        write_heatmap_tiff(
            path,
            analysis.eroded,
            patch_size_level0=analysis.patch_size_level0,
            mpp=analysis.mpp,
            metadata=_export_properties(analysis),
        )
    )


def _export_properties(analysis: SlideAnalysis) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "slide": analysis.name,
        "threshold_z": analysis.threshold,
        "z_source": analysis.z_source,
        "patch_size_level0": analysis.patch_size_level0,
    }
    if analysis.demo:
        properties["bundle"] = "DEMO (random weights)"
    return properties
