"""Window/level dock: CT presets in HU, the file's own window, manual W/L, 3D rendering.

Acts on the selected image layer (else the top image layer). Everything is applied through
public layer attributes (``contrast_limits``, ``rendering``, ``iso_threshold``), so the
orthogonal views, which mirror ``contrast_limits``, follow automatically.
"""

from __future__ import annotations

import weakref
from typing import Any

from napari.layers import Image
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from superqt import QLabeledSlider

from napari_tghmoe._widgets.ortho_views import VIEW_3D_ONLY_KEY
from napari_tghmoe.layers import (
    BONE_ISO_THRESHOLD_HU,
    RENDERING_MODES,
    WINDOW_PRESETS,
    contrast_limits_to_window,
    ct_volume_of,
    file_contrast_limits,
    window_to_contrast_limits,
)

FROM_FILE = "from file"
_WIDTH_RANGE = (1, 4000)
_LEVEL_RANGE = (-1200, 3000)


class WindowLevelWidget(QWidget):
    """Dock widget setting the display window of a CT image layer."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._viewer_ref = weakref.ref(napari_viewer)
        self._layer_ref: weakref.ReferenceType | None = None
        self._updating = False

        self.layer_label = QLabel("no CT layer")
        self.layer_label.setWordWrap(True)

        self.preset_buttons: dict[str, QPushButton] = {}
        presets_box = QGroupBox("Window presets (W / L in HU)")
        grid = QGridLayout(presets_box)
        names = [*WINDOW_PRESETS, FROM_FILE]
        for index, name in enumerate(names):
            if name == FROM_FILE:
                button = QPushButton("From file")
                button.setToolTip("The window stored in the file (DICOM Window Center/Width)")
            else:
                preset = WINDOW_PRESETS[name]
                button = QPushButton(name.capitalize())
                button.setToolTip(f"W {preset.width:g} / L {preset.level:g} HU")
            button.clicked.connect(lambda _checked=False, n=name: self.apply_preset(n))
            grid.addWidget(button, index // 3, index % 3)
            self.preset_buttons[name] = button

        self.width_slider = QLabeledSlider(Qt.Orientation.Horizontal)
        self.width_slider.setRange(*_WIDTH_RANGE)
        self.level_slider = QLabeledSlider(Qt.Orientation.Horizontal)
        self.level_slider.setRange(*_LEVEL_RANGE)
        self.width_slider.valueChanged.connect(self._on_slider)
        self.level_slider.valueChanged.connect(self._on_slider)
        manual = QGroupBox("Manual")
        form = QFormLayout(manual)
        form.addRow("Width", self.width_slider)
        form.addRow("Level", self.level_slider)

        self.rendering_combo = QComboBox()
        self.rendering_combo.addItems(list(RENDERING_MODES))
        self.rendering_combo.setToolTip(
            f"3D rendering of the CT; the iso-surface shows bone at {BONE_ISO_THRESHOLD_HU:g} HU"
        )
        self.rendering_combo.currentTextChanged.connect(self.set_rendering)
        rendering_box = QGroupBox("3D rendering")
        QVBoxLayout(rendering_box).addWidget(self.rendering_combo)

        layout = QVBoxLayout(self)
        layout.addWidget(self.layer_label)
        layout.addWidget(presets_box)
        layout.addWidget(manual)
        layout.addWidget(rendering_box)
        layout.addStretch(1)

        napari_viewer.layers.selection.events.active.connect(self._on_selection)
        napari_viewer.layers.events.inserted.connect(self._on_selection)
        napari_viewer.layers.events.removed.connect(self._on_selection)
        self._on_selection()

    # ----------------------------------------------------------------- targeting
    @property
    def viewer(self) -> Any:
        return self._viewer_ref()

    def target_layer(self) -> Image | None:
        """The selected image layer, else the topmost image layer, else None."""
        viewer = self.viewer
        if viewer is None:
            return None
        active = viewer.layers.selection.active
        if isinstance(active, Image) and not active.rgb:
            return active
        images = [
            layer
            for layer in viewer.layers
            if isinstance(layer, Image) and not layer.rgb and not layer.metadata.get(VIEW_3D_ONLY_KEY)
        ]
        return images[-1] if images else None

    def _on_selection(self, _event: Any = None) -> None:
        layer = self.target_layer()
        previous = self._layer_ref() if self._layer_ref is not None else None
        if previous is not None and previous is not layer:
            previous.events.contrast_limits.disconnect(self._sync_from_layer)
        self._layer_ref = weakref.ref(layer) if layer is not None else None
        if layer is not None and layer is not previous:
            layer.events.contrast_limits.connect(self._sync_from_layer)
        has_file_window = layer is not None and self._file_limits(layer) is not None
        self.preset_buttons[FROM_FILE].setEnabled(has_file_window)
        for widget in (self.width_slider, self.level_slider, self.rendering_combo):
            widget.setEnabled(layer is not None)
        for name, button in self.preset_buttons.items():
            if name != FROM_FILE:
                button.setEnabled(layer is not None)
        if layer is None:
            self.layer_label.setText("no CT layer: open a CT (File > Open) or a sample")
            return
        self.layer_label.setText(f"Layer: <b>{layer.name}</b>")
        self._sync_from_layer()
        shown = "plane" if str(layer.depiction) == "plane" else str(layer.rendering)
        label = next((text for text, value in RENDERING_MODES.items() if value == shown), None)
        if label is not None:
            self._updating = True
            self.rendering_combo.setCurrentText(label)
            self._updating = False

    @staticmethod
    def _file_limits(layer: Image) -> tuple[float, float] | None:
        volume = ct_volume_of(layer)
        return file_contrast_limits(volume) if volume is not None else None

    # ---------------------------------------------------------------- applying
    def apply_preset(self, name: str) -> None:
        """Apply a named preset (see ``WINDOW_PRESETS``) or "from file" to the layer."""
        layer = self.target_layer()
        if layer is None:
            return
        if name == FROM_FILE:
            limits = self._file_limits(layer)
            if limits is None:
                return
        else:
            limits = WINDOW_PRESETS[name].contrast_limits
        layer.contrast_limits = limits

    def set_window(self, level: float, width: float) -> None:
        layer = self.target_layer()
        if layer is not None:
            layer.contrast_limits = window_to_contrast_limits(level, width)

    def set_rendering(self, label: str) -> None:
        """3D rendering by its label in ``RENDERING_MODES`` (iso-surface uses bone HU)."""
        layer = self.target_layer()
        if layer is None or self._updating or label not in RENDERING_MODES:
            return
        mode = RENDERING_MODES[label]
        if mode == "plane":
            layer.plane.normal = (1.0, 0.0, 0.0)  # axial, at the cursor (the reading layout follows it)
            layer.depiction = "plane"
            return
        if mode == "iso":
            layer.iso_threshold = BONE_ISO_THRESHOLD_HU
        layer.depiction = "volume"
        layer.rendering = mode

    def _on_slider(self, _value: int) -> None:
        if not self._updating:
            self.set_window(self.level_slider.value(), self.width_slider.value())

    def _sync_from_layer(self, _event: Any = None) -> None:
        layer = self._layer_ref() if self._layer_ref is not None else None
        if layer is None:
            return
        level, width = contrast_limits_to_window(layer.contrast_limits)
        self._updating = True
        try:
            self.width_slider.setValue(int(round(min(max(width, _WIDTH_RANGE[0]), _WIDTH_RANGE[1]))))
            self.level_slider.setValue(int(round(min(max(level, _LEVEL_RANGE[0]), _LEVEL_RANGE[1]))))
        finally:
            self._updating = False
