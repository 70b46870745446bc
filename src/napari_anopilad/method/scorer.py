"""AnoPILaD patch scores: reconstruct each patch under its keyword prompt and measure the discrepancy."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_anopilad.method.bundle import Bundle, Calibration
from napari_anopilad.method.diffusion import patch_noise, reconstruct_latents
from napari_anopilad.method.heatmap import within_slide_stats, zscores
from napari_anopilad.method.perceptual import lpips_distances
from napari_anopilad.method.prompt_encoding import KeywordPromptEncoder
from napari_anopilad.method.prompts import (
    KeywordPrompt,
    cached_keyword_embeddings,
    encode_empty_prompt,
    keyword_prompts_for_images,
)
from napari_anopilad.method.settings import COMPILE_MODES, SCORES, InferenceSettings

logger = logging.getLogger(__name__)

PATCH_SIZE = 256
PRECISION_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

NoiseKey = tuple[str, int, int]


@dataclass
class PatchScores:
    """Scores of a batch of patches, one entry per patch in input order.

    ``keywords``, ``similarities`` and ``weights`` are empty lists and ``prompt`` is ``""`` in unprompted mode.
    ``reconstructions`` is ``(n, 256, 256, 3)`` uint8 when requested, else None.
    """

    keywords: list[list[str]]
    similarities: list[list[float]]
    weights: list[list[float]]
    prompt: list[str]
    lpips: np.ndarray
    mse_latent: np.ndarray
    reconstructions: np.ndarray | None
    demo: bool

    def __len__(self) -> int:
        return len(self.prompt)

    def values(self, score: str) -> np.ndarray:
        """Return the per-patch values of ``score`` (``"lpips"`` or ``"mse_latent"``)."""
        if score not in SCORES:
            raise ValueError(f"score {score!r} is invalid: use one of {', '.join(SCORES)}")
        return np.asarray(getattr(self, score))

    def score_values(self) -> dict[str, np.ndarray]:
        """Return every score by name."""
        return {name: np.asarray(getattr(self, name)) for name in SCORES}


@dataclass(frozen=True)
class ZScores:
    """z-scores with where their mean and std came from (``"calibration"`` or ``"within-slide"``)."""

    values: np.ndarray
    mean: float
    std: float
    source: str
    note: str | None


class AnoPILaDScorer:
    """Scores 256 px patches with a bundle's models under one set of inference settings.

    Parameters
    ----------
    bundle
        A loaded bundle (:func:`napari_anopilad.method.bundle.load_bundle`).
    device
        Torch device for all models.
    settings
        Inference settings; the bundle's when None.
    compile_mode
        A ``torch.compile`` mode for the UNet (one of ``COMPILE_MODES``), or None to run it eagerly. The
        first batch of each new batch size compiles, which takes minutes.
    """

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        settings: InferenceSettings | None = None,
        compile_mode: str | None = None,
    ) -> None:
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile mode {compile_mode!r} is invalid: use one of {', '.join(COMPILE_MODES)}"
            )
        self.bundle = bundle
        self.device = torch.device(device)
        self.settings = settings or bundle.settings
        self.compile_mode = compile_mode
        self.unet_dtype = self._unet_dtype()

        # diffusers registers the components at run time, so mypy cannot see them on the class.
        pipeline: Any = bundle.load_pipeline(self.device)
        self.unet = pipeline.unet
        if self.unet_dtype != torch.float32:
            self.unet = self.unet.to(self.unet_dtype)
        if compile_mode is not None:
            if compile_mode == "reduce-overhead" and self.device.type != "cuda":
                logger.warning(
                    "compile mode reduce-overhead replays CUDA graphs, which need a CUDA device; on %s it "
                    "compiles as the default mode does",
                    self.device,
                )
            # Static shapes: a new batch size (the last, smaller batch of a slide) compiles once more.
            self.unet = torch.compile(self.unet, mode=compile_mode, dynamic=False)
        # The VAE stays in float32 (as loaded): SD1.5's VAE overflows in float16 on some inputs.
        self.vae = pipeline.vae
        self.tokenizer = pipeline.tokenizer
        self.text_encoder = pipeline.text_encoder
        self.scheduler_config = dict(pipeline.scheduler.config)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.empty_prompt_embeds = encode_empty_prompt(self.tokenizer, self.text_encoder)

        if self.settings.unprompted:
            self.conch = None
            self.keyword_embeddings = None
            self.prompt_encoder: KeywordPromptEncoder | None = None
        else:
            self.conch = bundle.load_conch(self.device)
            # Computed here once, so the first batch does not pay for the keyword bank.
            self.keyword_embeddings = cached_keyword_embeddings(bundle, self.conch, self.device)
            self.prompt_encoder = KeywordPromptEncoder(
                self.tokenizer, self.text_encoder, style=self.settings.prompt_style
            )

        self.lpips = bundle.load_lpips(self.device)
        self.calibration: Calibration | None = bundle.calibration_for(self.settings)

    def with_settings(self, settings: InferenceSettings) -> AnoPILaDScorer | None:
        """Return a scorer under ``settings`` that shares this scorer's loaded models, or None if it cannot.

        The loaded models depend on the precision (the UNet's dtype) and on whether prompts are used (CONCH
        is loaded only then), so those two settings must match. The start timestep, steps, sampler,
        guidance, seed, keyword count, prompt style and score need no reload.
        """
        if settings.precision != self.settings.precision or settings.unprompted != self.settings.unprompted:
            return None
        scorer = copy.copy(self)
        scorer.settings = settings
        if self.prompt_encoder is not None and settings.prompt_style != self.settings.prompt_style:
            scorer.prompt_encoder = KeywordPromptEncoder(
                self.tokenizer, self.text_encoder, style=settings.prompt_style
            )
        scorer.calibration = self.bundle.calibration_for(settings)
        return scorer

    @property
    def guidance_scale(self) -> float:
        """Guidance scale in effect: 1 in unprompted mode, else the settings' scale."""
        return 1.0 if self.settings.unprompted else float(self.settings.guidance_scale)

    def score(
        self,
        images_uint8: np.ndarray,
        noise_keys: Sequence[NoiseKey],
        return_reconstructions: bool = False,
        callback: Callable[[int, int], bool | None] | None = None,
    ) -> PatchScores:
        """Reconstruct each patch and return its keywords, prompt, LPIPS and latent MSE.

        Parameters
        ----------
        images_uint8
            ``(n, 256, 256, 3)`` RGB patches.
        noise_keys
            One ``(slide_identity, row, col)`` per patch; each patch's noise is seeded from its key and the
            settings' seed, so a patch's scores do not depend on the batch it runs in.
        return_reconstructions
            Also return the decoded reconstructions as uint8.
        callback
            Passed to the reconstruction; called after each denoising step, returning False stops with
            InterruptedError.
        """
        images = _check_images(images_uint8)
        if len(noise_keys) != len(images):
            raise ValueError(
                f"got {len(noise_keys)} noise keys for {len(images)} patches: give one per patch"
            )

        prompts = self._keyword_prompts(images)

        prompt_embeds = self._prompt_embeds(prompts)

        pixels = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents = self._encode(pixels)

        noise = patch_noise(list(noise_keys), self.settings.seed, shape=tuple(latents.shape[1:]))
        guided = self.guidance_scale > 1
        negative_embeds = self.empty_prompt_embeds.expand(len(images), -1, -1) if guided else None
        reconstructed = reconstruct_latents(
            self.unet,
            self.scheduler_config,
            latents,
            noise,
            prompt_embeds,
            negative_embeds,
            start_timestep=self.settings.start_timestep,
            num_inference_steps=self.settings.num_inference_steps,
            sampler=self.settings.sampler,
            guidance_scale=self.guidance_scale,
            callback=callback,
        ).float()

        decoded = self._decode(reconstructed)

        lpips_values = lpips_distances(self.lpips, pixels, decoded).double().numpy()
        mse_values = ((latents - reconstructed) ** 2).mean(dim=(1, 2, 3)).double().cpu().numpy()
        reconstructions = None
        if return_reconstructions:
            reconstructions_uint8 = ((decoded + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
            reconstructions = reconstructions_uint8.permute(0, 2, 3, 1).cpu().numpy()

        return PatchScores(
            keywords=[prompt.keywords for prompt in prompts],
            similarities=[prompt.similarities for prompt in prompts],
            weights=[prompt.weights for prompt in prompts],
            prompt=[prompt.prompt for prompt in prompts],
            lpips=lpips_values,
            mse_latent=mse_values,
            reconstructions=reconstructions,
            demo=self.bundle.demo,
        )

    def z_scores(self, values: Sequence[float] | np.ndarray, score: str | None = None) -> ZScores:
        """Convert scores to z-scores with the bundle's calibration, or within the given values without one.

        Without calibration statistics measured under this scorer's settings, the mean and population std of
        ``values`` themselves are used (pass all of a slide's scores), and ``note`` states this.
        """
        score = score or self.settings.score
        if score not in SCORES:
            raise ValueError(f"score {score!r} is invalid: use one of {', '.join(SCORES)}")
        if self.calibration is not None:
            mean, std = self.calibration.mean[score], self.calibration.std[score]
            return ZScores(zscores(values, mean, std), mean, std, "calibration", None)
        mean, std = within_slide_stats(values)
        note = self.bundle.calibration_note or (
            "calibration: measured under other settings than this scorer's; z-scores are computed within the slide"
        )
        return ZScores(zscores(values, mean, std), mean, std, "within-slide", note)

    def _unet_dtype(self) -> torch.dtype:
        dtype = PRECISION_DTYPES[self.settings.precision]
        if dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError(
                f"precision 'float16' needs a CUDA device, but the device is {self.device}: "
                "use 'float32' or 'bfloat16'"
            )
        return dtype

    def _keyword_prompts(self, images: np.ndarray) -> list[KeywordPrompt]:
        if self.settings.unprompted:
            return [KeywordPrompt(keywords=[], similarities=[], weights=[], prompt="") for _ in images]
        assert self.conch is not None
        return keyword_prompts_for_images(
            self.bundle,
            images,
            self.conch,
            self.settings.top_k,
            self.settings.prompt_style,
            self.device,
            self.keyword_embeddings,
        )

    def _prompt_embeds(self, prompts: list[KeywordPrompt]) -> torch.Tensor:
        if self.settings.unprompted:
            return self.empty_prompt_embeds.expand(len(prompts), -1, -1)
        assert self.prompt_encoder is not None
        return self.prompt_encoder.encode(prompts)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # The posterior mean, not a sample: the latent is then a deterministic function of the patch, and
        # the only randomness is the per-patch seeded diffusion noise. The same latent is the reference of
        # the latent MSE.
        latents = self.vae.encode(pixels).latent_dist.mean * self.scaling_factor
        if not torch.isfinite(latents).all():
            raise FloatingPointError(
                "the VAE encoding of the patches contains NaN or infinity; check the VAE weights"
            )
        return latents

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        decoded = self.vae.decode(latents.to(self.device, torch.float32) / self.scaling_factor).sample
        if not torch.isfinite(decoded).all():
            raise FloatingPointError("the VAE decoding of the reconstruction contains NaN or infinity")
        return decoded.clamp(-1.0, 1.0)


def _check_images(images_uint8: np.ndarray) -> np.ndarray:
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (PATCH_SIZE, PATCH_SIZE, 3):
        raise ValueError(
            f"patches have shape {images.shape} and dtype {images.dtype}: "
            f"use uint8 RGB of shape (n, {PATCH_SIZE}, {PATCH_SIZE}, 3)"
        )
    return np.ascontiguousarray(images)
