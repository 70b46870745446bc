"""Tests for patches.csv, read back with the csv module, pandas and the package's reader."""

from __future__ import annotations

import csv
import math

import numpy as np
import pandas as pd
import pytest

from napari_anopilad.io.tables import PATCH_COLUMNS, read_patches_csv, write_patches_csv

PROMPT = 'a histopathological photograph of (germinal center, "reactive")++ and (sinus histiocytes)+ and (x)'


def _records() -> list[dict]:
    return [
        {
            "x": 0,
            "y": 512,
            "width": 512,
            "height": 512,
            "row": 1,
            "col": 0,
            "tissue_fraction": np.float32(0.75),
            "keywords": ["germinal center, reactive", "sinus histiocytes", "a", "b", "c"],
            "weights": np.array([1.0712, 1.02, 1.0, 0.97, 0.9]),
            "prompt": PROMPT,
            "lpips": 0.1234567890123,
            "mse_latent": np.float64(0.5),
            "z": -1.25,
            "z_eroded": -2.5,
        },
        {
            "x": 512,
            "y": 512,
            "width": 512,
            "height": 512,
            "row": 1,
            "col": 1,
            "tissue_fraction": 1.0,
            "keywords": [],
            "weights": [],
            "prompt": "",
            "lpips": 0.2,
            "mse_latent": math.nan,
            "z": None,
            "z_eroded": np.nan,
        },
    ]


def test_header_and_csv_module_read(tmp_path):
    path = write_patches_csv(tmp_path / "patches.csv", _records())
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    assert tuple(rows[0]) == PATCH_COLUMNS
    assert rows[0] == [
        "x",
        "y",
        "width",
        "height",
        "row",
        "col",
        "tissue_fraction",
        "keywords",
        "weights",
        "prompt",
        "lpips",
        "mse_latent",
        "z",
        "z_eroded",
    ]
    assert rows[1][9] == PROMPT
    assert rows[1][7] == "germinal center, reactive;sinus histiocytes;a;b;c"
    assert rows[1][8] == "1.0712;1.02;1.0;0.97;0.9"
    assert rows[2][11:] == ["", "", ""]


def test_pandas_reads_columns(tmp_path):
    path = write_patches_csv(tmp_path / "patches.csv", _records())
    table = pd.read_csv(path)
    assert tuple(table.columns) == PATCH_COLUMNS
    assert table.loc[0, "prompt"] == PROMPT
    assert table.loc[0, "lpips"] == 0.1234567890123
    assert table.loc[0, "tissue_fraction"] == float(np.float32(0.75))
    assert np.isnan(table.loc[1, "z"])
    assert table["x"].dtype.kind == "i"


def test_round_trip(tmp_path):
    path = write_patches_csv(tmp_path / "patches.csv", _records())
    first, second = read_patches_csv(path)
    assert list(first) == list(PATCH_COLUMNS)
    assert first["keywords"] == ["germinal center, reactive", "sinus histiocytes", "a", "b", "c"]
    assert first["weights"] == [1.0712, 1.02, 1.0, 0.97, 0.9]
    assert first["prompt"] == PROMPT
    assert (first["x"], first["y"], first["row"], first["col"]) == (0, 512, 1, 0)
    assert first["z_eroded"] == -2.5
    assert second["keywords"] == []
    assert second["weights"] == []
    assert math.isnan(second["mse_latent"])
    assert math.isnan(second["z"])


def test_writer_rejects_bad_records(tmp_path):
    record = _records()[0]
    del record["z"]
    with pytest.raises(ValueError, match="lacks the columns z"):
        write_patches_csv(tmp_path / "patches.csv", [record])
    record = _records()[0]
    record["keywords"] = ["a;b"]
    with pytest.raises(ValueError, match="separator"):
        write_patches_csv(tmp_path / "patches.csv", [record])
    assert not list(tmp_path.iterdir())


def test_reader_rejects_bad_files(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"other\.csv has the header"):
        read_patches_csv(other)
    short = tmp_path / "short.csv"
    short.write_text(",".join(PATCH_COLUMNS) + "\n1,2\n")
    with pytest.raises(ValueError, match="line 2: 2 fields"):
        read_patches_csv(short)
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(PATCH_COLUMNS) + "\n" + ",".join(["x"] * len(PATCH_COLUMNS)) + "\n")
    with pytest.raises(ValueError, match="line 2: invalid value"):
        read_patches_csv(bad)
    with pytest.raises(ValueError, match=r"missing\.csv"):
        read_patches_csv(tmp_path / "missing.csv")
    twice = tmp_path / "twice.csv"
    twice.write_text(",".join([*PATCH_COLUMNS, "mse", "mse"]) + "\n")
    with pytest.raises(ValueError, match="names the columns mse more than once"):
        read_patches_csv(twice)
    path = write_patches_csv(tmp_path / "wide.csv", [{**_records()[0], "mse": 0.5}])
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1].rsplit(",", 1)[0] + ",high\n")
    with pytest.raises(ValueError, match="line 2: invalid value"):
        read_patches_csv(path)


def test_writer_rejects_non_numeric_column(tmp_path):
    with pytest.raises(ValueError, match="invalid value 'high' in column 'mse'"):
        write_patches_csv(tmp_path / "patches.csv", [{**_records()[0], "mse": "high"}])
    assert not list(tmp_path.iterdir())
