"""The VAE density family: likelihood-based anomaly scores of a convolutional VAE on 64 px crops.

One variational autoencoder with a 100-dimensional Gaussian latent models 64 x 64 RGB crops. Its decoder
gives each of the 3 x 64 x 64 sub-pixels a discretised logistic distribution over the 256 intensity
values (one logistic component, as in PixelCNN++ by Salimans et al., 2017, without the mixture). Every
score is in bits per dimension (nats divided by ``3 * 64 * 64 * ln 2``); larger means more anomalous:

- ``nll``: ``-log p(x)``, estimated with the importance-weighted bound of Burda et al. (2016),
  ``log (1/K) sum_k p(x, z_k) / q(z_k | x)`` with ``z_k ~ q(z | x)``.
- ``regret``: likelihood Regret of Xiao, Yan and Amit (NeurIPS 2020): the posterior of the single
  input is optimised with Adam to maximise its ELBO, and ``Regret = ELBO(optimised) - ELBO(encoder)``,
  which equals the drop of the negative ELBO.
- ``likelihood_ratio``: Ren et al. (NeurIPS 2019): ``NLL_model(x) - NLL_background(x)``, with the
  background model trained on crops whose pixels were replaced by uniform noise at rate mu.
- ``complexity``: input complexity of Serra et al. (ICLR 2020): ``S(x) = -log2 p(x) - L(x)``, with
  ``L(x)`` the length in bits per dimension of the 8-bit crop compressed losslessly (PNG by default).

Each 256 px patch is scored as its 16 crops; the base class averages the crop scores.
"""

from __future__ import annotations

import contextlib
import io
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from napari_anopilad.method.baselines.base import BaselineScorer, register_scorer
from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.json_values import check_integer, check_number, check_string

METHOD = "vae-density"
INPUT_SIZE = 64
CHANNELS = 3
LATENT_DIM = 100
DEFAULT_CHANNELS = (32, 64, 128, 256)
SCORE_NAMES = ("nll", "regret", "likelihood_ratio", "complexity")
COMPRESSORS = ("png", "zlib")
# Half the width of one intensity bin once 0..255 is mapped to [-1, 1].
HALF_BIN = 1.0 / 255.0
# Bounds of the decoder's log scale. At -7 (the lower bound of PixelCNN++) the bin at the location already
# has probability 0.97. A scale of exp(7) is far wider than [-1, 1], and the bound keeps bin probabilities finite.
LOG_SCALE_MIN = -7.0
LOG_SCALE_MAX = 7.0

LogLikelihood = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class VaeConfig:
    """Architecture of the convolutional VAE, as stored in ``bundle.json`` under ``"model"``.

    Attributes
    ----------
    latent_dim
        Size of the Gaussian latent.
    channels
        Output channels of the encoder's stride-2 convolutions; the decoder mirrors them.
    input_size
        Side of the square crops in pixels.
    """

    latent_dim: int = LATENT_DIM
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    input_size: int = INPUT_SIZE

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim {self.latent_dim} is invalid: use 1 or more")
        if not self.channels or any(count < 1 for count in self.channels):
            raise ValueError(f"channels {list(self.channels)} are invalid: give one or more positive counts")
        if self.input_size % 2 ** len(self.channels):
            raise ValueError(
                f"input_size {self.input_size} does not halve {len(self.channels)} times: "
                "use fewer channel stages or another size"
            )

    @property
    def dimensions(self) -> int:
        """Sub-pixels per crop, the D of bits per dimension."""
        return CHANNELS * self.input_size * self.input_size

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["channels"] = list(self.channels)
        values["likelihood"] = "discretised_logistic"
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VaeConfig:
        """Parse the ``"model"`` entry of a bundle; raise ValueError naming the invalid entry."""
        known = {"latent_dim", "channels", "input_size", "likelihood"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown entries {unknown}; known entries are {sorted(known)}")
        likelihood = values.get("likelihood", "discretised_logistic")
        if likelihood != "discretised_logistic":
            raise ValueError(f"likelihood {likelihood!r} is not supported: use 'discretised_logistic'")
        try:
            return cls(
                latent_dim=int(values.get("latent_dim", LATENT_DIM)),
                channels=tuple(int(count) for count in values.get("channels", DEFAULT_CHANNELS)),
                input_size=int(values.get("input_size", INPUT_SIZE)),
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"invalid architecture ({error})") from error


class ConvVAE(nn.Module):
    """Convolutional VAE: ``encode`` gives the Gaussian posterior, ``decode`` the per-sub-pixel logistics."""

    def __init__(self, config: VaeConfig) -> None:
        super().__init__()
        self.config = config
        stages = len(config.channels)
        self.bottom_size = config.input_size // 2**stages
        bottom = config.channels[-1] * self.bottom_size**2

        layers: list[nn.Module] = []
        previous = CHANNELS
        for count in config.channels:
            layers += [nn.Conv2d(previous, count, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            previous = count
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.posterior = nn.Linear(bottom, 2 * config.latent_dim)

        self.project = nn.Linear(config.latent_dim, bottom)
        layers = []
        reversed_channels = list(reversed(config.channels))
        for count, following in zip(reversed_channels, [*reversed_channels[1:], reversed_channels[-1]]):
            layers += [nn.ConvTranspose2d(count, following, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        # Two maps per colour channel: the logistic's location and log scale.
        layers.append(nn.Conv2d(reversed_channels[-1], 2 * CHANNELS, 3, padding=1))
        self.decoder = nn.Sequential(*layers)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the posterior mean and log variance, each ``(m, latent_dim)``, of ``(m, 3, s, s)`` pixels."""
        mean, log_var = self.posterior(self.encoder(pixels)).chunk(2, dim=1)
        return mean, log_var

    def decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the logistic location and log scale, each ``(m, 3, s, s)`` in the [-1, 1] pixel scale."""
        channels = self.config.channels[-1]
        hidden = self.project(latents).reshape(-1, channels, self.bottom_size, self.bottom_size)
        location, log_scale = self.decoder(F.leaky_relu(hidden, 0.2)).chunk(2, dim=1)
        return location, log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)

    def log_likelihood(self, pixels: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Return ``log p(x | z)`` in nats, ``(m,)``, of pixels in [-1, 1] given ``(m, latent_dim)`` latents."""
        location, log_scale = self.decode(latents)
        return discretised_logistic_log_likelihood(pixels, location, log_scale)


def discretised_logistic_log_likelihood(
    pixels: torch.Tensor, location: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """Return the log-probability in nats of 8-bit pixels under per-sub-pixel discretised logistics.

    Intensity ``k`` in 0..255 (``pixels = k / 127.5 - 1``) gets the logistic probability of the bin
    ``[x - 1/255, x + 1/255]``. The end bins extend to minus and plus infinity, so the 256 probabilities
    sum to 1.

    Parameters
    ----------
    pixels
        ``(m, ...)`` values of the form ``k / 127.5 - 1``.
    location, log_scale
        Logistic parameters, same shape as ``pixels``.

    Returns
    -------
    ``(m,)`` log-probabilities summed over all but the first dimension, in float64.
    """
    intensity = torch.round((pixels + 1.0) * 127.5).clamp(0, 255)
    centre = intensity / 127.5 - 1.0
    inverse_scale = torch.exp(-log_scale)
    upper = (centre + HALF_BIN - location) * inverse_scale
    lower = (centre - HALF_BIN - location) * inverse_scale
    # sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a)), exact and stable in both tails.
    log_below_upper = F.logsigmoid(upper)
    log_above_lower = F.logsigmoid(-lower)
    log_interior = log_below_upper + log_above_lower + torch.log(-torch.expm1(lower - upper))
    log_probability = torch.where(
        intensity == 0, log_below_upper, torch.where(intensity == 255, log_above_lower, log_interior)
    )
    return log_probability.flatten(1).double().sum(dim=1)


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Return ``KL(N(mean, exp(log_var)) || N(0, 1))`` in nats, summed over the last dimension."""
    return 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var).sum(dim=-1)


def log_importance_weights(
    log_likelihood: LogLikelihood, mean: torch.Tensor, log_var: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Return ``log p(x | z_k) + log p(z_k) - log q(z_k | x)`` in nats for each posterior sample.

    Parameters
    ----------
    log_likelihood
        Maps ``(m, d)`` latents to ``(m,)`` values of ``log p(x | z)`` for the m inputs.
    mean, log_var
        ``(m, d)`` parameters of the Gaussian posterior ``q(z | x)``; the prior is ``N(0, I)``.
    noise
        ``(K, m, d)`` standard normal draws; sample k is ``z_k = mean + exp(log_var / 2) * noise[k]``.

    Returns
    -------
    ``(K, m)`` float64 log-weights.
    """
    std = torch.exp(0.5 * log_var)
    log_two_pi = math.log(2.0 * math.pi)
    weights = []
    for draw in noise:
        latents = mean + std * draw
        log_prior = -0.5 * (latents.square() + log_two_pi).sum(dim=-1)
        log_posterior = -0.5 * (draw.square() + log_var + log_two_pi).sum(dim=-1)
        weights.append(log_likelihood(latents).double() + (log_prior - log_posterior).double())
    return torch.stack(weights)


def log_mean_exp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Return ``log(mean(exp(values)))`` along ``dim`` without overflow."""
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


def importance_weighted_log_likelihood(
    log_likelihood: LogLikelihood, mean: torch.Tensor, log_var: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Return the importance-weighted estimate of ``log p(x)`` in nats, ``(m,)``, from ``K = len(noise)`` samples.

    With ``K = 1`` it is the single-sample ELBO estimate. Its expectation is a lower bound of ``log p(x)``
    that tightens as ``K`` grows (Burda et al., 2016).
    """
    return log_mean_exp(log_importance_weights(log_likelihood, mean, log_var, noise), dim=0)


def evidence_lower_bound(
    log_likelihood: LogLikelihood, mean: torch.Tensor, log_var: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Return the ELBO in nats, ``(m,)``: ``log p(x | z)`` averaged over the ``(K, m, d)`` noise draws, minus the analytic KL."""
    std = torch.exp(0.5 * log_var)
    reconstruction = torch.stack([log_likelihood(mean + std * draw).double() for draw in noise]).mean(dim=0)
    return reconstruction - gaussian_kl(mean, log_var).double()


def likelihood_regret(
    log_likelihood: LogLikelihood,
    mean: torch.Tensor,
    log_var: torch.Tensor,
    step_noise: torch.Tensor,
    evaluation_noise: torch.Tensor,
    learning_rate: float,
) -> torch.Tensor:
    """Return the likelihood Regret in nats, ``(m,)``: the ELBO gain from optimising each input's posterior.

    The posterior parameters start at ``mean`` and ``log_var`` and take one Adam step per entry of
    ``step_noise`` to maximise the ELBO; the ELBO before and after is measured on ``evaluation_noise``.
    The decoder behind ``log_likelihood`` is left unchanged. Adam updates each parameter element by
    its own gradient, and the inputs' ELBOs are summed, so each input's Regret does not depend on the
    other inputs of the batch.

    Parameters
    ----------
    step_noise
        ``(steps, S, m, d)`` standard normal draws, S samples for each step's ELBO.
    evaluation_noise
        ``(K, m, d)`` draws for the ELBO before and after.

    Returns
    -------
    ``(m,)`` float64 ``ELBO(optimised) - ELBO(initial)``, equal to the negative ELBO's decrease.
    NOTE: with noisy steps the optimised ELBO can end below the initial one, giving a negative Regret.
    """
    with torch.no_grad():
        before = evidence_lower_bound(log_likelihood, mean, log_var, evaluation_noise)
    if len(step_noise) == 0:
        return before - before
    with torch.enable_grad():
        optimised_mean = mean.detach().clone().requires_grad_(True)
        optimised_log_var = log_var.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([optimised_mean, optimised_log_var], lr=learning_rate)
        for noise in step_noise:
            optimizer.zero_grad()
            loss = -evidence_lower_bound(log_likelihood, optimised_mean, optimised_log_var, noise).sum()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        after = evidence_lower_bound(log_likelihood, optimised_mean, optimised_log_var, evaluation_noise)
    return after - before


def perturb_pixels(pixels: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each pixel (all three channels) with uniform random 8-bit values with probability ``rate``.

    This is the input perturbation of the background model of Ren et al. (2019). ``pixels`` are
    ``(m, 3, s, s)`` in [-1, 1]; the random draws come from the CPU ``generator``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"perturbation rate {rate} is invalid: use a value in [0, 1]")
    m, channels, height, width = pixels.shape
    replaced = torch.rand((m, 1, height, width), generator=generator) < rate
    values = torch.randint(0, 256, (m, channels, height, width), generator=generator).float() / 127.5 - 1.0
    return torch.where(replaced.to(pixels.device), values.to(pixels.device), pixels)


def compressed_bits(crop_uint8: np.ndarray, compressor: str = "png") -> int:
    """Return the length in bits of a ``(s, s, 3)`` uint8 crop compressed losslessly.

    ``"png"`` is the whole PNG file written by PIL at compression level 9 (headers included);
    ``"zlib"`` is the raw RGB bytes compressed by zlib at level 9.
    """
    if compressor == "png":
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(crop_uint8, mode="RGB").save(buffer, format="PNG", compress_level=9)
        return 8 * len(buffer.getvalue())
    if compressor == "zlib":
        return 8 * len(zlib.compress(np.ascontiguousarray(crop_uint8).tobytes(), 9))
    raise ValueError(f"compressor {compressor!r} is invalid: use one of {', '.join(COMPRESSORS)}")


@contextlib.contextmanager
def float32_convolutions(device: torch.device) -> Iterator[None]:
    """Run cuDNN convolutions in IEEE float32 instead of TF32 on a CUDA device, and restore the setting after.

    The Regret is a small difference of two ELBOs of thousands of nats each. TF32 keeps 10 mantissa
    bits, so its rounding of the decoder outputs could be a sizeable part of that difference.
    Other devices are left as they are.
    NOTE: this uses the ``fp32_precision`` flags of torch 2.9 and later and has not been run on a GPU.
    """
    if device.type != "cuda":
        yield
        return
    convolutions = torch.backends.cudnn.conv  # type: ignore[attr-defined]
    previous = convolutions.fp32_precision
    convolutions.fp32_precision = "ieee"
    try:
        yield
    finally:
        convolutions.fp32_precision = previous


@dataclass(frozen=True)
class VaeDensityOptions:
    """Scoring options of the VAE density family (``BaselineSettings.options``).

    Attributes
    ----------
    importance_samples
        K, the posterior samples of the NLL estimate; the Regret's ELBOs average over as many.
    regret_steps
        Adam steps on each input's posterior for the Regret.
    regret_learning_rate
        Adam learning rate of those steps.
    compressor
        Lossless compressor of the complexity score: ``"png"`` or ``"zlib"``.
    """

    importance_samples: int = 16
    regret_steps: int = 50
    regret_learning_rate: float = 1e-2
    compressor: str = "png"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "importance_samples", check_integer("importance_samples", self.importance_samples)
        )
        object.__setattr__(self, "regret_steps", check_integer("regret_steps", self.regret_steps))
        object.__setattr__(
            self, "regret_learning_rate", check_number("regret_learning_rate", self.regret_learning_rate)
        )
        check_string("compressor", self.compressor)
        if self.importance_samples < 1:
            raise ValueError(f"importance_samples {self.importance_samples} is invalid: use 1 or more")
        if self.regret_steps < 0:
            raise ValueError(f"regret_steps {self.regret_steps} is invalid: use 0 or more")
        if not (math.isfinite(self.regret_learning_rate) and self.regret_learning_rate > 0):
            raise ValueError(
                f"regret_learning_rate {self.regret_learning_rate} is invalid: use a positive number"
            )
        if self.compressor not in COMPRESSORS:
            raise ValueError(
                f"compressor {self.compressor!r} is invalid: use one of {', '.join(COMPRESSORS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> VaeDensityOptions:
        """Parse ``BaselineSettings.options``; absent entries take the defaults, unknown ones raise ValueError."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown {METHOD} options {unknown}: known options are {sorted(known)}")
        defaults = cls()
        try:
            return cls(
                importance_samples=options.get("importance_samples", defaults.importance_samples),
                regret_steps=options.get("regret_steps", defaults.regret_steps),
                regret_learning_rate=options.get("regret_learning_rate", defaults.regret_learning_rate),
                compressor=options.get("compressor", defaults.compressor),
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"invalid {METHOD} option ({error})") from error


def nats_to_bits_per_dimension(nats: torch.Tensor, dimensions: int) -> torch.Tensor:
    """Convert nats per input to bits per dimension."""
    return nats / (dimensions * math.log(2.0))


@register_scorer
class VaeDensityScorer(BaselineScorer):
    """Scores of the VAE density family, in bits per dimension; see the module docstring for the formulas.

    References: Burda, Grosse and Salakhutdinov (2016) for the importance-weighted NLL; Xiao, Yan and
    Amit (NeurIPS 2020) for the likelihood Regret; Ren et al. (NeurIPS 2019) for the likelihood ratio;
    Serra et al. (ICLR 2020) for the input complexity. The bundle contains two VAEs of the same
    architecture: ``"model"`` trained on normal crops and ``"background"`` trained on perturbed crops.
    """

    method = METHOD
    score_names = SCORE_NAMES
    weight_parts = ("model", "background")
    input_size = INPUT_SIZE
    reconstructs = False

    def build(self) -> None:
        try:
            self.config = VaeConfig.from_dict(self.bundle.model)
        except ValueError as error:
            raise BundleError(
                f"{METHOD} model: {self.bundle.folder / 'bundle.json'} has an invalid 'model' entry: {error}"
            ) from error
        if self.config.input_size != self.input_size:
            raise BundleError(
                f"{METHOD} model: input_size {self.config.input_size} in {self.bundle.folder / 'bundle.json'} "
                f"is invalid: this scorer reads {self.input_size} px crops"
            )
        self.options = VaeDensityOptions.from_options(self.settings.options)
        self.networks: dict[str, ConvVAE] = {}
        for part in self.weight_parts:
            network = ConvVAE(self.config)
            try:
                network.load_state_dict(self.bundle.state_dict(part))
            except RuntimeError as error:
                detail = str(error).strip().splitlines()[-1].strip()
                raise BundleError(
                    f"{METHOD} weights: {self.bundle.weights[part]} ({part}) does not match the architecture "
                    f"in bundle.json ({detail}); use the bundle.json that was saved with the weights, "
                    "or retrain"
                ) from error
            network.to(self.device).eval().requires_grad_(False)
            self.networks[part] = network

    def draw_noise(self, noise_seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the evaluation noise ``(K, m, d)`` and the Regret's step noise ``(steps, 1, m, d)``.

        Each input's draws come from its own generator seeded with its noise seed.
        """
        samples, steps, latent_dim = (
            self.options.importance_samples,
            self.options.regret_steps,
            self.config.latent_dim,
        )
        evaluation, stepping = [], []
        for seed in noise_seeds:
            generator = torch.Generator().manual_seed(int(seed))
            evaluation.append(torch.randn((samples, latent_dim), generator=generator))
            stepping.append(torch.randn((steps, 1, latent_dim), generator=generator))
        evaluation_noise = torch.stack(evaluation, dim=1).to(self.device)
        step_noise = torch.stack(stepping, dim=2).to(self.device)
        return evaluation_noise, step_noise

    def score_pixels(
        self, pixels: torch.Tensor, noise_seeds: Sequence[int], return_reconstructions: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        with float32_convolutions(self.device):
            return self._score_crops(pixels, noise_seeds), None

    def _score_crops(self, pixels: torch.Tensor, noise_seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        evaluation_noise, step_noise = self.draw_noise(noise_seeds)
        dimensions = self.config.dimensions
        model, background = self.networks["model"], self.networks["background"]

        def model_log_likelihood(latents: torch.Tensor) -> torch.Tensor:
            return model.log_likelihood(pixels, latents)

        def background_log_likelihood(latents: torch.Tensor) -> torch.Tensor:
            return background.log_likelihood(pixels, latents)

        mean, log_var = model.encode(pixels)
        nll = -importance_weighted_log_likelihood(model_log_likelihood, mean, log_var, evaluation_noise)
        nll_bits = nats_to_bits_per_dimension(nll, dimensions)

        background_mean, background_log_var = background.encode(pixels)
        background_nll = -importance_weighted_log_likelihood(
            background_log_likelihood, background_mean, background_log_var, evaluation_noise
        )
        ratio_bits = nll_bits - nats_to_bits_per_dimension(background_nll, dimensions)

        regret = likelihood_regret(
            model_log_likelihood,
            mean,
            log_var,
            step_noise,
            evaluation_noise,
            self.options.regret_learning_rate,
        )
        regret_bits = nats_to_bits_per_dimension(regret, dimensions)

        crops_uint8 = (
            torch.round((pixels + 1.0) * 127.5)
            .clamp(0, 255)
            .to(torch.uint8)
            .permute(0, 2, 3, 1)
            .cpu()
            .numpy()
        )
        compressed_bits_per_dim = torch.tensor(
            [compressed_bits(crop, self.options.compressor) / dimensions for crop in crops_uint8],
            dtype=torch.float64,
            device=nll_bits.device,
        )
        return {
            "nll": nll_bits,
            "regret": regret_bits,
            "likelihood_ratio": ratio_bits,
            "complexity": nll_bits - compressed_bits_per_dim,
        }
