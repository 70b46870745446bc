"""Training of the AE and MemAE comparison methods on the normal training patches.

Both train on whole 256 px patches with Adam. The AE minimises the reconstruction MSE in [-1, 1] pixel
units; MemAE minimises the MSE plus ``entropy_weight`` times the entropy of its shrunk memory weights,
averaged over the positions of the feature map (Gong et al., ICCV 2019). The shared trainer
(:mod:`napari_anopilad.training.baselines`) draws the batches, resumes and writes the bundle.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from napari_anopilad.method.baselines.autoencoders import (
    AE,
    DEFAULT_CHANNELS,
    DEFAULT_ENTROPY_WEIGHT,
    DEFAULT_LATENT_CHANNELS,
    DEFAULT_MEMORY_ITEMS,
    MEMAE,
    AutoencoderConfig,
    ConvAutoencoder,
    MemAE,
    addressing_entropy,
    build_network,
    default_settings,
)
from napari_anopilad.method.baselines.base import PATCH_SIZE, BaselineSettings
from napari_anopilad.training.baselines import (
    CHECKPOINT_DIR,
    STATE_NAME,
    BaselineTrainingConfig,
    add_training_arguments,
    config_from_args,
    option_differences,
    train_baseline,
)
from napari_anopilad.training.scoring import read_bundle_spec, write_bundle_spec

# The options that the shared checkpoint does not record; a resumed run must use the same.
OPTIONS_NAME = "autoencoder_options.json"
DEFAULT_STEPS = 20000
DEFAULT_BATCH_SIZE = 16
DEFAULT_LEARNING_RATE = 1e-4


class AutoencoderTrainer:
    """One AE or MemAE with its Adam optimiser, for :func:`train_baseline`.

    Parameters
    ----------
    method
        ``"ae"`` or ``"memae"``.
    config
        The architecture.
    learning_rate
        Adam learning rate.
    device
        Torch device of the network.
    seed
        Seed of the initial weights.
    entropy_weight
        ``alpha``, the weight of the memory-addressing entropy in MemAE's loss (unused by the AE).
    """

    def __init__(
        self,
        method: str,
        config: AutoencoderConfig,
        learning_rate: float,
        device: str | torch.device = "cpu",
        seed: int = 0,
        entropy_weight: float = DEFAULT_ENTROPY_WEIGHT,
    ) -> None:
        self.method = method
        self.config = config
        self.entropy_weight = entropy_weight
        # The initial weights depend on the seed only, not on the global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = build_network(method, config)
        self.network.to(device)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=learning_rate)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.network}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self.optimizer}

    def training_step(self, pixels: torch.Tensor, step: int, generator: torch.Generator) -> dict[str, float]:
        """Run one Adam step on ``(b, 3, 256, 256)`` pixels in [-1, 1]; return ``loss``, ``mse`` and MemAE's ``entropy``."""
        self.optimizer.zero_grad(set_to_none=True)
        losses: dict[str, torch.Tensor] = {}
        if isinstance(self.network, MemAE):
            reconstructions, weights = self.network(pixels)
            losses["mse"] = F.mse_loss(reconstructions, pixels)
            losses["entropy"] = addressing_entropy(weights).mean()
            loss = losses["mse"] + self.entropy_weight * losses["entropy"]
        else:
            assert isinstance(self.network, ConvAutoencoder)
            losses["mse"] = F.mse_loss(self.network(pixels), pixels)
            loss = losses["mse"]
        loss.backward()
        self.optimizer.step()
        return {
            "loss": float(loss.detach()),
            **{name: float(value.detach()) for name, value in losses.items()},
        }

    def model_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    def default_settings(self) -> BaselineSettings:
        return default_settings(self.method)

    def bundle_parts(self) -> dict[str, torch.nn.Module]:
        return {"model": self.network}

    def options(self) -> dict[str, Any]:
        """Return the method's own training options: the architecture and, for MemAE, the entropy weight."""
        options: dict[str, Any] = {"method": self.method, "model": self.model_config()}
        if self.method == MEMAE:
            options["entropy_weight"] = self.entropy_weight
        return options


def build_parser(method: str) -> argparse.ArgumentParser:
    """Return the command-line parser of ``training/train_<method>.py``."""
    name = "AE" if method == AE else "MemAE"
    parser = argparse.ArgumentParser(
        prog=f"train_{method}.py",
        description=f"Train the {name} comparison method on the normal patches of a manifest; "
        "calibrate the bundle afterwards with training/06_calibrate.py.",
    )
    add_training_arguments(
        parser,
        steps=DEFAULT_STEPS,
        batch_size=DEFAULT_BATCH_SIZE,
        crop_size=PATCH_SIZE,
        learning_rate=DEFAULT_LEARNING_RATE,
    )
    default_channels = ",".join(str(width) for width in DEFAULT_CHANNELS)
    parser.add_argument(
        "--channels",
        default=default_channels,
        help=f"comma-separated widths of the encoder's stride-2 convolutions (default {default_channels})",
    )
    parser.add_argument(
        "--latent-channels",
        type=int,
        default=DEFAULT_LATENT_CHANNELS,
        help=f"channels of the encoder output (default {DEFAULT_LATENT_CHANNELS})",
    )
    if method == MEMAE:
        parser.add_argument(
            "--memory-items",
            type=int,
            default=DEFAULT_MEMORY_ITEMS,
            help=f"number of memory items N (default {DEFAULT_MEMORY_ITEMS})",
        )
        parser.add_argument(
            "--shrink-threshold",
            type=float,
            default=None,
            help="hard-shrinkage threshold lambda (default 1/N)",
        )
        parser.add_argument(
            "--entropy-weight",
            type=float,
            default=DEFAULT_ENTROPY_WEIGHT,
            help=f"weight alpha of the addressing entropy in the loss (default {DEFAULT_ENTROPY_WEIGHT})",
        )
    return parser


def architecture_from_args(args: argparse.Namespace, method: str) -> AutoencoderConfig:
    """Build the architecture from parsed arguments; a bad value exits with its message."""
    try:
        channels = tuple(int(width) for width in str(args.channels).split(",") if width.strip())
    except ValueError as error:
        raise SystemExit(
            f"error: --channels {args.channels!r} is invalid: give integers such as 32,64,128"
        ) from error
    try:
        return AutoencoderConfig(
            channels=channels,
            latent_channels=args.latent_channels,
            memory_items=args.memory_items if method == MEMAE else None,
            shrink_threshold=args.shrink_threshold if method == MEMAE else None,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error


def check_resume_options(config: BaselineTrainingConfig, options: dict[str, Any]) -> None:
    """Record the method's options in the run folder, or exit if a checkpoint there was trained with others."""
    path = config.output / OPTIONS_NAME
    has_checkpoint = (config.output / CHECKPOINT_DIR / STATE_NAME).is_file()
    if has_checkpoint and path.is_file():
        changed = option_differences(json.loads(path.read_text()), options)
        if changed:
            raise SystemExit(
                f"error: {config.output} was trained with other options ({'; '.join(changed)}; recorded in "
                f"{path}); resume with the same options or use another --output"
            )
    config.output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(options, indent=2) + "\n")


def train_autoencoder(
    trainer: AutoencoderTrainer, config: BaselineTrainingConfig, *, progress: bool = True
) -> Path:
    """Train an AE or MemAE and write its bundle, with the method's options under ``"training"``; return the bundle folder."""
    if config.crop_size != PATCH_SIZE:
        raise SystemExit(
            f"error: --crop-size {config.crop_size} is invalid for {trainer.method}: it trains and scores "
            f"whole {PATCH_SIZE} px patches; use {PATCH_SIZE}"
        )
    options = trainer.options()
    check_resume_options(config, options)
    bundle = train_baseline(trainer, config, progress=progress)
    spec = read_bundle_spec(bundle)
    spec["training"] = {
        **spec.get("training", {}),
        **{key: value for key, value in options.items() if key not in ("method", "model")},
    }
    write_bundle_spec(bundle, spec)
    return bundle


def main(argv: Sequence[str] | None = None, *, method: str = AE) -> int:
    """Train an AE (``method="ae"``) or MemAE (``method="memae"``) from command-line arguments; return 0."""
    if method not in (AE, MEMAE):
        raise ValueError(f"method {method!r} is not an autoencoder method: use {AE!r} or {MEMAE!r}")
    args = build_parser(method).parse_args(argv)
    config = config_from_args(args)
    architecture = architecture_from_args(args, method)
    trainer = AutoencoderTrainer(
        method,
        architecture,
        learning_rate=config.learning_rate,
        device=config.device,
        seed=config.seed,
        entropy_weight=getattr(args, "entropy_weight", DEFAULT_ENTROPY_WEIGHT),
    )
    bundle = train_autoencoder(trainer, config)
    print(f"{method} bundle written to {bundle}; calibrate it with training/06_calibrate.py")
    return 0
