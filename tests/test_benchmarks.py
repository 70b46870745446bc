"""The benchmark scripts' smallest paths, so that a broken benchmark shows in CI and not on a GPU machine.

Each test runs a script's ``main`` with tiny models and a start timestep of 21, which leaves 3 steps of
the 100-step grid (21, 11, 1). Timings are not checked; the scripts' outputs and their agreement with
independent references are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

TINY_START = "21"
TINY_STEPS = 3


def test_throughput_matches_img2img(tmp_path: Path) -> None:
    import throughput

    report = throughput.main(
        [
            "--patches",
            "2",
            "--baseline-patches",
            "1",
            "--start",
            TINY_START,
            "--trade-off-steps",
            "50",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    ours, baseline = report["sides"]
    assert ours["unet_calls_per_patch"] == baseline["unet_calls_per_patch"] == TINY_STEPS
    assert ours["unet_batch"] == 4
    assert baseline["unet_batch"] == 2
    assert ours["patches"] == 2
    assert baseline["patches"] == 1
    # The same computation as diffusers' pipeline on the patch both ran.
    assert report["result_difference"] < 1e-5
    assert [row["num_inference_steps"] for row in report["trade_off"]] == [100, 50]
    assert (tmp_path / "throughput-cpu-reduced-float32-ddim.json").is_file()
    assert (
        "| StableDiffusionImg2ImgPipeline, per patch | 1 |"
        in (tmp_path / "throughput-cpu-reduced-float32-ddim.md").read_text()
    )


def test_stage_breakdown_demo_bundle(tmp_path: Path, demo_bundle_dir: Path) -> None:
    import napari_anopilad.method.scorer as scorer_module
    import stage_breakdown
    from napari_anopilad.method.diffusion import reconstruct_latents

    report = stage_breakdown.main(
        [
            "--bundle",
            str(demo_bundle_dir),
            "--batch-size",
            "2",
            "--start-timestep",
            TINY_START,
            "--threads",
            "1",
            "--no-warm-up",
            "--label",
            "test",
            "--out",
            str(tmp_path),
        ]
    )
    seconds = {row["stage"]: row["seconds"] for row in report["stages"]}
    assert set(seconds) == set(stage_breakdown.STAGES)
    for stage in ("read", "conch", "conch_preprocess", "text_encoding", "vae_encode", "unet_loop"):
        assert seconds[stage] > 0, stage
    for stage in ("vae_decode", "lpips", "store", "tissue_mask"):
        assert seconds[stage] > 0, stage
    assert seconds["conch_preprocess"] <= seconds["conch"]

    shares = [
        row["fraction_of_batch"] for row in report["stages"] if row["stage"] in stage_breakdown.MODEL_STAGES
    ]
    outside = sum(
        row["fraction_of_batch"]
        for row in report["stages"]
        if row["stage"] in ("read", "scorer_other", "store")
    )
    assert sum(shares) + outside == pytest.approx(1.0)
    assert report["model_fraction_of_batch"] == pytest.approx(sum(shares))
    assert np.isfinite(report["lpips_mean"])
    assert report["settings"]["start_timestep"] == int(TINY_START)

    # The timers are removed again: the scorer module calls the original function.
    assert scorer_module.reconstruct_latents is reconstruct_latents
    written = json.loads((tmp_path / "stage-breakdown-test.json").read_text())
    assert written["stages"] == report["stages"]


def test_prompt_encoding_equals_compel(tmp_path: Path, demo_bundle_dir: Path) -> None:
    import prompt_encoding

    report = prompt_encoding.main(
        ["--bundle", str(demo_bundle_dir), "--prompts", "6", "--threads", "1", "--out", str(tmp_path)]
    )

    compel_row, cold_row, cached_row = report["rows"]
    # Compel encodes one sequence a call; the encoder all of them in one call; the cache none.
    assert compel_row["sequences_encoded"] == cold_row["sequences_encoded"]
    assert cold_row["sequences_encoded"] > 6
    assert compel_row["text_encoder_calls"] == compel_row["sequences_encoded"]
    assert cold_row["text_encoder_calls"] == 1
    assert cached_row["text_encoder_calls"] == 0
    assert report["max_abs_difference"] < 1e-5
    assert report["cached_equals_fresh"]
    assert "| Compel on the prompt strings |" in (tmp_path / "prompt-encoding-cpu-bundle.md").read_text()


def test_stage_cells_wrap_small_slide(cmu_slide_path: Path) -> None:
    import stage_breakdown
    from napari_anopilad.slide import build_patch_grid, open_slide

    with open_slide(cmu_slide_path) as slide:
        grid = build_patch_grid(slide)
    tissue = {(int(row), int(col)) for row, col in grid.tissue_cells()}
    # A GPU batch of 64 is larger than the sample slide's tissue.
    cells = stage_breakdown.pick_cells(grid, 64, 0)
    assert cells.shape == (64, 2)
    assert {(int(row), int(col)) for row, col in cells} == tissue
    assert len({(int(row), int(col)) for row, col in cells[: len(tissue)]}) == len(tissue)
    warm_up = stage_breakdown.pick_cells(grid, 4, 4)
    np.testing.assert_array_equal(warm_up, cells[4:8])


def test_gpu_suite_tiny(tmp_path: Path) -> None:
    import gpu_suite

    # The compile step is left out: tracing the UNet takes minutes on a 2-core CPU.
    report = gpu_suite.main(["--tiny", "--skip-compile", "--out", str(tmp_path)])
    steps = report["steps"]
    assert set(steps) == {
        "matmul",
        "throughput",
        "stage_breakdown",
        "cuda_graphs",
        "batch_sweep",
        "prompt_encoding",
    }
    for name, figures in steps.items():
        assert "error" not in figures, (name, figures.get("error"))
    assert steps["throughput"]["result_difference"] < 1e-5
    assert steps["cuda_graphs"]["skipped"] == "CUDA graphs need a CUDA device"
    assert [row["patches"] for row in steps["batch_sweep"]["rows"]] == [1, 2]
    memory = steps["stage_breakdown"]["memory"]
    assert memory["chosen_batch_size"] == 8
    assert steps["stage_breakdown"]["whole_slide_minutes_overlapped"] > 0
    summary = (tmp_path / "gpu-suite.md").read_text()
    assert "tiny models, code-path check only" in summary
    # At most 8 files come back from the GPU machine's output folder.
    assert len(list(tmp_path.iterdir())) <= 8


def test_gpu_suite_full_size_arguments(tmp_path: Path) -> None:
    # The GPU run's arguments for the other scripts, parsed here so an option typo fails on the CPU.
    import gpu_suite
    import stage_breakdown
    import throughput

    arguments = argparse.Namespace(tiny=False, device="cuda", patches=64, out=tmp_path)
    parsed = throughput.parse_arguments(gpu_suite.throughput_argv(arguments))
    assert parsed.full_sd15
    assert parsed.dtype == "bfloat16"
    assert parsed.patches == 64
    assert parsed.baseline_patches == 16
    assert parsed.out == tmp_path
    parsed = stage_breakdown.parse_arguments(gpu_suite.stage_breakdown_argv(arguments, tmp_path))
    assert parsed.batch_size == 64
    assert parsed.precision == "bfloat16"
    assert parsed.device == "cuda"
    assert parsed.bundle == tmp_path


def test_full_size_bundle_configs() -> None:
    # The GPU bundle's architectures, built without memory on the meta device. The parameter counts
    # are Stable Diffusion 1.5's published ones (UNet 859.52 M, VAE 83.65 M, CLIP ViT-L/14 text 123.06 M).
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from napari_anopilad.method.bundle import LORA_TARGET_MODULES
    from napari_anopilad.method.conch_model import build_conch, conch_image_size
    from sd15_bundle import SD15_TEXT_CONFIG, SD15_VAE_CONFIG, conch_vit_b16_config
    from throughput import SD15_UNET_CONFIG

    def count(module: torch.nn.Module) -> int:
        return sum(parameter.numel() for parameter in module.parameters())

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text_encoder) == 123_060_480
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    names = [name for name, _ in unet.named_modules()]
    for target in LORA_TARGET_MODULES:
        assert any(name.endswith(f".{target}") for name in names), target

    conch = build_conch(conch_vit_b16_config(), device="meta")
    assert conch_image_size(conch) == 448


def test_gpu_shell_scripts_parse() -> None:
    for script in ("gpu_suite.sh", "fetch_gpu_wheels.sh"):
        completed = subprocess.run(["bash", "-n", str(BENCHMARKS / script)], capture_output=True, text=True)
        assert completed.returncode == 0, completed.stderr


@pytest.mark.gui
def test_stall_meter_sees_gui_stall(qapp) -> None:
    from qtpy.QtCore import QTimer

    import viewer_responsiveness

    def block_gui_thread() -> None:
        time.sleep(0.3)

    meter = viewer_responsiveness.StallMeter(10)
    meter.start()
    QTimer.singleShot(100, block_gui_thread)
    end = time.perf_counter() + 0.8
    viewer_responsiveness.run_event_loop(lambda: time.perf_counter() >= end, 10, "the test")
    figures = meter.stop()
    assert 290 <= figures["max_gap_ms"] < 2000
    assert figures["gaps_over_100ms"] >= 1
    longest = figures["longest_stalls"][0]
    assert longest["gap_ms"] == pytest.approx(figures["max_gap_ms"])
    assert any("block_gui_thread" in stack for stack in longest["gui_thread_stacks"])


@pytest.mark.gui
@pytest.mark.slow
def test_viewer_responsiveness_demo(tmp_path: Path, demo_bundle_dir: Path) -> None:
    import viewer_responsiveness

    report = viewer_responsiveness.main(
        [
            "--bundle",
            str(demo_bundle_dir),
            "--batch-size",
            "4",
            "--start-timestep",
            TINY_START,
            "--view-patches",
            "1.5",
            "--idle-seconds",
            "1",
            "--threads",
            "1",
            "--timeout",
            "300",
            "--out",
            str(tmp_path),
        ]
    )
    assert report["idle"]["calls"] > 0
    assert report["analysis"]["calls"] > 0
    before, after = report["analysis"]["before_split"], report["analysis"]["after_split"]
    assert before["calls"] + after["calls"] == report["analysis"]["calls"]
    assert report["analysis"]["split_s"] == pytest.approx(report["seconds_to_first_batch"])
    assert max(before["max_gap_ms"], after["max_gap_ms"]) == pytest.approx(report["analysis"]["max_gap_ms"])
    assert report["first_view_cells"] >= 1
    assert report["pan_view_cells"] >= 1
    assert 0 < report["pan_to_first_cell_seconds"] < 300
    assert report["patches_done"] >= report["first_view_cells"] + 1
    assert (tmp_path / "viewer-responsiveness-cpu.md").is_file()
