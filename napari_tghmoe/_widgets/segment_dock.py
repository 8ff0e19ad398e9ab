"""The "Segment" dock: segment the CT layer with a Med3DInsight model, show and save the result.

A thin view: ``napari_tghmoe.med3d.segment_volume`` does the work in a napari
``thread_worker`` (progress and Stop through callbacks, so the viewer keeps drawing),
``napari_tghmoe.segmentation_layers`` turns the result into layer data and table rows, and
``napari_tghmoe.seg_export`` writes NIfTI and DICOM SEG. The Labels layer carries the CT
layer's scale and translate, so it lines up in 3D and in the orthogonal plane views (which
mirror every 3D labels layer); clicking a finding moves the shared cursor (``dims.point``)
that all planes follow.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Points
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_tghmoe import segmentation_layers as seglayers
from napari_tghmoe.io._types import CTVolume
from napari_tghmoe.layers import ct_volume_of
from napari_tghmoe._widgets._viewer_dock import (
    ViewerDockMixin,
    move_cursor_to,
    remember_layer_segmentation,
    select_model_folder,
)
from napari_tghmoe._widgets.ortho_views import VIEW_3D_ONLY_KEY

SEGMENT_DOCK_NAME = "Segment"
OPEN_FOLDER_ITEM = "Open model folder..."
DEMO_ITEM = "Demo segmentation model (bundled)"


def demo_seg_model_path() -> Path | None:
    """``resources/demo-seg-model`` (it may be missing in a checkout without the demo)."""
    from napari_tghmoe._resources import resource_path

    try:
        return resource_path("demo-seg-model")
    except FileNotFoundError:
        return None


def _short(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class SegmentDock(ViewerDockMixin, QWidget):
    """Segment dock: CT layer and model pickers, Segment/Stop, structure table, findings, save."""

    segmentation_finished = Signal(object)  # the Labels layer
    busy_changed = Signal(bool)
    progress_changed = Signal(int, int)  # done, total; emitted from the worker thread (queued)

    def __init__(self, napari_viewer: Any, *, model_path: str | Path | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.result: Any = None  # SegmentationResult of the last run
        self.volume: CTVolume | None = None  # the CT it was computed on
        self.labels_layer: Labels | None = None
        self.points_layer: Points | None = None
        self.findings: list[Any] = []
        self.structures_rows: list[seglayers.StructureRow] = []
        self._geometry: tuple[str, tuple[float, ...], tuple[float, ...]] | None = None  # ct name, scale, translate
        self._worker: Any = None
        self._stop_event = threading.Event()
        self._done_event = threading.Event()
        self._done_event.set()
        self._closing = False
        self._build_ui()
        self._fill_model_picker(model_path)
        self._refresh_layers()
        self._connect_viewer()
        self._watch_main_window()
        self._set_busy(False)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("CT layer to segment (the selected image layer by default)")
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Med3DInsight segmentation model folder (safetensors)")
        form = QGridLayout()
        form.addWidget(QLabel("CT layer"), 0, 0)
        form.addWidget(self.layer_combo, 0, 1)
        form.addWidget(QLabel("Model"), 1, 0)
        form.addWidget(self.model_combo, 1, 1)
        form.setColumnStretch(1, 1)

        self.segment_button = QPushButton("Segment")
        self.stop_button = QPushButton("Stop")
        buttons = QHBoxLayout()
        buttons.addWidget(self.segment_button)
        buttons.addWidget(self.stop_button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label = QLabel("Pick a CT layer and press Segment.")
        self.status_label.setWordWrap(True)

        self.structures_table = QTableWidget(0, 2)
        self.structures_table.setHorizontalHeaderLabels(["Structure", "Volume (mL)"])
        self.structures_table.verticalHeader().setVisible(False)
        self.structures_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.structures_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.structures_table.setMinimumHeight(120)

        self.findings_list = QListWidget()
        self.findings_list.setToolTip("Click a finding to move the cursor (all planes) to it")
        self.findings_list.setMinimumHeight(70)

        self.save_nifti_button = QPushButton("Save NIfTI...")
        self.save_nifti_button.setToolTip("Label map on the CT's grid and affine (.nii.gz) plus .labels.json")
        self.save_seg_button = QPushButton("Save DICOM SEG...")
        self.identifiers_check = QCheckBox("include identifiers")
        self.identifiers_check.setToolTip("Keep patient name/ID from the source DICOM in the SEG (off by default)")
        save_row = QHBoxLayout()
        save_row.addWidget(self.save_nifti_button)
        save_row.addWidget(self.save_seg_button)
        save_row.addWidget(self.identifiers_check)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status_label)
        layout.addWidget(QLabel("Structures"))
        layout.addWidget(self.structures_table, 2)
        layout.addWidget(QLabel("Findings"))
        layout.addWidget(self.findings_list, 1)
        layout.addLayout(save_row)

        self.segment_button.clicked.connect(lambda: self.segment())
        self.stop_button.clicked.connect(self.stop)
        self.model_combo.activated.connect(self._on_model_activated)
        self.findings_list.itemClicked.connect(lambda item: self.go_to_finding(self.findings_list.row(item)))
        self.findings_list.currentRowChanged.connect(self._on_finding_row)
        self.save_nifti_button.clicked.connect(self._save_nifti_dialog)
        self.save_seg_button.clicked.connect(self._save_dicom_seg_dialog)
        self.progress_changed.connect(self._on_progress)

    def _fill_model_picker(self, model_path: str | Path | None) -> None:
        combo = self.model_combo
        combo.blockSignals(True)
        combo.clear()
        demo = demo_seg_model_path()
        combo.addItem(DEMO_ITEM, str(demo) if demo is not None else "")
        combo.addItem(OPEN_FOLDER_ITEM, None)
        if model_path:
            self._insert_model(model_path)
        else:
            combo.setCurrentIndex(0)
        self._model_index = combo.currentIndex()
        combo.blockSignals(False)

    def _insert_model(self, folder: str | Path) -> None:
        self._model_index = select_model_folder(self.model_combo, folder)

    def set_model_folder(self, folder: str | Path) -> None:
        """Choose a model folder, as "Open model folder..." does."""
        self._insert_model(folder)

    def model_path(self) -> str | None:
        """The chosen folder (None: the segmenter's default, the bundled demo)."""
        data = self.model_combo.itemData(self.model_combo.currentIndex())
        return str(data) if data else None

    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemData(index) is None:  # "Open model folder..."
            self.model_combo.setCurrentIndex(self._model_index)
            folder = QFileDialog.getExistingDirectory(self, "Open segmentation model folder", str(Path.home()))
            if folder:
                self.set_model_folder(folder)
            return
        self._model_index = index

    # ------------------------------------------------------------------ layers
    def _ct_layers(self) -> list[Image]:
        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image)
            and layer.ndim == 3
            and not layer.rgb
            and not layer.metadata.get(VIEW_3D_ONLY_KEY)
            and not layer.name.startswith("routing:")
        ]

    def _refresh_layers(self, _event: Any = None) -> None:
        if self._closing:
            return
        current = self.layer_combo.currentText()
        layers = self._ct_layers()
        names = [layer.name for layer in layers]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        active = self.viewer.layers.selection.active
        if isinstance(active, Image) and active.name in names:
            self.layer_combo.setCurrentText(active.name)
        elif current in names:
            self.layer_combo.setCurrentText(current)
        elif names:
            with_volume = [layer.name for layer in layers if ct_volume_of(layer) is not None]
            self.layer_combo.setCurrentText((with_volume or names)[-1])
        self.layer_combo.blockSignals(False)
        if self.labels_layer is not None and self.labels_layer not in self.viewer.layers:
            self.labels_layer = None
        if self.points_layer is not None and self.points_layer not in self.viewer.layers:
            self.points_layer = None

    def _on_active_layer(self, _event: Any = None) -> None:
        active = self.viewer.layers.selection.active
        if isinstance(active, Image) and active in self._ct_layers():
            self._refresh_layers()

    def current_layer(self) -> Image | None:
        name = self.layer_combo.currentText()
        return next((layer for layer in self._ct_layers() if layer.name == name), None)

    # ------------------------------------------------------------------ segmenting
    @property
    def is_busy(self) -> bool:
        return self._worker is not None

    def segment(self) -> bool:
        """Segment the chosen CT layer in a worker; False (with a notification) if it cannot start."""
        from napari.qt.threading import create_worker

        if self.is_busy:
            show_info("Segmentation is running: press Stop first.")
            return False
        volume = self._selected_volume()
        if volume is None:
            return False
        layer = self.current_layer()
        model_dir = self.model_path()
        stop_event, done_event = threading.Event(), threading.Event()
        self._stop_event, self._done_event = stop_event, done_event
        progress = self.progress_changed.emit

        def run():
            from napari_tghmoe.med3d import segment_volume

            try:
                yield "started"
                result = segment_volume(volume, model_dir, progress=progress, should_stop=stop_event.is_set)
                yield result
            finally:
                done_event.set()

        geometry = (
            layer.name,
            tuple(float(s) for s in np.asarray(layer.scale)[-3:]),
            tuple(float(t) for t in np.asarray(layer.translate)[-3:]),
        )
        worker = create_worker(run, _start_thread=False, _ignore_errors=True)  # errors: _on_error
        worker.yielded.connect(lambda item, v=volume, g=geometry: self._on_yielded(item, v, g))
        worker.errored.connect(lambda err, m=model_dir: self._on_error(err, m))
        worker.finished.connect(lambda w=worker: self._on_finished(w))
        self._worker = worker
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label.setText(f"Segmenting {layer.name} with {Path(model_dir).name if model_dir else 'the demo model'}...")
        self._set_busy(True)
        worker.start()
        return True

    def stop(self) -> None:
        """Ask the running segmentation to end (the segmenter checks between windows)."""
        self.request_stop()
        if self.is_busy:
            self.status_label.setText("Stopping...")

    def request_stop(self) -> None:
        """The thread-safe part of :meth:`stop` (no widget is touched): callable from any thread,
        e.g. from a progress callback in the worker itself."""
        self._stop_event.set()

    def _on_progress(self, done: int, total: int) -> None:
        if self._closing or not self.is_busy:
            return
        self.progress_bar.setRange(0, max(int(total), 1))
        self.progress_bar.setValue(int(done))

    def _on_yielded(self, item: Any, volume: CTVolume, geometry: tuple) -> None:
        if self._closing or isinstance(item, str):
            return
        self.show_result(item, volume, geometry)
        for warning in getattr(item, "warnings", ()) or ():
            show_info(warning)  # e.g. an oblique series was resampled to the patient axes

    def _on_error(self, err: BaseException, model_dir: str | None) -> None:
        from napari_tghmoe.med3d.types import SegmentationStopped

        if self._closing:
            return
        if isinstance(err, SegmentationStopped):
            self.status_label.setText("Segmentation stopped.")
            show_info("Segmentation stopped.")
            return
        message = _short(err)
        where = model_dir or "the demo model"
        if where not in message:
            message = f"{where}: {message}"
        self._report_error(f"Segmentation failed: {message}")

    def _on_finished(self, worker: Any) -> None:
        if worker is self._worker:
            self._worker = None
        if not self._closing:
            self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        self.segment_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        self._update_save_buttons()
        self.busy_changed.emit(busy)

    def _report_error(self, message: str) -> None:
        show_error(message)
        if not self._closing:
            self.status_label.setText(message)

    # ------------------------------------------------------------------ showing
    def show_result(self, result: Any, volume: CTVolume, geometry: tuple) -> Labels:
        """Add (or update) the Labels and Points layers and fill the tables."""
        ct_name, scale, translate = geometry
        self.result, self.volume, self._geometry = result, volume, geometry
        data, kwargs, _ = seglayers.labels_layer_data(result, ct_name, scale, translate, volume=volume)
        kwargs.update(self._ct_units(ct_name))
        # napari 0.9.2: a 3D status update on an *active* Labels layer with features, before the
        # mouse has been over the canvas, fails (np.asarray(None) as view direction). So the
        # layer gets its features once the CT is the active layer again.
        features = kwargs.pop("features")
        existing = self._layer_named(kwargs["name"], Labels)
        if existing is not None and existing.data.shape == data.shape:
            existing.data = data
            for key in ("scale", "translate", "colormap", "metadata"):
                setattr(existing, key, kwargs[key])
            self.labels_layer = existing
        else:
            if existing is not None:
                self.viewer.layers.remove(existing)
            self.labels_layer = self.viewer.add_labels(data, **kwargs)
        self.findings = seglayers.sorted_findings(result)
        self._show_findings_layer()
        ct_layer = self._ct_layer_named(ct_name)
        if ct_layer is not None:
            if tuple(np.shape(ct_layer.data)) == tuple(np.shape(result.labels)):
                remember_layer_segmentation(ct_layer, result)  # the chat places stated findings with it
            self.viewer.layers.selection.active = ct_layer  # keep the CT the active layer (W/L, chat)
        self.labels_layer.features = features  # hover names (napari's status bar)
        self._fill_structures(seglayers.structure_rows(result, scale))
        self._fill_findings()
        self.status_label.setText(
            f"{len(self.structures_rows)} structures, {len(self.findings)} findings "
            f"in {float(result.seconds):.1f} s ({result.model_name})"
        )
        self._update_save_buttons()
        self.segmentation_finished.emit(self.labels_layer)
        return self.labels_layer

    def _ct_layer_named(self, name: str) -> Image | None:
        return next((layer for layer in self._ct_layers() if layer.name == name), None)

    def _ct_units(self, ct_name: str) -> dict[str, Any]:
        """The CT layer's world units (mm for our readers), so every layer agrees on them."""
        ct_layer = self._ct_layer_named(ct_name)
        return {"units": tuple(ct_layer.units)[-3:]} if ct_layer is not None else {}

    def _layer_named(self, name: str, kind: type) -> Any:
        return next((layer for layer in self.viewer.layers if layer.name == name and isinstance(layer, kind)), None)

    def _show_findings_layer(self) -> Points | None:
        """The findings as a Points layer with their names (re-added if the user removed it)."""
        if self.result is None or not self.findings or self._geometry is None:
            return None
        ct_name, scale, translate = self._geometry
        data, kwargs, _ = seglayers.points_layer_data(self.result, ct_name, scale, translate)
        kwargs.update(self._ct_units(ct_name))
        existing = self._layer_named(kwargs["name"], Points)
        if existing is not None:
            self.viewer.layers.remove(existing)
        self.points_layer = self.viewer.add_points(data, **kwargs)
        return self.points_layer

    def _fill_structures(self, rows: list[seglayers.StructureRow]) -> None:
        self.structures_rows = rows
        table = self.structures_table
        table.setRowCount(len(rows))
        colors = seglayers.label_colormap(self.result)
        from qtpy.QtGui import QColor

        for index, row in enumerate(rows):
            name_item = QTableWidgetItem(row.name)
            rgba = colors.get(row.value)
            if rgba is not None:
                name_item.setData(Qt.ItemDataRole.DecorationRole, QColor.fromRgbF(*rgba))
            volume_item = QTableWidgetItem(f"{row.volume_ml:.1f}")
            volume_item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            table.setItem(index, 0, name_item)
            table.setItem(index, 1, volume_item)

    def structure_table_rows(self) -> list[tuple[str, str]]:
        """(name, volume text) as shown in the table (tests, screenshots)."""
        table = self.structures_table
        return [(table.item(r, 0).text(), table.item(r, 1).text()) for r in range(table.rowCount())]

    def _fill_findings(self) -> None:
        self.findings_list.blockSignals(True)
        self.findings_list.clear()
        for finding in self.findings:
            self.findings_list.addItem(seglayers.finding_row(finding))
        if not self.findings:
            self.findings_list.addItem("no focal findings")
        self.findings_list.blockSignals(False)

    def _on_finding_row(self, row: int) -> None:
        if 0 <= row < len(self.findings):
            self.go_to_finding(row)

    def go_to_finding(self, index: int) -> tuple[float, ...] | None:
        """Move the shared cursor (``dims.point``; all planes follow) to a finding; select its point."""
        if not (0 <= index < len(self.findings)) or self._geometry is None:
            return None
        finding = self.findings[index]
        reference = self.labels_layer if self.labels_layer in self.viewer.layers else None
        _, scale, translate = self._geometry
        if reference is not None:
            scale, translate = tuple(reference.scale), tuple(reference.translate)
        point = seglayers.world_point(finding.voxel_zyx, scale, translate)
        move_cursor_to(self.viewer, point)
        points = self.points_layer if self.points_layer in self.viewer.layers else self._show_findings_layer()
        if points is not None and index < len(points.data):
            points.selected_data = {index}
        if self.findings_list.currentRow() != index:
            self.findings_list.blockSignals(True)
            self.findings_list.setCurrentRow(index)
            self.findings_list.blockSignals(False)
        return point

    # ------------------------------------------------------------------ saving
    def _current_labels(self) -> np.ndarray | None:
        """The label map to save: the layer's data (with any user edits) or the result's."""
        if self.result is None:
            return None
        if self.labels_layer is not None and self.labels_layer in self.viewer.layers:
            data = np.asarray(self.labels_layer.data)
            if self.volume is not None and data.shape == self.volume.shape:
                return data
        return np.asarray(self.result.labels)

    def _update_save_buttons(self) -> None:
        from napari_tghmoe.seg_export import dicom_seg_unavailable_reason

        ready = self.result is not None and not self.is_busy
        self.save_nifti_button.setEnabled(ready)
        reason = "segment a CT first" if self.result is None else dicom_seg_unavailable_reason(self.volume)
        self.save_seg_button.setEnabled(ready and reason is None)
        self.save_seg_button.setToolTip(
            reason or "DICOM SEG (highdicom) on the source series, one segment per structure, SCT-coded"
        )

    def save_nifti(self, path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
        """Write the label map (.nii.gz on the CT's grid and affine) and its .labels.json."""
        from napari_tghmoe.seg_export import save_label_nifti

        labels = self._current_labels()
        if labels is None or self.volume is None:
            raise ValueError("nothing to save yet: segment a CT first")
        return save_label_nifti(labels, self.volume, path, self.result.label_names, overwrite=overwrite)

    def save_dicom_seg(self, path: str | Path, *, overwrite: bool = False, include_identifiers: bool | None = None) -> Path:
        """Write a DICOM SEG that references the CT's source DICOM series."""
        from napari_tghmoe.seg_export import save_dicom_seg

        labels = self._current_labels()
        if labels is None or self.volume is None:
            raise ValueError("nothing to save yet: segment a CT first")
        if include_identifiers is None:
            include_identifiers = self.identifiers_check.isChecked()
        return save_dicom_seg(
            labels,
            self.volume,
            path,
            self.result.label_names,
            model_name=self.result.model_name,
            finding_names=seglayers.finding_kinds(self.result),
            include_identifiers=include_identifiers,
            overwrite=overwrite,
        )

    def _suggested_path(self, suffix: str) -> str:
        from napari_tghmoe.report import safe_stem

        stem = safe_stem(self._geometry[0] if self._geometry else "segmentation", "segmentation")
        return str(Path.home() / f"{stem}_seg{suffix}")

    def _save_with_dialog(self, title: str, suffix: str, file_filter: str, save: Any) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, title, self._suggested_path(suffix), file_filter, options=QFileDialog.Option.DontConfirmOverwrite
        )
        if not path:
            return
        from napari_tghmoe.seg_export import SegExportError

        try:
            written = save(path, overwrite=False)
        except SegExportError as err:
            if "file exists" not in str(err):
                self._report_error(f"Save failed: {err}")
                return
            answer = QMessageBox.question(self, title, f"{err.path} exists. Replace it?")
            if answer != QMessageBox.StandardButton.Yes:
                return
            try:
                written = save(path, overwrite=True)
            except Exception as second:
                self._report_error(f"Save failed: {_short(second)}")
                return
        except Exception as err:
            self._report_error(f"Save failed: {_short(err)}")
            return
        names = ", ".join(str(p) for p in (written if isinstance(written, tuple) else (written,)))
        show_info(f"Saved {names}")

    def _save_nifti_dialog(self) -> None:
        self._save_with_dialog("Save label map (NIfTI)", ".nii.gz", "NIfTI (*.nii.gz *.nii)", self.save_nifti)

    def _save_dicom_seg_dialog(self) -> None:
        self._save_with_dialog("Save DICOM SEG", ".dcm", "DICOM SEG (*.dcm)", self.save_dicom_seg)

    # ------------------------------------------------------------------ teardown
    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop a running segmentation and wait (bounded) for it, so closing the viewer is clean."""
        if self._closing:
            return
        self._closing = True
        self._stop_event.set()
        self._done_event.wait(timeout_s)
        self._unbind_viewer()


def dock_segment(viewer: Any, *, area: str = "right", tabify: bool = True, **options: Any) -> SegmentDock:
    """Dock the Segment panel (the launcher puts it as a tab beside the chat/routing docks)."""
    from napari_tghmoe._widgets import _napari_private

    from qtpy.QtCore import QTimer

    dock = SegmentDock(viewer, **options)
    dock_widget = viewer.window.add_dock_widget(dock, name=SEGMENT_DOCK_NAME, area=area, tabify=tabify)

    def keep_previous_tab_in_front() -> None:  # Qt knows the tab siblings only after layout
        siblings = _napari_private.main_qt_window(viewer).tabifiedDockWidgets(dock_widget)
        if siblings:
            siblings[-1].raise_()  # the routing view stays in front in the demo layout

    if tabify:
        QTimer.singleShot(0, keep_previous_tab_in_front)
    return dock
