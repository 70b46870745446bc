"""Type checks of values read from JSON files such as ``bundle.json``.

Each check raises ValueError with a message of the form ``<field> <value> is invalid: use ...``. The
callers add the file and the section, so the command line prints one line that names all four.
A bool is not accepted as a number, although Python counts it as an int.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any


def check_integer(name: str, value: Any) -> int:
    """Return ``value`` as an int; raise ValueError unless it is an integer (a float such as 2.0 is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} {value!r} is invalid: use an integer")
    return int(value)


def check_number(name: str, value: Any) -> float:
    """Return ``value`` when it is a finite real number; raise ValueError otherwise.

    Python ints and floats come back unchanged, so an integer stays an integer in hashes of the
    settings. Other real types (numpy scalars) come back as float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} {value!r} is invalid: use a finite number")
    return value if isinstance(value, (int, float)) else float(value)


def check_string(name: str, value: Any) -> str:
    """Return ``value``; raise ValueError unless it is a string."""
    if not isinstance(value, str):
        raise ValueError(f"{name} {value!r} is invalid: use a string")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value``; raise ValueError unless it is true or false."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} {value!r} is invalid: use true or false")
    return value


def check_format_version(value: Any, supported: int) -> int:
    """Return ``value`` when it is the integer ``supported``; raise ValueError otherwise.

    ``true``, ``"1"`` and ``1.0`` are rejected like any other value that is not a JSON integer.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"format_version {value!r} is invalid: use the integer {supported}")
    if value != supported:
        raise ValueError(
            f"format_version {value!r} is not supported: this version of napari-anopilad reads format_version "
            f"{supported} only, so install the version that wrote the bundle or rebuild it"
        )
    return int(value)


def read_score_statistics(
    scores: Any, score_names: Sequence[str]
) -> tuple[dict[str, float], dict[str, float]]:
    """Read ``{name: {"mean": m, "std": s}}`` calibration statistics into a mean and a std per score.

    Raises
    ------
    ValueError
        Naming the entry (``scores.lpips.std``) when a score is missing, a value is not a finite number
        or a std is not positive.
    """
    if not isinstance(scores, Mapping):
        raise ValueError(
            f"scores {scores!r} is invalid: use an object with a mean and std for each of {list(score_names)}"
        )
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for name in score_names:
        entry = scores.get(name)
        if entry is None:
            raise ValueError(
                f"scores has no statistics for the score {name!r}: measure all of {list(score_names)}"
            )
        if not isinstance(entry, Mapping):
            raise ValueError(f"scores.{name} {entry!r} is invalid: use an object with a 'mean' and a 'std'")
        mean[name] = check_number(f"scores.{name}.mean", entry.get("mean"))
        std[name] = check_number(f"scores.{name}.std", entry.get("std"))
        if std[name] <= 0:
            raise ValueError(f"scores.{name}.std {std[name]!r} is invalid: use a positive number")
    return mean, std
