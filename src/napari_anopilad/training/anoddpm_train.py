"""Train AnoDDPM's pixel-space DDPM on normal 256 px patches and write an ``anoddpm`` bundle.

The UNet (diffusers ``UNet2DModel``) learns DDPM's simple objective: predict the noise added to a
patch at a uniformly drawn timestep of the noise schedule. The bundle also carries the LPIPS backbone
given with ``--lpips-backbone`` (torchvision's ``features`` of VGG16 or AlexNet as safetensors, for
example an AnoPILaD bundle's ``lpips/vgg16_features.safetensors``), so its ``lpips`` score needs no
download. Calibrate the bundle afterwards with ``training/06_calibrate.py PATCHES --bundle OUTPUT/bundle``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from napari_anopilad.method.baselines.anoddpm import (
    DEFAULT_OPTIONS,
    METHOD,
    SCORE_NAMES,
    build_unet,
    check_options,
    ddpm_loss,
)
from napari_anopilad.method.baselines.base import PATCH_SIZE, BaselineSettings
from napari_anopilad.method.diffusion import SAMPLERS, alphas_cumprod
from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.perceptual import (
    CLASSIFIER_PREFIX,
    LPIPS_NETS,
    build_backbone_features,
    check_lpips_backbone,
)
from napari_anopilad.method.weights import read_state_dict
from napari_anopilad.training.baselines import add_training_arguments, config_from_args, train_baseline

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# The UNet and noise schedule of a run folder, checked when a run resumes.
MODEL_RECORD_NAME = "anoddpm_model.json"


def unet_config(
    block_out_channels: Sequence[int],
    layers_per_block: int,
    attention_levels: Sequence[int],
    norm_num_groups: int,
    mid_attention: bool = True,
) -> dict[str, Any]:
    """Return a 256 px RGB ``UNet2DModel`` configuration.

    Parameters
    ----------
    block_out_channels
        Channels of each resolution level, highest resolution first; each level but the last halves the size.
    layers_per_block
        ResNet layers per level.
    attention_levels
        Indices of the levels whose down and up blocks have self-attention.
    norm_num_groups
        GroupNorm groups; must divide every channel count.
    mid_attention
        Self-attention in the middle block, at the lowest resolution. Its cost grows with the square of
        that resolution's pixel count, so UNets with few levels are much faster without it.
    """
    levels = len(block_out_channels)
    bad_levels = [level for level in attention_levels if not 0 <= level < levels]
    if bad_levels:
        raise ValueError(f"attention levels {bad_levels} are invalid: use 0 to {levels - 1}")
    bad_channels = [channels for channels in block_out_channels if channels % norm_num_groups]
    if bad_channels:
        raise ValueError(
            f"norm groups {norm_num_groups} do not divide the channels {bad_channels}: use a common divisor"
        )
    down = ["AttnDownBlock2D" if level in attention_levels else "DownBlock2D" for level in range(levels)]
    up = ["AttnUpBlock2D" if level in attention_levels else "UpBlock2D" for level in reversed(range(levels))]
    return {
        "sample_size": PATCH_SIZE,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [int(channels) for channels in block_out_channels],
        "layers_per_block": int(layers_per_block),
        "down_block_types": down,
        "up_block_types": up,
        "norm_num_groups": int(norm_num_groups),
        "add_attention": bool(mid_attention),
    }


def scheduler_config(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> dict[str, Any]:
    """Return the configuration of diffusers' ``DDPMScheduler`` with this noise schedule, ``clip_sample`` off."""
    from diffusers import DDPMScheduler

    # diffusers registers `config` at run time, so mypy does not see it.
    scheduler: Any = DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        clip_sample=False,
    )
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}


def read_lpips_backbone(net: str, path: Path) -> dict[str, torch.Tensor]:
    """Read and check an LPIPS backbone file; return its ``features`` parameters by torchvision's names."""
    check_lpips_backbone(net, path)
    return {
        key.removeprefix("features."): value
        for key, value in read_state_dict(path, "LPIPS backbone").items()
        if not key.startswith(CLASSIFIER_PREFIX)
    }


class AnoDDPMTrainer:
    """The UNet, its Adam optimiser and the DDPM training step, for :func:`train_baseline`.

    Parameters
    ----------
    unet
        ``UNet2DModel`` configuration (:func:`unet_config`).
    scheduler
        Noise schedule (:func:`scheduler_config`).
    lpips_net, lpips_backbone
        LPIPS backbone name and its weights, copied into the bundle.
    learning_rate, seed, device
        As named; ``seed`` sets the UNet's initial weights.
    settings
        Default scoring settings of the bundle.
    """

    method = METHOD

    def __init__(
        self,
        unet: dict[str, Any],
        scheduler: dict[str, Any],
        lpips_net: str,
        lpips_backbone: dict[str, torch.Tensor],
        learning_rate: float,
        seed: int,
        device: str | torch.device,
        settings: BaselineSettings,
    ) -> None:
        self.unet_config = unet
        self.scheduler_config = scheduler
        self.lpips_net = lpips_net
        self.settings = settings
        self.num_train_timesteps = int(scheduler["num_train_timesteps"])
        self.alphas = alphas_cumprod(scheduler).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.unet = build_unet(unet).to(device)
        self.optimizer = torch.optim.Adam(self.unet.parameters(), lr=learning_rate)
        self.backbone = build_backbone_features(lpips_net)
        self.backbone.load_state_dict(lpips_backbone, strict=True)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.unet}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self.optimizer}

    def training_step(self, pixels: torch.Tensor, step: int, generator: torch.Generator) -> dict[str, float]:
        """Take one Adam step on DDPM's loss; timesteps and noise are drawn from ``generator`` on the CPU."""
        timesteps = torch.randint(0, self.num_train_timesteps, (pixels.shape[0],), generator=generator)
        noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.device)
        loss = ddpm_loss(self.unet, self.alphas, pixels, timesteps.to(pixels.device), noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach())}

    def model_config(self) -> dict[str, Any]:
        return {
            "unet": self.unet_config,
            "scheduler": self.scheduler_config,
            "lpips": {"net": self.lpips_net},
        }

    def default_settings(self) -> BaselineSettings:
        return self.settings

    def bundle_parts(self) -> dict[str, torch.nn.Module]:
        return {"model": self.unet, "lpips": self.backbone}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_anoddpm.py",
        description="Train AnoDDPM's pixel-space DDPM on normal 256 px patches and write its bundle.",
    )
    add_training_arguments(parser, steps=50000, batch_size=8, crop_size=PATCH_SIZE, learning_rate=1e-4)

    model = parser.add_argument_group("UNet2DModel")
    model.add_argument(
        "--block-out-channels",
        default="128,128,256,256,512,512",
        help="channels of each resolution level, comma-separated (default 128,128,256,256,512,512)",
    )
    model.add_argument("--layers-per-block", type=int, default=2, help="ResNet layers per level (default 2)")
    model.add_argument(
        "--attention-levels",
        default="4",
        help="comma-separated indices of the levels with self-attention, empty for none (default 4, at 16 px)",
    )
    model.add_argument("--norm-num-groups", type=int, default=32, help="GroupNorm groups (default 32)")
    model.add_argument(
        "--mid-attention",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="self-attention in the middle block at the lowest resolution (default on)",
    )

    schedule = parser.add_argument_group("noise schedule")
    schedule.add_argument(
        "--num-train-timesteps", type=int, default=1000, help="training timesteps (default 1000)"
    )
    schedule.add_argument(
        "--beta-schedule", choices=BETA_SCHEDULES, default="linear", help="beta schedule (default linear)"
    )
    schedule.add_argument("--beta-start", type=float, default=0.0001, help="first beta (default 0.0001)")
    schedule.add_argument("--beta-end", type=float, default=0.02, help="last beta (default 0.02)")

    scoring = parser.add_argument_group("scoring defaults written to the bundle")
    scoring.add_argument(
        "--lpips-backbone",
        type=Path,
        required=True,
        help="safetensors file with torchvision's VGG16 (or AlexNet) features, copied into the bundle",
    )
    scoring.add_argument(
        "--lpips-net", choices=LPIPS_NETS, default="vgg", help="LPIPS backbone (default vgg)"
    )
    scoring.add_argument(
        "--score", choices=SCORE_NAMES, default=SCORE_NAMES[0], help="default score (default mse)"
    )
    scoring.add_argument(
        "--start-timestep",
        type=int,
        default=DEFAULT_OPTIONS["start_timestep"],
        help=f"timestep to noise patches to (default {DEFAULT_OPTIONS['start_timestep']})",
    )
    scoring.add_argument(
        "--num-inference-steps",
        type=int,
        default=DEFAULT_OPTIONS["num_inference_steps"],
        help=f"timestep grid size (default {DEFAULT_OPTIONS['num_inference_steps']})",
    )
    scoring.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=DEFAULT_OPTIONS["sampler"],
        help="denoising update (default ddim)",
    )
    return parser


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise SystemExit(f"error: {option} {text!r} is invalid: use comma-separated integers") from error


def main(argv: Sequence[str] | None = None) -> int:
    """Train from command-line arguments; return the exit status."""
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    channels = _integers(args.block_out_channels, "--block-out-channels")
    if not channels:
        raise SystemExit("error: --block-out-channels is empty: give one channel count per level")
    # Each level but the last halves the image, so a crop must divide down to whole pixels.
    reduction = 2 ** (len(channels) - 1)
    if config.crop_size % reduction:
        raise SystemExit(
            f"error: --crop-size {config.crop_size} is invalid for {len(channels)} UNet levels: "
            f"use a multiple of {reduction}"
        )
    try:
        unet = unet_config(
            channels,
            args.layers_per_block,
            _integers(args.attention_levels, "--attention-levels"),
            args.norm_num_groups,
            args.mid_attention,
        )
        scheduler = scheduler_config(
            args.num_train_timesteps, args.beta_schedule, args.beta_start, args.beta_end
        )
        options = check_options(
            {
                "start_timestep": args.start_timestep,
                "num_inference_steps": args.num_inference_steps,
                "sampler": args.sampler,
                "noise": "gaussian",
            },
            args.num_train_timesteps,
        )
        backbone = read_lpips_backbone(args.lpips_net, args.lpips_backbone)
    except (ValueError, BundleError) as error:
        raise SystemExit(f"error: {error}") from error
    check_run_model(config.output, {"unet": unet, "scheduler": scheduler})

    settings = BaselineSettings(method=METHOD, score=args.score, seed=0, options=options)
    trainer = AnoDDPMTrainer(
        unet, scheduler, args.lpips_net, backbone, config.learning_rate, config.seed, config.device, settings
    )
    bundle = train_baseline(trainer, config, name="AnoDDPM comparison model")
    print(f"wrote the AnoDDPM bundle to {bundle}; calibrate it with training/06_calibrate.py")
    return 0


def check_run_model(output: Path, model: dict[str, Any]) -> None:
    """Record the UNet and noise schedule of a run folder, or stop if a resumed run asks for others.

    The shared trainer's checkpoint compares only the optimisation options, so a resumed run with another
    architecture would otherwise fail deep inside ``load_state_dict``.
    """
    path = output / MODEL_RECORD_NAME
    if path.is_file():
        recorded = json.loads(path.read_text())
        changed = [
            f"{part}.{key}"
            for part in model
            for key in sorted(set(model[part]) | set(recorded.get(part, {})))
            if model[part].get(key) != recorded.get(part, {}).get(key)
        ]
        if changed:
            raise SystemExit(
                f"error: {output} was trained with another UNet or noise schedule ({', '.join(changed)}); "
                "resume with the same options or use another --output"
            )
        return
    output.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{path.name}")
    temporary.write_text(json.dumps(model, indent=2) + "\n")
    os.replace(temporary, path)
