"""Partial-diffusion reconstruction checked against diffusers' own pipeline and schedulers.

The models are tiny Stable Diffusion parts (UNet2DConditionModel, AutoencoderKL, CLIPTextModel and
CLIPTokenizer) with seeded random weights, saved in the diffusers folder layout and loaded back through
``StableDiffusionImg2ImgPipeline.from_pretrained``. The patches are real 256 px tiles of the CMU-1 slide.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import importlib.resources
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from napari_anopilad.method.diffusion import (
    alphas_cumprod,
    patch_noise,
    reconstruct_latents,
    start_grid_index,
    timestep_grid,
)

# Stable Diffusion 1.5's scheduler_config.json.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SLIDE_IDENTITY = "CMU-1-Small-Region"
PATCH_CELLS = [(4, 2), (4, 3), (4, 4), (4, 5), (5, 2), (5, 3), (5, 4), (5, 5)]
PROMPTS = [
    "a histopathological photograph of (lymphocytes)++ and (germinal centre)+ and (sinus)",
    "a histopathological photograph of (adipose tissue)++ and (capsule)+ and (fibrous septa)",
]


def _bytes_to_unicode() -> list[str]:
    # GPT-2's reversible byte-to-character table, which CLIP's BPE vocabulary is written in.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return [chr(code) for code in characters]


def _write_clip_tokenizer_files(folder: Path) -> None:
    """Write CLIP's vocab.json and merges.txt from the BPE merges that open_clip ships."""
    bpe_path = importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    # CLIP keeps the first 49152 - 256 - 2 merges, after the header line.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_characters = _bytes_to_unicode()
    tokens = [
        *byte_characters,
        *(character + "</w>" for character in byte_characters),
        *("".join(merge.split()) for merge in merges),
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _build_tiny_pipeline(folder: Path) -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        # Attention only at 16x16 keeps a UNet call near 0.1 s on a shared 2-core CPU.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    # Four blocks downsample 256 px by 8, to Stable Diffusion's 4x32x32 latent.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=256,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    tokenizer_folder = folder.parent / "clip-bpe"
    _write_clip_tokenizer_files(tokenizer_folder)
    tokenizer = CLIPTokenizer(
        vocab=str(tokenizer_folder / "vocab.json"),
        merges=str(tokenizer_folder / "merges.txt"),
        model_max_length=77,
    )
    pipeline = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # The tiny models' kernels are too small to split across threads, and on a shared 2-core machine two
    # threads per process oversubscribe the cores: one thread is several times faster here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionImg2ImgPipeline:
    folder = tmp_path_factory.mktemp("tiny-sd") / "pipeline"
    _build_tiny_pipeline(folder)
    assert (folder / "model_index.json").is_file()
    loaded = StableDiffusionImg2ImgPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def patch_latents(pipeline: StableDiffusionImg2ImgPipeline, cmu_slide_path: Path) -> torch.Tensor:
    """VAE latents (times the scaling factor) of eight real 256 px level-0 patches of CMU-1."""
    level0 = tifffile.imread(cmu_slide_path, key=0)
    patches = np.stack(
        [level0[row * 256 : (row + 1) * 256, col * 256 : (col + 1) * 256] for row, col in PATCH_CELLS]
    )
    images = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        distribution = pipeline.vae.encode(images).latent_dist
    return distribution.mean * pipeline.vae.config.scaling_factor


@pytest.fixture(scope="module")
def prompt_pair(pipeline: StableDiffusionImg2ImgPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of two keyword prompts and of the empty prompt, each (2, 77, 32)."""

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = pipeline.tokenizer(
            texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            return pipeline.text_encoder(tokens.input_ids).last_hidden_state

    return encode(PROMPTS), encode(["", ""])


def _guided_epsilon(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: int,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    with torch.no_grad():
        output = unet(
            torch.cat([sample, sample]),
            timestep,
            encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
        ).sample
    unconditional, conditional = output.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def _record_unet_calls(
    unet: torch.nn.Module,
) -> tuple[list[tuple[int, int, torch.dtype]], Callable[[], None]]:
    """Record (batch size, timestep, input dtype) of every UNet forward call; returns the list and a remover."""
    calls: list[tuple[int, int, torch.dtype]] = []

    def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((sample.shape[0], int(torch.as_tensor(timestep).reshape(-1)[0]), sample.dtype))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    return calls, handle.remove


def _seeded_noise(seeds: list[int]) -> torch.Tensor:
    return torch.cat(
        [torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    )


def _drive_pndm(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    noise: torch.Tensor,
    prompt_pair: tuple[torch.Tensor, torch.Tensor],
    timesteps: list[int],
    num_inference_steps: int,
) -> torch.Tensor:
    """Noise to timesteps[0] and step diffusers' PNDMScheduler by hand through the given timesteps."""
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_inference_steps)
    sample = scheduler.add_noise(latents, noise, torch.tensor([timesteps[0]]))
    for timestep in timesteps:
        epsilon = _guided_epsilon(unet, sample, timestep, *prompt_pair, 7.5)
        sample = scheduler.step(epsilon, timestep, sample).prev_sample
    return sample


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


# Grid and start


@pytest.mark.parametrize("num_inference_steps", [100, 50, 25, 7])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timestep_grid_matches_ddim_scheduler(num_inference_steps: int, spacing: str) -> None:
    config = {**SD15_SCHEDULER_CONFIG, "timestep_spacing": spacing}
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_inference_steps)

    assert timestep_grid(config, num_inference_steps) == scheduler.timesteps.tolist()


def test_timestep_grid_sd15_values() -> None:
    grid = timestep_grid(SD15_SCHEDULER_CONFIG, 100)

    assert grid == list(range(991, 0, -10))


def test_timestep_grid_is_pndm_grid_without_repeat() -> None:
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(100)
    pndm_timesteps = scheduler.timesteps.tolist()

    # PNDM repeats its second timestep for the PLMS warm-up: 991, 981, 981, 971, ...
    assert pndm_timesteps[:4] == [991, 981, 981, 971]
    assert timestep_grid(SD15_SCHEDULER_CONFIG, 100) == list(dict.fromkeys(pndm_timesteps))


def test_timestep_grid_rejects_bad_steps() -> None:
    with pytest.raises(ValueError, match="num_inference_steps 0"):
        timestep_grid(SD15_SCHEDULER_CONFIG, 0)
    with pytest.raises(ValueError, match="timestep_spacing 'karras'"):
        timestep_grid({**SD15_SCHEDULER_CONFIG, "timestep_spacing": "karras"}, 10)


def test_start_grid_index_paper_start() -> None:
    grid = timestep_grid(SD15_SCHEDULER_CONFIG, 100)

    index = start_grid_index(grid, 674)

    assert grid[index] == 671
    assert len(grid) - index == 68


@pytest.mark.parametrize(
    ("start_timestep", "expected_timestep"),
    [(999, 991), (991, 991), (981, 981), (676, 671), (500, 501), (0, 1), (1, 1)],
)
def test_start_grid_index_nearest(start_timestep: int, expected_timestep: int) -> None:
    grid = timestep_grid(SD15_SCHEDULER_CONFIG, 100)

    assert grid[start_grid_index(grid, start_timestep)] == expected_timestep


@pytest.mark.parametrize("start_timestep", [-1, 1000, 5000])
def test_start_grid_index_rejects_start_beyond_grid(start_timestep: int) -> None:
    grid = timestep_grid(SD15_SCHEDULER_CONFIG, 100)

    with pytest.raises(ValueError, match=f"start_timestep {start_timestep}"):
        start_grid_index(grid, start_timestep)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_matches_diffusers(beta_schedule: str) -> None:
    config = {**SD15_SCHEDULER_CONFIG, "beta_schedule": beta_schedule}

    expected = DDIMScheduler.from_config(config).alphas_cumprod.double()

    # diffusers computes the table in float32, so float32 rounding is the expected difference.
    torch.testing.assert_close(alphas_cumprod(config), expected, rtol=2e-6, atol=1e-7)


# Noise


def test_patch_noise_independent_of_batch_and_order() -> None:
    keys = [(SLIDE_IDENTITY, row, col) for row, col in PATCH_CELLS]

    batch = patch_noise(keys, seed=3)
    reversed_batch = patch_noise(keys[::-1], seed=3)

    assert batch.shape == (8, 4, 32, 32)
    assert batch.dtype == torch.float32
    assert batch.device.type == "cpu"
    for position, key in enumerate(keys):
        alone = patch_noise([key], seed=3)[0]
        assert torch.equal(alone, batch[position])
        assert torch.equal(alone, reversed_batch[len(keys) - 1 - position])


def test_patch_noise_differs_by_key_and_seed() -> None:
    base = patch_noise([(SLIDE_IDENTITY, 4, 2)], seed=0)[0]

    for other_key, other_seed in [
        ((SLIDE_IDENTITY, 4, 3), 0),
        ((SLIDE_IDENTITY, 2, 4), 0),
        (("other", 4, 2), 0),
    ]:
        assert not torch.allclose(base, patch_noise([other_key], seed=other_seed)[0])
    assert not torch.allclose(base, patch_noise([(SLIDE_IDENTITY, 4, 2)], seed=1)[0])
    assert abs(float(base.mean())) < 0.1
    assert abs(float(base.std()) - 1) < 0.1


def test_patch_noise_same_in_other_processes() -> None:
    # Python salts str hashes per process (PYTHONHASHSEED); the seed must not depend on that salt.
    code = (
        "from napari_anopilad.method.diffusion import patch_noise;"
        f"print(hash({SLIDE_IDENTITY!r}));"
        f"print(float(patch_noise([({SLIDE_IDENTITY!r}, 4, 2)], seed=7).double().sum()))"
    )
    here = float(patch_noise([(SLIDE_IDENTITY, 4, 2)], seed=7).double().sum())
    hash_seed = "1" if hash(SLIDE_IDENTITY) != _str_hash_with_seed(SLIDE_IDENTITY, "1") else "2"

    output = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
    )
    other_hash, other_noise_sum = output.stdout.split()

    assert int(other_hash) != hash(SLIDE_IDENTITY)
    assert float(other_noise_sum) == here


def _str_hash_with_seed(text: str, hash_seed: str) -> int:
    output = subprocess.run(
        [sys.executable, "-c", f"print(hash({text!r}))"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
    )
    return int(output.stdout)


def test_patch_noise_seed_is_sha256_of_key() -> None:
    text = json.dumps([7, SLIDE_IDENTITY, 4, 2], separators=(",", ":"))
    generator_seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)
    expected = torch.randn((4, 32, 32), generator=torch.Generator().manual_seed(generator_seed))

    assert torch.equal(patch_noise([(SLIDE_IDENTITY, 4, 2)], seed=7)[0], expected)


@pytest.mark.parametrize("bad_key", [("slide", 1), (3, 1, 2), ("slide", 1.5, 2)])
def test_patch_noise_rejects_bad_key(bad_key: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match=r"keys\[0\]"):
        patch_noise([bad_key], seed=0)  # type: ignore[list-item]


# Reference checks against diffusers


def test_ddim_matches_img2img_pipeline(
    pipeline: StableDiffusionImg2ImgPipeline,
    patch_latents: torch.Tensor,
    prompt_pair: tuple[torch.Tensor, torch.Tensor],
) -> None:
    latents = patch_latents[:2]
    grid = timestep_grid(SD15_SCHEDULER_CONFIG, 100)
    start_index = start_grid_index(grid, 674)
    # The img2img pipeline runs the last int(num_inference_steps * strength) steps of the grid, so a run
    # that starts at grid[start_index] needs strength (100 - start_index) / 100: 0.68 starts at grid[32],
    # timestep 671, the grid step nearest 674. The int() truncation is checked by the recorded calls.
    strength = (100 - start_index) / 100
    # Given a list of CPU generators, diffusers' randn_tensor draws each latent's noise with
    # torch.randn((1, 4, 32, 32)) from that latent's generator. The same draw here gives our noise.
    seeds = [11, 12]
    noise = _seeded_noise(seeds)
    reference_pipeline = StableDiffusionImg2ImgPipeline(
        **{**pipeline.components, "scheduler": DDIMScheduler.from_config(pipeline.scheduler.config)}
    )
    reference_pipeline.set_progress_bar_config(disable=True)
    calls, remove_hook = _record_unet_calls(pipeline.unet)

    try:
        expected = reference_pipeline(
            image=latents,
            prompt_embeds=prompt_pair[0],
            negative_prompt_embeds=prompt_pair[1],
            strength=strength,
            num_inference_steps=100,
            guidance_scale=7.5,
            eta=0.0,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            output_type="latent",
        ).images
        pipeline_timesteps = [timestep for _, timestep, _ in calls]
        calls.clear()
        actual = reconstruct_latents(
            pipeline.unet, pipeline.scheduler.config, latents, noise, *prompt_pair, start_timestep=674
        )
    finally:
        remove_hook()

    assert pipeline_timesteps == grid[32:]
    assert [timestep for _, timestep, _ in calls] == grid[32:]
    assert all(batch == 4 for batch, _, _ in calls)
    assert not torch.allclose(actual, latents, atol=0.1)
    # float32 tolerance: our update runs in float64 coefficients and a different but equal formula.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize(
    ("num_inference_steps", "start_timestep"),
    [
        (25, 674),  # 674 on the 25-step grid [961, 921, ...] is 681: 18 steps, all four history lengths
        (20, 901),  # PNDM's 20-step grid is [951, 901, 901, 851, ...]: a start on its repeated timestep
        (20, 951),  # the top of the grid, where the hand-driven sequence is PNDM's own grid
        (100, 24),  # near the end of the published 100-step grid: warm-up, 2- and 3-history steps
    ],
)
def test_plms_matches_pndm_scheduler(
    pipeline: StableDiffusionImg2ImgPipeline,
    patch_latents: torch.Tensor,
    prompt_pair: tuple[torch.Tensor, torch.Tensor],
    num_inference_steps: int,
    start_timestep: int,
) -> None:
    latents = patch_latents[:2]
    noise = _seeded_noise([21, 22])
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_inference_steps)
    distinct = list(dict.fromkeys(scheduler.timesteps.tolist()))
    first = start_grid_index(distinct, start_timestep)
    # PNDM does its warm-up on its first two step() calls: the second call repeats the timestep after the
    # first. Starting mid-grid, the sequence that puts the warm-up at our start is therefore
    # [t_start, t_next, t_next, t_after, ...]; from the top it is PNDM's own grid.
    sequence = [distinct[first], *distinct[first + 1 : first + 2], *distinct[first + 1 :]]
    if first == 0:
        assert sequence == scheduler.timesteps.tolist()
    expected = _drive_pndm(pipeline.unet, latents, noise, prompt_pair, sequence, num_inference_steps)
    calls, remove_hook = _record_unet_calls(pipeline.unet)

    try:
        actual = reconstruct_latents(
            pipeline.unet,
            SD15_SCHEDULER_CONFIG,
            latents,
            noise,
            *prompt_pair,
            start_timestep=start_timestep,
            num_inference_steps=num_inference_steps,
            sampler="plms",
        )
    finally:
        remove_hook()

    assert [timestep for _, timestep, _ in calls] == sequence
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_img2img_strength_start_pndm_vs_ddim(pipeline: StableDiffusionImg2ImgPipeline) -> None:
    # img2img runs scheduler.timesteps[n - int(n * strength):]. PNDM's list repeats its second entry, so
    # from the third entry on it is one grid step noisier than DDIM's at the same strength.
    pndm_pipeline = pipeline
    ddim_pipeline = StableDiffusionImg2ImgPipeline(
        **{**pipeline.components, "scheduler": DDIMScheduler.from_config(pipeline.scheduler.config)}
    )
    starts: dict[str, list[int]] = {"pndm": [], "ddim": []}

    for name, candidate in [("pndm", pndm_pipeline), ("ddim", ddim_pipeline)]:
        for strength in [0.68, 0.67, 0.98, 0.99, 1.0]:
            candidate.scheduler.set_timesteps(100)
            timesteps, _ = candidate.get_timesteps(100, strength, "cpu")
            starts[name].append(int(timesteps[0]))

    assert starts["ddim"] == [671, 661, 971, 981, 991]
    assert starts["pndm"] == [681, 671, 981, 981, 991]


def test_img2img_pndm_starts_one_step_off(
    pipeline: StableDiffusionImg2ImgPipeline,
    patch_latents: torch.Tensor,
    prompt_pair: tuple[torch.Tensor, torch.Tensor],
) -> None:
    # Measured with diffusers 0.42 on a 20-step grid (PNDM: [951, 901, 901, 851, ...]). Strength 0.65
    # takes PNDM's list from index 20 - int(13.0) = 7, which is timestep 651 (DDIM at 0.65 starts at 601).
    # The pipeline passes each timestep once, so PNDM's warm-up consumes 651 and 601 and every later UNet
    # call gets a sample one grid step noisier than its timestep label: 13 calls at [651, 601, 551, ..., 1]
    # where the PLMS reconstruction from 651 makes 14 at [651, 601, 601, 551, ..., 1].
    latents = patch_latents[:2]
    seeds = [31, 32]
    noise = _seeded_noise(seeds)
    grid = timestep_grid(SD15_SCHEDULER_CONFIG, 20)
    calls, remove_hook = _record_unet_calls(pipeline.unet)

    try:
        pipeline_result = pipeline(
            image=latents,
            prompt_embeds=prompt_pair[0],
            negative_prompt_embeds=prompt_pair[1],
            strength=0.65,
            num_inference_steps=20,
            guidance_scale=7.5,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            output_type="latent",
        ).images
        pipeline_timesteps = [timestep for _, timestep, _ in calls]
        calls.clear()
        plms_result = reconstruct_latents(
            pipeline.unet,
            SD15_SCHEDULER_CONFIG,
            latents,
            noise,
            *prompt_pair,
            start_timestep=651,
            num_inference_steps=20,
            sampler="plms",
        )
        plms_timesteps = [timestep for _, timestep, _ in calls]
    finally:
        remove_hook()

    assert pipeline_timesteps == grid[6:]
    assert plms_timesteps == [651, 601, *grid[7:]]
    # The pipeline is PNDM driven with its own timesteps, so the difference is the mapping, not the maths.
    by_hand = _drive_pndm(pipeline.unet, latents, noise, prompt_pair, grid[6:], 20)
    torch.testing.assert_close(pipeline_result, by_hand, rtol=1e-4, atol=1e-4 * float(by_hand.abs().max()))
    assert _relative_error(pipeline_result, plms_result) > 1e-2


# One step written out by hand


def _sd15_alphas_by_hand() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_ddim_steps_match_formula(
    pipeline: StableDiffusionImg2ImgPipeline,
    patch_latents: torch.Tensor,
    prompt_pair: tuple[torch.Tensor, torch.Tensor],
) -> None:
    latents = patch_latents[:2]
    noise = _seeded_noise([41, 42])
    alphas = _sd15_alphas_by_hand()
    unet = pipeline.unet

    actual = reconstruct_latents(
        unet, SD15_SCHEDULER_CONFIG, latents, noise, *prompt_pair, start_timestep=11, guidance_scale=3.0
    )

    # Start 11 runs the grid steps 11 -> 1 and 1 -> end, where the end alpha is alphas_cumprod[0]
    # because set_alpha_to_one is false.
    sample = alphas[11] ** 0.5 * latents + (1 - alphas[11]) ** 0.5 * noise
    for timestep, alpha_prev in [(11, alphas[1]), (1, alphas[0])]:
        alpha = alphas[timestep]
        epsilon = _guided_epsilon(unet, sample, timestep, *prompt_pair, 3.0)
        predicted_original = (sample - (1 - alpha) ** 0.5 * epsilon) / alpha**0.5
        sample = alpha_prev**0.5 * predicted_original + (1 - alpha_prev) ** 0.5 * epsilon
    torch.testing.assert_close(actual, sample, rtol=1e-5, atol=1e-5 * float(sample.abs().max()))


def test_plms_steps_match_formula(
    pipeline: StableDiffusionImg2ImgPipeline,
    patch_latents: torch.Tensor,
    prompt_pair: tuple[torch.Tensor, torch.Tensor],
) -> None:
    latents = patch_latents[:2]
    noise = _seeded_noise([51, 52])
    alphas = _sd15_alphas_by_hand()
    unet = pipeline.unet

    def pndm_formula_9(
        sample: torch.Tensor, epsilon: torch.Tensor, alpha: float, alpha_prev: float
    ) -> torch.Tensor:
        # Liu et al. 2022 (PNDM), formula (9), in cumulative alphas.
        denominator = alpha * (1 - alpha_prev) ** 0.5 + (alpha * (1 - alpha) * alpha_prev) ** 0.5
        return (alpha_prev / alpha) ** 0.5 * sample - (alpha_prev - alpha) * epsilon / denominator

    def epsilon_at(sample: torch.Tensor, timestep: int) -> torch.Tensor:
        return _guided_epsilon(unet, sample, timestep, *prompt_pair, 7.5)

    actual = reconstruct_latents(
        unet, SD15_SCHEDULER_CONFIG, latents, noise, *prompt_pair, start_timestep=21, sampler="plms"
    )

    sample = alphas[21] ** 0.5 * latents + (1 - alphas[21]) ** 0.5 * noise
    # 21 -> 11: warm-up, the mean of the predictions at the start and at the trial step's end.
    epsilon_21 = epsilon_at(sample, 21)
    trial = pndm_formula_9(sample, epsilon_21, alphas[21], alphas[11])
    sample = pndm_formula_9(sample, (epsilon_21 + epsilon_at(trial, 11)) / 2, alphas[21], alphas[11])
    # 11 -> 1: two-step linear multistep.
    epsilon_11 = epsilon_at(sample, 11)
    sample = pndm_formula_9(sample, (3 * epsilon_11 - epsilon_21) / 2, alphas[11], alphas[1])
    # 1 -> end: three-step linear multistep, ending at alphas_cumprod[0].
    epsilon_1 = epsilon_at(sample, 1)
    combined = (23 * epsilon_1 - 16 * epsilon_11 + 5 * epsilon_21) / 12
    sample = pndm_formula_9(sample, combined, alphas[1], alphas[0])
    torch.testing.assert_close(actual, sample, rtol=1e-5, atol=1e-5 * float(sample.abs().max()))


# Batching, guidance, precision, progress and errors


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_patch_result_independent_of_batch(
    pipeline: StableDiffusionImg2ImgPipeline,
    patch_latents: torch.Tensor,
    prompt_pair: tuple[torch.Tensor, torch.Tensor],
    sampler: str,
) -> None:
    keys = [(SLIDE_IDENTITY, row, col) for row, col in PATCH_CELLS]
    prompt_embeds = prompt_pair[0].repeat(4, 1, 1)
    negative_prompt_embeds = prompt_pair[1].repeat(4, 1, 1)
    order = [5, 2, 7, 0, 3, 6, 1, 4]

    def run(indices: list[int]) -> torch.Tensor:
        return reconstruct_latents(
            pipeline.unet,
            SD15_SCHEDULER_CONFIG,
            patch_latents[indices],
            patch_noise([keys[i] for i in indices], seed=0),
            prompt_embeds[indices],
            negative_prompt_embeds[indices],
            num_inference_steps=10,
            sampler=sampler,
        )

    batch = run(order)

    # Bitwise equality is not expected: CPU kernels block a batch of 16 differently from a batch of 2, so
    # float32 sums round in another order. Measured on this 2-core CPU the differences stay below 2e-6 of
    # the largest value after 8 steps at guidance 7.5; 1e-5 leaves margin, while noise or embeddings
    # taken from another patch would change the result by order 1.
    for position, index in enumerate(order):
        alone = run([index])[0]
        torch.testing.assert_close(batch[position], alone, rtol=1e-5, atol=1e-5 * float(alone.abs().max()))


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_guidance_one_skips_unconditional_half(
    pipeline: StableDiffusionImg2ImgPipeline,
    patch_latents: torch.Tensor,
    prompt_pair: tuple[torch.Tensor, torch.Tensor],
    sampler: str,
) -> None:
    latents = patch_latents[:2]
    noise = _seeded_noise([61, 62])
    calls, remove_hook = _record_unet_calls(pipeline.unet)

    try:
        unguided = reconstruct_latents(
            pipeline.unet,
            SD15_SCHEDULER_CONFIG,
            latents,
            noise,
            prompt_pair[0],
            None,
            num_inference_steps=10,
            sampler=sampler,
            guidance_scale=1.0,
        )
        unguided_batches = [batch for batch, _, _ in calls]
        calls.clear()
        guided = reconstruct_latents(
            pipeline.unet,
            SD15_SCHEDULER_CONFIG,
            latents,
            noise,
            *prompt_pair,
            num_inference_steps=10,
            sampler=sampler,
            guidance_scale=7.5,
        )
        guided_batches = [batch for batch, _, _ in calls]
    finally:
        remove_hook()

    # Start 674 on the 10-step grid [901, 801, ..., 1] is 701, leaving 8 steps; PLMS adds a warm-up call.
    expected_calls = 8 if sampler == "ddim" else 9
    assert unguided_batches == [2] * expected_calls
    assert guided_batches == [4] * expected_calls
    assert not torch.allclose(unguided, guided, atol=1e-3)


def test_half_precision_unet_gets_its_dtype(
    pipeline: StableDiffusionImg2ImgPipeline,
    patch_latents: torch.Tensor,
    prompt_pair: tuple[torch.Tensor, torch.Tensor],
) -> None:
    unet_bf16 = copy.deepcopy(pipeline.unet).to(torch.bfloat16)
    latents = patch_latents[:2]
    noise = _seeded_noise([71, 72])
    calls, remove_hook = _record_unet_calls(unet_bf16)
    settings: dict[str, Any] = {"num_inference_steps": 10, "start_timestep": 300}

    try:
        result_bf16 = reconstruct_latents(
            unet_bf16, SD15_SCHEDULER_CONFIG, latents, noise, *prompt_pair, **settings
        )
    finally:
        remove_hook()
    result_float32 = reconstruct_latents(
        pipeline.unet, SD15_SCHEDULER_CONFIG, latents, noise, *prompt_pair, **settings
    )

    assert {dtype for _, _, dtype in calls} == {torch.bfloat16}
    assert result_bf16.dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa, so only closeness to the float32 run is expected.
    assert _relative_error(result_bf16, result_float32) < 0.1


def test_callback_reports_and_cancels(
    pipeline: StableDiffusionImg2ImgPipeline,
    patch_latents: torch.Tensor,
    prompt_pair: tuple[torch.Tensor, torch.Tensor],
) -> None:
    latents = patch_latents[:1]
    noise = _seeded_noise([81])
    reported: list[tuple[int, int]] = []

    def record(step_index: int, n_steps: int) -> None:
        reported.append((step_index, n_steps))

    def cancel_after_three(step_index: int, n_steps: int) -> bool:
        reported.append((step_index, n_steps))
        return step_index < 2

    reconstruct_latents(
        pipeline.unet, SD15_SCHEDULER_CONFIG, latents, noise, prompt_pair[0][:1], None, guidance_scale=1.0,
        num_inference_steps=10, callback=record,
    )  # fmt: skip
    # Start 674 on the 10-step grid [901, 801, ..., 1] is 701, leaving 8 steps.
    assert reported == [(index, 8) for index in range(8)]

    reported.clear()
    with pytest.raises(InterruptedError, match="after step 3 of 8"):
        reconstruct_latents(
            pipeline.unet, SD15_SCHEDULER_CONFIG, latents, noise, prompt_pair[0][:1], None, guidance_scale=1.0,
            num_inference_steps=10, callback=cancel_after_three,
        )  # fmt: skip
    assert reported == [(0, 8), (1, 8), (2, 8)]


def test_empty_batch_returns_empty(pipeline: StableDiffusionImg2ImgPipeline) -> None:
    empty = torch.zeros((0, 4, 32, 32))

    result = reconstruct_latents(
        pipeline.unet, SD15_SCHEDULER_CONFIG, empty, empty, torch.zeros((0, 77, 32)), torch.zeros((0, 77, 32))
    )

    assert result.shape == (0, 4, 32, 32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"latents": torch.zeros((2, 3, 32, 32))}, "latents have 3 channels"),
        ({"latents": torch.zeros((4, 32, 32))}, "latents must be"),
        ({"noise": torch.zeros((2, 4, 16, 16))}, "noise shape"),
        ({"prompt_embeds": torch.zeros((3, 77, 32))}, "prompt_embeds must be"),
        ({"prompt_embeds": torch.zeros((2, 77, 64))}, "cross_attention_dim"),
        ({"negative_prompt_embeds": torch.zeros((1, 77, 32))}, "negative_prompt_embeds shape"),
        ({"negative_prompt_embeds": None}, "negative_prompt_embeds is None"),
        ({"start_timestep": 1000}, "start_timestep 1000 is beyond"),
        ({"start_timestep": -5}, "start_timestep -5 is beyond"),
        ({"sampler": "euler"}, "sampler 'euler'"),
        ({"guidance_scale": 0.5}, "guidance_scale 0.5"),
        ({"num_inference_steps": 0}, "num_inference_steps 0"),
        (
            {"scheduler_config": {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}},
            "prediction_type",
        ),
    ],
)
def test_reconstruct_rejects_bad_input(
    pipeline: StableDiffusionImg2ImgPipeline, change: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {
        "unet": pipeline.unet,
        "scheduler_config": SD15_SCHEDULER_CONFIG,
        "latents": torch.zeros((2, 4, 32, 32)),
        "noise": torch.zeros((2, 4, 32, 32)),
        "prompt_embeds": torch.zeros((2, 77, 32)),
        "negative_prompt_embeds": torch.zeros((2, 77, 32)),
    }
    arguments.update(change)
    calls, remove_hook = _record_unet_calls(pipeline.unet)

    try:
        with pytest.raises(ValueError, match=message):
            reconstruct_latents(**arguments)
    finally:
        remove_hook()
    assert calls == []
