"""``anopilad analyze``: run AnoPILaD on one whole slide and write the heatmap, regions and tables.

With ``--triage``, a CONCH triage pass maps every tissue patch first, and AnoPILaD then scores the top
triage budget (and its grid neighbours), highest triage score first.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_anopilad.cli import CommandError, OutputFolders

# The output writers live in the engine, so that cohort workers write the same files; these names stay
# importable from here.
from napari_anopilad.engine.outputs import (
    cells_in_region,
    patch_records,
    slide_summary,
    write_outputs,
    write_overlay,
    write_reconstruction_pairs,
)
from napari_anopilad.engine.triage_pass import (
    DEFAULT_BUDGET_FRACTION,
    DEFAULT_NEIGHBOUR_RADIUS,
    DEFAULT_TRIAGE_SCORE,
    TRIAGE_SCORE_NAMES,
    TriageSettings,
    check_budget,
    check_triage_method,
)
from napari_anopilad.method.settings import COMPILE_MODES

__all__ = [
    "DEMO_WARNING",
    "AnalysisOutputs",
    "add_analysis_arguments",
    "add_parser",
    "add_triage_arguments",
    "analyze",
    "cells_in_region",
    "parse_triage_settings",
    "patch_records",
    "print_summary",
    "select_cells",
    "settings_with_overrides",
    "slide_summary",
    "write_outputs",
    "write_overlay",
    "write_reconstruction_pairs",
]

logger = logging.getLogger(__name__)

DEMO_WARNING = (
    "DEMO output: the demo bundle has random weights, so these scores, heatmap and regions mean nothing"
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze",
        help="analyse one whole slide and write the heatmap, anomaly regions and patch table",
        description=(
            "Score every tissue patch of a slide with AnoPILaD, then write patches.csv, slide.json, "
            "heatmap.tif, overlay.png and regions.geojson to the output folder. Finished patches are "
            "kept in a result store, so an interrupted run resumes where it stopped."
        ),
    )
    parser.add_argument(
        "slide",
        type=Path,
        metavar="SLIDE",
        help="whole-slide image (Aperio SVS, generic or OME TIFF, NDPI, ...)",
    )
    parser.add_argument("--bundle", type=Path, required=True, metavar="DIR", help="model bundle folder")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="output folder (created when missing)"
    )
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help="download hub models named by the bundle that are not local (CONCH needs a Hugging Face token)",
    )
    add_analysis_arguments(parser)
    add_triage_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def add_triage_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--triage`` and its budget, neighbour and score options."""
    group = parser.add_argument_group(
        "triage",
        "map every tissue patch with the bundle's CONCH triage reference first, then run AnoPILaD on the "
        "patches with the highest triage scores",
    )
    group.add_argument(
        "--triage",
        action="store_true",
        help="run the triage pass first and write its map next to AnoPILaD's (the bundle needs triage/)",
    )
    group.add_argument(
        "--triage-budget",
        type=float,
        default=None,
        metavar="FRACTION",
        help="fraction of the tissue patches that AnoPILaD scores, highest triage score first; "
        f"1 scores all (default: {DEFAULT_BUDGET_FRACTION})",
    )
    group.add_argument(
        "--triage-neighbours",
        type=int,
        default=None,
        metavar="N",
        help="also score the tissue patches within N grid cells of each budget patch; 0 for none "
        f"(default: {DEFAULT_NEIGHBOUR_RADIUS}, the 8 neighbours)",
    )
    group.add_argument(
        "--triage-score",
        choices=TRIAGE_SCORE_NAMES,
        default=None,
        help=f"triage score that orders the patches and forms the triage map (default: {DEFAULT_TRIAGE_SCORE})",
    )


def add_analysis_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the region, threshold, device, batch size, resolution, inference and store options."""
    parser.add_argument(
        "--region",
        type=int,
        nargs=4,
        metavar=("X", "Y", "W", "H"),
        help="analyse only the patches that overlap this box, in level-0 pixels (x y width height)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        metavar="Z",
        default=0.0,
        help="anomaly threshold on the eroded z-score (default: 0, the published default)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default: auto)",
    )
    parser.add_argument(
        "--batch-size",
        type=batch_size_argument,
        default=8,
        metavar="N",
        help="patches per device batch, or auto to fit the GPU's free memory (default: 8)",
    )
    parser.add_argument(
        "--mpp",
        type=float,
        metavar="UM",
        help="level-0 microns per pixel, for slides whose metadata lacks it (for example 0.25)",
    )
    parser.add_argument(
        "--save-reconstructions",
        action="store_true",
        help="also write each patch and its reconstruction as PNG pairs to OUT/reconstructions/",
    )
    parser.add_argument(
        "--sampler", choices=("ddim", "plms"), help="denoising update (default: the bundle's, ddim)"
    )
    parser.add_argument(
        "--start-timestep",
        type=int,
        metavar="T",
        help="timestep the patch is noised to, 0-999, rounded to the nearest step of the --steps grid "
        "(default: the bundle's, 674, which the 100-step grid rounds to 671)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        metavar="G",
        help="classifier-free guidance scale, 1 for none (default: the bundle's, 7.5)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="inference steps over the 1000 training timesteps (default: the bundle's, 100)",
    )
    parser.add_argument(
        "--score",
        metavar="NAME",
        help="patch score: lpips or mse_latent for AnoPILaD, or one of a comparison method's scores "
        "(docs/comparison-methods.md) (default: the bundle's)",
    )
    parser.add_argument(
        "--precision",
        choices=("float32", "float16", "bfloat16"),
        help="UNet precision; half precisions need a GPU (default: the bundle's, float32)",
    )
    parser.add_argument(
        "--unprompted",
        action="store_true",
        help="ablation: reconstruct with the empty prompt and no guidance",
    )
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        metavar="MODE",
        help="torch.compile AnoPILaD's UNet: default, reduce-overhead (CUDA graphs) or max-autotune; "
        "compiling takes minutes per batch size (default: no compiling)",
    )
    parser.add_argument(
        "--store",
        type=Path,
        metavar="DIR",
        help="result store folder, shared between runs (default: OUT/store)",
    )


def batch_size_argument(text: str) -> int | str:
    """Parse ``--batch-size``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: use a positive integer or auto")
    return value


@dataclass(frozen=True)
class AnalysisOutputs:
    """Summary of one analysis: patch counts, slide scores and the files written."""

    out: Path
    n_patches: int
    n_reused: int
    n_computed: int
    z_max: float | None
    z_99: float | None
    z_source: str
    demo: bool
    files: dict[str, Path]
    n_tissue_patches: int = 0
    triage: dict[str, Any] | None = None
    scorer: str = "anopilad"


def run(args: argparse.Namespace) -> int:
    from napari_anopilad.engine.session import OutOfMemoryAtBatchSizeOne

    try:
        outputs = analyze(
            slide_path=args.slide,
            bundle_folder=args.bundle,
            out=args.out,
            region_level0=tuple(args.region) if args.region else None,
            threshold=args.threshold,
            device=args.device,
            batch_size=args.batch_size,
            mpp=args.mpp,
            save_reconstructions=args.save_reconstructions,
            overrides=_setting_overrides(args),
            store_root=args.store,
            allow_download=args.allow_download,
            triage=parse_triage_settings(args),
            compile_mode=args.compile,
        )
    except OutOfMemoryAtBatchSizeOne as error:
        # The finished batches are in the result store, so the same command resumes after the fix.
        raise CommandError(
            f"{error}; the finished batches are kept, so rerun the same command after"
        ) from error
    print_summary(outputs)
    return 0


def parse_triage_settings(args: argparse.Namespace) -> TriageSettings | None:
    """Return the triage settings of ``--triage`` and its options, or None without ``--triage``.

    Raises CommandError naming the flags for triage options given without ``--triage`` and for an
    invalid budget or neighbour radius.
    """
    options = {
        "--triage-budget": getattr(args, "triage_budget", None),
        "--triage-neighbours": getattr(args, "triage_neighbours", None),
        "--triage-score": getattr(args, "triage_score", None),
    }
    if not getattr(args, "triage", False):
        given = [flag for flag, value in options.items() if value is not None]
        if given:
            raise CommandError(f"{', '.join(given)} apply only with --triage: add --triage or leave them out")
        return None
    budget = DEFAULT_BUDGET_FRACTION if args.triage_budget is None else args.triage_budget
    neighbours = DEFAULT_NEIGHBOUR_RADIUS if args.triage_neighbours is None else args.triage_neighbours
    try:
        check_budget(budget, neighbours)
    except ValueError as error:
        flag = "--triage-budget" if "budget" in str(error) else "--triage-neighbours"
        raise CommandError(f"{flag}: {error}") from error
    return TriageSettings(
        score=args.triage_score or DEFAULT_TRIAGE_SCORE,
        budget_fraction=budget,
        neighbour_radius=neighbours,
    )


# The command-line flag of each setting, for error messages.
SETTING_FLAGS = {
    "sampler": "--sampler",
    "start_timestep": "--start-timestep",
    "guidance_scale": "--guidance-scale",
    "num_inference_steps": "--steps",
    "score": "--score",
    "precision": "--precision",
    "unprompted": "--unprompted",
}


def settings_with_overrides(settings: Any, overrides: dict[str, Any]) -> Any:
    """Return ``settings`` with the overrides; raise CommandError naming the flag of an invalid or unknown one.

    ``settings`` is AnoPILaD's InferenceSettings or a comparison method's BaselineSettings.
    """
    try:
        return settings.with_overrides(**overrides)
    except ValueError as error:
        message = str(error)
        for name, flag in SETTING_FLAGS.items():
            message = message.replace(f"setting {name!r}", flag)
            if message.startswith(f"{name} "):
                message = flag + message[len(name) :]
        raise CommandError(message) from error


def _setting_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "sampler": args.sampler,
        "start_timestep": args.start_timestep,
        "guidance_scale": args.guidance_scale,
        "num_inference_steps": args.steps,
        "score": args.score,
        "precision": args.precision,
        "unprompted": True if args.unprompted else None,
    }


def print_summary(outputs: AnalysisOutputs) -> None:
    """Print where the outputs are and the slide scores."""
    from napari_anopilad.engine.results import Z_SOURCE_TOO_FEW, Z_SOURCE_WITHIN_SLIDE
    from napari_anopilad.method.scorers import method_label

    if outputs.demo:
        print(f"WARNING: {DEMO_WARNING}.")
    n_tissue = outputs.n_tissue_patches or outputs.n_patches
    triage = outputs.triage
    if triage is not None:
        # k is the number of neighbours of the kNN distance; the keyword distance has none.
        k_text = f", k = {triage['k']}" if triage["scorer"].endswith("knn_distance") else ""
        print(
            f"Triage ({triage['scorer']}{k_text}): {triage['n_patches']} / {n_tissue} tissue patches "
            f"({triage['n_computed']} computed): Z_max {_number(triage['z_max'])}, "
            f"Z_99 {_number(triage['z_99'])}, z-scores from calibration."
        )
    label = method_label(outputs.scorer)
    if outputs.n_patches == 0:
        print(f"{label}: 0 / {n_tissue} tissue patches scored, because the triage budget is empty.")
    else:
        n_from_store = outputs.n_patches - outputs.n_computed
        print(
            f"{label}: {outputs.n_patches} / {n_tissue} tissue patches ({outputs.n_computed} computed, "
            f"{n_from_store} from the store): Z_max {_number(outputs.z_max)}, "
            f"Z_99 {_number(outputs.z_99)}, z-scores from {outputs.z_source}."
        )
    if 0 < outputs.n_patches < n_tissue:
        print(
            f"The {label} slide scores cover {outputs.n_patches / n_tissue:.1%} of the tissue patches "
            "(the triage budget), so they can miss anomalies outside it."
        )
        if outputs.z_source == Z_SOURCE_WITHIN_SLIDE:
            print(
                f"WARNING: the {label} z-scores use the mean and standard deviation of the scored patches, "
                "which triage chose as the most anomalous, so they understate anomalies. Calibrate the "
                "bundle at these settings (training/06_calibrate.py) or use --triage-budget 1.",
                file=sys.stderr,
            )
    if outputs.n_patches > 0 and outputs.z_source.startswith(Z_SOURCE_TOO_FEW):
        print(
            f"WARNING: the {label} z-scores are undefined, because z-scores within the slide need at least "
            f"two patches with different scores ({outputs.z_source}). They are set to 0, so Z_max and Z_99 "
            "mean nothing. Analyse a larger region or calibrate the bundle at these settings "
            "(training/06_calibrate.py).",
            file=sys.stderr,
        )
    print(f"Outputs in {outputs.out}:")
    for name, path in outputs.files.items():
        print(f"  {name:<20} {path}")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def select_cells(slide: Any, grid: Any, region_level0: tuple[int, int, int, int] | None) -> NDArray[np.int64]:
    """Return the tissue cells to analyse, ``(n, 2)`` of ``(row, col)``: all, or those overlapping the region.

    Raises
    ------
    CommandError
        If the region is empty or outside the slide, or no tissue cell is left.
    """
    cells = np.asarray(grid.tissue_cells(), dtype=np.int64).reshape(-1, 2)
    if region_level0 is None:
        if cells.size == 0:
            raise CommandError(f"slide {slide.path} has no tissue patch: check that it is a tissue section")
        return cells

    width_level0, height_level0 = slide.dimensions
    _check_region(region_level0, width_level0, height_level0)
    cells = cells_in_region(grid, cells, region_level0)
    if cells.size == 0:
        raise CommandError(
            f"--region {' '.join(map(str, region_level0))} contains no tissue patch: choose a box over tissue"
        )
    return cells


def _check_region(region_level0: tuple[int, int, int, int], slide_width: int, slide_height: int) -> None:
    x_level0, y_level0, width_level0, height_level0 = region_level0
    if width_level0 <= 0 or height_level0 <= 0:
        raise CommandError(
            f"--region width and height must be positive, got {width_level0} x {height_level0}"
        )
    if (
        x_level0 >= slide_width
        or y_level0 >= slide_height
        or x_level0 + width_level0 <= 0
        or y_level0 + height_level0 <= 0
    ):
        raise CommandError(
            f"--region {x_level0} {y_level0} {width_level0} {height_level0} lies outside the slide, "
            f"which is {slide_width} x {slide_height} level-0 pixels"
        )


def analyze(
    slide_path: Path,
    bundle_folder: Path,
    out: Path,
    *,
    region_level0: tuple[int, int, int, int] | None = None,
    threshold: float = 0.0,
    device: str = "auto",
    batch_size: int | str = 8,
    mpp: float | None = None,
    save_reconstructions: bool = False,
    overrides: dict[str, Any] | None = None,
    store_root: Path | None = None,
    allow_download: bool = False,
    progress: bool = True,
    triage: TriageSettings | None = None,
    compile_mode: str | None = None,
) -> AnalysisOutputs:
    """Analyse one slide and write every output file; see ``anopilad analyze --help`` for the options.

    With ``triage``, the triage pass scores every tissue patch (of the region) first and AnoPILaD scores
    only the triage budget, highest triage z-score first; the outputs then hold both maps.
    ``compile_mode`` compiles AnoPILaD's UNet with ``torch.compile`` in that mode.

    Raises
    ------
    CommandError, ValueError, FileNotFoundError
        For a missing or unreadable slide or bundle, or an output or store folder that cannot be created
        or written to. Also for an unknown mpp without ``mpp``, a region outside the slide or without
        tissue, or an unavailable device. Also for ``triage`` with a bundle that has no valid triage
        reference, and for ``compile_mode`` with a comparison method's bundle. Each message names the
        value and the fix.
    """
    from napari_anopilad.engine.device import check_precision, choose_device, describe_device
    from napari_anopilad.engine.results import calibration_reference, compute_slide_results
    from napari_anopilad.engine.session import AnalysisSession
    from napari_anopilad.engine.store import ResultStore, grid_description
    from napari_anopilad.method.scorers import (
        ANOPILAD,
        load_any_bundle,
        make_scorer,
        method_label,
        method_of,
        reconstructs,
        score_names,
    )
    from napari_anopilad.slide import build_patch_grid, compute_tissue_mask, open_slide

    if batch_size != "auto" and (isinstance(batch_size, str) or batch_size < 1):
        raise CommandError(f"--batch-size {batch_size} is invalid: use 1 or more, or auto")
    if not np.isfinite(threshold):
        raise CommandError(f"--threshold {threshold} is invalid: give a finite z-score, for example 0")
    if mpp is not None and not mpp > 0:
        raise CommandError(f"--mpp {mpp} is invalid: give the level-0 microns per pixel, a positive number")
    if not Path(slide_path).is_file():
        raise CommandError(f"slide {slide_path} not found: give the path of a whole-slide image file")
    if not Path(bundle_folder).is_dir():
        raise CommandError(
            f"bundle folder {bundle_folder} not found: give a model bundle folder "
            "(anopilad make-demo-bundle DIR makes a demo one)"
        )
    # When a check below fails, the folders created here are removed again while they are empty.
    with OutputFolders() as folders:
        out = folders.prepare(Path(out), "--out")
        if store_root is not None:
            folders.prepare(Path(store_root), "--store")

        torch_device = choose_device(device)
        bundle = load_any_bundle(bundle_folder, allow_download=allow_download)
        method = method_of(bundle)
        settings = settings_with_overrides(bundle.settings, overrides or {})
        if settings.score not in score_names(bundle):
            raise CommandError(
                f"--score {settings.score} is not a {method} score: use one of {', '.join(score_names(bundle))}"
            )
        if triage is not None:
            check_triage_method(method, bundle_folder)
        if compile_mode is not None and method != ANOPILAD:
            raise CommandError(
                f"--compile applies to AnoPILaD's UNet only, but {bundle_folder} is a {method_label(method)} "
                "bundle: leave out --compile"
            )
        if save_reconstructions and not reconstructs(bundle):
            raise CommandError(
                f"--save-reconstructions: the {method_label(method)} method of {bundle_folder} scores likelihoods "
                "and makes no reconstructions; leave the option out"
            )
        check_precision(torch_device, settings.precision)

        with open_slide(slide_path, mpp=mpp) as slide:
            tissue_mask = compute_tissue_mask(slide)
            grid = build_patch_grid(slide, tissue_mask=tissue_mask)
            cells = select_cells(slide, grid, region_level0)

            store = ResultStore(
                store_root if store_root is not None else out / "store",
                slide.identity,
                bundle.identity,
                settings,
                grid=grid_description(grid),
            )
            if bundle.demo:
                print(f"WARNING: {DEMO_WARNING}.", file=sys.stderr)

            triage_results = plan = None
            triage_summary: dict[str, Any] | None = None
            target = cells
            if triage is not None:
                triage_results, plan, n_triage_computed = _run_triage(
                    slide, grid, bundle, torch_device, store.root, cells, triage, threshold, progress
                )
                target = plan.cells
                triage_summary = {
                    "scorer": triage_results.scorer_name,
                    "k": triage_results.k,
                    "n_patches": triage_results.n_patches,
                    "n_computed": n_triage_computed,
                    "z_max": triage_results.z_max,
                    "z_99": triage_results.z_99,
                    "plan": plan.to_dict(),
                }
                print(
                    f"Triage budget: {plan.n_budget} of {len(cells)} tissue patches for AnoPILaD "
                    f"({plan.n_top} top by {triage.score}, plus neighbours within {triage.neighbour_radius} cells)"
                )

            done = store.done_cells(need_reconstructions=save_reconstructions)
            n_reused = sum((int(row), int(col)) in done for row, col in target)
            if n_reused:
                print(f"Reused {n_reused} of {len(target)} patches from the store {store.folder}")

            n_computed = 0
            if n_reused < len(target):
                # Loading the models takes a while, so it happens only when some patch needs them.
                # The grid warning comes here too, after every input check and only when patches are scored.
                if method == ANOPILAD:
                    from_flag = (overrides or {}).get("start_timestep") is not None
                    warning = start_timestep_warning(bundle, settings, from_flag)
                    if warning is not None:
                        print(f"WARNING: {warning}", file=sys.stderr)
                logger.info("Scoring on %s with %s", describe_device(torch_device), settings)
                scorer = make_scorer(bundle, str(torch_device), settings, compile_mode=compile_mode)
                session = AnalysisSession(
                    slide,
                    grid,
                    scorer,
                    store,
                    cells=target,
                    batch_size=batch_size,
                    save_reconstructions=save_reconstructions,
                    calibration=calibration_reference(bundle, settings),
                )
                if plan is not None:
                    session.prioritize(plan.priority)
                n_computed = _run_with_progress(session, progress)

            results = compute_slide_results(store, grid, bundle, threshold, cells=cells, settings=settings)
            files = write_outputs(
                out,
                slide=slide,
                grid=grid,
                results=results,
                settings=settings,
                bundle=bundle,
                region_level0=region_level0,
                store=store if save_reconstructions else None,
                triage=triage_results,
                plan=plan,
                compile_mode=compile_mode,
            )

        return AnalysisOutputs(
            out=out,
            n_patches=results.n_patches,
            n_reused=n_reused,
            n_computed=n_computed,
            z_max=results.z_max,
            z_99=results.z_99,
            z_source=results.z_source,
            demo=bool(bundle.demo),
            files=files,
            n_tissue_patches=len(cells),
            triage=triage_summary,
            scorer=method,
        )


def start_timestep_warning(bundle: Any, settings: Any, from_flag: bool = True) -> str | None:
    """Return a warning when the start timestep is not a step of the denoising grid, else None.

    ``from_flag`` is True when the start timestep came from ``--start-timestep``, False for the bundle's.
    """
    on_grid = bundle.start_timestep_on_grid(settings)
    if on_grid is None or on_grid == settings.start_timestep:
        return None
    source = "--start-timestep" if from_flag else "the bundle's start timestep"
    return (
        f"{source} {settings.start_timestep} is not a step of the {settings.num_inference_steps}-step "
        f"denoising grid, so the diffusion starts from the nearest step, timestep {on_grid} "
        "(slide.json records it as start_timestep_on_grid). Choose a grid step or change --steps to start "
        "elsewhere."
    )


def _run_triage(
    slide: Any,
    grid: Any,
    bundle: Any,
    torch_device: Any,
    store_root: Path,
    cells: NDArray[np.int64],
    triage: TriageSettings,
    threshold: float,
    progress: bool,
) -> tuple[Any, Any, int]:
    """Run the triage pass over ``cells`` and return its map, the diffusion plan and the patches computed."""
    from tqdm import tqdm

    from napari_anopilad.engine.triage_pass import run_slide_triage
    from napari_anopilad.method.triage import TriageScorer

    logger.info("Triage on %s with %s", torch_device, triage)
    scorer = TriageScorer(bundle, str(torch_device), k=triage.k)
    with tqdm(total=len(cells), unit="patch", desc="triage", disable=not progress, dynamic_ncols=True) as bar:

        def report(batch: Any) -> None:
            bar.n = batch.n_done
            bar.set_postfix(patches_per_s=f"{batch.patches_per_s:.1f}")
            bar.refresh()

        return run_slide_triage(
            store_root,
            slide,
            grid,
            bundle,
            scorer,
            cells,
            settings=triage,
            threshold=threshold,
            on_batch=report,
        )


def _run_with_progress(session: Any, progress: bool) -> int:
    from tqdm import tqdm

    n_computed = 0
    with (
        tqdm(
            total=session.n_total,
            initial=session.n_done,
            unit="patch",
            desc="analyze",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar,
        contextlib.closing(session.run()) as batches,
    ):
        for batch in batches:
            n_computed += len(batch.cells)
            bar.update(len(batch.cells))
            bar.set_postfix(patches_per_s=f"{batch.patches_per_s:.2f}", batch=batch.batch_size)
    return n_computed
