"""Tissue mask, patch grid geometry by hand-computed cases, and patch reads."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from napari_anopilad.slide import (
    SlideError,
    TissueMask,
    build_patch_grid,
    compute_tissue_mask,
    open_slide,
    read_patches,
)
from napari_anopilad.slide.resample import resize_rgb


@pytest.fixture(scope="module")
def cmu_level0(cmu_slide_path: Path) -> np.ndarray:
    with tifffile.TiffFile(cmu_slide_path) as tif:
        return tif.pages[0].asarray()


@pytest.fixture(scope="module")
def cmu_mask(cmu_slide_path: Path) -> TissueMask:
    with open_slide(cmu_slide_path) as slide:
        return compute_tissue_mask(slide)


def full_mask(slide_height: int, slide_width: int) -> TissueMask:
    return TissueMask(mask=np.ones((slide_height, slide_width), dtype=bool), downsample=1.0)


# -- tissue mask ------------------------------------------------------------------------------------


def test_cmu_tissue_mask_follows_saturation(cmu_slide_path: Path, cmu_mask: TissueMask) -> None:
    with open_slide(cmu_slide_path) as slide:
        thumbnail = slide.thumbnail(2048)
    assert cmu_mask.mask.shape == thumbnail.shape[:2]
    assert cmu_mask.downsample == pytest.approx((2220 / thumbnail.shape[1] + 2967 / thumbnail.shape[0]) / 2)

    # Independent reference: skimage's HSV conversion and Otsu's threshold on the same thumbnail.
    saturation = rgb2hsv(thumbnail)[..., 1]
    threshold = threshold_otsu(saturation)
    stained = saturation > threshold + 0.1
    glass = saturation < 0.03
    assert cmu_mask.mask[stained].mean() > 0.99
    assert cmu_mask.mask[glass].mean() < 0.2
    assert 0.2 < cmu_mask.tissue_fraction < 0.6


def test_all_background_slide_has_no_tissue(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    glass = np.clip(245 + rng.normal(0, 2, (800, 600, 3)), 0, 255).astype(np.uint8)
    path = tmp_path / "blank.tif"
    tifffile.imwrite(path, glass, tile=(128, 128), photometric="rgb", metadata=None)
    with open_slide(path, mpp=0.5) as slide:
        mask = compute_tissue_mask(slide)
        assert not mask.mask.any()
        grid = build_patch_grid(slide, tissue_mask=mask)
    assert grid.shape == (3, 2)
    assert len(grid.tissue_cells()) == 0


def test_uniform_white_slide_has_no_tissue(tmp_path: Path) -> None:
    path = tmp_path / "white.tif"
    tifffile.imwrite(
        path, np.full((512, 512, 3), 255, np.uint8), tile=(128, 128), photometric="rgb", metadata=None
    )
    with open_slide(path) as slide:
        assert not compute_tissue_mask(slide).mask.any()


# -- grid geometry ----------------------------------------------------------------------------------


def test_cmu_grid_reads_natively(cmu_slide_path: Path, cmu_mask: TissueMask) -> None:
    # mpp 0.499 is within 10% of 0.5, so a patch is 256 level-0 pixels read at level 0.
    with open_slide(cmu_slide_path) as slide:
        grid = build_patch_grid(slide, tissue_mask=cmu_mask)
    assert grid.patch_size_level0 == 256
    assert grid.shape == (2967 // 256, 2220 // 256)
    assert grid.shape == (11, 8)
    assert grid.read_level == 0
    assert grid.patch_size_read == 256
    assert grid.n_patches == 88
    assert grid.box_level0(2, 3) == (768, 512, 256, 256)
    assert grid.tissue_fraction.dtype == np.float32
    assert grid.tissue_fraction.shape == (11, 8)


def test_grid_from_coarser_level(tcga_slide_path: Path) -> None:
    # At 0.25 um/px a 20x patch is 512 level-0 pixels. Level 1 (downsample 2.0005, 0.50 um/px)
    # is the coarsest level within 10% of 0.5 um/px, so patches come from there.
    with open_slide(tcga_slide_path, mpp=0.25) as slide:
        grid = build_patch_grid(slide, tissue_mask=full_mask(10, 10))
    assert grid.patch_size_level0 == 512
    assert grid.shape == (3567 // 512, 4443 // 512)
    assert grid.read_level == 1
    assert grid.patch_size_read == round(512 / ((4443 / 2221 + 3567 / 1783) / 2))
    assert grid.patch_size_read == 256


@pytest.mark.parametrize(
    ("mpp", "patch_size_level0", "shape"),
    [
        (0.3, round(256 * 0.5 / 0.3), (2967 // 427, 2220 // 427)),
        (1.0, 128, (2967 // 128, 2220 // 128)),
        (0.46, 256, (11, 8)),
        (0.54, 256, (11, 8)),
        (0.44, round(256 * 0.5 / 0.44), (2967 // 291, 2220 // 291)),
    ],
)
def test_grid_patch_size_by_hand(
    cmu_slide_path: Path, mpp: float, patch_size_level0: int, shape: tuple[int, int]
) -> None:
    with open_slide(cmu_slide_path, mpp=mpp) as slide:
        grid = build_patch_grid(slide, tissue_mask=full_mask(10, 10))
    assert grid.patch_size_level0 == patch_size_level0
    assert grid.shape == shape
    assert grid.read_level == 0
    assert grid.patch_size_read == patch_size_level0


def test_downsample_three_pyramid_level_choice(tmp_path: Path, cmu_level0: np.ndarray) -> None:
    pixels = cmu_level0[:1500, :1200]
    path = tmp_path / "pyramid-3.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(pixels, tile=(128, 128), photometric="rgb", subifds=1)
        writer.write(resize_rgb(pixels, 500, 400), tile=(128, 128), photometric="rgb", subfiletype=1)

    # 0.2 um/px: level 1 is 0.6 um/px, coarser than 0.55, so patches come from level 0.
    with open_slide(path, mpp=0.2) as slide:
        grid = build_patch_grid(slide, tissue_mask=full_mask(10, 10))
    assert (grid.read_level, grid.patch_size_level0, grid.patch_size_read) == (0, 640, 640)
    assert grid.shape == (1500 // 640, 1200 // 640)

    # 0.18 um/px: level 1 is 0.54 um/px, within 10%; 711 level-0 px are 237 level-1 px.
    with open_slide(path, mpp=0.18) as slide:
        grid = build_patch_grid(slide, tissue_mask=full_mask(10, 10))
        assert (grid.read_level, grid.patch_size_level0, grid.patch_size_read) == (1, 711, 237)
        patches = read_patches(slide, grid, [(0, 0), (1, 0)])
    with tifffile.TiffFile(path) as tif:
        level1 = tif.series[0].levels[1].keyframe.asarray()
    assert patches.shape == (2, 256, 256, 3)
    np.testing.assert_array_equal(patches[0], resize_rgb(level1[:237, :237], 256, 256))
    y_level = math.floor(711 / 3.0)
    np.testing.assert_array_equal(patches[1], resize_rgb(level1[y_level : y_level + 237, :237], 256, 256))


def test_tissue_fraction_by_hand(cmu_slide_path: Path) -> None:
    # Mask pixels are 128 level-0 px, so each 256 px cell covers 2 x 2 mask pixels.
    mask = np.zeros((24, 18), dtype=bool)
    mask[0, 0] = True  # cell (0, 0): 1 of 4
    mask[2:4, 2:4] = True  # cell (1, 1): 4 of 4
    mask[4, 6:8] = True  # cell (2, 3): 2 of 4
    with open_slide(cmu_slide_path) as slide:
        grid = build_patch_grid(
            slide, tissue_mask=TissueMask(mask, downsample=128.0), min_tissue_fraction=0.5
        )
    expected = np.zeros((11, 8), dtype=np.float32)
    expected[0, 0] = 0.25
    expected[1, 1] = 1.0
    expected[2, 3] = 0.5
    np.testing.assert_array_equal(grid.tissue_fraction, expected)
    np.testing.assert_array_equal(grid.tissue_cells(), [[1, 1], [2, 3]])


def test_tissue_fraction_fine_mask_matches_block_mean(cmu_slide_path: Path) -> None:
    rng = np.random.default_rng(2)
    mask = rng.random((2967, 2220)) > 0.7
    with open_slide(cmu_slide_path) as slide:
        grid = build_patch_grid(slide, tissue_mask=TissueMask(mask, downsample=1.0))
    block_mean = mask[: 11 * 256, : 8 * 256].reshape(11, 256, 8, 256).mean(axis=(1, 3))
    np.testing.assert_allclose(grid.tissue_fraction, block_mean, rtol=1e-6)


def test_box_outside_grid_rejected(cmu_slide_path: Path) -> None:
    with open_slide(cmu_slide_path) as slide:
        grid = build_patch_grid(slide, tissue_mask=full_mask(10, 10))
    with pytest.raises(IndexError, match=r"cell \(11, 0\) is outside the 11x8 grid"):
        grid.box_level0(11, 0)


def test_unknown_mpp_says_pass_mpp(tcga_slide_path: Path) -> None:
    with open_slide(tcga_slide_path) as slide, pytest.raises(SlideError, match="--mpp") as error:
        build_patch_grid(slide)
    assert str(tcga_slide_path) in str(error.value)


def test_slide_smaller_than_patch(tmp_path: Path, cmu_level0: np.ndarray) -> None:
    path = tmp_path / "small.tif"
    tifffile.imwrite(path, cmu_level0[:300, :200], tile=(64, 64), photometric="rgb", metadata=None)
    with open_slide(path, mpp=0.5) as slide, pytest.raises(SlideError, match="smaller than one 256 px patch"):
        build_patch_grid(slide)


# -- patch reads ------------------------------------------------------------------------------------


def test_read_patches_native(cmu_slide_path: Path, cmu_level0: np.ndarray, cmu_mask: TissueMask) -> None:
    with open_slide(cmu_slide_path) as slide:
        grid = build_patch_grid(slide, tissue_mask=cmu_mask)
        cells = grid.tissue_cells()
        patches = read_patches(slide, grid, cells)
        assert read_patches(slide, grid, np.empty((0, 2), dtype=np.int64)).shape == (0, 256, 256, 3)
    assert len(cells) > 10
    assert patches.shape == (len(cells), 256, 256, 3)
    for patch, (row, col) in zip(patches, cells, strict=True):
        np.testing.assert_array_equal(
            patch, cmu_level0[row * 256 : (row + 1) * 256, col * 256 : (col + 1) * 256]
        )


def test_read_patches_resized(cmu_slide_path: Path, cmu_level0: np.ndarray) -> None:
    with open_slide(cmu_slide_path, mpp=0.3) as slide:
        grid = build_patch_grid(slide, tissue_mask=full_mask(10, 10))
        patches = read_patches(slide, grid, [(3, 2), (0, 4)])
    size = grid.patch_size_level0
    for patch, (row, col) in zip(patches, [(3, 2), (0, 4)], strict=True):
        box = cmu_level0[row * size : (row + 1) * size, col * size : (col + 1) * size]
        np.testing.assert_array_equal(patch, resize_rgb(box, 256, 256))


def test_tissue_grid_picture(cmu_slide_path: Path, cmu_mask: TissueMask, tmp_path: Path) -> None:
    """Draw the CMU thumbnail with its tissue mask and 20x grid, tissue cells highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    with open_slide(cmu_slide_path) as slide:
        thumbnail = slide.thumbnail(1024)
        grid = build_patch_grid(slide, tissue_mask=cmu_mask)
    # Thumbnail pixels per level-0 pixel, to draw level-0 boxes on the thumbnail.
    scale = thumbnail.shape[1] / 2220

    figure, axes = plt.subplots(1, 2, figsize=(10, 7), dpi=100)
    axes[0].imshow(thumbnail)
    # Mask pixel centres in thumbnail pixels, so the mask outline lands on the thumbnail.
    height_mask, width_mask = cmu_mask.mask.shape
    x_thumbnail = (np.arange(width_mask) + 0.5) * thumbnail.shape[1] / width_mask
    y_thumbnail = (np.arange(height_mask) + 0.5) * thumbnail.shape[0] / height_mask
    axes[0].contourf(
        x_thumbnail, y_thumbnail, cmu_mask.mask, levels=[0.5, 1.5], colors=["deepskyblue"], alpha=0.3
    )
    axes[0].contour(x_thumbnail, y_thumbnail, cmu_mask.mask, levels=[0.5], colors=["blue"], linewidths=1.0)
    axes[0].set_title("tissue mask (Otsu on saturation), outlined in blue")
    axes[1].imshow(thumbnail)
    tissue = {tuple(cell) for cell in grid.tissue_cells().tolist()}
    for row, col in grid.all_cells().tolist():
        x_level0, y_level0, width_level0, height_level0 = grid.box_level0(row, col)
        is_tissue = (row, col) in tissue
        axes[1].add_patch(
            Rectangle(
                (x_level0 * scale, y_level0 * scale),
                width_level0 * scale,
                height_level0 * scale,
                fill=is_tissue,
                facecolor=(0.0, 0.8, 0.2, 0.3),
                edgecolor="lime" if is_tissue else "grey",
                linewidth=1.0,
            )
        )
    axes[1].set_title(f"256 px grid at 0.5 um/px: {len(tissue)} of {grid.n_patches} tissue cells")
    for axis in axes:
        axis.set_axis_off()
    figure.tight_layout()
    path = tmp_path / "tissue-grid-cmu.png"
    figure.savefig(path)
    plt.close(figure)

    image = plt.imread(path)
    assert image.shape[:2] == (700, 1000)
    assert 0 < len(tissue) < grid.n_patches
