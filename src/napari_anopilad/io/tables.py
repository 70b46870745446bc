"""Write and read ``patches.csv``, one row per analysed patch.

Columns, in this order: the patch box ``x, y, width, height`` in level-0 pixels, its grid index
``row, col``, ``tissue_fraction``, the prompt's ``keywords`` and ``weights`` (semicolon-separated, best
first), the ``prompt`` string, the scores ``lpips`` and ``mse_latent``, and the z-scores ``z`` and
``z_eroded``. Missing values (NaN or None) are written as empty fields.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from napari_anopilad.io.atomic import atomic_output

PATCH_COLUMNS = (
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
)

_INTEGER_COLUMNS = ("x", "y", "width", "height", "row", "col")
_FLOAT_COLUMNS = ("tissue_fraction", "lpips", "mse_latent", "z", "z_eroded")
LIST_SEPARATOR = ";"


def _format_float(value: Any) -> str:
    if value is None:
        return ""
    number = float(value)
    if math.isnan(number):
        return ""
    # repr gives the shortest text that reads back to the same float.
    return repr(number)


def _format_keywords(value: Any, row_number: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    keywords = [str(keyword) for keyword in value]
    for keyword in keywords:
        if LIST_SEPARATOR in keyword:
            raise ValueError(
                f"Keyword {keyword!r} of patch {row_number} contains the list separator "
                f"{LIST_SEPARATOR!r}; remove it from the keyword bank."
            )
    return LIST_SEPARATOR.join(keywords)


def _format_weights(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return LIST_SEPARATOR.join(_format_float(weight) for weight in value)


def _format_row(record: Mapping[str, Any], row_number: int) -> list[str]:
    missing = [column for column in PATCH_COLUMNS if column not in record]
    if missing:
        raise ValueError(f"Patch {row_number} lacks the columns {', '.join(missing)}.")
    fields = []
    for column in PATCH_COLUMNS:
        value = record[column]
        if column in _INTEGER_COLUMNS:
            fields.append(str(int(value)))
        elif column in _FLOAT_COLUMNS:
            fields.append(_format_float(value))
        elif column == "keywords":
            fields.append(_format_keywords(value, row_number))
        elif column == "weights":
            fields.append(_format_weights(value))
        else:
            fields.append("" if value is None else str(value))
    return fields


def write_patches_csv(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write one row per patch to ``patches.csv``, atomically.

    Parameters
    ----------
    path : str or Path
        Output file.
    records : iterable of mapping
        One mapping per patch with every key in `PATCH_COLUMNS`. ``keywords`` and ``weights`` may be
        sequences (joined with ``;``) or already-joined strings. Prompts may contain commas, quotes and
        parentheses, because the csv module quotes such fields.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    rows = [_format_row(record, number) for number, record in enumerate(records)]
    with atomic_output(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(PATCH_COLUMNS)
        writer.writerows(rows)
    return path


def _parse_float(text: str) -> float:
    return float(text) if text != "" else math.nan


def read_patches_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read ``patches.csv`` back into one dict per patch.

    Integer columns become ``int``, score columns ``float`` (NaN when empty), ``keywords`` a list of
    str and ``weights`` a list of float.

    Raises
    ------
    ValueError
        If the file is missing, its header differs from `PATCH_COLUMNS` or a value is invalid.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            if header is None or tuple(header) != PATCH_COLUMNS:
                raise ValueError(
                    f"Patch table {path} has the header {header}; expected the columns {', '.join(PATCH_COLUMNS)}."
                )
            return [_parse_row(fields, path, line) for line, fields in enumerate(reader, start=2)]
    except OSError as error:
        raise ValueError(f"Failed to read patch table {path}: {error}.") from error


def _parse_row(fields: Sequence[str], path: Path, line: int) -> dict[str, Any]:
    if len(fields) != len(PATCH_COLUMNS):
        raise ValueError(
            f"Patch table {path}, line {line}: {len(fields)} fields, expected {len(PATCH_COLUMNS)}."
        )
    raw = dict(zip(PATCH_COLUMNS, fields))
    try:
        record: dict[str, Any] = {column: int(raw[column]) for column in _INTEGER_COLUMNS}
        record.update({column: _parse_float(raw[column]) for column in _FLOAT_COLUMNS})
        record["keywords"] = raw["keywords"].split(LIST_SEPARATOR) if raw["keywords"] else []
        record["weights"] = (
            [float(weight) for weight in raw["weights"].split(LIST_SEPARATOR)] if raw["weights"] else []
        )
    except ValueError as error:
        raise ValueError(f"Patch table {path}, line {line}: invalid value ({error}).") from error
    record["prompt"] = raw["prompt"]
    return {column: record[column] for column in PATCH_COLUMNS}
