"""Step 7: evaluate bundles at patch, slide and segmentation level and write a report folder.

- Patch level: AUC and AUPR of z-scores, normal patches of normal slides against tumour patches.
- Slide level: AUC and AUPR of Z_max and Z_99 (over the eroded heatmap), with percentile bootstrap
  intervals over slides.
- Segmentation at threshold 0: prediction is eroded z > 0 on the scored cells; truth is the tumour label
  of each cell from the annotation coverage; excluded cells are left out. Dice and IoU on tumour slides,
  TNR on normal slides, averaged over slides.

Undefined values (one class only, no negative cells) are reported as ``n/a`` with the reason, and left
out of averages. Patch scores are cached per bundle in ``scores/<bundle>.csv``, so a rerun resumes.
A bundle's name in the table and in file names comes from its folder (:func:`bundle_labels`).

Several score sets go side by side in one table, one row each (:class:`EvaluationRun`,
:func:`evaluate_runs`). ``--bundle`` takes AnoPILaD bundles and the comparison methods' bundles alike, so
the table compares methods as the AnoPILaD paper's table does. With ``--triage``, each bundle gives three rows: the CONCH triage score alone,
AnoPILaD on every patch, and triage-guided AnoPILaD, which keeps AnoPILaD's scores only on each slide's
triage budget (the top fraction by triage z-score plus their grid neighbours), as ``anopilad analyze
--triage`` computes them. Its metrics cover only those patches, and the table's Coverage column says
how many they are.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_anopilad.training.manifest import read_manifest, read_slides, select_rows
from napari_anopilad.training.metrics import (
    BootstrapInterval,
    MetricValue,
    average_precision,
    bootstrap_interval,
    dice,
    iou,
    roc_auc,
    true_negative_rate,
)

EVALUATION_SPLITS = ("test-in", "test-out")
# The folder name of a bundle that a training script writes inside its run folder.
BUNDLE_FOLDER_NAME = "bundle"
_UNSAFE_FILE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
DEMO_WARNING = (
    "This report was made with a demo bundle (tiny random models): its numbers are meaningless and say "
    "nothing about the method."
)


def safe_file_stem(text: str) -> str:
    """Replace each run of characters other than letters, digits, ``.``, ``_`` and ``-`` with one ``_``.

    Leading and trailing ``_`` and ``.`` are dropped, so no stem starts with a dot, and an empty result
    becomes ``_``. ``"memae (memae, mse)"`` gives ``"memae_memae_mse"``.
    """
    return _UNSAFE_FILE_CHARACTERS.sub("_", text).strip("_.") or "_"


@dataclass
class SlideResult:
    """One slide's heatmap, slide scores and segmentation metrics."""

    slide: str
    label: str
    z_grid: np.ndarray
    eroded: np.ndarray
    truth: np.ndarray
    valid: np.ndarray
    z_max: float | None
    z_99: float | None
    dice: MetricValue | None = None
    iou: MetricValue | None = None
    tnr: MetricValue | None = None


@dataclass
class Evaluation:
    """All metrics of one bundle."""

    name: str
    demo: bool
    z_source: str
    slides: list[SlideResult]
    patch_labels: np.ndarray
    patch_z: np.ndarray
    metrics: dict[str, MetricValue] = field(default_factory=dict)
    intervals: dict[str, BootstrapInterval] = field(default_factory=dict)
    scorer: str = "anopilad"
    coverage: float = 1.0


@dataclass(frozen=True)
class EvaluationRun:
    """One score set to evaluate as one row of the report's table.

    Attributes
    ----------
    label : str
        The row's name in the table; unique among the runs of a report.
    scores : pandas.DataFrame
        One row per scored patch with ``slide``, ``row``, ``col``, ``label`` and the ``score_name`` column.
    score_name : str
        The score column to evaluate (``lpips``, ``mse_latent``, ``knn_distance``, a comparison method's).
    calibration : tuple of float or None
        ``(mean, std)`` of that score on normal patches; None z-scores each slide against itself.
    demo : bool
        Computed with a demo bundle, so the numbers mean nothing.
    scorer : str
        The method behind the scores, for example ``"anopilad"`` or ``"triage:knn_distance"``.
    """

    label: str
    scores: pd.DataFrame
    score_name: str
    calibration: tuple[float, float] | None
    demo: bool = False
    scorer: str = "anopilad"


def slide_results(
    scores: pd.DataFrame,
    slides: pd.DataFrame,
    score_name: str,
    calibration: tuple[float, float] | None,
) -> list[SlideResult]:
    """Build each slide's z-score heatmap and its slide scores and segmentation metrics.

    Parameters
    ----------
    scores
        One row per scored patch with ``slide``, ``row``, ``col``, ``label`` and the score column.
    slides
        The slide table (``slides.csv``) with ``slide``, ``label``, ``rows`` and ``cols``.
    score_name
        ``lpips`` or ``mse_latent``.
    calibration
        ``(mean, std)`` of the score on normal patches; None z-scores each slide against itself.
    """
    from napari_anopilad.method.heatmap import (
        anomaly_mask,
        erode_heatmap,
        heatmap_grid,
        within_slide_stats,
        z_99,
        z_max,
        zscores,
    )

    results = []
    for slide in slides.itertuples(index=False):
        patches = scores[scores["slide"] == slide.slide]
        if patches.empty:
            continue
        values = patches[score_name].to_numpy(dtype=np.float64)
        mean, std = calibration if calibration is not None else within_slide_stats(values)
        shape = (int(slide.rows), int(slide.cols))
        z_grid = heatmap_grid(shape, patches["row"], patches["col"], zscores(values, mean, std))
        eroded = erode_heatmap(z_grid)
        labels = np.full(shape, "", dtype=object)
        labels[patches["row"].to_numpy(), patches["col"].to_numpy()] = patches["label"].to_numpy()
        truth = labels == "tumour"
        valid = ~np.isnan(z_grid) & (labels != "excluded")
        predicted = anomaly_mask(eroded, 0.0)
        result = SlideResult(
            slide=slide.slide,
            label=slide.label,
            z_grid=z_grid,
            eroded=eroded,
            truth=truth,
            valid=valid,
            z_max=z_max(eroded),
            z_99=z_99(eroded),
        )
        if slide.label == "tumour":
            result.dice = dice(predicted, truth, valid)
            result.iou = iou(predicted, truth, valid)
        else:
            result.tnr = true_negative_rate(predicted, truth, valid)
        results.append(result)
    return results


def _mean_defined(values: Sequence[MetricValue | None], what: str) -> MetricValue:
    defined = [value.value for value in values if value is not None and value.value is not None]
    if not defined:
        return MetricValue(None, f"no slide with a defined {what}")
    return MetricValue(float(np.mean(defined)))


def evaluate(
    name: str,
    scores: pd.DataFrame,
    slides: pd.DataFrame,
    score_name: str,
    calibration: tuple[float, float] | None,
    demo: bool,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """Compute every metric of one bundle from its patch scores."""
    results = slide_results(scores, slides, score_name, calibration)
    slide_label = dict(zip(slides["slide"], slides["label"]))

    patch_z = []
    patch_labels = []
    for result in results:
        scored = ~np.isnan(result.z_grid)
        z_values = result.z_grid[scored]
        cell_labels = np.where(result.truth[scored], "tumour", "normal")
        excluded = ~result.valid[scored]
        for z, label, skip in zip(z_values, cell_labels, excluded):
            if skip:
                continue
            if label == "tumour":
                patch_z.append(z)
                patch_labels.append(1)
            elif slide_label[result.slide] == "normal":
                patch_z.append(z)
                patch_labels.append(0)

    evaluation = Evaluation(
        name=name,
        demo=demo,
        z_source="calibration" if calibration is not None else "within-slide",
        slides=results,
        patch_labels=np.asarray(patch_labels, dtype=int),
        patch_z=np.asarray(patch_z, dtype=np.float64),
    )
    evaluation.metrics["patch_auc"] = roc_auc(evaluation.patch_labels, evaluation.patch_z)
    evaluation.metrics["patch_aupr"] = average_precision(evaluation.patch_labels, evaluation.patch_z)

    slide_labels = np.asarray([1 if result.label == "tumour" else 0 for result in results], dtype=int)
    for score_key in ("z_max", "z_99"):
        values = np.asarray([getattr(result, score_key) for result in results], dtype=np.float64)
        for metric_key, metric in (("auc", roc_auc), ("aupr", average_precision)):
            key = f"slide_{metric_key}_{score_key}"
            evaluation.metrics[key] = metric(slide_labels, values)
            evaluation.intervals[key] = bootstrap_interval(
                slide_labels, values, metric, n_bootstrap, seed=seed
            )

    evaluation.metrics["dice"] = _mean_defined(
        [result.dice for result in results if result.label == "tumour"], "Dice"
    )
    evaluation.metrics["iou"] = _mean_defined(
        [result.iou for result in results if result.label == "tumour"], "IoU"
    )
    evaluation.metrics["tnr"] = _mean_defined(
        [result.tnr for result in results if result.label != "tumour"], "TNR"
    )
    return evaluation


def evaluate_runs(
    runs: Sequence[EvaluationRun], slides: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0
) -> list[Evaluation]:
    """Evaluate each run on the same slides, in order, for one side-by-side table.

    Each evaluation's ``coverage`` is the fraction of the patches that any run scored which this run
    scored, so a run restricted to a budget shows how much of the slides its metrics cover.

    Raises
    ------
    ValueError
        If two runs have the same label or a run lacks its score column.
    """
    labels = [run.label for run in runs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"evaluation runs need unique labels, but {', '.join(repeated)} repeat")
    for run in runs:
        missing = [
            column for column in ("slide", "row", "col", "label", run.score_name) if column not in run.scores
        ]
        if missing:
            raise ValueError(f"the scores of run {run.label!r} lack the columns {missing}")

    def cells(run: EvaluationRun) -> set[tuple[str, int, int]]:
        table = run.scores[["slide", "row", "col"]]
        return {(str(slide), int(row), int(col)) for slide, row, col in table.itertuples(index=False)}

    every_cell: set[tuple[str, int, int]] = set().union(*(cells(run) for run in runs)) if runs else set()
    evaluations = []
    for run in runs:
        evaluation = evaluate(
            run.label,
            run.scores,
            slides,
            run.score_name,
            run.calibration,
            run.demo,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
        evaluation.scorer = run.scorer
        evaluation.coverage = len(cells(run)) / len(every_cell) if every_cell else 0.0
        evaluations.append(evaluation)
    return evaluations


def triage_guided_scores(
    anopilad_scores: pd.DataFrame,
    triage_scores: pd.DataFrame,
    triage_z_column: str = "knn_z",
    budget_fraction: float = 0.1,
    neighbour_radius: int = 1,
) -> pd.DataFrame:
    """Keep the AnoPILaD scores of each slide's triage budget, as a triage-guided analysis computes them.

    Per slide, the budget is taken over the patches with triage scores, by
    :func:`napari_anopilad.engine.triage_pass.diffusion_budget`: the top ``budget_fraction`` by
    ``triage_z_column`` plus the patches within ``neighbour_radius`` grid cells of them.
    """
    from napari_anopilad.engine.triage_pass import diffusion_budget

    kept = []
    for slide, triage in triage_scores.groupby("slide", sort=False):
        cells = triage[["row", "col"]].to_numpy(dtype=np.int64)
        budget, _ = diffusion_budget(
            cells, triage[triage_z_column].to_numpy(dtype=np.float64), budget_fraction, neighbour_radius
        )
        wanted = {(int(row), int(col)) for row, col in budget}
        patches = anopilad_scores[anopilad_scores["slide"] == slide]
        keep = [(int(row), int(col)) in wanted for row, col in zip(patches["row"], patches["col"])]
        kept.append(patches[np.asarray(keep, dtype=bool)])
    if not kept:
        return anopilad_scores.iloc[0:0]
    return pd.concat(kept, ignore_index=True)


TRIAGE_SCORE_COLUMNS = [
    "path",
    "slide",
    "row",
    "col",
    "label",
    "knn_distance",
    "keyword_distance",
    "knn_z",
    "keyword_z",
]


def score_triage_rows(
    scorer: Any,
    extraction_folder: Path,
    rows: pd.DataFrame,
    scores_path: Path,
    batch_size: int = 64,
    progress: Any = None,
) -> pd.DataFrame:
    """Score manifest rows with a ``TriageScorer``, appending to ``scores_path`` after each batch (resumable)."""
    from napari_anopilad.training.manifest import load_patches, write_table_atomic

    scores_path = Path(scores_path)
    if scores_path.is_file():
        done = pd.read_csv(scores_path, dtype={"slide": str, "path": str}, keep_default_na=False)
    else:
        done = pd.DataFrame(columns=TRIAGE_SCORE_COLUMNS)
    todo = rows[~rows["path"].isin(set(done["path"]))]
    for start in range(0, len(todo), batch_size):
        batch = todo.iloc[start : start + batch_size]
        scores = scorer.score(load_patches(extraction_folder, batch["path"]))
        new = pd.DataFrame(
            {
                "path": batch["path"].to_numpy(),
                "slide": batch["slide"].to_numpy(),
                "row": batch["row"].to_numpy(),
                "col": batch["col"].to_numpy(),
                "label": batch["label"].to_numpy(),
                **{name: np.asarray(getattr(scores, name)) for name in TRIAGE_SCORE_COLUMNS[5:]},
            }
        )
        done = pd.concat([done, new], ignore_index=True) if len(done) else new
        write_table_atomic(done, scores_path)
        if progress is not None:
            progress.update(len(batch))
    return done[done["path"].isin(set(rows["path"]))].reset_index(drop=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="07_evaluate.py",
        description="Evaluate bundles on the test slides and write a report folder (step 7).",
    )
    parser.add_argument("patches", type=Path, help="extraction folder with manifest.csv and slides.csv")
    parser.add_argument(
        "--bundle", required=True, type=Path, action="append", help="bundle folder (repeat to compare)"
    )
    parser.add_argument("--report", required=True, type=Path, help="report folder")
    parser.add_argument("--splits", nargs="+", default=list(EVALUATION_SPLITS), help="splits to evaluate on")
    parser.add_argument(
        "--score",
        default=None,
        metavar="NAME",
        help="score of every bundle, e.g. lpips or mse_latent for AnoPILaD, mse or l1 for AE "
        "(default: each bundle's own)",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over slides")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--batch-size", type=int, default=16, help="patches per scoring batch")
    parser.add_argument(
        "--triage",
        action="store_true",
        help="also evaluate each bundle's CONCH triage score and triage-guided AnoPILaD (needs triage/)",
    )
    parser.add_argument(
        "--triage-score",
        choices=("knn_distance", "keyword_distance"),
        default="knn_distance",
        help="triage score of the triage row and of the guided budget (default: knn_distance)",
    )
    parser.add_argument(
        "--triage-budget",
        type=float,
        default=0.1,
        metavar="FRACTION",
        help="fraction of each slide's patches that guided AnoPILaD keeps, highest triage z first (default: 0.1)",
    )
    parser.add_argument(
        "--triage-neighbours",
        type=int,
        default=1,
        metavar="N",
        help="guided AnoPILaD also keeps the patches within N grid cells of the budget (default: 1)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate bundles from command-line arguments; return the exit status."""
    from tqdm.auto import tqdm

    from napari_anopilad.method.scorers import ANOPILAD, method_of, score_names
    from napari_anopilad.training.report import write_report
    from napari_anopilad.training.scoring import load_bundle_or_exit, make_scorer_or_exit, score_rows

    args = build_parser().parse_args(argv)
    slides = read_slides(args.patches)
    slides = slides[slides["split"].isin(args.splits)]
    rows = select_rows(read_manifest(args.patches), splits=args.splits)
    if rows.empty:
        raise SystemExit(
            f"error: no patches in the splits {args.splits}: check the split file of the extraction"
        )

    # Every bundle loads, and takes --score, before any patch is scored.
    # NOTE: weights that do not fit their architecture are found only when the scorer is built, after the
    # bundles before them are scored. Their scores stay cached, so the rerun skips them.
    try:
        names = bundle_labels(args.bundle)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    bundles = []
    for bundle_folder in args.bundle:
        bundle = load_bundle_or_exit(bundle_folder)
        if args.score is not None and args.score not in score_names(bundle):
            raise SystemExit(
                f"error: --score {args.score} is not a score of the {method_of(bundle)} bundle {bundle_folder}: "
                f"its scores are {', '.join(score_names(bundle))}. Leave out --score to use each bundle's own."
            )
        bundles.append(bundle)
    (args.report / "scores").mkdir(parents=True, exist_ok=True)

    runs: list[EvaluationRun] = []
    for bundle, name in zip(bundles, names):
        method = method_of(bundle)
        score_name = args.score or bundle.settings.score
        scorer = make_scorer_or_exit(bundle, args.device)
        scores_path = args.report / "scores" / f"{name}.csv"
        key_path = scores_path.with_suffix(".key")
        key = f"{bundle.identity} {bundle.settings.score_key()}"
        if key_path.is_file() and key_path.read_text() != key:
            scores_path.unlink(missing_ok=True)
        key_path.write_text(key)
        with tqdm(total=len(rows), desc=f"scoring {name}", unit="patch") as progress:
            scores = score_rows(scorer, args.patches, rows, scores_path, args.batch_size, progress)
        calibration = scorer.calibration
        stats = None if calibration is None else (calibration.mean[score_name], calibration.std[score_name])
        label = name if method == ANOPILAD else f"{name} ({method}, {score_name})"
        run = EvaluationRun(label, scores, score_name, stats, bundle.demo, scorer=method)
        if not args.triage:
            runs.append(run)
        elif method != ANOPILAD:
            print(
                f"{name} is a {method} bundle: no triage rows, which need an AnoPILaD bundle's triage reference"
            )
            runs.append(run)
        else:
            runs.extend(_triage_runs(args, bundle, name, rows, run))

    evaluations = evaluate_runs(runs, slides, n_bootstrap=args.bootstrap, seed=args.seed)
    annotations = _read_slide_annotations(slides)
    table = write_report(args.report, evaluations, slides, annotations)
    print(table.to_string(index=False))
    print(f"report written to {args.report}")
    return 0


def _triage_runs(
    args: argparse.Namespace, bundle: Any, name: str, rows: pd.DataFrame, anopilad_run: EvaluationRun
) -> list[EvaluationRun]:
    """Return the triage, AnoPILaD and triage-guided AnoPILaD runs of one bundle."""
    from tqdm.auto import tqdm

    from napari_anopilad.engine.triage_pass import check_budget
    from napari_anopilad.method.errors import BundleError
    from napari_anopilad.method.triage import TriageScorer
    from napari_anopilad.method.triage_store import TriageReferenceError

    try:
        check_budget(args.triage_budget, args.triage_neighbours)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    try:
        scorer = TriageScorer(bundle, args.device)
    except (BundleError, TriageReferenceError) as error:
        raise SystemExit(f"error: --triage with --bundle {bundle.folder}: {error}") from error
    scores_path = args.report / "scores" / f"{name}.triage.csv"
    key_path = scores_path.with_suffix(".key")
    key = f"{bundle.identity} {scorer.reference.identity} k{scorer.k}"
    if key_path.is_file() and key_path.read_text() != key:
        scores_path.unlink(missing_ok=True)
    key_path.write_text(key)
    with tqdm(total=len(rows), desc=f"triage {name}", unit="patch") as progress:
        triage_scores = score_triage_rows(scorer, args.patches, rows, scores_path, 64, progress)

    score = args.triage_score
    statistics = scorer.knn_statistics if score == "knn_distance" else scorer.reference.keyword_calibration
    z_column = "knn_z" if score == "knn_distance" else "keyword_z"
    guided = triage_guided_scores(
        anopilad_run.scores, triage_scores, z_column, args.triage_budget, args.triage_neighbours
    )
    return [
        EvaluationRun(
            f"{name} triage ({score})",
            triage_scores,
            score,
            (float(statistics.mean), float(statistics.std)),
            bool(scorer.demo),
            scorer=f"triage:{score}",
        ),
        anopilad_run,
        EvaluationRun(
            f"{name} triage-guided ({args.triage_budget:g} budget)",
            guided,
            anopilad_run.score_name,
            anopilad_run.calibration,
            anopilad_run.demo,
            scorer=f"anopilad, guided by triage:{score}",
        ),
    ]


def bundle_labels(folders: Sequence[Path]) -> list[str]:
    """Name each bundle folder for the report's rows and its ``scores/`` cache files.

    A bundle's label is its folder's name, or the parent folder's name when the folder is called
    ``bundle``, as in the layout ``runs/<method>/bundle``. Characters other than letters, digits, ``.``,
    ``_`` and ``-`` become ``_`` so that labels make safe file names. Folders whose labels clash, ignoring
    case, get ``-`` and 8 hex digits of a hash of their resolved path. A folder therefore keeps its label,
    and its cached scores, in any order of ``--bundle``.

    Raises
    ------
    ValueError
        If one folder is given twice.
    """
    resolved = [Path(folder).resolve() for folder in folders]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise ValueError(f"--bundle {folders[index]} is given twice: pass each bundle once")

    labels = []
    for path in resolved:
        name = path.parent.name if path.name == BUNDLE_FOLDER_NAME and path.parent.name else path.name
        labels.append(safe_file_stem(name))
    keys = [label.casefold() for label in labels]
    for index, path in enumerate(resolved):
        if keys.count(keys[index]) > 1:
            labels[index] += "-" + hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return labels


def _read_slide_annotations(slides: pd.DataFrame) -> dict[str, Any]:
    from napari_anopilad.io.annotations import read_annotations

    annotations = {}
    for slide in slides.itertuples(index=False):
        if slide.annotation_path:
            annotations[slide.slide] = read_annotations(slide.annotation_path)
    return annotations
