"""Annotations in; patch tables, QuPath GeoJSON regions, heatmap TIFF and overlay pictures out.

No torch and no Qt here. The overlay renderer (matplotlib) lives in `napari_anopilad.io.overlay`
and is imported only where a picture is drawn.
"""

from napari_anopilad.io.annotations import AnnotationError, Annotations, read_annotations
from napari_anopilad.io.geometry import Polygon, coverage_fraction
from napari_anopilad.io.heatmap_tiff import HeatmapTiff, read_heatmap_tiff, write_heatmap_tiff
from napari_anopilad.io.regions import mask_to_polygons, region_z_max, write_regions_geojson
from napari_anopilad.io.tables import PATCH_COLUMNS, read_patches_csv, write_patches_csv

__all__ = [
    "PATCH_COLUMNS",
    "AnnotationError",
    "Annotations",
    "HeatmapTiff",
    "Polygon",
    "coverage_fraction",
    "mask_to_polygons",
    "read_annotations",
    "read_heatmap_tiff",
    "read_patches_csv",
    "region_z_max",
    "write_heatmap_tiff",
    "write_patches_csv",
    "write_regions_geojson",
]
