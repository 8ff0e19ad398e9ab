"""The conversation with the local model, without Qt: model handle, turns, answers, stop, export.

The chat dock is a thin Qt view over :class:`Conversation`; the CLI and the tests drive the
same object directly. Two ways to get an answer:

* on the calling thread: :meth:`Conversation.ask` (``on_token`` sees every chunk) or the
  generator :meth:`Conversation.stream`;
* split across threads, as the chat dock does it: :meth:`Conversation.begin` records the
  question, :meth:`Conversation.answer_stream` returns the generator a worker thread runs, and
  :meth:`~Conversation.add_text`, :meth:`~Conversation.finish` and :meth:`~Conversation.abandon`
  take its output back on the thread that owns the conversation. The worker side reads only
  the engine and the question, so the transcript file and the records change on one thread.

The turns are an ordered list (a :class:`~napari_tghmoe.transcript.Transcript`, autosaved)
owned here; each finished answer is an :class:`AnswerRecord` keyed by its turn id, with what
the routing view and the exports need. psygnal signals tell the views what changed.

No qtpy or napari import; torch and transformers load only inside :func:`load_engine`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psygnal import Signal

from napari_tghmoe.transcript import Transcript, Turn

if TYPE_CHECKING:
    from napari_tghmoe.engine import Answer, InferenceEngine
    from napari_tghmoe.io._types import CTVolume
    from napari_tghmoe.report import ReportDocument

__all__ = [
    "DEVICE_CHOICES",
    "REPORT_REQUEST",
    "AnswerRecord",
    "Conversation",
    "ModelChoice",
    "ModelLoadFailed",
    "PendingAnswer",
    "Question",
    "QuestionRefused",
    "Turn",
    "default_model_path",
    "friendly_error",
    "gpu_memory_text",
    "is_placeholder_model",
    "load_engine",
    "short_error",
]

REPORT_REQUEST = "Generate a radiology report."

#: Device / precision choices -> ``InferenceEngine.from_pretrained`` load options.
DEVICE_CHOICES: dict[str, dict[str, Any]] = {
    "auto": {"device": "auto", "quantization": "auto"},
    "CUDA 4-bit": {"device": "cuda", "quantization": "4bit"},
    "CUDA 8-bit": {"device": "cuda", "quantization": "8bit"},
    "CUDA bf16": {"device": "cuda", "quantization": "none", "dtype": "bfloat16"},
    "CPU": {"device": "cpu", "quantization": "none"},
}
DEFAULT_DEVICE = "auto"

STOPPED_NOTE = "stopped by the user before the end"
PLACEHOLDER_NOTE = "untrained placeholder model: the text is not a medical finding"
#: A streaming answer is written to the transcript file at most this often (a crash keeps it).
AUTOSAVE_INTERVAL_S = 2.0


# --------------------------------------------------------------------------- errors and status


def short_error(err: BaseException) -> str:
    """The first non-empty line of an error: what a notification has room for."""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def friendly_error(err: BaseException) -> str:
    """:func:`short_error`, plus what to do when the GPU ran out of memory."""
    text = short_error(err)
    if "out of memory" in text.lower() or type(err).__name__ == "OutOfMemoryError":
        return f"Out of memory: {text}. Try 'CUDA 4-bit' or 'CPU' in the device menu."
    return text


def gpu_memory_text() -> str:
    """"GPU used/total GiB", or "no GPU"; never imports torch just to draw a status line."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            used = torch.cuda.memory_allocated() / 2**30
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            return f"GPU {used:.1f}/{total:.0f} GiB"
    except Exception:
        pass
    return "no GPU"


class ModelLoadFailed(RuntimeError):
    """The chosen model folder could not be loaded; the message names the folder and the reason."""

    def __init__(self, folder: str | Path, cause: BaseException) -> None:
        self.folder = str(folder)
        self.reason = friendly_error(cause)
        if self.folder in self.reason:
            message = f"Cannot load model: {self.reason}"
        else:
            message = f"Cannot load model {self.folder}: {self.reason}"
        super().__init__(message)


class QuestionRefused(ValueError):
    """A question that cannot be asked now (an answer is running, the volume is not CT...)."""


# --------------------------------------------------------------------------- the model


def default_model_path() -> Path | None:
    """The bundled demo model when it is installed."""
    from napari_tghmoe._resources import demo_model_path

    try:
        path = demo_model_path()
    except FileNotFoundError:
        return None
    return path if (path / "config.json").is_file() else None


def is_placeholder_model(path: str | Path | None) -> bool:
    """True for a folder holding the untrained placeholder model (its text means nothing)."""
    from napari_tghmoe.model.placeholder import is_placeholder

    return bool(path) and is_placeholder(Path(path))


@dataclass(frozen=True)
class ModelChoice:
    """Which model folder to load and how (a key of :data:`DEVICE_CHOICES`).

    ``placeholder``: build the untrained placeholder model into ``path`` on first load.
    """

    path: str
    device: str = DEFAULT_DEVICE
    placeholder: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))

    @classmethod
    def default(cls, device: str = DEFAULT_DEVICE) -> ModelChoice:
        """The bundled demo model, else the placeholder built on first use."""
        demo = default_model_path()
        if demo is not None:
            return cls(str(demo), device)
        from napari_tghmoe.model.placeholder import placeholder_model_dir

        return cls(str(placeholder_model_dir()), device, placeholder=True)

    @property
    def key(self) -> tuple[str, str]:
        """What identifies a loaded engine: folder and device choice."""
        return (self.path, self.device)

    @property
    def name(self) -> str:
        return Path(self.path).name

    def load_options(self) -> dict[str, Any]:
        return dict(DEVICE_CHOICES.get(self.device, DEVICE_CHOICES[DEFAULT_DEVICE]))


def load_engine(choice: ModelChoice) -> InferenceEngine:
    """Load ``choice`` (blocking, seconds to minutes: run it off the GUI thread).

    Raises :class:`ModelLoadFailed` naming the folder, whatever went wrong.
    """
    try:
        from napari_tghmoe.engine import InferenceEngine

        if choice.placeholder:
            from napari_tghmoe.model.placeholder import ensure_placeholder_model

            ensure_placeholder_model(Path(choice.path))
        return InferenceEngine.from_pretrained(choice.path, **choice.load_options())
    except Exception as err:
        raise ModelLoadFailed(choice.path, err) from err


# --------------------------------------------------------------------------- turns and answers


@dataclass
class Question:
    """What is asked about which volume.

    ``model_text`` is the instruction the model gets when it differs from what the user typed
    (a slice question names the plane and slice); ``shown_text`` the transcript line when it
    differs. ``layer_ref`` returns the viewer layer the volume came from (None when gone).
    """

    text: str
    volume: CTVolume
    layer_name: str = ""
    layer_ref: Callable[[], Any] = field(default=lambda: None, repr=False, compare=False)
    model_text: str | None = None
    shown_text: str | None = None

    @property
    def prompt(self) -> str:
        return self.model_text or self.text

    @property
    def display(self) -> str:
        return self.shown_text or self.text

    @property
    def source_name(self) -> str:
        """How an error names what was asked about: the layer, else the volume's description."""
        return self.layer_name or str(getattr(self.volume, "description", "") or "the volume")


@dataclass
class AnswerRecord:
    """One finished answer: what the routing view, the report writer and the exports need."""

    turn_id: int
    question: str
    answer: Any  # napari_tghmoe.engine.Answer
    volume: CTVolume
    layer_name: str
    layer_ref: Callable[[], Any] = field(default=lambda: None, repr=False)
    stopped: bool = False
    document: ReportDocument | None = None  # de-identified report of this answer

    @property
    def layer(self) -> Any:
        return self.layer_ref()

    @property
    def label(self) -> str:
        question = self.question if len(self.question) < 40 else self.question[:37] + "..."
        return f"#{self.turn_id} {question}"

    @property
    def findings(self) -> list[dict[str, Any]]:
        """Findings the answer states, with places where known (see ``ReportDocument.findings``)."""
        return list(self.document.findings) if self.document is not None else []


@dataclass
class PendingAnswer:
    """The answer being written: its question, its transcript turn and the text so far."""

    question: Question
    turn: Turn
    text: str = ""
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    saved_at: float = 0.0


# --------------------------------------------------------------------------- the controller


class Conversation:
    """Turns, answers and the model of one chat; usable from the CLI, tests and the Qt dock.

    Signals (emitted on the thread that calls the methods): ``turn_added(Turn)``,
    ``turn_changed(Turn)`` (an answer abandoned), ``answer_recorded(AnswerRecord)``,
    ``answer_selected(int)`` (turn id; -1: none) and ``cleared()``.
    """

    turn_added = Signal(object)
    turn_changed = Signal(object)
    answer_recorded = Signal(object)
    answer_selected = Signal(int)
    cleared = Signal()

    def __init__(
        self,
        transcript_path: str | Path | None = None,
        *,
        model: ModelChoice | None = None,
        max_new_tokens: int = 256,
    ) -> None:
        """``transcript_path``: the JSONL file the turns autosave to (None: memory only)."""
        self.transcript = Transcript(transcript_path)
        self.records: dict[int, AnswerRecord] = {}
        self.model: ModelChoice | None = model
        self.engine: Any = None
        self.max_new_tokens = max_new_tokens
        self.pending: PendingAnswer | None = None
        self.selected_turn_id: int | None = None
        self.last_tokens_per_s: float | None = None
        self._engine_key: tuple[str, str] | None = None
        self._generation_done = threading.Event()
        self._generation_done.set()

    # ------------------------------------------------------------------ turns
    @property
    def turns(self) -> list[Turn]:
        """Every turn of the conversation, oldest first (a copy)."""
        return list(self.transcript.turns)

    def _add(self, role: str, text: str, **meta: Any) -> Turn:
        turn = self.transcript.add(role, text, **meta)
        self.turn_added.emit(turn)
        return turn

    def report_error(self, message: str) -> Turn:
        """Keep an error in the conversation (the views show it as an "Error" line)."""
        return self._add("error", message)

    def new_conversation(self) -> None:
        """Forget every turn and answer (the chat's Clear): the next question starts afresh."""
        if self.pending is not None:
            raise QuestionRefused("Stop the running answer before starting a new conversation.")
        self.transcript.clear()
        self.records.clear()
        self.selected_turn_id = None
        self.cleared.emit()
        self.answer_selected.emit(-1)

    # ------------------------------------------------------------------ model
    def choose_model(self, choice: ModelChoice) -> bool:
        """Use ``choice`` from the next question on; True when that drops the loaded engine."""
        self.model = choice
        if self.engine is not None and self._engine_key != choice.key:
            self.unload_model()
            return True
        return False

    @property
    def engine_ready(self) -> bool:
        """A model is loaded and it is the chosen one."""
        return self.engine is not None and self.model is not None and self._engine_key == self.model.key

    def adopt_engine(self, engine: Any, choice: ModelChoice) -> bool:
        """Take an engine loaded elsewhere (a worker thread) for ``choice``.

        False, and nothing changes, when another model was chosen while it loaded.
        """
        if self.model is not None and choice.key != self.model.key:
            return False
        self.model = choice
        self.engine = engine
        self._engine_key = choice.key
        return True

    def load_model(self, choice: ModelChoice | None = None) -> Any:
        """Load ``choice`` (default: the chosen model, else the bundled demo) on this thread.

        A no-op when that model is already loaded. Raises :class:`ModelLoadFailed`.
        """
        if choice is not None:
            self.choose_model(choice)
        if self.model is None:
            self.model = ModelChoice.default()
        if self.engine_ready:
            return self.engine
        engine = load_engine(self.model)
        self.adopt_engine(engine, self.model)
        return engine

    def unload_model(self) -> None:
        """Drop the engine (its memory goes once a running answer lets go of it)."""
        self.engine = None
        self._engine_key = None

    @property
    def model_is_placeholder(self) -> bool:
        return self.model is not None and (self.model.placeholder or is_placeholder_model(self.model.path))

    # ------------------------------------------------------------------ answers
    @property
    def is_answering(self) -> bool:
        """A question was asked and its answer is not recorded or abandoned yet."""
        return self.pending is not None

    @property
    def generation_done(self) -> threading.Event:
        """Set while no generation thread runs: wait on it before letting the process go."""
        return self._generation_done

    def refusal(self, question: Question) -> str | None:
        """Why ``question`` cannot be asked now, or None."""
        if self.pending is not None:
            return "The model is still answering: press Stop first."
        if not question.text.strip():
            return "The question is empty."
        from napari_tghmoe.io._checks import modality_problem

        problem = modality_problem(question.volume)  # MR/PET read as HU would be nonsense
        return f"{question.source_name}: {problem}." if problem else None

    def begin(self, question: Question) -> PendingAnswer:
        """Record ``question`` and an empty answer turn; raises :class:`QuestionRefused`."""
        refusal = self.refusal(question)
        if refusal:
            raise QuestionRefused(refusal)
        self._add("user", question.display, layer=question.layer_name)
        turn = self._add("assistant", "", layer=question.layer_name, question=question.text)
        self.pending = PendingAnswer(question, turn)
        return self.pending

    def answer_stream(self) -> Iterator[Any]:
        """The generator of the pending answer: text chunks, then the engine's ``Answer``.

        Call this on the conversation's thread (it marks a generation as running); the
        generator it returns reads only the engine and the question, so a worker may run it.
        Start it at once: :attr:`generation_done` is set when it ends.
        """
        pending = self.pending
        if pending is None:
            raise RuntimeError("no question is pending: call begin() first")
        if not self.engine_ready:
            raise RuntimeError("no model is loaded: call load_model() first")
        engine, question = self.engine, pending.question
        stop_event, max_new_tokens = pending.stop_event, self.max_new_tokens
        done = threading.Event()
        self._generation_done = done

        def generate() -> Iterator[Any]:
            try:
                yield from engine.answer(
                    question.volume, question.prompt, max_new_tokens=max_new_tokens, stop_event=stop_event
                )
            finally:
                done.set()

        return generate()

    def add_text(self, chunk: str) -> str:
        """Append a streamed chunk to the pending answer; returns its text so far."""
        pending = self.pending
        if pending is None:
            return ""
        pending.text += chunk
        now = time.perf_counter()
        if now - pending.saved_at > AUTOSAVE_INTERVAL_S:  # a crash keeps the partial answer
            self.transcript.update(pending.turn, pending.text)
            pending.saved_at = now
        return pending.text

    def finish(self, answer: Answer) -> AnswerRecord:
        """Record the engine's final ``Answer`` with its report; it becomes the selected answer."""
        from napari_tghmoe.report import ReportDocument

        pending = self.pending
        if pending is None:
            raise RuntimeError("no answer is being written")
        question, turn = pending.question, pending.turn
        stopped = bool(getattr(answer, "stopped", pending.stop_event.is_set()))
        text = str(getattr(answer, "text", pending.text))
        notes = [STOPPED_NOTE] if stopped else []
        if self.model_is_placeholder:
            notes.append(PLACEHOLDER_NOTE)
        document = ReportDocument.from_answer(answer, question.volume, question=question.text, notes=notes)
        self.transcript.update(turn, text, report=document.to_dict(), stopped=stopped)
        record = AnswerRecord(
            turn_id=turn.id,
            question=question.text,
            answer=answer,
            volume=question.volume,
            layer_name=question.layer_name,
            layer_ref=question.layer_ref,
            stopped=stopped,
            document=document,
        )
        self.records[turn.id] = record
        rate = (getattr(answer, "timings", None) or {}).get("tokens_per_s")
        self.last_tokens_per_s = float(rate) if rate else None
        self.pending = None
        self.answer_recorded.emit(record)
        self.select_answer(turn.id)
        return record

    def abandon(self, note: str = "no answer") -> Turn | None:
        """End the pending answer without a result, keeping its text and ``[note]``."""
        pending = self.pending
        if pending is None:
            return None
        self.pending = None
        text = pending.text + (f" [{note}]" if pending.text else f"[{note}]")
        self.transcript.update(pending.turn, text)
        self.turn_changed.emit(pending.turn)
        return pending.turn

    def stop(self) -> None:
        """Ask the running answer to end (the engine checks after every token); any thread."""
        pending = self.pending
        if pending is not None:
            pending.stop_event.set()

    def stream(self, question: Question) -> Generator[str, None, AnswerRecord | None]:
        """Ask on this thread, loading the model if needed: yields text chunks, returns the record.

        Raises :class:`QuestionRefused` or :class:`ModelLoadFailed` (also kept as an error
        turn); a model failure is kept as an error turn and raised. Closing the generator
        early stops the answer. Returns None when the answer ended without a result.
        """
        self.begin(question)
        try:
            self.load_model()
        except ModelLoadFailed as err:
            self.abandon()
            self.report_error(str(err))
            raise
        chunks = self.answer_stream()
        try:
            for item in chunks:
                if isinstance(item, str):
                    self.add_text(item)
                    yield item
                else:
                    return self.finish(item)
        except GeneratorExit:
            self.stop()
            self.abandon(note="stopped")
            raise
        except Exception as err:
            self.abandon()
            self.report_error(f"The model failed: {friendly_error(err)}")
            raise
        finally:
            chunks.close()  # an early exit ends the generation thread too
        self.abandon(note="stopped")  # the generation ended without an answer
        return None

    def ask(self, question: Question, *, on_token: Callable[[str], None] | None = None) -> AnswerRecord | None:
        """Ask and wait for the answer on this thread; ``on_token`` gets every text chunk."""
        chunks = self.stream(question)
        try:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration as end:
                    return end.value
                if on_token is not None:
                    on_token(chunk)
        finally:
            chunks.close()

    # ------------------------------------------------------------------ records
    def latest_record(self) -> AnswerRecord | None:
        return self.records[max(self.records)] if self.records else None

    def selected_record(self) -> AnswerRecord | None:
        """The answer the views show: the selected one, else the latest."""
        record = self.records.get(self.selected_turn_id) if self.selected_turn_id is not None else None
        return record or self.latest_record()

    def select_answer(self, turn_id: int) -> None:
        """Make the answer of ``turn_id`` the one the views show (ignored for unknown ids)."""
        if turn_id not in self.records:
            return
        self.selected_turn_id = turn_id
        self.answer_selected.emit(turn_id)

    # ------------------------------------------------------------------ export
    def export_answer(
        self,
        path: str | Path,
        *,
        record: AnswerRecord | None = None,
        include_identifiers: bool = False,
        overwrite: bool = False,
    ) -> Path:
        """Write the report of ``record`` (default: the selected answer); format from the suffix.

        Patient identifiers go in only with ``include_identifiers``.
        """
        from napari_tghmoe.report import ReportDocument, export_report

        record = record or self.selected_record()
        if record is None or record.document is None:
            raise ValueError("no answer to export yet")
        document = ReportDocument.from_dict(record.document.to_dict())
        document.attach_volume(record.volume, include_identifiers=include_identifiers)
        return export_report(document, path, overwrite=overwrite)

    def export_transcript(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write every turn as plain text ("[HH:MM:SS] role: text" lines); never over a file
        unless ``overwrite``."""
        from napari_tghmoe.report import ReportExistsError

        path = Path(path)
        if path.exists() and not overwrite:
            raise ReportExistsError(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(self.transcript.to_text(), encoding="utf-8")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path
