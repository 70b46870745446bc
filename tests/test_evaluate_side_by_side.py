"""Side-by-side evaluation: several score sets in one table, triage-guided budgets and coverage."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from napari_anopilad.method.triage import order_cells_by_triage
from napari_anopilad.training.evaluate import (
    EvaluationRun,
    evaluate_runs,
    triage_guided_scores,
)
from napari_anopilad.training.report import TABLE_COLUMNS, results_table, write_report

GRID = (6, 6)


@pytest.fixture(scope="module")
def tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Four 6x6 slides, two with a 2x2 tumour block; AnoPILaD and triage scores that are higher on tumour."""
    generator = np.random.default_rng(11)
    slides = pd.DataFrame(
        {
            "slide": ["tumour-a", "tumour-b", "normal-a", "normal-b"],
            "label": ["tumour", "tumour", "normal", "normal"],
            "rows": [GRID[0]] * 4,
            "cols": [GRID[1]] * 4,
            "patch_size_level0": [256] * 4,
            "annotation_path": [""] * 4,
        }
    )
    records = []
    for slide, label in zip(slides["slide"], slides["label"]):
        for row, col in itertools.product(range(GRID[0]), range(GRID[1])):
            tumour = label == "tumour" and 2 <= row < 4 and 2 <= col < 4
            records.append(
                {
                    "path": f"{slide}/r{row}_c{col}.png",
                    "slide": slide,
                    "row": row,
                    "col": col,
                    "label": "tumour" if tumour else "normal",
                    "lpips": 0.3 + 0.05 * generator.normal() + (0.08 if tumour else 0.0),
                    "knn_distance": 0.1 + 0.02 * generator.normal() + (0.05 if tumour else 0.0),
                }
            )
    table = pd.DataFrame(records)
    anopilad = table.drop(columns=["knn_distance"])
    triage = table.drop(columns=["lpips"])
    triage["knn_z"] = (triage["knn_distance"] - 0.1) / 0.02
    return slides, anopilad, triage


def _runs(tables) -> list[EvaluationRun]:
    _, anopilad, triage = tables
    guided = triage_guided_scores(anopilad, triage, "knn_z", budget_fraction=0.1, neighbour_radius=1)
    return [
        EvaluationRun("triage", triage, "knn_distance", (0.1, 0.02), scorer="triage:knn_distance"),
        EvaluationRun("AnoPILaD", anopilad, "lpips", (0.3, 0.05)),
        EvaluationRun("triage-guided", guided, "lpips", (0.3, 0.05), scorer="anopilad, guided"),
    ]


def test_guided_keeps_each_slides_budget(tables) -> None:
    _, anopilad, triage = tables

    guided = triage_guided_scores(anopilad, triage, "knn_z", budget_fraction=0.1, neighbour_radius=1)

    for slide, patches in triage.groupby("slide"):
        cells = patches[["row", "col"]].to_numpy()
        budget = order_cells_by_triage(cells, patches["knn_z"].to_numpy(), 0.1, include_neighbours=True)
        kept = guided[guided["slide"] == slide]
        assert {tuple(cell) for cell in budget.tolist()} == set(zip(kept["row"], kept["col"]))
        # ceil(0.1 * 36) = 4 top cells and their neighbours: at least 4 and at most 36 patches.
        assert 4 <= len(kept) < 36
    merged = guided.merge(anopilad, on=["slide", "row", "col"], suffixes=("", "_all"))
    np.testing.assert_array_equal(merged["lpips"], merged["lpips_all"])


def test_runs_match_sklearn(tables) -> None:
    slides, _, _ = tables
    runs = _runs(tables)

    evaluations = evaluate_runs(runs, slides, n_bootstrap=20)

    assert [evaluation.name for evaluation in evaluations] == ["triage", "AnoPILaD", "triage-guided"]
    for run, evaluation in zip(runs, evaluations):
        mean, std = run.calibration
        scores = run.scores
        # Patch level: every tumour patch against the normal patches of normal slides.
        normal_slides = {"normal-a", "normal-b"}
        tumour = scores[scores["label"] == "tumour"]
        normal = scores[(scores["label"] == "normal") & scores["slide"].isin(normal_slides)]
        labels = [1] * len(tumour) + [0] * len(normal)
        z = [*((tumour[run.score_name] - mean) / std), *((normal[run.score_name] - mean) / std)]
        assert evaluation.metrics["patch_auc"].value == pytest.approx(roc_auc_score(labels, z))
        assert evaluation.metrics["patch_aupr"].value == pytest.approx(average_precision_score(labels, z))
        assert evaluation.scorer == run.scorer
    assert evaluations[0].coverage == evaluations[1].coverage == 1.0
    assert evaluations[2].coverage == pytest.approx(len(runs[2].scores) / (4 * 36))


def test_side_by_side_table_layout(tables, tmp_path: Path) -> None:
    slides, _, _ = tables
    evaluations = evaluate_runs(_runs(tables), slides, n_bootstrap=20)

    table = write_report(tmp_path, evaluations, slides, {})

    assert list(table.columns) == ["Method", *(title for _, title in TABLE_COLUMNS), "Coverage"]
    assert list(table["Method"]) == ["triage", "AnoPILaD", "triage-guided"]
    assert list(table["Coverage"])[:2] == ["100.0%", "100.0%"]
    text = (tmp_path / "results.md").read_text()
    assert "| Method | Patch AUC | Patch AUPR | Slide AUC (Z_max) |" in text
    assert "| Coverage |" in text
    assert "triage: scorer triage:knn_distance, calibration statistics, 100.0% of the scored patches." in text
    per_slide = pd.read_csv(tmp_path / "per_slide.csv")
    assert sorted(set(per_slide["method"])) == ["AnoPILaD", "triage", "triage-guided"]
    guided = per_slide[per_slide["method"] == "triage-guided"].set_index("slide")["scored_patches"]
    assert (guided < 36).all()


def test_single_run_table_unchanged(tables) -> None:
    slides, anopilad, _ = tables

    evaluations = evaluate_runs(
        [EvaluationRun("bundle", anopilad, "lpips", (0.3, 0.05))], slides, n_bootstrap=20
    )

    assert list(results_table(evaluations).columns) == ["Method", *(title for _, title in TABLE_COLUMNS)]


def test_runs_reject_bad_input(tables) -> None:
    slides, anopilad, _ = tables
    run = EvaluationRun("same", anopilad, "lpips", None)
    with pytest.raises(ValueError, match="unique labels, but same repeat"):
        evaluate_runs([run, run], slides)
    with pytest.raises(ValueError, match=r"lack the columns \['knn_distance'\]"):
        evaluate_runs([EvaluationRun("x", anopilad, "knn_distance", None)], slides)
