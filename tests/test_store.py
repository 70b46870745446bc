"""Tests of the result store: round trip, merge order, atomic writes under SIGKILL, keys."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_anopilad.engine.store import ResultStore, default_store_root
from napari_anopilad.method.settings import InferenceSettings

SLIDE_ID = "slide0123456789abcdef"
BUNDLE_ID = "bundleabcdef0123456789"


def _batch(cells: list[tuple[int, int]], offset: float = 0.0) -> dict:
    n = len(cells)
    rng = np.random.default_rng(len(cells) + int(offset * 10))
    return {
        "cells": cells,
        "lpips": np.arange(n, dtype=np.float64) * 0.1 + offset,
        "mse_latent": np.arange(n, dtype=np.float64) * 0.01 + offset,
        "keywords": [[f"kw{i}-{j}" for j in range(5)] for i in range(n)],
        "similarities": rng.random((n, 5)),
        "weights": rng.random((n, 5)),
        "prompts": [f"a histopathological photograph of (kw{i}-0)++" for i in range(n)],
    }


def test_store_round_trip(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings())
    batch = _batch([(0, 0), (0, 1), (3, 2)])
    store.write_batch(**batch)

    reopened = ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings())
    stored = reopened.load()
    assert len(stored) == 3
    np.testing.assert_array_equal(stored.cells(), np.array(batch["cells"]))
    np.testing.assert_array_equal(stored.lpips, batch["lpips"])
    np.testing.assert_array_equal(stored.mse_latent, batch["mse_latent"])
    np.testing.assert_array_equal(stored.similarities, batch["similarities"])
    np.testing.assert_array_equal(stored.weights, batch["weights"])
    assert stored.keywords.tolist() == batch["keywords"]
    assert stored.prompts.tolist() == batch["prompts"]
    assert reopened.done_cells() == {(0, 0), (0, 1), (3, 2)}
    assert reopened.done_cells(need_reconstructions=True) == set()


def test_store_manifest_written_first(tmp_path: Path) -> None:
    settings = InferenceSettings(start_timestep=500)
    store = ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, settings, grid={"patch_size_level0": 512})
    import json

    manifest = json.loads((store.folder / "manifest.json").read_text())
    assert manifest["slide_identity"] == SLIDE_ID
    assert manifest["bundle_identity"] == BUNDLE_ID
    assert "score" not in manifest["settings"]
    assert InferenceSettings.from_dict({**manifest["settings"], "score": settings.score}) == settings
    assert manifest["grid"] == {"patch_size_level0": 512}


def test_store_shared_by_scores_not_by_settings(tmp_path: Path) -> None:
    lpips_store = ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings(score="lpips"))
    lpips_store.write_batch(**_batch([(1, 1)]))

    # Every batch contains both scores, so choosing the other one reuses the stored patches.
    mse_store = ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings(score="mse_latent"))
    assert mse_store.folder == lpips_store.folder
    assert mse_store.done_cells() == {(1, 1)}

    # A setting that changes the scores gives another folder.
    other = ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings(start_timestep=500))
    assert other.folder != lpips_store.folder
    assert other.done_cells() == set()


def test_store_last_batch_wins(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings())
    for index in range(12):
        store.write_batch(**_batch([(1, 1), (1, 2)], offset=float(index)))
    store.write_batch(**_batch([(1, 2), (5, 5)], offset=100.0))

    stored = store.load()
    by_cell = {(int(r), int(c)): value for r, c, value in zip(stored.rows, stored.cols, stored.lpips)}
    assert len(stored) == 3
    # Batch 12 wrote (1, 1) last with offset 11; (1, 2) was rewritten by the final batch.
    assert by_cell[(1, 1)] == pytest.approx(11.0)
    assert by_cell[(1, 2)] == pytest.approx(100.0)
    assert by_cell[(5, 5)] == pytest.approx(100.1)


def test_store_keys_separate_folders(tmp_path: Path) -> None:
    base = ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings())
    base.write_batch(**_batch([(0, 0)]))
    others = [
        ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings(start_timestep=500)),
        ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings(sampler="plms")),
        ResultStore(tmp_path, SLIDE_ID, "anotherbundle", InferenceSettings()),
        ResultStore(tmp_path, "anotherslide", BUNDLE_ID, InferenceSettings()),
        ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings(), grid={"patch_size_level0": 256}),
    ]
    folders = {base.folder} | {store.folder for store in others}
    assert len(folders) == 6
    for store in others:
        assert len(store.load()) == 0


def test_store_rejects_foreign_manifest(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings())
    manifest = store.folder / "manifest.json"
    manifest.write_text(manifest.read_text().replace(BUNDLE_ID, "somethingelse"))
    with pytest.raises(ValueError, match="belongs to another slide"):
        ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings())


def test_store_reconstructions_round_trip(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings())
    images = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    store.write_batch(**_batch([(2, 3), (4, 5)]), reconstructions=images)

    np.testing.assert_array_equal(store.read_reconstruction(2, 3), images[0])
    np.testing.assert_array_equal(store.read_reconstruction(4, 5), images[1])
    assert store.read_reconstruction(0, 0) is None
    assert store.done_cells(need_reconstructions=True) == {(2, 3), (4, 5)}


def test_store_removes_dead_writers_temp_file(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings())
    store.write_batch(**_batch([(0, 0)]))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = "".join(ch for ch in socket.gethostname() if ch.isalnum())[:32]
    half_written = store.folder / f".tmp-{host}-{dead.pid}-abcd1234-batch-00000002-abcd1234.npz"
    half_written.write_bytes(b"PK\x03\x04 truncated")
    live = store.folder / f".tmp-{host}-{os.getpid()}-abcd1234-batch-00000003-abcd1234.npz"
    live.write_bytes(b"PK\x03\x04 still being written")

    reopened = ResultStore(tmp_path, SLIDE_ID, BUNDLE_ID, InferenceSettings())
    assert len(reopened.load()) == 1
    assert not half_written.exists()
    assert live.exists()


_WRITER = """
import sys
import numpy as np
from napari_anopilad.engine.store import ResultStore
from napari_anopilad.method.settings import InferenceSettings

store = ResultStore(sys.argv[1], "slide", "bundle", InferenceSettings())
for index in range(100000):
    cells = [(index, col) for col in range(64)]
    store.write_batch(
        cells, np.full(64, index, float), np.zeros(64), [["a"] * 5] * 64, np.zeros((64, 5)),
        np.ones((64, 5)), ["prompt"] * 64,
    )
    print(index, flush=True)
"""


def test_store_survives_sigkill(tmp_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    for _ in range(20):
        writer.stdout.readline()
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()

    store = ResultStore(tmp_path, "slide", "bundle", InferenceSettings())
    stored = store.load()
    assert len(stored) >= 20 * 64
    # Every stored batch is whole: each row index has all 64 columns and its own score.
    rows, counts = np.unique(stored.rows, return_counts=True)
    assert np.all(counts == 64)
    np.testing.assert_array_equal(np.sort(rows), np.arange(rows.size))
    np.testing.assert_array_equal(stored.lpips, stored.rows.astype(float))
    assert not list(store.folder.glob(".tmp-*"))


def test_default_store_root_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAPARI_ANOPILAD_STORE", str(tmp_path / "cache"))
    assert default_store_root() == tmp_path / "cache"
    monkeypatch.delenv("NAPARI_ANOPILAD_STORE")
    assert default_store_root().name == "store"
    assert "napari-anopilad" in str(default_store_root())
