"""Reading layouts as in 3D Slicer: Four-Up (the default), one plane + 3D, 3D only.

napari's main canvas (the 3D view) and the three plane views of ``OrthoViewsWidget`` are
placed as cells of one grid in the window's central area, so the planes get as much room
as the 3D view (a radiologist reads in the planes first). A double-click maximises a view
and a second one restores the layout. The choice is offered in a toolbar and in the View
menu and remembered in the plugin's settings file.

``layout_cells`` is the pure part (which view goes where); ``ReadingLayout`` only moves
widgets inside the central widget's layout: napari's canvas is never reparented.

While the user scrolls, clicks or windows in a plane view, the 3D cell keeps its last frame
and repaints once they pause (``Deferred3DRepaint``): without a GPU one 3D frame costs
seconds on a large CT, and a wheel step must not wait for it.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import QGridLayout, QMenu, QToolBar, QWidget

from napari_tghmoe._widgets import _napari_private

FOUR_UP = "Four-Up"
ONE_PLANE_3D = "One plane + 3D"
THREE_D_ONLY = "3D only"
LAYOUTS: tuple[str, ...] = (FOUR_UP, ONE_PLANE_3D, THREE_D_ONLY)
DEFAULT_LAYOUT = FOUR_UP
VIEW_3D = "3D"
LAYOUT_SETTING = "reading_layout"
TOOLBAR_NAME = "Reading layout"
#: How long the user must pause scrolling / clicking / windowing in a plane view before the
#: 3D view repaints (ms): longer than the gap between wheel notches of a continuous scroll.
REPAINT_3D_AFTER_MS = 300

#: Grid cells (row, column) per layout; Four-Up as Slicer places it (red axial top left,
#: 3D top right, yellow sagittal bottom left, green coronal bottom right).
_CELLS: dict[str, dict[str, tuple[int, int]]] = {
    FOUR_UP: {"axial": (0, 0), VIEW_3D: (0, 1), "sagittal": (1, 0), "coronal": (1, 1)},
    ONE_PLANE_3D: {"axial": (0, 0), VIEW_3D: (0, 1)},
    THREE_D_ONLY: {VIEW_3D: (0, 0)},
}


def layout_cells(layout: str, maximised: str | None = None) -> dict[str, tuple[int, int]]:
    """Which views are shown and where: ``{view name: (row, column)}``."""
    if maximised is not None:
        return {maximised: (0, 0)}
    if layout not in _CELLS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return dict(_CELLS[layout])


def settings_path() -> Path:
    from napari_tghmoe.transcript import user_data_dir

    return user_data_dir() / "viewer_settings.json"


def remembered_layout(settings_file: Path | None = None) -> str:
    """The layout chosen last time (the chat dock's settings mechanism), else Four-Up."""
    from napari_tghmoe._widgets.chat import load_settings

    name = load_settings(settings_file or settings_path()).get(LAYOUT_SETTING)
    return name if name in LAYOUTS else DEFAULT_LAYOUT


def remember_layout(name: str, settings_file: Path | None = None) -> None:
    from napari_tghmoe._widgets.chat import load_settings, save_settings

    path = settings_file or settings_path()
    settings = load_settings(path)
    settings[LAYOUT_SETTING] = name
    save_settings(settings, path)


class Deferred3DRepaint(QObject):
    """Holds back the 3D view's repaints while the user works in a plane view.

    Why: the 3D view ray-casts the bone surface through the whole volume on every repaint;
    with software OpenGL (Mesa llvmpipe, no GPU) that is over 1 s for the demo phantom and
    4-5 s for a 600 x 512 x 512 CT, and every wheel step in a plane view asks for one (the
    3D view's axial plane follows the cursor), so scrolling waited for the 3D view at each
    step. While ``hold`` keeps being called (each scroll, click or W/L drag step in a plane
    view) the 3D canvas's paint events are held back and it keeps showing its last frame;
    once the user has paused for ``delay_ms`` it repaints once, showing the latest state.
    Only paint events of the one canvas are held (Qt's public event filter); the models
    (cursor, plane position, window) change at once, as before.
    """

    def __init__(
        self, canvas: QWidget, delay_ms: int = REPAINT_3D_AFTER_MS, parent: QObject | None = None
    ) -> None:
        super().__init__(parent)
        self._canvas = canvas
        self._holding = False
        self._pending = False
        self.held_paints = 0  # paint events held back (for tests and the benchmark)
        self.catch_up_repaints = 0  # repaints asked for after a pause
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(delay_ms)
        self._timer.timeout.connect(self.release)
        # the pause is counted once the step's own events (its repaints) are through: a step
        # that keeps the event loop busy longer than delay_ms must not release before them
        self._start_countdown = QTimer(self)
        self._start_countdown.setSingleShot(True)
        self._start_countdown.setInterval(0)
        self._start_countdown.timeout.connect(self._timer.start)
        canvas.installEventFilter(self)

    @property
    def holding(self) -> bool:
        return self._holding

    def hold(self) -> None:
        """An interaction step in a plane view: hold repaints until ``delay_ms`` after the last."""
        self._holding = True
        self._timer.stop()
        self._start_countdown.start()

    def release(self) -> None:
        """Stop holding; repaint once if a paint was held back."""
        self._start_countdown.stop()
        self._timer.stop()
        self._holding = False
        if self._pending:
            self._pending = False
            self.catch_up_repaints += 1
            self._canvas.update()

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt API)
        if self._holding and watched is self._canvas and event.type() == QEvent.Type.Paint:
            self._pending = True
            self.held_paints += 1
            if not self._start_countdown.isActive():
                self._timer.start()  # the pause counts from the step's repaint, not its start
            return True
        return False

    def close(self) -> None:
        self.release()
        self._canvas.removeEventFilter(self)


def _find_menu(window: Any, title: str) -> QMenu | None:
    for action in window.menuBar().actions():
        if action.text().replace("&", "").strip().lower() == title.lower() and action.menu() is not None:
            return action.menu()
    return None


class ReadingLayout(QObject):
    """Places the 3D canvas and the plane views in the central area and switches layouts."""

    layout_changed = Signal(str)

    def __init__(
        self,
        napari_viewer: Any,
        ortho_views: Any,
        *,
        layout: str | None = None,
        settings_file: str | Path | None = None,
    ) -> None:
        window = _napari_private.main_qt_window(napari_viewer)
        super().__init__(window)
        self._viewer_ref = weakref.ref(napari_viewer)
        self._settings_file = Path(settings_file) if settings_file else None
        self.ortho_views = ortho_views
        self.views: dict[str, QWidget] = {VIEW_3D: _napari_private.main_qt_viewer(napari_viewer)}
        self.views.update(ortho_views.views)
        self.maximised: str | None = None

        # napari's central widget holds its QtViewer in an HBox: swap it for a grid inside that
        # same widget, so the GL canvas keeps its parent and the plane views join it
        center = _napari_private.main_central_widget(napari_viewer)
        outer = center.layout()
        outer.removeWidget(self.views[VIEW_3D])
        self.grid = QGridLayout()
        self.grid.setSpacing(3)
        self.grid.setContentsMargins(0, 0, 0, 0)
        outer.addLayout(self.grid)

        ortho_views.view_double_clicked.connect(self.toggle_maximised)
        #: The 3D cell repaints once the user pauses in the plane views (``Deferred3DRepaint``).
        self.repaint_3d: Deferred3DRepaint | None = Deferred3DRepaint(
            _napari_private.qt_viewer_canvas_widget(self.views[VIEW_3D]), parent=self
        )
        ortho_views.plane_interaction.connect(self._on_plane_interaction)
        callbacks = napari_viewer.mouse_double_click_callbacks
        for callback in list(callbacks):  # napari's double-click zoom gives way to maximise
            if getattr(callback, "__name__", "") == "double_click_to_zoom":
                callbacks.remove(callback)
        callbacks.append(self._on_main_double_click)

        from qtpy.QtGui import QAction, QActionGroup

        self.actions: dict[str, Any] = {}
        group = QActionGroup(self)
        group.setExclusive(True)
        for name in LAYOUTS:
            action = QAction(name, window)
            action.setCheckable(True)
            action.setToolTip(f"Layout: {name}")
            action.triggered.connect(lambda _checked=False, n=name: self.set_layout(n))
            group.addAction(action)
            self.actions[name] = action
        self.toolbar = QToolBar(TOOLBAR_NAME, window)
        self.toolbar.setObjectName("tghmoe_reading_layout_toolbar")
        self.toolbar.addWidget(_toolbar_label("Layout:"))
        for action in self.actions.values():
            self.toolbar.addAction(action)
        window.addToolBar(Qt.ToolBarArea.TopToolBarArea, self.toolbar)
        self.layout_menu = QMenu("Layout", window)
        for action in self.actions.values():
            self.layout_menu.addAction(action)
        view_menu = _find_menu(window, "View")
        if view_menu is not None:
            view_menu.addSeparator()
            view_menu.addMenu(self.layout_menu)

        self.current_layout = layout if layout in LAYOUTS else remembered_layout(self._settings_file)
        self._arrange()
        from napari_tghmoe._widgets.ortho_views import _CloseWatcher

        self._close_watcher = _CloseWatcher(self._on_window_close, self)
        window.installEventFilter(self._close_watcher)

    def _on_plane_interaction(self, _plane: str) -> None:
        viewer = self.viewer
        # only a 3D main canvas is held back: in 2D it is a slice view that must follow at once
        if self.repaint_3d is not None and viewer is not None and viewer.dims.ndisplay == 3:
            self.repaint_3d.hold()

    def set_defer_3d_repaint(self, enabled: bool) -> None:
        """On by default; off repaints the 3D view at every plane step (the benchmark's "before")."""
        if enabled and self.repaint_3d is None and VIEW_3D in self.views:
            self.repaint_3d = Deferred3DRepaint(
                _napari_private.qt_viewer_canvas_widget(self.views[VIEW_3D]), parent=self
            )
        elif not enabled and self.repaint_3d is not None:
            self.repaint_3d.close()
            self.repaint_3d = None

    def _on_window_close(self) -> None:
        """Let go of the canvases: napari deletes its window later, and checks for live QtViewers."""
        self.set_defer_3d_repaint(False)
        if self.ortho_views is not None:
            self.ortho_views.plane_interaction.disconnect(self._on_plane_interaction)
        viewer = self.viewer
        if viewer is not None and self._on_main_double_click in viewer.mouse_double_click_callbacks:
            viewer.mouse_double_click_callbacks.remove(self._on_main_double_click)
        for name, widget in list(self.views.items()):
            if name != VIEW_3D:
                self.grid.removeWidget(widget)
                widget.setParent(None)  # Python-owned again, freed with the plane views' controller
        self.views.clear()
        self.ortho_views = None

    # ------------------------------------------------------------------ state
    @property
    def viewer(self) -> Any:
        return self._viewer_ref()

    def shown_views(self) -> list[str]:
        """Names of the views on screen now (for tests and the status of the toolbar)."""
        return [name for name, widget in self.views.items() if not widget.isHidden()]

    def set_layout(self, name: str, remember: bool = True) -> None:
        """Switch to a layout (restoring any maximised view) and, by default, remember it."""
        if name not in LAYOUTS:
            raise ValueError(f"unknown layout {name!r}; expected one of {', '.join(LAYOUTS)}")
        self.current_layout = name
        self.maximised = None
        self._arrange()
        if remember:
            remember_layout(name, self._settings_file)
        self.layout_changed.emit(name)

    def toggle_maximised(self, view: str) -> None:
        """Double-click: the view fills the area; the same again restores the layout."""
        if view not in self.views:
            return
        self.maximised = None if self.maximised == view else view
        self._arrange()

    def _on_main_double_click(self, _viewer: Any, _event: Any) -> None:
        self.toggle_maximised(VIEW_3D)

    # ------------------------------------------------------------------ placing
    def _arrange(self) -> None:
        cells = layout_cells(self.current_layout, self.maximised)
        for widget in self.views.values():
            self.grid.removeWidget(widget)
        for name, widget in self.views.items():
            if name in cells:
                row, column = cells[name]
                self.grid.addWidget(widget, row, column)
                widget.show()
            else:
                widget.hide()
        rows = {row for row, _ in cells.values()}
        columns = {column for _, column in cells.values()}
        for index in range(2):  # equal cells: the planes are as large as the 3D view
            self.grid.setRowStretch(index, 1 if index in rows else 0)
            self.grid.setColumnStretch(index, 1 if index in columns else 0)
        for name, action in self.actions.items():
            action.setChecked(name == self.current_layout)
        QTimer.singleShot(0, self._fit_3d)

    def _fit_3d(self) -> None:
        viewer = self.viewer
        if viewer is not None and _napari_private.has_qt_window(viewer) and len(viewer.layers):
            viewer.fit_to_view()  # the 3D cell changed size


def _toolbar_label(text: str) -> QWidget:
    from qtpy.QtWidgets import QLabel

    label = QLabel(text)
    label.setContentsMargins(6, 0, 4, 0)
    return label
