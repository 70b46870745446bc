"""napari sample data: the CMU-1-Small-Region Aperio slide that ships with the package (CC0)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from napari_anopilad._reader import LayerData, slide_layer_data

SAMPLE_SLIDE_NAME = "CMU-1-Small-Region.svs"


def sample_slide_path() -> Path:
    """Return the path of the packaged CMU-1-Small-Region slide (2220 x 2967 pixels, 0.499 um/pixel, 20x)."""
    resource = files("napari_anopilad") / "data" / SAMPLE_SLIDE_NAME
    # The package is installed as files (setuptools package data), never zipped, so the resource is a path.
    return Path(str(resource))


def cmu_small_region() -> list[LayerData]:
    """Open the packaged CMU sample slide as a napari image layer."""
    return [slide_layer_data(sample_slide_path())]
