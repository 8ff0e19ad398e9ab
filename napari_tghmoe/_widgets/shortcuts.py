"""Keyboard shortcuts of the reading layout (PACS habits) and Help > Shortcuts.

``R`` resets the views, ``1``-``6`` pick the window presets in the order of
``WINDOW_PRESETS``. They are window-wide ``QShortcut``s, so they work whichever canvas has
the focus, while text fields (the chat's question box) keep their keys: Qt gives a focused
text field the key before any shortcut. The preset keys step aside while a layer with tools of
its own on those keys is the active one (napari's Labels: 1 erase, 2 paint, 3 fill...; Points
and Shapes likewise): a user editing a segmentation gets napari's tools, as in any napari.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QDialog, QLabel, QVBoxLayout, QWidget

from napari_tghmoe._widgets import _napari_private
from napari_tghmoe.layers import WINDOW_PRESETS

RESET_KEY = "R"
PRESET_KEYS: dict[str, str] = {str(index + 1): name for index, name in enumerate(WINDOW_PRESETS)}

#: What the help dialog lists: (keys or mouse gesture, what it does).
MOUSE_AND_KEYS: tuple[tuple[str, str], ...] = (
    ("Mouse wheel (plane view)", "next / previous slice"),
    ("Ctrl + wheel (plane view)", "zoom"),
    ("Right-drag or Ctrl + left-drag", "window (left-right) and level (up-down), live"),
    ("Left-drag", "pan"),
    ("Click (plane view)", "move the cursor; the other views follow"),
    ("Double-click", "maximise the view; double-click again to restore"),
    (RESET_KEY, "reset the views (fit every view, 3D from the front)"),
    *(
        (key, f"window preset: {name} (W {WINDOW_PRESETS[name].width:g} / L {WINDOW_PRESETS[name].level:g})")
        for key, name in PRESET_KEYS.items()
    ),
    ("1-6 with a Labels, Points or Shapes layer selected", "that layer's own tools (napari), not the presets"),
)


def presets_own_the_number_keys(layer: Any) -> bool:
    """Whether ``1``-``6`` pick window presets while ``layer`` is active: yes for an image (the CT)
    or no layer, no for the layers whose own tools napari puts on the number keys."""
    from napari.layers import Labels, Points, Shapes

    return not isinstance(layer, (Labels, Points, Shapes))


def shortcuts_html() -> str:
    rows = "".join(f"<tr><td><b>{keys}</b></td><td>&nbsp;&nbsp;{what}</td></tr>" for keys, what in MOUSE_AND_KEYS)
    return f"<table>{rows}</table>"


class ShortcutsDialog(QDialog):
    """Help > Shortcuts: the mouse and key bindings of the reading layout."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Mouse and keyboard shortcuts")
        label = QLabel(shortcuts_html())
        label.setTextFormat(Qt.TextFormat.RichText)
        QVBoxLayout(self).addWidget(label)


def install_shortcuts(
    viewer: Any,
    *,
    reset_views: Callable[[], None],
    apply_preset: Callable[[str], None],
) -> dict[str, Any]:
    """Bind ``R`` and ``1``-``6`` on the main window; add Help > Shortcuts. Returns the QShortcuts."""
    from qtpy.QtGui import QAction, QKeySequence, QShortcut

    window = _napari_private.main_qt_window(viewer)
    shortcuts: dict[str, Any] = {}

    def bind(key: str, callback: Callable[[], None]) -> None:
        shortcut = QShortcut(QKeySequence(key), window)
        shortcut.setContext(Qt.ShortcutContext.WindowShortcut)
        shortcut.activated.connect(callback)
        shortcuts[key] = shortcut

    bind(RESET_KEY, reset_views)
    for key, name in PRESET_KEYS.items():
        bind(key, lambda n=name: apply_preset(n))

    def follow_active_layer(event: Any = None) -> None:
        enabled = presets_own_the_number_keys(viewer.layers.selection.active)
        for key in PRESET_KEYS:
            shortcuts[key].setEnabled(enabled)

    viewer.layers.selection.events.active.connect(follow_active_layer)
    follow_active_layer()

    from napari_tghmoe._widgets.layout import _find_menu

    help_menu = _find_menu(window, "Help")
    action = QAction("Shortcuts (mouse and keys)...", window)
    dialog_holder: dict[str, ShortcutsDialog] = {}

    window_ref = weakref.ref(window)  # no strong reference from the window's own children

    def show_dialog() -> None:
        if window_ref() is None:
            return
        dialog = dialog_holder.get("dialog") or ShortcutsDialog(window_ref())
        dialog_holder["dialog"] = dialog
        dialog.show()
        dialog.raise_()

    action.triggered.connect(show_dialog)
    if help_menu is not None:
        help_menu.addAction(action)
    shortcuts["help_action"] = action

    def release() -> None:  # the callbacks hold the workspace; napari deletes the window later
        try:
            viewer.layers.selection.events.active.disconnect(follow_active_layer)
        except (TypeError, RuntimeError, ValueError):
            pass
        for shortcut in shortcuts.values():
            try:
                (shortcut.activated if hasattr(shortcut, "activated") else shortcut.triggered).disconnect()
            except (TypeError, RuntimeError):
                pass
        dialog_holder.clear()

    from napari_tghmoe._widgets.ortho_views import _CloseWatcher

    watcher = _CloseWatcher(release, window)
    window.installEventFilter(watcher)
    return shortcuts
