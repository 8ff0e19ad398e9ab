"""The chat dock: ask the local model about the CT layer, watch the answer stream in, export it.

The widget holds no model logic: it picks a layer, turns it into a ``CTVolume``, hands it
to ``napari_tghmoe.engine.InferenceEngine`` in a napari ``thread_worker`` and shows what
comes back. Loading and generation both run off the GUI thread, so the viewer keeps
drawing; Stop sets a ``threading.Event`` the engine checks after every token.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QKeyEvent
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from napari_tghmoe._widgets._viewer_dock import ViewerDockMixin, select_model_folder
from napari_tghmoe.io._checks import modality_problem
from napari_tghmoe.io._types import AXIAL_DIRECTION, CTVolume
from napari_tghmoe.layers import ct_volume_of
from napari_tghmoe.slice_context import THIS_SLICE_QUESTION, PlaneTracker, context_for_layer, is_slice_question
from napari_tghmoe.transcript import Transcript, Turn, default_transcript_path, user_data_dir

REPORT_REQUEST = "Generate a radiology report."

#: Quick actions: "Generate report" and one example per M3D-VQA question type.
QUICK_ACTIONS: dict[str, str] = {
    "Generate report": REPORT_REQUEST,
    "Plane": "In which plane is this CT scan acquired: axial, coronal or sagittal?",
    "Phase": "Which CT phase is this: non-contrast, arterial, portal venous or delayed?",
    "Organ": "Which organ shows an abnormality in this scan?",
    "Abnormality": "What abnormality is seen in this CT scan?",
    "Location": "Where is the abnormality located?",
    "This slice": THIS_SLICE_QUESTION,  # sends the plane and slice on screen (issue 14)
}

#: Device / precision choices -> ``InferenceEngine.from_pretrained`` load options.
DEVICE_CHOICES: dict[str, dict[str, Any]] = {
    "auto": {"device": "auto", "quantization": "auto"},
    "CUDA 4-bit": {"device": "cuda", "quantization": "4bit"},
    "CUDA 8-bit": {"device": "cuda", "quantization": "8bit"},
    "CUDA bf16": {"device": "cuda", "quantization": "none", "dtype": "bfloat16"},
    "CPU": {"device": "cpu", "quantization": "none"},
}

OPEN_FOLDER_ITEM = "Open model folder..."
PLACEHOLDER_ITEM = "Untrained placeholder (built on first use)"
_PLACEHOLDER_KEY = "<placeholder>"
_STREAM_AUTOSAVE_S = 2.0
_RENDER_INTERVAL_MS = 60  # streamed text repaints at most ~16 times a second
_MAX_RECENT_MODELS = 8


# --------------------------------------------------------------------------- settings


def settings_path() -> Path:
    return user_data_dir() / "chat_settings.json"


def load_settings(path: Path | None = None) -> dict[str, Any]:
    path = path or settings_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_settings(data: dict[str, Any], path: Path | None = None) -> None:
    path = path or settings_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # settings are a convenience; never fail the UI over them


def default_model_path() -> Path | None:
    """The bundled demo model when it is installed."""
    from napari_tghmoe._resources import demo_model_path

    try:
        path = demo_model_path()
    except FileNotFoundError:
        return None
    return path if (path / "config.json").is_file() else None


def is_placeholder_model(path: str | Path | None) -> bool:
    from napari_tghmoe._placeholder_model import is_placeholder

    return bool(path) and is_placeholder(Path(path))


# --------------------------------------------------------------------------- helpers


def volume_from_layer(layer: Any) -> CTVolume:
    """The layer's ``CTVolume``, or one built from a plain 3D image layer (spacing = scale)."""
    volume = ct_volume_of(layer)
    if volume is not None:
        return volume
    data = np.asarray(layer.data)
    if data.ndim != 3 or getattr(layer, "rgb", False):
        raise ValueError(f"layer {layer.name!r} is not a 3D grey-value volume (shape {data.shape})")
    translate = np.asarray(layer.translate, dtype=float)[-3:]
    return CTVolume(
        hu=data,
        spacing=tuple(float(s) for s in np.asarray(layer.scale)[-3:]),
        origin=tuple(AXIAL_DIRECTION @ translate),
        description=layer.name,
        source=None,
    )


def _short(err: BaseException) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _friendly_error(err: BaseException) -> str:
    text = _short(err)
    if "out of memory" in text.lower() or type(err).__name__ == "OutOfMemoryError":
        return f"Out of memory: {text}. Try 'CUDA 4-bit' or 'CPU' in the device menu."
    return text


def gpu_memory_text() -> str:
    torch = sys.modules.get("torch")  # never import torch just to draw a label
    try:
        if torch is not None and torch.cuda.is_available():
            used = torch.cuda.memory_allocated() / 2**30
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            return f"GPU {used:.1f}/{total:.0f} GiB"
    except Exception:
        pass
    return "no GPU"


@dataclass
class AnswerRecord:
    """What the routing view needs about one finished answer."""

    turn_id: int
    question: str
    answer: Any  # napari_tghmoe.engine.Answer
    volume: CTVolume
    layer_name: str
    layer_ref: Callable[[], Any] = field(default=lambda: None, repr=False)
    stopped: bool = False

    @property
    def layer(self) -> Any:
        return self.layer_ref()

    @property
    def label(self) -> str:
        question = self.question if len(self.question) < 40 else self.question[:37] + "..."
        return f"#{self.turn_id} {question}"


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


class _ChatHub(QObject):
    """Lets a routing view find the chat dock of its viewer, whichever is created first."""

    chat_created = Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self._chats: dict[int, weakref.ref] = {}

    def register(self, chat: ChatWidget) -> None:
        self._chats[id(chat.viewer)] = weakref.ref(chat)
        self.chat_created.emit(chat)

    def chat_for(self, viewer: Any) -> ChatWidget | None:
        ref = self._chats.get(id(viewer))
        chat = ref() if ref else None
        return chat if chat is not None and chat.viewer is viewer else None


_hub: _ChatHub | None = None


def chat_hub() -> _ChatHub:
    global _hub
    if _hub is None:
        _hub = _ChatHub()
    return _hub


# --------------------------------------------------------------------------- the dock


class ChatWidget(ViewerDockMixin, QWidget):
    """Chat dock: layer picker, model picker, quick actions, question box, transcript."""

    answer_recorded = Signal(int)  # turn id of a finished answer
    answer_selected = Signal(int)  # turn id picked in the transcript
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
    ) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.max_new_tokens = max_new_tokens
        self._settings_file = Path(settings_file) if settings_file else settings_path()
        self._settings = load_settings(self._settings_file)
        if autosave:
            self.transcript = Transcript(transcript_path if transcript_path is not None else default_transcript_path())
        else:
            self.transcript = Transcript(None)  # memory only (scripted demos)
        self.records: dict[int, AnswerRecord] = {}
        self.engine: Any = None
        self._engine_key: tuple[str, str] | None = None
        self._load_worker: Any = None
        self._gen_worker: Any = None
        self._stop_event = threading.Event()
        self._generation_done = threading.Event()
        self._generation_done.set()
        self._pending_question: tuple[str, Any] | None = None
        self._stream_turn: Turn | None = None
        self._stream_text = ""
        self._stream_saved_at = 0.0
        self._last_rate: float | None = None
        self._closing = False
        self.plane_tracker = PlaneTracker(napari_viewer.dims)  # plane of the last scroll/click
        self._next_slice: Any = None  # SliceContext of a "this slice" question being sent

        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(_RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self._render_stream)
        self._build_ui()
        self._fill_model_picker(model_path)
        self.device_combo.blockSignals(True)  # a choice passed in is not a user's change to remember
        self.device_combo.setCurrentText(device_choice or self._settings.get("device", "auto"))
        self.device_combo.blockSignals(False)
        self._refresh_layers()
        self._show_transcript()
        self._connect_viewer()
        self._watch_main_window()
        self._set_busy(False)
        self._update_status()
        chat_hub().register(self)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("CT layer the question is about (the selected image layer by default)")
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Model folder (TGH-MoE or Qwen2.5-VL, safetensors)")
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICE_CHOICES))
        self.device_combo.setToolTip("Device and precision: 4-bit fits a 7B model in about 6 GB of GPU memory")

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

        self.send_button = QPushButton("Send")
        self.stop_button = QPushButton("Stop")
        self.clear_button = QPushButton("Clear")
        self.export_button = QPushButton("Export...")
        self.identifiers_check = QCheckBox("include identifiers")
        self.identifiers_check.setToolTip("Write patient name/ID from the DICOM header into exports (off by default)")
        buttons = QHBoxLayout()
        for widget in (self.send_button, self.stop_button, self.clear_button, self.export_button):
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
        layout.addLayout(quick)
        layout.addWidget(self.question_box)
        layout.addLayout(buttons)
        layout.addLayout(export_row)
        layout.addWidget(self.status_label)

        self.question_box.submitted.connect(self.send)
        self.send_button.clicked.connect(lambda: self.send())
        self.stop_button.clicked.connect(self.stop)
        self.clear_button.clicked.connect(self.clear_transcript)
        self.export_button.clicked.connect(self._export_dialog)
        self.transcript_view.currentItemChanged.connect(self._on_transcript_selection)
        self.model_combo.activated.connect(self._on_model_activated)
        self.device_combo.currentTextChanged.connect(self._on_device_changed)

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
            from napari_tghmoe._placeholder_model import placeholder_model_dir

            return str(placeholder_model_dir())
        return data

    def load_options(self) -> dict[str, Any]:
        return dict(DEVICE_CHOICES.get(self.device_combo.currentText(), DEVICE_CHOICES["auto"]))

    def set_model_folder(self, folder: str | Path) -> None:
        """Choose a model folder (as "Open model folder..." does) and remember it."""
        folder = str(folder)
        self._model_index = select_model_folder(self.model_combo, folder)
        recent = [folder] + [f for f in self._settings.get("recent_models", []) if f != folder]
        self._settings["recent_models"] = recent[:_MAX_RECENT_MODELS]
        self._remember_model()
        self._discard_engine()
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
            self.load_model()

    def _on_device_changed(self, text: str) -> None:
        self._remember_model()
        if self.engine is not None:
            self._discard_engine()
            self.load_model()

    def _discard_engine(self) -> None:
        self.engine = None
        self._engine_key = None
        self._update_status()

    def _requested_key(self) -> tuple[str, str]:
        return (str(self.model_path()), self.device_combo.currentText())

    def load_model(self) -> Any:
        """Load the chosen model in a background worker (no-op if already loading it)."""
        from napari.qt.threading import create_worker

        key = self._requested_key()
        if self._load_worker is not None:
            if getattr(self._load_worker, "_tghmoe_key", None) == key:
                return self._load_worker
        path, _ = key
        options = self.load_options()
        placeholder = self.model_combo.itemData(self.model_combo.currentIndex()) == _PLACEHOLDER_KEY

        def load() -> Any:
            from napari_tghmoe.engine import InferenceEngine

            if placeholder:
                from napari_tghmoe._placeholder_model import ensure_placeholder_model

                ensure_placeholder_model(Path(path))
            return InferenceEngine.from_pretrained(path, **options)

        worker = create_worker(load, _start_thread=False, _ignore_errors=True)  # errors: _on_model_error
        worker._tghmoe_key = key
        worker.returned.connect(lambda engine, k=key, w=worker: self._on_model_loaded(engine, k, w))
        worker.errored.connect(lambda err, w=worker: self._on_model_error(err, w))
        worker.finished.connect(lambda w=worker: self._on_load_finished(w))
        self._load_worker = worker
        self._show_activity(f"Loading model {Path(path).name} ({self.device_combo.currentText()})")
        self._set_busy(self._gen_worker is not None)
        worker.start()
        return worker

    def _on_model_loaded(self, engine: Any, key: tuple[str, str], worker: Any) -> None:
        if self._closing or worker is not self._load_worker or key != self._requested_key():
            return  # a newer choice superseded this load
        self.engine = engine
        self._engine_key = key
        self.model_loaded.emit(engine)
        self._update_status()
        if self._pending_question is not None:
            question, layer = self._pending_question
            self._pending_question = None
            self._start_generation(question, layer)

    def _on_model_error(self, err: BaseException, worker: Any) -> None:
        if self._closing or worker is not self._load_worker:
            return
        self._pending_question = None
        if self._stream_turn is not None:
            self._abandon_stream_turn()
        message = _friendly_error(err)
        path = str(self.model_path())
        self._report_error(f"Cannot load model: {message}" if path in message else f"Cannot load model {path}: {message}")

    def _on_load_finished(self, worker: Any) -> None:
        if worker is self._load_worker:
            self._load_worker = None
        if self._closing:
            return
        if self._gen_worker is None:
            self._hide_activity()
        self._set_busy(self._gen_worker is not None)
        self._update_status()

    # ------------------------------------------------------------------ asking
    def send(self, question: str | None = None) -> bool:
        """Ask ``question`` (default: the text in the box) about the chosen layer.

        Returns False (with a notification and a transcript line) when it cannot start.
        """
        if self._gen_worker is not None or self._stream_turn is not None:
            show_info("The model is still answering: press Stop first.")
            return False
        typed = question is None
        question = (self.question_box.toPlainText() if typed else question).strip()
        if not question:
            return False
        volume = self._selected_volume()
        if volume is None:
            return False
        layer = self.current_layer()
        not_ct = modality_problem(volume)
        if not_ct:  # an MR/PET series would be read as HU: refuse rather than answer nonsense
            self._report_error(f"{layer.name}: {not_ct}.")
            return False
        if typed:
            self.question_box.clear()
        self._next_slice = self.slice_context(layer) if is_slice_question(question) else None
        shown = question if self._next_slice is None else f"{question} [{self._next_slice.text}]"
        self._add_turn("user", shown, layer=layer.name)
        self._stream_turn = self._add_turn("assistant", "", layer=layer.name, question=question)
        self._stream_text = ""
        if self.engine is not None and self._engine_key == self._requested_key():
            self._start_generation(question, layer)
        else:
            self._pending_question = (question, layer)
            self.load_model()
        self._set_busy(True)
        return True

    def _start_generation(self, question: str, layer: Image) -> None:
        from napari.qt.threading import create_worker

        try:
            volume = volume_from_layer(layer)
        except ValueError as err:
            self._abandon_stream_turn()
            self._report_error(str(err))
            return
        on_screen, self._next_slice = self._next_slice, None
        model_question = question
        if on_screen is not None:  # the slab around the slice on screen, and where it is
            volume, model_question = on_screen.slab, on_screen.question_for_model(question)
        engine = self.engine
        stop_event = threading.Event()
        done = threading.Event()
        self._stop_event, self._generation_done = stop_event, done
        max_new_tokens = self.max_new_tokens

        def generate():
            try:
                yield from engine.answer(volume, model_question, max_new_tokens=max_new_tokens, stop_event=stop_event)
            finally:
                done.set()

        worker = create_worker(generate, _start_thread=False, _ignore_errors=True)  # _on_generation_error
        worker.yielded.connect(self._on_yielded)
        worker.errored.connect(self._on_generation_error)
        worker.finished.connect(lambda w=worker: self._on_generation_finished(w))
        self._gen_worker = worker
        self._gen_context = (question, volume, layer)
        self._stream_started = time.perf_counter()
        self._show_activity("Answering")
        self._set_busy(True)
        worker.start()

    def _on_yielded(self, item: Any) -> None:
        if self._closing or self._stream_turn is None:
            return
        if isinstance(item, str):
            self._stream_text += item
            self.text_streamed.emit(self._stream_turn.id, self._stream_text)
            if not self._render_timer.isActive():  # coalesce: one repaint per frame, not per token
                self._render_timer.start()
            now = time.perf_counter()
            if now - self._stream_saved_at > _STREAM_AUTOSAVE_S:  # a crash keeps the partial answer
                self.transcript.update(self._stream_turn, self._stream_text)
                self._stream_saved_at = now
            return
        self._record_answer(item)

    def _render_stream(self) -> None:
        if self._stream_turn is not None and not self._closing:
            self._render_turn(self._stream_turn, self._stream_text + " \u258d")

    def _record_answer(self, answer: Any) -> None:
        from napari_tghmoe.report import ReportDocument

        question, volume, layer = self._gen_context
        turn = self._stream_turn
        stopped = bool(getattr(answer, "stopped", self._stop_event.is_set()))
        text = str(getattr(answer, "text", self._stream_text))
        notes = ["stopped by the user before the end"] if stopped else []
        if is_placeholder_model(self.model_path()):
            notes.append("untrained placeholder model: the text is not a medical finding")
        document = ReportDocument.from_answer(answer, volume, question=question, notes=notes)
        self.transcript.update(turn, text, report=document.to_dict(), stopped=stopped)
        record = AnswerRecord(
            turn_id=turn.id,
            question=question,
            answer=answer,
            volume=volume,
            layer_name=layer.name,
            layer_ref=weakref.ref(layer),
            stopped=stopped,
        )
        record.document = document  # type: ignore[attr-defined]
        from napari_tghmoe._report_writer import REPORT_METADATA_KEY

        layer.metadata[REPORT_METADATA_KEY] = document  # for File > Save (npe2 report writer)
        self.records[turn.id] = record
        rate = (getattr(answer, "timings", None) or {}).get("tokens_per_s")
        self._last_rate = float(rate) if rate else None
        self._render_turn(turn, text + (" [stopped]" if stopped else ""))
        self._stream_turn = None
        self.answer_recorded.emit(turn.id)
        self.select_answer(turn.id)

    def _on_generation_error(self, err: BaseException) -> None:
        if self._closing:
            return
        if self._stream_turn is not None:
            self._abandon_stream_turn()
        self._report_error(f"The model failed: {_friendly_error(err)}")

    def _on_generation_finished(self, worker: Any) -> None:
        if worker is self._gen_worker:
            self._gen_worker = None
        if self._closing:
            return
        if self._stream_turn is not None:  # ended without an Answer (aborted)
            self._abandon_stream_turn(note="stopped")
        if self._load_worker is None:
            self._hide_activity()
        self._set_busy(self._load_worker is not None)
        self._update_status()

    def _abandon_stream_turn(self, note: str = "no answer") -> None:
        turn = self._stream_turn
        self._stream_turn = None
        if turn is None:
            return
        text = self._stream_text + (f" [{note}]" if self._stream_text else f"[{note}]")
        self.transcript.update(turn, text)
        self._render_turn(turn, text)

    def stop(self) -> None:
        """Ask the running answer to end (the engine checks after every token)."""
        self._pending_question = None
        self._stop_event.set()
        if self._gen_worker is None and self._stream_turn is not None and self._load_worker is not None:
            self._abandon_stream_turn(note="stopped")
            self._set_busy(True)

    @property
    def is_busy(self) -> bool:
        return self._gen_worker is not None or self._stream_turn is not None

    def slice_context(self, layer: Any) -> Any:
        """The plane and slice the user is looking at on ``layer`` (prompt words + slab volume)."""
        return context_for_layer(layer, volume_from_layer(layer), self.plane_tracker.plane, self.viewer.dims.point)

    # ------------------------------------------------------------------ transcript
    def _add_turn(self, role: str, text: str, **meta: Any) -> Turn:
        turn = self.transcript.add(role, text, **meta)
        self._render_turn(turn, text)
        return turn

    def _item_for(self, turn_id: int) -> QListWidgetItem | None:
        for row in range(self.transcript_view.count()):
            item = self.transcript_view.item(row)
            if item.data(Qt.ItemDataRole.UserRole) == turn_id:
                return item
        return None

    def _render_turn(self, turn: Turn, text: str) -> None:
        who = {"user": "You", "assistant": "Model", "error": "Error", "info": "Note"}.get(turn.role, turn.role)
        label = f"[{turn.time_label}] {who}: {text if text else '...'}"
        item = self._item_for(turn.id)
        if item is None:
            item = QListWidgetItem(label)
            item.setData(Qt.ItemDataRole.UserRole, turn.id)
            if turn.role == "error":
                item.setForeground(QColor("#ff7b72"))
            elif turn.role == "user":
                item.setForeground(QColor("#8ab4f8"))
            self.transcript_view.addItem(item)
        else:
            item.setText(label)
        self.transcript_view.scrollToBottom()

    def _show_transcript(self) -> None:
        self.transcript_view.clear()
        for turn in self.transcript:
            self._render_turn(turn, turn.text)

    def transcript_texts(self) -> list[str]:
        return [self.transcript_view.item(row).text() for row in range(self.transcript_view.count())]

    def clear_transcript(self) -> None:
        if self.is_busy:
            show_info("Stop the running answer before clearing the transcript.")
            return
        self.transcript.clear()
        self.records.clear()
        self.transcript_view.clear()
        self.answer_selected.emit(-1)

    def _report_error(self, message: str) -> None:
        show_error(message)
        if not self._closing:
            self._add_turn("error", message)
            self.status_label.setText(message)

    # ------------------------------------------------------------------ answers
    def latest_record(self) -> AnswerRecord | None:
        return self.records[max(self.records)] if self.records else None

    def select_answer(self, turn_id: int) -> None:
        item = self._item_for(turn_id)
        if item is not None and self.transcript_view.currentItem() is not item:
            self.transcript_view.setCurrentItem(item)  # emits via _on_transcript_selection
        else:
            self.answer_selected.emit(turn_id)

    def selected_record(self) -> AnswerRecord | None:
        item = self.transcript_view.currentItem()
        if item is not None:
            record = self.records.get(item.data(Qt.ItemDataRole.UserRole))
            if record is not None:
                return record
        return self.latest_record()

    def _on_transcript_selection(self, current: QListWidgetItem | None, previous: Any = None) -> None:
        if current is None:
            return
        turn_id = current.data(Qt.ItemDataRole.UserRole)
        if turn_id in self.records:
            self.answer_selected.emit(turn_id)

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
        from napari_tghmoe.report import ReportDocument, export_report

        record = record or self.selected_record()
        if record is None:
            raise ValueError("no answer to export yet")
        if include_identifiers is None:
            include_identifiers = self.identifiers_check.isChecked()
        base = record.document  # type: ignore[attr-defined]
        document = ReportDocument.from_dict(base.to_dict())
        document.attach_volume(record.volume, include_identifiers=include_identifiers)
        return export_report(document, path, overwrite=overwrite)

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
            self._report_error(f"Export failed: {_short(err)}")
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
        self.clear_button.setEnabled(not busy)
        self.busy_changed.emit(busy)

    def status_text(self) -> str:
        path = self.model_path()
        if self.engine is None:
            state = "model not loaded (loads on first question)"
            device = self.device_combo.currentText()
        else:
            device = str(getattr(self.engine, "device", "")) or self.device_combo.currentText()
            precision = str(getattr(self.engine, "precision", "") or "")
            device = f"{device} {precision}".strip()
            state = Path(path).name if path else "model"
        parts = [device, state]
        if is_placeholder_model(path) or self.model_combo.itemData(self.model_combo.currentIndex()) == _PLACEHOLDER_KEY:
            parts.append("untrained placeholder model")
        parts.append(gpu_memory_text())
        if self._last_rate:
            parts.append(f"{self._last_rate:.1f} tokens/s")
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
        self._pending_question = None
        self.plane_tracker.disconnect()
        # Let the generator run to its end rather than quitting the worker: the engine stops
        # within a token, yields its Answer and joins its thread, so nothing is left running.
        self._stop_event.set()
        self._generation_done.wait(timeout_s)
        for timer in (self._render_timer, self._activity_timer):
            try:
                timer.stop()
            except RuntimeError:  # already deleted with the window
                pass
        self._unbind_viewer()
        if self._stream_turn is not None:
            text = self._stream_text + " [viewer closed]"
            self.transcript.update(self._stream_turn, text)
            self._stream_turn = None


# --------------------------------------------------------------------------- launcher glue

CHAT_DOCK_NAME = "Ask the CT model"
ROUTING_DOCK_NAME = "Expert routing"


def dock_assistant(viewer: Any, *, area: str = "right", **chat_options: Any) -> tuple[ChatWidget, Any]:
    """Dock the chat and the routing view (the demo launcher's layout); return both widgets."""
    from napari_tghmoe._widgets.routing_view import RoutingView

    chat = ChatWidget(viewer, **chat_options)
    routing = RoutingView(viewer, chat=chat)
    viewer.window.add_dock_widget(chat, name=CHAT_DOCK_NAME, area=area)
    viewer.window.add_dock_widget(routing, name=ROUTING_DOCK_NAME, area=area)
    return chat, routing


def answer_and_wait(chat: ChatWidget, question: str = REPORT_REQUEST, timeout_s: float = 300.0) -> AnswerRecord | None:
    """Send ``question`` and run the Qt event loop until the answer is in (for scripted demos)."""
    from qtpy.QtWidgets import QApplication

    if not chat.send(question):
        return None
    deadline = time.perf_counter() + timeout_s
    while (chat.is_busy or chat._load_worker is not None) and time.perf_counter() < deadline:
        QApplication.processEvents()
        time.sleep(0.01)
    if chat.is_busy:
        chat.stop()
    return chat.latest_record()
