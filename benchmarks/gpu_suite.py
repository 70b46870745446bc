"""All GPU benchmarks in one process, sized for one call of about 8 minutes on an H200.

The steps run most important first. Each writes its figures as soon as it ends, so a run stopped at its
time limit still returns what it finished. A step that fails records its error and the next one runs.

1. ``matmul``: the device's measured bf16 matrix multiply rate (8192 x 8192 products).
2. ``throughput``: benchmarks/throughput.py at the published AnoPILaD settings (DDIM, 100-step grid,
   start 674, guidance 7.5) with the full Stable Diffusion 1.5
   UNet (random weights) in bf16: batched ``reconstruct_latents`` against diffusers'
   ``StableDiffusionImg2ImgPipeline`` patch by patch, with the UNet loop's achieved TFLOP/s from
   ``torch.utils.flop_counter`` counts, and the fewer-grid-steps table.
3. ``stage_breakdown``: benchmarks/stage_breakdown.py on the sample slide with a full-size random bundle
   (SD1.5 and CONCH ViT-B/16, UNet bf16, VAE float32), the measured memory per patch against the
   estimate of ``choose_batch_size``, and the time for 10,000 tissue patches extrapolated from it.
4. ``cuda_graphs``: the UNet call captured in a CUDA graph, at a full batch and at one patch.
5. ``batch_sweep``: patches/s of the UNet loop over batch sizes, to check the automatic batch size's cap.
6. ``prompt_encoding``: benchmarks/prompt_encoding.py with a text encoder of SD1.5's size: Compel on the
   prompt strings against the batched keyword prompt encoder.
7. ``compile``: ``torch.compile`` of the UNet (compilation time and loop speed), if time is left.

Run on the GPU machine through benchmarks/gpu_suite.sh, which installs the carried wheels first.
``--tiny`` runs every step with small models on the CPU in a minute or two, to test the code paths.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prompt_encoding
import stage_breakdown
import throughput
from napari_anopilad.engine.device import (
    choose_batch_size,
    estimate_patch_bytes,
    measure_patch_bytes,
)
from napari_anopilad.method.demo import SD15_SCHEDULER_CONFIG
from napari_anopilad.method.diffusion import patch_noise, reconstruct_latents
from sd15_bundle import make_benchmark_bundle

WHOLE_SLIDE_PATCHES = 10_000
PAPER_START_TIMESTEP = 674
PAPER_STEPS = 100
GUIDANCE_SCALE = 7.5
# Start timestep that leaves 10 steps of the 100-step grid (91, 81, ..., 1): short timed loops whose
# time per UNet call is scaled to the 68 calls that start 674 takes on that grid.
SHORT_START_TIMESTEP = 91
SHORT_LOOP_STEPS = 10
# With --tiny, 3 steps (21, 11, 1) keep the code-path check short.
TINY_START_TIMESTEP = 21
TINY_LOOP_STEPS = 3
PAPER_LOOP_STEPS = 68


class Suite:
    """Runs the steps within a time budget and keeps the report on disk up to date."""

    def __init__(self, arguments: argparse.Namespace) -> None:
        self.arguments = arguments
        self.started = time.perf_counter()
        self.device = torch.device(arguments.device)
        self.short_start = TINY_START_TIMESTEP if arguments.tiny else SHORT_START_TIMESTEP
        self.short_steps = TINY_LOOP_STEPS if arguments.tiny else SHORT_LOOP_STEPS
        self.report: dict[str, Any] = {
            "command": "bash benchmarks/gpu_suite.sh " + " ".join(sys.argv[1:]),
            "tiny": arguments.tiny,
            "hardware": throughput.hardware_description(self.device),
            "budget_s": arguments.budget_s,
            "steps": {},
        }
        arguments.out.mkdir(parents=True, exist_ok=True)

    def remaining_s(self) -> float:
        return self.arguments.budget_s - (time.perf_counter() - self.started)

    def run(self, name: str, minimum_s: float, step: Callable[[], dict[str, Any]]) -> None:
        """Run one step unless less than ``minimum_s`` of the budget is left; record its result or error."""
        if self.remaining_s() < minimum_s and not self.arguments.tiny:
            self.report["steps"][name] = {
                "skipped": f"{self.remaining_s():.0f} s left, step needs {minimum_s:.0f} s"
            }
            self.write()
            return
        print(f"== {name} ({self.remaining_s():.0f} s of the budget left)", flush=True)
        started = time.perf_counter()
        try:
            result = step()
        except Exception as error:
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {error}"}
            if self.arguments.tiny:
                self.report["steps"][name] = result
                self.write()
                raise
        result["step_seconds"] = time.perf_counter() - started
        self.report["steps"][name] = result
        self.write()

    def write(self) -> None:
        out = self.arguments.out
        (out / "gpu-suite.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        (out / "gpu-suite.md").write_text(markdown_summary(self.report))


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else throughput.RESULTS_DIR / "gpu"
    if "--tiny" in (sys.argv[1:] if argv is None else argv) and not os.environ.get("OUT"):
        # A code-path check writes nothing into the repository's results.
        default_out = Path(tempfile.gettempdir()) / "anopilad-gpu-suite-tiny"
    parser.add_argument("--out", type=Path, default=default_out, help="folder for results (default: $OUT)")
    parser.add_argument("--tiny", action="store_true", help="small models on the CPU, to test the code paths")
    parser.add_argument("--device", default=None, help="torch device (default: cuda, or cpu with --tiny)")
    parser.add_argument("--patches", type=int, default=None, help="patches in the batched runs (default 64)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for all steps (default 480)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile step")
    arguments = parser.parse_args(argv)
    arguments.device = arguments.device or ("cpu" if arguments.tiny else "cuda")
    arguments.patches = arguments.patches or (2 if arguments.tiny else 64)
    if arguments.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {arguments.device}: torch finds no CUDA GPU; use --tiny for a CPU check")
    return arguments


# -- steps ---------------------------------------------------------------------------------------


def step_matmul(suite: Suite) -> dict[str, Any]:
    dtype = torch.float32 if suite.arguments.tiny else torch.bfloat16
    rate = throughput.measure_matmul_rate(suite.device, dtype)
    suite.report["matmul_tflops"] = rate / 1e12
    return {"dtype": str(dtype), "tflops": rate / 1e12}


def throughput_argv(arguments: argparse.Namespace) -> list[str]:
    """Return the arguments of benchmarks/throughput.py for this suite run."""
    if arguments.tiny:
        argv = ["--patches", "2", "--baseline-patches", "1", "--start", str(TINY_START_TIMESTEP)]
        argv += ["--trade-off-steps", "50", "--threads", "1"]
    else:
        argv = ["--full-sd15", "--device", str(arguments.device), "--dtype", "bfloat16"]
        argv += ["--patches", str(arguments.patches), "--baseline-patches", "16"]
    return [*argv, "--out", str(arguments.out)]


def stage_breakdown_argv(arguments: argparse.Namespace, bundle_folder: Path) -> list[str]:
    """Return the arguments of benchmarks/stage_breakdown.py for this suite run."""
    argv = ["--bundle", str(bundle_folder), "--device", str(arguments.device), "--out", str(arguments.out)]
    argv += ["--label", "gpu-suite"]
    if arguments.tiny:
        argv += ["--batch-size", "2", "--start-timestep", str(TINY_START_TIMESTEP), "--threads", "1"]
    else:
        argv += ["--batch-size", str(arguments.patches), "--precision", "bfloat16"]
    return argv


def step_throughput(suite: Suite) -> dict[str, Any]:
    argv = throughput_argv(suite.arguments)
    report = throughput.main(argv)
    ours, baseline = report["sides"]
    suite.report["unet_flops_per_call"] = report["unet_flops_per_call"]
    matmul = suite.report.get("matmul_tflops")
    return {
        "argv": argv,
        "speedup": report["speedup"],
        "batched_patches_per_s": ours["patches_per_second"],
        "baseline_patches_per_s": baseline["patches_per_second"],
        "batched_unet_tflops": ours["achieved_flops"] / 1e12,
        "baseline_unet_tflops": baseline["achieved_flops"] / 1e12,
        "batched_share_of_matmul_rate": ours["achieved_flops"] / 1e12 / matmul if matmul else None,
        "unet_gflop_per_call": report["unet_flops_per_call"] / 1e9,
        "result_difference": report["result_difference"],
        "trade_off": report["trade_off"],
    }


def short_loop_inputs(
    unet: torch.nn.Module, n_patches: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    latents, keys, prompt_embeds, negative = throughput.make_inputs(
        n_patches, unet.config.cross_attention_dim, 0
    )
    noise = patch_noise(keys, 0)
    return latents.to(device), noise.to(device), prompt_embeds.to(device), negative.to(device)


def time_short_loop(
    suite: Suite, unet: torch.nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[float, torch.Tensor]:
    """Time a short guided DDIM loop (10 steps, 3 with --tiny); return the seconds per UNet call and the result."""
    throughput.synchronize(suite.device)
    started = time.perf_counter()
    result = reconstruct_latents(
        unet,
        SD15_SCHEDULER_CONFIG,
        *inputs,
        start_timestep=suite.short_start,
        num_inference_steps=PAPER_STEPS,
        guidance_scale=GUIDANCE_SCALE,
    )
    throughput.synchronize(suite.device)
    return (time.perf_counter() - started) / suite.short_steps, result


def loop_figures(suite: Suite, seconds_per_call: float, n_patches: int) -> dict[str, Any]:
    """Patches/s and TFLOP/s of a loop of 68 guided calls, from the measured seconds per call."""
    flops_per_call = suite.report.get("unet_flops_per_call")
    figures: dict[str, Any] = {
        "patches": n_patches,
        "ms_per_unet_call": seconds_per_call * 1000,
        "patches_per_s_at_68_steps": n_patches / (seconds_per_call * PAPER_LOOP_STEPS),
    }
    if flops_per_call:
        # The FLOP count is of one latent; a guided call runs 2 latents per patch.
        figures["unet_tflops"] = 2 * n_patches * flops_per_call / seconds_per_call / 1e12
    return figures


def build_unet(suite: Suite) -> torch.nn.Module:
    dtype = torch.float32 if suite.arguments.tiny else torch.bfloat16
    return throughput.build_unet(not suite.arguments.tiny, dtype, suite.device, 0)


def step_batch_sweep(suite: Suite) -> dict[str, Any]:
    unet = build_unet(suite)
    sizes = [1, 2] if suite.arguments.tiny else [8, 16, 32, 64, 128]
    rows = []
    for n_patches in sizes:
        inputs = short_loop_inputs(unet, n_patches, suite.device)
        time_short_loop(suite, unet, inputs)
        seconds_per_call, _ = time_short_loop(suite, unet, inputs)
        rows.append(loop_figures(suite, seconds_per_call, n_patches))
    return {"rows": rows}


class CUDAGraphUNet(torch.nn.Module):
    """A UNet whose call replays a CUDA graph captured for one input shape.

    Each call copies the inputs into the captured buffers, replays the graph and returns a copy of the
    output, so a caller that keeps an output (the PLMS history) is not affected by the next replay.
    """

    def __init__(
        self, unet: torch.nn.Module, sample: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.static_sample = sample.clone()
        self.static_timestep = torch.tensor(500, dtype=torch.long, device=sample.device)
        self.static_states = encoder_hidden_states.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self._call_unet()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.static_output = self._call_unet()

    def _call_unet(self) -> torch.Tensor:
        return self.unet(
            self.static_sample, self.static_timestep, encoder_hidden_states=self.static_states
        ).sample

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor]:
        if (
            sample.shape != self.static_sample.shape
            or encoder_hidden_states.shape != self.static_states.shape
        ):
            raise ValueError(
                f"the CUDA graph was captured for batch {self.static_sample.shape[0]}, got {sample.shape[0]}"
            )
        self.static_sample.copy_(sample)
        self.static_timestep.copy_(timestep)
        self.static_states.copy_(encoder_hidden_states)
        self.graph.replay()
        return (self.static_output.clone(),)


def step_cuda_graphs(suite: Suite) -> dict[str, Any]:
    if suite.device.type != "cuda":
        return {"skipped": "CUDA graphs need a CUDA device"}
    unet = build_unet(suite)
    dtype = next(unet.parameters()).dtype
    rows = []
    for n_patches in (1, suite.arguments.patches):
        inputs = short_loop_inputs(unet, n_patches, suite.device)
        time_short_loop(suite, unet, inputs)
        eager_per_call, eager_result = time_short_loop(suite, unet, inputs)
        latents, _, prompt_embeds, negative = inputs
        states = torch.cat([negative, prompt_embeds]).to(dtype)
        graphed = CUDAGraphUNet(unet, torch.cat([latents, latents]).to(dtype), states)
        time_short_loop(suite, graphed, inputs)
        graph_per_call, graph_result = time_short_loop(suite, graphed, inputs)
        rows.append(
            {
                "patches": n_patches,
                "eager": loop_figures(suite, eager_per_call, n_patches),
                "cuda_graph": loop_figures(suite, graph_per_call, n_patches),
                "speedup": eager_per_call / graph_per_call,
                "result_difference": throughput.relative_difference(
                    graph_result.float(), eager_result.float()
                ),
            }
        )
        del graphed
    return {"rows": rows}


def step_compile(suite: Suite) -> dict[str, Any]:
    unet = build_unet(suite)
    inputs = short_loop_inputs(unet, suite.arguments.patches, suite.device)
    time_short_loop(suite, unet, inputs)
    eager_per_call, eager_result = time_short_loop(suite, unet, inputs)
    # The eager backend runs the same capture and guard code without generating kernels, so the CPU
    # check of this step takes seconds instead of minutes of C++ compilation.
    compiled = torch.compile(unet, backend="eager" if suite.arguments.tiny else "inductor")
    started = time.perf_counter()
    time_short_loop(suite, compiled, inputs)
    compile_seconds = time.perf_counter() - started
    compiled_per_call, compiled_result = time_short_loop(suite, compiled, inputs)
    return {
        "compile_and_first_loop_seconds": compile_seconds,
        "eager": loop_figures(suite, eager_per_call, suite.arguments.patches),
        "compiled": loop_figures(suite, compiled_per_call, suite.arguments.patches),
        "speedup": eager_per_call / compiled_per_call,
        "result_difference": throughput.relative_difference(compiled_result.float(), eager_result.float()),
    }


def prompt_encoding_argv(arguments: argparse.Namespace) -> list[str]:
    """Return the arguments of benchmarks/prompt_encoding.py for this suite run."""
    argv = ["--device", str(arguments.device), "--out", str(arguments.out), "--label", "gpu-suite"]
    if arguments.tiny:
        return [*argv, "--prompts", "4", "--threads", "1"]
    return [*argv, "--full-clip", "--prompts", str(arguments.patches)]


def step_prompt_encoding(suite: Suite) -> dict[str, Any]:
    report = prompt_encoding.main(prompt_encoding_argv(suite.arguments))
    return {
        "rows": report["rows"],
        "speed_up_new_encoder": report["speed_up_new_encoder"],
        "max_abs_difference": report["max_abs_difference"],
    }


def step_stage_breakdown(suite: Suite) -> dict[str, Any]:
    arguments = suite.arguments
    with tempfile.TemporaryDirectory() as temporary:
        started = time.perf_counter()
        folder = make_benchmark_bundle(
            Path(temporary) / "bundle", tiny=arguments.tiny, device=str(suite.device)
        )
        bundle_seconds = time.perf_counter() - started

        argv = stage_breakdown_argv(arguments, folder)
        breakdown_arguments = stage_breakdown.parse_arguments(argv)
        breakdown_arguments.argv = argv
        bundle, scorer = stage_breakdown.load_scorer(breakdown_arguments, folder)
        report = stage_breakdown.run_breakdown(breakdown_arguments, bundle, scorer)
        stage_breakdown.write_report(breakdown_arguments, report)
        memory = memory_figures(suite, scorer)

    stages = {row["stage"]: row["seconds"] for row in report["stages"]}
    batch = breakdown_arguments.batch_size
    # In a session the reader and writer threads overlap reading and storing with the device's work.
    device_seconds = report["batch_seconds_sum"] - stages["read"] - stages["store"]
    serial_per_patch = report["batch_seconds_sum"] / batch
    overlapped_per_patch = max(device_seconds, stages["read"], stages["store"]) / batch
    return {
        "bundle_build_seconds": bundle_seconds,
        "model_load_seconds": report["model_load_seconds"],
        "batch_size": batch,
        "stages": report["stages"],
        "patches_per_s_serial": 1 / serial_per_patch,
        "patches_per_s_overlapped": 1 / overlapped_per_patch,
        "whole_slide_patches": WHOLE_SLIDE_PATCHES,
        "whole_slide_minutes_serial": WHOLE_SLIDE_PATCHES * serial_per_patch / 60,
        "whole_slide_minutes_overlapped": WHOLE_SLIDE_PATCHES * overlapped_per_patch / 60,
        "memory": memory,
    }


def memory_figures(suite: Suite, scorer: Any) -> dict[str, Any]:
    """Measure the peak memory per patch of a probe batch and compare it with the estimate."""
    settings = scorer.settings
    estimate = estimate_patch_bytes(settings)
    figures: dict[str, Any] = {"estimated_bytes_per_patch": estimate}
    if suite.device.type != "cuda":
        figures["chosen_batch_size"] = choose_batch_size(suite.device, settings)
        return figures
    from napari_anopilad.slide import build_patch_grid, open_slide, read_patches

    probe = 8
    with open_slide(stage_breakdown.SAMPLE_SLIDE) as slide:
        grid = build_patch_grid(slide)
        cells = grid.tissue_cells()[:probe]
        images = read_patches(slide, grid, cells)
        keys = [(slide.identity, int(row), int(col)) for row, col in cells]
    measured = measure_patch_bytes(lambda: scorer.score(images, keys), suite.device, probe)
    free_bytes, total_bytes = torch.cuda.mem_get_info(suite.device)
    figures.update(
        {
            "probe_batch": probe,
            "measured_bytes_per_patch": measured,
            "estimate_over_measured": estimate / measured,
            "free_bytes_after_models": free_bytes,
            "total_bytes": total_bytes,
            "batch_size_from_estimate": choose_batch_size(suite.device, settings),
            "batch_size_from_measurement": choose_batch_size(
                suite.device, settings, per_patch_bytes=measured
            ),
        }
    )
    return figures


# -- summary -------------------------------------------------------------------------------------


def markdown_summary(report: dict[str, Any]) -> str:
    hardware = report["hardware"]
    steps = report["steps"]
    lines = [
        f"`{report['command']}`",
        "",
        f"{hardware.get('gpu', hardware['processor'])}, torch {hardware['torch']}, diffusers {hardware['diffusers']}"
        f"{' (tiny models, code-path check only)' if report['tiny'] else ''}.",
        "",
    ]
    if "matmul" in steps and "tflops" in steps["matmul"]:
        lines.append(
            f"Measured matrix multiply rate ({steps['matmul']['dtype']}): {steps['matmul']['tflops']:.1f} TFLOP/s."
        )

    figures = steps.get("throughput", {})
    if "speedup" in figures:
        share = figures["batched_share_of_matmul_rate"]
        lines += [
            "",
            "| run | patches/s | UNet TFLOP/s |",
            "|---|---|---|",
            f"| reconstruct_latents, batched | {figures['batched_patches_per_s']:.2f} | {figures['batched_unet_tflops']:.1f} |",
            f"| StableDiffusionImg2ImgPipeline, per patch | {figures['baseline_patches_per_s']:.2f} "
            f"| {figures['baseline_unet_tflops']:.1f} |",
            "",
            f"Speed-up {figures['speedup']:.2f}x; the batched UNet loop reaches "
            f"{'-' if share is None else f'{100 * share:.0f}%'} of the measured matrix rate "
            f"({figures['unet_gflop_per_call']:.3g} GFLOP per UNet call at batch 1, torch's FLOP counter).",
        ]

    sweep = steps.get("batch_sweep", {}).get("rows")
    if sweep:
        lines += [
            "",
            "| patches per batch | ms per UNet call | patches/s (68 steps) | UNet TFLOP/s |",
            "|---|---|---|---|",
        ]
        for row in sweep:
            lines.append(
                f"| {row['patches']} | {row['ms_per_unet_call']:.1f} | {row['patches_per_s_at_68_steps']:.2f} "
                f"| {row.get('unet_tflops', math.nan):.1f} |"
            )

    graphs = steps.get("cuda_graphs", {}).get("rows")
    if graphs:
        lines += [
            "",
            "| patches | eager ms per call | CUDA graph ms per call | speed-up |",
            "|---|---|---|---|",
        ]
        for row in graphs:
            lines.append(
                f"| {row['patches']} | {row['eager']['ms_per_unet_call']:.1f} "
                f"| {row['cuda_graph']['ms_per_unet_call']:.1f} | {row['speedup']:.2f}x |"
            )

    breakdown = steps.get("stage_breakdown", {})
    if "stages" in breakdown:
        lines += ["", "| stage | seconds | share of the batch |", "|---|---|---|"]
        for row in breakdown["stages"]:
            share = "-" if row["fraction_of_batch"] is None else f"{100 * row['fraction_of_batch']:.1f}%"
            lines.append(f"| {row['label'].strip()} | {row['seconds']:.3f} | {share} |")
        lines += [
            "",
            f"Batch of {breakdown['batch_size']}: {breakdown['patches_per_s_serial']:.2f} patches/s with the stages "
            f"in series, {breakdown['patches_per_s_overlapped']:.2f} with reading and storing overlapped. "
            f"{WHOLE_SLIDE_PATCHES:,} tissue patches: {breakdown['whole_slide_minutes_serial']:.1f} min in series, "
            f"{breakdown['whole_slide_minutes_overlapped']:.1f} min overlapped (extrapolated; model loading "
            f"{breakdown['model_load_seconds']:.0f} s not included).",
        ]
        memory = breakdown["memory"]
        if "measured_bytes_per_patch" in memory:
            lines.append(
                f"Memory per patch: measured {memory['measured_bytes_per_patch'] / 2**20:.0f} MiB, estimated "
                f"{memory['estimated_bytes_per_patch'] / 2**20:.0f} MiB; automatic batch size "
                f"{memory['batch_size_from_estimate']} (estimate), {memory['batch_size_from_measurement']} (measured)."
            )

    prompts = steps.get("prompt_encoding", {})
    if "rows" in prompts:
        lines += ["", "| prompt encoding | ms per prompt |", "|---|---|"]
        for row in prompts["rows"]:
            lines.append(f"| {row['run']} | {1000 * row['seconds_per_prompt']:.2f} |")
        lines.append(
            f"\nSpeed-up {prompts['speed_up_new_encoder']:.1f}x for a new encoder; largest difference from "
            f"Compel {prompts['max_abs_difference']:.1e}."
        )

    compiled = steps.get("compile", {})
    if "speedup" in compiled:
        lines.append(
            f"\ntorch.compile: {compiled['speedup']:.2f}x per UNet call at {compiled['compiled']['patches']} patches "
            f"({compiled['compiled']['ms_per_unet_call']:.1f} ms against {compiled['eager']['ms_per_unet_call']:.1f} ms), "
            f"after {compiled['compile_and_first_loop_seconds']:.0f} s of compilation."
        )

    for name, figures in steps.items():
        for key in ("error", "skipped"):
            if key in figures:
                lines.append(f"\nStep {name} {key}: {figures[key]}")

    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    arguments = parse_arguments(argv)
    if arguments.tiny:
        torch.set_num_threads(1)
    suite = Suite(arguments)
    suite.report["hardware"]["python_implementation"] = platform.python_implementation()
    suite.run("matmul", 10, lambda: step_matmul(suite))
    suite.run("throughput", 120, lambda: step_throughput(suite))
    suite.run("stage_breakdown", 120, lambda: step_stage_breakdown(suite))
    suite.run("cuda_graphs", 40, lambda: step_cuda_graphs(suite))
    suite.run("batch_sweep", 40, lambda: step_batch_sweep(suite))
    suite.run("prompt_encoding", 30, lambda: step_prompt_encoding(suite))
    if not arguments.skip_compile:
        suite.run("compile", 150, lambda: step_compile(suite))
    suite.report["total_seconds"] = time.perf_counter() - suite.started
    suite.write()
    print((arguments.out / "gpu-suite.md").read_text())
    return suite.report


if __name__ == "__main__":
    main()
