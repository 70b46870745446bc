"""The napari reader and sample data on the real slides, through npe2 and a real viewer."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile

from napari_anopilad._reader import DASK_CACHE_LIMIT_BYTES, get_reader, slide_layer_name
from napari_anopilad._sample_data import sample_slide_path


def test_get_reader_accepts_cmu_slide(cmu_slide_path: Path) -> None:
    reader = get_reader(str(cmu_slide_path))
    assert callable(reader)

    layers = reader(str(cmu_slide_path))
    assert len(layers) == 1
    data, kwargs, layer_type = layers[0]
    assert layer_type == "image"
    assert kwargs["rgb"] is True
    assert kwargs["multiscale"] is False
    assert isinstance(data, da.Array)
    assert data.shape == (2967, 2220, 3)
    assert kwargs["scale"] == (1.0, 1.0)
    assert kwargs["translate"] == (0.0, 0.0)
    metadata = kwargs["metadata"]["anopilad"]
    assert metadata["mpp"] == pytest.approx(0.499)
    assert metadata["world_unit"] == "level-0 pixel"
    assert Path(metadata["path"]) == cmu_slide_path.resolve()
    assert kwargs["name"] == "CMU-1-Small-Region"


def test_reader_pixels_match_tifffile(cmu_slide_path: Path) -> None:
    reader = get_reader(str(cmu_slide_path))
    assert reader is not None
    data = reader(str(cmu_slide_path))[0][0]

    reference = tifffile.imread(cmu_slide_path, key=0)
    np.testing.assert_array_equal(np.asarray(data[1000:1100, 500:640]), reference[1000:1100, 500:640])


def test_get_reader_pyramid_levels(tcga_slide_path: Path) -> None:
    reader = get_reader([str(tcga_slide_path)])
    assert reader is not None
    data, kwargs, _ = reader([str(tcga_slide_path)])[0]

    assert kwargs["multiscale"] is True
    assert [level.shape for level in data] == [(3567, 4443, 3), (1783, 2221, 3)]
    assert all(isinstance(level, da.Array) for level in data)
    assert kwargs["metadata"]["anopilad"]["mpp"] is None
    assert kwargs["metadata"]["anopilad"]["level_downsamples"][1] == pytest.approx(2.0, abs=0.01)


@pytest.mark.parametrize(
    "name, content",
    [
        ("notes.md", b"# not an image"),
        ("broken.svs", b"not a tiff at all"),
        ("empty.tif", b""),
        ("missing.ndpi", None),
    ],
)
def test_get_reader_rejects_non_slides(tmp_path: Path, name: str, content: bytes | None) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)

    assert get_reader(str(path)) is None


def test_get_reader_rejects_mixed_list(tmp_path: Path, cmu_slide_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("text")

    assert get_reader([str(cmu_slide_path), str(other)]) is None


def test_layer_name_strips_slide_suffixes() -> None:
    assert slide_layer_name("a/b/case-01.ome.tiff") == "case-01"
    assert slide_layer_name("case-02.SVS") == "case-02"
    assert slide_layer_name("case-03.ndpi") == "case-03"


def test_sample_slide_is_packaged() -> None:
    path = sample_slide_path()
    assert path.is_file()
    assert path.name == "CMU-1-Small-Region.svs"


@pytest.mark.gui
def test_viewer_opens_slide_with_plugin(make_napari_viewer, cmu_slide_path: Path) -> None:
    from napari.utils._dask_utils import _DASK_CACHE

    viewer = make_napari_viewer()
    layers = viewer.open(str(cmu_slide_path), plugin="napari-anopilad")

    assert len(layers) == 1
    layer = layers[0]
    assert layer.rgb
    assert layer.source.reader_plugin == "napari-anopilad"
    assert layer.metadata["anopilad"]["mpp"] == pytest.approx(0.499)
    # World coordinates are level-0 pixels: the centre of pixel (y, x) is world (y, x).
    np.testing.assert_allclose(layer.data_to_world((1234, 567)), (1234, 567))
    assert 0 < _DASK_CACHE.cache.available_bytes <= DASK_CACHE_LIMIT_BYTES


@pytest.mark.gui
def test_viewer_opens_sample_data(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample("napari-anopilad", "cmu-1-small-region")

    assert len(viewer.layers) == 1
    layer = viewer.layers[0]
    assert layer.name == "CMU-1-Small-Region"
    assert layer.data.shape == (2967, 2220, 3)
