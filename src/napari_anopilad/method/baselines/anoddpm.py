"""AnoDDPM: a pixel-space DDPM that reconstructs each patch from a partial noise level.

AnoDDPM (Wyatt, Leach, Schmon and Willcocks, "AnoDDPM: Anomaly Detection with Denoising Diffusion
Probabilistic Models using Simplex Noise", CVPR Workshops 2022) trains a DDPM on normal images only.
It noises an input to a start timestep and denoises it back, and anomalies are what the model cannot
restore. The AnoPILaD paper (Wang et al., MICCAI 2025) compares with it on the same 256 px patches and
with AnoPILaD's partial-diffusion sampler, so this module runs a diffusers ``UNet2DModel`` predicting
epsilon through the timestep grid, start-step choice and DDIM or PLMS updates of
:mod:`napari_anopilad.method.diffusion`, in pixel space and without a prompt.

Scores of a patch ``x`` (RGB in [-1, 1]) and its reconstruction ``x_hat`` (clamped to [-1, 1]):

- ``mse``: ``mean over channels and pixels of (x - x_hat) ** 2`` (the default);
- ``lpips``: LPIPS (v0.1 linear layers) between ``x`` and ``x_hat``, with the backbone the bundle carries.

Only Gaussian noise is offered; the AnoDDPM paper's simplex noise is not implemented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from napari_anopilad.method.baselines.base import PATCH_SIZE, BaselineScorer, register_scorer
from napari_anopilad.method.diffusion import (
    SAMPLERS,
    # AnoPILaD's own DDIM and PLMS loops, so both methods take identical steps.
    _run_ddim,
    _run_plms,
    alphas_cumprod,
    start_grid_index,
    timestep_grid,
)
from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.perceptual import LPIPS_NETS, load_lpips, lpips_distances
from napari_anopilad.method.settings import InferenceSettings
from napari_anopilad.method.weights import compare_state_dict

METHOD = "anoddpm"
SCORE_NAMES = ("mse", "lpips")
NOISE_TYPES = ("gaussian",)
# AnoPILaD's own defaults, so both methods reconstruct from the same noise level with the same sampler.
DEFAULT_OPTIONS: dict[str, Any] = {
    "start_timestep": InferenceSettings.start_timestep,
    "num_inference_steps": InferenceSettings.num_inference_steps,
    "sampler": InferenceSettings.sampler,
    "noise": "gaussian",
}


def check_options(options: Mapping[str, Any], num_train_timesteps: int = 1000) -> dict[str, Any]:
    """Check AnoDDPM's scoring options and fill in the defaults of missing ones.

    Parameters
    ----------
    options
        Any of ``start_timestep`` (0 to ``num_train_timesteps - 1``), ``num_inference_steps``
        (1 to ``num_train_timesteps``), ``sampler`` (``"ddim"`` or ``"plms"``) and ``noise`` (``"gaussian"``).
    num_train_timesteps
        Training timesteps of the bundle's noise schedule.

    Returns
    -------
    dict
        All four options.

    Raises
    ------
    ValueError
        Naming an unknown option or a value out of range, with the allowed values.
    """
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown anoddpm options {unknown}: the options are {sorted(DEFAULT_OPTIONS)}")
    checked = {**DEFAULT_OPTIONS, **options}
    start_timestep = checked["start_timestep"]
    steps = checked["num_inference_steps"]
    if isinstance(start_timestep, bool) or not isinstance(start_timestep, int):
        raise ValueError(f"anoddpm start_timestep {start_timestep!r} is invalid: use an integer")
    if not 0 <= start_timestep < num_train_timesteps:
        raise ValueError(
            f"anoddpm start_timestep {start_timestep} is invalid: use 0 to {num_train_timesteps - 1}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"anoddpm num_inference_steps {steps!r} is invalid: use 1 to {num_train_timesteps}")
    if checked["sampler"] not in SAMPLERS:
        raise ValueError(
            f"anoddpm sampler {checked['sampler']!r} is invalid: use one of {', '.join(SAMPLERS)}"
        )
    if checked["noise"] not in NOISE_TYPES:
        raise ValueError(
            f"anoddpm noise {checked['noise']!r} is invalid: use one of {', '.join(NOISE_TYPES)} "
            "(simplex noise is not implemented)"
        )
    return checked


def gaussian_noise(noise_seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Draw standard normal noise of ``shape`` for each seed from its own CPU generator.

    Returns ``(len(noise_seeds), *shape)`` float32 on the CPU; an input's noise does not depend on its batch.
    """
    batch = [
        torch.randn(
            shape, generator=torch.Generator(device="cpu").manual_seed(int(seed)), dtype=torch.float32
        )
        for seed in noise_seeds
    ]
    if not batch:
        return torch.empty((0, *shape), dtype=torch.float32)
    return torch.stack(batch)


def reconstruct_pixels(
    unet: torch.nn.Module,
    scheduler_config: Mapping[str, Any],
    pixels: torch.Tensor,
    noise: torch.Tensor,
    *,
    start_timestep: int = DEFAULT_OPTIONS["start_timestep"],
    num_inference_steps: int = DEFAULT_OPTIONS["num_inference_steps"],
    sampler: str = DEFAULT_OPTIONS["sampler"],
) -> torch.Tensor:
    """Noise images to a start timestep and denoise them down the timestep grid with an unconditional UNet.

    Parameters
    ----------
    unet
        A diffusers ``UNet2DModel`` predicting epsilon.
    scheduler_config
        The DDPM noise schedule (a diffusers scheduler configuration); see
        :func:`napari_anopilad.method.diffusion.alphas_cumprod` and :func:`~napari_anopilad.method.diffusion.timestep_grid`.
        ``clip_sample`` is ignored: the predicted clean images are never clipped.
    pixels
        ``(n, c, h, w)`` images in [-1, 1].
    noise
        Standard normal noise of the same shape.
    start_timestep
        Timestep to noise to; denoising starts at the nearest grid step, ``x_t = sqrt(a_t) x + sqrt(1 - a_t) noise``
        with ``a_t`` the cumulative alpha of that step.
    num_inference_steps
        Size of the whole grid over the training timesteps.
    sampler
        ``"ddim"`` (deterministic, eta 0) or ``"plms"`` (pseudo linear multistep as diffusers' ``PNDMScheduler``
        with ``skip_prk_steps`` runs it), as in AnoPILaD's latent reconstruction.

    Returns
    -------
    torch.Tensor
        The reconstructions, ``(n, c, h, w)`` float32 on the UNet's device, not clamped.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is invalid: use one of {', '.join(SAMPLERS)}")
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type != "epsilon":
        raise ValueError(
            f"scheduler_config prediction_type {prediction_type!r} is not supported: the UNet must predict epsilon"
        )
    if pixels.ndim != 4 or noise.shape != pixels.shape:
        raise ValueError(
            f"pixels {tuple(pixels.shape)} and noise {tuple(noise.shape)} must both be (n, channels, height, width)"
        )

    grid = timestep_grid(scheduler_config, num_inference_steps)
    num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
    timesteps = grid[start_grid_index(grid, start_timestep, num_train_timesteps) :]
    alphas = alphas_cumprod(scheduler_config)
    final_alpha = 1.0 if scheduler_config.get("set_alpha_to_one", True) else float(alphas[0])
    # Step k goes from alpha_path[k] to alpha_path[k + 1].
    alpha_path = [float(alphas[t]) for t in timesteps] + [final_alpha]

    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype

    def predict_noise(sample: torch.Tensor, timestep: int) -> torch.Tensor:
        timestep_tensor = torch.tensor(timestep, dtype=torch.long, device=device)
        return unet(sample.to(dtype), timestep_tensor).sample.float()

    with torch.inference_mode():
        start_alpha = alpha_path[0]
        sample = pixels.to(device, torch.float32) * start_alpha**0.5
        sample = sample + noise.to(device, torch.float32) * (1.0 - start_alpha) ** 0.5
        if sampler == "ddim":
            sample = _run_ddim(sample, timesteps, alpha_path, predict_noise, None)
        else:
            sample = _run_plms(sample, timesteps, alpha_path, predict_noise, None)

    if not torch.isfinite(sample).all():
        raise FloatingPointError("the AnoDDPM reconstruction contains NaN or infinity")
    return sample


def ddpm_loss(
    unet: torch.nn.Module,
    alphas: torch.Tensor,
    pixels: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Compute the DDPM noise-prediction loss (Ho et al. 2020, the simple objective).

    ``x_t = sqrt(a_t) x + sqrt(1 - a_t) noise`` and the loss is the mean over every element of
    ``(unet(x_t, t) - noise) ** 2``.

    Parameters
    ----------
    unet
        A ``UNet2DModel`` predicting epsilon.
    alphas
        Cumulative alphas of the noise schedule, one per training timestep (:func:`alphas_cumprod`).
    pixels
        ``(b, c, h, w)`` clean images in [-1, 1].
    timesteps
        ``(b,)`` integer timesteps.
    noise
        Standard normal noise shaped like ``pixels``.
    """
    alpha = alphas.to(pixels.device)[timesteps.to(pixels.device)].float().reshape(-1, 1, 1, 1)
    noisy = alpha.sqrt() * pixels + (1.0 - alpha).sqrt() * noise
    prediction = unet(noisy, timesteps.to(pixels.device)).sample
    return torch.nn.functional.mse_loss(prediction.float(), noise.float())


def build_unet(config: Mapping[str, Any], device: str | torch.device = "cpu") -> Any:
    """Build a randomly initialised ``UNet2DModel`` from its configuration on ``device``.

    Raises BundleError unless the UNet has 3 input and 3 output channels and diffusers accepts the configuration.
    """
    from diffusers import UNet2DModel

    unet_config = {key: value for key, value in config.items() if not key.startswith("_")}
    for key, expected in (("in_channels", 3), ("out_channels", 3)):
        if unet_config.get(key) != expected:
            raise BundleError(
                f"anoddpm model: the UNet's {key} is {unet_config.get(key)!r}; an RGB model needs {expected}"
            )
    try:
        with torch.device(device):
            return UNet2DModel(**unet_config)
    except (TypeError, ValueError) as error:
        raise BundleError(f"anoddpm model: the UNet2DModel configuration is invalid ({error})") from error


@register_scorer
class AnoDDPMScorer(BaselineScorer):
    """AnoDDPM (Wyatt et al. 2022): pixel-space partial diffusion, scored by MSE or LPIPS to the input.

    The bundle's ``model`` contains ``unet`` (a ``UNet2DModel`` configuration), ``scheduler`` (the DDPM
    noise schedule it was trained with) and ``lpips`` (``{"net": "vgg"}`` or ``"alex"``); its weight parts are
    ``model`` (the UNet) and ``lpips`` (torchvision's ``features`` of the LPIPS backbone). The options are
    ``start_timestep``, ``num_inference_steps``, ``sampler`` and ``noise`` (see :func:`check_options`).
    """

    method: ClassVar[str] = METHOD
    score_names: ClassVar[tuple[str, ...]] = SCORE_NAMES
    weight_parts: ClassVar[tuple[str, ...]] = ("model", "lpips")
    input_size: ClassVar[int] = PATCH_SIZE
    reconstructs: ClassVar[bool] = True

    def build(self) -> None:
        model = self.bundle.model
        for key in ("unet", "scheduler", "lpips"):
            if not isinstance(model.get(key), dict):
                raise BundleError(
                    f"anoddpm model: {self.bundle.folder / 'bundle.json'} needs a {key!r} object in 'model'; "
                    "write the bundle with training/train_anoddpm.py"
                )
        self.scheduler_config: dict[str, Any] = dict(model["scheduler"])
        num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        self.options = check_options(self.settings.options, num_train_timesteps)

        self.unet = build_unet(model["unet"])
        state_dict = self.bundle.state_dict("model")
        compare_state_dict(
            {key: tuple(value.shape) for key, value in self.unet.state_dict().items()},
            {key: tuple(value.shape) for key, value in state_dict.items()},
            "anoddpm weights (model)",
            self.bundle.weights["model"],
        )
        self.unet.load_state_dict(state_dict, strict=True)
        self.unet.to(self.device).eval()

        net = model["lpips"].get("net")
        if net not in LPIPS_NETS:
            raise BundleError(
                f"anoddpm model: LPIPS net {net!r} is invalid; use one of {', '.join(LPIPS_NETS)}"
            )
        self.lpips = load_lpips(net, self.bundle.weights["lpips"], self.device)

    def score_pixels(
        self, pixels: torch.Tensor, noise_seeds: Sequence[int], return_reconstructions: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        if pixels.shape[0] == 0:
            empty = torch.empty(0, dtype=torch.float32)
            return {name: empty for name in SCORE_NAMES}, pixels.float() if return_reconstructions else None
        noise = gaussian_noise(noise_seeds, tuple(pixels.shape[1:]))
        reconstructed = reconstruct_pixels(
            self.unet,
            self.scheduler_config,
            pixels,
            noise,
            start_timestep=self.options["start_timestep"],
            num_inference_steps=self.options["num_inference_steps"],
            sampler=self.options["sampler"],
        ).clamp(-1.0, 1.0)

        inputs = pixels.float()
        values = {
            "mse": (inputs - reconstructed).square().mean(dim=(1, 2, 3)),
            "lpips": lpips_distances(self.lpips, inputs, reconstructed),
        }
        return values, reconstructed if return_reconstructions else None
