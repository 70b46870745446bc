"""Write and read ``patches.csv``, one row per analysed patch.

Columns, in this order: the patch box ``x, y, width, height`` in level-0 pixels, its grid index
``row, col``, ``tissue_fraction``, the prompt's ``keywords`` and ``weights`` (semicolon-separated, best
first), the ``prompt`` string, the scores ``lpips`` and ``mse_latent``, and the z-scores ``z`` and
``z_eroded``. Missing values (NaN or None) are written as empty fields.

Further numeric columns may follow the standard ones: the named scores of a comparison method (``mse``,
``l1``, ...) and the triage scores (``triage_knn_z``, ...). They are written in the order they first
appear in the records and read back as floats.
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


def extra_columns(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Return the keys beyond `PATCH_COLUMNS` that the records contain, in the order they first appear."""
    extra: list[str] = []
    for record in records:
        extra.extend(name for name in record if name not in PATCH_COLUMNS and name not in extra)
    return extra


def write_patches_csv(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write one row per patch to ``patches.csv``, atomically.

    Parameters
    ----------
    path : str or Path
        Output file.
    records : iterable of mapping
        One mapping per patch with every key in `PATCH_COLUMNS`. ``keywords`` and ``weights`` may be
        sequences (joined with ``;``) or already-joined strings. Prompts may contain commas, quotes and
        parentheses, because the csv module quotes such fields. Any further key is a numeric column
        written after the standard ones; a record without it gets an empty field.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    records = list(records)
    extra = extra_columns(records)
    rows = []
    for number, record in enumerate(records):
        fields = _format_row(record, number)
        for name in extra:
            try:
                fields.append(_format_float(record.get(name)))
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"Patch {number}: invalid value {record.get(name)!r} in column {name!r}; give a number or None."
                ) from error
        rows.append(fields)
    with atomic_output(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, quoting=csv.QUOTE_MINIMAL)
        writer.writerow([*PATCH_COLUMNS, *extra])
        writer.writerows(rows)
    return path


def _parse_float(text: str) -> float:
    return float(text) if text != "" else math.nan


def read_patches_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read ``patches.csv`` back into one dict per patch.

    Integer columns become ``int``, score columns ``float`` (NaN when empty), ``keywords`` a list of
    str and ``weights`` a list of float. Columns after the standard ones (named scores, triage scores)
    become ``float`` too.

    Raises
    ------
    ValueError
        If the file is missing, its header does not start with `PATCH_COLUMNS`, names a column twice or
        a value is invalid.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            if header is None or tuple(header[: len(PATCH_COLUMNS)]) != PATCH_COLUMNS:
                raise ValueError(
                    f"Patch table {path} has the header {header}; expected it to start with the columns "
                    f"{', '.join(PATCH_COLUMNS)}."
                )
            extra = header[len(PATCH_COLUMNS) :]
            repeated = sorted({name for name in extra if header.count(name) > 1})
            if repeated:
                raise ValueError(
                    f"Patch table {path} names the columns {', '.join(repeated)} more than once."
                )
            return [_parse_row(fields, extra, path, line) for line, fields in enumerate(reader, start=2)]
    except OSError as error:
        raise ValueError(f"Failed to read patch table {path}: {error}.") from error


def _parse_row(fields: Sequence[str], extra: Sequence[str], path: Path, line: int) -> dict[str, Any]:
    expected = len(PATCH_COLUMNS) + len(extra)
    if len(fields) != expected:
        raise ValueError(f"Patch table {path}, line {line}: {len(fields)} fields, expected {expected}.")
    raw = dict(zip([*PATCH_COLUMNS, *extra], fields))
    try:
        record: dict[str, Any] = {column: int(raw[column]) for column in _INTEGER_COLUMNS}
        record.update({column: _parse_float(raw[column]) for column in (*_FLOAT_COLUMNS, *extra)})
        record["keywords"] = raw["keywords"].split(LIST_SEPARATOR) if raw["keywords"] else []
        record["weights"] = (
            [float(weight) for weight in raw["weights"].split(LIST_SEPARATOR)] if raw["weights"] else []
        )
    except ValueError as error:
        raise ValueError(f"Patch table {path}, line {line}: invalid value ({error}).") from error
    record["prompt"] = raw["prompt"]
    return {column: record[column] for column in (*PATCH_COLUMNS, *extra)}
