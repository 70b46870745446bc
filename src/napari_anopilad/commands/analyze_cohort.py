"""``anopilad analyze-cohort``: analyse many slides on a dask.distributed cluster and rank them by Z_99."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from napari_anopilad._reader import SLIDE_SUFFIXES
from napari_anopilad.cli import CommandError, OutputFolders
from napari_anopilad.commands.analyze import (
    DEMO_WARNING,
    add_analysis_arguments,
    add_triage_arguments,
    parse_triage_settings,
)

logger = logging.getLogger(__name__)

COHORT_CSV = "cohort.csv"
DEFAULT_BLOCK_SIZE = 256


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze-cohort",
        help="analyse many slides on a dask cluster and write cohort.csv ranked by Z_99",
        description=(
            "Score the tissue patches of every slide on the workers of a dask.distributed cluster: a local "
            "one (one worker per GPU, or a few CPU workers) or the cluster at --scheduler. Each slide gets "
            "the outputs of 'anopilad analyze' in OUT/<slide name>/, and OUT/cohort.csv lists every slide "
            "by Z_99, highest first. Finished patches are kept in each slide's result store, so running "
            "the same command again resumes where it stopped."
        ),
    )
    parser.add_argument(
        "slides",
        type=Path,
        nargs="*",
        metavar="SLIDE",
        help="whole-slide image files, or folders: a folder adds the files directly inside it that end in "
        f"{', '.join(SLIDE_SUFFIXES)} (any case; hidden files and subfolders are skipped)",
    )
    parser.add_argument(
        "--list",
        type=Path,
        dest="slide_list",
        metavar="FILE",
        help="text file with one slide file or folder per line (blank lines and lines starting with # are "
        "skipped; relative paths are relative to the file's folder)",
    )

    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created when missing)")

    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of a running dask scheduler (for example tcp://10.0.0.5:8786); without it a local "
        "cluster is started",
    )
    parser.add_argument(
        "--n-workers",
        type=int,
        help="worker processes of the local cluster (default: one per visible GPU, else min(4, cores/2))",
    )

    parser.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"patches per task; larger slides are split into several tasks (default: {DEFAULT_BLOCK_SIZE})",
    )
    parser.add_argument(
        "--max-patches",
        type=int,
        help="analyse only the first N tissue patches of each slide, in row-major order (for tests and quick looks)",
    )
    parser.add_argument(
        "--dashboard-address",
        default=":8787",
        help="where the local cluster's dask dashboard listens (default: :8787, another port when taken)",
    )

    add_analysis_arguments(parser)
    add_triage_arguments(parser)
    for action in parser._actions:
        # The shared options describe one slide's store; a cohort keeps one store per slide by default.
        if action.dest == "store":
            action.help = "result store folder shared by all slides (default: OUT/<slide name>/store)"
        elif action.dest == "mpp":
            action.help = (
                "level-0 microns per pixel for the slides whose metadata lacks it (for example 0.25); "
                "slides that give one keep theirs"
            )
    parser.set_defaults(run=run)
    return parser


def read_slide_list(path: Path) -> list[Path]:
    """Read one slide path per line; skip blank lines and ``#`` comments; resolve relative to the file."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise CommandError(f"cannot read the slide list {path}: {error.strerror}; check the path") from error
    slides = []
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        slide = Path(text).expanduser()
        slides.append(slide if slide.is_absolute() else Path(path).parent / slide)
    return slides


def expand_slide_folders(paths: list[Path]) -> list[Path]:
    """Replace each folder in ``paths`` by the slide files directly inside it, sorted by name.

    A slide file is a file whose name ends in one of the napari reader's SLIDE_SUFFIXES, in any case,
    and does not start with ``.``. Subfolders are not searched. Other paths stay as given (with ``~``
    expanded), so a missing file still becomes a failed slide. Raises CommandError for a folder that
    cannot be listed or contains no slide file.
    """
    expanded: list[Path] = []
    for named in paths:
        path = named.expanduser()
        if not path.is_dir():
            expanded.append(path)
            continue
        try:
            entries = sorted(path.iterdir())
        except OSError as error:
            raise CommandError(
                f"the slide folder {path} could not be listed ({error.strerror or error}): check its permissions"
            ) from error
        slides = [
            entry
            for entry in entries
            if entry.is_file()
            and not entry.name.startswith(".")
            and entry.name.lower().endswith(SLIDE_SUFFIXES)
        ]
        if not slides:
            raise CommandError(
                f"the slide folder {path} contains no slide file ({', '.join(SLIDE_SUFFIXES)}): "
                "give slide files, or a folder that contains them"
            )
        expanded.extend(slides)
    return expanded


def unique_slide_paths(paths: list[Path]) -> list[Path]:
    """Drop every path that names the same file as an earlier one; return the rest as absolute paths.

    Two paths name the same file when their real paths (symbolic links and ``..`` resolved) are equal, so
    a slide given on its own, inside a folder, through a link or with ``..`` in its path is analysed once.
    The first path given is kept as the user wrote it, made absolute, because it names the slide's
    output folder and appears in cohort.csv.
    """
    unique: dict[Path, Path] = {}
    for path in paths:
        absolute = path.expanduser().absolute()
        try:
            real = absolute.resolve()
        except (OSError, RuntimeError):
            # A symbolic link loop; the slide then fails on its own with the reader's error.
            real = absolute
        unique.setdefault(real, absolute)
    return list(unique.values())


def _setting_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {
        "sampler": args.sampler,
        "start_timestep": args.start_timestep,
        "guidance_scale": args.guidance_scale,
        "num_inference_steps": args.steps,
        "score": args.score,
        "precision": args.precision,
        "unprompted": True if args.unprompted else None,
    }
    return {key: value for key, value in overrides.items() if value is not None}


def build_cohort(args: argparse.Namespace) -> tuple[list[Any], Any]:
    """Turn the command line into the cohort's slides and options, checking what the client can check."""
    from napari_anopilad.engine.cohort import CohortOptions, CohortSlide, unique_slide_names

    paths = list(args.slides)
    if args.slide_list is not None:
        paths.extend(read_slide_list(args.slide_list))
    paths = expand_slide_folders(paths)
    if not paths:
        raise CommandError("no slides given: list slide files, or give --list FILE with one path per line")
    if args.n_workers is not None and args.scheduler:
        raise CommandError(
            "--n-workers sets up the local cluster only; scale the cluster at --scheduler instead"
        )
    if args.scheduler is None and not args.bundle.is_dir():
        raise CommandError(
            f"bundle folder {args.bundle} not found: give a model bundle folder "
            "(anopilad make-demo-bundle DIR makes a demo one)"
        )

    triage = parse_triage_settings(args)
    if args.scheduler is None:
        _check_method_settings(
            args.bundle, _setting_overrides(args), triage=triage is not None, compile_mode=args.compile
        )
    # cohort.csv goes to OUT after the last slide and every slide writes to the store, so an unwritable
    # OUT or --store must fail before the first slide. A --store that fails removes a new, empty OUT again.
    with OutputFolders() as folders:
        out = folders.prepare(args.out.expanduser().absolute(), "--out")
        store_root = None
        if args.store is not None:
            store_root = folders.prepare(args.store.expanduser().absolute(), "--store")

    unique = unique_slide_paths(paths)
    slides = [CohortSlide(path=path, name=name) for path, name in zip(unique, unique_slide_names(unique))]
    options = CohortOptions(
        bundle=args.bundle.expanduser().absolute(),
        out=out,
        store_root=store_root,
        device=args.device,
        batch_size=args.batch_size,
        block_size=args.block_size,
        threshold=args.threshold,
        mpp=args.mpp,
        overrides=_setting_overrides(args),
        region_level0=tuple(args.region) if args.region else None,
        max_patches=args.max_patches,
        save_reconstructions=args.save_reconstructions,
        triage=triage,
        compile_mode=args.compile,
    )
    return slides, options


def _check_method_settings(
    bundle_folder: Path, overrides: dict[str, Any], triage: bool = False, compile_mode: str | None = None
) -> None:
    """Check the setting flags against the bundle's method before a cluster starts.

    AnoPILaD's own flags (``--compile`` among them) on a comparison method's bundle, ``--triage`` with
    one, and a ``--score`` the method lacks raise CommandError naming the flags. For an AnoPILaD bundle,
    the bundle's settings with the flags applied must be valid, so ``--guidance-scale nan`` or an invalid
    value in ``bundle.json`` stops the command here. Only ``bundle.json`` is read, so the check is quick.
    """
    from napari_anopilad.commands.analyze import SETTING_FLAGS, settings_with_overrides
    from napari_anopilad.engine.triage_pass import check_triage_method
    from napari_anopilad.method.baselines.base import BaselineSettings, bundle_method, scorer_class_for
    from napari_anopilad.method.bundle import read_bundle_settings
    from napari_anopilad.method.errors import BundleError
    from napari_anopilad.method.scorers import ANOPILAD
    from napari_anopilad.method.settings import SCORES

    try:
        method = bundle_method(bundle_folder)
        names = SCORES if method == ANOPILAD else scorer_class_for(method).score_names
    except BundleError as error:
        raise CommandError(str(error)) from error
    if triage:
        try:
            check_triage_method(method, bundle_folder)
        except ValueError as error:
            raise CommandError(str(error)) from error
    score = overrides.get("score")
    if score is not None and score not in names:
        raise CommandError(f"--score {score} is not a {method} score: use one of {', '.join(names)}")
    if method == ANOPILAD:
        try:
            settings = read_bundle_settings(bundle_folder)
        except BundleError as error:
            raise CommandError(str(error)) from error
        settings_with_overrides(settings, overrides)
        return
    # A comparison method takes the flags among its own options (AnoDDPM's start timestep, sampler and
    # steps), as `anopilad analyze` does.
    spec_path = Path(bundle_folder) / "bundle.json"
    try:
        method_settings = BaselineSettings.from_dict(json.loads(spec_path.read_text()).get("settings") or {})
    except (OSError, ValueError, AttributeError) as error:
        raise CommandError(f"settings in {spec_path}: {error}") from error
    flags = [
        SETTING_FLAGS[name]
        for name, value in overrides.items()
        if name in SETTING_FLAGS
        and value is not None
        and name != "score"
        and name not in method_settings.options
        and not (name == "precision" and value == "float32")
    ]
    if compile_mode is not None:
        flags.append("--compile")
    if flags:
        raise CommandError(
            f"{', '.join(flags)}: AnoPILaD settings, which do not apply to the {method} bundle {bundle_folder}; "
            "leave them out"
        )
    settings_with_overrides(method_settings, overrides)


def _connect(args: argparse.Namespace) -> tuple[Any, Any]:
    """Return ``(cluster, client)``: the local cluster this command starts (None with --scheduler) and a client."""
    from napari_anopilad.engine.cohort_cluster import start_local_cluster, visible_gpus, worker_environments

    if args.scheduler:
        from distributed import Client

        try:
            return None, Client(args.scheduler, timeout="60s")
        except OSError as error:
            raise CommandError(
                f"cannot connect to the dask scheduler at {args.scheduler}: {error}; check the address "
                "and that the scheduler runs"
            ) from error

    gpus = [] if args.device.strip().lower() == "cpu" else visible_gpus()
    environments = worker_environments(args.device, gpus, args.n_workers, os.cpu_count() or 1)
    kind = "GPU" if environments[0].get("CUDA_VISIBLE_DEVICES") else "CPU"
    print(f"Starting a local dask cluster of {len(environments)} {kind} worker(s)")
    return start_local_cluster(environments, dashboard_address=args.dashboard_address)


def run(args: argparse.Namespace) -> int:
    from napari_anopilad.engine.cohort import write_cohort_csv

    slides, options = build_cohort(args)
    cluster, client = _connect(args)
    try:
        print(f"Dask dashboard: {_dashboard_link(client)}")
        outcomes = analyze_cohort(client, slides, options)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

    table = write_cohort_csv(options.out / COHORT_CSV, outcomes)
    print_cohort_summary(outcomes, table)
    return 0 if all(outcome.status == "ok" for outcome in outcomes) else 1


def _dashboard_link(client: Any) -> str:
    try:
        link = client.dashboard_link
    except KeyError:
        # The scheduler runs without the dashboard service (for example without bokeh installed).
        link = None
    return link or "none (the scheduler runs no dashboard)"


def analyze_cohort(client: Any, slides: list[Any], options: Any, progress: bool = True) -> list[Any]:
    """Check the bundle on a worker, then analyse every slide with a progress bar over the patches."""
    from distributed import wait
    from tqdm import tqdm

    from napari_anopilad.engine.cohort import (
        STATUS_OK,
        CohortProgress,
        SlideOutcome,
        describe_bundle,
        run_cohort,
    )

    check = client.submit(describe_bundle, options, pure=False)
    wait(check)
    if check.status == "error":
        raise CommandError(
            f"the bundle {options.bundle} failed the check on a worker (loading it and building its "
            f"scorer): {check.exception()}"
        )
    bundle = check.result()
    if bundle["demo"]:
        print(f"WARNING: {DEMO_WARNING}.", file=sys.stderr)

    with tqdm(total=0, unit="patch", desc="analyze-cohort", disable=not progress, dynamic_ncols=True) as bar:

        def report(counts: CohortProgress, outcome: SlideOutcome | None) -> None:
            bar.total = counts.n_patches
            bar.update(counts.n_patches_done - bar.n)
            bar.set_postfix(slides=f"{counts.n_slides_done}/{len(slides)}")
            if outcome is None:
                return
            if outcome.status == STATUS_OK:
                z_99 = "n/a" if outcome.z_99 is None else f"{outcome.z_99:.3f}"
                line = f"done    {outcome.slide.name}: Z_99 {z_99}, {outcome.n_patches} patches"
                if outcome.triage_scorer:
                    line += (
                        f" ({outcome.n_computed} computed; triage pass: {outcome.n_triage_computed} computed)"
                    )
                bar.write(line)
            else:
                bar.write(f"FAILED  {outcome.slide.name}: {outcome.error}")

        return run_cohort(client, slides, options, on_progress=report)


def summary_line(outcome: Any) -> str:
    """Format one slide's row of the summary the command prints."""
    if outcome.status != "ok":
        return f"  {outcome.slide.name:<32} failed: {outcome.error}"
    z_max = "n/a" if outcome.z_max is None else f"{outcome.z_max:8.3f}"
    z_99 = "n/a" if outcome.z_99 is None else f"{outcome.z_99:8.3f}"
    line = (
        f"  {outcome.slide.name:<32} Z_99 {z_99}  Z_max {z_max}  anomaly {outcome.anomaly_area_mm2:.4f} mm^2  "
        f"{outcome.n_patches} patches"
    )
    if outcome.triage_scorer:
        triage_z_99 = "n/a" if outcome.triage_z_99 is None else f"{outcome.triage_z_99:.3f}"
        line += f" of {outcome.n_tissue_patches}, triage Z_99 {triage_z_99}"
    return line


def print_cohort_summary(outcomes: list[Any], table: Path) -> None:
    """Print every slide by Z_99 and where cohort.csv is."""
    from napari_anopilad.engine.cohort import sort_outcomes

    failed = [outcome for outcome in outcomes if outcome.status != "ok"]
    print(f"Analysed {len(outcomes) - len(failed)} of {len(outcomes)} slides; by Z_99, highest first:")
    for outcome in sort_outcomes(outcomes):
        print(summary_line(outcome))
    if failed:
        print(f"{len(failed)} slide(s) failed; fix them and run the same command again to analyse them.")
    print(f"Cohort table: {table}")
