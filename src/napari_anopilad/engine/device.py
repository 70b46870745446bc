"""Choice of the torch device that runs the model, the precisions it allows and its batch size."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable

import torch

from napari_anopilad.method.settings import InferenceSettings

logger = logging.getLogger(__name__)

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


# -- batch size from free device memory ----------------------------------------------------------

# Batch size on a CPU. The CPU's cores are already busy at a UNet batch of 2 (one patch with guidance),
# so larger batches save only per-call overhead. benchmarks/throughput.py measured 1.37x for a batch of 8
# over one patch at a time on a 2-core CPU. A batch of 8 keeps that gain and the command line's default.
CPU_BATCH_SIZE = 8
# Largest automatic batch on a GPU. With guidance the UNet then runs 128 latents a call (about 23 TFLOP
# for the SD1.5 UNet), which should keep a large GPU's matrix units busy. A batch still finishes within
# seconds, so the heatmap fills in steadily and a cancel takes effect soon.
# NOTE: an estimate; benchmarks/gpu_suite.sh measures patches/s over batch sizes to check it.
MAX_AUTO_BATCH_SIZE = 64
# Share of the free device memory that batches may use: the rest absorbs the caching allocator's
# fragmentation and the error of the per-patch estimate.
MEMORY_FRACTION = 0.8

# Analytic per-patch peak of the SD1.5 stack at 256 px, used when no measured value is given. Inference
# keeps few tensors alive at once, so a stage's peak is taken as LIVE_TENSORS_AT_PEAK times its largest
# activation:
# - VAE decoder (float32): its third up block upsamples 256 channels to the full 256 x 256 px, the
#   largest activation of the whole path (256 * 256 * 256 values).
# - UNet (the settings' precision): the self-attention scores of the 32 x 32 latent, 8 heads of
#   1024 x 1024, in case the attention runs without a fused kernel. A guided patch is 2 UNet samples.
# - LPIPS (float32): the first VGG block's 64 channels at 256 x 256 px for the patch and its reconstruction.
# NOTE: not yet checked against torch.cuda.max_memory_allocated on a GPU; benchmarks/gpu_suite.sh records
# the measured peak beside this estimate.
LIVE_TENSORS_AT_PEAK = 4
SD15_VAE_PEAK_CHANNELS = 256
SD15_UNET_ATTENTION_HEADS = 8
LPIPS_VGG_PEAK_CHANNELS = 64
VAE_LATENT_DOWNSAMPLE = 8
PRECISION_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def estimate_patch_bytes(settings: InferenceSettings | None = None, patch_size: int = 256) -> int:
    """Estimate the device memory one more patch in a batch needs at its peak, in bytes.

    The estimate is the largest of three stages' peaks. Each is :data:`LIVE_TENSORS_AT_PEAK` times the
    stage's largest activation for one patch, as the module constants list them: the float32 VAE
    decoder, the UNet at the settings' precision with its attention scores materialised, and LPIPS on
    the patch and its reconstruction. Model weights are not included, because they are loaded before
    the free memory is read.

    Parameters
    ----------
    settings
        Inference settings; their ``precision`` sets the UNet's bytes per value and a ``guidance_scale``
        above 1 (when not ``unprompted``) doubles the UNet batch. The defaults when None.
    patch_size
        Patch side in pixels (256 for AnoPILaD).

    Returns
    -------
    int
        Bytes per patch (an estimate, about 256 MiB for SD1.5 at 256 px, set by the VAE decoder).
    """
    if patch_size < VAE_LATENT_DOWNSAMPLE or patch_size % VAE_LATENT_DOWNSAMPLE:
        raise ValueError(f"patch_size {patch_size} is invalid: use a multiple of {VAE_LATENT_DOWNSAMPLE} px")
    settings = settings or InferenceSettings()
    pixels = patch_size * patch_size
    float32_bytes = PRECISION_BYTES["float32"]

    vae_decoder = SD15_VAE_PEAK_CHANNELS * pixels * float32_bytes

    tokens = pixels // VAE_LATENT_DOWNSAMPLE**2
    guided = settings.guidance_scale > 1 and not settings.unprompted
    unet_samples = 2 if guided else 1
    unet = unet_samples * SD15_UNET_ATTENTION_HEADS * tokens * tokens * PRECISION_BYTES[settings.precision]

    lpips = 2 * LPIPS_VGG_PEAK_CHANNELS * pixels * float32_bytes

    return LIVE_TENSORS_AT_PEAK * max(vae_decoder, unet, lpips)


def measure_patch_bytes(run_batch: Callable[[], object], device: torch.device, batch_size: int) -> int:
    """Measure the peak device memory per patch of one probe batch on a CUDA device, in bytes.

    Runs ``run_batch`` (for example ``lambda: scorer.score(images, keys)`` on ``batch_size`` patches)
    and divides the peak allocation above what was allocated before it by ``batch_size``. The fixed
    part of the peak (the model's workspace) is counted per patch too, so a small probe batch gives a
    value on the safe side.

    Raises
    ------
    ValueError
        If ``device`` is not a CUDA device (the CPU allocator keeps no peak statistics) or ``batch_size``
        is below 1.
    """
    if device.type != "cuda":
        raise ValueError(f"measuring memory needs a CUDA device, but the device is {device}")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} is invalid: use 1 or more")
    torch.cuda.synchronize(device)
    allocated_before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_batch()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return max(1, math.ceil((peak - allocated_before) / batch_size))


def choose_batch_size(
    device: torch.device,
    settings: InferenceSettings | None = None,
    *,
    per_patch_bytes: int | None = None,
    free_bytes: int | None = None,
    cap: int = MAX_AUTO_BATCH_SIZE,
    memory_fraction: float = MEMORY_FRACTION,
) -> int:
    """Choose the number of patches per device batch from the device's free memory.

    The batch size is ``floor(free_bytes * memory_fraction / per_patch_bytes)``, clamped to 1 .. ``cap``.
    On a CPU without an explicit ``free_bytes`` it is :data:`CPU_BATCH_SIZE` (at most ``cap``), because
    a CPU gains little from larger batches and its memory is not the limit.

    Parameters
    ----------
    device
        The device the scorer runs on.
    settings
        Inference settings for :func:`estimate_patch_bytes`; unused when ``per_patch_bytes`` is given.
    per_patch_bytes
        Peak bytes per patch, for example from :func:`measure_patch_bytes`; by default
        :func:`estimate_patch_bytes` of ``settings``.
    free_bytes
        Free device memory in bytes; by default ``torch.cuda.mem_get_info`` of ``device`` (read after the
        models are loaded, so their weights are already taken).
    cap
        Largest batch size returned.
    memory_fraction
        Share of ``free_bytes`` that batches may use, above 0 and at most 1.

    Returns
    -------
    int
        The batch size, 1 or more. It is 1 when even one patch does not fit the estimate; the session's
        out-of-memory handling then reports a device that is too small.
    """
    if cap < 1:
        raise ValueError(f"cap {cap} is invalid: use 1 or more")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction {memory_fraction} is invalid: use a value above 0 and at most 1")
    if per_patch_bytes is not None and per_patch_bytes < 1:
        raise ValueError(f"per_patch_bytes {per_patch_bytes} is invalid: use 1 or more")
    if free_bytes is not None and free_bytes < 0:
        raise ValueError(f"free_bytes {free_bytes} is invalid: use 0 or more")

    if free_bytes is None:
        if device.type != "cuda":
            return min(CPU_BATCH_SIZE, cap)
        free_bytes, _total = torch.cuda.mem_get_info(device)
    if per_patch_bytes is None:
        per_patch_bytes = estimate_patch_bytes(settings)

    fitting = int(free_bytes * memory_fraction) // per_patch_bytes
    batch_size = max(1, min(cap, fitting))
    logger.info(
        "Batch size %d on %s: %.2f GiB free, %.0f MiB per patch, %.0f%% of the free memory, cap %d",
        batch_size,
        device,
        free_bytes / 2**30,
        per_patch_bytes / 2**20,
        100 * memory_fraction,
        cap,
    )
    return batch_size
