"""Step 4: choose the LoRA checkpoint whose reconstructions of validation patches have the lowest FID.

Each checkpoint's LoRA is put in a scratch copy of the bundle, the normal validation patches are
reconstructed with the bundle's inference settings, and the FID between the reconstructions and the real
patches is computed from Inception features (weights from a local file). The chosen checkpoint becomes a
new bundle (a copy of the base bundle with that LoRA, without calibration). ``fid.csv`` is appended after
each checkpoint, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from napari_anopilad.training.fid import INCEPTION_SIZE, InceptionFeatures, fid_from_features
from napari_anopilad.training.lora import LORA_WEIGHTS_NAME, checkpoint_folders
from napari_anopilad.training.manifest import load_patches, read_manifest, select_rows, write_table_atomic
from napari_anopilad.training.scoring import bundle_with_lora

FID_NAME = "fid.csv"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="04_select_checkpoint.py",
        description="Choose the LoRA checkpoint with the lowest FID on validation patches (step 4).",
    )
    parser.add_argument("patches", type=Path, help="extraction folder with manifest.csv")
    parser.add_argument("--bundle", required=True, type=Path, help="base bundle the LoRA was trained for")
    parser.add_argument(
        "--checkpoints", required=True, type=Path, help="training output with checkpoint-<step>/"
    )
    parser.add_argument(
        "--inception", required=True, type=Path, help="state-dict file of torchvision's inception_v3"
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="folder of the new bundle with the chosen LoRA"
    )
    parser.add_argument("--split", default="validation", help="split whose normal patches are the real set")
    parser.add_argument(
        "--max-patches", type=int, default=None, help="use at most this many validation patches"
    )
    parser.add_argument(
        "--inception-size", type=int, default=INCEPTION_SIZE, help="Inception input side (299)"
    )
    parser.add_argument(
        "--start-timestep",
        type=int,
        default=None,
        help="reconstruct from this timestep (bundle's by default)",
    )
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--batch-size", type=int, default=16, help="patches per batch")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Select a checkpoint from command-line arguments; return the exit status."""
    from tqdm.auto import tqdm

    from napari_anopilad.method.bundle import load_bundle
    from napari_anopilad.method.scorer import AnoPILaDScorer

    args = build_parser().parse_args(argv)
    rows = select_rows(read_manifest(args.patches), splits=[args.split], labels=["normal"])
    if args.max_patches is not None:
        rows = rows.iloc[: args.max_patches]
    if len(rows) < 2:
        raise SystemExit(
            f"error: {len(rows)} normal patches in the {args.split!r} split; FID needs at least 2"
        )
    checkpoints = checkpoint_folders(args.checkpoints)
    if not checkpoints:
        raise SystemExit(
            f"error: no checkpoint-<step> folders in {args.checkpoints}: run the training step first"
        )

    args.output.parent.mkdir(parents=True, exist_ok=True)
    work = args.output.parent / (args.output.name + ".fid-work")
    work.mkdir(exist_ok=True)
    fid_path = work / FID_NAME
    results = (
        pd.read_csv(fid_path) if fid_path.is_file() else pd.DataFrame(columns=["checkpoint", "step", "fid"])
    )
    inception = InceptionFeatures(args.inception, args.device, input_size=args.inception_size)

    real = load_patches(args.patches, rows["path"])
    real_features = np.concatenate(
        [inception(real[start : start + args.batch_size]) for start in range(0, len(real), args.batch_size)]
    )
    keys = [
        (str(identity), int(row), int(col))
        for identity, row, col in rows[["slide_identity", "row", "col"]].itertuples(index=False)
    ]
    for checkpoint in tqdm(checkpoints, desc="checkpoints"):
        if checkpoint.name in set(results["checkpoint"]):
            continue
        scratch = bundle_with_lora(args.bundle, checkpoint / LORA_WEIGHTS_NAME, work / checkpoint.name)
        scratch_bundle = load_bundle(scratch, device=args.device)
        settings = scratch_bundle.settings.with_overrides(start_timestep=args.start_timestep)
        scorer = AnoPILaDScorer(scratch_bundle, args.device, settings)
        generated = []
        for start in range(0, len(real), args.batch_size):
            scores = scorer.score(
                real[start : start + args.batch_size],
                keys[start : start + args.batch_size],
                return_reconstructions=True,
            )
            assert scores.reconstructions is not None
            generated.append(inception(scores.reconstructions))
        fid = fid_from_features(np.concatenate(generated), real_features)
        step = int(checkpoint.name.removeprefix("checkpoint-"))
        results = pd.concat(
            [results, pd.DataFrame([{"checkpoint": checkpoint.name, "step": step, "fid": fid}])],
            ignore_index=True,
        )
        write_table_atomic(results, fid_path)

    results = results.sort_values("step").reset_index(drop=True)
    write_table_atomic(results, args.output.parent / (args.output.name + "-fid.csv"))
    best = results.loc[results["fid"].astype(float).idxmin()]
    bundle_with_lora(
        args.bundle, args.checkpoints / best["checkpoint"] / LORA_WEIGHTS_NAME, args.output, copy=True
    )
    print(results.to_string(index=False))
    print(f"lowest FID {float(best['fid']):.4g} at {best['checkpoint']}; bundle written to {args.output}")
    return 0
