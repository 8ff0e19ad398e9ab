"""The CT reading layout: 3D main canvas, linked plane views, window/level (and chat) docks.

``setup_viewer`` arranges an existing napari viewer; ``launch`` opens one (optionally from a
file, else the chest phantom) and can save a screenshot of the whole window and quit, which
``python -m napari_tghmoe --screenshot PATH`` and ``scripts/demo.sh`` use.

Layout: as in 3D Slicer, Four-Up by default (axial, 3D, sagittal, coronal in a 2x2 grid in
the window's central area; ``layout.py``), switchable to one plane + 3D or 3D only and
remembered; the right side holds the window/level dock and the chat, routing and segment
docks. Mouse and keys follow PACS habits (``ortho_views.py``, ``shortcuts.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication, QWidget

from napari_tghmoe.io._types import CTVolume
from napari_tghmoe.layers import BONE_ISO_THRESHOLD_HU, ct_layer_kwargs, ct_volume_of
from napari_tghmoe._widgets import _napari_private
from napari_tghmoe._widgets.layout import ReadingLayout
from napari_tghmoe._widgets.ortho_views import VIEW_3D_ONLY_KEY, OrthoViewsWidget
from napari_tghmoe._widgets.window_level import WindowLevelWidget

if TYPE_CHECKING:
    from napari_tghmoe._widgets.chat import ChatWidget
    from napari_tghmoe._widgets.routing_view import RoutingView
    from napari_tghmoe.conversation import AnswerRecord

WINDOW_LEVEL_DOCK_NAME = "Window / level"
#: Where later docks go: the chat and routing views sit on the right.
CHAT_DOCK_AREA = "right"
CHAT_DOCK_NAME = "Ask the CT model"
ROUTING_DOCK_NAME = "Expert routing"
DEFAULT_WINDOW_SIZE = (1600, 1000)


@dataclass
class CTWorkspace:
    """Handles on what ``setup_viewer`` built, for tests and for later docks."""

    viewer: Any
    ct_layer: Image | None
    ortho_views: OrthoViewsWidget
    window_level: WindowLevelWidget
    layout: ReadingLayout
    docks: dict[str, QWidget] = field(default_factory=dict)
    shortcuts: dict[str, Any] = field(default_factory=dict)

    def reset_views(self) -> None:
        """``R``: every plane fitted to its window, the 3D view from the front, fitted."""
        self.ortho_views.fit_all()
        if len(self.viewer.layers) == 0:
            return
        if self.viewer.dims.ndisplay == 3:
            show_anterior_3d(self.viewer)
        else:
            self.viewer.reset_view()


def _find_ct_layer(viewer: Any) -> Image | None:
    images = [
        layer
        for layer in viewer.layers
        if isinstance(layer, Image) and layer.ndim == 3 and not layer.metadata.get(VIEW_3D_ONLY_KEY)
    ]
    with_volume = [layer for layer in images if ct_volume_of(layer) is not None]
    return (with_volume or images or [None])[-1]


def center_cursor_on(viewer: Any, layer: Image) -> None:
    """Put the shared cursor (``dims.point``) at the centre voxel of ``layer``."""
    center_index = (np.asarray(layer.data.shape, dtype=float) - 1) / 2.0
    world = np.asarray(layer.translate) + np.asarray(layer.scale) * np.round(center_index)
    viewer.dims.point = tuple(float(v) for v in world)


def show_anterior_3d(viewer: Any) -> None:
    """3D camera as in a radiology 3D view: from the front, head up, patient's right on
    the screen's left.

    World axes (z, y, x) are (superior, posterior, patient-left): LPS listed backwards, a
    left-handed frame in napari's axis order, so the depth axis is flipped ("away") to
    show the anatomy unmirrored; then the camera looks from anterior, a little from above
    and from the patient's right (so the axial plane at the cursor is seen), z up.
    """
    viewer.dims.ndisplay = 3
    viewer.camera.orientation = ("away", "down", "right")
    viewer.camera.set_view_direction(view_direction=(-0.35, 0.85, 0.4), up_direction=(1, 0, 0))
    viewer.fit_to_view()


BONE_SURFACE_WINDOW = (-500.0, 1300.0)  # bone W 1800 / L 400: shades the iso-surface


def add_bone_surface(viewer: Any, ct_layer: Image) -> Image:
    """A 3D-only bone iso-surface sharing ``ct_layer``'s data, and the CT drawn as an
    axial plane at the cursor in 3D (its 2D window stays the reading window).

    The surface layer is visible only while the viewer is 3D, so 2D reading is unchanged.
    """
    surface = viewer.add_image(
        ct_layer.data,
        name=f"{ct_layer.name} (bone surface)",
        scale=ct_layer.scale,
        translate=ct_layer.translate,
        units=ct_layer.units,
        contrast_limits=BONE_SURFACE_WINDOW,
        colormap="bone",
        rendering="iso",
        iso_threshold=BONE_ISO_THRESHOLD_HU,
        blending="translucent",
        metadata={VIEW_3D_ONLY_KEY: True},
        visible=viewer.dims.ndisplay == 3,
    )
    ct_layer.depiction = "plane"
    ct_layer.plane.normal = (1.0, 0.0, 0.0)  # axial
    ct_layer.blending = "translucent"

    def follow_cursor(_event: Any = None) -> None:
        if len(viewer.dims.point) == 3:
            data_point = ct_layer.world_to_data(viewer.dims.point)
            ct_layer.plane.position = tuple(float(v) for v in data_point)

    def show_in_3d_only(_event: Any = None) -> None:
        surface.visible = viewer.dims.ndisplay == 3

    viewer.dims.events.point.connect(follow_cursor)
    viewer.dims.events.ndisplay.connect(show_in_3d_only)
    follow_cursor()
    return surface


def setup_viewer(
    viewer: Any,
    volume_or_layer: CTVolume | Image | None = None,
    *,
    ndisplay: int = 3,
    bone_surface: bool = True,
    layout: str | None = None,
    settings_file: str | Path | None = None,
) -> CTWorkspace:
    """Arrange ``viewer`` for reading a CT: 3D main view and plane views in a Slicer layout
    (``layout``; None: the one remembered, else Four-Up), W/L dock, PACS mouse and keys.

    With ``bone_surface`` the 3D view is drawn as 3D Slicer's default CT scene: a shaded
    bone iso-surface (a 3D-only layer with its own window) plus the CT's axial plane at
    the cursor in the reading window. The W/L dock switches the CT layer to volume
    rendering (attenuated MIP, MIP, iso-surface...) instead.

    ``volume_or_layer`` is a CTVolume to add, an image layer already in the viewer, or None
    to use the viewer's CT layer (if any). Safe to call on an empty viewer.
    """
    if isinstance(volume_or_layer, CTVolume):
        layer = viewer.add_image(volume_or_layer.hu, **ct_layer_kwargs(volume_or_layer))
    elif isinstance(volume_or_layer, Image):
        layer = volume_or_layer
        if layer not in viewer.layers:
            viewer.add_layer(layer)
    else:
        layer = _find_ct_layer(viewer)

    if layer is not None:
        center_cursor_on(viewer, layer)
        viewer.scale_bar.visible = True  # in the CT layer's units (mm for our readers)
        if bone_surface:
            add_bone_surface(viewer, layer)
        viewer.layers.selection.active = layer
        if ndisplay == 3:
            show_anterior_3d(viewer)

    ortho = OrthoViewsWidget(viewer, orientation=Qt.Orientation.Horizontal, arrange=False)
    reading_layout = ReadingLayout(viewer, ortho, layout=layout, settings_file=settings_file)
    window_level = WindowLevelWidget(viewer)
    ortho.window_target = window_level.target_layer  # a W/L drag acts on the CT, never an overlay
    docks = {
        WINDOW_LEVEL_DOCK_NAME: viewer.window.add_dock_widget(
            window_level, name=WINDOW_LEVEL_DOCK_NAME, area=CHAT_DOCK_AREA
        ),
    }
    workspace = CTWorkspace(viewer, layer, ortho, window_level, reading_layout, docks)
    from napari_tghmoe._widgets.shortcuts import install_shortcuts

    workspace.shortcuts = install_shortcuts(
        viewer, reset_views=workspace.reset_views, apply_preset=window_level.apply_preset
    )
    QApplication.processEvents()
    ortho.fit_all()
    if layer is not None and ndisplay == 3:
        viewer.fit_to_view()  # the canvas shrank when the docks arrived
    return workspace


def dock_assistant(
    viewer: Any, *, area: str = CHAT_DOCK_AREA, **chat_options: Any
) -> tuple[ChatWidget, RoutingView]:
    """Dock the chat and the routing view (the demo launcher's layout); return both widgets.

    The routing view is handed the chat's conversation; docks opened from the Plugins menu
    find it through the window's ``ConversationLink`` instead.
    """
    from napari_tghmoe._widgets.chat import ChatWidget
    from napari_tghmoe._widgets.routing_view import RoutingView

    chat = ChatWidget(viewer, **chat_options)
    routing = RoutingView(viewer, conversation=chat.conversation)
    viewer.window.add_dock_widget(chat, name=CHAT_DOCK_NAME, area=area)
    viewer.window.add_dock_widget(routing, name=ROUTING_DOCK_NAME, area=area)
    return chat, routing


def answer_and_wait(
    chat: ChatWidget, question: str | None = None, timeout_s: float = 300.0
) -> AnswerRecord | None:
    """Send ``question`` (default: the report request) and run the Qt event loop until the
    answer is in and its stated findings are placed; returns its ``AnswerRecord`` or None (for
    scripted demos)."""
    import time

    from napari_tghmoe.conversation import REPORT_REQUEST

    if not chat.send(question or REPORT_REQUEST):
        return None
    deadline = time.perf_counter() + timeout_s

    def working() -> bool:
        return chat.is_busy or chat._load_worker is not None or chat.is_locating

    while working() and time.perf_counter() < deadline:
        QApplication.processEvents()
        time.sleep(0.01)
    if chat.is_busy:
        chat.stop()
    return chat.latest_record()


def load_demo_volume(region: str = "chest", seed: int = 0) -> CTVolume:
    """The phantom the demo opens (small enough to start in a couple of seconds)."""
    from napari_tghmoe._sample_data import phantom_volume

    return phantom_volume(region, seed=seed)


def save_window_screenshot(viewer: Any, path: str | Path) -> Path:
    """Render every canvas and save the whole window (docks included) as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        QApplication.processEvents()
    image = viewer.screenshot(path=None, canvas_only=False, flash=False)
    from napari.utils.io import imsave

    imsave(str(path), image)
    return path


def launch(
    path: str | Path | None = None,
    *,
    screenshot: str | Path | None = None,
    region: str = "chest",
    window_size: tuple[int, int] = DEFAULT_WINDOW_SIZE,
) -> int:
    """Open napari with the CT reading layout; with ``screenshot``, save it and quit.

    Returns a process exit code (0 on success; 2 when ``path`` cannot be read).
    """
    import napari

    from napari_tghmoe.io._types import VolumeReadError

    if path is not None:
        from napari_tghmoe.io import load_volume

        try:
            volume = load_volume(path)
        except VolumeReadError as err:
            print(f"error: {err}")
            return 2
    else:
        volume = load_demo_volume(region)

    viewer = napari.Viewer(title="napari-tghmoe", show=True)
    _napari_private.main_qt_window(viewer).resize(*window_size)
    workspace = setup_viewer(viewer, volume)
    # Chat + routing docks; a screenshot run uses a throw-away transcript.
    chat_options = {} if screenshot is None else {"autosave": False, "max_new_tokens": 48}
    chat, routing = dock_assistant(viewer, **chat_options)
    from napari_tghmoe._widgets.segment_dock import dock_segment

    dock_segment(viewer, area=CHAT_DOCK_AREA)  # a tab beside the chat and routing docks
    if screenshot is None:
        napari.run()
        return 0
    record = answer_and_wait(chat)  # "Generate report" to completion, then the overlay
    if record is not None and routing.trace is not None:
        routing.update_overlay(create=True)  # listed under Overlays, hidden until shown
    routing.wait_until_rendered()
    for _ in range(5):
        QApplication.processEvents()
    workspace.ortho_views.fit_all()
    out = save_window_screenshot(viewer, screenshot)
    print(f"screenshot saved to {out}")
    viewer.close()
    return 0
