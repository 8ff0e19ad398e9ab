"""Axial, coronal and sagittal views linked to the main viewer, beside a 3D main canvas.

Each plane is its own ``napari.components.ViewerModel`` shown by a ``napari.qt.QtViewer``
(the pattern of napari's ``examples/multiple_viewer_widget.py``). The views hold mirror
layers that *share the data array* of the main viewer's 3D image and labels layers, so
nothing is copied, and they follow the main layers' display settings (contrast, colormap,
opacity, visibility, name, scale, translate, data). All three views and the main viewer
share one world position (``dims.point``, in mm): scrolling a view's slider or clicking in
a view moves the others, and a crosshair in each view marks the other two planes (colours
as in 3D Slicer: axial red, coronal green, sagittal yellow).

World coordinates are millimetres (layer ``scale`` = voxel spacing), so a 5 mm x 0.7 mm
coronal plane is shown with its true aspect ratio.

Mouse as in 3D Slicer and PACS: the wheel scrolls slices (Ctrl+wheel zooms), right-drag or
Ctrl+drag changes window/level live (left-right: width, up-down: level), a double-click asks
the layout to maximise the view (``view_double_clicked``). Each view carries orientation
markers (R/L, A/P, S/I) and a mm scale bar; hovering puts the world position and the CT value
(HU) under the cursor into the main viewer's status bar.

A wheel step costs only what changed: a viewer is re-sliced on a cursor move only
when its slice moved (never the 3D main view, where every axis is displayed; only the
scrolled plane among the views), and each scroll, click or W/L drag step emits
``plane_interaction`` so the layout can hold the 3D view's repaint until the user pauses.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from napari.components import ViewerModel
from napari.layers import Image, Labels, Layer, Shapes
from napari.qt import QtViewer
from qtpy.QtCore import QEvent, QObject, Qt, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QSizePolicy, QVBoxLayout, QWidget

from napari_tghmoe._widgets import _napari_private
from napari_tghmoe.layers import CT_VOLUME_KEY

CROSSHAIR_LAYER_NAME = "crosshair"
#: Layers whose metadata has this key set are 3D-only helpers (e.g. the bone surface)
#: and stay out of the plane views.
VIEW_3D_ONLY_KEY = "tghmoe_3d_only"

#: Layer attributes copied from a main layer onto its mirrors whenever they change.
SYNCED_ATTRIBUTES: dict[type, tuple[str, ...]] = {
    Image: (
        "contrast_limits",
        "colormap",
        "gamma",
        "opacity",
        "visible",
        "blending",
        "name",
        "scale",
        "translate",
        "interpolation2d",
    ),
    Labels: (
        "colormap",
        "opacity",
        "visible",
        "blending",
        "name",
        "scale",
        "translate",
        "contour",
        "show_selected_label",
        "selected_label",
    ),
}


@dataclass(frozen=True)
class Plane:
    """One orthogonal plane: which world axis is its normal and how it is drawn."""

    name: str
    normal_axis: int  # world axis (z=0, y=1, x=2) the plane is perpendicular to
    dims_order: tuple[int, int, int]  # napari dims order; the last two are displayed
    orientation2d: tuple[str, str]  # (vertical, horizontal) direction of increasing index
    color: str  # Slicer's slice colours
    markers: tuple[str, str, str, str]  # patient directions at the (top, bottom, left, right) edges


#: Radiological display: axial anterior up / patient right on screen left; coronal and
#: sagittal with the head up (z increases towards superior, so the vertical axis points up).
#: World axes (z, y, x) point (superior, posterior, patient-left), hence the edge markers.
PLANES: tuple[Plane, ...] = (
    Plane("axial", 0, (0, 1, 2), ("down", "right"), "#e05050", ("A", "P", "R", "L")),
    Plane("coronal", 1, (1, 0, 2), ("up", "right"), "#5fbf5f", ("S", "I", "R", "L")),
    Plane("sagittal", 2, (2, 0, 1), ("up", "right"), "#e8c547", ("S", "I", "A", "P")),
)
#: Window/level change per pixel of a right- or Ctrl-drag, as a fraction of the current width
#: (so fine windows such as brain 80 HU change finely, wide ones such as lung 1500 fast).
WINDOW_DRAG_WIDTH_PER_PX = 1.0 / 150.0
WINDOW_DRAG_LEVEL_PER_PX = 1.0 / 300.0
MIN_DRAG_WIDTH_HU = 20.0
ZOOM_PER_WHEEL_STEP = 1.15
_PLANE_COLOR_BY_AXIS = {plane.normal_axis: plane.color for plane in PLANES}


def is_mirrorable(layer: Layer) -> bool:
    """3D image and labels layers appear in the plane views (others stay in the main view)."""
    if layer.metadata.get(VIEW_3D_ONLY_KEY):
        return False
    if isinstance(layer, Image):
        return layer.ndim == 3 and not layer.rgb and not layer.multiscale
    return isinstance(layer, Labels) and layer.ndim == 3 and not layer.multiscale


class PlaneView(QWidget):
    """One plane: a title bar and an embedded napari canvas with its own slice slider."""

    def __init__(self, plane: Plane, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.plane = plane
        self.viewer_model = ViewerModel(title=plane.name)
        self.viewer_model.axes.visible = False
        self.qt_viewer = QtViewer(self.viewer_model)
        _napari_private.hide_qt_viewer_chrome(self.qt_viewer)
        self.mirrors: dict[int, Layer] = {}  # id(main layer) -> mirror layer
        self.crosshair: Shapes | None = None

        title = QLabel(plane.name.capitalize())
        title.setStyleSheet(
            f"background-color: {plane.color}; color: black; font-weight: bold;"
            " padding: 1px 6px;"
        )
        title.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(1, 1, 1, 1)
        layout.setSpacing(0)
        layout.addWidget(title)
        layout.addWidget(self.qt_viewer, stretch=1)
        self.setMinimumSize(160, 160)
        self.title = title

        # mm ruler: napari's scale bar in the layers' units (mm for our CT layers)
        scale_bar = self.viewer_model.canvas.overlays.scale_bar
        scale_bar.visible = True
        scale_bar.ticks = True
        scale_bar.position = "bottom_right"
        # wheel scrolls slices (ours), not napari's zoom; double-click maximises (the layout's)
        self.viewer_model.scene.camera.mouse_zoom = False
        _remove_default_callbacks(self.viewer_model)
        self.orientation_markers: dict[str, QLabel] = {}
        for edge, letter in zip(("top", "bottom", "left", "right"), plane.markers):
            marker = QLabel(letter, self)
            marker.setStyleSheet(
                f"color: {plane.color}; background-color: rgba(0, 0, 0, 140); font-weight: bold;"
                " font-size: 13px; border-radius: 3px;"
            )
            marker.setAlignment(Qt.AlignmentFlag.AlignCenter)
            marker.setFixedSize(20, 20)
            marker.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)
            self.orientation_markers[edge] = marker

    def resizeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        super().resizeEvent(event)
        self._place_markers()
        self.fit()

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        super().showEvent(event)
        self._place_markers()

    def _place_markers(self) -> None:
        """Letters at the middle of each canvas edge, over the canvas (not over the slider)."""
        canvas = self.canvas_widget
        top_left = canvas.mapTo(self, canvas.rect().topLeft())
        x0, y0, width, height = top_left.x(), top_left.y(), canvas.width(), canvas.height()
        margin = 4
        for edge, marker in self.orientation_markers.items():
            w, h = marker.width(), marker.height()
            if edge == "top":
                marker.move(x0 + (width - w) // 2, y0 + margin)
            elif edge == "bottom":
                marker.move(x0 + (width - w) // 2, y0 + height - h - margin)
            elif edge == "left":
                marker.move(x0 + margin, y0 + (height - h) // 2)
            else:
                marker.move(x0 + width - w - margin, y0 + (height - h) // 2)
            marker.raise_()

    @property
    def canvas_widget(self) -> QWidget:
        return _napari_private.qt_viewer_canvas_widget(self.qt_viewer)

    def apply_orientation(self) -> None:
        """Show the plane's two in-plane axes, head up for coronal and sagittal."""
        if self.viewer_model.dims.ndim != 3:
            return
        self.viewer_model.dims.ndisplay = 2
        self.viewer_model.dims.order = self.plane.dims_order
        self.viewer_model.camera.orientation2d = self.plane.orientation2d

    def fit(self) -> None:
        self.viewer_model.reset_view()

    def close_view(self) -> None:
        """Free the GL canvas and the QtViewer (napari checks for leaked QtViewers)."""
        self.mirrors.clear()
        self.crosshair = None
        self.viewer_model.layers.clear()
        self.qt_viewer.close()
        self.qt_viewer.deleteLater()


def _remove_default_callbacks(viewer_model: ViewerModel) -> None:
    """Drop napari's Ctrl+wheel slice scroll and double-click zoom: these views bind their own."""
    for callbacks, name in (
        (viewer_model.mouse_wheel_callbacks, "dims_scroll"),
        (viewer_model.mouse_double_click_callbacks, "double_click_to_zoom"),
    ):
        for callback in list(callbacks):
            if getattr(callback, "__name__", "") == name:
                callbacks.remove(callback)


class _CloseWatcher(QObject):
    """Calls ``on_close`` when the watched window closes (dock widgets get no closeEvent)."""

    def __init__(self, on_close: Callable[[], None], parent: QObject) -> None:
        super().__init__(parent)
        self._on_close = on_close

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt API)
        if event.type() == QEvent.Type.Close:
            self._on_close()
        return False


def _window_of(layer: Image) -> tuple[float, float]:
    low, high = (float(v) for v in layer.contrast_limits)
    return (low + high) / 2.0, high - low


def dragged_window(level: float, width: float, dx: float, dy: float) -> tuple[float, float]:
    """Contrast limits after a W/L drag of (dx, dy) pixels from (level, width).

    Right widens the window, up raises the level (as in 3D Slicer); steps scale with the
    width at the drag's start so narrow and wide windows are both controllable.
    """
    scale = max(width, MIN_DRAG_WIDTH_HU)
    new_width = max(width + dx * scale * WINDOW_DRAG_WIDTH_PER_PX, 1.0)
    new_level = level - dy * scale * WINDOW_DRAG_LEVEL_PER_PX
    return (new_level - new_width / 2.0, new_level + new_width / 2.0)


class OrthoViewsWidget(QWidget):
    """Three linked plane views of the main viewer's CT (dock widget, any orientation).

    ``napari_viewer`` is injected by napari when opened from the Plugins menu. With
    ``arrange=False`` the views are not laid out here: a reading layout (``layout.py``)
    places them beside the main canvas and this widget stays hidden, as their controller.
    """

    #: A plane view was double-clicked (its plane name): the layout maximises or restores it.
    view_double_clicked = Signal(str)
    #: The user scrolled, clicked or windowed in a plane view (its plane name); emitted on
    #: every step, so the layout can hold back the costly 3D view until the user pauses.
    plane_interaction = Signal(str)

    def __init__(
        self,
        napari_viewer: Any,
        orientation: Qt.Orientation = Qt.Orientation.Horizontal,
        parent: QWidget | None = None,
        *,
        arrange: bool = True,
    ) -> None:
        super().__init__(parent)
        self._viewer_ref = weakref.ref(napari_viewer)
        self._syncing = False
        self._closed = False
        self._connections: dict[int, list[tuple[Any, Callable]]] = {}
        self.views: dict[str, PlaneView] = {}
        #: Which layer a W/L drag acts on; None: the CT shown in the views (bottom image).
        self.window_target: Callable[[], Image | None] | None = None

        horizontal = orientation == Qt.Orientation.Horizontal
        layout = QHBoxLayout(self) if horizontal else QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(3)
        for plane in PLANES:
            view = PlaneView(plane, self)
            self.views[plane.name] = view
            if arrange:
                layout.addWidget(view, stretch=1)
            else:
                view.hide()
            view.viewer_model.dims.events.point.connect(self._on_view_point)
            view.viewer_model.mouse_drag_callbacks.append(self._make_window_drag_handler(view))
            view.viewer_model.mouse_drag_callbacks.append(self._make_click_handler(view))
            view.viewer_model.mouse_wheel_callbacks.append(self._make_wheel_handler(view))
            view.viewer_model.mouse_move_callbacks.append(self._make_hover_handler(view))
            view.viewer_model.mouse_double_click_callbacks.append(
                lambda _model, _event, name=plane.name: self.view_double_clicked.emit(name)
            )

        #: Per viewer ("main" and each plane): napari's re-slicing on cursor moves replaced
        #: by one that re-slices only when the viewer's slice changed (see
        #: ``set_skip_unchanged_slices``), and the function restoring napari's.
        self._slicing: dict[str, tuple[Any, Callable[[], None]]] = {}
        self.set_skip_unchanged_slices(True)

        napari_viewer.layers.events.inserted.connect(self._on_inserted)
        napari_viewer.layers.events.removed.connect(self._on_removed)
        napari_viewer.layers.events.moved.connect(self._on_moved)
        napari_viewer.dims.events.point.connect(self._on_main_point)
        for layer in napari_viewer.layers:
            self._add_mirrors(layer)
        self._reorder()
        self._on_main_point()
        self.fit_all()
        if _napari_private.has_qt_window(napari_viewer):
            window = _napari_private.main_qt_window(napari_viewer)
            self._close_watcher = _CloseWatcher(self.close_views, window)
            window.installEventFilter(self._close_watcher)

    # ------------------------------------------------------------------ helpers
    @property
    def viewer(self) -> Any:
        viewer = self._viewer_ref()
        if viewer is None:
            raise RuntimeError("the napari viewer of these orthogonal views is gone")
        return viewer

    def mirrored_layers(self, plane: str) -> list[Layer]:
        """The mirror layers shown in one plane view, bottom to top (no crosshair)."""
        view = self.views[plane]
        return [layer for layer in view.viewer_model.layers if layer is not view.crosshair]

    def fit_all(self) -> None:
        for view in self.views.values():
            view.fit()

    def resizeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        super().resizeEvent(event)
        self.fit_all()

    # ------------------------------------------------------------------ slicing
    @property
    def skips_unchanged_slices(self) -> bool:
        return bool(self._slicing)

    def set_skip_unchanged_slices(self, enabled: bool) -> None:
        """Re-slice a viewer on a cursor move only when its slice changed (on by default).

        napari re-slices every layer on every move of ``dims.point``. The main viewer shows
        the CT in 3D, where no cursor move changes a layer's slice, yet each wheel step in a
        plane view re-sliced the whole volume there (for a 600 x 512 x 512 CT: a float32
        copy and a texture upload of 600 MiB per 3D layer, seconds per step); a plane view
        re-sliced when the cursor moved within its plane. Off restores napari's behaviour
        (the benchmark's "before").
        """
        if enabled == self.skips_unchanged_slices:
            return
        if not enabled:
            for _stand_in, restore in self._slicing.values():
                restore()
            self._slicing.clear()
            return
        viewer = self._viewer_ref()
        models = {"main": viewer} if viewer is not None else {}
        models.update({name: view.viewer_model for name, view in self.views.items()})
        for name, model in models.items():
            self._slicing[name] = _napari_private.slice_on_hidden_axes_only(model)

    def slicing_counts(self) -> dict[str, tuple[int, int]]:
        """Per viewer: (cursor moves that re-sliced, cursor moves that needed no re-slice)."""
        return {name: (hook.sliced, hook.skipped) for name, (hook, _restore) in self._slicing.items()}

    # ------------------------------------------------------------ layer mirroring
    def _on_inserted(self, event: Any) -> None:
        self._add_mirrors(event.value)
        self._reorder()
        self._update_crosshair()
        self._on_main_point()
        if len(self._mirrorable_main_layers()) == 1:
            self.fit_all()

    def _on_removed(self, event: Any) -> None:
        layer = event.value
        for emitter, callback in self._connections.pop(id(layer), []):
            emitter.disconnect(callback)
        for view in self.views.values():
            mirror = view.mirrors.pop(id(layer), None)
            if mirror is not None and mirror in view.viewer_model.layers:
                view.viewer_model.layers.remove(mirror)
        self._update_crosshair()

    def _on_moved(self, _event: Any = None) -> None:
        self._reorder()

    def _mirrorable_main_layers(self) -> list[Layer]:
        return [layer for layer in self.viewer.layers if is_mirrorable(layer)]

    def _add_mirrors(self, layer: Layer) -> None:
        if not is_mirrorable(layer) or id(layer) in self._connections:
            return
        data, state, layer_type = layer.as_layer_data_tuple()
        state = dict(state)
        state.pop("rendering", None)  # 3D-only settings stay with the main layer
        self._syncing = True  # adding a layer moves a view's dims; that is no user move
        try:
            for view in self.views.values():
                mirror = Layer.create(data, state, layer_type)
                view.mirrors[id(layer)] = mirror
                view.viewer_model.layers.append(mirror)
                view.apply_orientation()
        finally:
            self._syncing = False
        connections: list[tuple[Any, Callable]] = []
        for attribute in SYNCED_ATTRIBUTES[Labels if isinstance(layer, Labels) else Image]:
            emitter = getattr(layer.events, attribute, None)
            if emitter is None:
                continue
            callback = self._make_attribute_sync(layer, attribute)
            emitter.connect(callback)
            connections.append((emitter, callback))
        for event_name in ("data", "paint", "set_data"):
            emitter = getattr(layer.events, event_name, None)
            if emitter is not None:
                callback = self._make_data_sync(layer)
                emitter.connect(callback)
                connections.append((emitter, callback))
        self._connections[id(layer)] = connections

    def _make_attribute_sync(self, layer: Layer, attribute: str) -> Callable[[Any], None]:
        layer_ref = weakref.ref(layer)

        def sync(_event: Any = None) -> None:
            source = layer_ref()
            if source is None or self._closed:
                return
            value = getattr(source, attribute)
            for view in self.views.values():
                mirror = view.mirrors.get(id(source))
                if mirror is not None:
                    setattr(mirror, attribute, value)
            if attribute in ("scale", "translate"):
                self._update_crosshair()

        return sync

    def _make_data_sync(self, layer: Layer) -> Callable[[Any], None]:
        layer_ref = weakref.ref(layer)

        def sync(_event: Any = None) -> None:
            source = layer_ref()
            if source is None or self._closed:
                return
            for view in self.views.values():
                mirror = view.mirrors.get(id(source))
                if mirror is None:
                    continue
                if mirror.data is source.data:
                    mirror.refresh()  # painted in place: same array, redraw the slice
                else:
                    mirror.data = source.data

        return sync

    def _reorder(self) -> None:
        order = [id(layer) for layer in self._mirrorable_main_layers()]
        for view in self.views.values():
            layers = view.viewer_model.layers
            for target_index, key in enumerate(order):
                mirror = view.mirrors.get(key)
                if mirror is None:
                    continue
                current_index = layers.index(mirror)
                if current_index != target_index:
                    layers.move(current_index, target_index)
            if view.crosshair is not None and view.crosshair in layers:
                index = layers.index(view.crosshair)
                if index != len(layers) - 1:
                    layers.move(index, len(layers))

    # ---------------------------------------------------------- position linking
    def _on_main_point(self, _event: Any = None) -> None:
        if self._syncing or self._closed:
            return
        point = tuple(self.viewer.dims.point)
        if len(point) != 3:
            return
        self._syncing = True
        try:
            for view in self.views.values():
                dims = view.viewer_model.dims
                if dims.ndim == 3 and tuple(dims.point) != point:
                    dims.point = point
        finally:
            self._syncing = False
        self._update_crosshair()

    def _on_view_point(self, event: Any) -> None:
        if self._syncing or self._closed:
            return
        point = tuple(event.value)
        if len(point) != 3 or self.viewer.dims.ndim != 3:
            return
        self.plane_interaction.emit(self._plane_of_model(event.source))
        self.set_world_position(point)

    def _plane_of_model(self, dims: Any) -> str:
        return next((name for name, view in self.views.items() if view.viewer_model.dims is dims), "")

    def set_world_position(self, point: tuple[float, ...]) -> None:
        """Move the shared cursor (main viewer and all planes) to a world point in mm."""
        viewer = self.viewer
        if viewer.dims.ndim != 3:
            return
        point = tuple(float(v) for v in point)
        if tuple(viewer.dims.point) != point:
            viewer.dims.point = point  # fans out to the planes through _on_main_point
        else:
            self._on_main_point()

    def _make_click_handler(self, view: PlaneView) -> Callable:
        """A click (press and release without dragging) moves the cursor; a drag pans."""

        def on_press(_viewer_model: Any, event: Any):
            if event.button != 1 or "Control" in event.modifiers:
                return
            start = np.asarray(event.pos, dtype=float)
            yield
            moved = False
            while event.type == "mouse_move":
                if np.linalg.norm(np.asarray(event.pos, dtype=float) - start) > 4:
                    moved = True
                yield
            if not moved:
                self.click_world(view.plane.name, tuple(event.position))

        return on_press

    # ------------------------------------------------------ wheel, W/L drag, hover
    def scroll_slices(self, plane: str, steps: int) -> None:
        """Move ``plane``'s slice by ``steps`` (the main viewer and the other views follow)."""
        view = self.views[plane]
        dims = view.viewer_model.dims
        if dims.ndim != 3 or steps == 0:
            return
        axis = view.plane.normal_axis
        n_steps = int(dims.nsteps[axis])
        target = int(np.clip(dims.current_step[axis] + steps, 0, max(n_steps - 1, 0)))
        if target != dims.current_step[axis]:
            dims.set_current_step(axis, target)

    def _make_wheel_handler(self, view: PlaneView) -> Callable:
        """Wheel: one slice per notch (towards superior / posterior / left on wheel up);
        Ctrl+wheel: zoom, as napari's wheel does elsewhere."""

        def on_wheel(_viewer_model: Any, event: Any) -> None:
            delta = float(event.delta[1]) if len(event.delta) > 1 else 0.0
            if delta == 0.0:
                return
            direction = 1 if delta > 0 else -1
            if "Control" in event.modifiers:
                view.viewer_model.scene.camera.zoom *= ZOOM_PER_WHEEL_STEP**direction
            else:
                self.scroll_slices(view.plane.name, direction)
            event.handled = True

        return on_wheel

    def target_window_layer(self) -> Image | None:
        """The image whose window a drag changes: the layout's choice, else the views' CT."""
        if self.window_target is not None:
            return self.window_target()
        reference = self._reference_layer()
        return reference if isinstance(reference, Image) else None

    def _make_window_drag_handler(self, view: PlaneView) -> Callable:
        """Right-drag or Ctrl+left-drag: window (left-right) and level (up-down), live."""

        def on_press(_viewer_model: Any, event: Any):
            is_window_drag = event.button == 2 or (event.button == 1 and "Control" in event.modifiers)
            layer = self.target_window_layer() if is_window_drag else None
            if layer is None:
                return
            camera = view.viewer_model.scene.camera
            pan_was = camera.mouse_pan
            camera.mouse_pan = False  # a right-drag would otherwise zoom, a Ctrl-drag pan
            start = np.asarray(event.pos, dtype=float)
            level, width = _window_of(layer)
            yield
            try:
                while event.type == "mouse_move":
                    dx, dy = np.asarray(event.pos, dtype=float) - start
                    self.plane_interaction.emit(view.plane.name)
                    layer.contrast_limits = dragged_window(level, width, dx, dy)
                    yield
            finally:
                camera.mouse_pan = pan_was

        return on_press

    def _make_hover_handler(self, view: PlaneView) -> Callable:
        def on_move(_viewer_model: Any, event: Any) -> None:
            text = self.cursor_readout(view.plane.name, tuple(event.position))
            if text:
                self.viewer.status = text

        return on_move

    def cursor_readout(self, plane: str, world_position: tuple[float, ...]) -> str:
        """Status-bar text for the cursor in a plane: position in mm, voxel, and the CT value."""
        reference = self._reference_layer()
        if reference is None or len(world_position) != 3:
            return ""
        data_point = np.asarray(reference.world_to_data(world_position), dtype=float)
        index = np.round(data_point).astype(int)
        shape = np.asarray(reference.data.shape[-3:])
        z, y, x = (float(v) for v in world_position)
        position = f"{plane}: x {x:.1f}  y {y:.1f}  z {z:.1f} mm"
        if np.any(index < 0) or np.any(index >= shape):
            return f"{position}  (outside the volume)"
        value = np.asarray(reference.data[tuple(index)]).item()
        unit = "HU" if reference.metadata.get(CT_VOLUME_KEY) is not None else "value"
        value_text = f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
        return f"{position}  voxel ({index[0]}, {index[1]}, {index[2]})  {unit} {value_text}"

    def click_world(self, plane: str, world_position: tuple[float, ...]) -> None:
        """What a click in a plane does: move the in-plane coordinates, keep its slice."""
        view = self.views[plane]
        if len(world_position) != 3:
            return
        point = list(self.viewer.dims.point)
        for axis in range(3):
            if axis != view.plane.normal_axis:
                point[axis] = float(world_position[axis])
        self.plane_interaction.emit(plane)
        self.set_world_position(tuple(point))

    # ------------------------------------------------------------------ crosshair
    def _reference_layer(self) -> Layer | None:
        layers = self._mirrorable_main_layers()
        images = [layer for layer in layers if isinstance(layer, Image)]
        return (images or layers or [None])[0]

    def _update_crosshair(self) -> None:
        if self._closed:
            return
        reference = self._reference_layer()
        for view in self.views.values():
            if reference is None:
                if view.crosshair is not None and view.crosshair in view.viewer_model.layers:
                    view.viewer_model.layers.remove(view.crosshair)
                view.crosshair = None
                continue
            lines, colors, widths = self._crosshair_geometry(view.plane, reference)
            if view.crosshair is None or view.crosshair not in view.viewer_model.layers:
                view.crosshair = Shapes(
                    lines,
                    shape_type="line",
                    edge_color=colors,
                    edge_width=widths,
                    scale=reference.scale,
                    translate=reference.translate,
                    units=reference.units,
                    name=CROSSHAIR_LAYER_NAME,
                    opacity=0.8,
                    blending="translucent_no_depth",
                )
                self._syncing = True
                try:
                    view.viewer_model.layers.append(view.crosshair)
                finally:
                    self._syncing = False
            else:
                crosshair = view.crosshair
                if not np.array_equal(crosshair.scale, reference.scale):
                    crosshair.scale = reference.scale
                if not np.array_equal(crosshair.translate, reference.translate):
                    crosshair.translate = reference.translate
                crosshair.data = lines  # keeps each line's colour and width
                if not np.allclose(crosshair.edge_width, widths):
                    crosshair.edge_width = widths
            view.crosshair.editable = False

    def _crosshair_geometry(
        self, plane: Plane, reference: Layer
    ) -> tuple[list[np.ndarray], list[str], list[float]]:
        """Two lines through the cursor in the reference layer's data coordinates.

        Each line is the trace of one of the other two planes, in that plane's colour.
        Widths are per line so both look equally thin despite anisotropic voxels.
        """
        scale = np.asarray(reference.scale, dtype=float)
        translate = np.asarray(reference.translate, dtype=float)
        shape = np.asarray(reference.data.shape, dtype=float)
        cursor = (np.asarray(self.viewer.dims.point, dtype=float) - translate) / scale
        cursor = np.clip(cursor, 0, shape - 1)
        cursor[plane.normal_axis] = np.round(cursor[plane.normal_axis])
        in_plane = [axis for axis in range(3) if axis != plane.normal_axis]
        world_width = 0.004 * float(np.max(shape * scale))
        lines, colors, widths = [], [], []
        for trace_axis in in_plane:  # the line marks the plane normal to trace_axis
            along_axis = next(a for a in in_plane if a != trace_axis)
            start, end = cursor.copy(), cursor.copy()
            # end on the first/last voxel centres: the crosshair must not widen the views'
            # world extent, or their slice grids would drift from the main viewer's
            start[along_axis], end[along_axis] = 0.0, shape[along_axis] - 1.0
            lines.append(np.stack([start, end]))
            colors.append(_PLANE_COLOR_BY_AXIS[trace_axis])
            widths.append(world_width / scale[trace_axis])
        return lines, colors, widths

    # ------------------------------------------------------------------- teardown
    def close_views(self) -> None:
        """Disconnect from the main viewer and free the plane canvases (idempotent)."""
        if self._closed:
            return
        self._closed = True
        viewer = self._viewer_ref()
        if viewer is not None:
            for emitter, callback in (
                (viewer.layers.events.inserted, self._on_inserted),
                (viewer.layers.events.removed, self._on_removed),
                (viewer.layers.events.moved, self._on_moved),
                (viewer.dims.events.point, self._on_main_point),
            ):
                emitter.disconnect(callback)
        for connections in self._connections.values():
            for emitter, callback in connections:
                emitter.disconnect(callback)
        self._connections.clear()
        self.set_skip_unchanged_slices(False)  # the main viewer outlives these views
        for view in self.views.values():
            view.close_view()
