"""The chat dock: a thin Qt view over :class:`napari_tghmoe.conversation.Conversation`.

The dock picks the CT layer and the model, turns what the user asks into a ``Question`` and
shows what the conversation records; the turns, answers, stop and exports live in the
conversation, which the CLI and the tests use without Qt. Loading and generation run in
napari workers (``napari.qt.threading``), so the viewer keeps drawing; Stop sets the event
the engine checks after every token. The routing dock finds the conversation through the
viewer window's ``ConversationLink``; the two docks never import each other.

A conversation: follow-ups about the same scan carry the last "Context" turns; "New
conversation" starts afresh. A region: "Box" / "Point" let the user mark a place on a plane
view, and questions (e.g. "What is this?") are then about that region, sent as its crop with a
margin. Findings an answer states become links in its transcript line and points on the CT, at
the places the 3D segmentation found (the Segment dock's result for the layer, else the
segmenter run in a worker after the answer); a click moves the cursor and all planes there.
A chat model that reads the CT through a segmentation cascade shares one segmentation per scan
with them: the one it made for its answer places the findings (when it is the cascade the links
use), and the Segment dock's, when made with the model's own cascade, is its evidence.

Will it fit? For the chosen model folder, each device item says (tooltip, and the status line
for the chosen one) how much memory the model needs there against what is free now; items that
do not fit are marked. The check reads only headers, in a worker (its first call imports torch),
and is kept per folder. Loading a choice that does not fit is refused before any weight is read,
with a notification: on the CPU such a load would end in the out-of-memory killer, napari and all.
"""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Points
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtGui import QColor, QIcon, QKeyEvent
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QStyle,
    QVBoxLayout,
    QWidget,
)

from napari_tghmoe._report_writer import REPORT_METADATA_KEY
from napari_tghmoe._widgets._region_tools import NOT_A_REGION_KEY, RegionTools
from napari_tghmoe._widgets._settings import load_settings, save_settings, settings_path
from napari_tghmoe._widgets._transcript_links import LINK_HTML_ROLE, LinkDelegate, linked_html
from napari_tghmoe._widgets._viewer_dock import (
    ViewerDockMixin,
    connect_while_alive,
    conversation_link,
    layer_segmentation,
    move_cursor_to_voxel,
    remember_layer_segmentation,
    select_model_folder,
    unproxied,
    volume_from_layer,
)
from napari_tghmoe.conversation import (
    DEFAULT_CONTEXT_TURNS,
    DEVICE_CHOICES,
    MAX_CONTEXT_TURNS,
    REPORT_REQUEST,
    AnswerRecord,
    Conversation,
    DeviceFit,
    ModelChoice,
    ModelDoesNotFit,
    ModelLoadFailed,
    Question,
    default_model_path,
    device_fits,
    friendly_error,
    gpu_memory_text,
    is_placeholder_model,
    load_engine_if_fits,
    short_error,
)
from napari_tghmoe.layers import ct_volume_of
from napari_tghmoe.regions import region_context
from napari_tghmoe.slice_context import (
    PLANE_AXIS,
    THIS_SLICE_QUESTION,
    PlaneTracker,
    context_for_layer,
    is_slice_question,
)
from napari_tghmoe.transcript import Transcript, Turn, default_transcript_path

# Names other modules import from here (the settings file is shared with the layout).
__all__ = [
    "DEVICE_CHOICES",
    "QUICK_ACTIONS",
    "REPORT_REQUEST",
    "AnswerRecord",
    "ChatWidget",
    "QuestionBox",
    "default_model_path",
    "load_settings",
    "save_settings",
    "settings_path",
    "volume_from_layer",
]

#: Quick actions: "Generate report" and one example per M3D-VQA question type.
QUICK_ACTIONS: dict[str, str] = {
    "Generate report": REPORT_REQUEST,
    "Plane": "In which plane is this CT scan acquired: axial, coronal or sagittal?",
    "Phase": "Which CT phase is this: non-contrast, arterial, portal venous or delayed?",
    "Organ": "Which organ shows an abnormality in this scan?",
    "Abnormality": "What abnormality is seen in this CT scan?",
    "Location": "Where is the abnormality located?",
    "This slice": THIS_SLICE_QUESTION,  # sends the plane and slice on screen
}

#: The region quick action: asks about the marked box or point.
WHAT_IS_THIS = "What is this?"
#: Layer of the findings the selected answer states, at their segmented places (one per CT layer).
ANSWER_FINDINGS_PREFIX = "answer findings: "
ANSWER_FINDINGS_KEY = "tghmoe_answer_findings"
_NO_REGION_TEXT = "Region: none (Box / Point, then draw on a plane view)"

OPEN_FOLDER_ITEM = "Open model folder..."
PLACEHOLDER_ITEM = "Untrained placeholder (built on first use)"
_PLACEHOLDER_KEY = "<placeholder>"
_RENDER_INTERVAL_MS = 60  # streamed text repaints at most ~16 times a second
_MAX_RECENT_MODELS = 8
_ROLE_LABELS = {"user": "You", "assistant": "Model", "error": "Error", "info": "Note"}
_DEVICE_TIP = "Device and precision: 4-bit fits a 7B model in about 6 GB of GPU memory"


class QuestionBox(QPlainTextEdit):
    """Enter sends, Shift+Enter starts a new line."""

    submitted = Signal()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 (Qt name)
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and not (
            event.modifiers() & Qt.KeyboardModifier.ShiftModifier
        ):
            self.submitted.emit()
            return
        super().keyPressEvent(event)


class DeviceCombo(QComboBox):
    """The device picker; says when its list is about to open, so the numbers can be refreshed."""

    popup_opening = Signal()

    def showPopup(self) -> None:  # noqa: N802 (Qt name)
        self.popup_opening.emit()
        super().showPopup()


# --------------------------------------------------------------------------- the dock


class ChatWidget(ViewerDockMixin, QWidget):
    """Chat dock: layer picker, model picker, quick actions, question box, transcript."""

    answer_recorded = Signal(int)  # turn id of a finished answer
    answer_selected = Signal(int)  # turn id picked in the transcript (-1: cleared)
    text_streamed = Signal(int, str)  # turn id, the answer's text so far
    busy_changed = Signal(bool)
    model_loaded = Signal(object)  # the engine

    def __init__(
        self,
        napari_viewer: Any,
        *,
        transcript_path: str | Path | None = None,
        settings_file: str | Path | None = None,
        model_path: str | Path | None = None,
        device_choice: str | None = None,
        max_new_tokens: int = 256,
        autosave: bool = True,
        seg_model_path: str | Path | None = None,
    ) -> None:
        """``autosave=False`` keeps the transcript in memory only (scripted demos).

        ``seg_model_path``: the segmentation model that places stated findings when the Segment
        dock has not segmented the layer (None: the bundled demo segmentation model).
        """
        super().__init__()
        self.viewer = napari_viewer
        self._settings_file = Path(settings_file) if settings_file else settings_path()
        self._settings = load_settings(self._settings_file)
        saved_to = None  # memory only
        if autosave:
            saved_to = transcript_path if transcript_path is not None else default_transcript_path()
        context = self._settings.get("context_turns", DEFAULT_CONTEXT_TURNS)
        self.conversation = Conversation(
            saved_to, max_new_tokens=max_new_tokens, context_limit=int(context), segmenter_folder=seg_model_path
        )
        self._load_worker: Any = None
        self._gen_worker: Any = None
        self._seg_worker: Any = None
        self._seg_stop = threading.Event()
        self._seg_done = threading.Event()
        self._seg_done.set()
        self._locate_queue: list[int] = []  # answers waiting for the running segmentation
        self.findings_layer: Points | None = None
        self._fits: dict[str, dict[str, DeviceFit]] = {}  # model folder -> device choice -> fit
        self._fit_worker: Any = None
        self._fit_again = False  # another check was asked for while one ran
        self._fit_done = threading.Event()
        self._fit_done.set()
        self._answer_after_load = False  # a question waits for the model being loaded
        self._closing = False
        self.plane_tracker = PlaneTracker(napari_viewer.dims)  # plane of the last scroll/click
        self.region_tools = RegionTools(napari_viewer, self)

        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(_RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self._render_stream)
        self._build_ui()
        self._fill_model_picker(model_path)
        self.device_combo.blockSignals(True)  # a choice passed in is not a user's change to remember
        self.device_combo.setCurrentText(device_choice or self._settings.get("device", "auto"))
        self.device_combo.blockSignals(False)
        self.conversation.choose_model(self._model_choice())
        self.refresh_device_fits()
        self._refresh_layers()
        self._show_transcript()
        self._connect_viewer()
        self._disconnect_conversation = connect_while_alive(
            self,
            [
                (self.conversation.turn_added, self._on_turn_added),
                (self.conversation.turn_changed, self._on_turn_changed),
                (self.conversation.answer_recorded, self._on_answer_recorded),
                (self.conversation.findings_located, self._on_findings_located),
                (self.conversation.answer_selected, self._on_answer_selected),
                (self.conversation.cleared, self._on_cleared),
            ],
        )
        self.region_tools.changed.connect(self._on_region_changed)
        self._watch_main_window()
        self._set_busy(False)
        self._update_status()
        link = conversation_link(napari_viewer)
        if link is not None:  # the routing dock of this window follows this conversation
            link.publish(self.conversation)

    # ------------------------------------------------------------------ the conversation's state
    @property
    def seg_model_path(self) -> str | None:
        """The segmentation model folder that places stated findings (None: the bundled demo);
        the conversation's ``segmenter_folder``, so a segmentation the chat model made with the
        same cascade for its answer is used instead."""
        return self.conversation.segmenter_folder

    @seg_model_path.setter
    def seg_model_path(self, folder: str | Path | None) -> None:
        self.conversation.segmenter_folder = str(folder) if folder else None

    @property
    def engine(self) -> Any:
        """The loaded ``InferenceEngine`` (None until the first question loads it)."""
        return self.conversation.engine

    @property
    def records(self) -> dict[int, AnswerRecord]:
        return self.conversation.records

    @property
    def transcript(self) -> Transcript:
        return self.conversation.transcript

    @property
    def max_new_tokens(self) -> int:
        return self.conversation.max_new_tokens

    @max_new_tokens.setter
    def max_new_tokens(self, value: int) -> None:
        self.conversation.max_new_tokens = int(value)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("CT layer the question is about (the selected image layer by default)")
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Model folder (TGH-MoE or Qwen2.5-VL, safetensors)")
        self.device_combo = DeviceCombo()
        self.device_combo.addItems(list(DEVICE_CHOICES))
        self.device_combo.setToolTip(_DEVICE_TIP)

        form = QGridLayout()
        form.addWidget(QLabel("CT layer"), 0, 0)
        form.addWidget(self.layer_combo, 0, 1, 1, 3)
        form.addWidget(QLabel("Model"), 1, 0)
        form.addWidget(self.model_combo, 1, 1)
        form.addWidget(QLabel("Device"), 1, 2)
        form.addWidget(self.device_combo, 1, 3)
        form.setColumnStretch(1, 1)

        # Activity line with elapsed seconds, not an animated busy bar: an endless animation
        # repaints the window (and re-composites every OpenGL canvas) many times a second.
        self.activity_label = QLabel()
        self.activity_label.setStyleSheet("color: #f0b429;")
        self.activity_label.hide()
        self._activity_timer = QTimer(self)
        self._activity_timer.setInterval(500)
        self._activity_timer.timeout.connect(self._tick_activity)

        self.transcript_view = QListWidget()
        self.transcript_view.setWordWrap(True)
        self.transcript_view.setUniformItemSizes(False)
        self.transcript_view.setResizeMode(QListView.ResizeMode.Adjust)  # lines re-wrap with the dock
        self.link_delegate = LinkDelegate(self.transcript_view)  # finding names as links
        self.transcript_view.setItemDelegate(self.link_delegate)
        self.transcript_view.setSelectionMode(QListWidget.SelectionMode.SingleSelection)
        self.transcript_view.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.transcript_view.setMinimumHeight(110)

        self.quick_buttons: dict[str, QPushButton] = {}
        quick = QGridLayout()
        for index, (label, question) in enumerate(QUICK_ACTIONS.items()):
            button = QPushButton(label)
            button.setToolTip(question)
            button.clicked.connect(lambda _=False, q=question: self.send(q))
            self.quick_buttons[label] = button
            quick.addWidget(button, index // 3, index % 3)

        self.question_box = QuestionBox()
        self.question_box.setPlaceholderText("Ask about the CT (Enter sends, Shift+Enter: new line)")
        self.question_box.setMaximumHeight(56)

        self.region_label = QLabel(_NO_REGION_TEXT)
        self.region_label.setWordWrap(True)
        self.region_label.setToolTip("Questions are about this region while it is set (\"This slice\" excepted)")
        self.box_button = QPushButton("Box")
        self.box_button.setToolTip("Draw a box on a plane view: questions are then about that region")
        self.point_button = QPushButton("Point")
        self.point_button.setToolTip("Click a point on a plane view: questions are then about the place around it")
        self.what_button = QPushButton(WHAT_IS_THIS)
        self.what_button.setToolTip("Ask the model what the marked region shows")
        self.clear_region_button = QPushButton("Clear region")
        self.clear_region_button.setToolTip("Questions are about the whole scan again")
        region_row = QHBoxLayout()
        for widget in (self.box_button, self.point_button, self.what_button, self.clear_region_button):
            region_row.addWidget(widget)

        self.context_spin = QSpinBox()
        self.context_spin.setRange(0, MAX_CONTEXT_TURNS)
        self.context_spin.setValue(self.conversation.context_limit)
        self.context_spin.setToolTip(
            "Follow-up questions about the same scan carry this many earlier questions and answers "
            "(0: each question stands alone); the oldest go first when they do not fit the model's context"
        )
        context_row = QHBoxLayout()
        context_row.addWidget(QLabel("Context: last"))
        context_row.addWidget(self.context_spin)
        context_row.addWidget(QLabel("turns"))
        context_row.addStretch(1)

        self.send_button = QPushButton("Send")
        self.stop_button = QPushButton("Stop")
        self.new_button = QPushButton("New conversation")
        self.new_button.setToolTip(
            "Forget the turns (and clear the transcript): the next question starts without context"
        )
        self.export_button = QPushButton("Export...")
        self.identifiers_check = QCheckBox("include identifiers")
        self.identifiers_check.setToolTip("Write patient name/ID from the DICOM header into exports (off by default)")
        buttons = QHBoxLayout()
        for widget in (self.send_button, self.stop_button, self.new_button, self.export_button):
            buttons.addWidget(widget)
        export_row = QHBoxLayout()
        export_row.addStretch(1)
        export_row.addWidget(self.identifiers_check)

        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.activity_label)
        layout.addWidget(self.transcript_view, 1)
        layout.addLayout(context_row)
        layout.addLayout(quick)
        layout.addWidget(self.region_label)
        layout.addLayout(region_row)
        layout.addWidget(self.question_box)
        layout.addLayout(buttons)
        layout.addLayout(export_row)
        layout.addWidget(self.status_label)

        self.question_box.submitted.connect(self.send)
        self.send_button.clicked.connect(lambda: self.send())
        self.stop_button.clicked.connect(self.stop)
        self.new_button.clicked.connect(self.clear_transcript)
        self.export_button.clicked.connect(self._export_dialog)
        self.context_spin.valueChanged.connect(self._on_context_changed)
        self.box_button.clicked.connect(lambda: self.start_region("box"))
        self.point_button.clicked.connect(lambda: self.start_region("point"))
        self.what_button.clicked.connect(lambda: self.ask_about_region())
        self.clear_region_button.clicked.connect(self.clear_region)
        self.link_delegate.link_activated.connect(self._on_link)
        self.transcript_view.currentItemChanged.connect(self._on_transcript_selection)
        self.model_combo.activated.connect(self._on_model_activated)
        self.device_combo.currentTextChanged.connect(self._on_device_changed)
        self.device_combo.popup_opening.connect(self.refresh_device_fits)  # free memory changes

    def _fill_model_picker(self, model_path: str | Path | None) -> None:
        combo = self.model_combo
        combo.blockSignals(True)
        combo.clear()
        demo = default_model_path()
        if demo is not None:
            combo.addItem("Demo model (bundled)", str(demo))
        else:
            combo.addItem(PLACEHOLDER_ITEM, _PLACEHOLDER_KEY)
        for folder in self._settings.get("recent_models", []):
            if Path(folder).is_dir() and combo.findData(folder) < 0:
                combo.addItem(Path(folder).name, folder)
        combo.addItem(OPEN_FOLDER_ITEM, None)
        wanted = str(model_path) if model_path else self._settings.get("model")
        if wanted and combo.findData(wanted) < 0 and wanted != _PLACEHOLDER_KEY:
            combo.insertItem(combo.count() - 1, Path(wanted).name, wanted)
        index = combo.findData(wanted) if wanted else -1
        combo.setCurrentIndex(index if index >= 0 else 0)
        self._model_index = combo.currentIndex()
        combo.blockSignals(False)

    # ------------------------------------------------------------------ layers
    def _image_layers(self) -> list[Image]:
        return [layer for layer in self.viewer.layers if isinstance(layer, Image) and not layer.name.startswith("routing:")]

    def _refresh_layers(self, event: Any = None) -> None:
        if hasattr(self, "region_tools") and not self._closing:
            self.region_tools.refresh()  # plane views may have come with a new CT
        current = self.layer_combo.currentText()
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        names = [layer.name for layer in self._image_layers()]
        self.layer_combo.addItems(names)
        active = self.viewer.layers.selection.active
        if isinstance(active, Image) and active.name in names:
            self.layer_combo.setCurrentText(active.name)
        elif current in names:
            self.layer_combo.setCurrentText(current)
        elif names:
            with_volume = [n for n, lay in zip(names, self._image_layers()) if ct_volume_of(lay) is not None]
            self.layer_combo.setCurrentText((with_volume or names)[-1])
        self.layer_combo.blockSignals(False)

    def _on_active_layer(self, event: Any = None) -> None:
        active = self.viewer.layers.selection.active
        if isinstance(active, Image) and not active.name.startswith("routing:"):
            self._refresh_layers()
            self.layer_combo.setCurrentText(active.name)

    def current_layer(self) -> Image | None:
        name = self.layer_combo.currentText()
        return next((layer for layer in self._image_layers() if layer.name == name), None)

    # ------------------------------------------------------------------ model
    def model_path(self) -> str | None:
        data = self.model_combo.itemData(self.model_combo.currentIndex())
        if data == _PLACEHOLDER_KEY:
            from napari_tghmoe.model.placeholder import placeholder_model_dir

            return str(placeholder_model_dir())
        return data

    def load_options(self) -> dict[str, Any]:
        return self._model_choice().load_options()

    def _model_choice(self) -> ModelChoice:
        """The model and device the pickers show."""
        placeholder = self.model_combo.itemData(self.model_combo.currentIndex()) == _PLACEHOLDER_KEY
        return ModelChoice(str(self.model_path()), self.device_combo.currentText(), placeholder=placeholder)

    def set_model_folder(self, folder: str | Path) -> None:
        """Choose a model folder (as "Open model folder..." does) and remember it."""
        folder = str(folder)
        self._model_index = select_model_folder(self.model_combo, folder)
        recent = [folder] + [f for f in self._settings.get("recent_models", []) if f != folder]
        self._settings["recent_models"] = recent[:_MAX_RECENT_MODELS]
        self._remember_model()
        self._discard_engine()
        self.refresh_device_fits()
        self.load_model()

    def _remember_model(self) -> None:
        self._settings["model"] = self.model_combo.itemData(self.model_combo.currentIndex())
        self._settings["device"] = self.device_combo.currentText()
        save_settings(self._settings, self._settings_file)

    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemData(index) is None:  # "Open model folder..."
            self.model_combo.setCurrentIndex(self._model_index)
            folder = QFileDialog.getExistingDirectory(self, "Open model folder", str(Path.home()))
            if folder:
                self.set_model_folder(folder)
            return
        if index != self._model_index:
            self._model_index = index
            self._remember_model()
            self._discard_engine()
            self.refresh_device_fits()
            self.load_model()

    def _on_device_changed(self, text: str) -> None:
        self._remember_model()
        self._show_device_fits()
        if self.conversation.engine is not None:
            self._discard_engine()
            self.load_model()
        self._update_status()

    # ------------------------------------------------------------------ will it fit?
    def device_fit(self, choice: str | None = None) -> DeviceFit | None:
        """What the picker knows of ``choice`` (default: the chosen one) for the chosen model
        folder; None until the check is done."""
        return self._fits.get(self.model_path() or "", {}).get(choice or self.device_combo.currentText())

    def refresh_device_fits(self) -> Any:
        """Check, in a worker, each device choice of the chosen model folder against the memory
        free now; the picker shows the result when it is in (meanwhile what was known)."""
        self._show_device_fits()
        path = self.model_path()
        placeholder = self.model_combo.itemData(self.model_combo.currentIndex()) == _PLACEHOLDER_KEY
        if self._closing or not path or (placeholder and not Path(path).is_dir()):
            return None  # nothing to check (the placeholder is built on first use)
        if self._fit_worker is not None:
            self._fit_again = True
            return self._fit_worker
        from napari.qt.threading import create_worker

        done = threading.Event()
        self._fit_done = done

        def check() -> dict[str, DeviceFit]:
            try:
                return device_fits(path)
            finally:
                done.set()

        worker = create_worker(check, _start_thread=False, _ignore_errors=True)  # device_fits never raises
        worker.returned.connect(lambda fits, folder=path: self._on_device_fits(folder, fits))
        worker.finished.connect(lambda w=worker: self._on_fit_check_finished(w))
        self._fit_worker = worker
        worker.start()
        return worker

    def _on_device_fits(self, folder: str, fits: dict[str, DeviceFit]) -> None:
        self._fits[folder] = fits
        if not self._closing and folder == self.model_path():
            self._show_device_fits()
            self._update_status()

    def _on_fit_check_finished(self, worker: Any) -> None:
        if worker is self._fit_worker:
            self._fit_worker = None
        if self._fit_again and not self._closing:
            self._fit_again = False
            self.refresh_device_fits()

    def _show_device_fits(self) -> None:
        """Each device item's tooltip says what it needs of what is free; misfits get a warning icon."""
        if self._closing:
            return
        fits = self._fits.get(self.model_path() or "", {})
        combo = self.device_combo
        warning = self.style().standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning)
        for index in range(combo.count()):
            name = combo.itemText(index)
            fit = fits.get(name)
            combo.setItemData(index, f"{name}: {fit.summary}" if fit else None, Qt.ItemDataRole.ToolTipRole)
            # an icon, not a text colour: napari's style sheet paints every item's text alike
            combo.setItemIcon(index, warning if fit is not None and fit.refused else QIcon())
        chosen = fits.get(combo.currentText())
        combo.setToolTip(f"{_DEVICE_TIP}\n{combo.currentText()}: {chosen.summary}" if chosen else _DEVICE_TIP)

    def _discard_engine(self) -> None:
        self.conversation.choose_model(self._model_choice())
        self.conversation.unload_model()
        self._update_status()

    def load_model(self) -> Any:
        """Load the chosen model in a background worker (no-op if already loading it)."""
        from napari.qt.threading import create_worker

        choice = self._model_choice()
        if self._load_worker is not None and getattr(self._load_worker, "_tghmoe_key", None) == choice.key:
            return self._load_worker
        # the memory check first: a choice that does not fit is refused before any weight is read;
        # errors go to _on_model_error
        worker = create_worker(load_engine_if_fits, choice, _start_thread=False, _ignore_errors=True)
        worker._tghmoe_key = choice.key
        worker.returned.connect(lambda engine, c=choice, w=worker: self._on_model_loaded(engine, c, w))
        worker.errored.connect(lambda err, c=choice, w=worker: self._on_model_error(err, c, w))
        worker.finished.connect(lambda w=worker: self._on_load_finished(w))
        self._load_worker = worker
        self._show_activity(f"Loading model {choice.name} ({choice.device})")
        self._set_busy(self._gen_worker is not None)
        worker.start()
        return worker

    def _on_model_loaded(self, engine: Any, choice: ModelChoice, worker: Any) -> None:
        if self._closing or worker is not self._load_worker or choice.key != self._model_choice().key:
            return  # a newer choice superseded this load
        if not self.conversation.adopt_engine(engine, choice):
            return
        self.model_loaded.emit(engine)
        self._update_status()
        if self._answer_after_load:
            self._answer_after_load = False
            self._start_generation()

    def _on_model_error(self, err: BaseException, choice: ModelChoice, worker: Any) -> None:
        if self._closing or worker is not self._load_worker:
            return
        self._answer_after_load = False
        self.conversation.abandon()
        if isinstance(err, ModelDoesNotFit) and err.fits:
            self._fits[choice.path] = err.fits  # the numbers it was refused with
            self._show_device_fits()
        failure = err if isinstance(err, ModelLoadFailed) else ModelLoadFailed(choice.path, err)
        self._report_error(str(failure))

    def _on_load_finished(self, worker: Any) -> None:
        if worker is self._load_worker:
            self._load_worker = None
        if self._closing:
            return
        if self._gen_worker is None:
            self._hide_activity()
        self._set_busy(self._gen_worker is not None)
        self.refresh_device_fits()  # a loaded model changed what is free
        self._update_status()

    # ------------------------------------------------------------------ asking
    def send(self, question: str | None = None) -> bool:
        """Ask ``question`` (default: the text in the box) about the chosen layer.

        Returns False (with a notification and a transcript line) when it cannot start.
        """
        if self.is_busy:
            show_info("The model is still answering: press Stop first.")
            return False
        typed = question is None
        text = (self.question_box.toPlainText() if typed else question).strip()
        if not text:
            return False
        volume = self._selected_volume()
        if volume is None:
            return False
        layer = self.current_layer()
        asked = Question(text, volume, layer_name=layer.name, layer_ref=weakref.ref(unproxied(layer)))
        refusal = self.conversation.refusal(asked)
        if refusal:  # e.g. an MR/PET series, which would be read as HU
            self._report_error(refusal)
            return False
        if is_slice_question(text):  # the slab around the slice on screen, and where it is
            on_screen = context_for_layer(layer, volume, self.plane_tracker.plane, self.viewer.dims.point)
            asked.volume = on_screen.slab
            asked.scan = volume
            box = [(0, int(n)) for n in volume.shape]
            box[PLANE_AXIS[on_screen.plane]] = on_screen.slab_range
            asked.box = tuple(box)
            asked.model_text = on_screen.question_for_model(text)
            asked.shown_text = f"{text} [{on_screen.text}]"
        elif self.region_tools.mark is not None:  # the marked region with a margin around it
            try:
                marked = region_context(volume, self.region_tools.region_for(layer))
            except ValueError as err:
                self._report_error(f"Region: {err}.")
                return False
            asked.volume = marked.crop
            asked.scan = volume
            asked.box = marked.box
            asked.region = marked.region
            asked.region_info = marked.to_dict(volume)
            asked.model_text = marked.question_for_model(text)
            asked.shown_text = f"{text} [{marked.region.describe()}]"
        if typed:
            self.question_box.clear()
        self._share_layer_segmentation(layer, volume)
        self.conversation.begin(asked)
        self.conversation.choose_model(self._model_choice())
        if self.conversation.engine_ready:
            self._start_generation()
        else:
            self._answer_after_load = True
            self.load_model()
        self._set_busy(True)
        return True

    # ------------------------------------------------------------------ region and context
    def start_region(self, kind: str) -> bool:
        """"Box" / "Point": the plane views (or a 2D canvas) take the next box drawn or point clicked."""
        reason = self.region_tools.start(kind, self.current_layer())
        if reason:
            show_info(reason)
            return False
        what = "Drag a box" if kind == "box" else "Click a point"
        self.region_label.setText(f"{what} on a plane view: questions are then about it.")
        return True

    def ask_about_region(self, question: str = WHAT_IS_THIS) -> bool:
        """"What is this?": ask about the marked region (told how to mark one when there is none)."""
        if self.region_tools.mark is None:
            show_info("Mark a region first: press Box and drag on a plane view, or Point and click one.")
            return False
        return self.send(question)

    def clear_region(self) -> None:
        """Questions are about the whole scan again."""
        self.region_tools.clear()

    def _on_region_changed(self, mark: Any) -> None:
        if self._closing:
            return
        if mark is None:
            self.region_label.setText(_NO_REGION_TEXT)
            return
        layer = self.current_layer()
        try:
            region = self.region_tools.region_for(layer) if layer is not None else None
        except ValueError as err:
            self.region_label.setText(f"Region: {err}")
            return
        try:
            volume = volume_from_layer(layer) if layer is not None else None
        except ValueError:  # not a grey-value volume: the region in voxels only
            volume = None
        text = region.describe(volume) if region is not None else f"{mark.kind} marked"
        self.region_label.setText(f"Region: {text}")

    def region_text(self) -> str:
        """The region line of the dock (tests, screenshots)."""
        return self.region_label.text()

    def _on_context_changed(self, value: int) -> None:
        self.conversation.context_limit = int(value)
        self._settings["context_turns"] = int(value)
        save_settings(self._settings, self._settings_file)

    def _start_generation(self) -> None:
        from napari.qt.threading import create_worker

        chunks = self.conversation.answer_stream()

        def generate() -> Any:
            yield from chunks

        worker = create_worker(generate, _start_thread=False, _ignore_errors=True)  # _on_generation_error
        worker.yielded.connect(self._on_yielded)
        worker.errored.connect(self._on_generation_error)
        worker.finished.connect(lambda w=worker: self._on_generation_finished(w))
        self._gen_worker = worker
        self._show_activity("Answering")
        self._set_busy(True)
        worker.start()

    def _on_yielded(self, item: Any) -> None:
        pending = self.conversation.pending
        if self._closing or pending is None:
            return
        if isinstance(item, str):
            text = self.conversation.add_text(item)
            self.text_streamed.emit(pending.turn.id, text)
            if not self._render_timer.isActive():  # coalesce: one repaint per frame, not per token
                self._render_timer.start()
            return
        self.conversation.finish(item)  # -> _on_answer_recorded, _on_answer_selected

    def _render_stream(self) -> None:
        pending = self.conversation.pending
        if pending is not None and not self._closing:
            self._render_turn(pending.turn, pending.text + " \u258d")

    def _on_generation_error(self, err: BaseException) -> None:
        if self._closing:
            return
        self.conversation.abandon()
        self._report_error(f"The model failed: {friendly_error(err)}")

    def _on_generation_finished(self, worker: Any) -> None:
        if worker is self._gen_worker:
            self._gen_worker = None
        if self._closing:
            return
        self.conversation.abandon(note="stopped")  # a no-op unless it ended without an Answer
        if self._load_worker is None:
            self._hide_activity()
        self._set_busy(self._load_worker is not None)
        self._update_status()

    def stop(self) -> None:
        """Ask the running answer to end (the engine checks after every token)."""
        self._answer_after_load = False
        self.conversation.stop()
        if self._gen_worker is None and self.conversation.is_answering and self._load_worker is not None:
            self.conversation.abandon(note="stopped")  # stopped while the model was loading
            self._set_busy(True)

    @property
    def is_busy(self) -> bool:
        return self._gen_worker is not None or self.conversation.is_answering

    @property
    def is_locating(self) -> bool:
        """The segmenter runs to place the findings of an answer (the next question may still be asked)."""
        return self._seg_worker is not None

    def slice_context(self, layer: Any) -> Any:
        """The plane and slice the user is looking at on ``layer`` (prompt words + slab volume)."""
        return context_for_layer(layer, volume_from_layer(layer), self.plane_tracker.plane, self.viewer.dims.point)

    # ------------------------------------------------------------------ transcript
    def _on_turn_added(self, turn: Turn) -> None:
        if self._closing:
            return
        self._render_turn(turn, turn.text)
        if turn.role == "error":
            self.status_label.setText(turn.text)

    def _on_turn_changed(self, turn: Turn) -> None:
        if not self._closing:
            self._render_turn(turn, turn.text)

    def _on_answer_recorded(self, record: AnswerRecord) -> None:
        layer = record.layer
        if layer is not None:
            layer.metadata[REPORT_METADATA_KEY] = record.document  # for File > Save (npe2 report writer)
        if self._closing:
            return
        turn = self.conversation.transcript.get(record.turn_id)
        if turn is not None:
            self._render_turn(turn, turn.text + (" [stopped]" if record.stopped else ""))
        self.answer_recorded.emit(record.turn_id)
        if record.needs_locations:
            self.locate_findings(record)

    def _on_cleared(self) -> None:
        if not self._closing:
            self.transcript_view.clear()
            self._locate_queue.clear()
            self._remove_findings_layers()

    # ------------------------------------------------------------------ finding places
    def _segmentation_folder(self, result: Any) -> Path | None:
        """The cascade folder a segmentation kept on a layer came from, as far as this dock can
        tell: the Segment dock keeps only the result, whose ``model_name`` is its folder's name, so
        of the folders it may have used that this dock knows (its own segmenter's, and the bundled
        demo, the Segment dock's default) the one of that name; None when none is. A folder of the
        same name elsewhere would pass for it; the chat model's evidence reader still compares that
        folder's networks with its own before it uses the result as evidence."""
        from napari_tghmoe._resources import resource_path

        known = [Path(self.seg_model_path)] if self.seg_model_path else []
        try:
            known.append(resource_path("demo-seg-model"))
        except FileNotFoundError:  # pragma: no cover - a checkout without the demo
            pass
        name = str(getattr(result, "model_name", ""))
        return next((folder for folder in known if name and folder.name == name), None)

    def _share_layer_segmentation(self, layer: Any, scan: Any) -> None:
        """Tell the conversation about the layer's segmentation (the Segment dock's) before a
        question, so the chat model's evidence reader may use it instead of segmenting the scan."""
        known = layer_segmentation(layer) if layer is not None else None
        if known is None or tuple(np.shape(known.labels)) != tuple(scan.shape):
            return
        if self.conversation.known_segmentation(scan) is not known:
            self.conversation.remember_segmentation(scan, known, self._segmentation_folder(known))

    def locate_findings(self, record: AnswerRecord) -> bool:
        """Give the findings ``record`` states their places: from the layer's segmentation (the
        Segment dock's, or an earlier run), else by segmenting the scan in a worker. False when
        that has to wait (a segmentation is running) or cannot run."""
        layer = record.layer
        scan = record.whole_volume
        known = layer_segmentation(layer) if layer is not None else None
        folder = self._segmentation_folder(known) if known is not None else None
        if known is None:
            known = self.conversation.known_segmentation(scan)  # its folder stays remembered
        if known is not None and tuple(np.shape(known.labels)) == tuple(scan.shape):
            self.conversation.locate(record.turn_id, known, folder)  # -> _on_findings_located
            return True
        if self._seg_worker is not None:
            if record.turn_id not in self._locate_queue:
                self._locate_queue.append(record.turn_id)
            return False
        return self._start_segmentation(record)

    def _start_segmentation(self, record: AnswerRecord) -> bool:
        from napari.qt.threading import create_worker

        scan, model_dir, turn_id = record.whole_volume, self.seg_model_path, record.turn_id
        stop, done = threading.Event(), threading.Event()
        self._seg_stop, self._seg_done = stop, done

        def run() -> Any:
            from napari_tghmoe.med3d import segment_volume

            try:
                return segment_volume(scan, model_dir, should_stop=stop.is_set)
            finally:
                done.set()

        worker = create_worker(run, _start_thread=False, _ignore_errors=True)  # errors: _on_segmentation_error
        worker.returned.connect(
            lambda result, t=turn_id, r=weakref.ref(record), m=model_dir: self._on_segmented(result, t, r, m)
        )
        worker.errored.connect(lambda err, t=turn_id: self._on_segmentation_error(err, t))
        worker.finished.connect(lambda w=worker: self._on_segmentation_finished(w))
        self._seg_worker = worker
        self.status_label.setText("Finding the places of the stated findings (3D segmentation)...")
        worker.start()
        return True

    def _on_segmented(self, result: Any, turn_id: int, record_ref: Any, model_dir: str | None = None) -> None:
        if self._closing:
            return
        from napari_tghmoe._resources import resource_path

        folder = Path(model_dir) if model_dir else resource_path("demo-seg-model")  # segment_volume's default
        record = record_ref()
        layer = record.layer if record is not None else None
        if layer is not None and tuple(np.shape(layer.data)) == tuple(np.shape(result.labels)):
            remember_layer_segmentation(layer, result)  # once per layer, shared with the Segment dock
        if record is not None:
            self.conversation.remember_segmentation(record.whole_volume, result, folder)
        self.conversation.locate(turn_id, result, folder)  # a no-op for an answer cleared meanwhile
        self._update_status()

    def _on_segmentation_error(self, err: BaseException, turn_id: int) -> None:
        if self._closing:
            return
        from napari_tghmoe.med3d.types import SegmentationStopped

        reason = "stopped" if isinstance(err, SegmentationStopped) else f"segmentation failed: {short_error(err)}"
        self.conversation.locations_unavailable(turn_id, reason)
        if not isinstance(err, SegmentationStopped):
            show_info(f"The stated findings have no places in the scan: {reason}")
        self._update_status()

    def _on_segmentation_finished(self, worker: Any) -> None:
        if worker is self._seg_worker:
            self._seg_worker = None
        if self._closing:
            return
        waiting, self._locate_queue = self._locate_queue, []
        for turn_id in waiting:  # answers that came in while it ran: most reuse its result now
            record = self.conversation.records.get(turn_id)
            if record is not None and record.needs_locations:
                self.locate_findings(record)

    def _on_findings_located(self, record: AnswerRecord) -> None:
        if self._closing:
            return
        turn = self.conversation.transcript.get(record.turn_id)
        if turn is not None:
            self._render_turn(turn, turn.text)
        self.show_answer_findings(record)

    def show_answer_findings(self, record: AnswerRecord) -> Points | None:
        """The located findings of ``record`` as a Points layer with their names, on its CT layer
        (one layer per CT, updated; the CT stays the active layer and its window is untouched)."""
        layer = record.layer
        if layer is None or layer not in self.viewer.layers or not record.finding_links:
            return None
        unique: dict[tuple[int, ...], str] = {}
        for link in record.finding_links:
            unique.setdefault(tuple(link.voxel_zyx), link.label)
        name = f"{ANSWER_FINDINGS_PREFIX}{layer.name}"
        kwargs = {
            "name": name,
            "scale": tuple(layer.scale),
            "translate": tuple(layer.translate),
            "units": tuple(layer.units),
            "features": {"name": list(unique.values())},
            "text": {"string": "{name}", "color": "#58a6ff", "size": 9, "anchor": "upper_left"},
            "size": 10.0,
            "face_color": "transparent",
            "border_color": "#58a6ff",
            "symbol": "ring",
            "out_of_slice_display": True,
            "metadata": {ANSWER_FINDINGS_KEY: record.turn_id, NOT_A_REGION_KEY: True},
        }
        data = np.array(list(unique), dtype=float).reshape(-1, 3)
        existing = next((l for l in self.viewer.layers if l.name == name and isinstance(l, Points)), None)
        if existing is not None:
            self.viewer.layers.remove(existing)
        active = self.viewer.layers.selection.active
        self.findings_layer = self.viewer.add_points(data, **kwargs)
        self.viewer.layers.selection.active = active if active is not None and active in self.viewer.layers else layer
        return self.findings_layer

    def _remove_findings_layers(self) -> None:
        for layer in [l for l in self.viewer.layers if isinstance(l, Points) and l.metadata.get(ANSWER_FINDINGS_KEY)]:
            self.viewer.layers.remove(layer)
        self.findings_layer = None

    def go_to_finding(self, turn_id: int, index: int) -> tuple[float, ...] | None:
        """Move the cursor (and with it every plane) to finding ``index`` of answer ``turn_id``."""
        record = self.conversation.records.get(turn_id)
        if record is None or not 0 <= index < len(record.finding_links):
            return None
        layer = record.layer
        if layer is None or layer not in self.viewer.layers:
            self._report_error(f"The CT layer {record.layer_name!r} of this answer is no longer open.")
            return None
        link = record.finding_links[index]
        point = move_cursor_to_voxel(self.viewer, layer, link.voxel_zyx)
        points = self.findings_layer
        if points is None or points not in self.viewer.layers or points.metadata.get(ANSWER_FINDINGS_KEY) != turn_id:
            points = self.show_answer_findings(record)
        if points is not None:
            hits = np.flatnonzero(np.all(np.asarray(points.data) == np.asarray(link.voxel_zyx, float), axis=1))
            points.selected_data = set(int(i) for i in hits[:1])
        return point

    def _on_link(self, href: str) -> None:
        kind, _, rest = href.partition(":")
        if kind != "finding":
            return
        try:
            turn_id, index = (int(v) for v in rest.split(":"))
        except ValueError:
            return
        self.go_to_finding(turn_id, index)

    def finding_link_rect(self, turn_id: int, index: int) -> Any:
        """Where link ``index`` of answer ``turn_id`` is drawn in the transcript (viewport
        coordinates, a ``QRect``; empty when there is no such link): for scripted clicks."""
        item = self._item_for(turn_id)
        if item is None:
            return None
        self.transcript_view.scrollToItem(item)
        index_in_model = self.transcript_view.indexFromItem(item)
        return self.link_delegate.link_rect(index_in_model, f"finding:{turn_id}:{index}")

    def _item_for(self, turn_id: int) -> QListWidgetItem | None:
        for row in range(self.transcript_view.count()):
            item = self.transcript_view.item(row)
            if item.data(Qt.ItemDataRole.UserRole) == turn_id:
                return item
        return None

    def _render_turn(self, turn: Turn, text: str) -> None:
        who = _ROLE_LABELS.get(turn.role, turn.role)
        prefix = f"[{turn.time_label}] {who}: "
        label = f"{prefix}{text if text else '...'}"
        item = self._item_for(turn.id)
        if item is None:
            item = QListWidgetItem(label)
            item.setData(Qt.ItemDataRole.UserRole, turn.id)
            if turn.role == "error":
                item.setForeground(QColor("#ff7b72"))
            elif turn.role == "user":
                item.setForeground(QColor("#8ab4f8"))
            elif turn.role == "info":
                item.setForeground(QColor("#9da5b4"))
            self.transcript_view.addItem(item)
        else:
            item.setText(label)
        item.setData(LINK_HTML_ROLE, self._links_html(turn, prefix, text))
        self.transcript_view.scrollToBottom()

    def _links_html(self, turn: Turn, prefix: str, text: str) -> str | None:
        """The line as HTML with each located finding a link, or None (drawn as plain text)."""
        record = self.conversation.records.get(turn.id) if turn.role == "assistant" else None
        if record is None or not record.finding_links:
            return None
        links = []
        for index, link in enumerate(record.finding_links):
            if link.start < 0:
                continue
            voxel = ", ".join(str(v) for v in link.voxel_zyx)
            mm = ", ".join(f"{v:.1f}" for v in link.position_mm)
            found_in = f"; segmented in the {link.segmented_location}" if link.segmented_location else ""
            tip = f"Go to voxel (z, y, x) {voxel}, (x, y, z) {mm} mm{found_in}"
            links.append((link.start, link.end, f"finding:{turn.id}:{index}", tip))
        return linked_html(prefix, text, links) if links else None

    def _show_transcript(self) -> None:
        self.transcript_view.clear()
        for turn in self.conversation.turns:
            self._render_turn(turn, turn.text)

    def transcript_texts(self) -> list[str]:
        return [self.transcript_view.item(row).text() for row in range(self.transcript_view.count())]

    def clear_transcript(self) -> None:
        """The "New conversation" button: forget the turns (refused while an answer runs)."""
        if self.is_busy:
            show_info("Stop the running answer before clearing the transcript.")
            return
        self.conversation.new_conversation()  # -> _on_cleared, answer_selected(-1)

    def _report_error(self, message: str) -> None:
        show_error(message)
        if not self._closing:
            self.conversation.report_error(message)  # -> _on_turn_added: a line and the status

    # ------------------------------------------------------------------ answers
    def latest_record(self) -> AnswerRecord | None:
        return self.conversation.latest_record()

    def select_answer(self, turn_id: int) -> None:
        self.conversation.select_answer(turn_id)

    def _on_answer_selected(self, turn_id: int) -> None:
        if self._closing:
            return
        item = self._item_for(turn_id) if turn_id >= 0 else None
        if item is not None and self.transcript_view.currentItem() is not item:
            self.transcript_view.blockSignals(True)  # the conversation already knows
            self.transcript_view.setCurrentItem(item)
            self.transcript_view.blockSignals(False)
        record = self.records.get(turn_id)
        shown = self.findings_layer
        if record is not None and record.finding_links and (
            shown is None or shown not in self.viewer.layers or shown.metadata.get(ANSWER_FINDINGS_KEY) != turn_id
        ):
            self.show_answer_findings(record)  # the points follow the selected answer
        self.answer_selected.emit(turn_id)

    def selected_record(self) -> AnswerRecord | None:
        item = self.transcript_view.currentItem()
        if item is not None:
            record = self.records.get(item.data(Qt.ItemDataRole.UserRole))
            if record is not None:
                return record
        return self.latest_record()

    def _on_transcript_selection(self, current: QListWidgetItem | None, previous: Any = None) -> None:
        if current is not None:
            self.conversation.select_answer(current.data(Qt.ItemDataRole.UserRole))  # answers only

    # ------------------------------------------------------------------ export
    def export_answer(
        self,
        path: str | Path,
        *,
        record: AnswerRecord | None = None,
        include_identifiers: bool | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Export the selected (or given) answer; the format follows the suffix."""
        if include_identifiers is None:
            include_identifiers = self.identifiers_check.isChecked()
        record = record or self.selected_record()
        return self.conversation.export_answer(
            path, record=record, include_identifiers=include_identifiers, overwrite=overwrite
        )

    def _export_dialog(self) -> None:
        if self.selected_record() is None:
            self._report_error("Nothing to export yet: ask a question first.")
            return
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Export report",
            str(Path.home() / "report.txt"),
            "Text (*.txt);;Markdown (*.md);;JSON (*.json);;DICOM Structured Report (*.dcm)",
        )
        if not path:
            return
        try:
            # the dialog already asked before replacing a file
            written = self.export_answer(path, overwrite=True)
        except Exception as err:
            self._report_error(f"Export failed: {short_error(err)}")
            return
        show_info(f"Report saved to {written}")

    # ------------------------------------------------------------------ status
    def _show_activity(self, text: str) -> None:
        self._activity_text = text
        self._activity_started = time.perf_counter()
        self.activity_label.setText(f"{text}...")
        self.activity_label.show()
        self._activity_timer.start()

    def _tick_activity(self) -> None:
        elapsed = time.perf_counter() - self._activity_started
        self.activity_label.setText(f"{self._activity_text}... {elapsed:.0f} s")

    def _hide_activity(self) -> None:
        self._activity_timer.stop()
        self.activity_label.hide()

    def _set_busy(self, busy: bool) -> None:
        self.stop_button.setEnabled(busy)
        self.send_button.setEnabled(not busy)
        for button in self.quick_buttons.values():
            button.setEnabled(not busy)
        self.new_button.setEnabled(not busy)
        self.what_button.setEnabled(not busy)
        self.busy_changed.emit(busy)

    def status_text(self) -> str:
        path = self.model_path()
        engine = self.conversation.engine
        if engine is None:
            state = "model not loaded (loads on first question)"
            device = self.device_combo.currentText()
            fit = self.device_fit()
            if fit is not None and fit.report is not None:
                device = f"{device}: {fit.summary}"
        else:
            device = str(getattr(engine, "device", "")) or self.device_combo.currentText()
            precision = str(getattr(engine, "precision", "") or "")
            device = f"{device} {precision}".strip()
            state = Path(path).name if path else "model"
        parts = [device, state]
        if is_placeholder_model(path) or self.model_combo.itemData(self.model_combo.currentIndex()) == _PLACEHOLDER_KEY:
            parts.append("untrained placeholder model")
        parts.append(gpu_memory_text())
        rate = self.conversation.last_tokens_per_s
        if rate:
            parts.append(f"{rate:.1f} tokens/s")
        return " \u00b7 ".join(p for p in parts if p)

    def _update_status(self) -> None:
        if not self._closing:
            self.status_label.setText(self.status_text())

    # ------------------------------------------------------------------ teardown
    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop any answer and wait (bounded) for the worker, so closing the viewer is clean."""
        if self._closing:
            return
        self._closing = True
        self._answer_after_load = False
        self.plane_tracker.disconnect()
        self.region_tools.disconnect()
        self._seg_stop.set()  # the segmenter checks between windows
        self._seg_done.wait(timeout_s)
        self._fit_done.wait(timeout_s)  # the memory check reads headers only: short
        # Let the generator run to its end rather than quitting the worker: the engine stops
        # within a token, yields its Answer and joins its thread, so nothing is left running.
        self.conversation.stop()
        self.conversation.generation_done.wait(timeout_s)
        for timer in (self._render_timer, self._activity_timer):
            try:
                timer.stop()
            except RuntimeError:  # already deleted with the window
                pass
        self._unbind_viewer()
        self._disconnect_conversation()
        self.conversation.abandon(note="viewer closed")
