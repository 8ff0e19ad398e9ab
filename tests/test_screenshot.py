"""A real window: the Four-Up layout (3D CT + three plane views) + docks, rendered under Xvfb,
not blank, the planes as large as the 3D view."""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QApplication


def _content_ok(rgb: np.ndarray, min_colours: int = 8) -> bool:
    """Real content: varied pixels and several distinct grey levels/colours."""
    rgb = np.asarray(rgb)[..., :3]
    distinct = len(np.unique(rgb.reshape(-1, 3)[:: max(1, rgb.size // 30000)], axis=0))
    return float(rgb.std()) > 8.0 and distinct >= min_colours


def test_reading_layout_renders_3d_and_three_planes(make_napari_viewer, tmp_path):
    from napari_tghmoe._widgets.layout import FOUR_UP
    from napari_tghmoe._widgets.main_window import save_window_screenshot, setup_viewer
    from napari_tghmoe.phantom import make_phantom

    volume = make_phantom(1, region="chest", shape=(24, 96, 128), spacing=(10.0, 3.0, 3.0)).volume
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1200, 800)
    workspace = setup_viewer(viewer, volume, layout=FOUR_UP)  # not the user's remembered layout
    QApplication.processEvents()

    assert viewer.dims.ndisplay == 3
    main_canvas = viewer.screenshot(canvas_only=True, flash=False)
    assert _content_ok(main_canvas), "3D canvas is blank"
    for name, view in workspace.ortho_views.views.items():
        plane = view.qt_viewer.screenshot(flash=False)
        assert _content_ok(plane), f"{name} view is blank"
        assert plane.shape[0] > 100 and plane.shape[1] > 100
        # Four-Up: each plane is about as large as the 3D view, not a strip under it
        assert plane.shape[0] * plane.shape[1] > 0.5 * main_canvas.shape[0] * main_canvas.shape[1], name

    path = save_window_screenshot(viewer, tmp_path / "window.png")
    import imageio.v3 as iio

    window = iio.imread(path)
    assert window.shape[0] >= 700 and window.shape[1] >= 1100  # the whole window, docks included
    assert _content_ok(window, min_colours=32)
