"""Training of the VAE density family: the VAE and its background model in one run, on 64 px crops.

Both VAEs minimise the negative ELBO (one posterior sample, analytic KL) in bits per dimension, each
with its own Adam optimiser. The ``"model"`` VAE trains on the normal crops. The ``"background"`` VAE
trains on the same crops with each pixel replaced by uniform noise at the perturbation rate (Ren et
al., 2019), optionally with an L2 penalty through Adam's weight decay. The bundle contains both.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import torch

from napari_anopilad.method.baselines.base import BaselineSettings
from napari_anopilad.method.baselines.vae_density import (
    COMPRESSORS,
    DEFAULT_CHANNELS,
    INPUT_SIZE,
    LATENT_DIM,
    METHOD,
    SCORE_NAMES,
    ConvVAE,
    VaeConfig,
    VaeDensityOptions,
    evidence_lower_bound,
    nats_to_bits_per_dimension,
    perturb_pixels,
)
from napari_anopilad.training.baselines import add_training_arguments, config_from_args, train_baseline
from napari_anopilad.training.lora import derive_seed


class VaeDensityTrainer:
    """The VAE and the background VAE with their optimisers, for :func:`train_baseline`.

    Parameters
    ----------
    config
        Architecture of both VAEs.
    learning_rate
        Adam learning rate of both.
    device
        Torch device.
    seed
        Seed of the initial weights.
    perturbation_rate
        Probability that a pixel of a background training crop is replaced by uniform noise.
    background_weight_decay
        Adam weight decay (L2 penalty) of the background model.
    settings
        Default scoring settings written into the bundle.
    """

    method = METHOD

    def __init__(
        self,
        config: VaeConfig,
        *,
        learning_rate: float,
        device: str | torch.device = "cpu",
        seed: int = 0,
        perturbation_rate: float = 0.2,
        background_weight_decay: float = 0.0,
        settings: BaselineSettings | None = None,
    ) -> None:
        if not 0.0 <= perturbation_rate <= 1.0:
            raise ValueError(f"perturbation rate {perturbation_rate} is invalid: use a value in [0, 1]")
        if background_weight_decay < 0:
            raise ValueError(f"background weight decay {background_weight_decay} is invalid: use 0 or more")
        self.config = config
        self.device = torch.device(device)
        self.perturbation_rate = perturbation_rate
        self.background_weight_decay = background_weight_decay
        self.settings = settings or BaselineSettings(
            method=METHOD, score="nll", options=VaeDensityOptions().to_dict()
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, 0, 2))
            self.model = ConvVAE(config).to(self.device)
            self.background = ConvVAE(config).to(self.device)
        self.model_optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate)
        self.background_optimizer = torch.optim.Adam(
            self.background.parameters(), lr=learning_rate, weight_decay=background_weight_decay
        )

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "background": self.background}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self.model_optimizer, "background": self.background_optimizer}

    def bundle_parts(self) -> dict[str, torch.nn.Module]:
        return self.modules()

    def model_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    def default_settings(self) -> BaselineSettings:
        return self.settings

    def training_step(self, pixels: torch.Tensor, step: int, generator: torch.Generator) -> dict[str, float]:
        """Take one Adam step of each VAE; return both negative ELBOs in bits per dimension."""
        if pixels.shape[-1] != self.config.input_size or pixels.shape[-2] != self.config.input_size:
            raise ValueError(
                f"training crops are {tuple(pixels.shape[-2:])} px: the VAE takes "
                f"{self.config.input_size} px crops (--crop-size {self.config.input_size})"
            )
        batch = pixels.shape[0]
        perturbed = perturb_pixels(pixels, self.perturbation_rate, generator)
        losses = {}
        for name, network, optimizer, inputs in (
            ("model_bits_per_dim", self.model, self.model_optimizer, pixels),
            ("background_bits_per_dim", self.background, self.background_optimizer, perturbed),
        ):
            noise = torch.randn((1, batch, self.config.latent_dim), generator=generator).to(self.device)
            mean, log_var = network.encode(inputs)

            def log_likelihood(
                latents: torch.Tensor, network: ConvVAE = network, inputs: torch.Tensor = inputs
            ) -> torch.Tensor:
                return network.log_likelihood(inputs, latents)

            elbo = evidence_lower_bound(log_likelihood, mean, log_var, noise)
            loss = nats_to_bits_per_dimension(-elbo, self.config.dimensions).mean().float()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[name] = float(loss.detach())
        return losses


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_vae_density.py",
        description=(
            "Train the VAE density family (NLL, likelihood Regret, likelihood ratio, input complexity): "
            "a convolutional VAE on normal 64 px crops and its background model on perturbed crops."
        ),
    )
    add_training_arguments(parser, steps=20000, batch_size=64, crop_size=INPUT_SIZE, learning_rate=1e-3)
    parser.add_argument(
        "--latent-dim",
        type=int,
        default=LATENT_DIM,
        help=f"size of the Gaussian latent (default {LATENT_DIM})",
    )
    parser.add_argument(
        "--channels",
        default=",".join(str(count) for count in DEFAULT_CHANNELS),
        help="comma-separated output channels of the encoder's stride-2 convolutions "
        f"(default {','.join(str(count) for count in DEFAULT_CHANNELS)})",
    )
    parser.add_argument(
        "--perturbation-rate",
        type=float,
        default=0.2,
        help="probability that a pixel of a background training crop becomes uniform noise (default 0.2)",
    )
    parser.add_argument(
        "--background-weight-decay",
        type=float,
        default=0.0,
        help="Adam weight decay (L2 penalty) of the background model (default 0)",
    )
    defaults = VaeDensityOptions()
    parser.add_argument("--score", default="nll", choices=SCORE_NAMES, help="default score of the bundle")
    parser.add_argument(
        "--importance-samples",
        type=int,
        default=defaults.importance_samples,
        help=f"posterior samples of the NLL estimate (default {defaults.importance_samples})",
    )
    parser.add_argument(
        "--regret-steps",
        type=int,
        default=defaults.regret_steps,
        help=f"Adam steps on each input's posterior for the Regret (default {defaults.regret_steps})",
    )
    parser.add_argument(
        "--regret-learning-rate",
        type=float,
        default=defaults.regret_learning_rate,
        help=f"Adam learning rate of the Regret's steps (default {defaults.regret_learning_rate})",
    )
    parser.add_argument(
        "--compressor",
        default=defaults.compressor,
        choices=COMPRESSORS,
        help=f"lossless compressor of the complexity score (default {defaults.compressor})",
    )
    parser.add_argument("--name", default=None, help="bundle name shown in the dock")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Train both VAEs from command-line arguments and write the bundle; return the exit status."""
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if config.crop_size != INPUT_SIZE:
        raise SystemExit(
            f"error: --crop-size {config.crop_size} is invalid: the {METHOD} scorer reads {INPUT_SIZE} px crops"
        )
    if not math.isfinite(args.perturbation_rate) or not 0.0 <= args.perturbation_rate <= 1.0:
        raise SystemExit(
            f"error: --perturbation-rate {args.perturbation_rate} is invalid: use a value in [0, 1]"
        )
    try:
        channels = tuple(int(count) for count in args.channels.split(","))
    except ValueError as error:
        raise SystemExit(
            f"error: --channels {args.channels!r} is invalid: give comma-separated integers such as 32,64,128,256"
        ) from error
    try:
        architecture = VaeConfig(latent_dim=args.latent_dim, channels=channels, input_size=INPUT_SIZE)
        options = VaeDensityOptions(
            importance_samples=args.importance_samples,
            regret_steps=args.regret_steps,
            regret_learning_rate=args.regret_learning_rate,
            compressor=args.compressor,
        )
        trainer = VaeDensityTrainer(
            architecture,
            learning_rate=config.learning_rate,
            device=config.device,
            seed=config.seed,
            perturbation_rate=args.perturbation_rate,
            background_weight_decay=args.background_weight_decay,
            settings=BaselineSettings(method=METHOD, score=args.score, options=options.to_dict()),
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    bundle = train_baseline(trainer, config, name=args.name)
    print(
        f"{METHOD} bundle written to {bundle}; calibrate it with training/06_calibrate.py PATCHES --bundle {bundle}"
    )
    return 0
