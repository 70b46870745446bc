"""Anomaly regions: trace a patch-grid mask into polygons and write them as QuPath GeoJSON.

Connectivity rule: a region is a 4-connected component of the mask, so two cells that touch only at
a corner belong to different regions (two polygons that share one vertex). Inside one region, where
the boundary meets itself at a corner (two diagonal cells of the region with the other two cells
empty), the two region cells are joined and the empty cells stay apart. A hole can therefore touch
the exterior or another hole at a single vertex, which the OGC simple-features model (and so QuPath,
through JTS) accepts as a valid polygon.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from napari_anopilad.io.atomic import atomic_output

from .geometry import Polygon, signed_ring_area

_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)

DEFAULT_CLASSIFICATION = "Anomaly"
DEFAULT_COLOR = (220, 40, 40)

Vertex = tuple[int, int]


def _boundary_edges(cells: NDArray[np.bool_]) -> list[tuple[Vertex, Vertex, Vertex]]:
    """List the directed boundary edges ``(start, end, cell)`` of a padded mask.

    Vertices are grid corners ``(x, y)`` = ``(col, row)``. Each edge keeps its cell on the same side,
    so exteriors run with negative signed area and holes with positive signed area in image
    coordinates.
    """
    edges: list[tuple[Vertex, Vertex, Vertex]] = []
    above = np.zeros_like(cells)
    above[1:] = cells[:-1]
    below = np.zeros_like(cells)
    below[:-1] = cells[1:]
    left = np.zeros_like(cells)
    left[:, 1:] = cells[:, :-1]
    right = np.zeros_like(cells)
    right[:, :-1] = cells[:, 1:]

    for row, col in zip(*np.nonzero(cells & ~above)):
        edges.append(((col + 1, row), (col, row), (col, row)))
    for row, col in zip(*np.nonzero(cells & ~left)):
        edges.append(((col, row), (col, row + 1), (col, row)))
    for row, col in zip(*np.nonzero(cells & ~below)):
        edges.append(((col, row + 1), (col + 1, row + 1), (col, row)))
    for row, col in zip(*np.nonzero(cells & ~right)):
        edges.append(((col + 1, row + 1), (col + 1, row), (col, row)))
    return [((int(a[0]), int(a[1])), (int(b[0]), int(b[1])), (int(c[0]), int(c[1]))) for a, b, c in edges]


def _drop_collinear(ring: list[Vertex]) -> list[Vertex]:
    kept = []
    count = len(ring)
    for index in range(count):
        previous, current, following = ring[index - 1], ring[index], ring[(index + 1) % count]
        cross = (current[0] - previous[0]) * (following[1] - current[1]) - (current[1] - previous[1]) * (
            following[0] - current[0]
        )
        if cross != 0:
            kept.append(current)
    return kept


def _trace_rings(cells: NDArray[np.bool_]) -> list[list[Vertex]]:
    """Link the boundary edges of one component into closed rings."""
    edges = _boundary_edges(cells)
    outgoing: dict[Vertex, list[int]] = {}
    for index, (start, _, _) in enumerate(edges):
        outgoing.setdefault(start, []).append(index)

    used = [False] * len(edges)
    rings: list[list[Vertex]] = []
    for first in range(len(edges)):
        if used[first]:
            continue
        ring: list[Vertex] = []
        index = first
        while not used[index]:
            used[index] = True
            _, end, cell = edges[index]
            ring.append(edges[index][0])
            # Two outgoing edges mean a corner where diagonal cells meet. Continuing on the other
            # cell's edge joins the two cells, as the connectivity rule requires. The choice must
            # ignore which edges are used, or a ring would run on into its neighbour's edges.
            candidates = outgoing[end]
            index = next((i for i in candidates if edges[i][2] != cell), candidates[0])
        rings.append(_drop_collinear(ring))
    return rings


def mask_to_polygons(
    mask: ArrayLike,
    patch_size_level0: float,
    origin_level0: tuple[float, float] = (0.0, 0.0),
) -> list[Polygon]:
    """Trace the True cells of a patch-grid mask into polygons in level-0 pixels.

    The polygons cover exactly the union of the True cells' squares: one polygon per 4-connected
    component, with one hole ring per enclosed group of False cells. Vertices lie on cell corners and
    collinear vertices are dropped. Exterior rings have negative signed area in image coordinates
    (counter-clockwise on screen, y down) and holes positive, as QuPath exports them.

    NOTE: read with y pointing up, as RFC 7946 does, exteriors are clockwise, the opposite of its
    right-hand rule. RFC 7946 tells parsers not to reject such polygons, and QuPath accepts them.

    Parameters
    ----------
    mask : array_like of bool
        ``(rows, cols)`` anomaly mask on the patch grid.
    patch_size_level0 : float
        Cell side in level-0 pixels.
    origin_level0 : tuple of float
        Level-0 ``(x, y)`` of the top-left corner of cell ``(0, 0)``.

    Returns
    -------
    list of Polygon
        Ordered by the first cell of each component in row-major order.
    """
    cells = np.asarray(mask, dtype=bool)
    if cells.ndim != 2:
        raise ValueError(f"Mask must be 2-D (rows, cols), got shape {cells.shape}.")
    if not patch_size_level0 > 0:
        raise ValueError(f"Patch size must be positive (level-0 pixels), got {patch_size_level0}.")

    labels, _ = ndimage.label(cells, structure=_FOUR_CONNECTED)
    x_origin, y_origin = float(origin_level0[0]), float(origin_level0[1])
    polygons: list[Polygon] = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        component = np.pad(labels[box] == label, 1)
        row_offset, col_offset = box[0].start - 1, box[1].start - 1

        rings = _trace_rings(component)
        exteriors = [ring for ring in rings if signed_ring_area(np.array(ring)) < 0]
        holes = [ring for ring in rings if signed_ring_area(np.array(ring)) > 0]
        if len(exteriors) != 1:
            raise RuntimeError(f"Tracing region {label} gave {len(exteriors)} exterior rings instead of one.")

        def to_level0(
            ring: list[Vertex], rows: int = row_offset, cols: int = col_offset
        ) -> NDArray[np.float64]:
            vertices = np.array(ring, dtype=np.float64)
            vertices[:, 0] = x_origin + (vertices[:, 0] + cols) * patch_size_level0
            vertices[:, 1] = y_origin + (vertices[:, 1] + rows) * patch_size_level0
            return vertices

        polygons.append(Polygon(to_level0(exteriors[0]), tuple(to_level0(hole) for hole in holes)))
    return polygons


def _packed_rgb(color: tuple[int, int, int]) -> int:
    """Pack a colour as QuPath's signed 32-bit ARGB integer with full alpha."""
    red, green, blue = (int(channel) for channel in color)
    return int(np.array((0xFF << 24) | (red << 16) | (green << 8) | blue, dtype=np.uint32).view(np.int32))


def _ring_coordinates(ring: NDArray[np.float64]) -> list[list[float]]:
    closed = np.vstack([ring, ring[:1]])
    return [[float(x), float(y)] for x, y in closed]


def regions_feature_collection(
    polygons: Sequence[Polygon],
    z_max_values: Sequence[float] | None = None,
    mpp: float | None = None,
    classification: str = DEFAULT_CLASSIFICATION,
    color: tuple[int, int, int] = DEFAULT_COLOR,
    name_prefix: str = "Anomaly",
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a GeoJSON FeatureCollection of annotation objects that QuPath imports.

    Each feature carries QuPath's object type twice: as the legacy id ``PathAnnotationObject`` and as
    ``objectType`` ("annotation"). It also has a ``classification`` with a name and colour, and a
    ``name`` with the region's Z_max. ``measurements`` is a list of ``{"name", "value"}`` pairs, the
    form that QuPath 0.2 and 0.3 read and that 0.4 and later still accept (QuPath's
    PathObjectTypeAdapters).

    Parameters
    ----------
    polygons : sequence of Polygon
        Regions in level-0 pixels.
    z_max_values : sequence of float, optional
        Maximum eroded z-score of each region.
    mpp : float, optional
        Level-0 microns per pixel; adds the area in square microns when known.
    classification, color : str, tuple of int
        QuPath class name and its RGB colour.
    name_prefix : str
        Start of each feature's name, followed by its 1-based number.
    properties : dict, optional
        Extra key-value pairs stored under ``properties["metadata"]`` of every feature (strings).
    """
    if z_max_values is not None and len(z_max_values) != len(polygons):
        raise ValueError(f"Got {len(z_max_values)} Z_max values for {len(polygons)} regions.")
    if len(color) != 3 or not all(0 <= int(channel) <= 255 for channel in color):
        raise ValueError(f"Colour must be three integers from 0 to 255, got {color!r}.")

    features = []
    for index, polygon in enumerate(polygons):
        area_level0 = polygon.area_level0
        measurements = [{"name": "Area (level-0 px^2)", "value": area_level0}]
        name = f"{name_prefix} {index + 1}"
        if mpp is not None:
            measurements.append({"name": "Area µm^2", "value": area_level0 * mpp * mpp})
        if z_max_values is not None:
            z_value = float(z_max_values[index])
            measurements.append({"name": "Z_max", "value": z_value})
            name = f"{name} (Z_max {z_value:.2f})"

        feature_properties: dict[str, Any] = {
            "objectType": "annotation",
            "name": name,
            "classification": {
                "name": classification,
                "color": [int(c) for c in color],
                "colorRGB": _packed_rgb(color),
            },
            "isLocked": False,
            "measurements": measurements,
        }
        if properties:
            feature_properties["metadata"] = {str(key): str(value) for key, value in properties.items()}
        features.append(
            {
                "type": "Feature",
                # QuPath 0.2 reads the object type from this id, and 0.4 and later still accept it.
                "id": "PathAnnotationObject",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [_ring_coordinates(ring) for ring in polygon.rings_level0],
                },
                "properties": feature_properties,
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_regions_geojson(
    path: str | Path,
    polygons: Sequence[Polygon],
    z_max_values: Sequence[float] | None = None,
    mpp: float | None = None,
    classification: str = DEFAULT_CLASSIFICATION,
    color: tuple[int, int, int] = DEFAULT_COLOR,
    properties: dict[str, Any] | None = None,
) -> Path:
    """Write anomaly regions as a QuPath GeoJSON FeatureCollection, atomically.

    See `regions_feature_collection` for the layout. Import it in QuPath with File > Import objects
    from file. Returns the written path.
    """
    path = Path(path)
    collection = regions_feature_collection(
        polygons, z_max_values, mpp=mpp, classification=classification, color=color, properties=properties
    )
    with atomic_output(path) as temporary, temporary.open("w", encoding="utf-8") as file:
        json.dump(collection, file, indent=1, ensure_ascii=False)
    return path


def region_z_max(mask: ArrayLike, eroded: ArrayLike) -> list[float]:
    """Compute the maximum eroded z-score of each 4-connected region of a mask.

    The order matches `mask_to_polygons` on the same mask.
    """
    cells = np.asarray(mask, dtype=bool)
    values = np.asarray(eroded, dtype=np.float64)
    if values.shape != cells.shape:
        raise ValueError(f"Mask shape {cells.shape} and heatmap shape {values.shape} differ.")
    labels, count = ndimage.label(cells, structure=_FOUR_CONNECTED)
    if count == 0:
        return []
    maxima = ndimage.maximum(values, labels=labels, index=np.arange(1, count + 1))
    return [float(value) for value in np.atleast_1d(maxima)]
