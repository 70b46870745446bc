"""Safe reading of checkpoint files: safetensors, or pickles limited to tensors (``weights_only=True``)."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from napari_anopilad.method.errors import BundleError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


def read_state_dict(path: Path, part: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file or a tensors-only pickle.

    Parameters
    ----------
    path
        A ``.safetensors`` file, or a ``.bin``/``.pth``/``.pt``/``.ckpt`` file that ``torch.load`` reads with
        ``weights_only=True`` (arbitrary pickled objects are rejected, so an untrusted file cannot run code).
    part
        The bundle part the file belongs to, named in error messages.

    Returns
    -------
    dict
        Parameter name to CPU tensor. A ``{"state_dict": ...}`` wrapper and a ``module.`` prefix (from
        ``DataParallel``) are removed.

    Raises
    ------
    ValueError
        When the file is missing, has an unsupported suffix, or does not contain only tensors.
    """
    if not path.is_file():
        raise BundleError(f"{part}: file {path} not found")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            state_dict = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise BundleError(f"{part}: {path} is not a valid safetensors file ({error})") from error
    elif suffix in PICKLE_SUFFIXES:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as error:
            raise BundleError(
                f"{part}: {path} was rejected by torch.load(weights_only=True) because it contains objects other "
                f"than tensors ({str(error).splitlines()[0]}); convert it to safetensors from a trusted copy"
            ) from error
        state_dict = _unwrap_state_dict(loaded, path, part)
    else:
        raise BundleError(
            f"{part}: {path} has the unsupported suffix {path.suffix!r}: use .safetensors "
            f"or one of {', '.join(PICKLE_SUFFIXES)}"
        )
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict


def read_tensor_shapes(path: Path, part: str) -> dict[str, tuple[int, ...]]:
    """Return parameter name to shape, reading only the header of a safetensors file."""
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {key: tuple(value.shape) for key, value in read_state_dict(path, part).items()}
    if not path.is_file():
        raise BundleError(f"{part}: file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise BundleError(f"{part}: {path} is not a valid safetensors file ({error})") from error


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """Return the string metadata stored in a safetensors header (empty when there is none)."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def compare_state_dict(
    expected_shapes: dict[str, tuple[int, ...]],
    actual_shapes: dict[str, tuple[int, ...]],
    part: str,
    path: Path,
) -> None:
    """Raise a ValueError naming missing, unexpected and mis-shaped parameters, like a strict ``load_state_dict``."""
    missing = sorted(set(expected_shapes) - set(actual_shapes))
    unexpected = sorted(set(actual_shapes) - set(expected_shapes))
    mismatched = sorted(
        f"{key} {actual_shapes[key]} (expected {expected_shapes[key]})"
        for key in set(expected_shapes) & set(actual_shapes)
        if tuple(expected_shapes[key]) != tuple(actual_shapes[key])
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} keys with another shape ({_first(mismatched)})")
    if problems:
        raise BundleError(
            f"{part}: checkpoint {path} does not match its model config: {'; '.join(problems)}. "
            "Use the checkpoint that belongs to this config"
        )


def hash_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Return the SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _unwrap_state_dict(loaded: object, path: Path, part: str) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise BundleError(f"{part}: {path} does not contain a state dict of named tensors")
    return loaded


def _first(items: list[str], count: int = 3) -> str:
    shown = ", ".join(items[:count])
    return shown + (", ..." if len(items) > count else "")
