"""How users ask: report-request phrasings and question paraphrase templates.

Users type freely, so training samples many wordings of "write the report" and wraps
questions in several framings; evaluation uses a **held-out** list that never appears in
training, to measure whether the model follows an instruction it has not seen verbatim.
A recipe names the lists it uses (``"report_train"``, ``"report_heldout"``,
``"question_train"``, ``"question_heldout"``) or gives a text file (one per line).

The engine (``napari_tghmoe.model.prompts.plan_prompt``) rewrites report requests it
recognises to ``REPORT_PROMPTS[0]``; every one of ``REPORT_PROMPTS`` is part of the
training list, so the canonical instruction is always trained.
"""

from __future__ import annotations

import random
from pathlib import Path

from napari_tghmoe.model.prompts import REPORT_PROMPTS

#: Report requests seen in training (the engine's own templates first).
REPORT_TRAIN: tuple[str, ...] = (
    *REPORT_PROMPTS,
    "Generate a radiology report for this CT scan.",
    "Write the report.",
    "Describe the findings.",
    "What are the findings in this scan?",
    "Please describe this CT volume.",
    "Can you write up the findings for this study?",
    "Report the findings of this CT.",
    "Give me a report of this scan.",
    "Produce a findings report for this volume.",
    "List the abnormalities seen in this CT scan.",
    "Describe what you see in this volume and any abnormal findings.",
    "Write a structured report with findings and impression.",
    "Read this CT and report the findings.",
    "I need a radiology report for this study.",
    "Provide a report describing this CT examination.",
    "What does this scan show?",
    "Caption this CT volume with its findings.",
    "Draft the radiology report for this exam.",
    "Please generate the findings and impression for this CT.",
    "Interpret this CT scan.",
    "Summarize the findings in this volume.",
    "Create a report of the findings of this scan.",
    "Describe any lesions visible in this CT.",
    "Tell me the findings on this CT.",
)

#: Report requests used only at evaluation (never in training).
REPORT_HELDOUT: tuple[str, ...] = (
    "Could you put together a radiology read of this volume?",
    "Dictate the findings for this examination.",
    "What would you write in the report for this CT?",
    "Go through this scan and report what you find.",
    "Please provide your radiological interpretation of these images.",
    "Write up this study for the referring physician.",
    "Findings, please.",
    "Compose a short report on this CT, including the impression.",
)

#: Framings around a question seen in training; ``{question}`` is the question as written,
#: ``{question_lc}`` the same with a lower-case first letter.
QUESTION_TRAIN: tuple[str, ...] = (
    "{question}",
    "{question}",  # as-is twice: the unwrapped question stays the most common form
    "Question: {question}",
    "{question} Please answer.",
    "Looking at this CT volume, {question_lc}",
    "Based on the scan, {question_lc}",
    "Answer the question about this image. {question}",
    "About this CT: {question}",
)

#: Question framings used only at evaluation.
QUESTION_HELDOUT: tuple[str, ...] = (
    "Judging from these images, {question_lc}",
    "{question} Reply briefly.",
    "Quick question about this study: {question}",
    "Have a look at the volume. {question}",
)

PHRASING_SETS: dict[str, tuple[str, ...]] = {
    "report_train": REPORT_TRAIN,
    "report_heldout": REPORT_HELDOUT,
    "question_train": QUESTION_TRAIN,
    "question_heldout": QUESTION_HELDOUT,
}


def get_phrasings(name_or_path: str | Path) -> tuple[str, ...]:
    """A named phrasing list, or the non-empty lines of a text file (``#`` starts a comment)."""
    if str(name_or_path) in PHRASING_SETS:
        return PHRASING_SETS[str(name_or_path)]
    path = Path(name_or_path)
    if not path.is_file():
        known = ", ".join(PHRASING_SETS)
        raise ValueError(f"unknown phrasing list {name_or_path!r}: use one of {known} or a text file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    phrasings = tuple(line for line in lines if line and not line.startswith("#"))
    if not phrasings:
        raise ValueError(f"{path}: no phrasings in this file")
    return phrasings


def apply_question_template(template: str, question: str) -> str:
    """Wrap ``question`` in ``template`` (see :data:`QUESTION_TRAIN` for the fields)."""
    question = question.strip()
    lowered = question[:1].lower() + question[1:] if question[:2] != question[:2].upper() else question
    return template.format(question=question, question_lc=lowered)


def pick(phrasings: tuple[str, ...], rng: random.Random) -> str:
    return phrasings[rng.randrange(len(phrasings))]
