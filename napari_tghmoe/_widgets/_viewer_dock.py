"""What every dock bound to one viewer's CT layers shares: following the layer list, and shutting
down with the viewer's window (a dock widget gets no close event of its own when the window
closes, so long work would outlive it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtCore import QEvent, QObject


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
        from napari_tghmoe._widgets.chat import volume_from_layer

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

        if _napari_private.has_qt_window(self.viewer):
            self._main_window = _napari_private.main_qt_window(self.viewer)
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
