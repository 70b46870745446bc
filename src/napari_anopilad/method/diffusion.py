"""Partial-diffusion reconstruction of VAE latents: noise to a start timestep, then denoise to the end.

The update rules are written out here instead of driving a diffusers scheduler. A scheduler keeps
per-run state (the PLMS history, a step counter), which makes a start in the middle of its grid
error-prone. The published AnoPILaD code also takes only the timestep grid from its scheduler and runs
its own deterministic DDIM update. Only the scheduler's configuration is read here: the beta schedule,
the number of training timesteps, the grid spacing and the final alpha.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

SAMPLERS = ("ddim", "plms")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

ProgressCallback = Callable[[int, int], "bool | None"]


def alphas_cumprod(scheduler_config: Mapping[str, Any]) -> torch.Tensor:
    """Compute the cumulative products of ``1 - beta`` over the training timesteps.

    Parameters
    ----------
    scheduler_config
        A diffusers scheduler configuration (``scheduler.config`` or the parsed
        ``scheduler_config.json``). Read keys: ``num_train_timesteps``, ``beta_start``, ``beta_end``,
        ``beta_schedule`` (``linear``, ``scaled_linear`` or ``squaredcos_cap_v2``) and ``trained_betas``.

    Returns
    -------
    torch.Tensor
        ``alphas_cumprod[t]`` for ``t`` in ``0 .. num_train_timesteps - 1``, float64 on the CPU.
    """
    num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
    trained_betas = scheduler_config.get("trained_betas")
    beta_schedule = scheduler_config.get("beta_schedule", "linear")
    beta_start = float(scheduler_config.get("beta_start", 0.0001))
    beta_end = float(scheduler_config.get("beta_end", 0.02))

    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
        if betas.shape != (num_train_timesteps,):
            raise ValueError(
                f"scheduler_config trained_betas has {betas.numel()} values but num_train_timesteps is "
                f"{num_train_timesteps}: give one beta per training timestep"
            )
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        # Linear in sqrt(beta), the schedule Stable Diffusion was trained with.
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ValueError(
            f"scheduler_config beta_schedule {beta_schedule!r} is not supported: "
            "use linear, scaled_linear, squaredcos_cap_v2 or trained_betas"
        )

    if scheduler_config.get("rescale_betas_zero_snr", False):
        raise ValueError("scheduler_config rescale_betas_zero_snr=True is not supported: set it to false")
    return torch.cumprod(1.0 - betas, dim=0)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    # The cosine schedule of Nichol and Dhariwal (2021), betas capped at max_beta as diffusers caps them.
    def alpha_bar(time_fraction: float) -> float:
        return math.cos((time_fraction + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def timestep_grid(scheduler_config: Mapping[str, Any], num_inference_steps: int) -> list[int]:
    """Build the descending inference timestep grid that diffusers' DDIM and PNDM schedulers use.

    Parameters
    ----------
    scheduler_config
        A diffusers scheduler configuration. Read keys: ``num_train_timesteps``, ``timestep_spacing``
        (``leading`` when absent, as in Stable Diffusion 1.5) and ``steps_offset``.
    num_inference_steps
        Number of grid steps, 1 to ``num_train_timesteps``.

    Returns
    -------
    list[int]
        Distinct timesteps, highest first: ``[991, 981, ..., 1]`` for Stable Diffusion 1.5's configuration
        (``leading`` spacing, ``steps_offset`` 1) and 100 steps. PNDM's grid repeats its second timestep
        for the PLMS warm-up; this grid does not, because the warm-up is part of the PLMS update here.
    """
    num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
    spacing = scheduler_config.get("timestep_spacing", "leading")
    steps_offset = int(scheduler_config.get("steps_offset", 0))
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps {num_inference_steps} is invalid: use 1 to {num_train_timesteps} "
            "(the scheduler's num_train_timesteps)"
        )

    if spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        ascending = np.arange(num_inference_steps, dtype=np.int64) * step_ratio + steps_offset
    elif spacing == "trailing":
        step_ratio_float = num_train_timesteps / num_inference_steps
        ascending = np.round(np.arange(num_train_timesteps, 0, -step_ratio_float))[::-1].astype(np.int64) - 1
    elif spacing == "linspace":
        ascending = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round().astype(np.int64)
    else:
        raise ValueError(
            f"scheduler_config timestep_spacing {spacing!r} is not supported: use {', '.join(TIMESTEP_SPACINGS)}"
        )

    grid = [int(t) for t in ascending[::-1]]
    if grid[0] >= num_train_timesteps or len(set(grid)) != len(grid):
        raise ValueError(
            f"num_inference_steps {num_inference_steps} with steps_offset {steps_offset} gives the grid "
            f"{grid[:3]}...{grid[-3:]}, which leaves 0 .. {num_train_timesteps - 1} or repeats a timestep: "
            "use fewer steps or a smaller steps_offset"
        )
    return grid


def start_grid_index(grid: Sequence[int], start_timestep: int, num_train_timesteps: int = 1000) -> int:
    """Find the grid step nearest to a start timestep.

    Parameters
    ----------
    grid
        Descending timestep grid from :func:`timestep_grid`.
    start_timestep
        Timestep to start denoising from, 0 to ``num_train_timesteps - 1``.
    num_train_timesteps
        Number of training timesteps of the scheduler.

    Returns
    -------
    int
        Index into ``grid``; denoising then runs ``len(grid) - index`` steps. On a tie between two grid
        steps the lower timestep (less noise) wins. Stable Diffusion 1.5's 100-step grid maps 674 to
        index 32 (timestep 671), which leaves 68 steps.
    """
    if len(grid) == 0:
        raise ValueError("grid is empty: build it with timestep_grid")
    if any(later >= earlier for earlier, later in itertools.pairwise(grid)):
        raise ValueError(f"grid must be strictly descending, got {list(grid)[:5]}...")
    if not 0 <= start_timestep < num_train_timesteps:
        raise ValueError(
            f"start_timestep {start_timestep} is beyond the timestep grid: use 0 to {num_train_timesteps - 1}"
        )
    distances = [abs(t - start_timestep) for t in grid]
    nearest = min(distances)
    return max(index for index, distance in enumerate(distances) if distance == nearest)


def grid_start_timestep(
    scheduler_config: Mapping[str, Any], num_inference_steps: int, start_timestep: int
) -> int:
    """Return the timestep that denoising starts from: the grid step nearest to ``start_timestep``.

    :func:`denoise` noises the latents to this timestep, not to ``start_timestep`` itself. With 20 steps
    on Stable Diffusion 1.5's grid (``[951, 901, ..., 1]``), 21 becomes 1, so only one step runs.
    """
    grid = timestep_grid(scheduler_config, num_inference_steps)
    num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
    return grid[start_grid_index(grid, start_timestep, num_train_timesteps)]


def patch_seed(seed: int, slide_identity: str, row: int, col: int) -> int:
    """Derive a 63-bit generator seed from the run seed and a patch's slide and grid position.

    SHA-256 of a canonical JSON text, so the value is the same in every process and on every machine
    (Python's ``hash()`` of a string changes between processes).
    """
    text = json.dumps([int(seed), str(slide_identity), int(row), int(col)], separators=(",", ":"))
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def patch_noise(
    keys: Sequence[tuple[str, int, int]], seed: int, shape: tuple[int, ...] = (4, 32, 32)
) -> torch.Tensor:
    """Draw standard normal noise for each patch from its own generator.

    Parameters
    ----------
    keys
        One ``(slide_identity, row, col)`` per patch; ``row`` and ``col`` index the patch grid.
    seed
        Run seed (the inference settings' ``seed``).
    shape
        Shape of one patch's noise, the latent shape ``(channels, height, width)``.

    Returns
    -------
    torch.Tensor
        ``(len(keys), *shape)`` float32 on the CPU. Each patch's noise comes from a CPU
        ``torch.Generator`` seeded by :func:`patch_seed`, so it does not depend on the batch size,
        the order of the keys or the device the reconstruction later runs on.
    """
    batch = []
    for position, key in enumerate(keys):
        if len(key) != 3 or not isinstance(key[0], str):
            raise ValueError(f"keys[{position}] is {key!r}: use (slide_identity: str, row: int, col: int)")
        slide_identity, row, col = key
        if isinstance(row, bool) or isinstance(col, bool) or int(row) != row or int(col) != col:
            raise ValueError(f"keys[{position}] is {key!r}: row and col must be integers")
        generator = torch.Generator(device="cpu").manual_seed(patch_seed(seed, slide_identity, row, col))
        batch.append(torch.randn(shape, generator=generator, dtype=torch.float32))
    if not batch:
        return torch.empty((0, *shape), dtype=torch.float32)
    return torch.stack(batch)


def reconstruct_latents(
    unet: torch.nn.Module,
    scheduler_config: Mapping[str, Any],
    latents: torch.Tensor,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    *,
    start_timestep: int = 674,
    num_inference_steps: int = 100,
    sampler: str = "ddim",
    guidance_scale: float = 7.5,
    callback: ProgressCallback | None = None,
) -> torch.Tensor:
    """Noise latents to a start timestep and denoise them down the grid, guided by a prompt.

    Parameters
    ----------
    unet
        A diffusers ``UNet2DConditionModel`` predicting epsilon (or a compiled wrapper of one). It runs
        in the dtype and on the device of its weights.
    scheduler_config
        The pipeline's scheduler configuration; see :func:`alphas_cumprod` and :func:`timestep_grid`.
        ``set_alpha_to_one`` picks the alpha after the last step (``alphas_cumprod[0]`` when false, as in
        Stable Diffusion 1.5). ``clip_sample`` is ignored: the predicted latents are never clipped.
    latents
        ``(n, c, h, w)`` VAE latents, already multiplied by the VAE's scaling factor.
    noise
        Standard normal noise of the same shape, for example from :func:`patch_noise`.
    prompt_embeds
        ``(n, tokens, dim)`` text-encoder embeddings of each patch's prompt.
    negative_prompt_embeds
        Embeddings of the unconditional (empty) prompt, same shape; unused and may be None when
        ``guidance_scale`` is 1.
    start_timestep
        Timestep to noise to; denoising starts at the nearest grid step (:func:`start_grid_index`).
    num_inference_steps
        Size of the whole grid over the training timesteps; the run takes the steps from the start down.
    sampler
        ``"ddim"``: deterministic DDIM (eta 0), one UNet call a step. ``"plms"``: pseudo linear multistep
        as diffusers' ``PNDMScheduler`` with ``skip_prk_steps`` runs it. Its first step is a two-call
        warm-up, then it uses 2, 3 and 4 earlier predictions, so it takes one UNet call more than DDIM.
    guidance_scale
        Classifier-free guidance scale. Above 1, one UNet call a step on the stacked
        ``[unconditional, conditional]`` batch of ``2n``; exactly 1 runs only the conditional batch of ``n``.
    callback
        Called as ``callback(step_index, n_steps)`` after each finished step (``step_index`` from 0 to
        ``n_steps - 1``). Returning ``False`` stops the run with :class:`InterruptedError`.

    Returns
    -------
    torch.Tensor
        The reconstructed latents, ``(n, c, h, w)`` float32 on the UNet's device.

    Raises
    ------
    ValueError
        For a shape, sampler, guidance scale or start timestep outside what is described here.
    InterruptedError
        When ``callback`` returns False.
    FloatingPointError
        When the result contains NaN or infinity (a half-precision UNet that overflowed).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is invalid: use one of {', '.join(SAMPLERS)}")
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type != "epsilon":
        raise ValueError(
            f"scheduler_config prediction_type {prediction_type!r} is not supported: the UNet must predict epsilon"
        )
    guided = _check_guidance(guidance_scale, negative_prompt_embeds)
    _check_shapes(unet, latents, noise, prompt_embeds, negative_prompt_embeds if guided else None)

    grid = timestep_grid(scheduler_config, num_inference_steps)
    num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
    timesteps = grid[start_grid_index(grid, start_timestep, num_train_timesteps) :]
    alphas = alphas_cumprod(scheduler_config)
    final_alpha = 1.0 if scheduler_config.get("set_alpha_to_one", True) else float(alphas[0])
    # Alpha at each timestep of the run and at the point after it, so step k goes from
    # alpha_path[k] to alpha_path[k + 1].
    alpha_path = [float(alphas[t]) for t in timesteps] + [final_alpha]

    device, dtype = _module_device_dtype(unet)
    if latents.shape[0] == 0:
        return torch.empty(latents.shape, dtype=torch.float32, device=device)

    if guided:
        assert negative_prompt_embeds is not None
        encoder_hidden_states = torch.cat([negative_prompt_embeds, prompt_embeds]).to(device, dtype)
    else:
        encoder_hidden_states = prompt_embeds.to(device, dtype)

    def predict_noise(sample: torch.Tensor, timestep: int) -> torch.Tensor:
        model_input = torch.cat([sample, sample]) if guided else sample
        timestep_tensor = torch.tensor(timestep, dtype=torch.long, device=device)
        output = unet(model_input.to(dtype), timestep_tensor, encoder_hidden_states=encoder_hidden_states)
        epsilon = (output.sample if hasattr(output, "sample") else output[0]).float()
        if not guided:
            return epsilon
        unconditional, conditional = epsilon.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    with torch.inference_mode():
        start_alpha = alpha_path[0]
        sample = latents.to(device, torch.float32) * start_alpha**0.5
        sample = sample + noise.to(device, torch.float32) * (1.0 - start_alpha) ** 0.5

        if sampler == "ddim":
            sample = _run_ddim(sample, timesteps, alpha_path, predict_noise, callback)
        else:
            sample = _run_plms(sample, timesteps, alpha_path, predict_noise, callback)

    if not torch.isfinite(sample).all():
        raise FloatingPointError(
            f"the reconstructed latents contain NaN or infinity (UNet dtype {dtype}): "
            "run the UNet in float32 or bfloat16"
        )
    return sample


def _run_ddim(
    sample: torch.Tensor,
    timesteps: list[int],
    alpha_path: list[float],
    predict_noise: Callable[[torch.Tensor, int], torch.Tensor],
    callback: ProgressCallback | None,
) -> torch.Tensor:
    n_steps = len(timesteps)
    for step_index, timestep in enumerate(timesteps):
        epsilon = predict_noise(sample, timestep)
        sample = ddim_step(sample, epsilon, alpha_path[step_index], alpha_path[step_index + 1])
        _report(callback, step_index, n_steps)
    return sample


def _run_plms(
    sample: torch.Tensor,
    timesteps: list[int],
    alpha_path: list[float],
    predict_noise: Callable[[torch.Tensor, int], torch.Tensor],
    callback: ProgressCallback | None,
) -> torch.Tensor:
    n_steps = len(timesteps)
    history: list[torch.Tensor] = []
    for step_index, timestep in enumerate(timesteps):
        alpha, alpha_prev = alpha_path[step_index], alpha_path[step_index + 1]
        epsilon = predict_noise(sample, timestep)

        if not history and step_index + 1 < n_steps:
            # Warm-up without history: step with this prediction, predict again at the next timestep,
            # and redo the step from the same sample with the mean of the two predictions. Only the first
            # prediction enters the history, as in diffusers' PNDMScheduler.
            trial = ddim_step(sample, epsilon, alpha, alpha_prev)
            combined = (epsilon + predict_noise(trial, timesteps[step_index + 1])) / 2
        elif not history:
            # A run of one step has no next timestep to warm up at, so it takes a plain step as PNDM does.
            combined = epsilon
        elif len(history) == 1:
            combined = (3 * epsilon - history[-1]) / 2
        elif len(history) == 2:
            combined = (23 * epsilon - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            combined = (55 * epsilon - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24

        history = [*history[-2:], epsilon]
        sample = ddim_step(sample, combined, alpha, alpha_prev)
        _report(callback, step_index, n_steps)
    return sample


def ddim_step(sample: torch.Tensor, epsilon: torch.Tensor, alpha: float, alpha_prev: float) -> torch.Tensor:
    """Take one deterministic DDIM step (eta 0) from cumulative alpha ``alpha`` to ``alpha_prev``.

    The predicted clean sample ``x0 = (x - sqrt(1 - alpha) * epsilon) / sqrt(alpha)`` is moved back to the
    noise level of ``alpha_prev`` along the same epsilon. PNDM's formula (9) for the PLMS step is
    algebraically the same update.
    """
    predicted_original = (sample - (1.0 - alpha) ** 0.5 * epsilon) / alpha**0.5
    return alpha_prev**0.5 * predicted_original + (1.0 - alpha_prev) ** 0.5 * epsilon


def _report(callback: ProgressCallback | None, step_index: int, n_steps: int) -> None:
    if callback is not None and callback(step_index, n_steps) is False:
        raise InterruptedError(f"reconstruction cancelled after step {step_index + 1} of {n_steps}")


def _check_guidance(guidance_scale: float, negative_prompt_embeds: torch.Tensor | None) -> bool:
    if not math.isfinite(guidance_scale) or guidance_scale < 1:
        raise ValueError(f"guidance_scale {guidance_scale} is invalid: use 1 (no guidance) or more")
    guided = guidance_scale > 1
    if guided and negative_prompt_embeds is None:
        raise ValueError(
            f"negative_prompt_embeds is None but guidance_scale is {guidance_scale}: pass the empty prompt's "
            "embeddings, or use guidance_scale 1"
        )
    return guided


def _check_shapes(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
) -> None:
    config = getattr(unet, "config", {})
    in_channels = config.get("in_channels") if isinstance(config, Mapping) else None
    cross_attention_dim = config.get("cross_attention_dim") if isinstance(config, Mapping) else None

    if latents.ndim != 4:
        raise ValueError(f"latents must be (n, channels, height, width), got shape {tuple(latents.shape)}")
    if in_channels is not None and latents.shape[1] != in_channels:
        raise ValueError(
            f"latents have {latents.shape[1]} channels but the UNet expects {in_channels}: "
            "pass VAE latents (times the scaling factor), not images"
        )
    if noise.shape != latents.shape:
        raise ValueError(
            f"noise shape {tuple(noise.shape)} differs from latents shape {tuple(latents.shape)}: "
            "draw one noise tensor per latent"
        )
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != latents.shape[0]:
        raise ValueError(
            f"prompt_embeds must be (n, tokens, dim) with n = {latents.shape[0]} latents, "
            f"got shape {tuple(prompt_embeds.shape)}"
        )
    if isinstance(cross_attention_dim, int) and prompt_embeds.shape[2] != cross_attention_dim:
        raise ValueError(
            f"prompt_embeds have dimension {prompt_embeds.shape[2]} but the UNet's cross_attention_dim is "
            f"{cross_attention_dim}: encode prompts with this model's text encoder"
        )
    if negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
        raise ValueError(
            f"negative_prompt_embeds shape {tuple(negative_prompt_embeds.shape)} differs from "
            f"prompt_embeds shape {tuple(prompt_embeds.shape)}: repeat the empty prompt's embedding n times"
        )


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    try:
        parameter = next(module.parameters())
    except StopIteration:
        raise ValueError("unet has no parameters: pass a loaded UNet2DConditionModel") from None
    return parameter.device, parameter.dtype
