"""Build the triage normal reference of a bundle from normal training and validation patches.

The patches come from a manifest CSV or from folders of PNG files that are all normal. The manifest is the
patch extraction step's ``manifest.csv`` or any CSV with the columns ``path``, ``label`` and ``split``, and its
paths are relative to the CSV's folder. The normal training patches are embedded with the bundle's CONCH and reduced to the
memory bank; the normal validation patches, which should come from other slides, calibrate the z-scores.
The result is written to ``BUNDLE/triage/`` (see :mod:`napari_anopilad.method.triage_store`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from conch.open_clip_custom import CoCa

logger = logging.getLogger(__name__)

# The analysis reads 256 px patches from the slide grid. Patches of other sizes are resized to 256 px, so
# they take the same path through CONCH's preprocessing (256 px, then CONCH's resize to its input size).
PATCH_SIZE = 256
MANIFEST_REQUIRED_COLUMNS = ("path", "label", "split")
DEFAULT_VALIDATION_FRACTION = 0.2


@dataclass(frozen=True)
class PatchSelection:
    """PNG files of the normal training and normal validation patches, and where they were listed."""

    train: list[Path]
    validation: list[Path]
    source: dict[str, Any]


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of the triage reference builder."""
    from napari_anopilad.method.triage import DEFAULT_BANK_SIZE, DEFAULT_K
    from napari_anopilad.method.triage_bank import BANK_METHODS

    parser = argparse.ArgumentParser(
        prog="build_triage_reference.py",
        description=(
            "Build the triage normal reference of a bundle: embed normal training patches with the bundle's CONCH, "
            "reduce them to a memory bank, calibrate the triage z-scores on normal validation patches, and write "
            "BUNDLE/triage/reference.safetensors and reference.json."
        ),
    )
    parser.add_argument(
        "--bundle", required=True, type=Path, help="bundle folder to read CONCH from and write into"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--manifest",
        type=Path,
        help="patch manifest CSV with columns path, label, split (or the folder that contains manifest.csv)",
    )
    source.add_argument(
        "--patches", type=Path, help="folder of normal PNG patches (an alternative to --manifest)"
    )
    parser.add_argument(
        "--validation-patches",
        type=Path,
        help="with --patches: folder of normal PNG validation patches (default: hold out --validation-fraction)",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=DEFAULT_VALIDATION_FRACTION,
        help="with --patches and no --validation-patches: fraction of the files held out for calibration",
    )
    parser.add_argument("--normal-label", default="normal", help="manifest label of normal patches")
    parser.add_argument("--train-split", default="train", help="manifest split of the memory-bank patches")
    parser.add_argument(
        "--validation-split", default="validation", help="manifest split of the calibration patches"
    )
    parser.add_argument(
        "--bank-size",
        type=int,
        default=DEFAULT_BANK_SIZE,
        help="maximum number of embeddings in the memory bank",
    )
    parser.add_argument(
        "--bank-method",
        choices=BANK_METHODS,
        default="coreset",
        help="how to reduce the embeddings to the bank",
    )
    parser.add_argument(
        "--k", type=int, default=DEFAULT_K, help="default number of neighbours of the kNN distance"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the coreset start, k-means and the held-out files"
    )
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=64, help="patches per CONCH forward pass")
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help="download a CONCH checkpoint that the bundle names by hub id",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Build and save the triage reference from command-line arguments; return the exit status."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        selection = select_patches(args)
        reference_path = build_and_save(args, selection)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    seconds = time.perf_counter() - started
    print(f"triage reference written to {reference_path} in {seconds:.1f} s")
    return 0


def select_patches(args: argparse.Namespace) -> PatchSelection:
    """List the normal training and validation PNG files named by ``--manifest`` or ``--patches``."""
    if args.manifest is not None:
        return select_from_manifest(args.manifest, args.normal_label, args.train_split, args.validation_split)
    return select_from_folders(args.patches, args.validation_patches, args.validation_fraction, args.seed)


def select_from_manifest(
    manifest: Path,
    normal_label: str = "normal",
    train_split: str = "train",
    validation_split: str = "validation",
) -> PatchSelection:
    """Return the normal patches of the training and validation splits listed in a manifest CSV."""
    import pandas as pd

    from napari_anopilad.training.manifest import MANIFEST_NAME

    path = manifest / MANIFEST_NAME if manifest.is_dir() else manifest
    if not path.is_file():
        raise FileNotFoundError(
            f"manifest {path} not found: run the patch extraction step or pass --patches DIR"
        )
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in MANIFEST_REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(
            f"manifest {path} lacks the columns {missing} (it has {list(table.columns)}); "
            "it needs path (PNG relative to the manifest's folder), label and split"
        )

    normal = table[table["label"].str.strip().str.lower() == normal_label.lower()]
    split = normal["split"].str.strip().str.lower()
    train = [path.parent / relative for relative in normal.loc[split == train_split.lower(), "path"]]
    validation = [
        path.parent / relative for relative in normal.loc[split == validation_split.lower(), "path"]
    ]
    if len(train) < 2:
        raise ValueError(
            f"manifest {path} has {len(train)} patches with label {normal_label!r} and split {train_split!r}; "
            "the reference needs at least 2"
        )
    if len(validation) < 2:
        raise ValueError(
            f"manifest {path} has {len(validation)} patches with label {normal_label!r} and split "
            f"{validation_split!r}; calibration needs at least 2"
        )
    absent = [str(file) for file in train + validation if not file.is_file()]
    if absent:
        raise FileNotFoundError(
            f"manifest {path} lists {len(absent)} patches that are not found, e.g. {absent[:3]}; "
            "restore them or fix their paths (relative to the manifest's folder)"
        )
    source = {"manifest": path.name, "train_split": train_split, "validation_split": validation_split}
    return PatchSelection(train=train, validation=validation, source=source)


def select_from_folders(
    patches: Path, validation_patches: Path | None, validation_fraction: float, seed: int
) -> PatchSelection:
    """List normal PNG files from a folder, with validation from a second folder or a seeded held-out part."""
    files = _png_files(patches)
    if validation_patches is not None:
        validation = _png_files(validation_patches)
        train = files
    else:
        if not 0 < validation_fraction < 1:
            raise ValueError(
                f"validation fraction {validation_fraction!r} is invalid: use a number between 0 and 1"
            )
        # Each file's place is a hash of the seed and its name, so adding files does not move the others.
        ranked = sorted(files, key=lambda file: hashlib.sha256(f"{seed}:{file.name}".encode()).hexdigest())
        held_out = max(2, round(validation_fraction * len(files)))
        validation, train = ranked[:held_out], ranked[held_out:]
    if len(train) < 2 or len(validation) < 2:
        raise ValueError(
            f"{patches} gives {len(train)} training and {len(validation)} validation patches: "
            "need at least 2 of each; add PNG files or pass --validation-patches"
        )
    source = {
        "patches": patches.name,
        "validation_patches": validation_patches.name if validation_patches else None,
    }
    return PatchSelection(train=train, validation=validation, source=source)


def build_and_save(args: argparse.Namespace, selection: PatchSelection) -> Path:
    """Embed the selected patches, build the reference and write it into the bundle; return its tensors file."""
    from napari_anopilad.engine.device import choose_device
    from napari_anopilad.method.bundle import load_bundle
    from napari_anopilad.method.prompts import cached_keyword_embeddings, keyword_cache_key
    from napari_anopilad.method.triage import build_triage_reference, save_triage_reference

    if args.batch_size < 1:
        raise ValueError(f"batch size {args.batch_size} is invalid: use 1 or more")
    device = choose_device(args.device)
    bundle = load_bundle(args.bundle, allow_download=args.allow_download, device=str(device))
    conch = bundle.load_conch(str(device))
    keyword_embeddings = cached_keyword_embeddings(bundle, conch, device)

    train_embeddings, train_similarities = embed_patches(
        conch, keyword_embeddings, selection.train, device, args.batch_size, "normal training patches"
    )
    validation_embeddings, validation_similarities = embed_patches(
        conch, keyword_embeddings, selection.validation, device, args.batch_size, "normal validation patches"
    )

    conch_hash = bundle.part_hashes["conch"]
    reference = build_triage_reference(
        train_embeddings.to(device),
        train_similarities,
        validation_embeddings,
        validation_similarities,
        conch_hash=conch_hash,
        keyword_key=keyword_cache_key(conch_hash, bundle.keywords, bundle.templates),
        bank_size=args.bank_size,
        bank_method=args.bank_method,
        k=args.k,
        seed=args.seed,
        demo=bundle.demo,
        sources={
            **selection.source,
            "train_count": len(selection.train),
            "validation_count": len(selection.validation),
        },
    )
    path = save_triage_reference(reference, bundle.folder)

    knn = reference.knn_statistics(reference.k)
    print(
        f"memory bank: {len(reference.memory_bank)} of {reference.train_count} normal training embeddings "
        f"({reference.bank_method}, covering radius {reference.covering_radius:.4f})"
    )
    print(
        f"calibration on {knn.count} normal validation patches: kNN distance (k = {reference.k}) "
        f"{knn.mean:.4f} +- {knn.std:.4f}, keyword distance "
        f"{reference.keyword_calibration.mean:.3f} +- {reference.keyword_calibration.std:.3f}"
    )
    if reference.demo:
        print("the bundle is a demo bundle with random weights: these triage scores mean nothing")
    return path


def embed_patches(
    conch: CoCa,
    keyword_embeddings: torch.Tensor,
    paths: Sequence[Path],
    device: torch.device,
    batch_size: int,
    description: str,
) -> tuple[torch.Tensor, np.ndarray]:
    """Return the CONCH image embeddings ``(n, embed_dim)`` and keyword similarities ``(n, n_keywords)``."""
    import torch
    from tqdm.auto import tqdm

    from napari_anopilad.method.conch_model import encode_images
    from napari_anopilad.method.prompts import keyword_similarities

    embeddings = []
    resized = 0
    with tqdm(total=len(paths), desc=description, unit="patch") as progress:
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            images, batch_resized = read_patches(batch)
            resized += batch_resized
            embeddings.append(encode_images(conch, images, device))
            progress.update(len(batch))
    if resized:
        logger.warning(
            "%d of the %s were not %d px and were resized with bicubic interpolation",
            resized,
            description,
            PATCH_SIZE,
        )
    stacked = torch.cat(embeddings)
    return stacked, keyword_similarities(stacked, keyword_embeddings.cpu()).numpy()


def read_patches(paths: Sequence[Path]) -> tuple[np.ndarray, int]:
    """Read PNG patches as ``(n, 256, 256, 3)`` uint8 RGB; return them and how many were resized."""
    from PIL import Image

    images = []
    resized = 0
    for path in paths:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
                if rgb.size != (PATCH_SIZE, PATCH_SIZE):
                    rgb = rgb.resize((PATCH_SIZE, PATCH_SIZE), Image.Resampling.BICUBIC)
                    resized += 1
                images.append(np.asarray(rgb))
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"patch {path} not found: fix its path in the manifest or restore the file"
            ) from error
        except OSError as error:
            raise ValueError(
                f"patch {path} could not be read as an image ({error}); rewrite or remove it"
            ) from error
    return np.stack(images), resized


def _png_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"patch folder {folder} not found")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() == ".png")
    if not files:
        raise ValueError(f"patch folder {folder} contains no .png files")
    return files
