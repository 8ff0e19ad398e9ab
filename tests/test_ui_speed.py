"""Issue 18: a slice step in a plane view costs only what changed (no timing asserts here).

What made each wheel step take seconds on a large CT, and what is asserted instead of a time:

* napari re-sliced the main viewer's 3D layers on every cursor move (an int16 -> float32 copy
  and a texture upload of the whole volume per layer), although in 3D no cursor move changes
  a layer's slice; each plane view re-sliced when the cursor moved within its plane. Asserted:
  a step sets no new data on the 3D view's layers, nor on the planes whose slice stayed.
* the 3D view ray-cast the bone surface again at every step. Asserted: while the user scrolls,
  the 3D canvas renders nothing; after the pause it renders once, showing the latest state.

Real Qt events under Xvfb (pytest-xvfb); small volumes; counts of events and renders.
"""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import QPoint, QPointF, Qt
from qtpy.QtWidgets import QApplication

from napari_tghmoe._widgets.layout import REPAINT_3D_AFTER_MS
from napari_tghmoe.io import CTVolume


def _ct(shape=(20, 48, 64), spacing=(3.0, 1.0, 1.0)) -> CTVolume:
    """Soft tissue in air with a bone rod; every voxel's HU differs (so a readout names its voxel)."""
    z, y, x = shape
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[2 : z - 2, y // 6 : y - y // 6, x // 8 : x - x // 8] = 40
    hu[:, y // 2 - 3 : y // 2 + 3, x // 2 - 3 : x // 2 + 3] = 700
    hu += (np.arange(hu.size, dtype=np.int64) % 7).reshape(shape).astype(np.int16)
    return CTVolume(hu=hu, spacing=spacing, origin=(0.0, 0.0, 0.0), description="Speed CT", window=(40.0, 400.0))


@pytest.fixture
def open_workspace(make_napari_viewer, tmp_path, monkeypatch):
    """A factory (not the workspace: a fixture value would outlive napari's leak check)."""
    monkeypatch.setenv("TGHMOE_USER_DIR", str(tmp_path / "user"))

    def _open():
        from napari_tghmoe._widgets._napari_private import main_qt_window
        from napari_tghmoe._widgets.layout import FOUR_UP
        from napari_tghmoe._widgets.main_window import setup_viewer

        viewer = make_napari_viewer(show=True)
        main_qt_window(viewer).resize(1400, 900)
        space = setup_viewer(viewer, _ct(), layout=FOUR_UP, settings_file=tmp_path / "settings.json")
        assert space.bone_surface.wait() is not None  # the bone mesh is built in a worker
        for _ in range(3):
            QApplication.processEvents()
        return space

    return _open


def _wheel(widget, notches: int) -> None:
    """One real wheel event on a canvas, as a mouse wheel notch sends it."""
    from qtpy.QtGui import QWheelEvent

    pos = QPointF(widget.width() / 2, widget.height() / 2)
    event = QWheelEvent(
        pos, QPointF(widget.mapToGlobal(pos)), QPoint(0, 0), QPoint(0, 120 * notches),
        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False,
    )
    QApplication.sendEvent(widget, event)
    QApplication.processEvents()
    QApplication.processEvents()


class _Counts:
    """Counts ``set_data`` (a layer got a new slice) per layer and vispy renders per canvas."""

    def __init__(self, workspace) -> None:
        from napari_tghmoe._widgets._napari_private import main_qt_viewer, scene_canvas

        viewer, ortho = workspace.viewer, workspace.ortho_views
        self.set_data: dict[str, int] = {}
        self.renders: dict[str, int] = {}
        self._hooks = []
        for layer in viewer.layers:
            self._count(layer.events.set_data, self.set_data, f"main:{layer.name}")
        for plane, view in ortho.views.items():
            for mirror in ortho.mirrored_layers(plane):
                self._count(mirror.events.set_data, self.set_data, f"{plane}:{mirror.name}")
            self._count(scene_canvas(view.qt_viewer).events.draw, self.renders, plane)
        self._count(scene_canvas(main_qt_viewer(viewer)).events.draw, self.renders, "3D")

    def _count(self, emitter, table: dict[str, int], key: str) -> None:
        table[key] = 0

        def hook(_event=None) -> None:
            table[key] += 1

        emitter.connect(hook)
        self._hooks.append((emitter, hook))

    def reset(self) -> None:
        for table in (self.set_data, self.renders):
            for key in table:
                table[key] = 0

    def disconnect(self) -> None:
        for emitter, hook in self._hooks:
            emitter.disconnect(hook)


def _settle(qtbot, workspace) -> None:
    """Let any held-back 3D repaint happen, so a test starts from a quiet window."""
    gate = workspace.layout.repaint_3d
    qtbot.waitUntil(lambda: gate is None or not gate.holding, timeout=5000)
    for _ in range(3):
        QApplication.processEvents()


def test_axial_step_reslices_one_plane_and_repaints_3d_once_after_the_pause(open_workspace, qtbot):
    workspace = open_workspace()
    viewer, ortho, ct = workspace.viewer, workspace.ortho_views, workspace.ct_layer
    main_layers = [f"main:{layer.name}" for layer in viewer.layers]
    assert len(main_layers) == 2  # the CT (axial plane in 3D) and its bone surface
    counts = _Counts(workspace)
    _settle(qtbot, workspace)
    counts.reset()
    z_before = viewer.dims.current_step[0]
    plane_z_before = float(ct.plane.position[0])

    _wheel(ortho.views["axial"].canvas_widget, +1)

    # the cursor, and the 3D view's axial plane in the model, moved at once
    assert viewer.dims.current_step[0] == z_before + 1
    assert float(ct.plane.position[0]) == pytest.approx(plane_z_before + 1)
    # slicing: only the axial view got a new slice; the 3D layers and the other planes did not
    assert all(counts.set_data[key] == 0 for key in main_layers), counts.set_data
    assert counts.set_data[f"axial:{ct.name}"] == 1, counts.set_data
    assert counts.set_data[f"coronal:{ct.name}"] == 0 and counts.set_data[f"sagittal:{ct.name}"] == 0
    # rendering: the three planes repainted (slice, crosshairs); the 3D view waits for a pause
    assert all(counts.renders[plane] >= 1 for plane in ("axial", "coronal", "sagittal")), counts.renders
    assert counts.renders["3D"] == 0 and workspace.layout.repaint_3d.holding

    for _ in range(3):  # more steps: still no 3D render, still no re-slice of the 3D layers
        _wheel(ortho.views["axial"].canvas_widget, +1)
    assert counts.renders["3D"] == 0
    assert all(counts.set_data[key] == 0 for key in main_layers)

    qtbot.waitUntil(lambda: counts.renders["3D"] >= 1, timeout=5000)  # the pause: one render
    qtbot.wait(2 * REPAINT_3D_AFTER_MS)
    assert counts.renders["3D"] == 1
    assert not workspace.layout.repaint_3d.holding
    counts.disconnect()


def test_window_drag_in_a_plane_holds_the_3d_repaint_until_the_mouse_rests(open_workspace, qtbot):
    """A right-drag changes the CT's window at every mouse move; the planes follow live, the
    3D view (which shows the same CT as its axial plane) once the drag pauses."""
    workspace = open_workspace()
    canvas = workspace.ortho_views.views["axial"].canvas_widget
    counts = _Counts(workspace)
    _settle(qtbot, workspace)
    counts.reset()
    limits_before = tuple(workspace.ct_layer.contrast_limits)

    start = QPoint(canvas.width() // 2, canvas.height() // 2)
    qtbot.mousePress(canvas, Qt.MouseButton.RightButton, Qt.KeyboardModifier.NoModifier, start)
    for dx in (30, 60, 90, 120):
        qtbot.mouseMove(canvas, start + QPoint(dx, 0))
        qtbot.wait(15)  # napari throttles mouse moves
    assert tuple(workspace.ct_layer.contrast_limits) != limits_before  # the window changed live
    assert counts.renders["axial"] >= 1 and counts.renders["3D"] == 0
    qtbot.mouseRelease(canvas, Qt.MouseButton.RightButton, Qt.KeyboardModifier.NoModifier, start + QPoint(120, 0))
    qtbot.waitUntil(lambda: counts.renders["3D"] == 1, timeout=5000)
    counts.disconnect()


def test_hu_readout_stays_full_resolution_after_steps(open_workspace, qtbot):
    workspace = open_workspace()
    ortho, ct = workspace.ortho_views, workspace.ct_layer
    for _ in range(2):
        _wheel(ortho.views["axial"].canvas_widget, -1)
    z = workspace.viewer.dims.current_step[0]
    for index in ((z, 24, 32), (z, 10, 5), (z, 30, 40)):
        world = tuple(np.asarray(ct.translate) + np.asarray(ct.scale) * np.asarray(index))
        text = ortho.cursor_readout("axial", world)
        assert text.endswith(f"HU {int(ct.data[index])}"), text
        assert f"voxel ({index[0]}, {index[1]}, {index[2]})" in text
    _settle(qtbot, workspace)


def test_switching_the_mechanisms_off_brings_back_the_costs(open_workspace, qtbot):
    """The counts above come from the two mechanisms, not from the test's setup: switched off
    (napari's own behaviour, the benchmark's "before"), a step re-slices the 3D view's layers
    and renders the 3D view at once."""
    workspace = open_workspace()
    viewer, ortho = workspace.viewer, workspace.ortho_views
    ortho.set_skip_unchanged_slices(False)
    workspace.layout.set_defer_3d_repaint(False)
    counts = _Counts(workspace)
    _settle(qtbot, workspace)
    counts.reset()

    _wheel(ortho.views["axial"].canvas_widget, +1)
    assert all(counts.set_data[f"main:{layer.name}"] >= 1 for layer in viewer.layers), counts.set_data
    assert counts.set_data[f"coronal:{workspace.ct_layer.name}"] >= 1
    assert counts.renders["3D"] >= 1

    ortho.set_skip_unchanged_slices(True)  # and back on
    workspace.layout.set_defer_3d_repaint(True)
    counts.reset()
    _wheel(ortho.views["axial"].canvas_widget, +1)
    assert all(counts.set_data[f"main:{layer.name}"] == 0 for layer in viewer.layers)
    assert counts.renders["3D"] == 0
    _settle(qtbot, workspace)
    counts.disconnect()


def test_a_2d_main_canvas_is_not_held_back(open_workspace, qtbot):
    """In 2D the main canvas is a slice view itself: it must follow each step at once."""
    workspace = open_workspace()
    viewer, ortho = workspace.viewer, workspace.ortho_views
    viewer.dims.ndisplay = 2
    counts = _Counts(workspace)
    _settle(qtbot, workspace)
    counts.reset()
    _wheel(ortho.views["axial"].canvas_widget, +1)
    assert not workspace.layout.repaint_3d.holding
    assert counts.renders["3D"] >= 1  # the main 2D canvas repainted with the step
    counts.disconnect()


def test_slicing_follows_only_the_axes_that_are_not_displayed():
    """Headless: the stand-in for napari's re-slicing on cursor moves, on a plain ViewerModel."""
    from napari.components import ViewerModel

    from napari_tghmoe._widgets._napari_private import slice_on_hidden_axes_only

    model = ViewerModel()
    data = np.repeat(np.arange(10, dtype=np.float32)[:, None, None] * 100, 8, axis=1).repeat(8, axis=2)
    layer = model.add_image(data, contrast_limits=(0, 900))
    stand_in, restore = slice_on_hidden_axes_only(model)
    sets = []
    layer.events.set_data.connect(lambda _e: sets.append(1))

    y = 6.0 if model.dims.point[1] != 6.0 else 2.0
    model.dims.set_point(1, y)  # 2D (y, x displayed): moving within the plane needs no new slice
    assert model.dims.point[1] == y
    assert sets == [] and stand_in.skipped >= 1
    model.dims.set_point(0, 2.0)  # a new z: a new slice
    assert len(sets) == 1

    model.dims.ndisplay = 3  # every axis displayed: no cursor move changes the slice
    sets.clear()
    for z in (5.0, 6.0, 8.0):
        model.dims.set_point(0, z)
    assert sets == []

    model.dims.ndisplay = 2  # back in 2D: the slice shown is the one at the cursor (napari's rule)
    for z in (None, 6.0, 3.0):
        if z is not None:
            model.dims.set_point(0, z)
        shown = layer.thumbnail[..., 0].mean() / 255 * 900  # grey level of slice z is 100 z
        assert shown == pytest.approx(100 * round(model.dims.point[0]), abs=10)

    restore()  # napari's own behaviour again: every cursor move re-slices
    sets.clear()
    model.dims.set_point(1, 1.0 if y != 1.0 else 3.0)
    assert len(sets) >= 1


def test_the_3d_plane_moves_only_along_its_normal(open_workspace, qtbot):
    """The 3D view shows the CT's axial plane at the cursor. A coronal or sagittal step moves the
    cursor within that plane: the plane stays where it is and the 3D view draws no new frame for
    the same picture; an axial step moves it (and the 3D view draws once, after the pause)."""
    workspace = open_workspace()
    viewer, ortho, ct = workspace.viewer, workspace.ortho_views, workspace.ct_layer
    counts = _Counts(workspace)
    _settle(qtbot, workspace)
    counts.reset()
    position = tuple(float(v) for v in ct.plane.position)
    point = tuple(viewer.dims.point)

    _wheel(ortho.views["coronal"].canvas_widget, +1)
    _wheel(ortho.views["sagittal"].canvas_widget, -1)
    assert viewer.dims.point[1] != point[1] and viewer.dims.point[2] != point[2]  # the cursor moved
    assert tuple(float(v) for v in ct.plane.position) == position  # within the plane: not moved
    _settle(qtbot, workspace)
    qtbot.wait(2 * REPAINT_3D_AFTER_MS)
    assert counts.renders["3D"] == 0, counts.renders

    _wheel(ortho.views["axial"].canvas_widget, +1)  # along the normal: the plane follows
    moved = tuple(float(v) for v in ct.plane.position)
    assert moved[0] == pytest.approx(position[0] + 1)
    np.testing.assert_allclose(moved, ct.world_to_data(viewer.dims.point))
    qtbot.waitUntil(lambda: counts.renders["3D"] >= 1, timeout=5000)
    counts.disconnect()
