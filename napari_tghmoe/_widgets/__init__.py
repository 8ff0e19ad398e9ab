"""Qt widgets of the plugin (dock widgets and the reading layout). Qt only via qtpy.

Imported lazily by napari through the manifest; nothing here imports torch.
"""

from napari_tghmoe._widgets.ortho_views import OrthoViewsWidget
from napari_tghmoe._widgets.window_level import WindowLevelWidget

__all__ = ["OrthoViewsWidget", "WindowLevelWidget"]
