"""Level-0 microns per pixel and objective power from each format's metadata."""

from __future__ import annotations

import math
from xml.etree import ElementTree

import tifffile

# TIFF ResolutionUnit values (TIFF 6.0): 1 no absolute unit, 2 inch, 3 centimetre.
_MICRONS_PER_RESOLUTION_UNIT = {2: 25_400.0, 3: 10_000.0}

# Screen and print defaults that image software writes when the optics are unknown.
_PLACEHOLDER_DPI = (72.0, 96.0)

# OME-XML length units (OME schema 2016-06, UnitsLength), as microns.
_OME_UNIT_MICRONS = {
    "pm": 1e-6,
    "nm": 1e-3,
    "µm": 1.0,
    "um": 1.0,
    "\u03bcm": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "Å": 1e-4,
    "\u212b": 1e-4,
}


def _positive(value: float | None) -> float | None:
    """Return the value when it is a finite positive number, else None."""
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def mpp_from_resolution_tags(page: tifffile.TiffPage) -> float | None:
    """Read microns per pixel from XResolution, YResolution and ResolutionUnit.

    Returns None when the unit is missing or has no absolute meaning, and when the
    resolution is 72 or 96 pixels per inch, because those are screen defaults and not
    a microscope's sampling.
    """
    unit = page.tags.valueof("ResolutionUnit", 2)
    microns_per_unit = _MICRONS_PER_RESOLUTION_UNIT.get(int(unit))
    if microns_per_unit is None:
        return None

    pixels_per_unit = []
    for name in ("XResolution", "YResolution"):
        rational = page.tags.valueof(name)
        if rational is None:
            return None
        numerator, denominator = rational
        if denominator == 0:
            return None
        pixels_per_unit.append(numerator / denominator)

    pixels_per_inch = [value * 25_400.0 / microns_per_unit for value in pixels_per_unit]
    if any(abs(ppi - placeholder) < 0.5 for ppi in pixels_per_inch for placeholder in _PLACEHOLDER_DPI):
        return None
    if any(value <= 0 for value in pixels_per_unit):
        return None
    return _positive(sum(microns_per_unit / value for value in pixels_per_unit) / 2)


def parse_aperio_description(description: str) -> dict[str, str]:
    """Split an Aperio ImageDescription (``header|Key = value|...``) into its key-value pairs."""
    fields: dict[str, str] = {}
    for part in description.split("|")[1:]:
        key, separator, value = part.partition("=")
        if separator:
            fields[key.strip()] = value.strip()
    return fields


def _float_or_none(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def aperio_resolution(tif: tifffile.TiffFile) -> tuple[float | None, float | None]:
    """Return (mpp, objective power) from the ``MPP`` and ``AppMag`` fields of an SVS description."""
    fields = parse_aperio_description(tif.pages.first.description)
    mpp = _positive(_float_or_none(fields.get("MPP")))
    objective_power = _positive(_float_or_none(fields.get("AppMag")))
    return mpp, objective_power


def _local_name(tag: str) -> str:
    """Return an XML tag without its ``{namespace}`` prefix."""
    return tag.rsplit("}", 1)[-1]


def ome_resolution(tif: tifffile.TiffFile) -> tuple[float | None, float | None]:
    """Return (mpp, objective power) from OME-XML ``PhysicalSizeX/Y`` and ``NominalMagnification``.

    The physical sizes are read from the first image's ``Pixels`` element and converted from
    their ``PhysicalSizeXUnit``/``PhysicalSizeYUnit`` (micrometre when absent, as the OME schema
    defines).
    """
    metadata = tif.ome_metadata
    if not metadata:
        return None, None
    try:
        root = ElementTree.fromstring(metadata)
    except ElementTree.ParseError:
        return None, None

    pixels = next((element for element in root.iter() if _local_name(element.tag) == "Pixels"), None)
    mpp = None
    if pixels is not None:
        sizes = []
        for axis in ("X", "Y"):
            size = _float_or_none(pixels.get(f"PhysicalSize{axis}"))
            unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
            scale = _OME_UNIT_MICRONS.get(unit)
            if size is not None and scale is not None:
                sizes.append(size * scale)
        if sizes:
            mpp = _positive(sum(sizes) / len(sizes))

    objective_power = None
    for element in root.iter():
        if _local_name(element.tag) == "Objective":
            objective_power = _positive(_float_or_none(element.get("NominalMagnification")))
            if objective_power is not None:
                break
    return mpp, objective_power


def ndpi_resolution(tif: tifffile.TiffFile) -> tuple[float | None, float | None]:
    """Return (mpp, objective power) from an NDPI file's resolution tags and Magnification tag."""
    page = tif.pages.first
    tags = page.ndpi_tags or {}
    return mpp_from_resolution_tags(page), _positive(_float_or_none(tags.get("Magnification")))


def philips_resolution(tif: tifffile.TiffFile) -> tuple[float | None, float | None]:
    """Return (mpp, None) from the level-0 ``DICOM_PIXEL_SPACING`` of a Philips TIFF.

    The spacing is in millimetres, row spacing first. The first ``PixelDataRepresentation``
    is level 0, the order tifffile also relies on. Philips TIFF stores no objective power,
    so the second value is always None.
    """
    metadata = tif.philips_metadata
    if not metadata:
        return None, None
    try:
        root = ElementTree.fromstring(metadata)
    except ElementTree.ParseError:
        return None, None
    spacing = root.find(
        ".//DataObject[@ObjectType='PixelDataRepresentation']/Attribute[@Name='DICOM_PIXEL_SPACING']"
    )
    if spacing is None or spacing.text is None:
        return None, None
    values_mm = [_float_or_none(value) for value in spacing.text.replace('"', " ").split()]
    if len(values_mm) != 2 or None in values_mm:
        return None, None
    return _positive(sum(v for v in values_mm if v is not None) / 2 * 1000.0), None


def read_resolution(tif: tifffile.TiffFile, slide_format: str) -> tuple[float | None, float | None]:
    """Return level-0 (mpp, objective power) for a slide of the given format; None where unknown."""
    if slide_format == "aperio":
        mpp, objective_power = aperio_resolution(tif)
    elif slide_format == "ome-tiff":
        mpp, objective_power = ome_resolution(tif)
    elif slide_format == "hamamatsu":
        mpp, objective_power = ndpi_resolution(tif)
    elif slide_format == "philips":
        mpp, objective_power = philips_resolution(tif)
    else:
        mpp, objective_power = None, None

    # Any format may also carry the plain TIFF tags, which count only when the format's own fields are missing.
    if mpp is None:
        mpp = mpp_from_resolution_tags(tif.pages.first)
    return mpp, objective_power
