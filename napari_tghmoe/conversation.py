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

A follow-up about the same scan carries the last :attr:`Conversation.context_limit` answered
turns (question and answer) into the prompt; a question about another scan starts afresh, and
the transcript says so. The findings an answer states get their place in the scan from the 3D
segmentation (:mod:`napari_tghmoe.finding_links`): at once when a segmentation of that scan is
known, else when the caller hands one to :meth:`Conversation.locate` (the chat dock runs the
segmenter in a worker after the answer; :meth:`Conversation.ask` runs :attr:`segmenter` itself).

A model that reads the CT through a segmentation cascade ("evidence", ``EvidenceReader``) and the
finding links share one segmentation per scan: the one the model made for its answer places the
answer's findings when its cascade is the segmenter's (:attr:`Conversation.segmenter_folder`), and
a remembered segmentation made by the model's own cascade is handed to the engine before it reads
the scan (``engine.remember_segmentation`` / ``engine.segmentation_of``, both optional).

No qtpy or napari import; torch and transformers load only inside :func:`load_engine`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
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
    "DEFAULT_CONTEXT_TURNS",
    "DEVICE_CHOICES",
    "MAX_CONTEXT_TURNS",
    "REPORT_REQUEST",
    "AnswerRecord",
    "ContextTurn",
    "Conversation",
    "DeviceFit",
    "ModelChoice",
    "ModelDoesNotFit",
    "ModelLoadFailed",
    "PendingAnswer",
    "Question",
    "QuestionRefused",
    "Turn",
    "default_model_path",
    "device_fits",
    "friendly_error",
    "gpu_memory_text",
    "is_placeholder_model",
    "load_engine",
    "load_engine_if_fits",
    "scan_key",
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

#: Earlier turns a follow-up question carries by default, and the most a user may ask for.
DEFAULT_CONTEXT_TURNS = 3
MAX_CONTEXT_TURNS = 10

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


def _unique_places(links: list[Any]) -> list[dict[str, Any]]:
    """Located findings for the export, each (kind, stated location, voxel) once."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for link in links:
        key = (link.kind, link.location, tuple(link.voxel_zyx))
        if key not in seen:
            seen.add(key)
            data = link.to_dict()
            data.pop("span", None)
            out.append(data)
    return out


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


# --------------------------------------------------------------------------- will it fit?


def _size_text(n_bytes: int) -> str:
    """"3.9 GiB", or "280 MiB" under a GiB (a tiny model is not "0.0 GiB")."""
    if n_bytes >= 2**30:
        return f"{n_bytes / 2**30:.1f} GiB"
    return f"{n_bytes / 2**20:.0f} MiB"


@dataclass(frozen=True)
class DeviceFit:
    """What the device picker shows for one choice before loading: the memory the model needs
    there against what is free now (``report``, a ``model.memory.FitReport``), or why that was
    not checked (``problem``: no CUDA device, a folder that is not a model...)."""

    choice: str
    report: Any = None
    problem: str = ""

    @property
    def fits(self) -> bool | None:
        """True / False from the estimate; None when it was not checked."""
        return None if self.report is None else bool(self.report.fits)

    @property
    def refused(self) -> bool:
        """Loading it would not fit: the chat dock refuses before reading any weight."""
        return self.report is not None and not self.report.fits

    @property
    def summary(self) -> str:
        """One short line: "~3.9 GiB of 12.1 GiB free (fp32 on cpu)", "does not fit: needs ..."."""
        report = self.report
        if report is None:
            return self.problem or "not checked"
        where = f"{report.precision} on {report.device}"
        needed = _size_text(int(report.needed_bytes))
        if report.available_bytes is None:
            return f"~{needed}, free memory unknown ({where})"
        free = _size_text(int(report.available_bytes))
        if report.fits:
            return f"~{needed} of {free} free ({where})"
        return f"does not fit: needs {needed}, {free} free ({where})"


def device_fits(path: str | Path, *, available: int | None = None) -> dict[str, DeviceFit]:
    """A :class:`DeviceFit` for every :data:`DEVICE_CHOICES` entry of the model folder ``path``.

    Reads ``config.json`` and the safetensors headers (no tensor) and the free memory; the first
    call imports torch (is there a GPU?), about 1.5 s: call it off the GUI thread. Never raises:
    a folder that is not a model gives every choice the reason as its ``problem`` (loading it
    reports the same). ``available`` replaces the free-memory probe (tests).
    """
    from napari_tghmoe.model import memory
    from napari_tghmoe.model.loading import ModelLoadError

    fits: dict[str, DeviceFit] = {}
    for name, options in DEVICE_CHOICES.items():
        try:
            report = memory.check_fits_for_options(path, **options, available=available)
        except ModelLoadError as err:
            problem = f"not checked: {err.reason}"
            return {choice: DeviceFit(choice, problem=problem) for choice in DEVICE_CHOICES}
        except ValueError as err:  # CUDA asked for without a GPU
            cuda = str(options.get("device", "")).startswith("cuda") and "CUDA" in str(err)
            reason = "no CUDA device" if cuda else short_error(err)
            fits[name] = DeviceFit(name, problem=f"not available: {reason}")
        except Exception as err:  # noqa: BLE001 - a hint for the picker must never break it
            fits[name] = DeviceFit(name, problem=f"not checked: {short_error(err)}")
        else:
            fits[name] = DeviceFit(name, report)
    return fits


class ModelDoesNotFit(ModelLoadFailed):
    """The chosen device and precision need more memory than is free: refused before loading
    (on the CPU a load that does not fit ends in the kernel's out-of-memory killer, napari and all).

    ``fits``: every choice as checked, so the picker can show them; ``fitting``: the choices
    that would fit.
    """

    def __init__(self, folder: str | Path, fit: DeviceFit, fits: dict[str, DeviceFit] | None = None) -> None:
        self.fit = fit
        self.fits = dict(fits or {})
        self.fitting = tuple(name for name, other in self.fits.items() if name != fit.choice and other.fits)
        hint = ""
        if self.fitting:
            hint = f"; in the Device menu, {' or '.join(repr(n) for n in self.fitting)} would fit"
        super().__init__(folder, MemoryError(f"{fit.report.message}{hint}"))


def load_engine_if_fits(choice: ModelChoice, *, available: int | None = None) -> InferenceEngine:
    """:func:`load_engine`, refused with :class:`ModelDoesNotFit` before any weight is read when
    the memory estimate of ``choice`` exceeds what is free now (what the chat dock's load worker
    runs; a choice that could not be checked loads as before)."""
    fits = device_fits(choice.path, available=available)
    fit = fits.get(choice.device)
    if fit is not None and fit.refused:
        raise ModelDoesNotFit(choice.path, fit, fits)
    return load_engine(choice)


# --------------------------------------------------------------------------- turns and answers


def scan_key(volume: Any) -> str:
    """What makes two questions about "the same scan": the very voxel array (a layer's data, not
    a copy) on the same geometry. Valid while the array lives: holders check with :class:`_ScanRef`."""
    shape = "x".join(str(int(n)) for n in getattr(volume, "shape", ()))
    spacing = ",".join(f"{float(v):.4g}" for v in getattr(volume, "spacing", ()))
    origin = ",".join(f"{float(v):.4g}" for v in getattr(volume, "origin", ()))
    return f"{id(getattr(volume, 'hu', volume))}|{shape}|{spacing}|{origin}"


class _ScanRef:
    """A scan's key plus a weak reference to its voxels, so a key never outlives its scan (an id
    may be reused by a later array)."""

    def __init__(self, volume: Any) -> None:
        self.key = scan_key(volume)
        data = getattr(volume, "hu", volume)
        try:
            self._ref: Callable[[], Any] = weakref.ref(data)
        except TypeError:  # an array type without weak references: hold it
            self._ref = lambda data=data: data

    def matches(self, volume: Any) -> bool:
        return self._ref() is getattr(volume, "hu", volume) and self.key == scan_key(volume)


@dataclass
class Question:
    """What is asked about which volume.

    ``model_text`` is the instruction the model gets when it differs from what the user typed
    (a slice question names the plane and slice); ``shown_text`` the transcript line when it
    differs. ``layer_ref`` returns the viewer layer the volume came from (None when gone).
    When ``volume`` is a part of the scan (a slab, a region's crop), ``scan`` is the whole scan
    and ``box`` the part's voxel ranges ``((z0, z1), (y0, y1), (x0, x1))`` in it; ``region`` is
    the :class:`~napari_tghmoe.regions.Region` the user marked, if any.
    """

    text: str
    volume: CTVolume
    layer_name: str = ""
    layer_ref: Callable[[], Any] = field(default=lambda: None, repr=False, compare=False)
    model_text: str | None = None
    shown_text: str | None = None
    scan: CTVolume | None = field(default=None, repr=False)
    box: tuple[tuple[int, int], ...] | None = None
    region: Any = None
    region_info: dict[str, Any] | None = None  # the region as the export writes it

    @property
    def prompt(self) -> str:
        return self.model_text or self.text

    @property
    def whole_volume(self) -> CTVolume:
        """The scan the question is about (the volume itself unless it is a part)."""
        return self.scan if self.scan is not None else self.volume

    @property
    def scan_key(self) -> str:
        return scan_key(self.whole_volume)

    @property
    def display(self) -> str:
        return self.shown_text or self.text

    @property
    def source_name(self) -> str:
        """How an error names what was asked about: the layer, else the volume's description."""
        return self.layer_name or str(getattr(self.volume, "description", "") or "the volume")


@dataclass(frozen=True)
class ContextTurn:
    """An earlier answered turn a follow-up carries: the instruction sent and the answer."""

    turn_id: int
    question: str
    answer: str

    def to_dict(self) -> dict[str, Any]:
        return {"turn": self.turn_id, "question": self.question, "answer": self.answer}


@dataclass
class AnswerRecord:
    """One finished answer: what the routing view, the report writer and the exports need.

    ``volume`` is what the model was shown; for a slab or a region that is a part of ``scan``
    at ``box``, so the routing overlay and the finding links map back onto the CT.
    """

    turn_id: int
    question: str
    answer: Any  # napari_tghmoe.engine.Answer
    volume: CTVolume
    layer_name: str
    layer_ref: Callable[[], Any] = field(default=lambda: None, repr=False)
    stopped: bool = False
    document: ReportDocument | None = None  # de-identified report of this answer
    scan: CTVolume | None = field(default=None, repr=False)
    box: tuple[tuple[int, int], ...] | None = None
    region: Any = None
    scan_key: str = ""
    context: list[ContextTurn] = field(default_factory=list)  # earlier turns in the prompt
    stated: list[Any] = field(default_factory=list)  # finding_links.StatedFinding
    finding_links: list[Any] = field(default_factory=list)  # finding_links.LocatedFinding, text order
    locations_checked: bool = False  # the stated findings were matched against a segmentation
    locations_note: str = ""  # why they have no place (no segmenter, it failed...)

    @property
    def layer(self) -> Any:
        return self.layer_ref()

    @property
    def whole_volume(self) -> CTVolume:
        return self.scan if self.scan is not None else self.volume

    @property
    def needs_locations(self) -> bool:
        """It states findings that no segmentation was asked about yet."""
        return bool(self.stated) and not self.locations_checked

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
    context: list[ContextTurn] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    saved_at: float = 0.0


# --------------------------------------------------------------------------- the controller


class Conversation:
    """Turns, answers and the model of one chat; usable from the CLI, tests and the Qt dock.

    Signals (emitted on the thread that calls the methods): ``turn_added(Turn)``,
    ``turn_changed(Turn)`` (an answer abandoned), ``answer_recorded(AnswerRecord)``,
    ``findings_located(AnswerRecord)`` (its stated findings got their places),
    ``answer_selected(int)`` (turn id; -1: none) and ``cleared()``.
    """

    turn_added = Signal(object)
    turn_changed = Signal(object)
    answer_recorded = Signal(object)
    findings_located = Signal(object)
    answer_selected = Signal(int)
    cleared = Signal()

    def __init__(
        self,
        transcript_path: str | Path | None = None,
        *,
        model: ModelChoice | None = None,
        max_new_tokens: int = 256,
        context_limit: int = DEFAULT_CONTEXT_TURNS,
        segmenter: Callable[[CTVolume], Any] | None = None,
        segmenter_folder: str | Path | None = None,
    ) -> None:
        """``transcript_path``: the JSONL file the turns autosave to (None: memory only).

        ``context_limit``: earlier turns a follow-up carries; ``segmenter``: ``CTVolume ->
        SegmentationResult`` used by :meth:`ask` / :meth:`stream` to place stated findings;
        ``segmenter_folder``: the cascade folder that places stated findings (None: the bundled
        demo cascade, ``segment_volume``'s default). A segmentation the model made for its answer
        is used instead of segmenting again only when it comes from that same cascade.
        """
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
        self._context_limit = DEFAULT_CONTEXT_TURNS
        self.context_limit = context_limit
        self._context_from = 0  # answers of turns from this id on may be context
        self._context_scan: _ScanRef | None = None  # the scan the context is about
        self.segmenter = segmenter
        self.segmenter_folder: str | None = str(segmenter_folder) if segmenter_folder else None
        # scan key -> (the scan, its SegmentationResult, the cascade folder it came from or None)
        self._segmentations: dict[str, tuple[_ScanRef, Any, Path | None]] = {}

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
        """Forget every turn and answer: the next question starts afresh, without context."""
        if self.pending is not None:
            raise QuestionRefused("Stop the running answer before starting a new conversation.")
        self.transcript.clear()
        self.records.clear()
        self.selected_turn_id = None
        self._context_from = 0
        self._context_scan = None
        self.cleared.emit()
        self.answer_selected.emit(-1)

    # ------------------------------------------------------------------ context
    @property
    def context_limit(self) -> int:
        """How many earlier answered turns a follow-up carries (0: every question stands alone)."""
        return self._context_limit

    @context_limit.setter
    def context_limit(self, value: int) -> None:
        self._context_limit = max(0, min(int(value), MAX_CONTEXT_TURNS))

    def context_for(self, question: Question) -> list[ContextTurn]:
        """The earlier turns ``question`` would carry now: the last :attr:`context_limit` answers
        about the same scan since the context last started, oldest first (stopped ones left out)."""
        same_scan = self._context_scan is not None and self._context_scan.matches(question.whole_volume)
        if self.context_limit <= 0 or not same_scan:
            return []
        eligible = [
            record
            for turn_id, record in sorted(self.records.items())
            if turn_id >= self._context_from and not record.stopped and str(getattr(record.answer, "text", "")).strip()
        ]
        return [
            ContextTurn(r.turn_id, str(getattr(r.answer, "prompt", "") or r.question), str(r.answer.text).strip())
            for r in eligible[-self.context_limit :]
        ]

    def _start_context(self, question: Question) -> None:
        """A question about another scan than the last one starts fresh context (said in the transcript)."""
        scan = question.whole_volume
        earlier = any(turn_id >= self._context_from for turn_id in self.records)
        if self._context_scan is not None and not self._context_scan.matches(scan) and earlier:
            note = self._add("info", f"New scan ({question.source_name}): the earlier turns are not used as context.")
            self._context_from = note.id
        if self._context_scan is None or not self._context_scan.matches(scan):
            self._context_scan = _ScanRef(scan)

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
        self._start_context(question)
        context = self.context_for(question)
        meta: dict[str, Any] = {"layer": question.layer_name}
        if context:
            meta["context_turns"] = [c.turn_id for c in context]
        if question.region_info:
            meta["region"] = question.region_info
        self._add("user", question.display, **meta)
        turn = self._add("assistant", "", layer=question.layer_name, question=question.text)
        self.pending = PendingAnswer(question, turn, context=context)
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
        history = [(c.question, c.answer) for c in pending.context]
        extra = {"history": history} if history else {}  # a single question is asked as it always was
        handover = self._segmentation_for_engine(question)
        done = threading.Event()
        self._generation_done = done

        def generate() -> Iterator[Any]:
            try:
                if handover is not None:  # the evidence reader takes it only from its own cascade
                    try:
                        engine.remember_segmentation(question.volume, *handover)
                    except Exception:  # noqa: BLE001 - only a saving: the reader then segments the scan itself
                        pass
                yield from engine.answer(
                    question.volume, question.prompt, max_new_tokens=max_new_tokens, stop_event=stop_event, **extra
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
        """Record the engine's final ``Answer`` with its report; it becomes the selected answer.

        Stated findings are placed at once when a segmentation of the scan is known.
        """
        from napari_tghmoe.finding_links import stated_findings
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
        used = int(getattr(answer, "history_used", len(pending.context)) or 0)
        context = pending.context[len(pending.context) - used :] if used else []
        document = ReportDocument.from_answer(answer, question.volume, question=question.text, notes=notes)
        document.context = [c.to_dict() for c in context]
        document.region = question.region_info
        record = AnswerRecord(
            turn_id=turn.id,
            question=question.text,
            answer=answer,
            volume=question.volume,
            layer_name=question.layer_name,
            layer_ref=question.layer_ref,
            stopped=stopped,
            document=document,
            scan=question.scan,
            box=question.box,
            region=question.region,
            scan_key=question.scan_key,
            context=context,
            stated=[] if stopped else stated_findings(text, question.text),
        )
        known = self.known_segmentation(record.whole_volume)
        if known is None:
            known = self._segmentation_from_engine(question)
        if known is not None and record.stated:
            self._place_findings(record, known)
        self.transcript.update(turn, text, report=document.to_dict(), stopped=stopped, **self._finding_meta(record))
        self.records[turn.id] = record
        rate = (getattr(answer, "timings", None) or {}).get("tokens_per_s")
        self.last_tokens_per_s = float(rate) if rate else None
        self.pending = None
        if len(context) < len(pending.context):  # the prompt had to drop the oldest turns
            kept = len(context)
            self._add("info", f"Only the last {kept} earlier turn{'s' if kept != 1 else ''} fit the model's context."
                      if kept else "The earlier turns do not fit the model's context: this answer went without them.")
        self.answer_recorded.emit(record)
        if record.finding_links:
            self.findings_located.emit(record)
        self.select_answer(turn.id)
        return record

    # ------------------------------------------------------------------ finding places
    def remember_segmentation(self, volume: CTVolume, result: Any, folder: str | Path | None = None) -> None:
        """Keep a segmentation of the scan ``volume``: later answers about it use it at once.

        ``folder``: the cascade folder it was made with, when known (None: not known; the same
        result remembered again keeps the folder it had). The model's evidence reader may then use
        it instead of segmenting the scan, if that is its own cascade. Held while the scan lives
        (the scan itself is not kept alive by it).
        """
        ref = _ScanRef(volume)
        for key in [k for k, (r, _, _) in self._segmentations.items() if r._ref() is None]:
            del self._segmentations[key]  # scans closed since
        earlier = self._known_entry(volume)
        if folder is None and earlier is not None and earlier[1] is result:
            folder = earlier[2]
        self._segmentations[ref.key] = (ref, result, Path(folder) if folder is not None else None)

    def _known_entry(self, volume: CTVolume) -> tuple[_ScanRef, Any, Path | None] | None:
        entry = self._segmentations.get(scan_key(volume))
        return entry if entry is not None and entry[0].matches(volume) else None

    def known_segmentation(self, volume: CTVolume) -> Any:
        """The remembered segmentation of ``volume`` (None when there is none)."""
        entry = self._known_entry(volume)
        return entry[1] if entry is not None else None

    def known_segmentation_folder(self, volume: CTVolume) -> Path | None:
        """The cascade folder the remembered segmentation of ``volume`` came from (None: none, or
        not known)."""
        entry = self._known_entry(volume)
        return entry[2] if entry is not None else None

    def _segmentation_for_engine(self, question: Question) -> tuple[Any, Path] | None:
        """(segmentation, its folder) to offer the engine before it reads ``question``'s volume:
        a remembered one of known provenance, when the model is shown the whole scan (a slab or a
        region is segmented on its own grid) and the engine takes such offers."""
        if question.volume is not question.whole_volume:
            return None
        if not callable(getattr(self.engine, "remember_segmentation", None)):
            return None
        entry = self._known_entry(question.volume)
        if entry is None or entry[2] is None:
            return None
        return entry[1], entry[2]

    def _segmentation_from_engine(self, question: Question) -> Any:
        """The segmentation the model made of the whole scan while answering ``question``
        (remembered with its folder), when its cascade is the one that places stated findings
        (:attr:`segmenter_folder`); else None."""
        lookup = getattr(self.engine, "segmentation_of", None)
        if not callable(lookup) or question.volume is not question.whole_volume:
            return None
        found = lookup(question.volume, self.segmenter_folder)
        if found is None:
            return None
        result, folder = found
        labels = getattr(result, "labels", None)
        if tuple(getattr(labels, "shape", ())) != tuple(getattr(question.volume, "shape", ())):
            return None
        self.remember_segmentation(question.whole_volume, result, folder)
        return result

    def locate(self, turn_id: int, result: Any, folder: str | Path | None = None) -> AnswerRecord | None:
        """Place the findings answer ``turn_id`` states with a ``SegmentationResult`` of its scan
        (made with the cascade in ``folder``, when known: see :meth:`remember_segmentation`).

        Emits ``findings_located`` when at least one got a place. None for an unknown turn.
        """
        record = self.records.get(turn_id)
        if record is None:
            return None
        self.remember_segmentation(record.whole_volume, result, folder)
        self._place_findings(record, result)
        self._save_findings(record)
        if record.finding_links:
            self.findings_located.emit(record)
        return record

    def locations_unavailable(self, turn_id: int, reason: str) -> None:
        """The findings of answer ``turn_id`` get no places (e.g. the segmenter failed): keep why."""
        record = self.records.get(turn_id)
        if record is not None:
            record.locations_checked = True
            record.locations_note = reason
            self._save_findings(record)

    def _place_findings(self, record: AnswerRecord, result: Any) -> None:
        from napari_tghmoe.finding_links import locate_findings

        prefer = record.box if record.region is not None else None
        placed = locate_findings(record.stated, getattr(result, "findings", []) or [], prefer_box=prefer)
        record.finding_links = [f for f in placed if f is not None]
        record.locations_checked = True
        record.locations_note = "" if record.finding_links else "no segmented finding of the stated kinds"
        if record.document is not None:
            record.document.located_findings = _unique_places(record.finding_links)

    def _finding_meta(self, record: AnswerRecord) -> dict[str, Any]:
        if not record.stated:
            return {}
        return {
            "stated_findings": [{"kind": f.kind, "location": f.location} for f in record.stated],
            "located_findings": [f.to_dict() for f in record.finding_links],
        }

    def _save_findings(self, record: AnswerRecord) -> None:
        turn = self.transcript.get(record.turn_id)
        if turn is None:
            return
        report = record.document.to_dict() if record.document is not None else turn.meta.get("report")
        self.transcript.update(turn, report=report, **self._finding_meta(record))

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
                    record = self.finish(item)
                    self._locate_now(record)
                    return record
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

    def _locate_now(self, record: AnswerRecord) -> None:
        """Run :attr:`segmenter` on this thread for an answer whose findings have no place yet."""
        if not record.needs_locations or self.segmenter is None:
            return
        try:
            result = self.segmenter(record.whole_volume)
        except Exception as err:  # the answer stands without places
            self.locations_unavailable(record.turn_id, f"segmentation failed: {short_error(err)}")
            return
        self.locate(record.turn_id, result)

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
