"""Read tumour annotations: Camelyon ASAP XML, the Camelyon JSON form and QuPath GeoJSON.

All three formats store vertices as level-0 pixel coordinates ``(x, y)``. Every area annotation
becomes a `Polygon` with a label: tumour, excluded (holes cut out of the tumour, such as Camelyon16's
group ``_2``) or other. Points and lines carry no area, so they are skipped with a logged warning.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from .geometry import DEFAULT_SAMPLES_PER_CELL, Polygon, coverage_fraction

logger = logging.getLogger(__name__)

TUMOUR = "tumour"
EXCLUDED = "excluded"
OTHER = "other"

# Class and group names, compared case-insensitively. Camelyon16 XML puts tumour in groups "_0" and
# "_1" and the holes cut out of it in "_2"; Camelyon17 XML uses "Tumor" (or "metastases").
DEFAULT_TUMOUR_CLASSES = frozenset({"tumor", "tumour", "_0", "_1", "metastases", "metastasis"})
DEFAULT_EXCLUDED_CLASSES = frozenset({"_2", "exclusion"})

# Patch labels returned by Annotations.label_grid.
LABEL_NORMAL = 0
LABEL_TUMOUR = 1
LABEL_EXCLUDED = -1

UnclassifiedAs = Literal["tumour", "excluded", "other"]

_AREA_GEOMETRIES = ("Polygon", "MultiPolygon")
_NON_AREA_GEOMETRIES = ("Point", "MultiPoint", "LineString", "MultiLineString")
_QUPATH_NON_ANNOTATION_TYPES = (
    "detection",
    "cell",
    "tile",
    "pathdetectionobject",
    "pathcellobject",
    "pathtileobject",
)


class AnnotationError(ValueError):
    """Invalid or unsupported annotation file."""


@dataclass(frozen=True)
class AnnotatedRegion:
    """One area annotation: its polygon, derived label and the names found in the file."""

    polygon: Polygon
    label: str
    classification: str | None = None
    name: str | None = None


@dataclass
class Annotations:
    """Tumour and excluded areas of one slide, in level-0 pixels.

    Tumour is the union of the tumour polygons minus the union of the excluded polygons, as in
    Camelyon16 where excluded regions are holes cut out of tumour regions.
    """

    regions: list[AnnotatedRegion] = field(default_factory=list)
    source: Path | None = None

    @property
    def tumour(self) -> list[Polygon]:
        """Polygons labelled tumour."""
        return [region.polygon for region in self.regions if region.label == TUMOUR]

    @property
    def excluded(self) -> list[Polygon]:
        """Polygons labelled excluded."""
        return [region.polygon for region in self.regions if region.label == EXCLUDED]

    def coverage_grid(
        self,
        grid_shape: tuple[int, int],
        patch_size_level0: float,
        origin_level0: tuple[float, float] = (0.0, 0.0),
        samples_per_cell: int = DEFAULT_SAMPLES_PER_CELL,
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Measure the tumour and excluded area fraction of each patch cell.

        See `napari_anopilad.io.geometry.coverage_fraction` for the cell placement and the accuracy of
        the sub-cell sampling.

        Returns
        -------
        tumour_fraction, excluded_fraction : numpy.ndarray
            Float32 ``(rows, cols)`` fractions in [0, 1]. Tumour excludes the excluded areas, so the two
            never overlap and their sum is at most 1.
        """
        excluded = self.excluded
        tumour_fraction = coverage_fraction(
            self.tumour, grid_shape, patch_size_level0, origin_level0, samples_per_cell, subtract=excluded
        )
        excluded_fraction = coverage_fraction(
            excluded, grid_shape, patch_size_level0, origin_level0, samples_per_cell
        )
        return tumour_fraction, excluded_fraction

    def label_grid(
        self,
        grid_shape: tuple[int, int],
        patch_size_level0: float,
        min_fraction: float = 0.5,
        max_normal_fraction: float = 0.0,
        origin_level0: tuple[float, float] = (0.0, 0.0),
        samples_per_cell: int = DEFAULT_SAMPLES_PER_CELL,
    ) -> NDArray[np.int8]:
        """Label each patch cell as normal, tumour or excluded.

        A cell is tumour (`LABEL_TUMOUR`) when its tumour fraction is at least ``min_fraction``, normal
        (`LABEL_NORMAL`) when its tumour fraction is at most ``max_normal_fraction`` and its excluded
        fraction is below ``min_fraction``, and excluded (`LABEL_EXCLUDED`) otherwise. The default
        keeps partly tumorous cells out of both classes, so normal patches contain no annotated tumour.

        Returns
        -------
        numpy.ndarray
            Int8 ``(rows, cols)`` labels.
        """
        if not 0.0 <= max_normal_fraction < min_fraction <= 1.0:
            raise ValueError(
                "Label fractions must satisfy 0 <= max_normal_fraction < min_fraction <= 1, got "
                f"max_normal_fraction={max_normal_fraction} and min_fraction={min_fraction}."
            )
        tumour_fraction, excluded_fraction = self.coverage_grid(
            grid_shape, patch_size_level0, origin_level0, samples_per_cell
        )
        labels = np.full(tumour_fraction.shape, LABEL_EXCLUDED, dtype=np.int8)
        normal = (tumour_fraction <= max_normal_fraction) & (excluded_fraction < min_fraction)
        labels[normal] = LABEL_NORMAL
        labels[tumour_fraction >= min_fraction] = LABEL_TUMOUR
        return labels


def _label_for(
    class_names: Iterable[str],
    tumour_classes: frozenset[str],
    excluded_classes: frozenset[str],
    unclassified_as: UnclassifiedAs,
) -> str:
    names = [name.strip().lower() for name in class_names if name and name.strip()]
    names = [name for name in names if name != "none"]
    if not names:
        return unclassified_as
    if any(name in tumour_classes for name in names):
        return TUMOUR
    if any(name in excluded_classes for name in names):
        return EXCLUDED
    return OTHER


def read_annotations(
    path: str | Path,
    tumour_classes: Iterable[str] = DEFAULT_TUMOUR_CLASSES,
    excluded_classes: Iterable[str] = DEFAULT_EXCLUDED_CLASSES,
    unclassified_as: UnclassifiedAs = "tumour",
) -> Annotations:
    """Read an annotation file in any supported format, detected from its content.

    Parameters
    ----------
    path : str or Path
        ASAP XML (Camelyon16 and Camelyon17), Camelyon JSON (``{"positive": [...], "negative": [...]}``,
        where positive is tumour and negative is excluded) or QuPath GeoJSON (a Feature, a
        FeatureCollection or a list of features).
    tumour_classes, excluded_classes : iterable of str
        Group or classification names, compared case-insensitively, that mark tumour and excluded areas.
        A QuPath derived class (``names``, such as ``["Tumor", "Positive"]``) matches when any part matches.
    unclassified_as : {"tumour", "excluded", "other"}
        Label of areas without a class or group (ASAP group ``None``, a QuPath annotation without
        classification). The default treats them as tumour, because tumour annotation files often
        leave the class out.

    Returns
    -------
    Annotations

    Raises
    ------
    AnnotationError
        A ``ValueError`` naming the file and the expected format, when the file is missing, unknown or
        malformed.
    """
    path = Path(path)
    tumour_set = frozenset(name.lower() for name in tumour_classes)
    excluded_set = frozenset(name.lower() for name in excluded_classes)
    if unclassified_as not in (TUMOUR, EXCLUDED, OTHER):
        raise ValueError(f"unclassified_as must be 'tumour', 'excluded' or 'other', got {unclassified_as!r}.")

    try:
        raw = path.read_bytes()
    except OSError as error:
        raise AnnotationError(f"Failed to read annotation file {path}: {error}.") from error

    text = raw.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<"):
        regions = _read_asap_xml(path, raw, tumour_set, excluded_set, unclassified_as)
    elif text.startswith((b"{", b"[")):
        try:
            document = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise AnnotationError(f"Annotation file {path} is not valid JSON: {error}.") from error
        if isinstance(document, dict) and ("positive" in document or "negative" in document):
            regions = _read_camelyon_json(path, document)
        else:
            regions = _read_geojson(path, document, tumour_set, excluded_set, unclassified_as)
    else:
        raise AnnotationError(
            f"Unknown annotation format in {path}: expected ASAP XML, Camelyon JSON or QuPath GeoJSON."
        )
    return Annotations(regions=regions, source=path)


# ASAP XML --------------------------------------------------------------------------------------------


def _parse_coordinate(value: str | None, path: Path, what: str) -> float:
    if value is None:
        raise AnnotationError(f"ASAP annotation file {path}: {what} has no X or Y attribute.")
    text = value.strip()
    # ASAP writes the decimal separator of the user's locale, so "12711,2998" is 12711.2998.
    if "," in text and "." not in text:
        text = text.replace(",", ".")
    try:
        return float(text)
    except ValueError:
        raise AnnotationError(
            f"ASAP annotation file {path}: {what} has the invalid coordinate {value!r}; expected a number."
        ) from None


def _asap_group_names(root: ElementTree.Element) -> dict[str, str]:
    """Map each ASAP group to its parent group, so nested groups inherit the parent's class."""
    parents: dict[str, str] = {}
    for group in root.iter("Group"):
        name = group.get("Name")
        if name is not None:
            parents[name] = group.get("PartOfGroup", "None")
    return parents


def _asap_class_chain(group: str, parents: dict[str, str]) -> list[str]:
    chain = [group]
    while chain[-1] in parents and parents[chain[-1]] not in chain:
        chain.append(parents[chain[-1]])
    return chain


def _read_asap_xml(
    path: Path,
    raw: bytes,
    tumour_classes: frozenset[str],
    excluded_classes: frozenset[str],
    unclassified_as: UnclassifiedAs,
) -> list[AnnotatedRegion]:
    # Python's expat (2.4.1 and later) limits entity expansion, which guards against entity bombs.
    try:
        root = ElementTree.fromstring(raw)
    except ElementTree.ParseError as error:
        raise AnnotationError(f"Annotation file {path} is not well-formed XML: {error}.") from error
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(
            f"XML annotation file {path} has root element <{root.tag}>; expected <ASAP_Annotations>."
        )

    parents = _asap_group_names(root)
    regions: list[AnnotatedRegion] = []
    for index, annotation in enumerate(root.iter("Annotation")):
        name = annotation.get("Name") or f"Annotation {index}"
        kind = annotation.get("Type", "Polygon")
        group = annotation.get("PartOfGroup", "None")
        what = f"annotation {name!r}"
        if kind in ("Dot", "PointSet", "Measurement"):
            logger.warning("Skipping %s of type %s in %s: it has no area.", what, kind, path)
            continue
        if kind not in ("Polygon", "Spline", "Rectangle"):
            logger.warning("Skipping %s of unknown type %s in %s.", what, kind, path)
            continue

        coordinates = list(annotation.iter("Coordinate"))
        try:
            coordinates.sort(key=lambda element: int(element.get("Order", "0")))
        except ValueError:
            logger.warning(
                "Keeping the file order of the vertices of %s in %s: an Order is not an integer.", what, path
            )
        vertices = [
            (_parse_coordinate(c.get("X"), path, what), _parse_coordinate(c.get("Y"), path, what))
            for c in coordinates
        ]
        if len(vertices) < 3:
            logger.warning("Skipping %s in %s: it has %d vertices, fewer than 3.", what, path, len(vertices))
            continue
        # NOTE: a Spline is read as the polygon through its control points, not ASAP's smoothed curve.
        label = _label_for(
            _asap_class_chain(group, parents), tumour_classes, excluded_classes, unclassified_as
        )
        regions.append(AnnotatedRegion(Polygon(np.array(vertices)), label, classification=group, name=name))
    return regions


# Camelyon JSON -----------------------------------------------------------------------------------------


def _read_camelyon_json(path: Path, document: dict[str, Any]) -> list[AnnotatedRegion]:
    regions: list[AnnotatedRegion] = []
    for key, label in (("positive", TUMOUR), ("negative", EXCLUDED)):
        entries = document.get(key, [])
        if not isinstance(entries, list):
            raise AnnotationError(
                f"Camelyon JSON file {path}: '{key}' must be a list of {{'name', 'vertices'}} objects."
            )
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or "vertices" not in entry:
                raise AnnotationError(
                    f"Camelyon JSON file {path}: entry {index} of '{key}' has no 'vertices' list of [x, y]."
                )
            name = entry.get("name")
            try:
                polygon = Polygon(np.asarray(entry["vertices"], dtype=np.float64))
            except (TypeError, ValueError) as error:
                raise AnnotationError(
                    f"Camelyon JSON file {path}: entry {index} ({name!r}) of '{key}' is not a polygon: {error}"
                ) from error
            regions.append(AnnotatedRegion(polygon, label, classification=key, name=name))
    return regions


# QuPath GeoJSON -------------------------------------------------------------------------------------


def _iter_features(path: Path, document: Any) -> Iterator[dict[str, Any]]:
    if isinstance(document, list):
        for item in document:
            yield from _iter_features(path, item)
        return
    if not isinstance(document, dict) or "type" not in document:
        raise AnnotationError(
            f"GeoJSON file {path} contains {type(document).__name__} where a Feature or "
            "FeatureCollection object with a 'type' was expected."
        )
    kind = document["type"]
    if kind == "FeatureCollection":
        features = document.get("features")
        if not isinstance(features, list):
            raise AnnotationError(f"GeoJSON file {path}: a FeatureCollection needs a 'features' list.")
        yield from _iter_features(path, features)
    elif kind == "Feature":
        yield document
    elif kind in (*_AREA_GEOMETRIES, *_NON_AREA_GEOMETRIES, "GeometryCollection"):
        # A bare geometry is read as an unclassified feature.
        yield {"type": "Feature", "geometry": document, "properties": {}}
    else:
        raise AnnotationError(f"GeoJSON file {path} has an object of unknown type {kind!r}.")


def _classification_names(properties: dict[str, Any]) -> list[str]:
    classification = properties.get("classification")
    if classification is None:
        return []
    if isinstance(classification, str):
        return [classification]
    if isinstance(classification, dict):
        if isinstance(classification.get("names"), list):
            return [str(name) for name in classification["names"]]
        if classification.get("name") is not None:
            return [str(classification["name"])]
    return []


def _is_annotation_object(feature: dict[str, Any], properties: dict[str, Any]) -> bool:
    # QuPath 0.3 and later write properties.objectType; older versions write the class in the feature id.
    object_type = properties.get("objectType")
    if object_type is None and isinstance(feature.get("id"), str) and feature["id"].startswith("Path"):
        object_type = feature["id"]
    return object_type is None or str(object_type).lower() not in _QUPATH_NON_ANNOTATION_TYPES


def _geometry_polygons(path: Path, geometry: Any, what: str) -> list[Polygon]:
    if not isinstance(geometry, dict) or "type" not in geometry:
        raise AnnotationError(f"GeoJSON file {path}: {what} has no geometry object with a 'type'.")
    kind = geometry["type"]
    if kind == "GeometryCollection":
        return [
            polygon
            for part in geometry.get("geometries", [])
            for polygon in _geometry_polygons(path, part, what)
        ]
    if kind in _NON_AREA_GEOMETRIES:
        logger.warning("Skipping %s in %s: its geometry is a %s, which has no area.", what, path, kind)
        return []
    if kind not in _AREA_GEOMETRIES:
        raise AnnotationError(f"GeoJSON file {path}: {what} has the unknown geometry type {kind!r}.")

    coordinates = geometry.get("coordinates")
    if not isinstance(coordinates, list):
        raise AnnotationError(f"GeoJSON file {path}: {what} has a {kind} without a 'coordinates' list.")
    polygons_rings = [coordinates] if kind == "Polygon" else coordinates
    polygons: list[Polygon] = []
    try:
        for rings in polygons_rings:
            if not rings:
                continue
            polygons.append(Polygon(np.asarray(rings[0], dtype=np.float64), tuple(rings[1:])))
    except (TypeError, ValueError, IndexError) as error:
        raise AnnotationError(
            f"GeoJSON file {path}: {what} has an invalid {kind}: {error}. Expected rings of [x, y] pairs."
        ) from error
    return polygons


def _read_geojson(
    path: Path,
    document: Any,
    tumour_classes: frozenset[str],
    excluded_classes: frozenset[str],
    unclassified_as: UnclassifiedAs,
) -> list[AnnotatedRegion]:
    regions: list[AnnotatedRegion] = []
    skipped_objects = 0
    for index, feature in enumerate(_iter_features(path, document)):
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise AnnotationError(
                f"GeoJSON file {path}: feature {index} has 'properties' that is not an object."
            )
        if not _is_annotation_object(feature, properties):
            skipped_objects += 1
            continue

        name = properties.get("name")
        what = f"feature {index}" + (f" ({name!r})" if name else "")
        class_names = _classification_names(properties)
        label = _label_for(class_names, tumour_classes, excluded_classes, unclassified_as)
        classification = ": ".join(class_names) if class_names else None
        for polygon in _geometry_polygons(path, feature.get("geometry"), what):
            regions.append(AnnotatedRegion(polygon, label, classification=classification, name=name))

    if skipped_objects:
        logger.info("Skipped %d detection, cell or tile objects in %s.", skipped_objects, path)
    return regions
