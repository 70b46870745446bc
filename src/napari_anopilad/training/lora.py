"""LoRA fine-tuning of the Stable Diffusion UNet on captioned normal patches.

The recipe follows AnoPILaD (Wang et al., MICCAI 2025): LoRA rank 4, alpha 4, Gaussian initialisation on
the UNet attention projections ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``; AdamW at a constant 1e-5;
256 px patches; an effective batch of 64 (``batch_size x grad_accum x processes``); captions dropped to the
empty prompt with probability 0.2; input perturbation 0.1; epsilon prediction; latents scaled by the
VAE's ``scaling_factor``.

Randomness is derived from ``(seed, optimizer step)``: the patch order of an epoch from ``(seed, epoch)``,
and the noise, timesteps and caption dropout of a step from ``(seed, step, micro-batch, process)``. So a
run resumed from a checkpoint repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
STATE_NAME = "training_state.json"
CONFIG_NAME = "training_config.json"
LOG_NAME = "loss_log.csv"
# About 120 kB per caption for Stable Diffusion v1.5 in float16 (77 x 768).
CAPTION_CACHE_SIZE = 8192
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
# Settings that change the optimisation itself; a resume with other values would mix two runs.
RESUME_KEYS = ("learning_rate", "batch_size", "grad_accum", "rank", "alpha", "seed", "resolution")


@dataclass
class LoraTrainingConfig:
    """Settings of one LoRA training run; stored as ``training_config.json`` in the output folder."""

    learning_rate: float = 1e-5
    batch_size: int = 8
    grad_accum: int = 8
    max_steps: int = 1000
    checkpoint_every: int = 500
    caption_dropout: float = 0.2
    input_perturbation: float = 0.1
    max_grad_norm: float = 1.0
    rank: int = 4
    alpha: int = 4
    resolution: int = 256
    seed: int = 0
    mixed_precision: str = "auto"
    adam_weight_decay: float = 1e-2
    num_workers: int = 0

    def __post_init__(self) -> None:
        positive = (
            "learning_rate",
            "batch_size",
            "grad_accum",
            "max_steps",
            "checkpoint_every",
            "rank",
            "resolution",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} {getattr(self, name)} is invalid: use a positive value")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(
                f"caption_dropout {self.caption_dropout} is invalid: use a probability in [0, 1]"
            )
        if self.input_perturbation < 0:
            raise ValueError(f"input_perturbation {self.input_perturbation} is invalid: use 0 (off) or more")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"mixed_precision {self.mixed_precision!r} is invalid: use one of {', '.join(MIXED_PRECISIONS)}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoraTrainingConfig:
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


@dataclass(frozen=True)
class TrainingExample:
    """One training patch: its PNG file and its caption (Compel prompt syntax; may be empty)."""

    path: Path
    caption: str


def derive_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed with numpy's ``SeedSequence``."""
    return int(
        np.random.SeedSequence([int(part) for part in parts]).generate_state(2, dtype=np.uint64)[0] >> 1
    )


@lru_cache(maxsize=4)
def epoch_order(n_examples: int, epoch: int, seed: int) -> np.ndarray:
    """Return the patch order of one epoch, a permutation seeded by ``(seed, epoch)``."""
    return np.random.default_rng(derive_seed(seed, epoch)).permutation(n_examples)


def micro_batch_indices(
    n_examples: int, step: int, micro: int, config: LoraTrainingConfig, process_index: int, num_processes: int
) -> list[int]:
    """Return the example indices of one process's micro-batch at an optimizer step.

    Examples are consumed in epoch order, ``batch_size x grad_accum x num_processes`` per optimizer step;
    an epoch that ends mid-batch continues into the next epoch's order.
    """
    per_step = config.batch_size * config.grad_accum * num_processes
    start = step * per_step + (micro * num_processes + process_index) * config.batch_size
    indices = []
    for position in range(start, start + config.batch_size):
        epoch, offset = divmod(position, n_examples)
        indices.append(int(epoch_order(n_examples, epoch, config.seed)[offset]))
    return indices


def load_patch(path: Path, resolution: int) -> torch.Tensor:
    """Read an RGB patch as a ``(3, resolution, resolution)`` float tensor in [-1, 1]."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"patch {path} could not be read as an image: {error}") from error
    if rgb.size != (resolution, resolution):
        rgb = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


class PatchDataset(torch.utils.data.Dataset):
    """Training patches as ``(pixels, caption)`` pairs."""

    def __init__(self, examples: Sequence[TrainingExample], resolution: int) -> None:
        self.examples = list(examples)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        example = self.examples[index]
        return load_patch(example.path, self.resolution), example.caption


def _collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([pixels for pixels, _ in items]), [caption for _, caption in items]


class _StepBatchSampler(torch.utils.data.Sampler):
    """Yields this process's micro-batches from ``first_step`` to ``max_steps``, in training order."""

    def __init__(
        self,
        n_examples: int,
        first_step: int,
        config: LoraTrainingConfig,
        process_index: int,
        num_processes: int,
    ) -> None:
        self.n_examples = n_examples
        self.first_step = first_step
        self.config = config
        self.process_index = process_index
        self.num_processes = num_processes

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.first_step, self.config.max_steps):
            for micro in range(self.config.grad_accum):
                yield micro_batch_indices(
                    self.n_examples, step, micro, self.config, self.process_index, self.num_processes
                )

    def __len__(self) -> int:
        return (self.config.max_steps - self.first_step) * self.config.grad_accum


def find_diffusers_folder(folder: Path) -> Path:
    """Return the folder that contains the diffusers ``unet``, ``vae``, ``text_encoder`` and ``tokenizer``.

    Accepts a Stable Diffusion folder in the diffusers layout or a bundle folder that contains one.
    """
    folder = Path(folder)
    if (folder / "bundle.json").is_file():
        from napari_anopilad.training.scoring import base_model_folder

        return base_model_folder(folder)
    candidates = (
        [folder, *sorted(path for path in folder.iterdir() if path.is_dir())] if folder.is_dir() else []
    )
    for candidate in candidates:
        if all((candidate / part).is_dir() for part in ("unet", "vae", "text_encoder", "tokenizer")):
            return candidate
    raise FileNotFoundError(
        f"no Stable Diffusion model found in {folder}: pass a folder in the diffusers layout (unet/, vae/, "
        "text_encoder/, tokenizer/, scheduler/) or a bundle folder that contains one"
    )


class LoraTrainer:
    """The models, optimizer and step of a LoRA training run, with checkpoints in the diffusers LoRA format.

    Parameters
    ----------
    model_folder
        Stable Diffusion in the diffusers layout, or a bundle folder that contains one.
    config
        Training settings.
    accelerator
        An ``accelerate.Accelerator``; one is made from ``config`` when omitted.
    """

    def __init__(self, model_folder: Path, config: LoraTrainingConfig, accelerator: Any = None) -> None:
        from accelerate import Accelerator
        from compel import Compel
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer

        self.config = config
        if accelerator is None:
            accelerator = Accelerator(mixed_precision=_resolve_mixed_precision(config.mixed_precision))
        self.accelerator = accelerator
        self.device = accelerator.device
        folder = find_diffusers_folder(model_folder)

        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        # Training noises with the DDPM forward process whatever sampler the bundle's scheduler uses.
        self.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        if self.noise_scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                f"the scheduler in {folder} predicts {self.noise_scheduler.config.prediction_type!r}: "
                "AnoPILaD trains and reconstructs with an epsilon-prediction model such as Stable Diffusion v1.5"
            )
        self.scaling_factor = float(self.vae.config.scaling_factor)

        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            accelerator.mixed_precision, torch.float32
        )
        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False)
        self.vae.to(self.device, dtype=torch.float32)
        self.text_encoder.to(self.device, dtype=weight_dtype)
        self.unet.to(self.device, dtype=weight_dtype)
        # The Gaussian LoRA_A initialisation draws from torch's generator: seed it so runs repeat.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.unet.add_adapter(
                LoraConfig(
                    r=config.rank,
                    lora_alpha=config.alpha,
                    init_lora_weights="gaussian",
                    target_modules=list(TARGET_MODULES),
                )
            )
        # Only the LoRA weights train; they stay float32 under mixed precision.
        cast_training_params(self.unet, dtype=torch.float32)
        self.compel = Compel(
            tokenizer=self.tokenizer, text_encoder=self.text_encoder, device=str(self.device)
        )
        self._caption_cache: dict[str, torch.Tensor] = {}

        parameters = [parameter for parameter in self.unet.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(
            parameters, lr=config.learning_rate, weight_decay=config.adam_weight_decay
        )
        self.unet, self.optimizer = accelerator.prepare(self.unet, optimizer)
        self.step = 0

    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for parameter in self.unet.parameters() if parameter.requires_grad]

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str]) -> torch.Tensor:
        """Encode captions with Compel, the same weighting syntax the prompts use at inference.

        The text encoder is frozen, so embeddings are cached per caption (up to ``CAPTION_CACHE_SIZE``).
        """
        missing = [caption for caption in dict.fromkeys(captions) if caption not in self._caption_cache]
        if missing:
            for caption, embeds in zip(missing, self.compel(missing)):
                if len(self._caption_cache) >= CAPTION_CACHE_SIZE:
                    self._caption_cache.pop(next(iter(self._caption_cache)))
                self._caption_cache[caption] = embeds
        return torch.stack([self._caption_cache[caption] for caption in captions])

    def loss(self, pixels: torch.Tensor, captions: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """Compute the epsilon-prediction loss of one micro-batch.

        ``generator`` (on the CPU) draws the caption dropout, the VAE sample, the timesteps, the noise and
        the input perturbation, in that order.
        """
        n_patches = pixels.shape[0]
        dropped = torch.rand(n_patches, generator=generator) < self.config.caption_dropout
        captions = ["" if drop else caption for drop, caption in zip(dropped.tolist(), captions)]
        with torch.no_grad():
            prompt_embeds = self.encode_captions(captions)
            posterior = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
            sample_noise = torch.randn(posterior.mean.shape, generator=generator).to(self.device)
            latents = (posterior.mean + posterior.std * sample_noise) * self.scaling_factor

        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_train_timesteps, (n_patches,), generator=generator).to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        # Input perturbation: the latents are noised with a perturbed noise, the target stays the noise.
        perturbation = torch.randn(latents.shape, generator=generator).to(self.device)
        noisy_latents = self.noise_scheduler.add_noise(
            latents, noise + self.config.input_perturbation * perturbation, timesteps
        )

        unet_dtype = next(self.unet.parameters()).dtype
        with self.accelerator.autocast():
            prediction = self.unet(
                noisy_latents.to(unet_dtype), timesteps, encoder_hidden_states=prompt_embeds.to(unet_dtype)
            ).sample
        return F.mse_loss(prediction.float(), noise.float(), reduction="mean")

    def train_step(
        self, micro_batches: Sequence[tuple[torch.Tensor, Sequence[str]]], step_seed: int
    ) -> float:
        """Run one optimizer step over ``grad_accum`` micro-batches; return the mean loss.

        ``step_seed`` seeds the generator of each micro-batch (with its index and the process index).
        """
        self.unet.train()
        losses = []
        for micro, (pixels, captions) in enumerate(micro_batches):
            generator = torch.Generator().manual_seed(
                derive_seed(step_seed, micro, self.accelerator.process_index)
            )
            last = micro == len(micro_batches) - 1
            sync = nullcontext() if last else self.accelerator.no_sync(self.unet)
            with sync:
                loss = self.loss(pixels, captions, generator)
                self.accelerator.backward(loss / len(micro_batches))
            losses.append(loss.detach())

        if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.trainable_parameters, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean_loss = torch.stack(losses).mean()
        return float(self.accelerator.reduce(mean_loss, reduction="mean"))

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the UNet's LoRA weights with the key names of the diffusers LoRA format."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet = self.accelerator.unwrap_model(self.unet)
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))

    def save_checkpoint(self, folder: Path) -> Path:
        """Write the LoRA weights, optimizer state and step to ``folder``, atomically by rename."""
        from diffusers import StableDiffusionPipeline

        folder = Path(folder)
        partial = folder.with_name(folder.name + ".partial")
        if self.accelerator.is_main_process:
            partial.mkdir(parents=True, exist_ok=True)
            StableDiffusionPipeline.save_lora_weights(
                partial, unet_lora_layers=self.lora_state_dict(), safe_serialization=True
            )
            torch.save(self.optimizer.state_dict(), partial / OPTIMIZER_NAME)
            (partial / STATE_NAME).write_text(
                json.dumps({"step": self.step, "config": asdict(self.config)}, indent=2)
            )
            partial.replace(folder)
        self.accelerator.wait_for_everyone()
        return folder

    def load_checkpoint(self, folder: Path) -> None:
        """Restore the LoRA weights, optimizer state and step from a checkpoint folder."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        folder = Path(folder)
        state_path = folder / STATE_NAME
        if not state_path.is_file() or not (folder / LORA_WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"checkpoint {folder} is incomplete: it needs {LORA_WEIGHTS_NAME} and {STATE_NAME}; "
                "delete it to resume from the one before"
            )
        lora_state, _ = StableDiffusionPipeline.lora_state_dict(folder, weight_name=LORA_WEIGHTS_NAME)
        unet_state = {
            key.removeprefix("unet."): value for key, value in lora_state.items() if key.startswith("unet.")
        }
        unet = self.accelerator.unwrap_model(self.unet)
        result = set_peft_model_state_dict(
            unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default"
        )
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(
                f"checkpoint {folder} has LoRA weights this UNet does not have: {unexpected[:5]}"
            )
        cast_to = torch.float32
        for parameter in self.trainable_parameters:
            parameter.data = parameter.data.to(cast_to)

        optimizer_state = torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(optimizer_state)
        self.step = int(json.loads(state_path.read_text())["step"])


def _resolve_mixed_precision(mixed_precision: str) -> str:
    if mixed_precision != "auto":
        return mixed_precision
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def checkpoint_folders(output: Path) -> list[Path]:
    """Return the complete ``checkpoint-<step>`` folders in ``output``, by step."""
    found = []
    for folder in Path(output).glob("checkpoint-*"):
        suffix = folder.name.removeprefix("checkpoint-")
        if folder.is_dir() and suffix.isdigit() and (folder / STATE_NAME).is_file():
            found.append((int(suffix), folder))
    return [folder for _, folder in sorted(found)]


def _check_resume_config(output: Path, config: LoraTrainingConfig) -> None:
    config_path = output / CONFIG_NAME
    if not config_path.is_file():
        return
    stored = json.loads(config_path.read_text())
    changed = [key for key in RESUME_KEYS if key in stored and stored[key] != getattr(config, key)]
    if changed:
        details = ", ".join(f"{key} {stored[key]} -> {getattr(config, key)}" for key in changed)
        raise ValueError(
            f"{output} contains a run with other settings ({details}): resume with the same settings, "
            "or write to a new output folder"
        )


def train_lora(
    model_folder: Path,
    examples: Sequence[TrainingExample],
    output: Path,
    config: LoraTrainingConfig,
    resume: bool = True,
    show_progress: bool = True,
) -> LoraTrainer:
    """Train LoRA weights on captioned patches, writing checkpoints to ``output``.

    Parameters
    ----------
    model_folder
        Stable Diffusion in the diffusers layout, or a bundle folder that contains one.
    examples
        The training patches and their captions.
    output
        Folder for ``checkpoint-<step>/`` (LoRA weights in the diffusers format, optimizer, step),
        ``training_config.json`` and ``loss_log.csv``.
    config
        Training settings.
    resume
        Continue from the last checkpoint in ``output`` when there is one.
    show_progress
        Show a tqdm progress bar on the main process.

    Returns
    -------
    LoraTrainer
        The trainer after the last step, with its models on the training device.
    """
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError(
            "no training patches: caption the manifest first and check the split file has train slides"
        )
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if resume:
        _check_resume_config(output, config)

    trainer = LoraTrainer(model_folder, config)
    accelerator = trainer.accelerator
    previous = checkpoint_folders(output) if resume else []
    if previous:
        trainer.load_checkpoint(previous[-1])
    if accelerator.is_main_process:
        (output / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2))

    sampler = _StepBatchSampler(
        len(examples), trainer.step, config, accelerator.process_index, accelerator.num_processes
    )
    loader = torch.utils.data.DataLoader(
        PatchDataset(examples, config.resolution),
        batch_sampler=sampler,
        collate_fn=_collate,
        num_workers=config.num_workers,
    )
    batches = iter(loader)
    progress = tqdm(
        total=config.max_steps,
        initial=trainer.step,
        desc="LoRA steps",
        disable=not (show_progress and accelerator.is_main_process),
    )
    log_path = output / LOG_NAME
    if accelerator.is_main_process and not log_path.exists():
        log_path.write_text("step,loss,seconds\n")

    while trainer.step < config.max_steps:
        started = time.perf_counter()
        micro_batches = [next(batches) for _ in range(config.grad_accum)]
        loss = trainer.train_step(micro_batches, step_seed=derive_seed(config.seed, trainer.step))
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the training loss became {loss} at step {trainer.step + 1}: lower the learning rate or "
                "use mixed_precision 'bf16' or 'no'"
            )
        trainer.step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        if accelerator.is_main_process:
            with log_path.open("a", newline="") as log_file:
                csv.writer(log_file).writerow(
                    [trainer.step, f"{loss:.6f}", f"{time.perf_counter() - started:.3f}"]
                )
        if trainer.step % config.checkpoint_every == 0 or trainer.step == config.max_steps:
            trainer.save_checkpoint(output / f"checkpoint-{trainer.step}")
    progress.close()
    return trainer


def build_parser() -> argparse.ArgumentParser:
    defaults = LoraTrainingConfig()
    parser = argparse.ArgumentParser(
        prog="03_train_lora.py",
        description="Train LoRA weights of the UNet on the captioned normal training patches (step 3).",
    )
    parser.add_argument("patches", type=Path, help="extraction folder with the captioned manifest.csv")
    parser.add_argument(
        "--bundle", required=True, type=Path, help="bundle (or diffusers folder) with the base model"
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="folder for checkpoint-<step>/ and the loss log"
    )
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="optimizer steps in total")
    parser.add_argument(
        "--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps between checkpoints"
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="patches per micro-batch and process"
    )
    parser.add_argument(
        "--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per optimizer step"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="AdamW learning rate (constant)"
    )
    parser.add_argument(
        "--caption-dropout",
        type=float,
        default=defaults.caption_dropout,
        help="probability of the empty caption",
    )
    parser.add_argument(
        "--input-perturbation",
        type=float,
        default=defaults.input_perturbation,
        help="scale of the input perturbation noise",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=defaults.max_grad_norm,
        help="gradient clipping norm (0 turns it off)",
    )
    parser.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank")
    parser.add_argument("--alpha", type=int, default=defaults.alpha, help="LoRA alpha")
    parser.add_argument("--resolution", type=int, default=defaults.resolution, help="patch side in pixels")
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the data order, noise and LoRA init"
    )
    parser.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISIONS,
        default=defaults.mixed_precision,
        help="auto: bf16 or fp16 on a GPU, no on a CPU",
    )
    parser.add_argument(
        "--num-workers", type=int, default=defaults.num_workers, help="data loader worker processes"
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="start over instead of resuming from the last checkpoint"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Train LoRA weights from command-line arguments; return the exit status.

    Launch with ``accelerate launch training/03_train_lora.py ...`` for several GPUs.
    """
    from napari_anopilad.training.manifest import read_manifest, select_rows

    args = build_parser().parse_args(argv)
    config = LoraTrainingConfig(
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.max_steps,
        checkpoint_every=args.checkpoint_every,
        caption_dropout=args.caption_dropout,
        input_perturbation=args.input_perturbation,
        max_grad_norm=args.max_grad_norm,
        rank=args.rank,
        alpha=args.alpha,
        resolution=args.resolution,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        num_workers=args.num_workers,
    )
    table = select_rows(read_manifest(args.patches), splits=["train"], labels=["normal"])
    uncaptioned = int((table["caption"] == "").sum())
    if uncaptioned:
        raise SystemExit(
            f"error: {uncaptioned} training patches have no caption: run the captioning step first"
        )
    examples = [
        TrainingExample(Path(args.patches) / path, caption)
        for path, caption in zip(table["path"], table["caption"])
    ]
    trainer = train_lora(args.bundle, examples, args.output, config, resume=not args.no_resume)
    if trainer.accelerator.is_main_process:
        print(f"trained to step {trainer.step}; checkpoints in {args.output}")
    return 0
