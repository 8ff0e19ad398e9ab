"""Every use of napari's private API in this plugin, in one place.

napari has no public orthogonal-view component (napari/napari#662) and no public handle on
its main Qt window, so the few private attributes we need are reached only from here;
when napari changes them, this is the one file to fix.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
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


def scene_canvas(qt_viewer: Any) -> Any:
    """The vispy ``SceneCanvas`` behind a ``QtViewer`` (its ``events.draw`` counts real renders)."""
    return qt_viewer.canvas._scene_canvas


class _SliceOnHiddenAxesOnly:
    """Stands in for napari's ``ViewerModel._update_layers`` on ``dims.point`` changes.

    napari re-slices every layer whenever ``dims.point`` changes, although a layer's slice
    depends only on the point along the axes that are *not* displayed (napari's
    ``_SliceInput`` says so itself). In a 3D view every axis is displayed, so each cursor
    move from a plane view re-sliced the whole volume into the same slice: for a
    600 x 512 x 512 int16 CT an int16 -> float32 copy of the full array and a 3D texture
    upload per 3D layer, several seconds per wheel step on a 2-core machine. Here the
    update runs only when an axis that is not displayed moved (or the number of axes
    changed); napari's other triggers (``ndisplay``, ``order``, margins, new layers) are
    left connected and always re-slice.
    """

    def __init__(self, viewer_model: Any) -> None:
        self._viewer_ref = weakref.ref(viewer_model)  # no cycle through the viewer's own events
        self._last_point = tuple(viewer_model.dims.point)
        self.skipped = 0  # cursor moves that needed no re-slicing (for tests and benchmarks)
        self.sliced = 0

    def __call__(self, _event: Any = None) -> None:
        viewer_model = self._viewer_ref()
        if viewer_model is None:
            return
        dims = viewer_model.dims
        point = tuple(dims.point)
        previous, self._last_point = self._last_point, point
        moved = len(previous) != len(point) or any(previous[a] != point[a] for a in dims.not_displayed)
        if moved:
            self.sliced += 1
            viewer_model._update_layers()
        else:
            self.skipped += 1


def slice_on_hidden_axes_only(viewer_model: Any) -> tuple[_SliceOnHiddenAxesOnly, Callable[[], None]]:
    """Make ``viewer_model`` re-slice on cursor moves only when a non-displayed axis moved.

    Returns the stand-in (its ``skipped`` / ``sliced`` counters) and a function restoring
    napari's own connection. Private: napari connects ``ViewerModel._update_layers`` to
    ``dims.events.point`` and ``dims.events.current_step``.
    """
    stand_in = _SliceOnHiddenAxesOnly(viewer_model)
    for emitter in (viewer_model.dims.events.point, viewer_model.dims.events.current_step):
        emitter.disconnect(viewer_model._update_layers)
        emitter.connect(stand_in, position="first")
    viewer_ref = weakref.ref(viewer_model)

    def restore() -> None:
        viewer = viewer_ref()
        if viewer is None:
            return
        for emitter in (viewer.dims.events.point, viewer.dims.events.current_step):
            emitter.disconnect(stand_in)
            if not any(isinstance(callback, _SliceOnHiddenAxesOnly) for callback in emitter.callbacks):
                emitter.connect(viewer._update_layers, position="first")  # no other stand-in left

    return stand_in, restore
