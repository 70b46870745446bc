"""Choice of the torch device that runs the model, and the precisions it allows."""

from __future__ import annotations

import re

import torch

# Half precision on a CPU is either unsupported by some kernels or slower than float32, so it is a GPU option.
GPU_ONLY_PRECISIONS = ("float16", "bfloat16")

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def choose_device(request: str = "auto") -> torch.device:
    """Resolve a device request to a torch device that exists on this machine.

    Parameters
    ----------
    request : str
        ``"auto"`` (the first CUDA GPU when one is present, else the CPU), ``"cpu"``, ``"cuda"``
        or ``"cuda:N"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If the request is not one of the forms above, or names a GPU that this machine does not have.
    """
    text = request.strip().lower()
    if not _DEVICE_PATTERN.match(text):
        raise ValueError(f"device {request!r} is invalid: use auto, cpu, cuda or cuda:N (for example cuda:1)")

    if text == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")

    if not torch.cuda.is_available():
        raise ValueError(
            f"device {request!r} is not available: torch finds no CUDA GPU on this machine "
            "(check the driver and that torch was installed with CUDA), or use --device cpu"
        )
    index = int(text.split(":")[1]) if ":" in text else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"device {request!r} is not available: this machine has {count} CUDA GPU(s), "
            f"numbered cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def check_precision(device: torch.device, precision: str) -> None:
    """Raise a ValueError when ``precision`` is a half precision and ``device`` is not a GPU."""
    if precision in GPU_ONLY_PRECISIONS and device.type != "cuda":
        raise ValueError(
            f"precision {precision!r} needs a CUDA GPU, but the device is {device}: use float32 on the CPU"
        )


def describe_device(device: torch.device) -> str:
    """Return a short human-readable name of the device, such as ``cuda:0 (NVIDIA H200)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def is_out_of_memory(error: BaseException) -> bool:
    """Tell whether an exception is a device out-of-memory error (CUDA raises ``torch.OutOfMemoryError``)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    # Some kernels raise a plain RuntimeError with the allocator's message instead.
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_cached_memory(device: torch.device) -> None:
    """Return the CUDA caching allocator's free blocks after an out-of-memory error; no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
