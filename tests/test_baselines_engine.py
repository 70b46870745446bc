"""A comparison method's bundle goes through the same engine as AnoPILaD: session, store, results, calibration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from napari_anopilad.engine.results import compute_slide_results
from napari_anopilad.engine.session import AnalysisSession
from napari_anopilad.engine.store import ResultStore, grid_description
from napari_anopilad.io.tables import read_patches_csv
from napari_anopilad.method import heatmap
from napari_anopilad.method.baselines.autoencoders import AutoencoderConfig, build_network, default_settings
from napari_anopilad.method.baselines.base import BaselineCalibration, save_baseline_bundle
from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.scorers import load_any_bundle, make_scorer, method_of, score_names
from napari_anopilad.slide import build_patch_grid, open_slide, read_patches

CONFIG = AutoencoderConfig(channels=(4, 8), latent_channels=8, memory_items=6)


def _memae_bundle(folder: Path, calibration: BaselineCalibration | None = None) -> Path:
    torch.manual_seed(0)
    network = build_network("memae", CONFIG)
    return save_baseline_bundle(
        folder,
        "memae",
        CONFIG.to_dict(),
        {"model": network.state_dict()},
        default_settings("memae"),
        calibration=calibration,
        demo=True,
    )


@pytest.fixture()
def slide_and_grid(cmu_slide_path: Path) -> Iterator[tuple[Any, Any]]:
    with open_slide(cmu_slide_path) as slide:
        yield slide, build_patch_grid(slide)


def test_session_scores_slide_with_memae(tmp_path: Path, slide_and_grid: tuple[Any, Any]) -> None:
    slide, grid = slide_and_grid
    bundle = load_any_bundle(_memae_bundle(tmp_path / "bundle"))
    assert method_of(bundle) == "memae"
    assert score_names(bundle) == ("mse", "l1")
    scorer = make_scorer(bundle, "cpu")
    cells = grid.tissue_cells()[:5]
    store = ResultStore(
        tmp_path / "store", slide.identity, bundle.identity, scorer.settings, grid_description(grid)
    )

    session = AnalysisSession(slide, grid, scorer, store, cells=cells, batch_size=2)
    batches = list(session.run())
    assert sum(len(batch.cells) for batch in batches) == 5

    # Independent path: read the same patches and score them in one call.
    direct = scorer.score(read_patches(slide, grid, cells), [(slide.identity, r, c) for r, c in cells])
    stored = store.load()
    order = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(stored.rows, stored.cols))}
    for index, (row, col) in enumerate(cells):
        for name in ("mse", "l1"):
            assert stored.scores(name)[order[(int(row), int(col))]] == pytest.approx(
                direct.values(name)[index], rel=1e-5
            )
    assert stored.keywords.shape == (5, 0)

    results = compute_slide_results(store, grid, bundle)
    assert results.score_name == "mse"
    assert results.z_source == "within-slide"
    mean, std = heatmap.within_slide_stats(results.scores)
    np.testing.assert_allclose(results.z, (results.scores - mean) / std)

    resumed = AnalysisSession(slide, grid, scorer, store, cells=cells, batch_size=2)
    assert resumed.n_reused == 5
    assert list(resumed.run()) == []


def test_calibration_only_under_its_settings(tmp_path: Path, slide_and_grid: tuple[Any, Any]) -> None:
    slide, grid = slide_and_grid
    settings = default_settings("memae")
    calibration = BaselineCalibration({"mse": 0.5, "l1": 0.6}, {"mse": 0.1, "l1": 0.2}, 20, settings)
    bundle = load_any_bundle(_memae_bundle(tmp_path / "bundle", calibration))
    scorer = make_scorer(bundle, "cpu", bundle.settings.with_overrides(score="l1"))
    assert scorer.calibration is calibration or scorer.calibration == calibration
    cells = grid.tissue_cells()[:2]
    store = ResultStore(
        tmp_path / "store", slide.identity, bundle.identity, scorer.settings, grid_description(grid)
    )
    list(AnalysisSession(slide, grid, scorer, store, cells=cells).run())
    results = compute_slide_results(store, grid, bundle)
    assert results.score_name == "l1"
    assert results.z_source == "calibration"
    np.testing.assert_allclose(results.z, (results.scores - 0.6) / 0.2)


def test_anopilad_settings_on_a_comparison_bundle_are_refused(tmp_path: Path) -> None:
    bundle = load_any_bundle(_memae_bundle(tmp_path / "bundle"))
    with pytest.raises(ValueError, match="'start_timestep' does not apply to the memae method"):
        bundle.settings.with_overrides(start_timestep=500)
    with pytest.raises(ValueError, match="score 'lpips' is invalid for memae"):
        make_scorer(bundle, "cpu", bundle.settings.with_overrides(score="lpips"))


def test_missing_weights_name_the_file(tmp_path: Path) -> None:
    folder = _memae_bundle(tmp_path / "bundle")
    (folder / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"model\.safetensors \(model\) not found"):
        load_any_bundle(folder)


def test_cohort_tasks_run_memae_bundle(tmp_path: Path, cmu_slide_path: Path) -> None:
    import json

    from napari_anopilad.engine.cohort import (
        CohortOptions,
        CohortSlide,
        finish_slide,
        prepare_slide,
        score_block,
    )

    options = CohortOptions(
        bundle=_memae_bundle(tmp_path / "bundle"),
        out=tmp_path / "out",
        device="cpu",
        max_patches=3,
        block_size=2,
    )
    plan = prepare_slide(CohortSlide(path=cmu_slide_path, name="cmu"), options)
    assert plan.status == "ok", plan.error
    blocks = [score_block(plan, block, options) for block in plan.blocks]
    assert [block.status for block in blocks] == ["ok", "ok"]
    outcome = finish_slide(plan, blocks, options)
    assert outcome.status == "ok", outcome.error
    assert outcome.n_patches == 3
    assert outcome.z_source == "within-slide"

    summary = json.loads((options.out / "cmu" / "slide.json").read_text())
    assert summary["scorer"] == "memae"
    assert summary["score"] == "mse"
    assert summary["settings"]["method"] == "memae"
    # The standard columns stay (AnoPILaD's scores empty), the method's own scores follow them.
    rows = read_patches_csv(options.out / "cmu" / "patches.csv")
    assert set(list(rows[0])[-2:]) == {"mse", "l1"}
    assert all(np.isnan(row["lpips"]) and np.isfinite(row["mse"]) for row in rows)


def test_analyze_command_runs_a_memae_bundle(tmp_path: Path, cmu_slide_path: Path, capsys: Any) -> None:
    import json

    from napari_anopilad.cli import main

    bundle = _memae_bundle(tmp_path / "bundle")
    region = ["0", "0", "1500", "1000"]
    out = tmp_path / "out"
    args = ["analyze", str(cmu_slide_path), "--bundle", str(bundle), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--region", *region, "--score", "l1", "--batch-size", "auto"]) == 0
    printed = capsys.readouterr().out
    assert "MemAE: " in printed
    summary = json.loads((out / "slide.json").read_text())
    assert summary["scorer"] == "memae"
    assert summary["score"] == "l1"
    assert summary["n_patches"] > 0

    assert main([*args, "--start-timestep", "500"]) == 2
    assert "--start-timestep does not apply to the memae method" in capsys.readouterr().err
    assert main([*args, "--score", "lpips"]) == 2
    assert "--score lpips is not a memae score: use one of mse, l1" in capsys.readouterr().err
    assert main([*args, "--triage"]) == 2
    assert "--triage needs an AnoPILaD bundle" in capsys.readouterr().err
    assert main([*args, "--compile", "default"]) == 2
    assert "--compile applies to AnoPILaD's UNet only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="compiling applies to AnoPILaD's UNet only"):
        make_scorer(load_any_bundle(bundle), "cpu", compile_mode="default")


def test_cohort_checks_settings_for_a_memae_bundle(tmp_path: Path, cmu_slide_path: Path, capsys: Any) -> None:
    from napari_anopilad.cli import main
    from napari_anopilad.engine.cohort import CohortOptions, describe_bundle

    bundle = _memae_bundle(tmp_path / "bundle")
    args = ["analyze-cohort", str(cmu_slide_path), "--bundle", str(bundle), "--out", str(tmp_path / "out")]

    # AnoPILaD's own flags stop the command before any cluster starts, named as flags.
    assert main([*args, "--start-timestep", "300", "--sampler", "plms"]) == 2
    error = capsys.readouterr().err
    assert "--sampler, --start-timestep: AnoPILaD settings" in error
    assert "memae bundle" in error
    assert not (tmp_path / "out").exists()

    assert main([*args, "--compile", "reduce-overhead"]) == 2
    assert "--compile: AnoPILaD settings" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    # --triage needs an AnoPILaD bundle, which bundle.json shows before any cluster starts.
    assert main([*args, "--triage"]) == 2
    assert "--triage needs an AnoPILaD bundle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    # A score the method lacks stops the command before any cluster starts, too.
    assert main([*args, "--score", "lpips"]) == 2
    assert "--score lpips is not a memae score: use one of mse, l1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    # float32, the only precision the comparison methods run in, is accepted; a half precision is not.
    settings = load_any_bundle(bundle).settings
    assert settings.with_overrides(precision="float32") == settings
    with pytest.raises(ValueError, match="'precision' does not apply to the memae method: it has no options"):
        settings.with_overrides(precision="bfloat16")

    # On a worker, the one-time bundle check rejects a score the method lacks as well.
    options = CohortOptions(bundle=bundle, out=tmp_path / "out", overrides={"score": "lpips"})
    with pytest.raises(ValueError, match="score 'lpips' is not a memae score: use one of mse, l1"):
        describe_bundle(options)
    described = describe_bundle(CohortOptions(bundle=bundle, out=tmp_path / "out", overrides={"score": "l1"}))
    assert described["settings"]["score"] == "l1"
    assert described["settings"]["method"] == "memae"


def test_cohort_bundle_check_finds_corrupt_weights(tmp_path: Path) -> None:
    from napari_anopilad.engine.cohort import CohortOptions, describe_bundle

    bundle = _memae_bundle(tmp_path / "bundle")
    weights = bundle / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    # The one-time check builds the scorer, so truncated weights stop the run before any slide.
    with pytest.raises(BundleError, match=r"model\.safetensors"):
        describe_bundle(CohortOptions(bundle=bundle, out=tmp_path / "out"))
