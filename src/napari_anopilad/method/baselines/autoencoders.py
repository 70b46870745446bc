"""Autoencoder comparison methods: a convolutional autoencoder (AE) and the memory-augmented autoencoder (MemAE).

MemAE follows Gong, Liu, Le, Saha, Mansour, Venkatesh and van den Hengel, "Memorizing Normality to
Detect Anomaly: Memory-augmented Deep Autoencoder for Unsupervised Anomaly Detection", ICCV 2019.
Its encoder output is not decoded directly. Each spatial position's feature vector ``z`` (the query)
reads a convex combination of ``N`` learned memory items ``m_i`` instead:

- attention ``w_i = softmax_i(cos(z, m_i))`` over the items;
- hard shrinkage ``w'_i = max(w_i - lambda, 0) * w_i / (|w_i - lambda| + eps)``, then ``w'`` is
  divided by its sum (L1 renormalisation), so only items with ``w_i > lambda`` remain;
- the read ``z' = sum_i w'_i m_i`` goes to the decoder.

Training minimises the reconstruction MSE plus ``alpha`` times the entropy ``-sum_i w'_i log w'_i``
averaged over positions (``training/train_memae.py``).

Both methods reconstruct whole 256 px patches and score a patch by its reconstruction error in
[-1, 1] pixel units: ``mse = mean((x - x_hat)^2)`` (the default) and ``l1 = mean(|x - x_hat|)``,
each averaged over the 3 channels and all pixels of the patch.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from napari_anopilad.method.baselines.base import (
    BUNDLE_FILENAME,
    PATCH_SIZE,
    BaselineScorer,
    BaselineSettings,
    register_scorer,
)
from napari_anopilad.method.errors import BundleError

AE = "ae"
MEMAE = "memae"
SCORE_NAMES = ("mse", "l1")

DEFAULT_CHANNELS = (32, 64, 128, 256, 256)
DEFAULT_LATENT_CHANNELS = 128
# Gong et al. report that 1,000 to 3,000 items give the same accuracy on video, and suggest a
# shrinkage threshold in [1/N, 3/N].
DEFAULT_MEMORY_ITEMS = 2000
DEFAULT_ENTROPY_WEIGHT = 0.0002
# The eps of the hard shrinkage; it only keeps the division finite when w_i equals lambda.
SHRINK_EPSILON = 1e-12
LEAKY_SLOPE = 0.2


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of an AE or MemAE, as stored under ``"model"`` in ``bundle.json``.

    Attributes
    ----------
    channels
        Output channels of the encoder's stride-2 convolutions; the feature map is
        ``256 / 2**len(channels)`` px on a side (8 px with the default five stages).
    latent_channels
        Channels of the encoder output, the dimension ``C`` of the memory items.
    memory_items
        ``N``, the number of memory items (MemAE only; None for AE).
    shrink_threshold
        ``lambda`` of the hard shrinkage (MemAE only); ``1 / memory_items`` when None.
    """

    channels: tuple[int, ...] = DEFAULT_CHANNELS
    latent_channels: int = DEFAULT_LATENT_CHANNELS
    memory_items: int | None = None
    shrink_threshold: float | None = None

    def __post_init__(self) -> None:
        if not self.channels or any(int(width) < 1 for width in self.channels):
            raise ValueError(f"channels {list(self.channels)} are invalid: give one or more positive widths")
        if PATCH_SIZE % 2 ** len(self.channels):
            raise ValueError(
                f"{len(self.channels)} stride-2 stages do not divide a {PATCH_SIZE} px patch; use at most 8"
            )
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels {self.latent_channels} is invalid: use 1 or more")
        if self.memory_items is not None and self.memory_items < 1:
            raise ValueError(f"memory_items {self.memory_items} is invalid: use 1 or more")
        if self.memory_items is None and self.shrink_threshold is not None:
            raise ValueError("shrink_threshold applies only with memory_items (MemAE)")
        if self.shrink_threshold is not None and not 0.0 <= self.shrink_threshold < 1.0:
            raise ValueError(f"shrink_threshold {self.shrink_threshold} is invalid: use a value in [0, 1)")

    @property
    def threshold(self) -> float:
        """The shrinkage threshold ``lambda`` in use (``1 / N`` unless set)."""
        if self.memory_items is None:
            raise ValueError("an AE has no memory and no shrinkage threshold")
        if self.shrink_threshold is None:
            return 1.0 / self.memory_items
        return self.shrink_threshold

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {"channels": list(self.channels), "latent_channels": self.latent_channels}
        if self.memory_items is not None:
            values["memory_items"] = self.memory_items
            values["shrink_threshold"] = self.threshold
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], method: str, source: str) -> AutoencoderConfig:
        """Parse a bundle's ``"model"`` entry; raise BundleError naming ``source`` and the invalid value."""
        known = {"channels", "latent_channels", "memory_items", "shrink_threshold"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BundleError(
                f"{method} model: {source} has unknown entries {unknown}; known are {sorted(known)}"
            )
        if method == MEMAE and "memory_items" not in values:
            raise BundleError(f"{method} model: {source} needs 'memory_items'")
        if method == AE and ("memory_items" in values or "shrink_threshold" in values):
            raise BundleError(
                f"{method} model: {source} has memory settings; an AE has no memory, so use the memae method"
            )
        try:
            memory_items = values.get("memory_items")
            threshold = values.get("shrink_threshold")
            return cls(
                channels=tuple(int(width) for width in values.get("channels", DEFAULT_CHANNELS)),
                latent_channels=int(values.get("latent_channels", DEFAULT_LATENT_CHANNELS)),
                memory_items=None if memory_items is None else int(memory_items),
                shrink_threshold=None if threshold is None else float(threshold),
            )
        except (TypeError, ValueError) as error:
            raise BundleError(f"{method} model: {source} has an invalid architecture ({error})") from error


def conv_encoder(channels: Sequence[int], latent_channels: int) -> nn.Sequential:
    """Build the encoder: stride-2 4x4 convolutions with batch norm and leaky ReLU, then a 3x3 convolution.

    The last convolution has no normalisation or activation, so the queries of MemAE's memory can
    point in any direction.
    """
    layers: list[nn.Module] = []
    previous = 3
    for width in channels:
        layers += [
            nn.Conv2d(previous, width, kernel_size=4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(LEAKY_SLOPE),
        ]
        previous = width
    layers.append(nn.Conv2d(previous, latent_channels, kernel_size=3, padding=1))
    return nn.Sequential(*layers)


def conv_decoder(channels: Sequence[int], latent_channels: int) -> nn.Sequential:
    """Build the decoder that mirrors :func:`conv_encoder`; its output is in [-1, 1] (tanh)."""
    widths = list(reversed(channels))
    layers: list[nn.Module] = [
        nn.Conv2d(latent_channels, widths[0], kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.LeakyReLU(LEAKY_SLOPE),
    ]
    for width, following in itertools.pairwise(widths):
        layers += [
            nn.ConvTranspose2d(width, following, kernel_size=4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(following),
            nn.LeakyReLU(LEAKY_SLOPE),
        ]
    layers += [nn.ConvTranspose2d(widths[-1], 3, kernel_size=4, stride=2, padding=1), nn.Tanh()]
    return nn.Sequential(*layers)


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder: ``(b, 3, s, s)`` pixels in [-1, 1] to a reconstruction of the same shape."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = conv_encoder(config.channels, config.latent_channels)
        self.decoder = conv_decoder(config.channels, config.latent_channels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(pixels))


def memory_attention(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Return the softmax over memory items of the cosine similarity of each query with each item.

    Parameters
    ----------
    queries
        ``(q, C)`` query vectors.
    memory
        ``(N, C)`` memory items.

    Returns
    -------
    ``(q, N)`` attention weights; each row sums to 1.
    """
    similarity = F.normalize(queries, dim=1) @ F.normalize(memory, dim=1).T
    return torch.softmax(similarity, dim=1)


def hard_shrink(weights: torch.Tensor, threshold: float, epsilon: float = SHRINK_EPSILON) -> torch.Tensor:
    """Apply MemAE's hard shrinkage to attention weights and renormalise each row to sum 1.

    ``w'_i = max(w_i - threshold, 0) * w_i / (|w_i - threshold| + epsilon)``, then ``w' / sum(w')``.
    A row whose weights all lie at or below the threshold stays all zero, so its read is the zero vector.
    """
    shrunk = F.relu(weights - threshold) * weights / ((weights - threshold).abs() + epsilon)
    total = shrunk.sum(dim=-1, keepdim=True)
    return shrunk / total.clamp_min(epsilon)


def addressing_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Return the entropy ``-sum_i w_i log w_i`` of each row of weights in nats, with ``0 log 0 = 0``."""
    logarithm = torch.log(torch.where(weights > 0, weights, torch.ones_like(weights)))
    return -(weights * logarithm).sum(dim=-1)


class MemoryModule(nn.Module):
    """MemAE's memory: ``N`` items of dimension ``C``, read at every spatial position of a feature map.

    Parameters
    ----------
    memory_items
        ``N``.
    item_channels
        ``C``, the channels of the feature map.
    shrink_threshold
        ``lambda`` of :func:`hard_shrink`.
    """

    def __init__(self, memory_items: int, item_channels: int, shrink_threshold: float) -> None:
        super().__init__()
        self.shrink_threshold = shrink_threshold
        self.items = nn.Parameter(torch.empty(memory_items, item_channels))
        bound = 1.0 / math.sqrt(item_channels)
        nn.init.uniform_(self.items, -bound, bound)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read the memory at each position of ``(b, C, h, w)`` features.

        Returns
        -------
        The ``(b, C, h, w)`` read ``z'`` and the ``(b, h, w, N)`` shrunk, renormalised weights ``w'``.
        """
        batch, channels, height, width = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(-1, channels)
        weights = hard_shrink(memory_attention(queries, self.items), self.shrink_threshold)
        read = weights @ self.items
        read = read.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return read, weights.reshape(batch, height, width, -1)


class MemAE(nn.Module):
    """Memory-augmented autoencoder: the encoder's features are replaced by their memory read before decoding."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        if config.memory_items is None:
            raise ValueError("MemAE needs memory_items in its configuration")
        self.config = config
        self.encoder = conv_encoder(config.channels, config.latent_channels)
        self.memory = MemoryModule(config.memory_items, config.latent_channels, config.threshold)
        self.decoder = conv_decoder(config.channels, config.latent_channels)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the reconstruction of ``(b, 3, s, s)`` pixels and the ``(b, h, w, N)`` memory weights."""
        read, weights = self.memory(self.encoder(pixels))
        return self.decoder(read), weights


def build_network(method: str, config: AutoencoderConfig) -> ConvAutoencoder | MemAE:
    """Build the untrained network of ``method`` ("ae" or "memae")."""
    if method == AE:
        return ConvAutoencoder(config)
    if method == MEMAE:
        return MemAE(config)
    raise ValueError(f"method {method!r} is not an autoencoder method: use {AE!r} or {MEMAE!r}")


def reconstruction_errors(pixels: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the per-input ``mse`` and ``l1`` of ``(m, 3, s, s)`` reconstructions, in [-1, 1] pixel units."""
    difference = (reconstructions.float() - pixels.float()).flatten(start_dim=1)
    return {"mse": difference.square().mean(dim=1), "l1": difference.abs().mean(dim=1)}


class _AutoencoderScorer(BaselineScorer):
    """Scores shared by AE and MemAE: the reconstruction error of the whole 256 px patch."""

    score_names: ClassVar[tuple[str, ...]] = SCORE_NAMES
    weight_parts: ClassVar[tuple[str, ...]] = ("model",)
    input_size: ClassVar[int] = PATCH_SIZE
    reconstructs: ClassVar[bool] = True

    network: nn.Module

    def build(self) -> None:
        source = str(self.bundle.folder / BUNDLE_FILENAME)
        config = AutoencoderConfig.from_dict(self.bundle.model, self.method, source)
        network = build_network(self.method, config)
        path = self.bundle.weights["model"]
        state = self.bundle.state_dict("model")
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            detail = str(error).strip().splitlines()
            summary = "; ".join(line.strip() for line in detail[:4])
            raise BundleError(
                f"{self.method} weights: {path} does not match the architecture in {source} "
                f"({json.dumps(config.to_dict())}): {summary}. Retrain, or restore the 'model' entry "
                "the weights were trained with"
            ) from error
        self.network = network.to(self.device).eval()

    def reconstruct(self, pixels: torch.Tensor) -> torch.Tensor:
        """Return the network's reconstruction of ``(m, 3, 256, 256)`` pixels in [-1, 1]."""
        raise NotImplementedError

    def score_pixels(
        self, pixels: torch.Tensor, noise_seeds: Sequence[int], return_reconstructions: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        # Reconstruction is deterministic, so the noise seeds are not used.
        reconstructions = self.reconstruct(pixels)
        scores = reconstruction_errors(pixels, reconstructions)
        return scores, reconstructions if return_reconstructions else None


@register_scorer
class AEScorer(_AutoencoderScorer):
    """Convolutional autoencoder scored by its reconstruction error (``mse`` by default, or ``l1``).

    The standard reconstruction baseline of unsupervised anomaly detection: an encoder of stride-2
    convolutions to an ``8 x 8`` feature map (default), a mirrored decoder, trained with the MSE on
    normal patches only.
    """

    method: ClassVar[str] = AE

    def reconstruct(self, pixels: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.network(pixels)
        return result


@register_scorer
class MemAEScorer(_AutoencoderScorer):
    """Memory-augmented autoencoder (Gong et al., ICCV 2019) scored by its reconstruction error.

    ``mse = mean((x - x_hat)^2)`` (default) or ``l1 = mean(|x - x_hat|)`` over the patch, where
    ``x_hat`` is decoded from the memory read at each position of the encoder's feature map.
    """

    method: ClassVar[str] = MEMAE

    def reconstruct(self, pixels: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.network(pixels)[0]
        return result


def default_settings(method: str) -> BaselineSettings:
    """Return the scoring settings a new AE or MemAE bundle starts with (score ``mse``)."""
    if method not in (AE, MEMAE):
        raise ValueError(f"method {method!r} is not an autoencoder method: use {AE!r} or {MEMAE!r}")
    return BaselineSettings(method=method, score="mse")
