"""What every dock bound to one viewer's CT layers shares: following the layer list, turning a
layer into a ``CTVolume``, shutting down with the viewer's window (a dock widget gets no close
event of its own when the window closes, so long work would outlive it), and the per-window
link through which the chat and routing docks find one conversation."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, Signal

from napari_tghmoe.io._types import AXIAL_DIRECTION, CTVolume
from napari_tghmoe.layers import ct_volume_of


def unproxied(obj: Any) -> Any:
    """The object behind napari's ``PublicOnlyProxy`` (a dock opened from the Plugins menu gets
    its viewer, and so its layers, wrapped; ``__wrapped__`` is the wrapt proxy's public handle).

    Qt calls, identity checks and weak references need the real object: a proxy is made
    afresh on every access, so a weak reference to one dies at once.
    """
    return getattr(obj, "__wrapped__", obj)


def volume_from_layer(layer: Any) -> CTVolume:
    """The layer's ``CTVolume``, or one built from a plain 3D image layer (spacing = scale)."""
    volume = ct_volume_of(layer)
    if volume is not None:
        return volume
    data = np.asarray(layer.data)
    if data.ndim != 3 or getattr(layer, "rgb", False):
        raise ValueError(f"layer {layer.name!r} is not a 3D grey-value volume (shape {data.shape})")
    translate = np.asarray(layer.translate, dtype=float)[-3:]
    return CTVolume(
        hu=data,
        spacing=tuple(float(s) for s in np.asarray(layer.scale)[-3:]),
        origin=tuple(AXIAL_DIRECTION @ translate),
        description=layer.name,
        source=None,
    )


class ViewerDockMixin:
    """Mix in before ``QWidget``. The dock provides ``viewer``, ``_refresh_layers``,
    ``_on_active_layer``, ``current_layer``, ``_report_error`` and ``shutdown``; ``shutdown``
    calls :meth:`_unbind_viewer`."""

    viewer: Any

    def _layer_signals(self) -> list[tuple[Any, Any]]:
        layers = self.viewer.layers
        return [
            (layers.events.inserted, self._refresh_layers),
            (layers.events.removed, self._refresh_layers),
            (layers.events.reordered, self._refresh_layers),
            (layers.selection.events.active, self._on_active_layer),
        ]

    def _connect_viewer(self) -> None:
        for signal, slot in self._layer_signals():
            signal.connect(slot)

    def _selected_volume(self) -> Any:
        """The chosen layer's ``CTVolume``, or None after telling the user why there is none."""
        layer = self.current_layer()
        if layer is None:
            self._report_error("No CT layer: open a CT scan (File > Open) or pick a 3D image layer first.")
            return None
        try:
            return volume_from_layer(layer)
        except ValueError as err:
            self._report_error(str(err))
            return None

    def _watch_main_window(self) -> None:
        """Shut down with the viewer's window."""
        from napari_tghmoe._widgets import _napari_private

        viewer = unproxied(self.viewer)  # eventFilter compares the real window
        if _napari_private.has_qt_window(viewer):
            self._main_window = _napari_private.main_qt_window(viewer)
            self._main_window.installEventFilter(self)

    def _unbind_viewer(self) -> None:
        """Stop watching the window and the layer list (both may already be deleted)."""
        window = getattr(self, "_main_window", None)
        if window is not None:
            try:
                window.removeEventFilter(self)
            except RuntimeError:  # already deleted with the window
                pass
            self._main_window = None
        for signal, slot in self._layer_signals():
            try:
                signal.disconnect(slot)
            except Exception:  # never connected, or the viewer is gone
                pass

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt name)
        if event.type() == QEvent.Type.Close and obj is getattr(self, "_main_window", None):
            self.shutdown()
        return False

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.shutdown()
        super().closeEvent(event)


def select_model_folder(combo: Any, folder: str | Path) -> int:
    """Select ``folder`` in a model picker, adding it above the last ("Open model folder...")
    entry if new; returns its index."""
    folder = str(folder)
    index = combo.findData(folder)
    if index < 0:
        combo.insertItem(combo.count() - 1, Path(folder).name, folder)
        index = combo.findData(folder)
    combo.setCurrentIndex(index)
    return index


class ConversationLink(QObject):
    """Where the docks of one viewer meet: the chat dock publishes its ``Conversation`` here and
    the routing dock follows it, whichever of the two opens first.

    It is a child of the viewer's main window, so it lives and dies with that window: no
    module-level registry, and the two docks never import each other.
    """

    published = Signal(object)  # the Conversation

    def __init__(self, parent: QObject) -> None:
        super().__init__(parent)
        self._conversation: Callable[[], Any] = lambda: None

    @property
    def conversation(self) -> Any:
        """The chat's conversation, while the chat (or a routing view) still holds it.

        Held weakly: a closed chat's loaded model must not live on with the window.
        """
        return self._conversation()

    def publish(self, conversation: Any) -> None:
        self._conversation = weakref.ref(conversation)
        self.published.emit(conversation)


_LINK_ATTRIBUTE = "_tghmoe_conversation_link"


def conversation_link(viewer: Any) -> ConversationLink | None:
    """The link of ``viewer``'s window (made on first use); None for a viewer without a window."""
    from napari_tghmoe._widgets import _napari_private

    viewer = unproxied(viewer)  # docks from the Plugins menu each get their own proxy
    if not _napari_private.has_qt_window(viewer):
        return None
    window = _napari_private.main_qt_window(viewer)
    link = getattr(window, _LINK_ATTRIBUTE, None)
    if link is None:
        link = ConversationLink(window)
        setattr(window, _LINK_ATTRIBUTE, link)
    return link


def move_cursor_to(viewer: Any, point: Any) -> tuple[float, ...] | None:
    """Move the shared cursor (``dims.point``) to a world point: the plane views follow it, and a
    2D main canvas centres on it. None (nothing moved) when the dimensions do not match."""
    point = tuple(float(v) for v in point)
    if len(viewer.dims.point) != len(point):
        return None
    viewer.dims.point = point
    if viewer.dims.ndisplay == 2:
        displayed = list(viewer.dims.displayed)
        viewer.camera.center = tuple(point[axis] for axis in displayed)
    return point


def move_cursor_to_voxel(viewer: Any, layer: Any, voxel_zyx: Any) -> tuple[float, ...] | None:
    """Move the shared cursor to a voxel of ``layer`` (its scale and translate give the world mm)."""
    from napari_tghmoe.segmentation_layers import world_point

    return move_cursor_to(viewer, world_point(voxel_zyx, layer.scale, layer.translate))


#: CT layer metadata key: the last segmentation of that layer's data (Segment dock or chat).
SEGMENTATION_CACHE_KEY = "tghmoe_segmentation"


class _LayerSegmentation:
    """A segmentation kept on the CT layer it was computed from, valid while the data is the same
    array (a layer whose data was replaced does not reuse it)."""

    def __init__(self, data: Any, result: Any) -> None:
        try:
            self._data: Callable[[], Any] = weakref.ref(data)
        except TypeError:
            self._data = lambda data=data: data
        self.shape = tuple(np.shape(data))
        self.result = result

    def valid_for(self, data: Any) -> bool:
        return self._data() is data and tuple(np.shape(data)) == self.shape


def remember_layer_segmentation(layer: Any, result: Any) -> None:
    """Keep ``result`` (a ``SegmentationResult`` of the layer's data) on the CT layer, so the
    Segment dock and the chat share one segmentation per layer."""
    layer = unproxied(layer)
    layer.metadata[SEGMENTATION_CACHE_KEY] = _LayerSegmentation(layer.data, result)


def layer_segmentation(layer: Any) -> Any:
    """The segmentation kept on ``layer`` for its current data, or None."""
    layer = unproxied(layer)
    entry = layer.metadata.get(SEGMENTATION_CACHE_KEY)
    if isinstance(entry, _LayerSegmentation) and entry.valid_for(layer.data):
        return entry.result
    return None


def plane_viewer_models(viewer: Any) -> dict[str, Any]:
    """The ``ViewerModel`` of each orthogonal plane view in ``viewer``'s window (the reading
    layout's or a docked ``OrthoViewsWidget``), by plane name; {} when there are none."""
    from napari_tghmoe._widgets import _napari_private
    from napari_tghmoe._widgets.ortho_views import PlaneView

    viewer = unproxied(viewer)
    if not _napari_private.has_qt_window(viewer):
        return {}
    models: dict[str, Any] = {}
    for view in _napari_private.main_qt_window(viewer).findChildren(PlaneView):
        models.setdefault(view.plane.name, view.viewer_model)
    return models


def connect_while_alive(widget: QObject, connections: list[tuple[Any, Callable[..., Any]]]) -> Callable[[], None]:
    """Connect psygnal ``(signal, slot)`` pairs until ``widget`` is destroyed.

    A psygnal signal (the conversation's) does not know when a Qt widget is deleted, and calling
    a slot of a deleted widget raises; so the pairs are disconnected on ``destroyed``. Returns the
    function that disconnects them now (a dock's ``shutdown``).
    """

    def disconnect(*_: Any) -> None:
        for signal, slot in connections:
            try:
                signal.disconnect(slot)
            except Exception:  # already disconnected
                pass

    for signal, slot in connections:
        signal.connect(slot)
    widget.destroyed.connect(disconnect)
    return disconnect
