"""Throughput of batched partial diffusion against diffusers' img2img pipeline called patch by patch.

Both sides get the same UNet, scheduler configuration, latents, per-patch noise, prompt embeddings,
sampler, grid, start timestep and guidance scale. Both stop at latents (no VAE, no LPIPS), so the
comparison is the denoising loop, which is nearly all of a patch's FLOPs. The UNet has random weights:
timing does not depend on them, but the trade-off table's score changes would differ for a trained model.

Examples
--------
Reduced UNet on the CPU (the figures in docs/benchmarks.md)::

    python benchmarks/throughput.py --patches 4 --threads 1

Full Stable Diffusion 1.5 UNet architecture on a GPU::

    python benchmarks/throughput.py --full-sd15 --device cuda --dtype bfloat16 --patches 64 [--compile]

Each run prints two markdown tables and writes them, with the raw figures as JSON, to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import diffusers
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from scipy.stats import spearmanr
from torch.utils.flop_counter import FlopCounterMode

from napari_anopilad.method.demo import SD15_SCHEDULER_CONFIG
from napari_anopilad.method.diffusion import (
    patch_noise,
    patch_seed,
    reconstruct_latents,
    start_grid_index,
    timestep_grid,
)

T = TypeVar("T")

RESULTS_DIR = Path(__file__).parent / "results"
SLIDE_IDENTITY = "benchmark"

# Stable Diffusion 1.5's unet/config.json: 180 GFLOP a call on a 4x32x32 latent at batch 1, as
# torch 2.14's FLOP counter reports it.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}

# The same block types with 16-32 channels instead of 320-1280, one layer a block and one attention
# head (0.26 GFLOP a call), so 68 guided steps for a few patches fit in minutes on a 2-core CPU.
REDUCED_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "sample_size": 32,
    "layers_per_block": 1,
    "block_out_channels": (16, 32, 32, 32),
    "attention_head_dim": 1,
    "norm_num_groups": 16,
}


@dataclass
class SideResult:
    """Timing of one way of running the same patches."""

    name: str
    seconds: float
    patches: int
    unet_calls_per_patch: int
    unet_batch: int

    @property
    def patches_per_second(self) -> float:
        return self.patches / self.seconds


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=4, help="number of patches run by both sides")
    parser.add_argument(
        "--baseline-patches",
        type=int,
        default=None,
        help="run the per-patch pipeline on only the first N patches (default: all); its patches/s is per patch",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="patches per reconstruct_latents call (default: all)"
    )
    parser.add_argument("--steps", type=int, default=100, help="inference grid steps (default 100)")
    parser.add_argument("--start", type=int, default=674, help="start timestep (default 674)")
    parser.add_argument("--sampler", choices=("ddim", "plms"), default="ddim")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument(
        "--trade-off-steps",
        type=int,
        nargs="*",
        default=[50, 25],
        help="grid sizes compared with --steps at the same start (second table); none to skip",
    )
    parser.add_argument("--full-sd15", action="store_true", help="full Stable Diffusion 1.5 UNet (GPU)")
    parser.add_argument("--device", default="cpu", help="torch device, for example cpu or cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet for both sides")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and markdown")
    arguments = parser.parse_args(argv)
    if arguments.patches < 1:
        parser.error(f"--patches {arguments.patches} is invalid: use 1 or more")
    if arguments.batch_size is not None and arguments.batch_size < 1:
        parser.error(f"--batch-size {arguments.batch_size} is invalid: use 1 or more")
    if arguments.baseline_patches is not None and not 1 <= arguments.baseline_patches <= arguments.patches:
        parser.error(f"--baseline-patches {arguments.baseline_patches} is invalid: use 1 to --patches")
    return arguments


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_unet(full_sd15: bool, dtype: torch.dtype, device: torch.device, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    config = SD15_UNET_CONFIG if full_sd15 else REDUCED_UNET_CONFIG
    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval()
    unet.requires_grad_(False)
    return unet


def make_inputs(
    n_patches: int, cross_attention_dim: int, seed: int
) -> tuple[torch.Tensor, list[tuple[str, int, int]], torch.Tensor, torch.Tensor]:
    """Return stand-in latents, noise keys, prompt embeddings and empty-prompt embeddings on the CPU.

    The latents are seeded standard normal, about the spread of Stable Diffusion's scaled VAE latents.
    The embeddings are seeded random too, one prompt per patch and one empty prompt repeated.
    """
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((n_patches, 4, 32, 32), generator=generator)
    keys = [(SLIDE_IDENTITY, index // 64, index % 64) for index in range(n_patches)]
    prompt_embeds = torch.randn((n_patches, 77, cross_attention_dim), generator=generator)
    negative_prompt_embeds = torch.randn((1, 77, cross_attention_dim), generator=generator).expand(
        n_patches, -1, -1
    )
    return latents, keys, prompt_embeds, negative_prompt_embeds.contiguous()


def count_unet_flops(
    unet: torch.nn.Module, batch: int, cross_attention_dim: int, device: torch.device
) -> int:
    """Count the FLOPs of one UNet call on a 4x32x32 latent batch with torch's FLOP counter."""
    dtype = next(unet.parameters()).dtype
    sample = torch.zeros((batch, 4, 32, 32), device=device, dtype=dtype)
    embeds = torch.zeros((batch, 77, cross_attention_dim), device=device, dtype=dtype)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        unet(sample, 500, encoder_hidden_states=embeds)
    return int(counter.get_total_flops())


def measure_matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measure the device's dense matrix multiply rate in FLOP/s for this dtype."""
    size = 8192 if device.type == "cuda" else 1024
    left = torch.randn((size, size), device=device, dtype=dtype)
    right = torch.randn((size, size), device=device, dtype=dtype)
    left @ right
    synchronize(device)
    repeats = 20 if device.type == "cuda" else 3
    started = time.perf_counter()
    for _ in range(repeats):
        left @ right
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def make_pipeline(unet: torch.nn.Module, sampler: str) -> StableDiffusionImg2ImgPipeline:
    # The baseline a user would write: img2img with prompt embeddings and latents in, latents out.
    scheduler_class = DDIMScheduler if sampler == "ddim" else PNDMScheduler
    pipeline = StableDiffusionImg2ImgPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler_class.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_strength(pipeline: StableDiffusionImg2ImgPipeline, steps: int, start_timestep: int) -> float:
    """Return the img2img strength whose first timestep is the grid step nearest ``start_timestep``.

    img2img runs ``scheduler.timesteps[steps - int(steps * strength):]``. DDIM's list is the grid, so
    the grid index ``i`` needs ``(steps - i) / steps``. PNDM's list repeats its second entry, so from
    index 1 on it needs one step less strength, ``(steps - i - 1) / steps``.
    """
    grid = timestep_grid(SD15_SCHEDULER_CONFIG, steps)
    index = start_grid_index(grid, start_timestep)
    shift = 1 if isinstance(pipeline.scheduler, PNDMScheduler) and index >= 1 else 0
    strength = (steps - index - shift) / steps
    pipeline.scheduler.set_timesteps(steps)
    timesteps, _ = pipeline.get_timesteps(steps, strength, "cpu")
    if int(timesteps[0]) != grid[index]:
        raise RuntimeError(f"strength {strength} starts img2img at {int(timesteps[0])}, not at {grid[index]}")
    return strength


def run_ours(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    keys: list[tuple[str, int, int]],
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    arguments: argparse.Namespace,
    steps: int,
    device: torch.device,
) -> tuple[float, torch.Tensor]:
    batch_size = arguments.batch_size or len(keys)
    noise = patch_noise(keys, arguments.seed)
    guided = arguments.guidance > 1
    outputs = []
    synchronize(device)
    started = time.perf_counter()
    for first in range(0, len(keys), batch_size):
        batch = slice(first, first + batch_size)
        outputs.append(
            reconstruct_latents(
                unet,
                SD15_SCHEDULER_CONFIG,
                latents[batch].to(device),
                noise[batch].to(device),
                prompt_embeds[batch].to(device),
                negative_prompt_embeds[batch].to(device) if guided else None,
                start_timestep=arguments.start,
                num_inference_steps=steps,
                sampler=arguments.sampler,
                guidance_scale=arguments.guidance,
            )
        )
    synchronize(device)
    return time.perf_counter() - started, torch.cat(outputs).cpu()


def run_pipeline(
    pipeline: StableDiffusionImg2ImgPipeline,
    latents: torch.Tensor,
    keys: list[tuple[str, int, int]],
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    arguments: argparse.Namespace,
    strength: float,
    device: torch.device,
) -> tuple[float, torch.Tensor]:
    dtype = next(pipeline.unet.parameters()).dtype
    outputs = []
    synchronize(device)
    started = time.perf_counter()
    for index, key in enumerate(keys):
        # A generator seeded like patch_noise's makes the pipeline draw the same noise for this patch.
        generator = torch.Generator().manual_seed(patch_seed(arguments.seed, *key))
        result = pipeline(
            image=latents[index : index + 1].to(device, dtype),
            prompt_embeds=prompt_embeds[index : index + 1].to(device, dtype),
            negative_prompt_embeds=negative_prompt_embeds[index : index + 1].to(device, dtype),
            strength=strength,
            num_inference_steps=arguments.steps,
            guidance_scale=arguments.guidance,
            generator=generator,
            output_type="latent",
        )
        outputs.append(result.images.float())
    synchronize(device)
    return time.perf_counter() - started, torch.cat(outputs).cpu()


def record_unet_batches(unet: torch.nn.Module, action: Callable[[], T]) -> tuple[list[int], T]:
    """Run ``action`` and return the batch size of each UNet call it made, and its result."""
    batches: list[int] = []

    def record(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        batches.append(int(sample.shape[0]))

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = action()
    finally:
        handle.remove()
    return batches, result


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def cpu_model_name() -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def hardware_description(device: torch.device) -> dict[str, Any]:
    description: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": cpu_model_name() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # Other processes on a shared machine make the absolute figures noisy.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def trade_off_rows(
    unet: torch.nn.Module,
    inputs: tuple[torch.Tensor, list[tuple[str, int, int]], torch.Tensor, torch.Tensor],
    arguments: argparse.Namespace,
    reference_seconds: float,
    reference: torch.Tensor,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Time fewer grid steps from the same start and measure how far latents and latent-MSE scores move."""
    latents = inputs[0]
    reference_scores = ((reference - latents) ** 2).mean(dim=(1, 2, 3))
    grid = timestep_grid(SD15_SCHEDULER_CONFIG, arguments.steps)
    rows = [
        {
            "num_inference_steps": arguments.steps,
            "start_grid_timestep": grid[start_grid_index(grid, arguments.start)],
            "denoising_steps": len(grid) - start_grid_index(grid, arguments.start),
            "seconds": reference_seconds,
            "patches_per_second": len(latents) / reference_seconds,
            "latent_change": 0.0,
            "score_change": 0.0,
            "score_rank_correlation": 1.0,
        }
    ]
    for steps in arguments.trade_off_steps:
        seconds, result = run_ours(unet, *inputs, arguments, steps, device)
        scores = ((result - latents) ** 2).mean(dim=(1, 2, 3))
        grid = timestep_grid(SD15_SCHEDULER_CONFIG, steps)
        index = start_grid_index(grid, arguments.start)
        correlation = (
            float(spearmanr(scores, reference_scores).statistic) if len(latents) > 2 else float("nan")
        )
        rows.append(
            {
                "num_inference_steps": steps,
                "start_grid_timestep": grid[index],
                "denoising_steps": len(grid) - index,
                "seconds": seconds,
                "patches_per_second": len(latents) / seconds,
                "latent_change": relative_difference(result, reference),
                "score_change": float(((scores - reference_scores).abs() / reference_scores).mean()),
                "score_rank_correlation": correlation,
            }
        )
    return rows


def markdown_tables(report: dict[str, Any]) -> str:
    settings = report["settings"]
    sides = report["sides"]
    lines = [
        f"UNet: {settings['unet']} ({report['unet_flops_per_call'] / 1e9:.3g} GFLOP per call at batch 1), "
        f"{settings['dtype']}, {settings['device']}{', compiled' if settings['compile'] else ''}; "
        f"{settings['sampler'].upper()}, {settings['steps']}-step grid, start {settings['start']}, "
        f"guidance {settings['guidance']}, {settings['patches']} patches.",
        "",
        "| run | patches | UNet calls per patch | UNet batch | seconds | patches/s | achieved GFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in sides:
        lines.append(
            f"| {side['name']} | {side['patches']} | {side['unet_calls_per_patch']} | {side['unet_batch']} "
            f"| {side['seconds']:.1f} "
            f"| {side['patches_per_second']:.3f} | {side['achieved_flops'] / 1e9:.1f} |"
        )
    lines += [
        "",
        f"Speed-up (patches/s, batched over per-patch pipeline): **{report['speedup']:.2f}x**. "
        f"Relative difference of the reconstructed latents: {report['result_difference']:.2e}. "
        f"Measured {settings['dtype']} matrix multiply rate: {report['matmul_flops'] / 1e9:.1f} GFLOP/s.",
    ]
    if report["trade_off"]:
        lines += [
            "",
            "| grid steps | start on grid | denoising steps | seconds | patches/s | latent change | "
            "latent-MSE score change | score rank correlation |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in report["trade_off"]:
            lines.append(
                f"| {row['num_inference_steps']} | {row['start_grid_timestep']} | {row['denoising_steps']} "
                f"| {row['seconds']:.1f} | {row['patches_per_second']:.3f} | {row['latent_change']:.3f} "
                f"| {row['score_change']:.3f} | {row['score_rank_correlation']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    arguments = parse_arguments(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    dtype = getattr(torch, arguments.dtype)
    unet = build_unet(arguments.full_sd15, dtype, device, arguments.seed)
    cross_attention_dim = unet.config.cross_attention_dim
    flops_per_call = count_unet_flops(unet, 1, cross_attention_dim, device)
    if arguments.compile:
        unet = torch.compile(unet)
    inputs = make_inputs(arguments.patches, cross_attention_dim, arguments.seed)
    pipeline = make_pipeline(unet, arguments.sampler)
    strength = pipeline_strength(pipeline, arguments.steps, arguments.start)
    n_patches = arguments.patches
    batch_size = arguments.batch_size or n_patches
    n_baseline = arguments.baseline_patches or n_patches
    baseline_inputs = (
        inputs[0][:n_baseline],
        inputs[1][:n_baseline],
        inputs[2][:n_baseline],
        inputs[3][:n_baseline],
    )

    # Warm up kernels (and compilation) at the batch sizes the timed runs use, with 3 steps each.
    warm_up = argparse.Namespace(**{**vars(arguments), "start": 20})
    first_patch = (inputs[0][:1], inputs[1][:1], inputs[2][:1], inputs[3][:1])
    run_ours(unet, *inputs, warm_up, arguments.steps, device)
    run_pipeline(pipeline, *first_patch, warm_up, pipeline_strength(pipeline, arguments.steps, 20), device)

    ours_batches, (ours_seconds, ours_result) = record_unet_batches(
        unet, lambda: run_ours(unet, *inputs, arguments, arguments.steps, device)
    )
    pipeline_batches, (pipeline_seconds, pipeline_result) = record_unet_batches(
        unet, lambda: run_pipeline(pipeline, *baseline_inputs, arguments, strength, device)
    )

    sides = [
        SideResult(
            name="reconstruct_latents, batched",
            seconds=ours_seconds,
            patches=n_patches,
            unet_calls_per_patch=len(ours_batches) * batch_size // n_patches,
            unet_batch=max(ours_batches),
        ),
        SideResult(
            name="StableDiffusionImg2ImgPipeline, per patch",
            seconds=pipeline_seconds,
            patches=n_baseline,
            unet_calls_per_patch=len(pipeline_batches) // n_baseline,
            unet_batch=max(pipeline_batches),
        ),
    ]
    guidance_factor = 2 if arguments.guidance > 1 else 1
    side_rows = []
    for side in sides:
        flops_per_patch = side.unet_calls_per_patch * guidance_factor * flops_per_call
        side_rows.append(
            {
                **asdict(side),
                "patches_per_second": side.patches_per_second,
                "achieved_flops": flops_per_patch * side.patches_per_second,
            }
        )

    report: dict[str, Any] = {
        "command": "python "
        + shlex.join(["benchmarks/throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "hardware": hardware_description(device),
        "settings": {
            **{key: value for key, value in vars(arguments).items() if key != "out"},
            "unet": "Stable Diffusion 1.5 architecture" if arguments.full_sd15 else "reduced SD1.5 layout",
            "unet_config": SD15_UNET_CONFIG if arguments.full_sd15 else REDUCED_UNET_CONFIG,
            "pipeline_strength": strength,
        },
        "unet_flops_per_call": flops_per_call,
        "sides": side_rows,
        "speedup": sides[0].patches_per_second / sides[1].patches_per_second,
        "result_difference": relative_difference(ours_result[:n_baseline], pipeline_result),
        "matmul_flops": measure_matmul_rate(device, dtype),
        "trade_off": trade_off_rows(unet, inputs, arguments, ours_seconds, ours_result, device)
        if arguments.trade_off_steps
        else [],
    }

    label = "-".join(
        [
            device.type,
            "sd15" if arguments.full_sd15 else "reduced",
            arguments.dtype,
            arguments.sampler,
            *(["compiled"] if arguments.compile else []),
        ]
    )
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / f"throughput-{label}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    tables = markdown_tables(report)
    (arguments.out / f"throughput-{label}.md").write_text(f"`{report['command']}`\n\n{tables}")
    print(tables)
    return report


if __name__ == "__main__":
    main()
