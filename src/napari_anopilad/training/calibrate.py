"""Step 6: measure the calibration statistics of a bundle on held-out normal validation patches.

Each score of the bundle's method (LPIPS and latent MSE for AnoPILaD) on the normal patches of validation
slides is summarised by its mean and population standard deviation (``ddof=0``), and written with the inference settings into ``bundle.json``.
Z-scores at inference are ``(score - mean) / std``. A ``--start-timestep`` override (the sweep's choice)
also becomes the bundle's start timestep, because the statistics only hold for it. Scores are cached in ``calibration_scores.csv`` in the
bundle folder, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_anopilad.training.manifest import read_manifest, select_rows
from napari_anopilad.training.scoring import (
    load_bundle_or_exit,
    make_scorer_or_exit,
    read_bundle_spec,
    score_rows,
    write_bundle_spec,
)

CALIBRATION_SCORES_NAME = "calibration_scores.csv"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="06_calibrate.py",
        description="Write the mean and std of each score on normal validation patches into bundle.json (step 6).",
    )
    parser.add_argument("patches", type=Path, help="extraction folder with manifest.csv")
    parser.add_argument(
        "--bundle", required=True, type=Path, help="bundle folder to calibrate (bundle.json is updated)"
    )
    parser.add_argument("--split", default="validation", help="split whose normal patches calibrate")
    parser.add_argument(
        "--start-timestep",
        type=int,
        default=None,
        help="start timestep to calibrate at; it becomes the bundle's",
    )
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--batch-size", type=int, default=16, help="patches per scoring batch")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Calibrate a bundle from command-line arguments; return the exit status."""
    from tqdm.auto import tqdm

    from napari_anopilad.method.baselines.base import BaselineBundle, BaselineCalibration
    from napari_anopilad.method.bundle import Calibration
    from napari_anopilad.method.scorers import score_names

    args = build_parser().parse_args(argv)
    rows = select_rows(read_manifest(args.patches), splits=[args.split], labels=["normal"])
    if len(rows) < 2:
        raise SystemExit(
            f"error: {len(rows)} normal patches in the {args.split!r} split; calibration needs at least 2"
        )
    bundle = load_bundle_or_exit(args.bundle)
    try:
        settings = bundle.settings.with_overrides(start_timestep=args.start_timestep)
    except ValueError as error:
        raise SystemExit(f"error: --start-timestep: {error}") from error
    scorer = make_scorer_or_exit(bundle, args.device, settings)
    names = score_names(bundle)
    scores_path = Path(args.bundle) / CALIBRATION_SCORES_NAME
    # Cached scores are only valid for these settings and weights.
    key_path = scores_path.with_suffix(".key")
    key = f"{bundle.identity} {settings.score_key()}"
    if key_path.is_file() and key_path.read_text() != key:
        scores_path.unlink(missing_ok=True)
    key_path.write_text(key)

    with tqdm(total=len(rows), desc="calibration", unit="patch") as progress:
        scores = score_rows(scorer, args.patches, rows, scores_path, args.batch_size, progress)

    mean = {name: float(np.mean(scores[name])) for name in names}
    std = {name: float(np.std(scores[name], ddof=0)) for name in names}
    calibration: Calibration | BaselineCalibration
    if isinstance(bundle, BaselineBundle):
        calibration = BaselineCalibration(mean=mean, std=std, count=len(scores), settings=settings)
    else:
        calibration = Calibration(mean=mean, std=std, count=len(scores), settings=settings)
    spec = read_bundle_spec(args.bundle)
    spec["settings"] = settings.to_dict()
    spec["calibration"] = calibration.to_dict()
    write_bundle_spec(args.bundle, spec)
    for name in names:
        print(f"{name}: mean {mean[name]:.6g}, std {std[name]:.6g} over {len(scores)} patches")
    return 0
