"""Every use of napari's private API in this plugin, in one place.

napari has no public orthogonal-view component (napari/napari#662) and no public handle on
its main Qt window, so the few private attributes we need are reached only from here;
when napari changes them, this is the one file to fix.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QMainWindow, QWidget


def main_qt_window(viewer: Any) -> QMainWindow:
    """The QMainWindow of a napari ``Viewer`` (``viewer.window._qt_window``)."""
    return viewer.window._qt_window


def has_qt_window(viewer: Any) -> bool:
    """False once the viewer's window was closed (napari deletes ``_qt_window``)."""
    window = getattr(viewer, "window", None)
    return window is not None and hasattr(window, "_qt_window")


def grab_window(viewer: Any) -> Any:
    """A QImage of the whole main window (canvas, docks, menus) as it is on screen."""
    return main_qt_window(viewer).grab().toImage()


def qt_viewer_canvas_widget(qt_viewer: Any) -> QWidget:
    """The native Qt widget of a ``QtViewer``'s vispy canvas (for mouse tests, grabs)."""
    return qt_viewer.canvas.native


def hide_qt_viewer_chrome(qt_viewer: Any) -> None:
    """Hide the welcome overlay of an embedded ``QtViewer``: we only want canvas + slider."""
    welcome = getattr(qt_viewer, "_welcome_widget", None)
    if welcome is not None:
        welcome.hide()


def main_qt_viewer(viewer: Any) -> QWidget:
    """The main canvas' ``QtViewer`` (``viewer.window._qt_viewer``): a cell of the reading layout."""
    return viewer.window._qt_viewer


def main_central_widget(viewer: Any) -> QWidget:
    """The QMainWindow's central widget, which napari lays out as an HBox around its QtViewer."""
    return main_qt_window(viewer).centralWidget()
