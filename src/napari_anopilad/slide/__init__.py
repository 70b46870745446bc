"""Whole-slide reading, tissue mask and patch grid (numpy, tifffile, zarr, dask; no torch, no Qt)."""

from napari_anopilad.slide.errors import SlideError
from napari_anopilad.slide.grid import MPP_TOLERANCE, PatchGrid, build_patch_grid, read_patches
from napari_anopilad.slide.reader import MAX_UNTILED_PIXELS, Level, Slide, open_slide
from napari_anopilad.slide.tissue import TissueMask, compute_tissue_mask

__all__ = [
    "MAX_UNTILED_PIXELS",
    "MPP_TOLERANCE",
    "Level",
    "PatchGrid",
    "Slide",
    "SlideError",
    "TissueMask",
    "build_patch_grid",
    "compute_tissue_mask",
    "open_slide",
    "read_patches",
]
