"""Responsiveness of a real napari viewer while the analysis dock runs: event-loop stalls and pan latency.

A napari window shows the sample slide with the "Anomaly analysis" dock. A precise ``QTimer`` fires every
``--timer-ms`` milliseconds and records the gap between its calls: a gap much longer than the interval is
a stall of the Qt event loop, the time in which the window cannot react. The same measurement runs twice
in one process, first with the viewer idle (the baseline: Xvfb's software OpenGL and napari's own work),
then while the dock analyses the region in view.

During the analysis the camera pans to a part of the slide with no scores, and the script records the time
from the pan to the first heatmap cell there (the dock re-queues the patches in view after a pan).

Run it under a display, for example ``xvfb-run -a``::

    xvfb-run -a python benchmarks/viewer_responsiveness.py --threads 1

It prints a markdown table and writes it, with the raw figures as JSON, to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS_DIR = Path(__file__).parent / "results"
SAMPLE_SLIDE = (
    Path(__file__).resolve().parents[1] / "src" / "napari_anopilad" / "data" / "CMU-1-Small-Region.svs"
)
# Level-0 centre (y, x) of the first view: tissue in the middle of the CMU sample slide.
FIRST_VIEW_CENTRE_LEVEL0 = (5 * 256.0, 5 * 256.0)
POLL_MS = 10
# The watchdog samples the GUI thread's stack when the stall timer is this late, in seconds.
STALL_SAMPLE_S = 0.1
STACK_DEPTH = 6


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", type=Path, default=None, help="bundle folder (default: a new demo bundle)"
    )
    parser.add_argument("--slide", type=Path, default=SAMPLE_SLIDE, help="slide file (default: CMU sample)")
    parser.add_argument("--device", default="cpu", help="device chosen in the dock (default cpu)")
    parser.add_argument("--batch-size", type=int, default=4, help="batch size set in the dock (default 4)")
    parser.add_argument(
        "--start-timestep", type=int, default=None, help="start timestep set in the dock (default: bundle's)"
    )
    parser.add_argument("--view-patches", type=float, default=2.0, help="patches across the view (default 2)")
    parser.add_argument(
        "--timer-ms", type=int, default=10, help="interval of the stall timer in ms (default 10)"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=5.0, help="length of the idle baseline (default 5)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each phase")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--label", default=None, help="name of the result files (default: from the device)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and markdown")
    arguments = parser.parse_args(argv)
    if arguments.batch_size < 1:
        parser.error(f"--batch-size {arguments.batch_size} is invalid: use 1 or more")
    if arguments.timer_ms < 1:
        parser.error(f"--timer-ms {arguments.timer_ms} is invalid: use 1 or more")
    if not arguments.slide.is_file():
        parser.error(f"--slide {arguments.slide}: file not found")
    return arguments


class StallMeter:
    """Records the gaps between calls of a precise Qt timer, in seconds, and where the GUI thread was.

    A watchdog thread samples the GUI thread's Python stack whenever the timer is late by more than
    ``STALL_SAMPLE_S``. A stack that ends in the event loop means the GUI thread was waiting in Qt's C++
    code or for the GIL held by another thread. Any other stack names the GUI-thread code that ran too long.
    """

    def __init__(self, interval_ms: int) -> None:
        from qtpy.QtCore import Qt, QTimer

        self.interval_ms = interval_ms
        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.gaps: list[float] = []
        self.gap_ends: list[float] = []
        self.samples: list[tuple[float, str]] = []
        self.worker_samples: list[tuple[float, str]] = []
        self._last = 0.0
        self._started = 0.0
        self._gui_thread = threading.get_ident()
        self._running = threading.Event()

    def start(self) -> None:
        self.gaps = []
        self.gap_ends = []
        self.samples = []
        self.worker_samples = []
        self._started = self._last = time.perf_counter()
        self.timer.start()
        self._running.set()
        threading.Thread(target=self._watch, name="stall-watchdog", daemon=True).start()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append(now - self._last)
        self.gap_ends.append(now - self._started)
        self._last = now

    def _watch(self) -> None:
        while self._running.is_set():
            time.sleep(STALL_SAMPLE_S / 2)
            late = time.perf_counter() - self._last
            if late > STALL_SAMPLE_S:
                at = time.perf_counter() - self._started
                frames = sys._current_frames()
                frame = frames.get(self._gui_thread)
                if frame is not None:
                    self.samples.append((at, describe_stack(frame)))
                # The analysis worker's stack too: a worker that holds the GIL stalls the GUI thread.
                for ident, other in frames.items():
                    if ident in (self._gui_thread, threading.get_ident()):
                        continue
                    stack = describe_stack(other)
                    if "napari_anopilad" in stack:
                        self.worker_samples.append((at, stack))

    def longest_stalls(self, count: int = 3) -> list[dict[str, Any]]:
        """Return the ``count`` longest gaps with their end time and the GUI-thread stacks sampled in them."""
        order = np.argsort(self.gaps)[::-1][:count]
        stalls = []
        for index in order:
            end, gap = self.gap_ends[index], self.gaps[index]
            stacks = sorted({where for at, where in self.samples if end - gap <= at <= end})
            workers = sorted({where for at, where in self.worker_samples if end - gap <= at <= end})
            stalls.append(
                {
                    "gap_ms": gap * 1000,
                    "ended_at_s": end,
                    "gui_thread_stacks": stacks,
                    "worker_thread_stacks": workers,
                }
            )
        return stalls

    def stop(self, split_s: float | None = None) -> dict[str, Any]:
        """Stop the timer and return the gap figures.

        With ``split_s`` (seconds after the start), the figures of the gaps that end before it and of those
        that end after it are added under ``"before_split"`` and ``"after_split"``.
        """
        self.timer.stop()
        self._running.clear()
        # The time since the last call counts too: a stall at the very end would otherwise be missed.
        now = time.perf_counter()
        self.gaps.append(now - self._last)
        self.gap_ends.append(now - self._started)
        gaps, ends = np.array(self.gaps), np.array(self.gap_ends)
        figures = {
            "seconds": now - self._started,
            "timer_ms": self.interval_ms,
            **gap_figures(gaps),
            "longest_stalls": self.longest_stalls(),
        }
        if split_s is not None:
            figures["split_s"] = split_s
            figures["before_split"] = {"seconds": split_s, **gap_figures(gaps[ends <= split_s])}
            after = {"seconds": figures["seconds"] - split_s, **gap_figures(gaps[ends > split_s])}
            figures["after_split"] = after
        return figures


def gap_figures(gaps: np.ndarray) -> dict[str, Any]:
    """Return the number, longest, 99th percentile and median of timer gaps (seconds), and those over 100 ms."""
    if len(gaps) == 0:
        return {"calls": 0, "max_gap_ms": 0.0, "p99_gap_ms": 0.0, "median_gap_ms": 0.0, "gaps_over_100ms": 0}
    return {
        "calls": len(gaps),
        "max_gap_ms": float(gaps.max() * 1000),
        "p99_gap_ms": float(np.percentile(gaps, 99) * 1000),
        "median_gap_ms": float(np.median(gaps) * 1000),
        "gaps_over_100ms": int(np.sum(gaps > 0.1)),
    }


def describe_stack(frame: Any) -> str:
    """Describe a thread's stack, innermost first: the innermost frames and the innermost frames of this package.

    File names are shortened to the part after ``site-packages/`` or ``src/``, so no local path is recorded.
    """
    frames = traceback.extract_stack(frame)[::-1]

    def name(entry: traceback.FrameSummary) -> str:
        path = entry.filename.replace("\\", "/")
        for marker in ("site-packages/", "src/", "benchmarks/"):
            if marker in path:
                path = path.split(marker, 1)[1]
                break
        else:
            path = Path(path).name
        return f"{path}:{entry.lineno} {entry.name}"

    innermost = [name(entry) for entry in frames[:STACK_DEPTH]]
    package = [name(entry) for entry in frames if "napari_anopilad" in entry.filename][:STACK_DEPTH]
    return " <- ".join(innermost) + " || package: " + " <- ".join(package)


def run_event_loop(until: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Run the Qt event loop until ``until()`` is true; return the seconds it took.

    ``until`` is checked every 10 ms from a timer inside the loop, so the loop runs as it does for a user.
    """
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    started = time.perf_counter()
    outcome: dict[str, bool] = {"done": False}

    def check() -> None:
        if until():
            outcome["done"] = True
            loop.quit()
        elif time.perf_counter() - started > timeout_s:
            loop.quit()

    poll = QTimer()
    poll.setInterval(POLL_MS)
    poll.timeout.connect(check)
    poll.start()
    check()
    if not outcome["done"]:
        loop.exec()
    poll.stop()
    if not outcome["done"]:
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
    return time.perf_counter() - started


def far_view_centre(
    grid: Any, first_cells: np.ndarray, centre_level0: tuple[float, float]
) -> tuple[float, float]:
    """Return the level-0 centre (y, x) of the tissue cell farthest from the first view's centre."""
    size = float(grid.patch_size_level0)
    tissue = grid.tissue_cells()
    first = {(int(row), int(col)) for row, col in first_cells}
    candidates = np.array([cell for cell in tissue if (int(cell[0]), int(cell[1])) not in first])
    if len(candidates) == 0:
        raise ValueError("the slide has no tissue patch outside the first view to pan to")
    centres = (candidates + 0.5) * size
    distance = np.hypot(centres[:, 0] - centre_level0[0], centres[:, 1] - centre_level0[1])
    row, col = candidates[int(np.argmax(distance))]
    return ((row + 0.5) * size, (col + 0.5) * size)


def measure(arguments: argparse.Namespace, bundle_folder: Path) -> dict[str, Any]:
    import napari
    import torch

    from napari_anopilad.widgets.analysis import AnalysisWidget, import_model_code
    from napari_anopilad.widgets.layers import cells_in_box, viewer_camera, visible_box_level0

    # The dock does this itself before it loads a model; done first here so no import happens mid-measurement.
    import_model_code()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)

    viewer = napari.Viewer(show=True)
    try:
        slide_layer = viewer.open(str(arguments.slide), plugin="napari-anopilad")[0]
        widget = AnalysisWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Anomaly analysis")
        widget.device_choice.setCurrentText(arguments.device)
        widget.batch_size.setValue(arguments.batch_size)
        widget.set_bundle_folder(bundle_folder)
        run_event_loop(lambda: widget.loaded_bundle is not None, arguments.timeout, "the bundle to load")
        run_event_loop(lambda: widget.worker is None, arguments.timeout, "the stored results")
        if arguments.start_timestep is not None:
            # Other settings use another result store. The dock switches to it when the analysis starts,
            # inside the measurement, as it does for a user who changes a setting and presses Analyse.
            widget.start_timestep.setValue(arguments.start_timestep)

        canvas_height, canvas_width = viewer.window._qt_viewer.canvas.size
        camera = viewer_camera(viewer)
        camera.center = FIRST_VIEW_CENTRE_LEVEL0
        camera.zoom = max(canvas_height, canvas_width) / (arguments.view_patches * 256)
        slide_shape_level0 = tuple(slide_layer.level_shapes[0][:2])
        # Let napari load the tiles in view before the baseline starts.
        settle_end = time.perf_counter() + 1.0
        run_event_loop(lambda: time.perf_counter() >= settle_end, 60, "the first draw")

        # 1. Baseline: the viewer idle.
        meter = StallMeter(arguments.timer_ms)
        meter.start()
        idle_end = time.perf_counter() + arguments.idle_seconds
        run_event_loop(
            lambda: time.perf_counter() >= idle_end, arguments.idle_seconds + 60, "the idle baseline"
        )
        idle = meter.stop()

        # 2. The analysis of the region in view, with a pan once its first batch is on the heatmap.
        batch_times: list[float] = []
        analysis_started = time.perf_counter()
        meter.start()
        earlier = widget.prepared
        widget.start_analysis(whole_slide=False)
        prepared_s = run_event_loop(
            lambda: widget.prepared is not earlier, arguments.timeout, "the slide's grid"
        )
        grid = widget.prepared.grid
        first_cells = cells_in_box(
            visible_box_level0(viewer, slide_shape_level0),
            grid.patch_size_level0,
            grid.shape,
            grid.tissue_cells(),
        )

        model_loaded: list[float] = []

        def finished_count() -> int:
            # The dock names the device once the worker has loaded the model and starts the session.
            if not model_loaded and widget.device_name:
                model_loaded.append(time.perf_counter() - analysis_started)
            accumulator = widget.accumulator
            count = len(accumulator) if accumulator is not None else 0
            while len(batch_times) < count:
                batch_times.append(time.perf_counter() - analysis_started)
            return count

        first_batch_s = run_event_loop(lambda: finished_count() > 0, arguments.timeout, "the first batch")
        pan_centre = far_view_centre(grid, first_cells, FIRST_VIEW_CENTRE_LEVEL0)
        camera.center = pan_centre
        panned_at = time.perf_counter()
        pan_cells = cells_in_box(
            visible_box_level0(viewer, slide_shape_level0),
            grid.patch_size_level0,
            grid.shape,
            grid.tissue_cells(),
        )

        def pan_cell_scored() -> bool:
            finished_count()
            analysis = widget.analysis
            if analysis is None:
                return False
            return bool(np.any(np.isfinite(analysis.z_grid[pan_cells[:, 0], pan_cells[:, 1]])))

        pan_latency = run_event_loop(pan_cell_scored, arguments.timeout, "a heatmap cell after the pan")
        run_event_loop(lambda: widget.worker is None, arguments.timeout, "the analysis")
        finished_count()
        # Until the first batch, the worker reads the slide's tissue and loads the models. After it, batches
        # arrive and the view pans: the steady state of an analysis.
        analysis_stalls = meter.stop(split_s=prepared_s + first_batch_s)
        status = widget.status_label.text()
    finally:
        viewer.close()

    return {
        "idle": idle,
        "analysis": analysis_stalls,
        "first_view_cells": len(first_cells),
        "pan_view_cells": len(pan_cells),
        "pan_centre_level0": list(pan_centre),
        "seconds_to_prepared": prepared_s,
        "seconds_to_model_loaded": model_loaded[0] if model_loaded else None,
        "seconds_to_first_batch": prepared_s + first_batch_s,
        "pan_to_first_cell_seconds": pan_latency,
        "pan_after_seconds": panned_at - analysis_started,
        "patches_done": len(batch_times),
        "patch_done_seconds": batch_times,
        "final_status": status,
    }


def markdown_table(report: dict[str, Any]) -> str:
    settings = report["settings"]
    idle, analysis = report["idle"], report["analysis"]
    lines = [
        f"napari {report['napari']}, {settings['device']}, batch size {settings['batch_size']}, "
        f"{settings['view_patches']} patches across the view, stall timer every {idle['timer_ms']} ms; "
        f"slide {settings['slide']}, bundle {settings['bundle']}.",
        "",
        "| phase | seconds | timer calls | longest gap (ms) | 99th percentile gap (ms) | median gap (ms) | gaps over 100 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [("viewer idle", idle), ("analysis running", analysis)]
    if "before_split" in analysis:
        rows += [
            ("of which until the first batch", analysis["before_split"]),
            ("of which from the first batch", analysis["after_split"]),
        ]
    for name, row in rows:
        lines.append(
            f"| {name} | {row['seconds']:.1f} | {row['calls']} | {row['max_gap_ms']:.0f} | {row['p99_gap_ms']:.0f} "
            f"| {row['median_gap_ms']:.1f} | {row['gaps_over_100ms']} |"
        )
    lines += [
        "",
        f"Pan to the first new heatmap cell: **{report['pan_to_first_cell_seconds']:.1f} s** (pan after "
        f"{report['pan_after_seconds']:.1f} s, when the first batch was on the heatmap; "
        f"{report['first_view_cells']} tissue patches in the first view, {report['pan_view_cells']} after the pan). "
        f"{report['patches_done']} patches analysed in all. The slide's grid was ready after "
        f"{report['seconds_to_prepared']:.1f} s and the model loaded after {report['seconds_to_model_loaded'] or 0:.1f} s.",
    ]
    for stall in analysis["longest_stalls"][:1]:
        where = stall["gui_thread_stacks"][0] if stall["gui_thread_stacks"] else "no stack sampled"
        worker = stall["worker_thread_stacks"][0] if stall["worker_thread_stacks"] else "no stack sampled"
        lines += [
            "",
            f"Longest stall while analysing: {stall['gap_ms']:.0f} ms, ending {stall['ended_at_s']:.1f} s after "
            f"the start; the GUI thread was in: `{where[:300]}`. The analysis worker was in: `{worker[:300]}`.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    arguments = parse_arguments(argv)
    if arguments.threads and "torch" not in sys.modules:
        # The model runs in a worker thread; the variable sets its OpenMP pool too, not only this thread's.
        os.environ["OMP_NUM_THREADS"] = str(arguments.threads)
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise SystemExit("no display: run this under a display, for example `xvfb-run -a python ...`")
    import napari

    with tempfile.TemporaryDirectory() as temporary:
        # A fresh result store, so that no stored score is reused and every patch is computed.
        os.environ["NAPARI_ANOPILAD_STORE"] = str(Path(temporary) / "store")
        bundle_folder = arguments.bundle
        if bundle_folder is None:
            from napari_anopilad.method.demo import make_demo_bundle

            bundle_folder = make_demo_bundle(Path(temporary) / "demo-bundle")
        figures = measure(arguments, bundle_folder)

    import torch

    from throughput import hardware_description

    report = {
        "command": "xvfb-run -a python "
        + shlex.join(["benchmarks/viewer_responsiveness.py", *(sys.argv[1:] if argv is None else argv)]),
        "hardware": hardware_description(torch.device(arguments.device)),
        "napari": napari.__version__,
        "qt_platform": os.environ.get("QT_QPA_PLATFORM", "xcb"),
        "settings": {
            "device": arguments.device,
            "batch_size": arguments.batch_size,
            "start_timestep": arguments.start_timestep,
            "view_patches": arguments.view_patches,
            "torch_threads_requested": arguments.threads,
            "slide": arguments.slide.name,
            "bundle": "demo bundle" if arguments.bundle is None else arguments.bundle.name,
        },
        **figures,
    }
    label = arguments.label or torch.device(arguments.device).type
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / f"viewer-responsiveness-{label}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    (arguments.out / f"viewer-responsiveness-{label}.md").write_text(f"`{report['command']}`\n\n{table}")
    print(table)
    return report


if __name__ == "__main__":
    main()
