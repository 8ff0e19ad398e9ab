"""The reading layout as a radiologist uses it: Four-Up, PACS mouse and keys, overlays off.

Real Qt events (wheel, drags, double-clicks, key presses) are sent to the canvases under
Xvfb; one viewer per test, small volumes.
"""

from __future__ import annotations

import numpy as np
import pytest
from napari.layers import Image
from qtpy.QtCore import QPoint, QPointF, Qt
from qtpy.QtWidgets import QApplication

from napari_tghmoe.io import CTVolume
from napari_tghmoe.layers import WINDOW_PRESETS, contrast_limits_to_window


def _ct(shape=(20, 48, 64), spacing=(3.0, 1.0, 1.0)) -> CTVolume:
    """Air around a soft-tissue block with a bone rod; thick slices (anisotropic)."""
    hu = np.full(shape, -1000, dtype=np.int16)
    z, y, x = shape
    hu[2 : z - 2, y // 6 : y - y // 6, x // 8 : x - x // 8] = 40
    hu[:, y // 2 - 3 : y // 2 + 3, x // 2 - 3 : x // 2 + 3] = 700
    return CTVolume(hu=hu, spacing=spacing, origin=(0.0, 0.0, 0.0), description="Layout CT", window=(40.0, 400.0))


@pytest.fixture
def open_workspace(make_napari_viewer, tmp_path, monkeypatch):
    """Opens the demo's reading layout on a shown 1400 x 900 window, settings in a temp folder.

    A factory, not the workspace itself: a fixture value would outlive the test and keep the
    plane views' QtViewers alive when napari checks for leaked viewers.
    """
    monkeypatch.setenv("TGHMOE_USER_DIR", str(tmp_path / "user"))
    return lambda: _open(make_napari_viewer, tmp_path)


def _open(make_napari_viewer, tmp_path):
    from napari_tghmoe._widgets._napari_private import main_qt_window
    from napari_tghmoe._widgets.main_window import setup_viewer

    viewer = make_napari_viewer(show=True)
    main_qt_window(viewer).resize(1400, 900)
    space = setup_viewer(viewer, _ct(), settings_file=tmp_path / "settings.json")
    assert space.bone_surface.wait() is not None  # the bone mesh is built in a worker
    for _ in range(3):
        QApplication.processEvents()
    return space


def _canvas(workspace, plane: str):
    return workspace.ortho_views.views[plane].canvas_widget


def _centre(widget) -> QPoint:
    return QPoint(widget.width() // 2, widget.height() // 2)


def _wheel(widget, notches: int, modifiers=Qt.KeyboardModifier.NoModifier) -> None:
    from qtpy.QtGui import QWheelEvent

    pos = QPointF(_centre(widget))
    event = QWheelEvent(
        pos, QPointF(widget.mapToGlobal(pos)), QPoint(0, 0), QPoint(0, 120 * notches),
        Qt.MouseButton.NoButton, modifiers, Qt.ScrollPhase.NoScrollPhase, False,
    )
    QApplication.sendEvent(widget, event)
    QApplication.processEvents()


def _drag(qtbot, widget, button, offset: tuple[int, int], modifiers=Qt.KeyboardModifier.NoModifier) -> None:
    start = _centre(widget)
    qtbot.mousePress(widget, button, modifiers, start)
    for fraction in (0.25, 0.5, 0.75, 1.0):
        qtbot.mouseMove(widget, start + QPoint(int(offset[0] * fraction), int(offset[1] * fraction)))
        qtbot.wait(15)  # napari throttles mouse moves (5 ms)
    qtbot.mouseRelease(widget, button, modifiers, start + QPoint(*offset))
    QApplication.processEvents()


def test_four_up_is_the_default_with_four_views_of_comparable_size(open_workspace, qtbot, tmp_path):
    workspace = open_workspace()
    from napari_tghmoe._widgets.layout import FOUR_UP, ONE_PLANE_3D, THREE_D_ONLY, VIEW_3D, remembered_layout

    layout = workspace.layout
    assert layout.current_layout == FOUR_UP
    assert sorted(layout.shown_views()) == sorted([VIEW_3D, "axial", "coronal", "sagittal"])
    sizes = {name: (widget.width(), widget.height()) for name, widget in layout.views.items()}
    areas = [w * h for w, h in sizes.values()]
    assert min(areas) > 0.6 * max(areas), sizes  # a 2x2 grid, not a big 3D view and three strips
    for width, height in sizes.values():
        assert width > 300 and height > 200, sizes
    # Slicer's placement: axial top left, 3D top right
    geometry = {name: widget.geometry() for name, widget in layout.views.items()}
    assert geometry["axial"].x() < geometry[VIEW_3D].x() and abs(geometry["axial"].y() - geometry[VIEW_3D].y()) < 5
    assert geometry["sagittal"].y() > geometry["axial"].y() and geometry["coronal"].y() > geometry[VIEW_3D].y()
    # each plane view: orientation letters and a mm scale bar
    axial = workspace.ortho_views.views["axial"]
    assert {edge: label.text() for edge, label in axial.orientation_markers.items()} == {
        "top": "A", "bottom": "P", "left": "R", "right": "L"
    }
    assert [workspace.ortho_views.views[p].orientation_markers["top"].text() for p in ("coronal", "sagittal")] == ["S", "S"]
    assert axial.viewer_model.canvas.overlays.scale_bar.visible

    # switching from the toolbar's actions (also in View > Layout), and remembering the choice
    layout.actions[ONE_PLANE_3D].trigger()
    QApplication.processEvents()
    assert sorted(layout.shown_views()) == sorted([VIEW_3D, "axial"])
    assert remembered_layout(tmp_path / "settings.json") == ONE_PLANE_3D
    assert layout.actions[ONE_PLANE_3D] in layout.layout_menu.actions()
    assert layout.layout_menu.menuAction() in _menu_actions(workspace.viewer, "View")
    layout.actions[THREE_D_ONLY].trigger()
    assert layout.shown_views() == [VIEW_3D]
    layout.set_layout(FOUR_UP)
    QApplication.processEvents()
    assert len(layout.shown_views()) == 4

    # double-click maximises a view, a second double-click restores the layout
    canvas = _canvas(workspace, "coronal")
    width_in_grid = layout.views["coronal"].width()
    qtbot.mouseDClick(canvas, Qt.MouseButton.LeftButton, pos=_centre(canvas))
    QApplication.processEvents()
    assert layout.shown_views() == ["coronal"]
    assert layout.views["coronal"].width() > 1.8 * width_in_grid  # fills the area
    qtbot.mouseDClick(canvas, Qt.MouseButton.LeftButton, pos=_centre(canvas))
    QApplication.processEvents()
    assert len(layout.shown_views()) == 4


def _menu_actions(viewer, title: str) -> list:
    from napari_tghmoe._widgets._napari_private import main_qt_window
    from napari_tghmoe._widgets.layout import _find_menu

    menu = _find_menu(main_qt_window(viewer), title)
    assert menu is not None, f"no {title} menu"
    return menu.actions()


def test_wheel_scrolls_slices_and_hover_shows_hu(open_workspace, qtbot):
    workspace = open_workspace()
    viewer, views = workspace.viewer, workspace.ortho_views.views
    axial = views["axial"].viewer_model
    before = axial.dims.current_step[0]
    zoom_before = axial.camera.zoom

    _wheel(_canvas(workspace, "axial"), +1)
    assert axial.dims.current_step[0] == before + 1
    assert viewer.dims.current_step[0] == before + 1  # the main viewer (and the 3D plane) follow
    assert axial.camera.zoom == pytest.approx(zoom_before)  # the wheel no longer zooms
    _wheel(_canvas(workspace, "axial"), -1)
    _wheel(_canvas(workspace, "axial"), -1)
    assert axial.dims.current_step[0] == before - 1

    sagittal = views["sagittal"].viewer_model
    x_before = sagittal.dims.current_step[2]
    _wheel(_canvas(workspace, "sagittal"), +1)
    assert sagittal.dims.current_step[2] == x_before + 1 and viewer.dims.current_step[2] == x_before + 1

    _wheel(_canvas(workspace, "axial"), +1, Qt.KeyboardModifier.ControlModifier)
    assert axial.camera.zoom > zoom_before
    assert axial.dims.current_step[0] == before - 1  # Ctrl+wheel zooms, does not scroll

    # hovering: position in mm, voxel and HU in the main status bar
    canvas = _canvas(workspace, "axial")
    workspace.viewer.status = "Ready"
    qtbot.mouseMove(canvas, _centre(canvas) + QPoint(3, 2))
    qtbot.waitUntil(lambda: "HU" in str(workspace.viewer.status), timeout=3000)
    status = str(workspace.viewer.status)
    assert status.startswith("axial: x ") and " mm" in status
    ortho = workspace.ortho_views
    # the value is the CT's at that voxel: the bone rod at the centre of the volume
    centre = tuple(np.asarray(workspace.ct_layer.data.shape) // 2 * np.asarray(workspace.ct_layer.scale))
    assert ortho.cursor_readout("axial", centre).endswith("HU 700")
    assert "outside" in ortho.cursor_readout("axial", (-50.0, 0.0, 0.0))




def test_right_drag_and_ctrl_drag_change_window_level_live(open_workspace, qtbot):
    workspace = open_workspace()
    ct = workspace.ct_layer
    canvas = _canvas(workspace, "axial")
    level0, width0 = contrast_limits_to_window(ct.contrast_limits)
    centre0 = tuple(workspace.ortho_views.views["axial"].viewer_model.camera.center)

    _drag(qtbot, canvas, Qt.MouseButton.RightButton, (120, 0))  # right: wider window
    level1, width1 = contrast_limits_to_window(ct.contrast_limits)
    assert width1 > width0 + 100 and level1 == pytest.approx(level0, abs=1)
    mirror = workspace.ortho_views.mirrored_layers("coronal")[0]
    np.testing.assert_allclose(mirror.contrast_limits, ct.contrast_limits)  # the other planes follow

    _drag(qtbot, canvas, Qt.MouseButton.LeftButton, (0, -90), Qt.KeyboardModifier.ControlModifier)  # up: level up
    level2, width2 = contrast_limits_to_window(ct.contrast_limits)
    assert level2 > level1 + 50 and width2 == pytest.approx(width1, abs=1)
    np.testing.assert_allclose(workspace.ortho_views.views["axial"].viewer_model.camera.center, centre0)  # no pan
    assert workspace.window_level.width_slider.value() == round(width2)  # the dock shows the new window

    _drag(qtbot, canvas, Qt.MouseButton.LeftButton, (80, 40))  # a plain left-drag pans, W/L untouched
    assert contrast_limits_to_window(ct.contrast_limits) == pytest.approx((level2, width2))


def test_keys_pick_presets_and_reset_and_help_lists_them(open_workspace, qtbot):
    workspace = open_workspace()
    from napari_tghmoe._widgets._napari_private import main_qt_window
    from napari_tghmoe._widgets.shortcuts import PRESET_KEYS, ShortcutsDialog

    window = main_qt_window(workspace.viewer)
    window.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is window, timeout=5000)
    ct, canvas = workspace.ct_layer, _canvas(workspace, "axial")
    assert list(PRESET_KEYS.values()) == list(WINDOW_PRESETS)
    for key, name in (("1", "lung"), ("5", "bone"), ("6", "brain")):
        qtbot.keyClick(canvas, key)
        np.testing.assert_allclose(ct.contrast_limits, WINDOW_PRESETS[name].contrast_limits)

    # With a segmentation selected, the number keys are napari's Labels tools, not presets.
    labels = workspace.viewer.add_labels(np.zeros(ct.data.shape, dtype=np.uint8), name="seg")
    assert workspace.viewer.layers.selection.active is labels
    assert not any(workspace.shortcuts[key].isEnabled() for key in PRESET_KEYS)
    workspace.viewer.window._qt_viewer.canvas.native.setFocus()
    qtbot.keyClick(workspace.viewer.window._qt_viewer.canvas.native, "2")
    assert labels.mode == "paint"
    np.testing.assert_allclose(ct.contrast_limits, WINDOW_PRESETS["brain"].contrast_limits)  # untouched
    workspace.viewer.layers.selection.active = ct
    assert all(workspace.shortcuts[key].isEnabled() for key in PRESET_KEYS)
    qtbot.keyClick(canvas, "1")
    np.testing.assert_allclose(ct.contrast_limits, WINDOW_PRESETS["lung"].contrast_limits)

    axial = workspace.ortho_views.views["axial"].viewer_model
    fitted_zoom = axial.camera.zoom
    axial.camera.zoom = fitted_zoom * 3
    axial.camera.center = (0.0, 5.0, 7.0)
    qtbot.keyClick(canvas, "r")
    assert axial.camera.zoom == pytest.approx(fitted_zoom, rel=1e-3)

    action = workspace.shortcuts["help_action"]
    assert action in _menu_actions(workspace.viewer, "Help")
    action.trigger()
    dialogs = [w for w in QApplication.topLevelWidgets() if isinstance(w, ShortcutsDialog) and w.isVisible()]
    from qtpy.QtWidgets import QLabel

    assert dialogs and "Right-drag" in dialogs[0].findChild(QLabel).text()
    dialogs[0].close()


def _routing_record(ct_layer, volume):
    """A finished answer with a small, real RoutingTrace (2 blocks, 3 experts)."""
    from napari_tghmoe._widgets.chat import AnswerRecord
    from napari_tghmoe.model.routing import RoutingTrace

    rng = np.random.default_rng(0)
    weights = rng.random((1, 4, 6, 8, 3)).astype(np.float32)
    trace = RoutingTrace(
        blocks=[0, 1], group_names=["shared", "report"], expert_names=["shared.0", "report.0", "report.1"],
        block_groups={0: ["shared"], 1: ["shared", "report"]},
        group_probs={0: np.array([[1.0, 0.0]]), 1: np.array([[1.0, 1.0]])},
        expert_weights={0: weights, 1: weights[..., ::-1].copy()},
        grid_thw=np.array([[4, 12, 16]]), visual_sample=np.array([0]),
        patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
    )

    class _Answer:
        routing = trace

    return AnswerRecord(1, "Generate a radiology report.", _Answer(), volume, ct_layer.name, lambda: ct_layer)


def test_overlays_start_hidden_and_showing_one_keeps_the_ct_window(open_workspace, qtbot):
    workspace = open_workspace()
    from napari_tghmoe._widgets.routing_view import RoutingView

    viewer, ct = workspace.viewer, workspace.ct_layer
    limits = tuple(ct.contrast_limits)
    routing = RoutingView(viewer)
    qtbot.addWidget(routing)
    routing.show_record(_routing_record(ct, ct.metadata["ct_volume"]))

    overlay = routing.update_overlay(create=True)  # what the demo does after its report
    assert overlay is not None and overlay.visible is False  # off until the user shows it
    controls = workspace.window_level.overlays
    (_layer, box, slider, legend, _row) = controls.rows[id(overlay)]
    assert not box.isChecked() and not slider.isEnabled()

    box.setChecked(True)  # the user shows it
    assert overlay.visible
    assert all(m.visible for m in (workspace.ortho_views.mirrored_layers(p)[-1] for p in ("axial", "sagittal")))
    slider.setValue(70)
    assert overlay.opacity == pytest.approx(0.7)
    assert workspace.ortho_views.mirrored_layers("axial")[-1].opacity == pytest.approx(0.7)
    for name in ("shared.0", "report.0", "report.1"):
        assert name in legend.text()
    assert tuple(ct.contrast_limits) == limits  # showing or fading an overlay leaves the CT alone

    viewer.layers.selection.active = overlay  # even with the overlay selected, W/L acts on the CT
    workspace.window_level.apply_preset("bone")
    np.testing.assert_allclose(ct.contrast_limits, WINDOW_PRESETS["bone"].contrast_limits)
    _drag(qtbot, _canvas(workspace, "axial"), Qt.MouseButton.RightButton, (60, 0))
    assert contrast_limits_to_window(ct.contrast_limits)[1] > WINDOW_PRESETS["bone"].width

    routing.overlay_button.click()  # "Show overlay" is the user asking: a new overlay is visible
    assert routing.overlay_layer.visible
    viewer.layers.remove(routing.overlay_layer)
    assert controls.rows == {} and controls.empty_label.isVisibleTo(controls)


def test_bone_surface_is_a_mesh_on_the_bone_shown_in_the_3d_view_only(open_workspace, qtbot):
    """The 3D view's bone is a triangle mesh (drawn in tens of ms without a GPU, not ray-cast
    through the CT): its vertices sit on the CT's bone boundary in world coordinates, it stays
    inside the CT's box, it is kept out of the plane views and hidden in 2D."""
    from napari.layers import Surface
    from scipy.ndimage import map_coordinates

    from napari_tghmoe._widgets.main_window import BONE_MESH_KEY, BONE_MESH_MAX_TRIANGLES
    from napari_tghmoe._widgets.ortho_views import VIEW_3D_ONLY_KEY
    from napari_tghmoe.layers import BONE_ISO_THRESHOLD_HU

    workspace = open_workspace()
    viewer, ct = workspace.viewer, workspace.ct_layer
    bone = workspace.bone_surface.layer
    assert isinstance(bone, Surface) and bone in viewer.layers
    assert bone.metadata[VIEW_3D_ONLY_KEY] and bone.visible
    assert [layer for layer in viewer.layers if isinstance(layer, Image)] == [ct]  # no CT copy for the bone
    assert viewer.layers.selection.active is ct  # the mesh arriving did not take the selection
    vertices, faces, _values = bone.data
    assert 0 < len(faces) <= BONE_MESH_MAX_TRIANGLES

    # on the bone: each vertex, taken to world coordinates and back into the CT's voxels, is where
    # the CT crosses the threshold (this CT's 1 mm voxels need no block mean: factors 1, exact)
    assert bone.metadata[BONE_MESH_KEY] == (1, 1, 1)
    rng = np.random.default_rng(0)
    picked = vertices[rng.choice(len(vertices), size=min(60, len(vertices)), replace=False)]
    world = np.array([bone.data_to_world(v) for v in picked])
    voxels = np.array([ct.world_to_data(w) for w in world])
    hu = map_coordinates(np.asarray(ct.data, dtype=float), voxels.T, order=1)
    np.testing.assert_allclose(hu, BONE_ISO_THRESHOLD_HU, atol=1.0)
    # and the bone it outlines is the rod (700 HU in voxels y 21-26, x 29-34), within a voxel of its faces
    assert np.all((voxels[:, 1] > 20) & (voxels[:, 1] < 27))
    assert np.all((voxels[:, 2] > 28) & (voxels[:, 2] < 35))

    # inside the CT's box in world coordinates
    shape = np.asarray(ct.data.shape)
    corners = np.array([ct.data_to_world(np.full(3, -0.5)), ct.data_to_world(shape - 0.5)])
    all_world = np.array([bone.data_to_world(v) for v in vertices[:: max(1, len(vertices) // 500)]])
    assert np.all(all_world >= corners.min(axis=0) - 1e-6) and np.all(all_world <= corners.max(axis=0) + 1e-6)

    # the plane views copy image and labels layers only
    for plane, view in workspace.ortho_views.views.items():
        assert not any(isinstance(layer, Surface) for layer in view.viewer_model.layers), plane
        assert len(workspace.ortho_views.mirrored_layers(plane)) == 1, plane  # the CT alone

    viewer.dims.ndisplay = 2  # 2D reading: the surface is hidden; back in 3D it is shown again
    assert not bone.visible
    viewer.dims.ndisplay = 3
    assert bone.visible


def test_the_routing_figure_shows_the_3d_evidence_gate_when_the_model_has_one(open_workspace):
    """A model with a 3D encoder also routes its evidence tokens by the text: the figure shows that
    gate's weights; a model without one keeps the three routing plots."""
    from napari_tghmoe._widgets.routing_view import VOLUME_GATE_TITLE, render_routing_figure

    workspace = open_workspace()
    trace = _routing_record(workspace.ct_layer, workspace.ct_layer.metadata["ct_volume"]).answer.routing
    figure, _ = render_routing_figure(trace, 1, 8, (400, 500))
    assert len(figure.axes) == 4 and VOLUME_GATE_TITLE not in [ax.get_title() for ax in figure.axes]  # 3 + colorbar

    trace.volume_gate = np.array([[0.7, 0.2, 0.1]])
    figure, rgba = render_routing_figure(trace, 1, 8, (400, 500))
    gate_axes = [ax for ax in figure.axes if ax.get_title() == VOLUME_GATE_TITLE]
    assert len(gate_axes) == 1 and rgba.shape == (500, 400, 4)
    np.testing.assert_allclose([bar.get_height() for bar in gate_axes[0].patches], [0.7, 0.2, 0.1])
