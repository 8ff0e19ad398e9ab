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

* time per slice change (``--part slices``): a large CT (600 x 512 x 512 int16 by
  default, 0.8 x 0.7 x 0.7 mm), one wheel step in a plane view (``OrthoViewsWidget.scroll_slices``,
  what a wheel notch does) until the repaints it caused are done, per plane, for three designs
  in the same run: a plain napari viewer scrolling the same volume in its one 2D canvas (the
  baseline: what napari itself costs on this machine), the Four-Up layout with napari's own
  re-slicing and a 3D repaint at every step ("before"), and the Four-Up layout as shipped
  ("after": only changed slices re-sliced, the 3D view repainted once the scrolling pauses;
  the time that held-back repaint blocks the window is reported beside). The 3D view's bone
  surface is the triangle mesh the layout ships (``main_window.bone_mesh``); a fourth design
  ("after-iso") is "after" with the bone ray-cast from the full-resolution CT instead (napari
  iso rendering, the 3D view before the mesh), for the delayed 3D redraw's before / after.

Run: ``.venv/bin/python benchmarks/bench_ui.py [--part all|chat|slices] [--tokens 64]
[--repeats 3] [--shape 600 512 512] [--steps 5]`` (starts its own virtual X server when DISPLAY is unset;
needs Xvfb).
"""

from __future__ import annotations

import argparse
import math
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
    parser.add_argument("--steps", type=int, default=5, help="slice changes per plane and design")
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

    from napari_tghmoe.model.placeholder import ensure_placeholder_model
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


DESIGNS = ("napari", "before", "after-iso", "after")
DESIGN_LABELS = {
    "napari": "plain napari viewer, one 2D canvas (baseline)",
    "before": "Four-Up, napari's slicing + 3D repaint at every step (before)",
    "after-iso": "Four-Up as after, bone ray-cast from the full CT (iso, the previous 3D view)",
    "after": "Four-Up, re-slice only changed slices + 3D repaint after a pause, bone mesh (after)",
}
#: Longest wait for a held-back 3D repaint after a burst of steps; none within it: none was needed
#: (a coronal or sagittal step leaves the 3D view's axial plane where it is).
CATCH_UP_WAIT_S = 3.0


def _add_iso_bone(viewer, ct_layer):
    """The bone surface as the 3D view drew it before the mesh: napari iso rendering of the full
    CT (a 3D-only image layer sharing the CT's data)."""
    from napari_tghmoe._widgets.ortho_views import VIEW_3D_ONLY_KEY
    from napari_tghmoe.layers import BONE_ISO_THRESHOLD_HU

    return viewer.add_image(
        ct_layer.data, name=f"{ct_layer.name} (bone iso)", scale=ct_layer.scale, translate=ct_layer.translate,
        units=ct_layer.units, contrast_limits=(-500.0, 1300.0), colormap="bone", rendering="iso",
        iso_threshold=BONE_ISO_THRESHOLD_HU, blending="translucent", metadata={VIEW_3D_ONLY_KEY: True},
    )


def _forced_3d_repaint(qt_viewer, draws) -> float:
    """Seconds one 3D repaint blocks the window, asked for directly (whatever the steps did)."""
    from qtpy.QtWidgets import QApplication

    from napari_tghmoe._widgets._napari_private import qt_viewer_canvas_widget

    n_draws = len(draws)
    qt_viewer_canvas_widget(qt_viewer).update()
    t0 = time.perf_counter()
    deadline = t0 + 60.0
    while len(draws) == n_draws and time.perf_counter() < deadline:
        QApplication.processEvents()
    return time.perf_counter() - t0 if len(draws) > n_draws else float("nan")
PLANE_ORDER = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}


def _settle(seconds: float = 0.6) -> None:
    """Run the event loop until nothing has been painted for a while (held 3D repaints included)."""
    _pump(seconds)


def _timed_step(step_once) -> float:
    """Seconds from a slice change until its repaints are done (two passes of the event loop)."""
    from qtpy.QtWidgets import QApplication

    t0 = time.perf_counter()
    step_once()
    QApplication.processEvents()  # slicing, texture upload, and the repaint of every canvas
    QApplication.processEvents()
    return time.perf_counter() - t0


def _slice_change_times(volume, steps: int, design: str) -> dict[str, object]:
    """Per plane: seconds per wheel step; for the Four-Up designs also the 3D view's catch-up.

    ``napari``: a plain ``napari.Viewer`` showing the volume in its one 2D canvas, scrolled
    with ``dims.set_current_step`` (what its slider does): the floor this machine allows.
    ``before`` / ``after``: the reading layout (Four-Up), one wheel step in a plane view
    (``OrthoViewsWidget.scroll_slices``) with the two slice-step changes switched off / on.
    """
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_tghmoe._widgets._napari_private import main_qt_window, main_qt_viewer, scene_canvas
    from napari_tghmoe._widgets.layout import FOUR_UP
    from napari_tghmoe._widgets.main_window import setup_viewer, show_plane_at_cursor
    from napari_tghmoe.layers import ct_layer_kwargs

    viewer = napari.Viewer(show=True)
    main_qt_window(viewer).resize(1600, 1000)
    result: dict[str, object] = {"steps": {}, "catch_up": {}, "forced": {}, "held": 0}
    if design == "napari":
        volume_only = ("rendering", "attenuation", "iso_threshold")
        kwargs = {k: v for k, v in ct_layer_kwargs(volume).items() if k not in volume_only}
        viewer.add_image(volume.hu, **kwargs)
        _settle(1.0)
        for plane, order in PLANE_ORDER.items():
            viewer.dims.order = order
            axis = order[0]
            viewer.dims.set_current_step(axis, volume.shape[axis] // 2 + 1)  # warm-up
            _settle(0.3)
            times = []
            for step in range(steps):
                target = volume.shape[axis] // 2 + (0 if step % 2 == 0 else 1)
                times.append(_timed_step(lambda: viewer.dims.set_current_step(axis, target)))
                _pump(0.03)
            result["steps"][plane] = times
        viewer.close()
        return result

    iso = design == "after-iso"
    settings = Path(tempfile.mkdtemp()) / "s.json"
    workspace = setup_viewer(viewer, volume, layout=FOUR_UP, settings_file=settings, bone_surface=not iso)
    if iso:
        show_plane_at_cursor(viewer, workspace.ct_layer)
        _add_iso_bone(viewer, workspace.ct_layer)
    else:
        t0 = time.perf_counter()
        workspace.bone_surface.wait()
        mesh = workspace.bone_surface.mesh
        waited = time.perf_counter() - t0
        result["mesh"] = (workspace.bone_surface.seconds, waited, mesh.factors, mesh.n_triangles)
    ortho, layout = workspace.ortho_views, workspace.layout
    ortho.set_skip_unchanged_slices(design != "before")
    layout.set_defer_3d_repaint(design != "before")
    draws: list[float] = []
    scene_canvas(main_qt_viewer(viewer)).events.draw.connect(
        lambda _e: draws.append(time.perf_counter())
    )
    _settle(2.0)
    for plane in PLANE_ORDER:
        ortho.scroll_slices(plane, 1)  # warm-up (first texture upload of this plane)
        _settle(0.6)
        times = []
        for step in range(steps):
            times.append(_timed_step(lambda: ortho.scroll_slices(plane, 1 if step % 2 == 0 else -1)))
            _pump(0.03)
        result["steps"][plane] = times
        if design != "before":
            # the pause after the burst: how long the one held-back 3D repaint blocks the window
            n_draws, blocked, deadline = len(draws), 0.0, time.perf_counter() + CATCH_UP_WAIT_S
            while len(draws) == n_draws and time.perf_counter() < deadline:
                t0 = time.perf_counter()
                QApplication.processEvents()
                if len(draws) > n_draws:
                    blocked = time.perf_counter() - t0
                time.sleep(0.001)
            result["catch_up"][plane] = blocked if len(draws) > n_draws else None  # None: not needed
            _settle(0.3)
            result["forced"][plane] = _forced_3d_repaint(main_qt_viewer(viewer), draws)
    if layout.repaint_3d is not None:
        result["held"] = layout.repaint_3d.held_paints
    result["slicing"] = ortho.slicing_counts()
    viewer.close()
    return result


def _run_slices(args) -> int:
    shape = tuple(args.shape)
    volume = large_ct(shape)
    load_before = os.getloadavg()
    results = {design: _slice_change_times(volume, args.steps, design) for design in DESIGNS}
    load_after = os.getloadavg()
    label = " x ".join(str(n) for n in shape)
    print(f"time per slice change, {label} int16 CT, {args.steps} steps per plane, until the changed "
          f"canvases repainted (Xvfb, Mesa llvmpipe software OpenGL, {os.cpu_count()} CPU cores; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after)")
    print()
    print("| design | plane | median (ms) | p90 (ms) | max (ms) | median vs plain napari |")
    print("|---|---|---:|---:|---:|---:|")
    base = {p: statistics.median(t) for p, t in results["napari"]["steps"].items()}
    for design in DESIGNS:
        for plane, values in results[design]["steps"].items():
            ms = sorted(v * 1000 for v in values)
            median = statistics.median(ms)
            p90 = ms[max(0, math.ceil(0.9 * len(ms)) - 1)]
            print(f"| {DESIGN_LABELS[design]} | {plane} | {median:.1f} | {p90:.1f} | "
                  f"{ms[-1]:.1f} | {median / (base[plane] * 1000):.2f}x |")
    print()
    print("| delayed 3D redraw after a burst of steps | plane | held-back repaint, window blocked (ms) "
          "| one 3D repaint asked for (ms) |")
    print("|---|---|---:|---:|")
    for design in ("after-iso", "after"):
        for plane, seconds in results[design]["catch_up"].items():
            held = "none needed" if seconds is None else f"{seconds * 1000:.1f}"
            forced = results[design]["forced"][plane] * 1000
            print(f"| {DESIGN_LABELS[design]} | {plane} | {held} | {forced:.1f} |")
    for design in ("before", "after"):
        if "mesh" in results[design]:
            worker_s, waited_s, factors, triangles = results[design]["mesh"]
            blocks = "x".join(map(str, factors))
            print(f"\nbone mesh ({design}): {triangles} triangles from a {blocks} block-mean copy, "
                  f"{worker_s:.2f} s in the worker ({waited_s:.2f} s waited after setup_viewer)")
    print(f"\n3D paints held back during the steps: {results['after']['held']}; "
          f"(re-sliced, skipped) cursor moves per viewer: {results['after']['slicing']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
