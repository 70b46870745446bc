"""Which TIFF pages of a slide file are pyramid levels and which are associated images.

tifffile recognises the vendor layouts (Aperio SVS, Hamamatsu NDPI, Philips TIFF, OME-TIFF)
and groups their pages into series with levels. This module picks the main series, adds
pages that tifffile left as separate series but that are reduced copies of the main image
(a generic TIFF pyramid with an unusual downsample), names the associated images, and checks
that every level contains 8-bit RGB or RGBA pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from napari_anopilad.slide.errors import SlideError

# Names of associated images as the vendors' series names and page descriptions spell them.
_ASSOCIATED_NAMES = ("label", "macro", "thumbnail", "overview", "map")

# A reduced page counts as a pyramid level when its aspect ratio matches level 0 to within
# one level-0 pixel per downsample step plus this relative slack (vendors round level sizes).
_ASPECT_TOLERANCE = 0.02

# Photometric interpretations whose decoded pixels are RGB (tifffile converts YCbCr JPEG tiles).
_RGB_PHOTOMETRICS = (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)


@dataclass
class SlideLayout:
    """The pages of a slide file, sorted into pyramid levels and associated images."""

    format: str
    levels: list[tifffile.TiffPageSeries]
    associated: dict[str, tifffile.TiffPageSeries]


def detect_format(tif: tifffile.TiffFile) -> str:
    """Name the slide format the way OpenSlide's ``openslide.vendor`` property does, plus ``ome-tiff``."""
    if tif.is_svs:
        return "aperio"
    if tif.is_ndpi:
        return "hamamatsu"
    if tif.is_philips:
        return "philips"
    if tif.is_ome:
        return "ome-tiff"
    return "generic-tiff"


def _image_size(series: tifffile.TiffPageSeries) -> tuple[int, int]:
    """Return (height, width) of a series from its Y and X axes."""
    axes = series.axes
    return int(series.shape[axes.index("Y")]), int(series.shape[axes.index("X")])


def _is_reduced_copy(level0: tifffile.TiffPageSeries, candidate: tifffile.TiffPageSeries) -> bool:
    """Tell whether ``candidate`` has the pixel layout and aspect ratio of ``level0`` at a smaller size."""
    if candidate.dtype != level0.dtype or candidate.axes != level0.axes:
        return False
    if candidate.shape[-1] != level0.shape[-1]:
        return False
    height0, width0 = _image_size(level0)
    height, width = _image_size(candidate)
    if height >= height0 or width >= width0:
        return False
    downsample_x = width0 / width
    downsample_y = height0 / height
    # Each level size is rounded to whole pixels, so the two downsamples may differ by up to one
    # pixel's worth on each axis.
    slack = downsample_x / width + downsample_y / height
    return abs(downsample_x - downsample_y) <= slack + _ASPECT_TOLERANCE * downsample_x


def _associated_name(series: tifffile.TiffPageSeries, index: int) -> str:
    """Name an associated image from its series name or page description, else ``image<index>``."""
    ndpi_magnification = series.keyframe.tags.valueof(65421)
    if ndpi_magnification == -1.0:
        return "macro"
    if ndpi_magnification == -2.0:
        return "map"
    for text in (series.name, series.keyframe.description):
        words = text.strip().lower().split()
        if words and words[0] in _ASSOCIATED_NAMES:
            return words[0]
    return f"image{index}"


def _split_levels(
    tif: tifffile.TiffFile,
) -> tuple[list[tifffile.TiffPageSeries], list[tifffile.TiffPageSeries]]:
    """Return (levels, other series): the largest image's pyramid and everything else."""
    candidates = [series for series in tif.series if "Y" in series.axes and "X" in series.axes]
    if not candidates:
        return [], list(tif.series)

    def area(series: tifffile.TiffPageSeries) -> int:
        height, width = _image_size(series)
        return height * width

    # Vendor layouts name the pyramid "Baseline"; otherwise the pyramid is the largest image.
    main = next((series for series in candidates if series.name == "Baseline"), None)
    if main is None:
        main = max(candidates, key=area)

    levels = list(main.levels)
    others = []
    for series in tif.series:
        if series is main:
            continue
        # tifffile pyramidises separate pages only for downsamples 2, 3 and 4, so reduced pages
        # with any other downsample arrive as their own series.
        if len(series.levels) == 1 and series.keyframe.is_tiled and _is_reduced_copy(levels[0], series):
            levels.append(series)
        else:
            others.append(series)
    # NDPI marks the macro and map images with a negative Magnification tag. tifffile takes a
    # macro for a pyramid level when its size happens to fit a downsample step.
    for level in levels[1:]:
        if (level.keyframe.tags.valueof(65421) or 0) < 0:
            levels.remove(level)
            others.append(level)
    levels.sort(key=area, reverse=True)
    return levels, others


def _describe_pixels(series: tifffile.TiffPageSeries) -> str:
    page = series.keyframe
    photometric = tifffile.PHOTOMETRIC(page.photometric).name if page.photometric is not None else "unknown"
    return f"{series.dtype} pixels, axes {series.axes}, shape {series.shape}, photometric {photometric}"


def check_pixel_layout(series: tifffile.TiffPageSeries, path: Path) -> None:
    """Raise SlideError unless the series contains 8-bit interleaved RGB or RGBA pixels."""
    what = _describe_pixels(series)
    if series.dtype != np.uint8:
        bits = series.dtype.itemsize * 8
        raise SlideError(
            f"{path}: the slide has {bits}-bit samples ({what}); only 8-bit RGB brightfield slides "
            "can be analysed, so convert it to 8-bit RGB first"
        )
    if series.axes[-3:] != "YXS" or series.shape[-1] not in (3, 4):
        samples = series.shape[series.axes.index("S")] if "S" in series.axes else 1
        if samples == 1:
            kind = "grayscale or single-channel"
        else:
            kind = "not interleaved RGB"
        raise SlideError(
            f"{path}: the slide is {kind} ({what}); only RGB brightfield slides (H&E) with interleaved "
            "samples can be analysed, so export it as RGB first"
        )
    if series.keyframe.photometric not in _RGB_PHOTOMETRICS:
        raise SlideError(f"{path}: the slide's colour space is not RGB ({what}); export it as RGB first")
    extra_axes = [
        size for size, axis in zip(series.shape, series.axes, strict=True) if axis not in "YXS" and size != 1
    ]
    if extra_axes:
        raise SlideError(
            f"{path}: the slide has several planes ({what}); only single-plane RGB slides can be "
            "analysed, so export one plane first"
        )


def check_complete(tif: tifffile.TiffFile, series_list: list[tifffile.TiffPageSeries], path: Path) -> None:
    """Raise SlideError when any tile or strip of the series lies beyond the end of the file."""
    file_size = os.path.getsize(path)
    for series in series_list:
        for page in series.pages:
            if page is None:
                continue
            ends = [
                offset + count for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True)
            ]
            if ends and max(ends) > file_size:
                raise SlideError(
                    f"{path}: the file is truncated: image data runs to byte {max(ends)} but the file "
                    f"has {file_size} bytes; copy or download the slide again"
                )


def read_layout(tif: tifffile.TiffFile, path: Path) -> SlideLayout:
    """Sort the pages of an open TIFF into pyramid levels (largest first) and associated images."""
    slide_format = detect_format(tif)
    levels, others = _split_levels(tif)
    if not levels:
        raise SlideError(
            f"{path}: the TIFF contains no 2-D image, so it is not a whole-slide image; open a slide file instead"
        )
    for level in levels:
        check_pixel_layout(level, path)

    associated: dict[str, tifffile.TiffPageSeries] = {}
    for index, series in enumerate(others, start=1):
        name = _associated_name(series, index)
        if name in associated:
            name = f"{name}{index}"
        associated[name] = series

    check_complete(tif, levels, path)
    return SlideLayout(format=slide_format, levels=levels, associated=associated)
