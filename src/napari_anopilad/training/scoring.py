"""Scoring manifest patches with a bundle, resumably, and bundles that swap in another LoRA."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_anopilad.training.manifest import load_patches, write_table_atomic

SCORE_COLUMNS = ["path", "slide", "row", "col", "label", "lpips", "mse_latent", "prompt"]
# Paths inside bundle.json, by section and key, that are relative to the bundle folder.
_BUNDLE_PATHS = (
    ("base_model", "path"),
    ("base_model", "config"),
    ("lora", "path"),
    ("conch", "checkpoint"),
    ("conch", "config"),
    ("lpips", "backbone"),
    ("prompts", "keywords"),
    ("prompts", "templates"),
)


def read_bundle_spec(bundle_folder: Path) -> dict[str, Any]:
    """Read a bundle's ``bundle.json`` as a dictionary."""
    from napari_anopilad.method.bundle import BUNDLE_FILENAME

    path = Path(bundle_folder) / BUNDLE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"bundle file {path} not found: pass a bundle folder")
    return json.loads(path.read_text())


def write_bundle_spec(bundle_folder: Path, spec: dict[str, Any]) -> None:
    """Write ``bundle.json`` atomically."""
    from napari_anopilad.method.bundle import BUNDLE_FILENAME

    path = Path(bundle_folder) / BUNDLE_FILENAME
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(spec, indent=2) + "\n")
    partial.replace(path)


def load_bundle_or_exit(folder: Path) -> Any:
    """Load any method's bundle for a training script, or exit with one ``error:`` line naming ``folder``.

    A comparison bundle's loader leaves its weight files to the scorer, so this reads their safetensors
    headers too, and a corrupt file stops the script before any patch is scored.
    """
    from napari_anopilad.method.baselines.base import BaselineBundle
    from napari_anopilad.method.errors import BundleError
    from napari_anopilad.method.scorers import load_any_bundle
    from napari_anopilad.method.weights import read_tensor_shapes

    try:
        bundle = load_any_bundle(folder)
        if isinstance(bundle, BaselineBundle):
            for part, path in bundle.weights.items():
                read_tensor_shapes(path, f"{bundle.method} weights ({part})")
    except BundleError as error:
        raise SystemExit(f"error: --bundle {folder}: {error}") from error
    return bundle


def make_scorer_or_exit(bundle: Any, device: str, settings: Any = None) -> Any:
    """Build a loaded bundle's scorer, or exit with one ``error:`` line naming the bundle folder.

    Building reads every weight file, so this is where weights that do not match the bundle's
    architecture are found.
    """
    from napari_anopilad.method.errors import BundleError
    from napari_anopilad.method.scorers import make_scorer

    try:
        return make_scorer(bundle, device, settings)
    except BundleError as error:
        raise SystemExit(f"error: --bundle {bundle.folder}: {error}") from error


def base_model_folder(bundle_folder: Path) -> Path:
    """Return the diffusers folder of a bundle's base model."""
    spec = read_bundle_spec(bundle_folder)
    relative = spec.get("base_model", {}).get("path")
    if spec.get("base_model", {}).get("kind", "diffusers") != "diffusers" or not relative:
        raise ValueError(
            f"bundle {bundle_folder} has no base model in the diffusers layout: training needs one (unet/, vae/, ...)"
        )
    return (Path(bundle_folder) / relative).resolve()


def bundle_with_lora(bundle_folder: Path, lora_file: Path, output_folder: Path, copy: bool = False) -> Path:
    """Write a bundle that is ``bundle_folder`` with its LoRA replaced by ``lora_file``.

    The calibration is dropped, because it was measured with the old LoRA. With ``copy=False`` the new
    ``bundle.json`` points at the original parts by absolute path (a scratch bundle for scoring);
    with ``copy=True`` the whole bundle is copied and the LoRA file placed inside it.
    """
    bundle_folder = Path(bundle_folder).resolve()
    output_folder = Path(output_folder)
    spec = read_bundle_spec(bundle_folder)
    if copy:
        if output_folder.exists():
            shutil.rmtree(output_folder)
        shutil.copytree(bundle_folder, output_folder)
        lora_relative = Path(spec["lora"]["path"])
        shutil.copyfile(lora_file, output_folder / lora_relative)
    else:
        output_folder.mkdir(parents=True, exist_ok=True)
        for section, key in _BUNDLE_PATHS:
            value = spec.get(section, {}).get(key)
            if value:
                spec[section][key] = str(bundle_folder / value)
        spec["lora"]["path"] = str(Path(lora_file).resolve())
    spec.pop("calibration", None)
    write_bundle_spec(output_folder, spec)
    return output_folder


def read_scores(path: Path) -> pd.DataFrame:
    """Read a scores CSV written by :func:`score_rows` (empty when absent)."""
    if not Path(path).is_file():
        return pd.DataFrame(columns=SCORE_COLUMNS)
    return pd.read_csv(path, dtype={"slide": str, "prompt": str}, keep_default_na=False)


def score_rows(
    scorer: Any,
    extraction_folder: Path,
    rows: pd.DataFrame,
    scores_path: Path,
    batch_size: int = 8,
    progress: Any = None,
    on_reconstructions: Callable[[pd.DataFrame, np.ndarray], None] | None = None,
) -> pd.DataFrame:
    """Score manifest rows with any method's scorer, appending to ``scores_path`` after each batch.

    Rows whose path is already in ``scores_path`` are skipped, so an interrupted run resumes. Each patch's
    noise is seeded from ``(slide_identity, row, col)``, so its score does not depend on the batch.

    Returns
    -------
    pandas.DataFrame
        The scores of ``rows``: the columns ``SCORE_COLUMNS`` for AnoPILaD; a comparison method has its
        own score columns in place of ``lpips`` and ``mse_latent``.
    """
    scores_path = Path(scores_path)
    done = read_scores(scores_path)
    todo = rows[~rows["path"].isin(set(done["path"]))]
    for start in range(0, len(todo), batch_size):
        batch = todo.iloc[start : start + batch_size]
        images = load_patches(extraction_folder, batch["path"])
        keys = [
            (str(identity), int(row), int(col))
            for identity, row, col in batch[["slide_identity", "row", "col"]].itertuples(index=False)
        ]
        scores = scorer.score(images, keys, return_reconstructions=on_reconstructions is not None)
        if on_reconstructions is not None:
            on_reconstructions(batch, scores.reconstructions)
        new = pd.DataFrame(
            {
                "path": batch["path"].to_numpy(),
                "slide": batch["slide"].to_numpy(),
                "row": batch["row"].to_numpy(),
                "col": batch["col"].to_numpy(),
                "label": batch["label"].to_numpy(),
                **{name: np.asarray(values) for name, values in scores.score_values().items()},
                "prompt": scores.prompt,
            }
        )
        done = pd.concat([done, new], ignore_index=True) if len(done) else new
        write_table_atomic(done, scores_path)
        if progress is not None:
            progress.update(len(batch))
    return done[done["path"].isin(set(rows["path"]))].reset_index(drop=True)
