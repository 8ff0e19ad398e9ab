"""UI benchmark: does the viewer stay responsive while the model answers? How long is a report?

Opens napari (3D CT + plane views + chat and routing docks, as the demo does) and measures:

* event-loop stalls: a ``QTimer`` ticks every 5 ms and records the gaps between ticks; the
  longest gap while an answer is generated in the chat's ``thread_worker`` is compared
  with the same window idle (baseline) and with the same generation run *on the GUI
  thread* (what the worker avoids). Target: longest stall under 50 ms.
* Send -> full report: wall time from ``ChatWidget.send("Generate a radiology report.")``
  until the answer is recorded, model already loaded (warm) and including the model load
  (cold), for the demo model (``resources/demo-model``) or, when it is not bundled yet, the
  untrained placeholder model.

* time per slice change (``--part slices``): the reading layout (Four-Up) on a large CT
  (600 x 512 x 512 by default, 0.7 x 0.7 x 0.8 mm), one wheel step in a plane view
  (``OrthoViewsWidget.scroll_slices``, what a wheel notch does) until every canvas has
  repainted (the other planes' crosshairs and the 3D view's axial plane follow the cursor),
  against the demo phantom as baseline.

Run: ``.venv/bin/python benchmarks/bench_ui.py [--part all|chat|slices] [--tokens 64]
[--repeats 3] [--shape 600 512 512]`` (starts its own virtual X server when DISPLAY is unset;
needs Xvfb).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _ensure_display():
    if os.environ.get("DISPLAY"):
        return None
    from pyvirtualdisplay import Display

    display = Display(visible=False, size=(1920, 1200), color_depth=24)
    display.start()
    return display


class StallMeter:
    """Records gaps between ticks of a 5 ms QTimer: a gap >> 5 ms is the event loop blocked."""

    def __init__(self, interval_ms: int = 5):
        from qtpy.QtCore import QTimer

        self.gaps: list[float] = []
        self._last = None
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)

    def _tick(self):
        now = time.perf_counter()
        if self._last is not None:
            self.gaps.append(now - self._last)
        self._last = now

    def start(self):
        self.gaps.clear()
        self._last = None
        self.timer.start()

    def stop(self):
        self.timer.stop()
        return self.gaps

    @staticmethod
    def summary(gaps):
        gaps_ms = sorted(g * 1000 for g in gaps) or [0.0]
        return max(gaps_ms), gaps_ms[int(0.99 * (len(gaps_ms) - 1))], statistics.median(gaps_ms)


def _pump(seconds: float):
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.001)


def _wait(chat, timeout_s: float = 600.0):
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + timeout_s
    while (chat.is_busy or chat._load_worker is not None) and time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.001)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="max_new_tokens per answer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=("all", "chat", "slices"), default="all")
    parser.add_argument("--shape", type=int, nargs=3, default=(600, 512, 512), help="large CT (z y x)")
    parser.add_argument("--steps", type=int, default=20, help="slice changes per plane")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    display = _ensure_display()
    try:
        code = 0
        if args.part in ("all", "chat"):
            code = _run(args)
        if args.part in ("all", "slices"):
            code = code or _run_slices(args)
        return code
    finally:
        if display is not None:
            display.stop()


def _run(args) -> int:
    import napari

    from napari_tghmoe._placeholder_model import ensure_placeholder_model
    from napari_tghmoe._widgets.chat import REPORT_REQUEST, default_model_path
    from napari_tghmoe._widgets.main_window import dock_assistant, load_demo_volume, setup_viewer

    demo = default_model_path()
    model = demo or ensure_placeholder_model()
    model_label = "bundled demo model" if demo else "untrained placeholder model"
    volume = load_demo_volume("chest")
    viewer = napari.Viewer(show=True)
    from napari_tghmoe._widgets._napari_private import main_qt_window

    main_qt_window(viewer).resize(1600, 1000)
    setup_viewer(viewer, volume)
    tmp = Path(tempfile.mkdtemp())
    chat, routing = dock_assistant(
        viewer, transcript_path=tmp / "t.jsonl", settings_file=tmp / "s.json", model_path=model,
        device_choice="CPU", max_new_tokens=args.tokens,
    )
    _pump(2.0)
    meter = StallMeter()

    # cold: Send -> report including the model load
    t0 = time.perf_counter()
    chat.send(REPORT_REQUEST)
    _wait(chat)
    cold_s = time.perf_counter() - t0

    # idle baseline
    meter.start()
    _pump(3.0)
    idle = StallMeter.summary(meter.stop())

    # repaint floor: change one transcript line every 100 ms, no model running. Under Xvfb
    # (Mesa llvmpipe, software OpenGL) every repaint re-composites the window's GL canvases.
    item = chat.transcript_view.item(chat.transcript_view.count() - 1)
    original = item.text()
    meter.start()
    for i in range(20):
        item.setText(original + " " + "." * (i % 3))
        _pump(0.1)
    repaint = StallMeter.summary(meter.stop())
    item.setText(original)

    # warm answers in the worker, stalls measured meanwhile
    warm_times, worker_gaps, n_tokens = [], [], []
    for _ in range(args.repeats):
        meter.start()
        t0 = time.perf_counter()
        chat.send(REPORT_REQUEST)
        _wait(chat)
        warm_times.append(time.perf_counter() - t0)
        worker_gaps += meter.stop()
        n_tokens.append(chat.latest_record().answer.timings["n_tokens"])
    worker = StallMeter.summary(worker_gaps)

    # the same generation on the GUI thread (what a naive widget would do)
    blocking_gaps = []
    for _ in range(args.repeats):
        meter.start()
        _pump(0.05)
        for _item in chat.engine.answer(chat.records[max(chat.records)].volume, REPORT_REQUEST,
                                        max_new_tokens=args.tokens):
            pass
        _pump(0.05)
        blocking_gaps += meter.stop()
    blocking = StallMeter.summary(blocking_gaps)

    chat.shutdown()
    viewer.close()

    print(f"model: {model_label} ({model}), CPU, max_new_tokens {args.tokens}, "
          f"tokens generated per answer {statistics.median(n_tokens):.0f}, volume {volume.shape}")
    print()
    print("| event loop | longest stall (ms) | p99 gap (ms) | median gap (ms) | longest vs idle |")
    print("|---|---:|---:|---:|---:|")
    for name, (longest, p99, median) in (
        ("idle (baseline)", idle),
        ("one transcript line repainted every 100 ms, no model", repaint),
        ("answer in thread_worker (chat dock)", worker),
        ("same answer on the GUI thread", blocking),
    ):
        print(f"| {name} | {longest:.1f} | {p99:.1f} | {median:.1f} | {longest / idle[0]:.2f}x |")
    print()
    print("| Send -> full report | time (s) |")
    print("|---|---:|")
    print(f"| cold (model load + answer) | {cold_s:.2f} |")
    print(f"| warm, median of {args.repeats} | {statistics.median(warm_times):.2f} |")
    target = "met" if worker[0] < 50 else "NOT met"
    print(f"\ntarget: longest stall while answering < 50 ms: {target} ({worker[0]:.1f} ms)")
    return 0


def large_ct(shape: tuple[int, int, int], spacing=(0.8, 0.7, 0.7)):
    """A body-like CT of ``shape``: air, an elliptic soft-tissue trunk, a bone column, noise."""
    import numpy as np

    from napari_tghmoe.io import CTVolume

    z, y, x = shape
    yy, xx = np.ogrid[:y, :x]
    trunk = ((yy - y / 2) / (0.4 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1.0
    spine = ((yy - 0.7 * y) / (0.06 * y)) ** 2 + ((xx - x / 2) / (0.06 * x)) ** 2 <= 1.0
    plane = np.where(trunk, 40, -1000).astype(np.int16)
    plane[spine] = 700
    hu = np.empty(shape, dtype=np.int16)
    rng = np.random.default_rng(0)
    noise = rng.integers(-20, 21, size=(y, x), dtype=np.int16)
    for k in range(z):
        hu[k] = plane + np.roll(noise, k, axis=1)
    return CTVolume(hu=hu, spacing=spacing, origin=(0.0, 0.0, 0.0), description="large CT", window=(40.0, 400.0))


def _slice_change_times(volume, steps: int) -> dict[str, list[float]]:
    """Seconds per wheel step in each plane view of a Four-Up window showing ``volume``."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_tghmoe._widgets._napari_private import main_qt_window
    from napari_tghmoe._widgets.layout import FOUR_UP
    from napari_tghmoe._widgets.main_window import setup_viewer

    viewer = napari.Viewer(show=True)
    main_qt_window(viewer).resize(1600, 1000)
    workspace = setup_viewer(viewer, volume, layout=FOUR_UP, settings_file=Path(tempfile.mkdtemp()) / "s.json")
    _pump(2.0)
    ortho = workspace.ortho_views
    times: dict[str, list[float]] = {}
    for plane in ("axial", "coronal", "sagittal"):
        ortho.scroll_slices(plane, 1)  # warm-up (first texture upload of this plane)
        _pump(0.3)
        times[plane] = []
        for step in range(steps):
            t0 = time.perf_counter()
            ortho.scroll_slices(plane, 1 if step % 2 == 0 else -1)
            QApplication.processEvents()  # slicing, texture upload, and the repaint of every canvas
            QApplication.processEvents()
            times[plane].append(time.perf_counter() - t0)
            _pump(0.02)
    viewer.close()
    return times


def _run_slices(args) -> int:
    from napari_tghmoe._widgets.main_window import load_demo_volume

    baseline = load_demo_volume("chest")
    large = large_ct(tuple(args.shape))
    results = {"baseline": (baseline, _slice_change_times(baseline, args.steps))}
    results["large"] = (large, _slice_change_times(large, args.steps))
    print(f"one wheel step in a plane view of the Four-Up layout, {args.steps} steps per plane, "
          "until every canvas repainted (Xvfb, software OpenGL)")
    print()
    print("| volume (z x y x x) | plane | median (ms) | p90 (ms) | max (ms) | median vs baseline |")
    print("|---|---|---:|---:|---:|---:|")
    base_median = {p: statistics.median(t) for p, t in results["baseline"][1].items()}
    for key, (volume, times) in results.items():
        label = " x ".join(str(n) for n in volume.shape) + (" (demo phantom, baseline)" if key == "baseline" else "")
        for plane, values in times.items():
            ms = sorted(v * 1000 for v in values)
            median = statistics.median(ms)
            print(f"| {label} | {plane} | {median:.1f} | {ms[int(0.9 * (len(ms) - 1))]:.1f} | {ms[-1]:.1f} | "
                  f"{median / (base_median[plane] * 1000):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
