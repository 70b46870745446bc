"""Training of the comparison methods on the normal patches of the same manifests as the LoRA.

Each method supplies a :class:`MethodTrainer` (its networks, optimisers and one training step);
:func:`train_baseline` draws the batches, resumes from the last checkpoint, logs the losses and writes
the comparison bundle. Calibrate the bundle afterwards with ``training/06_calibrate.py``, which reads
every method's bundles.

Batches are reproducible: step ``s`` always gets the same patches and the same crop positions, drawn
from ``(seed, s)``, so a resumed run trains on what an uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from napari_anopilad.method.baselines.base import BaselineSettings, save_baseline_bundle
from napari_anopilad.training.lora import derive_seed
from napari_anopilad.training.manifest import load_patches, read_manifest, select_rows

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
BUNDLE_DIR = "bundle"
LOG_NAME = "loss_log.csv"
STATE_NAME = "training_state.json"
PATCH_SIZE = 256


class MethodTrainer(Protocol):
    """Interface of a method that :func:`train_baseline` trains."""

    method: str

    def modules(self) -> dict[str, torch.nn.Module]:
        """Return the networks by weight part name (``"model"``, ``"discriminator"``, ...); all are saved."""

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Return the optimisers by name; their state is saved in checkpoints."""

    def training_step(self, pixels: torch.Tensor, step: int, generator: torch.Generator) -> dict[str, float]:
        """Run one optimisation step on ``(b, 3, s, s)`` pixels in [-1, 1]; return the losses by name."""

    def model_config(self) -> dict[str, Any]:
        """Return the architecture, as the method's scorer reads it from ``bundle.json``."""

    def default_settings(self) -> BaselineSettings:
        """Return the scoring settings the bundle starts with."""

    def bundle_parts(self) -> dict[str, torch.nn.Module]:
        """Return the networks the scorer needs, by weight part name (a subset of :meth:`modules`)."""


@dataclass(frozen=True)
class BaselineTrainingConfig:
    """The options every comparison method's training shares.

    Attributes
    ----------
    patches
        Extraction folder with ``manifest.csv`` (``training/01_extract_patches.py``).
    output
        Run folder: ``checkpoint/``, ``loss_log.csv`` and the finished ``bundle/``.
    steps
        Optimisation steps.
    batch_size
        Crops (or patches) per step.
    crop_size
        256 trains on whole patches; a divisor of 256 (64) trains on random crops of that size.
    learning_rate, seed, device
        As named.
    checkpoint_every
        Steps between checkpoints; the last step always writes one.
    split
        Manifest split whose normal patches train.
    """

    patches: Path
    output: Path
    steps: int = 1000
    batch_size: int = 16
    crop_size: int = PATCH_SIZE
    learning_rate: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 200
    split: str = "train"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps {self.steps} is invalid: use 1 or more")
        if self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size} is invalid: use 1 or more")
        if self.crop_size < 8 or PATCH_SIZE % self.crop_size:
            raise ValueError(
                f"crop size {self.crop_size} is invalid: use a divisor of {PATCH_SIZE} of 8 or more"
            )
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint interval {self.checkpoint_every} is invalid: use 1 or more")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["patches"] = str(self.patches)
        values["output"] = str(self.output)
        return values


def add_training_arguments(
    parser: argparse.ArgumentParser, *, steps: int, batch_size: int, crop_size: int, learning_rate: float
) -> None:
    """Add the options of :class:`BaselineTrainingConfig` to a method's parser, with its defaults."""
    parser.add_argument(
        "patches", type=Path, help="extraction folder with manifest.csv (training/01_extract_patches.py)"
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="run folder; the bundle is written to OUTPUT/bundle"
    )
    parser.add_argument("--steps", type=int, default=steps, help=f"optimisation steps (default {steps})")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help="crops per step, each cut at random from a training patch drawn with replacement, and the whole "
        f"patch at --crop-size {PATCH_SIZE} (default {batch_size})",
    )
    parser.add_argument(
        "--crop-size", type=int, default=crop_size, help=f"training crop size in pixels (default {crop_size})"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=learning_rate,
        help=f"Adam learning rate (default {learning_rate})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, batches and crops")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    parser.add_argument("--split", default="train", help="manifest split whose normal patches train")


def config_from_args(args: argparse.Namespace) -> BaselineTrainingConfig:
    """Build the shared configuration from parsed arguments; a bad value exits with its message."""
    try:
        return BaselineTrainingConfig(
            patches=args.patches,
            output=args.output,
            steps=args.steps,
            batch_size=args.batch_size,
            crop_size=args.crop_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            device=args.device,
            checkpoint_every=args.checkpoint_every,
            split=args.split,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error


def training_batch(images: np.ndarray, step: int, batch_size: int, crop_size: int, seed: int) -> torch.Tensor:
    """Return the batch of step ``step``: patches drawn with replacement and a random crop of each.

    Parameters
    ----------
    images
        ``(n, 256, 256, 3)`` uint8 normal training patches.

    Returns
    -------
    ``(batch_size, 3, crop_size, crop_size)`` float32 in [-1, 1]; the same for the same ``(seed, step)``.
    """
    rng = np.random.default_rng(derive_seed(seed, step))
    picks = rng.integers(0, images.shape[0], size=batch_size)
    limit = images.shape[1] - crop_size
    y0 = rng.integers(0, limit + 1, size=batch_size)
    x0 = rng.integers(0, limit + 1, size=batch_size)
    crops = np.stack(
        [images[index, y : y + crop_size, x : x + crop_size] for index, y, x in zip(picks, y0, x0)]
    )
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def normal_patches(config: BaselineTrainingConfig) -> np.ndarray:
    """Read the normal patches of the training split as ``(n, 256, 256, 3)`` uint8."""
    rows = select_rows(read_manifest(config.patches), splits=[config.split], labels=["normal"])
    if len(rows) == 0:
        raise SystemExit(
            f"error: {config.patches} has no normal patches in the {config.split!r} split; "
            "check the split file given to training/01_extract_patches.py"
        )
    return load_patches(config.patches, rows["path"])


def option_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Describe each option whose recorded value differs from the current one, as ``name was old, now new``.

    Nested dictionaries, such as the architecture under ``model``, are compared key by key, so a change
    reads ``model.memory_items was 6, now 8``. ``current`` goes through JSON first, as the recorded
    options did, so a tuple equals its recorded list. An option absent on one side reads ``unset``.
    """
    current = json.loads(json.dumps(current))
    differences: list[str] = []
    for key in sorted(set(saved) | set(current)):
        before, after = saved.get(key), current.get(key)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            nested = option_differences(before, after)
            differences.extend(f"{key}.{difference}" for difference in nested)
        elif before != after:
            differences.append(f"{key} was {_option_text(key, saved)}, now {_option_text(key, current)}")
    return differences


def _option_text(key: str, options: Mapping[str, Any]) -> str:
    return json.dumps(options[key]) if key in options else "unset"


def save_checkpoint(folder: Path, step: int, trainer: MethodTrainer, config: BaselineTrainingConfig) -> None:
    """Write the networks (safetensors), the optimiser states and the step; the state file goes last."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for name, module in trainer.modules().items():
        tensors = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
        temporary = folder / f".tmp-{name}.safetensors"
        save_file(tensors, str(temporary))
        os.replace(temporary, folder / f"{name}.safetensors")
    optimizer_states = {name: optimizer.state_dict() for name, optimizer in trainer.optimizers().items()}
    temporary = folder / ".tmp-optimizers.pt"
    torch.save(optimizer_states, temporary)
    os.replace(temporary, folder / "optimizers.pt")
    state = {"step": step, "method": trainer.method, "config": config.to_dict()}
    temporary = folder / f".tmp-{STATE_NAME}"
    temporary.write_text(json.dumps(state, indent=2))
    os.replace(temporary, folder / STATE_NAME)


def load_checkpoint(folder: Path, trainer: MethodTrainer, config: BaselineTrainingConfig) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; return its step (0 when there is none)."""
    from safetensors.torch import load_file

    state_path = folder / STATE_NAME
    if not state_path.is_file():
        return 0
    state = json.loads(state_path.read_text())
    if state.get("method") != trainer.method:
        raise SystemExit(
            f"error: {folder} holds a {state.get('method')} checkpoint, not {trainer.method}; use another --output"
        )
    resumed_keys = ("batch_size", "crop_size", "learning_rate", "seed", "split")
    saved = {key: value for key, value in state.get("config", {}).items() if key in resumed_keys}
    current = {key: value for key, value in config.to_dict().items() if key in resumed_keys}
    changed = option_differences(saved, current)
    if changed:
        raise SystemExit(
            f"error: {folder} was trained with other options ({'; '.join(changed)}); resume with the same "
            "options or use another --output"
        )
    for name, module in trainer.modules().items():
        module.load_state_dict(load_file(str(folder / f"{name}.safetensors"), device=config.device))
    optimizer_states = torch.load(folder / "optimizers.pt", map_location=config.device, weights_only=True)
    for name, optimizer in trainer.optimizers().items():
        optimizer.load_state_dict(optimizer_states[name])
    return int(state["step"])


def train_baseline(
    trainer: MethodTrainer, config: BaselineTrainingConfig, *, name: str | None = None, progress: bool = True
) -> Path:
    """Train ``trainer`` on the normal training patches and write its bundle; return the bundle folder.

    A run folder that holds a checkpoint resumes from it. Losses go to ``OUTPUT/loss_log.csv``, one row a step.
    """
    from tqdm.auto import tqdm

    images = normal_patches(config)
    checkpoint = config.output / CHECKPOINT_DIR
    start = load_checkpoint(checkpoint, trainer, config)
    if start:
        logger.info("Resuming %s training at step %d from %s", trainer.method, start, checkpoint)
    log_path = config.output / LOG_NAME
    config.output.mkdir(parents=True, exist_ok=True)
    _trim_log(log_path, start)
    generator = torch.Generator(device="cpu")
    with (
        open(log_path, "a", newline="") as log,
        tqdm(
            total=config.steps,
            initial=start,
            desc=f"{trainer.method} training",
            unit="step",
            disable=not progress,
        ) as bar,
    ):
        writer: Any = None
        for step in range(start, config.steps):
            for module in trainer.modules().values():
                module.train()
            generator.manual_seed(derive_seed(config.seed, step, 1))
            pixels = training_batch(images, step, config.batch_size, config.crop_size, config.seed)
            losses = trainer.training_step(pixels.to(config.device), step, generator)
            if writer is None:
                writer = csv.DictWriter(log, fieldnames=["step", *losses])
                if log.tell() == 0:
                    writer.writeheader()
            writer.writerow({"step": step, **{key: f"{value:.6g}" for key, value in losses.items()}})
            bar.update(1)
            bar.set_postfix({key: f"{value:.4g}" for key, value in losses.items()})
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                log.flush()
                save_checkpoint(checkpoint, step + 1, trainer, config)

    for module in trainer.modules().values():
        module.eval()
    parts: Mapping[str, torch.nn.Module] = trainer.bundle_parts()
    return save_baseline_bundle(
        config.output / BUNDLE_DIR,
        trainer.method,
        trainer.model_config(),
        {part: module.state_dict() for part, module in parts.items()},
        trainer.default_settings(),
        name=name,
        training={"steps": config.steps, **config.to_dict(), "patches": Path(config.patches).name},
    )


def _trim_log(path: Path, step: int) -> None:
    """Drop log rows at or after ``step`` (written after the checkpoint a resumed run restarts from)."""
    if not path.is_file():
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    kept = [rows[0], *[row for row in rows[1:] if row and int(row[0]) < step]]
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(kept)
