"""Opening slides: formats, levels, resolution, pixels against tifffile's own reads, and bad files."""

from __future__ import annotations

import gc
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.transform import resize

from napari_anopilad.slide import MAX_UNTILED_PIXELS, SlideError, open_slide
from napari_anopilad.slide.reader import composite_over_white
from napari_anopilad.slide.resample import resize_rgb

NDPI_TAGS = [(271, "s", 0, "Hamamatsu", True), (272, "s", 0, "C13220", True), (65420, "I", 1, 1, True)]


@pytest.fixture(scope="module")
def real_pixels(cmu_slide_path: Path) -> np.ndarray:
    """A 600 x 900 crop of the CMU slide's level 0, read by tifffile."""
    with tifffile.TiffFile(cmu_slide_path) as tif:
        return tif.pages[0].asarray()[1000:1600, 600:1500].copy()


def reduce(image: np.ndarray, factor: int) -> np.ndarray:
    """Downscale by an integer factor with area averaging, as a scanner builds its pyramid."""
    height, width = image.shape[0] // factor, image.shape[1] // factor
    return resize_rgb(image, height, width)


def assert_levels_match_pages(slide_path: Path, series_index: int = 0) -> None:
    """Every level of the slide equals tifffile's read of that level's page."""
    with tifffile.TiffFile(slide_path) as tif, open_slide(slide_path) as slide:
        reference_levels = tif.series[series_index].levels
        assert len(slide.levels) == len(reference_levels)
        for level, reference in zip(slide.levels, reference_levels, strict=True):
            np.testing.assert_array_equal(level.array.compute(), reference.keyframe.asarray())


# -- the real Aperio slides -----------------------------------------------------------------------


def test_cmu_levels_and_metadata(cmu_slide_path: Path) -> None:
    with open_slide(cmu_slide_path) as slide:
        assert slide.format == "aperio"
        assert len(slide.levels) == 1
        assert slide.levels[0].shape == (2967, 2220, 3)
        assert slide.levels[0].downsample == 1.0
        assert slide.levels[0].array.chunksize == (240, 240, 3)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.objective_power == 20.0
        assert slide.associated_images == ["thumbnail", "label", "macro"]


def test_cmu_pixels_match_tifffile(cmu_slide_path: Path) -> None:
    assert_levels_match_pages(cmu_slide_path)


def test_cmu_associated_images_match_tifffile(cmu_slide_path: Path) -> None:
    with tifffile.TiffFile(cmu_slide_path) as tif, open_slide(cmu_slide_path) as slide:
        by_name = {series.name.lower(): series for series in tif.series[1:]}
        for name in slide.associated_images:
            np.testing.assert_array_equal(slide.read_associated(name), by_name[name].asarray())
        with pytest.raises(SlideError, match="no associated image named 'overview'"):
            slide.read_associated("overview")


def test_tcga_jpeg2000_two_levels(tcga_slide_path: Path) -> None:
    with tifffile.TiffFile(tcga_slide_path) as tif:
        # Aperio's JPEG 2000 codes: 33003 (YCbCr) and 33005 (RGB); this file uses 33005.
        assert tif.pages[0].tags["Compression"].value in (33003, 33005)
    with open_slide(tcga_slide_path) as slide:
        assert slide.format == "aperio"
        assert [level.shape for level in slide.levels] == [(3567, 4443, 3), (1783, 2221, 3)]
        assert slide.levels[1].downsample == pytest.approx((4443 / 2221 + 3567 / 1783) / 2)
        assert slide.levels[1].array.chunksize == (256, 256, 3)
        assert slide.mpp is None
        assert slide.objective_power is None
        assert slide.associated_images == ["thumbnail"]


def test_tcga_pixels_match_tifffile(tcga_slide_path: Path) -> None:
    assert_levels_match_pages(tcga_slide_path)


def test_mpp_override_wins(cmu_slide_path: Path, tcga_slide_path: Path) -> None:
    with open_slide(tcga_slide_path, mpp=0.25) as slide:
        assert slide.mpp == 0.25
        assert slide.level_mpp(1) == pytest.approx(0.25 * slide.levels[1].downsample)
    with open_slide(cmu_slide_path, mpp=0.3) as slide:
        assert slide.mpp == 0.3


def test_invalid_mpp_override_rejected(cmu_slide_path: Path) -> None:
    for bad in (0.0, -0.5, float("nan")):
        with pytest.raises(SlideError, match="mpp must be a positive number"):
            open_slide(cmu_slide_path, mpp=bad)


# -- pyramids built from real pixels ----------------------------------------------------------------


def test_ome_subifd_pyramid(tmp_path: Path, real_pixels: np.ndarray) -> None:
    path = tmp_path / "pyramid.ome.tif"
    metadata = {
        "PhysicalSizeX": 0.25,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": 0.25,
        "PhysicalSizeYUnit": "µm",
    }
    with tifffile.TiffWriter(path) as writer:
        writer.write(
            real_pixels, tile=(128, 128), photometric="rgb", compression="zlib", subifds=2, metadata=metadata
        )
        for factor in (2, 4):
            writer.write(
                reduce(real_pixels, factor),
                tile=(128, 128),
                photometric="rgb",
                compression="zlib",
                subfiletype=1,
            )

    with open_slide(path) as slide:
        assert slide.format == "ome-tiff"
        assert [level.shape for level in slide.levels] == [(600, 900, 3), (300, 450, 3), (150, 225, 3)]
        assert [level.downsample for level in slide.levels] == [1.0, 2.0, 4.0]
        assert slide.mpp == pytest.approx(0.25)
    assert_levels_match_pages(path)


def test_ome_units_and_objective(tmp_path: Path, real_pixels: np.ndarray) -> None:
    ome_xml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
        '<Instrument ID="Instrument:0"><Objective ID="Objective:0" NominalMagnification="40"/></Instrument>'
        '<Image ID="Image:0" Name="slide"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" '
        'SizeX="900" SizeY="600" SizeC="3" SizeZ="1" SizeT="1" Interleaved="true" '
        'PhysicalSizeX="250" PhysicalSizeXUnit="nm" PhysicalSizeY="0.00026" PhysicalSizeYUnit="mm">'
        '<Channel ID="Channel:0:0" SamplesPerPixel="3"/><TiffData IFD="0" PlaneCount="1"/></Pixels></Image></OME>'
    )
    path = tmp_path / "units.ome.tif"
    tifffile.imwrite(
        path, real_pixels, tile=(128, 128), photometric="rgb", description=ome_xml, metadata=None
    )
    with open_slide(path) as slide:
        assert slide.format == "ome-tiff"
        assert slide.mpp == pytest.approx((0.25 + 0.26) / 2)
        assert slide.objective_power == 40.0


@pytest.mark.parametrize("factor", [3, 5])
def test_separate_page_pyramid_any_downsample(tmp_path: Path, real_pixels: np.ndarray, factor: int) -> None:
    # tifffile groups separate pages into a pyramid only for downsamples 2, 3 and 4; 5 is grouped here.
    path = tmp_path / f"pyramid-{factor}.tif"
    reduced = reduce(real_pixels, factor)
    with tifffile.TiffWriter(path) as writer:
        writer.write(real_pixels, tile=(128, 128), photometric="rgb", metadata=None)
        writer.write(reduced, tile=(64, 64), photometric="rgb", subfiletype=1, metadata=None)
        writer.write(real_pixels[:90, :70], photometric="rgb", description="label", metadata=None)

    with open_slide(path) as slide:
        assert slide.format == "generic-tiff"
        assert len(slide.levels) == 2
        height, width, _ = reduced.shape
        assert slide.levels[1].downsample == pytest.approx((900 / width + 600 / height) / 2)
        assert slide.levels[1].array.chunksize == (64, 64, 3)
        np.testing.assert_array_equal(slide.levels[0].array.compute(), real_pixels)
        np.testing.assert_array_equal(slide.levels[1].array.compute(), reduced)
        assert slide.associated_images == ["label"]
        np.testing.assert_array_equal(slide.read_associated("label"), real_pixels[:90, :70])


def test_tifffile_series_with_levels(tmp_path: Path, real_pixels: np.ndarray) -> None:
    # tifffile's own pyramid layout: level 0 in the main IFD, reduced levels in its SubIFDs.
    path = tmp_path / "series-levels.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(real_pixels, tile=(128, 128), photometric="rgb", subifds=1)
        writer.write(reduce(real_pixels, 3), tile=(128, 128), photometric="rgb", subfiletype=1)
    with open_slide(path) as slide:
        assert [level.shape for level in slide.levels] == [(600, 900, 3), (200, 300, 3)]
        assert slide.levels[1].downsample == 3.0
    assert_levels_match_pages(path)


def test_ndpi_tags(tmp_path: Path, real_pixels: np.ndarray) -> None:
    path = tmp_path / "scan-ndpi.tif"
    with tifffile.TiffWriter(path) as writer:
        for factor in (1, 2, 4):
            writer.write(
                reduce(real_pixels, factor) if factor > 1 else real_pixels,
                tile=(128, 128),
                photometric="rgb",
                compression="jpeg",
                resolution=(40_000 / factor, 40_000 / factor),
                resolutionunit="CENTIMETER",
                metadata=None,
                extratags=[*NDPI_TAGS, (65421, "f", 1, 20.0 / factor, True)],
            )
        # The macro photograph: Magnification -1, the size of a level would be a pyramid step.
        writer.write(
            reduce(real_pixels, 8),
            photometric="rgb",
            compression="jpeg",
            metadata=None,
            extratags=[*NDPI_TAGS, (65421, "f", 1, -1.0, True)],
        )
    with open_slide(path) as slide:
        assert slide.format == "hamamatsu"
        assert len(slide.levels) == 3
        assert slide.mpp == pytest.approx(0.25)
        assert slide.objective_power == 20.0
        assert slide.associated_images == ["macro"]
    with tifffile.TiffFile(path) as tif, open_slide(path) as slide:
        for level, page in zip(slide.levels, tif.pages[:3], strict=True):
            np.testing.assert_array_equal(level.array.compute(), page.asarray())


def philips_description(spacings_mm: list[float]) -> str:
    representations = "".join(
        '<DataObject ObjectType="PixelDataRepresentation">'
        f'<Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">'
        f'"{spacing}" "{spacing}"</Attribute></DataObject>'
        for spacing in spacings_mm
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" ?>\n<DataObject ObjectType="DPUfsImport">'
        '<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" PMSVR="IDataObjectArray">'
        '<Array><DataObject ObjectType="DPScannedImage">'
        '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" Group="0x1001" Element="0x8B01" '
        f'PMSVR="IDataObjectArray"><Array>{representations}</Array></Attribute>'
        "</DataObject></Array></Attribute></DataObject>"
    )


def test_philips_tiff(tmp_path: Path, real_pixels: np.ndarray) -> None:
    path = tmp_path / "philips.tiff"
    with tifffile.TiffWriter(path) as writer:
        writer.write(
            real_pixels,
            tile=(128, 128),
            photometric="rgb",
            compression="jpeg",
            software="Philips DP v1.0",
            description=philips_description([0.00025, 0.0005]),
            metadata=None,
        )
        writer.write(
            reduce(real_pixels, 2), tile=(128, 128), photometric="rgb", compression="jpeg", metadata=None
        )
        writer.write(real_pixels[:80, :120], photometric="rgb", description="Macro", metadata=None)
        writer.write(real_pixels[:60, :60], photometric="rgb", description="Label", metadata=None)
    with open_slide(path) as slide:
        assert slide.format == "philips"
        assert [level.shape for level in slide.levels] == [(600, 900, 3), (300, 450, 3)]
        assert slide.mpp == pytest.approx(0.25)
        assert slide.objective_power is None
        assert sorted(slide.associated_images) == ["label", "macro"]
        np.testing.assert_array_equal(slide.read_associated("label"), real_pixels[:60, :60])


# -- resolution tags --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolution", "unit", "expected_mpp"),
    [
        ((40_000, 40_000), "CENTIMETER", 0.25),
        ((101_600, 101_600), "INCH", 0.25),
        ((20_000, 25_000), "CENTIMETER", (0.5 + 0.4) / 2),
        ((72, 72), "INCH", None),
        ((96, 96), "INCH", None),
        ((40_000, 40_000), "NONE", None),
    ],
)
def test_resolution_tags(
    tmp_path: Path,
    real_pixels: np.ndarray,
    resolution: tuple[int, int],
    unit: str,
    expected_mpp: float | None,
) -> None:
    path = tmp_path / "resolution.tif"
    tifffile.imwrite(
        path,
        real_pixels,
        tile=(128, 128),
        photometric="rgb",
        resolution=resolution,
        resolutionunit=unit,
        metadata=None,
    )
    with open_slide(path) as slide:
        if expected_mpp is None:
            assert slide.mpp is None
        else:
            assert slide.mpp == pytest.approx(expected_mpp)


def test_plain_72_dpi_strip_tiff(tmp_path: Path, real_pixels: np.ndarray) -> None:
    path = tmp_path / "photo.tif"
    tifffile.imwrite(
        path, real_pixels, photometric="rgb", rowsperstrip=50, resolution=(72, 72), metadata=None
    )
    with open_slide(path) as slide:
        assert slide.mpp is None
        assert len(slide.levels) == 1
        # A strip TIFF is chunked by its strips: 50 rows of the full width.
        assert slide.levels[0].array.chunksize == (50, 900, 3)
        np.testing.assert_array_equal(slide.levels[0].array.compute(), real_pixels)


def test_large_untiled_tiff_rejected(tmp_path: Path) -> None:
    side = int(MAX_UNTILED_PIXELS**0.5) + 240
    path = tmp_path / "huge-strips.tif"
    # Written without data, so the strips stay unallocated and the file takes almost no disk.
    tifffile.imwrite(path, shape=(side, side, 3), dtype=np.uint8, photometric="rgb")
    with pytest.raises(SlideError, match="without tiles or a pyramid") as error:
        open_slide(path)
    assert str(path) in str(error.value)


# -- pixel layouts ----------------------------------------------------------------------------------


def test_rgba_composited_over_white(tmp_path: Path, real_pixels: np.ndarray) -> None:
    alpha = np.full((*real_pixels.shape[:2], 1), 255, dtype=np.uint8)
    alpha[:100] = 0
    alpha[100:200] = 128
    rgba = np.concatenate([real_pixels, alpha], axis=-1)
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, tile=(128, 128), photometric="rgb", extrasamples="unassalpha", metadata=None)

    with open_slide(path) as slide:
        assert slide.levels[0].shape == (600, 900, 3)
        pixels = slide.levels[0].array.compute()
    assert pixels.shape == (600, 900, 3)
    np.testing.assert_array_equal(pixels[:100], 255)
    np.testing.assert_array_equal(pixels[200:], real_pixels[200:])
    half = real_pixels[100:200].astype(np.float64) * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.abs(pixels[100:200] - half).max() <= 0.5 + 1e-9
    np.testing.assert_array_equal(composite_over_white(rgba), pixels)


@pytest.mark.parametrize(
    ("pixels", "photometric", "message"),
    [
        (np.zeros((300, 300, 3), dtype=np.uint16), "rgb", "16-bit samples"),
        (np.zeros((300, 300), dtype=np.uint8), "minisblack", "grayscale"),
        (np.zeros((3, 300, 300), dtype=np.uint8), "rgb", "not interleaved RGB"),
        (np.zeros((300, 300, 4), dtype=np.uint8), "separated", "colour space is not RGB"),
    ],
)
def test_unsupported_pixels_explained(
    tmp_path: Path, pixels: np.ndarray, photometric: str, message: str
) -> None:
    path = tmp_path / "unsupported.tif"
    tifffile.imwrite(path, pixels, tile=(128, 128), photometric=photometric, metadata=None)
    with pytest.raises(SlideError, match=message) as error:
        open_slide(path)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


# -- bad files --------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "absent.svs")


def test_directory_rejected(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="not a file"):
        open_slide(tmp_path)


@pytest.mark.parametrize("content", [b"", b"# a README, not a slide\n", b"\x89PNG\r\n\x1a\n" + bytes(64)])
def test_non_tiff_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.svs"
    path.write_bytes(content)
    with pytest.raises(SlideError, match="not a readable TIFF whole-slide image") as error:
        open_slide(path)
    assert str(path) in str(error.value)


def test_truncated_file(tmp_path: Path, cmu_slide_path: Path) -> None:
    data = cmu_slide_path.read_bytes()
    path = tmp_path / "cut.svs"
    # Keep the header and IFDs but lose the end of the tile data.
    with tifffile.TiffFile(cmu_slide_path) as tif:
        last_tile_end = max(
            o + c for o, c in zip(tif.pages[0].dataoffsets, tif.pages[0].databytecounts, strict=True)
        )
    path.write_bytes(data[: last_tile_end - 5000])
    with pytest.raises(SlideError, match="truncated") as error:
        open_slide(path)
    assert str(path) in str(error.value)


def test_file_cut_before_ifds(tmp_path: Path, cmu_slide_path: Path) -> None:
    path = tmp_path / "header-only.svs"
    path.write_bytes(cmu_slide_path.read_bytes()[:6])
    with pytest.raises(SlideError, match=str(path.name)):
        open_slide(path)


def test_file_cut_before_first_ifd(
    tmp_path: Path, cmu_slide_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The CMU slide's first IFD follows its tile data, so a cut at 500 kB loses every IFD.
    path = tmp_path / "no-ifd.svs"
    path.write_bytes(cmu_slide_path.read_bytes()[:500_000])
    with caplog.at_level(logging.WARNING), pytest.raises(SlideError, match="truncated or corrupt"):
        open_slide(path)
    # tifffile's own warning is demoted to a debug message, so the error stays the only output.
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []


def test_corrupt_tile_raises_slide_error(tmp_path: Path, real_pixels: np.ndarray) -> None:
    path = tmp_path / "corrupt.tif"
    tifffile.imwrite(path, real_pixels, tile=(128, 128), photometric="rgb", compression="jpeg", metadata=None)
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + 400] = bytes(range(256)) + bytes(144)
    path.write_bytes(bytes(data))

    with open_slide(path) as slide, pytest.raises(SlideError, match="failed to read level 0"):
        slide.read_region(0, 0, 0, 64, 64)


# -- regions, thumbnail, identity, lifetime ---------------------------------------------------------


def test_read_region_matches_page_and_pads_white(tcga_slide_path: Path) -> None:
    with tifffile.TiffFile(tcga_slide_path) as tif:
        level1 = tif.series[0].levels[1].keyframe.asarray()
    with open_slide(tcga_slide_path) as slide:
        downsample = slide.levels[1].downsample
        # Level-1 pixel (500, 300) starts at level-0 pixel ceil(500 * downsample), the first one
        # whose floor(x_level0 / downsample) is 500.
        region = slide.read_region(math.ceil(500 * downsample), math.ceil(300 * downsample), 1, 200, 100)
        np.testing.assert_array_equal(region, level1[300:400, 500:700])

        height, width, _ = slide.levels[1].shape
        x_level0, y_level0 = math.ceil((width - 50) * downsample), math.ceil((height - 30) * downsample)
        corner = slide.read_region(x_level0, y_level0, 1, 100, 80)
        assert corner.shape == (80, 100, 3)
        np.testing.assert_array_equal(corner[30:], 255)
        np.testing.assert_array_equal(corner[:, 50:], 255)
        assert level1[height - 30 :, width - 50 :].min() < 255
        np.testing.assert_array_equal(corner[:30, :50], level1[height - 30 :, width - 50 :])

        above_left = slide.read_region(-math.floor(30 * downsample), -math.floor(20 * downsample), 1, 60, 40)
        np.testing.assert_array_equal(above_left[:20], 255)
        np.testing.assert_array_equal(above_left[:, :30], 255)
        np.testing.assert_array_equal(above_left[20:, 30:], level1[:20, :30])

        with pytest.raises(SlideError, match="level 2 does not exist"):
            slide.read_region(0, 0, 2, 10, 10)


def test_thumbnail_size_and_content(cmu_slide_path: Path) -> None:
    with tifffile.TiffFile(cmu_slide_path) as tif:
        level0 = tif.pages[0].asarray()
    with open_slide(cmu_slide_path) as slide:
        thumbnail = slide.thumbnail(512)
    assert thumbnail.shape == (512, round(2220 * 512 / 2967), 3)
    reference = resize(level0, thumbnail.shape[:2], anti_aliasing=True, preserve_range=True)
    assert np.abs(thumbnail.astype(np.float64) - reference).mean() < 6


def test_identity_stable_across_copies(tmp_path: Path, cmu_slide_path: Path, tcga_slide_path: Path) -> None:
    copy = tmp_path / "renamed.svs"
    shutil.copyfile(cmu_slide_path, copy)
    with (
        open_slide(cmu_slide_path) as original,
        open_slide(copy) as copied,
        open_slide(tcga_slide_path) as other,
    ):
        assert original.identity == copied.identity
        assert original.identity != other.identity
        assert len(original.identity) == 32


def test_file_stays_open_while_array_alive(cmu_slide_path: Path) -> None:
    slide = open_slide(cmu_slide_path)
    filehandle = slide._tif.filehandle
    array = slide.levels[0].array
    del slide
    gc.collect()
    assert not filehandle.closed
    np.testing.assert_array_equal(array[:240, :240].compute().shape, (240, 240, 3))
    del array
    gc.collect()
    assert filehandle.closed


def test_close_is_idempotent_and_final(cmu_slide_path: Path) -> None:
    with open_slide(cmu_slide_path) as slide:
        array = slide.levels[0].array
    assert slide.closed
    slide.close()
    assert slide._tif.filehandle.closed
    with pytest.raises(SlideError, match="was closed"):
        array[:10, :10].compute()
    with pytest.raises(SlideError, match="was closed"):
        slide.read_region(0, 0, 0, 10, 10)
    assert slide._tif.filehandle.closed


def test_resize_rgb_matches_references() -> None:
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    block_mean = image.reshape(32, 2, 48, 2, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_array_equal(resize_rgb(image, 32, 48), np.rint(block_mean))
    upscaled = resize(image, (100, 150), order=1, anti_aliasing=False, preserve_range=True, mode="edge")
    assert np.abs(resize_rgb(image, 100, 150) - upscaled).max() <= 0.5 + 1e-6
    constant = np.full((37, 53, 3), 200, dtype=np.uint8)
    np.testing.assert_array_equal(resize_rgb(constant, 16, 23), 200)
