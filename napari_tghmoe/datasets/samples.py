"""One sample schema for every source: what training and evaluation both read.

A :class:`Sample` is (volume or a path to it, prompt, target, task, question type, meta); the
loaders of each source (:mod:`.phantom`, :mod:`.m3d`, :mod:`.ct_rate`) make them, the
training collation and the evaluation loop consume them, so both see the same prompts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from napari_tghmoe.datasets import phrasings as _phr

TASKS = ("report", "vqa_closed", "vqa_open")


def tasks_for(task: str) -> tuple[str, ...]:
    """CLI task name -> sample tasks: report, vqa (closed and open), vqa_closed, vqa_open, all."""
    mapping = {
        "report": ("report",),
        "vqa": ("vqa_closed", "vqa_open"),
        "vqa_closed": ("vqa_closed",),
        "vqa_open": ("vqa_open",),
        "all": TASKS,
    }
    if task not in mapping:
        raise ValueError(f"task must be one of {', '.join(mapping)}, got {task!r}")
    return mapping[task]


@dataclass
class Sample:
    """One (volume, instruction, answer) training or evaluation item.

    ``volume``: a ``CTVolume``, a (z, y, x) HU array or tensor (spacing in
    ``meta["spacing"]``), or a path (``.npy`` M3D, ``.npz`` phantom cache, anything
    :func:`napari_tghmoe.io.load_volume` reads). ``meta`` carries what evaluation needs:
    ``id``, ``source``, and per task ``choices`` / ``answer_letter`` / ``answer_text``
    (closed VQA), ``question`` (the question before any framing), ``findings`` (phantom
    reports: list of {kind, location, size_mm}), ``intensity`` ("hu" or "unit", see
    :mod:`napari_tghmoe.model.preprocess`; "normalized" is read as "unit").
    """

    volume: Any
    prompt: str
    target: str
    task: str  # "report" | "vqa_closed" | "vqa_open"
    qtype: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")


def closed_vqa_prompt(question: str, choices: Sequence[str]) -> str:
    """M3D closed-VQA prompt: ``"{question} Choices: A. {a} B. {b} C. {c} D. {d}"``."""
    from napari_tghmoe.model.prompts import format_closed_question  # the engine's own formatter

    if len(choices) != 4:
        raise ValueError(f"closed VQA needs four choices, got {len(choices)}")
    return format_closed_question(question, [str(choice).strip() for choice in choices])


def closed_vqa_target(letter: str, answer: str) -> str:
    return f"{letter.strip().upper()}. {str(answer).strip()}"


class Phrasing:
    """Picks report requests and question framings deterministically from a seed.

    ``style``: "train" (the training lists), "heldout" (evaluation-only lists) or "none"
    (the first report prompt — what the engine sends — and questions unchanged; the M3D
    benchmark protocol).
    """

    def __init__(self, style: str = "train", seed: int = 0, report_list: str | None = None, question_list: str | None = None):
        if style not in ("train", "heldout", "none"):
            raise ValueError(f"phrasing style must be train, heldout or none, got {style!r}")
        self.style = style
        self.rng = random.Random(seed)
        default_report = "report_heldout" if style == "heldout" else "report_train"
        default_question = "question_heldout" if style == "heldout" else "question_train"
        self.reports = _phr.get_phrasings(report_list or default_report)
        self.questions = _phr.get_phrasings(question_list or default_question)

    def report_request(self) -> str:
        if self.style == "none":
            return _phr.REPORT_TRAIN[0]
        return _phr.pick(self.reports, self.rng)

    def question(self, question: str) -> str:
        if self.style == "none":
            return question.strip()
        return _phr.apply_question_template(_phr.pick(self.questions, self.rng), question)
