"""The evaluation report: a table laid out like the AnoPILaD paper's, curves and heatmaps as PNG files.

The table has one row per evaluated score set (a bundle, the triage score, triage-guided AnoPILaD, a
comparison method) and one column per metric, so several methods sit side by side as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from napari_anopilad.training.evaluate import DEMO_WARNING, Evaluation, safe_file_stem
from napari_anopilad.training.metrics import BootstrapInterval, MetricValue

TABLE_COLUMNS = [
    ("patch_auc", "Patch AUC"),
    ("patch_aupr", "Patch AUPR"),
    ("slide_auc_z_max", "Slide AUC (Z_max)"),
    ("slide_aupr_z_max", "Slide AUPR (Z_max)"),
    ("slide_auc_z_99", "Slide AUC (Z_99)"),
    ("slide_aupr_z_99", "Slide AUPR (Z_99)"),
    ("dice", "Dice"),
    ("iou", "IoU"),
    ("tnr", "TNR"),
]
COVERAGE_TITLE = "Coverage"


def _heatmap_stems(evaluations: Sequence[Evaluation]) -> list[str]:
    """Return one file stem per evaluation; a stem already taken, ignoring case, gets ``-2``, ``-3``, ..."""
    stems: list[str] = []
    for evaluation in evaluations:
        stem = safe_file_stem(evaluation.name)
        candidate, number = stem, 1
        while candidate.casefold() in (taken.casefold() for taken in stems):
            number += 1
            candidate = f"{stem}-{number}"
        stems.append(candidate)
    return stems


def _format(value: MetricValue, interval: BootstrapInterval | None) -> str:
    if value.value is None:
        return "n/a"
    text = f"{value.value:.3f}"
    if interval is not None and interval.low is not None and interval.high is not None:
        text += f" [{interval.low:.3f}, {interval.high:.3f}]"
    return text


def results_table(evaluations: Sequence[Evaluation]) -> pd.DataFrame:
    """Return one row per evaluation and one column per metric, as formatted text with bootstrap intervals.

    When some evaluation scored fewer patches than the others (a triage budget), a last column gives each
    row's coverage: the fraction of the patches scored by any row that this row scored.
    """
    with_coverage = _needs_coverage(evaluations)
    records = []
    for evaluation in evaluations:
        record = {"Method": evaluation.name + (" (demo)" if evaluation.demo else "")}
        for key, title in TABLE_COLUMNS:
            record[title] = _format(evaluation.metrics[key], evaluation.intervals.get(key))
        if with_coverage:
            record[COVERAGE_TITLE] = f"{evaluation.coverage:.1%}"
        records.append(record)
    return pd.DataFrame(records)


def _needs_coverage(evaluations: Sequence[Evaluation]) -> bool:
    return any(getattr(evaluation, "coverage", 1.0) < 1.0 for evaluation in evaluations)


def _undefined_notes(evaluations: Sequence[Evaluation]) -> list[str]:
    notes = []
    for evaluation in evaluations:
        for key, title in TABLE_COLUMNS:
            value = evaluation.metrics[key]
            if value.value is None:
                notes.append(f"{evaluation.name}: {title} is undefined ({value.reason}).")
    return notes


def _curve_figure(evaluations: Sequence[Evaluation], level: str, path: Path) -> None:
    figure, (roc_axes, pr_axes) = plt.subplots(1, 2, figsize=(10, 4.5))
    for evaluation in evaluations:
        if level == "patch":
            labels, scores = evaluation.patch_labels, evaluation.patch_z
        else:
            labels = np.asarray([1 if result.label == "tumour" else 0 for result in evaluation.slides])
            scores = np.asarray([result.z_99 for result in evaluation.slides], dtype=np.float64)
        if labels.size == 0 or labels.min() == labels.max():
            roc_axes.plot([], [], label=f"{evaluation.name}: undefined (one class only)")
            continue
        false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores)
        precision, recall, _ = precision_recall_curve(labels, scores)
        roc_axes.plot(false_positive_rate, true_positive_rate, label=evaluation.name)
        pr_axes.plot(recall, precision, label=evaluation.name)
    roc_axes.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_axes.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, {level} level")
    pr_axes.set(xlabel="recall", ylabel="precision", title=f"Precision-recall, {level} level")
    roc_axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _heatmap_figure(evaluation: Evaluation, slide: Any, annotations: Any, path: Path) -> None:
    result = next(result for result in evaluation.slides if result.slide == slide.slide)
    figure, axes = plt.subplots(figsize=(6, 6 * max(slide.rows, 1) / max(slide.cols, 1) + 0.8))
    limit = float(np.nanmax(np.abs(result.eroded))) if np.isfinite(result.eroded).any() else 1.0
    image = axes.imshow(result.eroded, cmap="coolwarm", vmin=-limit, vmax=limit, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="eroded z-score")
    if annotations is not None:
        # Grid cell (row, col) is drawn centred on pixel (col, row), so level-0 x maps to x / P - 0.5.
        size = float(slide.patch_size_level0)
        for polygon in annotations.tumour:
            ring = np.vstack([polygon.exterior_level0, polygon.exterior_level0[:1]])
            axes.plot(ring[:, 0] / size - 0.5, ring[:, 1] / size - 0.5, color="black", linewidth=1.5)
        for polygon in annotations.excluded:
            ring = np.vstack([polygon.exterior_level0, polygon.exterior_level0[:1]])
            axes.plot(ring[:, 0] / size - 0.5, ring[:, 1] / size - 0.5, color="grey", linestyle="--")
    axes.set_xlim(-0.5, slide.cols - 0.5)
    axes.set_ylim(slide.rows - 0.5, -0.5)
    z_99 = "n/a" if result.z_99 is None else f"{result.z_99:.2f}"
    axes.set_title(f"{slide.slide} ({result.label}), {evaluation.name}: Z_99 {z_99}", fontsize=9)
    axes.set(xlabel="col", ylabel="row")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(
    folder: Path, evaluations: Sequence[Evaluation], slides: pd.DataFrame, annotations: dict[str, Any]
) -> pd.DataFrame:
    """Write ``results.md``, ``results.csv``, ``per_slide.csv``, curves and heatmaps into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = results_table(evaluations)
    table.to_csv(folder / "results.csv", index=False)

    per_slide = []
    for evaluation in evaluations:
        for result in evaluation.slides:
            per_slide.append(
                {
                    "method": evaluation.name,
                    "slide": result.slide,
                    "label": result.label,
                    "z_max": result.z_max,
                    "z_99": result.z_99,
                    "dice": None if result.dice is None else result.dice.value,
                    "iou": None if result.iou is None else result.iou.value,
                    "tnr": None if result.tnr is None else result.tnr.value,
                    "scored_patches": int(np.isfinite(result.z_grid).sum()),
                }
            )
    pd.DataFrame(per_slide).to_csv(folder / "per_slide.csv", index=False)

    _curve_figure(evaluations, "patch", folder / "curves_patch.png")
    _curve_figure(evaluations, "slide", folder / "curves_slide_z99.png")
    (folder / "heatmaps").mkdir(exist_ok=True)
    for evaluation, stem in zip(evaluations, _heatmap_stems(evaluations)):
        for slide in slides.itertuples(index=False):
            if any(result.slide == slide.slide for result in evaluation.slides):
                _heatmap_figure(
                    evaluation,
                    slide,
                    annotations.get(slide.slide),
                    folder / "heatmaps" / f"{stem}_{safe_file_stem(str(slide.slide))}.png",
                )

    lines = ["# Evaluation report", ""]
    if any(evaluation.demo for evaluation in evaluations):
        lines += [f"**{DEMO_WARNING}**", ""]
    header = ["Method", *(title for _, title in TABLE_COLUMNS)]
    if _needs_coverage(evaluations):
        header.append(COVERAGE_TITLE)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for record in table.to_dict("records"):
        lines.append("| " + " | ".join(str(record[column]) for column in header) + " |")
    n_tumour = int((slides["label"] == "tumour").sum())
    lines += [
        "",
        f"Slides: {len(slides)} ({n_tumour} tumour, {len(slides) - n_tumour} normal). Slide-level values show "
        "the percentile bootstrap 95% interval over slides in brackets. Dice and IoU are means over tumour "
        "slides, TNR over normal slides, at eroded z > 0.",
    ]
    for evaluation in evaluations:
        lines.append(
            f"{evaluation.name}: scorer {evaluation.scorer}, {evaluation.z_source} statistics, "
            f"{evaluation.coverage:.1%} of the scored patches."
        )
    notes = _undefined_notes(evaluations)
    if notes:
        lines += ["", "Undefined values:", "", *(f"- {note}" for note in notes)]
    lines += [
        "",
        "Figures: `curves_patch.png`, `curves_slide_z99.png` and one heatmap per slide in `heatmaps/` "
        "(annotated tumour outlined in black, excluded areas dashed).",
        "",
    ]
    (folder / "results.md").write_text("\n".join(lines))
    return table
