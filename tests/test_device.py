"""Tests of the batch size chosen from free device memory, with hand-computed cases.

The arithmetic runs on the CPU by passing ``free_bytes`` and ``per_patch_bytes`` explicitly; the tests
that read a real GPU's memory are skipped without one.
"""

from __future__ import annotations

import pytest
import torch

from napari_anopilad.engine.device import (
    CPU_BATCH_SIZE,
    MAX_AUTO_BATCH_SIZE,
    SD15_VAE_PEAK_CHANNELS,
    choose_batch_size,
    estimate_patch_bytes,
    measure_patch_bytes,
)
from napari_anopilad.method.settings import InferenceSettings

MIB = 2**20
GIB = 2**30
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Stable Diffusion 1.5's vae/config.json.
SD15_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


def test_estimate_default_is_vae_decoder() -> None:
    # 4 live tensors of 256 channels x 256 x 256 px x 4 bytes.
    assert estimate_patch_bytes() == 4 * 256 * 256 * 256 * 4 == 256 * MIB
    assert estimate_patch_bytes(InferenceSettings(precision="bfloat16")) == 256 * MIB


def test_estimate_large_patch_unet_attention() -> None:
    # At 512 px the latent is 64 x 64 = 4096 tokens: 8 heads x 4096^2 attention scores per UNet sample.
    float32_guided = 4 * 2 * 8 * 4096 * 4096 * 4
    assert estimate_patch_bytes(InferenceSettings(), patch_size=512) == float32_guided == 4 * GIB
    bfloat16_guided = 4 * 2 * 8 * 4096 * 4096 * 2
    assert estimate_patch_bytes(InferenceSettings(precision="bfloat16"), patch_size=512) == bfloat16_guided
    # Without guidance the UNet batch halves, and the VAE decoder (4 x 256 x 512^2 x 4 bytes) ties with it.
    unguided = InferenceSettings(precision="bfloat16", guidance_scale=1.0)
    assert estimate_patch_bytes(unguided, patch_size=512) == 4 * 256 * 512 * 512 * 4 == GIB
    unprompted = InferenceSettings(precision="bfloat16", unprompted=True)
    assert estimate_patch_bytes(unprompted, patch_size=512) == GIB


def test_estimate_rejects_bad_patch_size() -> None:
    with pytest.raises(ValueError, match="patch_size 250"):
        estimate_patch_bytes(patch_size=250)
    with pytest.raises(ValueError, match="patch_size 0"):
        estimate_patch_bytes(patch_size=0)


def test_vae_decoder_peak_channels_match_sd15() -> None:
    # The estimate's largest VAE activation, checked on the real SD1.5 decoder built on the meta device.
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
    largest: list[tuple[int, ...]] = []

    def record(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            largest.append(tuple(output.shape))

    for module in vae.decoder.modules():
        module.register_forward_hook(record)
    with torch.no_grad():
        vae.decode(torch.zeros((1, 4, 32, 32), device="meta"))
    shape = max(largest, key=lambda item: torch.Size(item).numel())
    assert shape == (1, SD15_VAE_PEAK_CHANNELS, 256, 256)


def test_choose_from_free_memory() -> None:
    # floor(10 GiB x 0.8 / 256 MiB) = floor(32.0) = 32.
    assert choose_batch_size(CUDA, per_patch_bytes=256 * MIB, free_bytes=10 * GIB) == 32
    # floor(3 GiB x 0.8 / 1000 MiB) = floor(2.4576) = 2.
    assert choose_batch_size(CUDA, per_patch_bytes=1000 * MIB, free_bytes=3 * GIB) == 2
    # floor(10 GiB x 0.5 / 256 MiB) = 20.
    assert choose_batch_size(CUDA, per_patch_bytes=256 * MIB, free_bytes=10 * GIB, memory_fraction=0.5) == 20


def test_choose_uses_estimate_by_default() -> None:
    # 256 MiB per patch from the estimate: floor(5 GiB x 0.8 / 256 MiB) = 16.
    assert choose_batch_size(CUDA, InferenceSettings(precision="bfloat16"), free_bytes=5 * GIB) == 16


def test_choose_caps_large_memory() -> None:
    # An H200's 139 GiB would fit 444 patches of 256 MiB.
    assert choose_batch_size(CUDA, per_patch_bytes=256 * MIB, free_bytes=139 * GIB) == MAX_AUTO_BATCH_SIZE
    assert choose_batch_size(CUDA, per_patch_bytes=256 * MIB, free_bytes=139 * GIB, cap=16) == 16


def test_choose_at_least_one() -> None:
    assert choose_batch_size(CUDA, per_patch_bytes=256 * MIB, free_bytes=100 * MIB) == 1
    assert choose_batch_size(CUDA, per_patch_bytes=256 * MIB, free_bytes=0) == 1
    # Exactly one patch in 80% of the free memory: 320 MiB x 0.8 = 256 MiB.
    assert choose_batch_size(CUDA, per_patch_bytes=256 * MIB, free_bytes=320 * MIB) == 1
    assert choose_batch_size(CUDA, per_patch_bytes=256 * MIB, free_bytes=640 * MIB) == 2


def test_choose_cpu_fixed_size() -> None:
    assert choose_batch_size(CPU) == CPU_BATCH_SIZE
    assert choose_batch_size(CPU, InferenceSettings()) == CPU_BATCH_SIZE
    assert choose_batch_size(CPU, cap=3) == 3
    # An explicit free memory applies the same arithmetic on any device.
    assert choose_batch_size(CPU, per_patch_bytes=256 * MIB, free_bytes=2 * GIB) == 6


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"cap": 0}, "cap 0"),
        ({"memory_fraction": 0.0}, "memory_fraction 0.0"),
        ({"memory_fraction": 1.5}, "memory_fraction 1.5"),
        ({"per_patch_bytes": 0, "free_bytes": GIB}, "per_patch_bytes 0"),
        ({"free_bytes": -1}, "free_bytes -1"),
    ],
)
def test_choose_rejects_bad_arguments(arguments: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_batch_size(CUDA, **arguments)  # type: ignore[arg-type]


def test_measure_needs_cuda() -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        measure_patch_bytes(lambda: None, CPU, 2)


@needs_cuda
def test_measure_known_allocation() -> None:
    device = torch.device("cuda", 0)
    kept: list[torch.Tensor] = []

    def allocate_two_patches() -> None:
        # 8 MiB a patch, kept alive so both count at the peak.
        kept.extend(torch.empty(2 * MIB, dtype=torch.float32, device=device) for _ in range(2))

    per_patch = measure_patch_bytes(allocate_two_patches, device, batch_size=2)
    assert per_patch == 8 * MIB


@needs_cuda
def test_choose_reads_gpu_memory() -> None:
    device = torch.device("cuda", 0)
    free_bytes, _ = torch.cuda.mem_get_info(device)
    expected = max(1, min(MAX_AUTO_BATCH_SIZE, int(free_bytes * 0.8) // (256 * MIB)))
    assert choose_batch_size(device, per_patch_bytes=256 * MIB) == expected
