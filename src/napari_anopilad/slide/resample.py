"""Resize RGB images with area averaging (downscaling) or bilinear interpolation (upscaling).

Both are separable linear maps built as sparse matrices, one per axis, so a resize is two
sparse-dense products in float32. That is faster than a Gaussian prefilter plus spline zoom on
large thumbnails, and area averaging does not alias at any downscaling factor, integer or not.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import sparse


def _area_weights(size_in: int, size_out: int) -> sparse.csr_matrix:
    """Weights of each input pixel in each output pixel: overlap length over output pixel length."""
    scale = size_in / size_out
    rows, cols, values = [], [], []
    for index_out in range(size_out):
        start, stop = index_out * scale, (index_out + 1) * scale
        for index_in in range(int(np.floor(start)), min(int(np.ceil(stop)), size_in)):
            overlap = min(stop, index_in + 1) - max(start, index_in)
            if overlap > 0:
                rows.append(index_out)
                cols.append(index_in)
                values.append(overlap / scale)
    return sparse.csr_matrix((values, (rows, cols)), shape=(size_out, size_in), dtype=np.float32)


def _bilinear_weights(size_in: int, size_out: int) -> sparse.csr_matrix:
    """Linear interpolation weights with pixel centres aligned (half-pixel convention), edges clamped."""
    positions = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    positions = np.clip(positions, 0, size_in - 1)
    lower = np.floor(positions).astype(np.int64)
    upper = np.minimum(lower + 1, size_in - 1)
    fraction = (positions - lower).astype(np.float32)
    rows = np.concatenate([np.arange(size_out), np.arange(size_out)])
    cols = np.concatenate([lower, upper])
    values = np.concatenate([1 - fraction, fraction])
    return sparse.csr_matrix((values, (rows, cols)), shape=(size_out, size_in), dtype=np.float32)


def _axis_weights(size_in: int, size_out: int) -> sparse.csr_matrix:
    if size_out <= size_in:
        return _area_weights(size_in, size_out)
    return _bilinear_weights(size_in, size_out)


def resize_rgb(image: NDArray[np.uint8], height: int, width: int) -> NDArray[np.uint8]:
    """Resize a uint8 ``(h, w, c)`` image to ``(height, width, c)``.

    Each axis that shrinks is area-averaged and each axis that grows is interpolated bilinearly.
    """
    height_in, width_in, channels = image.shape
    if (height_in, width_in) == (height, width):
        return image.copy()

    pixels = image.astype(np.float32).reshape(height_in, width_in * channels)
    pixels = _axis_weights(height_in, height) @ pixels
    pixels = (
        pixels.reshape(height, width_in, channels).transpose(1, 0, 2).reshape(width_in, height * channels)
    )
    pixels = _axis_weights(width_in, width) @ pixels
    pixels = pixels.reshape(width, height, channels).transpose(1, 0, 2)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
