"""Window/level dock: CT presets in HU, the file's own window, manual W/L, 3D rendering,
and the overlays (routing, segmentation): shown or not, opacity, colour legend.

Acts on the selected image layer (else the top image layer), never on an overlay: showing,
selecting or fading an overlay leaves the CT's window as it was. Everything is applied
through public layer attributes (``contrast_limits``, ``rendering``, ``iso_threshold``,
``visible``, ``opacity``), so the orthogonal views, which mirror them, follow automatically.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Layer
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QLabel,
    QPushButton,
    QSlider,
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
#: Metadata keys that mark a layer as an overlay on the CT (routing view, segment dock).
OVERLAY_METADATA_KEYS = ("routing_overlay", "segmentation_result")
#: Metadata key an overlay may carry: ``{label value: name}`` for its legend.
LEGEND_KEY = "label_names"
_MAX_LEGEND_ROWS = 16


def is_overlay(layer: Layer) -> bool:
    """Routing and segmentation layers, and any other 3D labels layer, drawn over the CT."""
    if layer.metadata.get(VIEW_3D_ONLY_KEY):
        return False
    if any(layer.metadata.get(key) is not None and layer.metadata.get(key) is not False for key in OVERLAY_METADATA_KEYS):
        return True
    return isinstance(layer, Labels) and layer.ndim == 3


def overlay_legend(layer: Layer) -> list[tuple[str, tuple[float, float, float, float]]]:
    """(name, RGBA 0-1) per colour of an overlay: label names for labels, a ramp for heatmaps."""
    if isinstance(layer, Labels):
        names: dict[int, str] = {}
        features = getattr(layer, "features", None)
        if features is not None and "index" in features and "structure" in features:
            names = {int(i): str(n) for i, n in zip(features["index"], features["structure"])}
        names = names or {int(k): str(v) for k, v in (layer.metadata.get(LEGEND_KEY) or {}).items()}
        if not names:
            present = np.unique(np.asarray(layer.data))
            names = {int(v): f"label {int(v)}" for v in present[:_MAX_LEGEND_ROWS]}
        values = [v for v in sorted(names) if v != 0][:_MAX_LEGEND_ROWS]
        if not values:
            return []
        colors = np.asarray(layer.colormap.map(np.asarray(values)), dtype=float).reshape(len(values), 4)
        return [(names[v], tuple(float(c) for c in color)) for v, color in zip(values, colors)]
    if isinstance(layer, Image):
        low, high = (float(v) for v in layer.contrast_limits)
        colors = np.asarray(layer.colormap.map(np.array([0.0, 0.5, 1.0])), dtype=float).reshape(3, 4)
        labels = (f"{low:.3g}", f"{(low + high) / 2:.3g}", f"{high:.3g}")
        return [(text, tuple(float(c) for c in color)) for text, color in zip(labels, colors)]
    return []


def _legend_html(entries: list[tuple[str, tuple[float, float, float, float]]]) -> str:
    cells = []
    for name, (r, g, b, _a) in entries:
        colour = f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"
        cells.append(f"<span style='color:{colour}; font-size:14px'>&#9632;</span>&nbsp;{name}")
    return "&nbsp;&nbsp; ".join(cells)


class OverlayControls(QGroupBox):
    """One row per overlay: a "show" box (off until the user ticks it), opacity, legend."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__("Overlays", parent)
        self._viewer_ref = weakref.ref(napari_viewer)
        self._layout = QVBoxLayout(self)
        self.empty_label = QLabel("none yet (routing: chat dock; segmentation: Segment dock)")
        self.empty_label.setWordWrap(True)
        self._layout.addWidget(self.empty_label)
        self.rows: dict[int, tuple[Layer, QCheckBox, QSlider, QLabel, QWidget]] = {}
        napari_viewer.layers.events.inserted.connect(self.refresh)
        napari_viewer.layers.events.removed.connect(self.refresh)
        self.refresh()

    def overlay_layers(self) -> list[Layer]:
        viewer = self._viewer_ref()
        return [layer for layer in viewer.layers if is_overlay(layer)] if viewer is not None else []

    def refresh(self, _event: Any = None) -> None:
        layers = self.overlay_layers()
        keep = {id(layer) for layer in layers}
        for key in [key for key in self.rows if key not in keep]:
            layer, box, slider, legend, row = self.rows.pop(key)
            layer.events.visible.disconnect(self._sync_rows)
            layer.events.opacity.disconnect(self._sync_rows)
            layer.events.name.disconnect(self._sync_rows)
            row.setParent(None)
            row.deleteLater()
        for layer in layers:
            if id(layer) not in self.rows:
                self._add_row(layer)
        self.empty_label.setVisible(not layers)
        self._sync_rows()

    def _add_row(self, layer: Layer) -> None:
        row = QWidget()
        grid = QGridLayout(row)
        grid.setContentsMargins(0, 2, 0, 2)
        box = QCheckBox()
        box.setToolTip("Show this overlay over the CT (the CT's window is not changed)")
        slider = QSlider(Qt.Orientation.Horizontal)
        slider.setRange(0, 100)
        slider.setToolTip("Overlay opacity")
        legend = QLabel()
        legend.setWordWrap(True)
        legend.setTextFormat(Qt.TextFormat.RichText)
        grid.addWidget(box, 0, 0, 1, 2)
        grid.addWidget(QLabel("Opacity"), 1, 0)
        grid.addWidget(slider, 1, 1)
        grid.addWidget(legend, 2, 0, 1, 2)
        box.toggled.connect(lambda checked, ref=weakref.ref(layer): _set_attribute(ref, "visible", bool(checked)))
        slider.valueChanged.connect(lambda value, ref=weakref.ref(layer): _set_attribute(ref, "opacity", value / 100.0))
        for emitter in (layer.events.visible, layer.events.opacity, layer.events.name):
            emitter.connect(self._sync_rows)
        self._layout.addWidget(row)
        self.rows[id(layer)] = (layer, box, slider, legend, row)

    def _sync_rows(self, _event: Any = None) -> None:
        for layer, box, slider, legend, _row in self.rows.values():
            for widget in (box, slider):
                widget.blockSignals(True)
            box.setText(layer.name)
            box.setChecked(bool(layer.visible))
            slider.setValue(int(round(float(layer.opacity) * 100)))
            for widget in (box, slider):
                widget.blockSignals(False)
            slider.setEnabled(bool(layer.visible))
            legend.setText(_legend_html(overlay_legend(layer)))
            legend.setVisible(bool(layer.visible))


def _set_attribute(layer_ref: weakref.ReferenceType, name: str, value: Any) -> None:
    layer = layer_ref()
    if layer is not None:
        setattr(layer, name, value)


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
        self.overlays = OverlayControls(napari_viewer)
        layout.addWidget(self.overlays)
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
        """The selected image layer, else the topmost image layer, else None; never an
        overlay or a 3D-only helper (their windows are not the CT's)."""
        viewer = self.viewer
        if viewer is None:
            return None

        def is_target(layer: Any) -> bool:
            return (
                isinstance(layer, Image)
                and not layer.rgb
                and not layer.metadata.get(VIEW_3D_ONLY_KEY)
                and not is_overlay(layer)
            )

        active = viewer.layers.selection.active
        if is_target(active):
            return active
        images = [layer for layer in viewer.layers if is_target(layer)]
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
