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


def _extraction(folder: Path, data_dir: Path) -> Path:
    """An extraction folder of two slides: three real Camelyon17 tiles each, one slide with two tumour tiles."""
    from PIL import Image

    tiles = data_dir / "patches" / "camelyon17"
    normal = sorted(tiles.glob("tile_noncancer_*.png"))
    tumour = sorted(tiles.glob("tile_cancer_*.png"))
    layout = {
        "slide-t": [(tumour[0], "tumour"), (tumour[1], "tumour"), (normal[0], "normal")],
        "slide-n": [(normal[0], "normal"), (normal[1], "normal"), (normal[2], "normal")],
    }
    manifest, slides = [], []
    for slide, patches in layout.items():
        for col, (tile, label) in enumerate(patches):
            relative = f"patches/{slide}/r0_c{col}.png"
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            with Image.open(tile) as image:
                image.convert("RGB").resize((256, 256), Image.Resampling.BICUBIC).save(folder / relative)
            manifest.append(
                {
                    "path": relative,
                    "slide": slide,
                    "slide_identity": f"identity-{slide}",
                    "split": "test-in",
                    "x_level0": col * 256,
                    "y_level0": 0,
                    "width_level0": 256,
                    "height_level0": 256,
                    "row": 0,
                    "col": col,
                    "tissue_fraction": 1.0,
                    "tumour_fraction": 1.0 if label == "tumour" else 0.0,
                    "excluded_fraction": 0.0,
                    "label": label,
                    "caption": "",
                }
            )
        slides.append(
            {
                "slide": slide,
                "slide_path": f"{slide}.svs",
                "slide_identity": f"identity-{slide}",
                "split": "test-in",
                "label": "tumour" if slide == "slide-t" else "normal",
                "annotation_path": "",
                "mpp": 0.5,
                "rows": 1,
                "cols": 3,
                "patch_size_level0": 256,
                "n_patches": 3,
            }
        )
    pd.DataFrame(manifest).to_csv(folder / "manifest.csv", index=False)
    pd.DataFrame(slides).to_csv(folder / "slides.csv", index=False)
    return folder


def test_evaluate_command_triage_rows(tmp_path: Path, data_dir: Path, demo_bundle_dir: Path) -> None:
    from napari_anopilad.method.bundle import load_bundle
    from napari_anopilad.method.triage import TriageScorer
    from napari_anopilad.training.evaluate import main
    from napari_anopilad.training.manifest import load_patches

    extraction = _extraction(tmp_path / "extracted", data_dir)
    report = tmp_path / "report"
    arguments = [
        str(extraction),
        "--bundle",
        str(demo_bundle_dir),
        "--report",
        str(report),
        "--bootstrap",
        "10",
        "--batch-size",
        "6",
        "--triage",
        "--triage-budget",
        "0.3",
        "--triage-neighbours",
        "0",
    ]

    assert main(arguments) == 0

    name = demo_bundle_dir.name
    results = pd.read_csv(report / "results.csv", keep_default_na=False)
    assert list(results["Method"]) == [
        f"{name} triage (knn_distance) (demo)",
        f"{name} (demo)",
        f"{name} triage-guided (0.3 budget) (demo)",
    ]
    assert list(results["Coverage"]) == ["100.0%", "100.0%", "33.3%"]
    triage = pd.read_csv(report / "scores" / f"{name}.triage.csv", keep_default_na=False)
    expected = TriageScorer(load_bundle(demo_bundle_dir)).score(load_patches(extraction, triage["path"]))
    np.testing.assert_allclose(triage["knn_z"], expected.knn_z, rtol=1e-5)
    per_slide = pd.read_csv(report / "per_slide.csv")
    guided = per_slide[per_slide["method"] == f"{name} triage-guided (0.3 budget)"]
    # ceil(0.3 * 3) = 1 patch of each slide, the one with the highest triage z-score.
    assert list(guided["scored_patches"]) == [1, 1]

    # A rerun reuses the cached triage scores.
    before = (report / "scores" / f"{name}.triage.csv").read_text()
    assert main(arguments) == 0
    assert (report / "scores" / f"{name}.triage.csv").read_text() == before


def test_evaluate_memae_beside_anopilad(tmp_path: Path, data_dir: Path, demo_bundle_dir: Path) -> None:
    import torch

    from napari_anopilad.method.baselines.autoencoders import (
        AutoencoderConfig,
        build_network,
        default_settings,
    )
    from napari_anopilad.method.baselines.base import BaselineCalibration, save_baseline_bundle
    from napari_anopilad.method.scorers import load_any_bundle, make_scorer
    from napari_anopilad.training.evaluate import main
    from napari_anopilad.training.manifest import load_patches

    config = AutoencoderConfig(channels=(4, 8), latent_channels=8, memory_items=6)
    torch.manual_seed(0)
    calibration = BaselineCalibration(
        {"mse": 0.02, "l1": 0.1}, {"mse": 0.01, "l1": 0.05}, 10, default_settings("memae")
    )
    memae = save_baseline_bundle(
        tmp_path / "memae-run",
        "memae",
        config.to_dict(),
        {"model": build_network("memae", config).state_dict()},
        default_settings("memae"),
        calibration=calibration,
        demo=True,
    )
    extraction = _extraction(tmp_path / "extracted", data_dir)
    report = tmp_path / "report"
    common = ["--report", str(report), "--bootstrap", "10", "--batch-size", "4"]

    # A score that one of the bundles lacks stops before any patch is scored.
    with pytest.raises(SystemExit, match="--score lpips is not a score of the memae bundle"):
        main(
            [
                str(extraction),
                "--bundle",
                str(demo_bundle_dir),
                "--bundle",
                str(memae),
                "--score",
                "lpips",
                *common,
            ]
        )
    assert not (report / "scores").exists()

    # With --triage the AnoPILaD bundle gives its three rows and the MemAE bundle its one.
    arguments = [
        str(extraction),
        "--bundle",
        str(demo_bundle_dir),
        "--bundle",
        str(memae),
        "--triage",
        *common,
    ]
    assert main(arguments) == 0
    name = demo_bundle_dir.name
    results = pd.read_csv(report / "results.csv", keep_default_na=False)
    assert list(results["Method"]) == [
        f"{name} triage (knn_distance) (demo)",
        f"{name} (demo)",
        f"{name} triage-guided (0.1 budget) (demo)",
        "memae-run (memae, mse) (demo)",
    ]

    # The MemAE scores are the scorer's own on the same patches, and the patch AUC is scikit-learn's on
    # the calibrated z-scores of normal patches of normal slides against tumour patches.
    scores = pd.read_csv(report / "scores" / "memae-run.csv", keep_default_na=False)
    scorer = make_scorer(load_any_bundle(memae), "cpu")
    keys = [
        ("identity-" + slide, int(row), int(col))
        for slide, row, col in scores[["slide", "row", "col"]].itertuples(index=False)
    ]
    direct = scorer.score(load_patches(extraction, scores["path"]), keys)
    np.testing.assert_allclose(scores["mse"], direct.values("mse"), rtol=1e-5)
    np.testing.assert_allclose(scores["l1"], direct.values("l1"), rtol=1e-5)
    used = scores[(scores["label"] == "tumour") | (scores["slide"] == "slide-n")]
    z = (used["mse"] - 0.02) / 0.01
    expected_auc = roc_auc_score(used["label"] == "tumour", z)
    assert float(str(results.iloc[3]["Patch AUC"]).split(" ")[0]) == pytest.approx(expected_auc, abs=5e-4)


def _tiny_memae(folder: Path, seed: int) -> Path:
    """A MemAE bundle with tiny random weights and calibration statistics, saved in ``folder``."""
    import torch

    from napari_anopilad.method.baselines.autoencoders import (
        AutoencoderConfig,
        build_network,
        default_settings,
    )
    from napari_anopilad.method.baselines.base import BaselineCalibration, save_baseline_bundle

    config = AutoencoderConfig(channels=(4, 8), latent_channels=8, memory_items=6)
    torch.manual_seed(seed)
    calibration = BaselineCalibration(
        {"mse": 0.02, "l1": 0.1}, {"mse": 0.01, "l1": 0.05}, 10, default_settings("memae")
    )
    return save_baseline_bundle(
        folder,
        "memae",
        config.to_dict(),
        {"model": build_network("memae", config).state_dict()},
        default_settings("memae"),
        calibration=calibration,
        demo=True,
    )


def test_bundle_labels_name_the_run_folder(tmp_path: Path) -> None:
    from napari_anopilad.training.evaluate import bundle_labels

    assert bundle_labels([tmp_path / "runs" / "memae" / "bundle", tmp_path / "runs" / "ae" / "bundle"]) == [
        "memae",
        "ae",
    ]
    assert bundle_labels([tmp_path / "lora-step-400"]) == ["lora-step-400"]
    assert bundle_labels([tmp_path / "my run (v2)"]) == ["my_run_v2"]
    assert bundle_labels([Path("/bundle")]) == ["bundle"]


def test_clashing_labels_ignore_order(tmp_path: Path) -> None:
    from napari_anopilad.training.evaluate import bundle_labels

    first = tmp_path / "a" / "memae" / "bundle"
    second = tmp_path / "b" / "memae" / "bundle"
    other = tmp_path / "anopilad"

    labels = bundle_labels([first, other, second])

    assert labels[1] == "anopilad"
    assert labels[0] != labels[2]
    for label in (labels[0], labels[2]):
        assert label.startswith("memae-")
        assert len(label) == len("memae-") + 8
    assert bundle_labels([second, other, first]) == [labels[2], "anopilad", labels[0]]
    # Labels that differ only in case or in unsafe characters would share a file name, so they clash too.
    clashing = bundle_labels([tmp_path / "Run A", tmp_path / "run_a"])
    assert clashing[0] != clashing[1]
    assert all(label.casefold().startswith("run_a-") for label in clashing)


def test_bundle_labels_reject_repeated_folder(tmp_path: Path) -> None:
    from napari_anopilad.training.evaluate import bundle_labels

    with pytest.raises(ValueError, match="is given twice"):
        bundle_labels([tmp_path / "memae", tmp_path / "x" / ".." / "memae"])


def test_heatmap_names_are_safe(tables, tmp_path: Path) -> None:
    slides, anopilad, _ = tables
    runs = [
        EvaluationRun("memae (memae, mse)", anopilad, "lpips", (0.3, 0.05)),
        EvaluationRun("memae [memae, mse]", anopilad, "lpips", (0.3, 0.05)),
        EvaluationRun("demo triage-guided (0.1 budget)", anopilad, "lpips", (0.3, 0.05)),
    ]

    write_report(tmp_path, evaluate_runs(runs, slides, n_bootstrap=5), slides, {})

    names = sorted(path.name for path in (tmp_path / "heatmaps").iterdir())
    assert names == sorted(
        f"{stem}_{slide}.png"
        for stem in ("memae_memae_mse", "memae_memae_mse-2", "demo_triage-guided_0.1_budget")
        for slide in slides["slide"]
    )


def test_evaluate_command_labels_and_caches(tmp_path: Path, data_dir: Path) -> None:
    import re

    from napari_anopilad.training.evaluate import bundle_labels, main

    bundles = [
        _tiny_memae(tmp_path / "a" / "memae" / "bundle", seed=0),
        _tiny_memae(tmp_path / "b" / "memae" / "bundle", seed=1),
        _tiny_memae(tmp_path / "memae small (v2)", seed=2),
    ]
    labels = bundle_labels(bundles)
    assert labels[2] == "memae_small_v2"
    extraction = _extraction(tmp_path / "extracted", data_dir)
    report = tmp_path / "report"
    common = [str(extraction), "--report", str(report), "--bootstrap", "10", "--batch-size", "4"]

    assert main([*common, *(f"--bundle={bundle}" for bundle in bundles)]) == 0

    results = pd.read_csv(report / "results.csv", keep_default_na=False)
    assert list(results["Method"]) == [f"{label} (memae, mse) (demo)" for label in labels]
    caches = sorted(path.name for path in (report / "scores").glob("*.csv"))
    assert caches == sorted(f"{label}.csv" for label in labels)
    heatmaps = [path.name for path in (report / "heatmaps").iterdir()]
    assert len(heatmaps) == 3 * 2
    for name in heatmaps:
        assert re.fullmatch(r"[A-Za-z0-9._-]+\.png", name), name

    # In the reverse order each bundle keeps its label, so its cached scores are reused, not rewritten.
    written = {name: (report / "scores" / name).stat().st_mtime_ns for name in caches}
    assert main([*common, *(f"--bundle={bundle}" for bundle in reversed(bundles))]) == 0
    results = pd.read_csv(report / "results.csv", keep_default_na=False)
    assert list(results["Method"]) == [f"{label} (memae, mse) (demo)" for label in reversed(labels)]
    assert {name: (report / "scores" / name).stat().st_mtime_ns for name in caches} == written
