"""Training of f-AnoGAN in two stages in one run: a WGAN-GP, then the izi_f encoder against it.

Steps ``0 .. gan_steps - 1`` train the generator ``G`` and the critic ``D`` (Gulrajani et al., 2017): each
step is one critic update on a batch of normal 64 px crops, loss ``D(G(z)) - D(x) + lambda * GP`` with
``lambda = 10``, and every ``n_critic``-th step is followed by one generator update, loss ``-D(G(z))``.
The remaining steps train the encoder ``E`` with ``G`` and ``D`` frozen (weights fixed, batch
normalisation in inference mode) on the izi_f loss of Schlegl et al. (2019),
``(1/n) ||x - G(E(x))||^2 + kappa * (1/n_d) ||f(x) - f(G(E(x)))||^2``.

The run resumes from ``OUTPUT/checkpoint`` like every comparison method's; ``OUTPUT/fanogan_options.json``
records the options below, and a resumed run with other options is rejected.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from napari_anopilad.method.baselines.base import BaselineSettings
from napari_anopilad.method.baselines.fanogan import (
    DEFAULT_CHANNELS,
    DEFAULT_KAPPA,
    DEFAULT_LATENT_DIM,
    IMAGE_SIZE,
    METHOD,
    Discriminator,
    Encoder,
    FAnoGANConfig,
    Generator,
    check_kappa,
    gradient_penalty,
    izif_residuals,
)
from napari_anopilad.training.baselines import (
    CHECKPOINT_DIR,
    STATE_NAME,
    add_training_arguments,
    config_from_args,
    option_differences,
    train_baseline,
)
from napari_anopilad.training.scoring import read_bundle_spec, write_bundle_spec

OPTIONS_NAME = "fanogan_options.json"
DEFAULT_GAN_STEPS = 100_000
DEFAULT_ENCODER_STEPS = 50_000
DEFAULT_N_CRITIC = 5
DEFAULT_GP_WEIGHT = 10.0
DEFAULT_ENCODER_LEARNING_RATE = 5e-5
# Adam betas of WGAN-GP (Gulrajani et al., 2017) for G and D. The encoder uses Adam's usual betas.
GAN_BETAS = (0.0, 0.9)
LOSS_NAMES = (
    "critic_loss",
    "wasserstein_distance",
    "gradient_penalty",
    "generator_loss",
    "encoder_loss",
    "image_residual",
    "feature_residual",
)


@dataclass(frozen=True)
class FAnoGANTrainingOptions:
    """The options of f-AnoGAN's training beyond those every comparison method shares.

    Attributes
    ----------
    gan_steps
        Steps of the WGAN-GP stage; every step is one critic update. The encoder stage follows.
    n_critic
        Critic updates per generator update.
    gp_weight
        Weight ``lambda`` of the gradient penalty.
    kappa
        Weight of the feature residual in the encoder loss and in the bundle's ``izif`` score.
    encoder_learning_rate
        Adam learning rate of the encoder stage.
    """

    gan_steps: int = DEFAULT_GAN_STEPS
    n_critic: int = DEFAULT_N_CRITIC
    gp_weight: float = DEFAULT_GP_WEIGHT
    kappa: float = DEFAULT_KAPPA
    encoder_learning_rate: float = DEFAULT_ENCODER_LEARNING_RATE

    def __post_init__(self) -> None:
        if self.gan_steps < 1:
            raise ValueError(f"GAN steps {self.gan_steps} is invalid: use 1 or more")
        if self.n_critic < 1:
            raise ValueError(f"n_critic {self.n_critic} is invalid: use 1 or more")
        if not math.isfinite(self.gp_weight) or self.gp_weight < 0:
            raise ValueError(
                f"gradient penalty weight {self.gp_weight} is invalid: use a finite number of 0 or more"
            )
        check_kappa(self.kappa)
        if not math.isfinite(self.encoder_learning_rate) or self.encoder_learning_rate <= 0:
            raise ValueError(
                f"encoder learning rate {self.encoder_learning_rate} is invalid: use a positive number"
            )


class FAnoGANTrainer:
    """The three f-AnoGAN networks, their Adam optimisers and the two-stage training step.

    Parameters
    ----------
    config
        Architecture of the networks.
    options
        Stage switch, critic updates, penalty and loss weights.
    learning_rate
        Adam learning rate of the generator and the critic.
    device
        Torch device of the networks.
    seed
        Seed of the initial weights.
    """

    method = METHOD

    def __init__(
        self,
        config: FAnoGANConfig,
        options: FAnoGANTrainingOptions,
        learning_rate: float = 1e-4,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        self.config = config
        self.options = options
        self.device = torch.device(device)
        # Initial weights come from their own seeded stream, so they do not depend on earlier draws.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.generator = Generator(config).to(self.device)
            self.discriminator = Discriminator(config).to(self.device)
            self.encoder = Encoder(config).to(self.device)
        self._optimizers = {
            "generator": torch.optim.Adam(self.generator.parameters(), lr=learning_rate, betas=GAN_BETAS),
            "discriminator": torch.optim.Adam(
                self.discriminator.parameters(), lr=learning_rate, betas=GAN_BETAS
            ),
            "encoder": torch.optim.Adam(self.encoder.parameters(), lr=options.encoder_learning_rate),
        }

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator, "encoder": self.encoder}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return dict(self._optimizers)

    def bundle_parts(self) -> dict[str, torch.nn.Module]:
        return self.modules()

    def model_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    def default_settings(self) -> BaselineSettings:
        return BaselineSettings(method=METHOD, score="izif", options={"kappa": self.options.kappa})

    def training_step(self, pixels: torch.Tensor, step: int, generator: torch.Generator) -> dict[str, float]:
        """Run one step of the stage that ``step`` falls in; return every loss name (NaN where it does not apply).

        Parameters
        ----------
        pixels
            ``(b, 3, 64, 64)`` normal crops in [-1, 1] on the trainer's device.
        step
            Zero-based step; steps before ``gan_steps`` train the GAN, later ones the encoder.
        generator
            CPU generator of the step's latent vectors and interpolation weights.
        """
        if pixels.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"training crops have shape {tuple(pixels.shape[1:])}: f-AnoGAN needs --crop-size {IMAGE_SIZE}"
            )
        if step < self.options.gan_steps:
            losses = self._gan_step(pixels, step, generator)
        else:
            losses = self._encoder_step(pixels)
        return {name: losses.get(name, math.nan) for name in LOSS_NAMES}

    def _latents(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(batch_size, self.config.latent_dim, generator=generator)
        return z.to(self.device)

    def _gan_step(self, pixels: torch.Tensor, step: int, generator: torch.Generator) -> dict[str, float]:
        """Update the critic once, then the generator once when ``step + 1`` is a multiple of ``n_critic``."""
        self.generator.requires_grad_(True)
        self.discriminator.requires_grad_(True)
        batch_size = pixels.shape[0]

        with torch.no_grad():
            fake = self.generator(self._latents(batch_size, generator))
        epsilon = torch.rand(batch_size, generator=generator).to(self.device)
        wasserstein = self.discriminator(pixels).mean() - self.discriminator(fake).mean()
        penalty = gradient_penalty(self.discriminator, pixels, fake, epsilon)
        critic_loss = -wasserstein + self.options.gp_weight * penalty
        self._optimizers["discriminator"].zero_grad(set_to_none=True)
        critic_loss.backward()
        self._optimizers["discriminator"].step()
        losses = {
            "critic_loss": float(critic_loss.detach()),
            "wasserstein_distance": float(wasserstein.detach()),
            "gradient_penalty": float(penalty.detach()),
        }

        if (step + 1) % self.options.n_critic == 0:
            # The critic's weights stay out of the generator's graph, because only G is updated here.
            self.discriminator.requires_grad_(False)
            generator_loss = -self.discriminator(self.generator(self._latents(batch_size, generator))).mean()
            self._optimizers["generator"].zero_grad(set_to_none=True)
            generator_loss.backward()
            self._optimizers["generator"].step()
            self.discriminator.requires_grad_(True)
            losses["generator_loss"] = float(generator_loss.detach())
        return losses

    def _encoder_step(self, pixels: torch.Tensor) -> dict[str, float]:
        """Update the encoder once on the izi_f loss, with ``G`` and ``D`` frozen and in inference mode."""
        self.generator.requires_grad_(False).eval()
        self.discriminator.requires_grad_(False).eval()
        self.encoder.train()

        with torch.no_grad():
            image_features = self.discriminator.features(pixels)
        reconstructions = self.generator(self.encoder(pixels))
        reconstruction_features = self.discriminator.features(reconstructions)
        residuals = izif_residuals(
            pixels, reconstructions, image_features, reconstruction_features, self.options.kappa
        )
        loss = residuals["izif"].mean()
        self._optimizers["encoder"].zero_grad(set_to_none=True)
        loss.backward()
        self._optimizers["encoder"].step()
        return {
            "encoder_loss": float(loss.detach()),
            "image_residual": float(residuals["image_residual"].detach().mean()),
            "feature_residual": float(residuals["feature_residual"].detach().mean()),
        }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_fanogan.py",
        description=(
            "Train f-AnoGAN on normal 64 px crops: a WGAN-GP for --gan-steps steps, then the izi_f encoder "
            "for --encoder-steps steps; --steps is their total."
        ),
    )
    add_training_arguments(
        parser,
        steps=DEFAULT_GAN_STEPS + DEFAULT_ENCODER_STEPS,
        batch_size=64,
        crop_size=IMAGE_SIZE,
        learning_rate=1e-4,
    )
    # None means "not given": --steps is then --gan-steps plus --encoder-steps.
    parser.set_defaults(steps=None)
    parser.add_argument(
        "--gan-steps",
        type=int,
        default=DEFAULT_GAN_STEPS,
        help=f"steps of the WGAN-GP stage, each one critic update (default {DEFAULT_GAN_STEPS})",
    )
    parser.add_argument(
        "--encoder-steps",
        type=int,
        default=None,
        help=f"steps of the encoder stage (default: --steps minus --gan-steps, or {DEFAULT_ENCODER_STEPS})",
    )
    parser.add_argument(
        "--n-critic",
        type=int,
        default=DEFAULT_N_CRITIC,
        help=f"critic updates per generator update (default {DEFAULT_N_CRITIC})",
    )
    parser.add_argument(
        "--gp-weight",
        type=float,
        default=DEFAULT_GP_WEIGHT,
        help=f"weight of the gradient penalty (default {DEFAULT_GP_WEIGHT:g})",
    )
    parser.add_argument(
        "--kappa",
        type=float,
        default=DEFAULT_KAPPA,
        help=f"weight of the feature residual in the encoder loss and the izif score (default {DEFAULT_KAPPA:g})",
    )
    parser.add_argument(
        "--encoder-learning-rate",
        type=float,
        default=DEFAULT_ENCODER_LEARNING_RATE,
        help=f"Adam learning rate of the encoder stage (default {DEFAULT_ENCODER_LEARNING_RATE:g})",
    )
    parser.add_argument(
        "--latent-dim",
        type=int,
        default=DEFAULT_LATENT_DIM,
        help=f"size of the latent vector z (default {DEFAULT_LATENT_DIM})",
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=DEFAULT_CHANNELS,
        help=f"width of the first critic block; the widths are 1, 2, 4 and 8 times it (default {DEFAULT_CHANNELS})",
    )
    return parser


def resolve_steps(steps: int | None, gan_steps: int, encoder_steps: int | None) -> tuple[int, int]:
    """Return ``(total steps, encoder steps)`` from the three step options; raise ValueError if they disagree."""
    if steps is None:
        encoder_steps = DEFAULT_ENCODER_STEPS if encoder_steps is None else encoder_steps
        steps = gan_steps + encoder_steps
    elif encoder_steps is None:
        encoder_steps = steps - gan_steps
    elif gan_steps + encoder_steps != steps:
        raise ValueError(
            f"--steps {steps} is not --gan-steps {gan_steps} plus --encoder-steps {encoder_steps}: "
            "give two of the three"
        )
    if encoder_steps < 1:
        raise ValueError(
            f"the encoder stage has {encoder_steps} steps (--steps {steps}, --gan-steps {gan_steps}): "
            "give --steps above --gan-steps, or --encoder-steps of 1 or more"
        )
    return steps, encoder_steps


def check_resumed_options(output: Path, record: dict[str, Any]) -> None:
    """Reject a run folder whose checkpoint was trained with other f-AnoGAN options, then record them."""
    path = output / OPTIONS_NAME
    if (output / CHECKPOINT_DIR / STATE_NAME).is_file() and path.is_file():
        saved = json.loads(path.read_text())
        changed = option_differences({key: saved[key] for key in record if key in saved}, record)
        if changed:
            raise SystemExit(
                f"error: {output} was trained with other options ({'; '.join(changed)}; recorded in {path}); "
                "resume with the same options or use another --output"
            )
    output.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{path.name}")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Train f-AnoGAN from command-line arguments and write ``OUTPUT/bundle``; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.steps, encoder_steps = resolve_steps(args.steps, args.gan_steps, args.encoder_steps)
        model = FAnoGANConfig(latent_dim=args.latent_dim, channels=args.channels)
        options = FAnoGANTrainingOptions(
            gan_steps=args.gan_steps,
            n_critic=args.n_critic,
            gp_weight=args.gp_weight,
            kappa=args.kappa,
            encoder_learning_rate=args.encoder_learning_rate,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    config = config_from_args(args)
    if config.crop_size != IMAGE_SIZE:
        raise SystemExit(
            f"error: --crop-size {config.crop_size} is invalid: f-AnoGAN trains on {IMAGE_SIZE} px crops"
        )

    record = {"model": model.to_dict(), **asdict(options)}
    check_resumed_options(config.output, record)
    trainer = FAnoGANTrainer(model, options, config.learning_rate, config.device, config.seed)
    bundle = train_baseline(trainer, config, name="f-AnoGAN comparison model")

    # The shared trainer records only the shared options; the stage lengths and weights belong with them.
    spec = read_bundle_spec(bundle)
    spec["training"].update({**asdict(options), "encoder_steps": encoder_steps})
    write_bundle_spec(bundle, spec)
    print(f"f-AnoGAN bundle written to {bundle}")
    return 0
