"""f-AnoGAN on 64 px crops: a WGAN-GP generator and critic, and the izi_f encoder that inverts the generator.

Schlegl, Seeböck, Waldstein, Langs and Schmidt-Erfurth (2019), "f-AnoGAN: Fast unsupervised anomaly
detection with generative adversarial networks", Medical Image Analysis 54. The generator ``G`` and the
critic ``D`` are trained first as a Wasserstein GAN with gradient penalty on normal crops. The encoder
``E`` is trained afterwards with ``G`` and ``D`` frozen. A crop's anomaly score is

    A(x) = (1/n) ||x - G(E(x))||^2 + kappa * (1/n_d) ||f(x) - f(G(E(x)))||^2

where ``n`` is the number of pixel values of ``x``, ``f`` is the critic's feature map before its
linear output (``n_d`` values) and ``kappa`` weights the feature residual (1 by default). The scorer
gives ``izif`` (``A(x)``), ``image_residual`` (the first term) and ``feature_residual`` (the second
term without ``kappa``); a 256 px patch's score is the mean over its 16 crops.

The networks follow the paper's 64 x 64 residual architecture: four up-sampling residual blocks in
the generator (batch normalisation) and four down-sampling residual blocks in the critic and the
encoder. The critic normalises each sample over its channels and pixels (``GroupNorm`` with one
group), as WGAN-GP requires a critic without batch statistics. The encoder uses the same
normalisation, where the paper's encoder uses batch normalisation, so a crop's score never depends
on the other crops of its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from napari_anopilad.method.baselines.base import BaselineScorer, register_scorer
from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.json_values import check_number

METHOD = "f-anogan"
IMAGE_SIZE = 64
# Spatial size of the generator's first feature map and of the critic's last one.
BASE_SIZE = 4
SCORE_NAMES = ("izif", "image_residual", "feature_residual")
DEFAULT_LATENT_DIM = 128
DEFAULT_CHANNELS = 64
DEFAULT_KAPPA = 1.0
ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class FAnoGANConfig:
    """Architecture of the three networks, as stored under ``"model"`` in ``bundle.json``.

    Attributes
    ----------
    latent_dim
        Size of the latent vector ``z`` (128 in the paper); ``z`` is drawn from a standard normal.
    channels
        Width of the first critic and encoder block and of the last generator block. The block
        widths are ``channels`` times 1, 2, 4 and 8 (64 in the paper).
    image_size
        Crop side in pixels; only 64 is supported.
    """

    latent_dim: int = DEFAULT_LATENT_DIM
    channels: int = DEFAULT_CHANNELS
    image_size: int = IMAGE_SIZE

    def __post_init__(self) -> None:
        for name in ("latent_dim", "channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {value!r} is invalid: use a positive integer")
        if self.image_size != IMAGE_SIZE:
            raise ValueError(
                f"image_size {self.image_size!r} is invalid: f-AnoGAN works on {IMAGE_SIZE} px crops"
            )

    @property
    def feature_dim(self) -> int:
        """Number of critic features ``n_d``: the flattened output of its last residual block."""
        return 8 * self.channels * BASE_SIZE * BASE_SIZE

    def to_dict(self) -> dict[str, Any]:
        return {"latent_dim": self.latent_dim, "channels": self.channels, "image_size": self.image_size}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FAnoGANConfig:
        """Parse a ``"model"`` entry; raise ValueError naming an unknown or invalid entry."""
        known = {"latent_dim", "channels", "image_size"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown f-AnoGAN model entries {unknown}: known entries are {sorted(known)}")
        return cls(
            latent_dim=values.get("latent_dim", DEFAULT_LATENT_DIM),
            channels=values.get("channels", DEFAULT_CHANNELS),
            image_size=values.get("image_size", IMAGE_SIZE),
        )


class ResidualBlock(nn.Module):
    """Pre-activation residual block that halves (``"down"``) or doubles (``"up"``) the spatial size.

    The main path is norm, ReLU, 3 x 3 convolution, norm, ReLU, 3 x 3 convolution, with nearest-neighbour
    up-sampling before the first convolution or average pooling after the second. The shortcut is a
    1 x 1 convolution with the same resampling.
    """

    def __init__(
        self, in_channels: int, out_channels: int, resample: str, norm: Callable[[int], nn.Module]
    ) -> None:
        super().__init__()
        if resample not in ("up", "down"):
            raise ValueError(f"resample {resample!r} is invalid: use 'up' or 'down'")
        self.resample = resample
        middle = out_channels if resample == "up" else in_channels
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, middle, 3, padding=1, bias=False)
        self.norm2 = norm(middle)
        self.conv2 = nn.Conv2d(middle, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            shortcut = self.shortcut(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
            h = nn.functional.interpolate(torch.relu(self.norm1(x)), scale_factor=2.0, mode="nearest")
            h = self.conv1(h)
            h = self.conv2(torch.relu(self.norm2(h)))
        else:
            shortcut = self.shortcut(nn.functional.avg_pool2d(x, 2))
            h = self.conv1(torch.relu(self.norm1(x)))
            h = nn.functional.avg_pool2d(self.conv2(torch.relu(self.norm2(h))), 2)
        return shortcut + h


def _sample_norm(channels: int) -> nn.Module:
    """Normalise each sample over its channels and pixels, with a per-channel scale and shift."""
    return nn.GroupNorm(1, channels)


class Generator(nn.Module):
    """``G``: a latent vector ``(b, latent_dim)`` to a crop ``(b, 3, 64, 64)`` in [-1, 1]."""

    def __init__(self, config: FAnoGANConfig) -> None:
        super().__init__()
        width = config.channels
        self.config = config
        self.input = nn.Linear(config.latent_dim, 8 * width * BASE_SIZE * BASE_SIZE)
        self.blocks = nn.Sequential(
            ResidualBlock(8 * width, 8 * width, "up", nn.BatchNorm2d),
            ResidualBlock(8 * width, 4 * width, "up", nn.BatchNorm2d),
            ResidualBlock(4 * width, 2 * width, "up", nn.BatchNorm2d),
            ResidualBlock(2 * width, width, "up", nn.BatchNorm2d),
        )
        self.output_norm = nn.BatchNorm2d(width)
        self.output = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.input(z).reshape(z.shape[0], 8 * self.config.channels, BASE_SIZE, BASE_SIZE)
        h = self.blocks(h)
        return torch.tanh(self.output(torch.relu(self.output_norm(h))))


class _DownsamplingTrunk(nn.Module):
    """Input convolution and four down-sampling blocks: ``(b, 3, 64, 64)`` to ``(b, 8 * channels * 16)``."""

    def __init__(self, config: FAnoGANConfig) -> None:
        super().__init__()
        width = config.channels
        self.input = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(
            ResidualBlock(width, 2 * width, "down", _sample_norm),
            ResidualBlock(2 * width, 4 * width, "down", _sample_norm),
            ResidualBlock(4 * width, 8 * width, "down", _sample_norm),
            ResidualBlock(8 * width, 8 * width, "down", _sample_norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.input(x)).flatten(1)


class Discriminator(nn.Module):
    """``D``, the WGAN critic: :meth:`forward` gives one unbounded value per crop, :meth:`features` gives ``f``."""

    def __init__(self, config: FAnoGANConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = _DownsamplingTrunk(config)
        self.output = nn.Linear(config.feature_dim, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``f(x)``, the ``(b, n_d)`` features that enter the critic's linear output."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.trunk(x)).squeeze(1)


class Encoder(nn.Module):
    """``E``: a crop ``(b, 3, 64, 64)`` to its latent vector ``(b, latent_dim)`` (linear output, unbounded)."""

    def __init__(self, config: FAnoGANConfig) -> None:
        super().__init__()
        self.trunk = _DownsamplingTrunk(config)
        self.output = nn.Linear(config.feature_dim, config.latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.trunk(x))


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    epsilon: torch.Tensor,
) -> torch.Tensor:
    """Return the WGAN-GP penalty ``mean((||grad D(x_hat)||_2 - 1)^2)`` before its weight.

    Gulrajani et al. (2017), "Improved training of Wasserstein GANs". ``x_hat = epsilon * real +
    (1 - epsilon) * fake`` with one ``epsilon`` per sample; the gradient norm is taken over all
    pixel values of a sample. The graph is kept, so the penalty back-propagates into the critic.

    Parameters
    ----------
    critic
        Maps ``(b, ...)`` inputs to ``(b,)`` critic values.
    real, fake
        Batches of the same shape.
    epsilon
        ``(b,)`` interpolation weights in [0, 1].
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} batches differ in shape")
    if epsilon.shape != (real.shape[0],):
        raise ValueError(
            f"epsilon has shape {tuple(epsilon.shape)}: give one weight per sample, ({real.shape[0]},)"
        )
    weight = epsilon.reshape(-1, *([1] * (real.dim() - 1))).to(real)
    mixed = (weight * real.detach() + (1.0 - weight) * fake.detach()).requires_grad_(True)
    values = critic(mixed)
    (gradients,) = torch.autograd.grad(values.sum(), mixed, create_graph=True)
    norms = gradients.flatten(1).norm(2, dim=1)
    return ((norms - 1.0) ** 2).mean()


def izif_residuals(
    images: torch.Tensor,
    reconstructions: torch.Tensor,
    image_features: torch.Tensor,
    reconstruction_features: torch.Tensor,
    kappa: float,
) -> dict[str, torch.Tensor]:
    """Return the per-sample ``image_residual``, ``feature_residual`` and ``izif = image + kappa * feature``.

    ``image_residual`` is the mean of ``(x - G(E(x)))^2`` over a sample's pixel values and
    ``feature_residual`` the mean of ``(f(x) - f(G(E(x))))^2`` over its ``n_d`` features, so both
    are ``(b,)``. The encoder's training loss is the batch mean of ``izif``.
    """
    image_residual = (images - reconstructions).pow(2).flatten(1).mean(dim=1)
    feature_residual = (image_features - reconstruction_features).pow(2).flatten(1).mean(dim=1)
    return {
        "izif": image_residual + kappa * feature_residual,
        "image_residual": image_residual,
        "feature_residual": feature_residual,
    }


def check_kappa(value: Any) -> float:
    """Return ``kappa`` as a float; raise ValueError unless it is a finite number (not a string) of 0 or more."""
    kappa = float(check_number("kappa", value))
    if kappa < 0:
        raise ValueError(f"kappa {value!r} is invalid: use a finite number of 0 or more")
    return kappa


@register_scorer
class FAnoGANScorer(BaselineScorer):
    """f-AnoGAN (Schlegl et al., 2019) scores of 64 px crops, averaged over each patch's 16 crops.

    ``izif`` (the default) is ``A(x) = (1/n) ||x - G(E(x))||^2 + kappa * (1/n_d) ||f(x) - f(G(E(x)))||^2``
    with ``kappa`` from the settings' options; ``image_residual`` and ``feature_residual`` are its two
    means on their own. Reconstructions are ``G(E(x))``. Scoring is deterministic: ``noise_seeds``
    are not used.
    """

    method = METHOD
    score_names = SCORE_NAMES
    weight_parts = ("generator", "discriminator", "encoder")
    input_size = IMAGE_SIZE
    reconstructs = True

    def build(self) -> None:
        try:
            self.config = FAnoGANConfig.from_dict(self.bundle.model)
        except ValueError as error:
            raise BundleError(
                f"model: {self.bundle.folder / 'bundle.json'}: {error}; fix the 'model' entry or retrain"
            ) from error
        try:
            self.kappa = check_kappa(self.settings.options.get("kappa", DEFAULT_KAPPA))
        except ValueError as error:
            raise ValueError(f"f-AnoGAN settings: {error}") from error
        self.generator = self._load(Generator(self.config), "generator")
        self.discriminator = self._load(Discriminator(self.config), "discriminator")
        self.encoder = self._load(Encoder(self.config), "encoder")

    def _load(self, network: ModuleT, part: str) -> ModuleT:
        """Load a part's weights into ``network``; a mismatch raises BundleError naming the file."""
        state = self.bundle.state_dict(part)
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            # The first line only names the network class; the second names the first mismatch.
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise BundleError(
                f"{METHOD} weights: {self.bundle.weights[part]} ({part}) does not match the architecture "
                f"{self.config.to_dict()} in bundle.json ({detail}); retrain, or correct the 'model' entry"
            ) from error
        return network.to(self.device).eval()

    @torch.no_grad()
    def score_pixels(
        self, pixels: torch.Tensor, noise_seeds: Sequence[int], return_reconstructions: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        reconstructions = self.generator(self.encoder(pixels))

        image_features = self.discriminator.features(pixels)
        reconstruction_features = self.discriminator.features(reconstructions)

        scores = izif_residuals(pixels, reconstructions, image_features, reconstruction_features, self.kappa)
        return scores, reconstructions if return_reconstructions else None
