"""Placement of the patch-grid layers over a slide layer, and the cells in view.

The slide layer's world frame is level-0 pixels with the centre of level-0 pixel ``(y, x)`` at world
``(y, x)`` (napari places pixel centres at integer data coordinates), so pixel ``(y, x)`` covers world
``[y - 0.5, y + 0.5) x [x - 0.5, x + 0.5)``. Grid cell ``(row, col)`` covers level-0 pixels
``[row * P, (row + 1) * P) x [col * P, (col + 1) * P)``, that is world
``[row * P - 0.5, (row + 1) * P - 0.5)`` along y and likewise along x. A grid layer with one data pixel
per cell and scale ``P`` puts the centre of cell ``row`` at ``row * P + translate``, with its edges half a
cell either side. Solving ``row * P + translate - P / 2 = row * P - 0.5`` gives
``translate = P / 2 - 0.5``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

# Colour limits of the z-score heatmap: symmetric about 0, so the colormap's neutral middle is z = 0.
Z_CONTRAST_LIMITS = (-4.0, 4.0)
HEATMAP_COLORMAP = "coolwarm"
HEATMAP_OPACITY = 0.6
# The triage map uses another colormap than the AnoPILaD z-score, so the two layers are told apart at a glance.
TRIAGE_COLORMAP = "magma"


def grid_layer_transform(patch_size_level0: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Return the ``(scale, translate)`` of a layer with one data pixel per grid cell.

    Parameters
    ----------
    patch_size_level0 : float
        ``P``, the grid's patch size in level-0 pixels.

    Returns
    -------
    scale, translate : tuple of float
        ``(P, P)`` and ``(P / 2 - 0.5, P / 2 - 0.5)`` in level-0 pixel world coordinates.
    """
    size = float(patch_size_level0)
    if not size > 0:
        raise ValueError(f"patch_size_level0 must be positive, got {patch_size_level0!r}")
    offset = size / 2 - 0.5
    return (size, size), (offset, offset)


def show_triage_layer(
    viewer: Any,
    name: str,
    eroded: NDArray[np.floating],
    patch_size_level0: float,
    metadata: dict[str, Any] | None = None,
) -> Any:
    """Show a triage map (one data pixel per grid cell) as the layer ``name``, replacing its data if it exists.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer with the slide layer (world frame: level-0 pixels).
    name : str
        Layer name, for example ``"<slide> triage"``.
    eroded : ndarray, shape (rows, cols)
        Eroded triage z-scores, NaN where no patch was scored.
    patch_size_level0 : float
        ``P``, the grid's patch size in level-0 pixels.
    metadata : dict, optional
        Stored under the plugin's metadata key of the layer.
    """
    from napari_anopilad._reader import METADATA_KEY

    data = np.asarray(eroded, dtype=np.float32)
    scale, translate = grid_layer_transform(patch_size_level0)
    layer_metadata = {METADATA_KEY: dict(metadata or {})}
    if name in viewer.layers:
        layer = viewer.layers[name]
        if layer.data.shape == data.shape:
            layer.data = data
            layer.metadata = layer_metadata
            return layer
        viewer.layers.remove(name)
    return viewer.add_image(
        data,
        name=name,
        scale=scale,
        translate=translate,
        colormap=TRIAGE_COLORMAP,
        contrast_limits=Z_CONTRAST_LIMITS,
        opacity=HEATMAP_OPACITY,
        blending="translucent",
        interpolation2d="nearest",
        metadata=layer_metadata,
    )


def world_to_cell(
    world_yx: tuple[float, float] | NDArray[np.floating],
    patch_size_level0: float,
    grid_shape: tuple[int, int],
) -> tuple[int, int] | None:
    """Return the grid cell ``(row, col)`` under a world position, or None outside the grid.

    Parameters
    ----------
    world_yx : pair of float
        World position ``(y, x)`` in level-0 pixels (the last two axes of a napari world position).
    patch_size_level0 : float
        ``P`` in level-0 pixels.
    grid_shape : tuple of int
        ``(rows, cols)`` of the grid.
    """
    y_world, x_world = (float(value) for value in np.asarray(world_yx, dtype=np.float64)[-2:])
    # World y covers level-0 pixel floor(y + 0.5); see the module docstring.
    y_level0 = np.floor(y_world + 0.5)
    x_level0 = np.floor(x_world + 0.5)
    row = int(y_level0 // patch_size_level0)
    col = int(x_level0 // patch_size_level0)
    if not (0 <= row < grid_shape[0] and 0 <= col < grid_shape[1]):
        return None
    return row, col


def cells_in_box(
    box_level0: tuple[float, float, float, float],
    patch_size_level0: float,
    grid_shape: tuple[int, int],
    candidates: NDArray[np.integer] | None = None,
) -> NDArray[np.int64]:
    """Return the cells that overlap a level-0 box, nearest to its centre first.

    Parameters
    ----------
    box_level0 : tuple of float
        ``(y_min, x_min, y_max, x_max)`` in level-0 pixels, the max edges exclusive.
    patch_size_level0 : float
        ``P`` in level-0 pixels.
    grid_shape : tuple of int
        ``(rows, cols)`` of the grid.
    candidates : ndarray, shape (n, 2), optional
        Restrict the answer to these cells (for example the tissue cells).

    Returns
    -------
    ndarray of int64, shape (m, 2)
        ``(row, col)`` ordered by the distance of the cell centre from the box centre.
    """
    y_min, x_min, y_max, x_max = (float(value) for value in box_level0)
    size = float(patch_size_level0)
    row_start = max(int(np.floor(y_min / size)), 0)
    col_start = max(int(np.floor(x_min / size)), 0)
    row_stop = min(int(np.ceil(y_max / size)), int(grid_shape[0]))
    col_stop = min(int(np.ceil(x_max / size)), int(grid_shape[1]))
    if row_stop <= row_start or col_stop <= col_start:
        return np.zeros((0, 2), dtype=np.int64)

    if candidates is None:
        rows, cols = np.mgrid[row_start:row_stop, col_start:col_stop]
        cells = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.int64)
    else:
        cells = np.asarray(candidates, dtype=np.int64).reshape(-1, 2)
        inside = (
            (cells[:, 0] >= row_start)
            & (cells[:, 0] < row_stop)
            & (cells[:, 1] >= col_start)
            & (cells[:, 1] < col_stop)
        )
        cells = cells[inside]

    centre_y_level0 = (y_min + y_max) / 2
    centre_x_level0 = (x_min + x_max) / 2
    distance = np.hypot(
        (cells[:, 0] + 0.5) * size - centre_y_level0, (cells[:, 1] + 0.5) * size - centre_x_level0
    )
    return cells[np.argsort(distance, kind="stable")]


def visible_box_level0(viewer: Any, slide_shape_level0: tuple[int, int]) -> tuple[float, float, float, float]:
    """Return the part of the slide in view as ``(y_min, x_min, y_max, x_max)`` level-0 pixels.

    Computed from the camera (centre in world coordinates, zoom in screen pixels per world unit) and the
    canvas size, clipped to the slide. The world frame must be level-0 pixels (the reader's frame).
    The layer's ``corner_pixels`` are no substitute: for a pyramid napari widens them to whole chunks
    and keeps them while the view zooms in.
    """
    canvas_height, canvas_width = _canvas_size(viewer)
    camera = viewer_camera(viewer)
    zoom = float(camera.zoom)
    centre_y_world, centre_x_world = (float(value) for value in camera.center[-2:])
    half_height_world = canvas_height / zoom / 2
    half_width_world = canvas_width / zoom / 2

    # World y is the centre of level-0 pixel y, so pixel edges lie half a pixel further.
    y_min_level0 = max(centre_y_world - half_height_world + 0.5, 0.0)
    x_min_level0 = max(centre_x_world - half_width_world + 0.5, 0.0)
    y_max_level0 = min(centre_y_world + half_height_world + 0.5, float(slide_shape_level0[0]))
    x_max_level0 = min(centre_x_world + half_width_world + 0.5, float(slide_shape_level0[1]))
    return (y_min_level0, x_min_level0, y_max_level0, x_max_level0)


def viewer_camera(viewer: Any) -> Any:
    """Return the viewer's camera: ``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def _canvas_size(viewer: Any) -> tuple[float, float]:
    """Return the canvas ``(height, width)`` in screen pixels."""
    # NOTE: napari 0.9 has no public accessor for the canvas size; the Qt viewer's canvas is the source.
    canvas = viewer.window._qt_viewer.canvas
    height, width = canvas.size
    return float(height), float(width)
