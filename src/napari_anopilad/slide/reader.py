"""Open a whole-slide image and read its pyramid levels lazily.

Each level is a dask array whose chunks are the file's tiles (or strips). The chunks are read
through tifffile's zarr store, so only the tiles a read touches are decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import struct
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr
from numpy.typing import NDArray

from napari_anopilad.slide.errors import SlideError
from napari_anopilad.slide.formats import read_layout
from napari_anopilad.slide.resample import resize_rgb
from napari_anopilad.slide.resolution import read_resolution

# A single-level image without tiles is read in whole strips, and the tissue mask needs the
# whole image at full resolution, so larger ones are rejected: 10,000 x 10,000 RGB pixels are
# 300 MB in memory.
MAX_UNTILED_PIXELS = 10_000 * 10_000

# Bytes sampled for Slide.identity: the file's head and tail and evenly spaced blocks between.
_IDENTITY_BLOCK_BYTES = 64 * 1024
_IDENTITY_MIDDLE_BLOCKS = 16

# Errors that tifffile, imagecodecs and zarr raise for unreadable or corrupt image data.
_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError, IndexError, struct.error)

RGBImage = NDArray[np.uint8]

logger = logging.getLogger(__name__)


class _DemoteToDebug(logging.Filter):
    """Re-log tifffile's records as debug messages of this module and drop the originals."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger.debug("tifffile %s: %s", record.levelname.lower(), record.getMessage())
        return False


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Keep tifffile's parser warnings off the console while a slide opens.

    A bad file then prints only the SlideError line. The warnings are re-logged as debug
    messages, visible with ``anopilad -v``.
    """
    tifffile_logger = logging.getLogger("tifffile")
    demote = _DemoteToDebug()
    tifffile_logger.addFilter(demote)
    try:
        yield
    finally:
        tifffile_logger.removeFilter(demote)


def composite_over_white(rgba: NDArray[np.uint8]) -> RGBImage:
    """Convert RGBA pixels to RGB by compositing them over a white background."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class _LevelSource:
    """Array-like view of one level's zarr array that dask reads chunk by chunk.

    It converts RGBA to RGB, raises a clear SlideError once the slide is closed (tifffile's file
    cache would silently reopen the file), and turns decoder errors into SlideError.
    """

    def __init__(self, slide: Slide, zarr_array: zarr.Array, level_index: int) -> None:
        self._slide = slide
        self.zarr_array = zarr_array
        self.level_index = level_index
        height, width, _ = zarr_array.shape
        self.shape = (int(height), int(width), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: Any) -> RGBImage:
        self._slide._check_open()
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        rows, cols, channels = key
        try:
            pixels = np.asarray(self.zarr_array[rows, cols, :])
        except _READ_ERRORS as error:
            raise SlideError(
                f"{self._slide.path}: failed to read level {self.level_index} ({type(error).__name__}: {error}); "
                "the file may be corrupt, so copy or download the slide again"
            ) from error
        if pixels.shape[-1] == 4:
            pixels = composite_over_white(pixels)
        return pixels[..., channels]

    def __dask_tokenize__(self) -> tuple[str, int]:
        return (self._slide.identity, self.level_index)


class Level:
    """One pyramid level: a lazy RGB dask array and its downsample from level 0.

    Attributes
    ----------
    array : dask.array.Array
        uint8 RGB pixels, shape ``(height, width, 3)``; chunks are the file's tiles.
    downsample : float
        Level-0 pixels per level pixel: the mean of the width and height ratios.
    tile_shape : tuple of int
        ``(height, width)`` of one tile (or strip) of the file.
    """

    def __init__(self, source: _LevelSource, downsample: float) -> None:
        self._source = source
        chunks = source.zarr_array.chunks
        self.tile_shape: tuple[int, int] = (int(chunks[0]), int(chunks[1]))
        self.downsample = float(downsample)
        self.array: da.Array = da.from_array(
            source,
            chunks=(self.tile_shape[0], self.tile_shape[1], 3),
            asarray=False,
            meta=np.empty((0, 0, 0), dtype=np.uint8),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, 3)`` in level pixels."""
        return self._source.shape

    def read(self, y_level: int, x_level: int, height_level: int, width_level: int) -> RGBImage:
        """Read a box that lies inside the level, straight from the zarr store (no dask graph)."""
        return self._source[y_level : y_level + height_level, x_level : x_level + width_level]

    def __repr__(self) -> str:
        return f"Level(shape={self.shape}, downsample={self.downsample:.4g}, tile_shape={self.tile_shape})"


class Slide:
    """An open whole-slide image. Create it with :func:`open_slide`.

    The file stays open while the slide or any of its level arrays is alive; :meth:`close` (or
    leaving a ``with`` block) closes it, after which reads raise SlideError.

    Attributes
    ----------
    path : Path
        The slide file.
    format : str
        ``aperio``, ``hamamatsu``, ``philips``, ``ome-tiff`` or ``generic-tiff``.
    levels : list of Level
        Pyramid levels, largest first.
    mpp : float or None
        Level-0 microns per pixel: the ``mpp=`` override, else the file's metadata, else None.
    objective_power : float or None
        Scanner objective magnification from the metadata, else None.
    associated_images : list of str
        Names of the non-level images (``label``, ``macro``, ``thumbnail``, ...).
    """

    def __init__(self, path: Path, tif: tifffile.TiffFile, mpp: float | None) -> None:
        self.path = path
        self._tif = tif
        self._closed = False
        self._lock = threading.Lock()
        self._identity: str | None = None

        layout = read_layout(tif, path)
        self.format = layout.format
        self._associated = layout.associated
        self.associated_images = list(layout.associated)

        metadata_mpp, self.objective_power = read_resolution(tif, layout.format)
        self.mpp = metadata_mpp if mpp is None else float(mpp)

        height0, width0 = _series_size(layout.levels[0])
        if (
            len(layout.levels) == 1
            and not layout.levels[0].keyframe.is_tiled
            and height0 * width0 > MAX_UNTILED_PIXELS
        ):
            raise SlideError(
                f"{path}: the image is {width0}x{height0} px without tiles or a pyramid, larger than the "
                f"{MAX_UNTILED_PIXELS:,} px that can be read whole; convert it to a tiled pyramid TIFF "
                "(for example with vips tiffsave --tile --pyramid)"
            )

        self._stores = []
        self.levels: list[Level] = []
        for index, series in enumerate(layout.levels):
            store = series.aszarr(level=0, fillvalue=0)
            self._stores.append(store)
            zarr_array = zarr.open_array(store, mode="r")
            height, width = _series_size(series)
            downsample = (width0 / width + height0 / height) / 2
            self.levels.append(Level(_LevelSource(self, zarr_array, index), downsample))

    # -- lifetime -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SlideError(f"{self.path}: the slide was closed; open it again with open_slide to read it")

    def close(self) -> None:
        """Close the file. Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for store in self._stores:
                store.close()
            self._tif.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"Slide({str(self.path)!r}, format={self.format!r}, levels={len(self.levels)}, "
            f"mpp={self.mpp}, {state})"
        )

    # -- metadata -------------------------------------------------------------------------------

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in pixels."""
        height, width, _ = self.levels[0].shape
        return width, height

    def level_mpp(self, level: int) -> float | None:
        """Microns per pixel of a level (level-0 mpp times its downsample), None when unknown."""
        if self.mpp is None:
            return None
        return self.mpp * self.levels[level].downsample

    @property
    def identity(self) -> str:
        """Content hash of the file size and sampled bytes: equal for copies, independent of path."""
        if self._identity is None:
            self._identity = _content_hash(self.path)
        return self._identity

    # -- pixels ---------------------------------------------------------------------------------

    def read_associated(self, name: str) -> RGBImage:
        """Read an associated image (label, macro, thumbnail, ...) as uint8 RGB ``(h, w, 3)``."""
        self._check_open()
        if name not in self._associated:
            raise SlideError(
                f"{self.path}: no associated image named {name!r}; this slide has {self.associated_images or 'none'}"
            )
        series = self._associated[name]
        try:
            pixels = np.asarray(series.asarray())
        except _READ_ERRORS as error:
            raise SlideError(
                f"{self.path}: failed to read the {name} image ({error}); the file may be corrupt"
            ) from error
        return _to_rgb(pixels, self.path, name)

    def read_region(
        self, x_level0: int, y_level0: int, level: int, width_level: int, height_level: int
    ) -> RGBImage:
        """Read a box of a level; pixels outside the slide are white (255).

        Parameters
        ----------
        x_level0, y_level0 : int
            Top-left corner in level-0 pixels.
        level : int
            Index into :attr:`levels`.
        width_level, height_level : int
            Size of the box in pixels of ``level``.

        Returns
        -------
        ndarray
            uint8 RGB, shape ``(height_level, width_level, 3)``.
        """
        self._check_open()
        if not 0 <= level < len(self.levels):
            raise SlideError(
                f"{self.path}: level {level} does not exist; the slide has levels 0-{len(self.levels) - 1}"
            )
        if width_level < 0 or height_level < 0:
            raise ValueError(f"region size must not be negative, got {width_level}x{height_level}")
        pyramid_level = self.levels[level]
        x_level = math.floor(x_level0 / pyramid_level.downsample)
        y_level = math.floor(y_level0 / pyramid_level.downsample)
        return _read_padded(pyramid_level, x_level, y_level, width_level, height_level)

    def thumbnail(self, max_size: int = 1024) -> RGBImage:
        """Return the whole slide downscaled so that its longer side is ``max_size`` pixels (never upscaled)."""
        self._check_open()
        width0, height0 = self.dimensions
        scale = min(1.0, max_size / max(width0, height0))
        height_out = max(1, round(height0 * scale))
        width_out = max(1, round(width0 * scale))

        # The coarsest level that still has at least the output's size.
        level = self.levels[0]
        for candidate in self.levels:
            if candidate.shape[0] >= height_out and candidate.shape[1] >= width_out:
                level = candidate

        # Stride first to bound memory, so that a level far larger than the thumbnail is never
        # held whole, then area-average to the exact size. Bands of whole tile rows
        # are read straight from the zarr store, which is faster than dask's graph here.
        stride = max(1, min(level.shape[0] // (2 * height_out), level.shape[1] // (2 * width_out)))
        band_height = level.tile_shape[0] * stride
        bands = [
            level.read(y_level, 0, min(band_height, level.shape[0] - y_level), level.shape[1])[
                ::stride, ::stride
            ]
            for y_level in range(0, level.shape[0], band_height)
        ]
        pixels = np.concatenate(bands, axis=0)
        return resize_rgb(pixels, height_out, width_out)


def _series_size(series: tifffile.TiffPageSeries) -> tuple[int, int]:
    return int(series.shape[series.axes.index("Y")]), int(series.shape[series.axes.index("X")])


def _to_rgb(pixels: NDArray[Any], path: Path, name: str) -> RGBImage:
    """Convert a decoded associated image to uint8 RGB."""
    if pixels.dtype != np.uint8:
        raise SlideError(
            f"{path}: the {name} image has {pixels.dtype} samples; only 8-bit images can be read"
        )
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        return composite_over_white(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return pixels
    raise SlideError(f"{path}: the {name} image has shape {pixels.shape}, not an RGB image")


def _read_padded(level: Level, x_level: int, y_level: int, width_level: int, height_level: int) -> RGBImage:
    """Read a box of a level in level pixels, filling the part outside the level with white."""
    height, width, _ = level.shape
    out = np.full((height_level, width_level, 3), 255, dtype=np.uint8)
    x_start, y_start = max(x_level, 0), max(y_level, 0)
    x_stop, y_stop = min(x_level + width_level, width), min(y_level + height_level, height)
    if x_stop > x_start and y_stop > y_start:
        out[y_start - y_level : y_stop - y_level, x_start - x_level : x_stop - x_level] = level.read(
            y_start, x_start, y_stop - y_start, x_stop - x_start
        )
    return out


def _content_hash(path: Path) -> str:
    """Hash the file size and sampled blocks with SHA-256; return the first 32 hex digits."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    offsets = [0, max(0, size - _IDENTITY_BLOCK_BYTES)]
    step = size // (_IDENTITY_MIDDLE_BLOCKS + 1)
    offsets[1:1] = [step * (i + 1) for i in range(_IDENTITY_MIDDLE_BLOCKS)]
    with open(path, "rb") as file:
        for offset in offsets:
            file.seek(offset)
            digest.update(file.read(_IDENTITY_BLOCK_BYTES))
    return digest.hexdigest()[:32]


def open_slide(path: str | os.PathLike[str], mpp: float | None = None) -> Slide:
    """Open a whole-slide image: Aperio SVS, Hamamatsu NDPI, Philips TIFF, OME-TIFF or tiled TIFF.

    Parameters
    ----------
    path : str or PathLike
        The slide file.
    mpp : float, optional
        Level-0 microns per pixel; overrides the file's metadata (use it when the file has none).

    Returns
    -------
    Slide
        The open slide; close it with :meth:`Slide.close` or use it as a context manager.

    Raises
    ------
    SlideError
        When the file is missing, not a TIFF slide, truncated, or contains pixels other than 8-bit RGB(A).
    """
    path = Path(path)
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise SlideError(f"{path}: mpp must be a positive number of microns per pixel, got {mpp}")
    if not path.exists():
        raise SlideError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise SlideError(f"{path}: not a file; give the path of a slide file")

    with _quiet_tifffile():
        return _open_tiff_slide(path, mpp)


def _open_tiff_slide(path: Path, mpp: float | None) -> Slide:
    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, *_READ_ERRORS) as error:
        raise SlideError(
            f"{path}: not a readable TIFF whole-slide image ({error}); open an SVS, NDPI, Philips TIFF, "
            "OME-TIFF or tiled TIFF file"
        ) from error

    if len(tif.pages) == 0:
        tif.close()
        raise SlideError(
            f"{path}: the TIFF has no readable image directory, so the file is truncated or corrupt; "
            "copy or download the slide again"
        )

    # The file handle closes when the TiffFile is garbage-collected, which happens only after the
    # slide and every level array that reads through it are gone.
    weakref.finalize(tif, tif.filehandle.close)
    try:
        return Slide(path, tif, mpp)
    except SlideError:
        tif.close()
        raise
    except _READ_ERRORS as error:
        tif.close()
        raise SlideError(
            f"{path}: failed to read the slide structure ({error}); the file may be corrupt"
        ) from error
