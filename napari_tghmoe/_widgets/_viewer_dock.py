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
