"""Tissue mask of a slide: Otsu's threshold on HSV saturation of a low-resolution image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_objects

from napari_anopilad.slide.reader import Slide

# Glass, and JPEG noise on it, stays below this saturation; stained tissue is well above it.
# The floor keeps Otsu's threshold from splitting pure background into two classes.
MIN_TISSUE_SATURATION = 0.05

# Connected regions smaller than this are specks (dust, debris), not tissue: 0.01 mm^2, less
# than one 128 um patch (256 px at 0.5 um/px).
MIN_TISSUE_AREA_UM2 = 10_000.0

# Without a known resolution, regions smaller than this fraction of the image are specks.
MIN_TISSUE_AREA_FRACTION = 1e-4


@dataclass
class TissueMask:
    """Boolean tissue mask over the whole slide.

    Attributes
    ----------
    mask : ndarray of bool
        ``(height, width)``; True where there is tissue.
    downsample : float
        Level-0 pixels per mask pixel (the mean of the width and height ratios).
    """

    mask: NDArray[np.bool_]
    downsample: float

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide's area covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def hsv_saturation(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Return HSV saturation, (max - min) / max over the RGB channels, 0 for black pixels."""
    channel_max = rgb.max(axis=-1).astype(np.float32)
    channel_min = rgb.min(axis=-1).astype(np.float32)
    saturation = np.zeros(channel_max.shape, dtype=np.float32)
    np.divide(channel_max - channel_min, channel_max, out=saturation, where=channel_max > 0)
    return saturation


def saturation_mask(rgb: NDArray[np.uint8], min_object_pixels: int) -> NDArray[np.bool_]:
    """Threshold HSV saturation with Otsu's method, fill holes and remove small objects.

    A uniform image, or one whose threshold falls below MIN_TISSUE_SATURATION, is background only.
    """
    saturation = hsv_saturation(rgb)
    if saturation.min() == saturation.max():
        return np.zeros(saturation.shape, dtype=bool)
    threshold = max(float(threshold_otsu(saturation)), MIN_TISSUE_SATURATION)
    mask = saturation > threshold

    # Closing joins nuclei and stroma across the small pale gaps between them before the holes
    # (lumens, fat) are filled.
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), dtype=bool), iterations=2, border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    return remove_small_objects(mask, max_size=max(min_object_pixels - 1, 0))


def compute_tissue_mask(slide: Slide, max_size: int = 2048) -> TissueMask:
    """Compute the tissue mask of a slide from its thumbnail.

    Parameters
    ----------
    slide : Slide
        An open slide.
    max_size : int
        Longer side of the mask in pixels (the slide is never upscaled).

    Returns
    -------
    TissueMask
        The mask and its downsample from level 0. A slide that is all background gets an
        all-False mask.
    """
    thumbnail = slide.thumbnail(max_size)
    width0, height0 = slide.dimensions
    downsample = (width0 / thumbnail.shape[1] + height0 / thumbnail.shape[0]) / 2

    if slide.mpp is not None:
        mask_pixel_area_um2 = (slide.mpp * downsample) ** 2
        min_object_pixels = int(np.ceil(MIN_TISSUE_AREA_UM2 / mask_pixel_area_um2))
    else:
        min_object_pixels = int(np.ceil(MIN_TISSUE_AREA_FRACTION * thumbnail.shape[0] * thumbnail.shape[1]))

    return TissueMask(mask=saturation_mask(thumbnail, min_object_pixels), downsample=downsample)
