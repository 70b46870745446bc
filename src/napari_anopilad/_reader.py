"""napari reader for whole-slide images: one lazy multiscale RGB image layer per slide.

World coordinates of the layer are level-0 pixels (``y`` down, ``x`` right), whatever level napari
shows: the layer's ``scale`` is 1 and napari derives each pyramid level's scale from the level shapes.
Every overlay the plugin adds (the z-score heatmap, the anomaly regions) uses the same level-0 pixel
world frame. The microns per pixel go into the layer metadata, so distances in microns are
``world * metadata["mpp"]``.

This module imports no Qt, so napari can call it before any window exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from napari_anopilad.slide import Slide

logger = logging.getLogger(__name__)

# Suffixes of the formats the slide module reads: SVS, NDPI, Philips TIFF, OME-TIFF and tiled TIFF.
# napari's builtin reader also claims the TIFF ones, so the user picks this reader with
# `viewer.open(path, plugin="napari-anopilad")` or makes it the default (docs/plugin.md).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi")

# Upper bound of napari's dask chunk cache while a slide is open. napari 0.9 defaults to a quarter of
# the machine's memory, but 1 GiB of decoded tiles already covers hundreds of screens of panning.
DASK_CACHE_LIMIT_BYTES = 1 << 30

METADATA_KEY = "anopilad"

LayerData = tuple[Any, dict[str, Any], str]

_OPEN_SLIDES: dict[tuple[str, float | None], Slide] = {}


def _is_slide_suffix(path: str) -> bool:
    return path.lower().endswith(SLIDE_SUFFIXES)


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return the slide reader when every path is a slide that the slide module opens, else None.

    Never raises: napari then offers the file to the other readers.
    """
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(isinstance(item, str) and _is_slide_suffix(item) for item in paths):
        return None

    from napari_anopilad.slide import open_slide

    for item in paths:
        try:
            with open_slide(item):
                pass
        except Exception as error:  # any failure means "not a slide for this reader"
            logger.info("napari-anopilad cannot read %s: %s", item, error)
            return None
    return read_slides


def read_slides(path: str | list[str]) -> list[LayerData]:
    """Read each slide as one multiscale RGB image layer in level-0 pixel world coordinates."""
    paths = [path] if isinstance(path, str) else list(path)
    return [slide_layer_data(item) for item in paths]


def slide_layer_data(path: str | Path, mpp: float | None = None) -> LayerData:
    """Build the napari layer data tuple of one slide.

    Parameters
    ----------
    path : str or Path
        The slide file.
    mpp : float, optional
        Level-0 microns per pixel, overriding the file's value.

    Returns
    -------
    tuple
        ``(levels, layer_kwargs, "image")``. ``levels`` are the slide's lazy dask arrays, largest first,
        so napari reads only the tiles it shows. ``layer_kwargs["metadata"]["anopilad"]`` has the slide
        ``path``, ``mpp``, ``identity``, ``level_downsamples`` and ``world_unit`` (``"level-0 pixel"``).

    Raises
    ------
    napari_anopilad.slide.SlideError
        If the file is not a readable slide.
    """
    from napari.utils import resize_dask_cache

    path = Path(path)
    slide = opened_slide(path, mpp=mpp)
    levels = [level.array for level in slide.levels]

    cache = resize_dask_cache()
    if cache.cache.available_bytes > DASK_CACHE_LIMIT_BYTES:
        resize_dask_cache(DASK_CACHE_LIMIT_BYTES)

    metadata = {
        METADATA_KEY: {
            "path": str(path.resolve()),
            "mpp": slide.mpp,
            "identity": slide.identity,
            "level_downsamples": [float(level.downsample) for level in slide.levels],
            "world_unit": "level-0 pixel",
        }
    }
    layer_kwargs: dict[str, Any] = {
        "name": slide_layer_name(path),
        "rgb": True,
        "multiscale": len(levels) > 1,
        "scale": (1.0, 1.0),
        "translate": (0.0, 0.0),
        "metadata": metadata,
    }
    data: Any = levels if len(levels) > 1 else levels[0]
    return (data, layer_kwargs, "image")


def opened_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Return the open slide of ``path``, opening it on first use.

    The slide stays open for the session because the layer's dask arrays read tiles through its file
    handle; the analysis widgets share the same object.
    """
    from napari_anopilad.slide import open_slide

    key = (str(Path(path).resolve()), mpp)
    slide = _OPEN_SLIDES.get(key)
    if slide is None or slide.closed:
        slide = open_slide(path, mpp=mpp)
        _OPEN_SLIDES[key] = slide
    return slide


def slide_layer_name(path: str | Path) -> str:
    """Return the layer name of a slide: its file name without the slide suffixes."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", *SLIDE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
