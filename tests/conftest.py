"""Shared test fixtures: paths to the real test data and a demo bundle built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def cmu_slide_path() -> Path:
    """The CC0 CMU-1-Small-Region Aperio slide: one level 2220x2967, JPEG tiles, MPP 0.499, 20x."""
    return DATA_DIR / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def tcga_slide_path() -> Path:
    """The TCGA frozen section: two levels, JPEG 2000 tiles, no microns per pixel in the metadata."""
    return DATA_DIR / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"


@pytest.fixture(scope="session")
def demo_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo bundle built from the real model classes with random weights, once per test session."""
    from napari_anopilad.method.demo import make_demo_bundle

    return make_demo_bundle(tmp_path_factory.mktemp("bundle") / "demo-bundle")
