"""Atomic output files: permissions like a plain write, and nothing left behind on errors."""

from __future__ import annotations

import os
import stat

import pytest

from napari_anopilad.io.atomic import atomic_output
from napari_anopilad.io.tables import PATCH_COLUMNS, write_patches_csv


def test_atomic_output_uses_umask_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_patches_csv(tmp_path / "patches.csv", [])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text().strip() == ",".join(PATCH_COLUMNS)


def test_atomic_output_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("writer failed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
