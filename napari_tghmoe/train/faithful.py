"""Targets that state only what the model was shown (issue 15: reports in the fourth round,
answers about findings in the eighth).

Why: a phantom's report states every true finding, but the evidence line the chat model reads
misses some of them (the cascade's misses and unsure findings, ~20 % on training phantoms). Trained
on the full report, the demo LLM learnt that a report holds more findings than its evidence and
invented them: on the held-out set it stated 41 findings the words did not hold (precision 0.42
against 0.77 for the words themselves). Grounded generation trains on targets the input supports
(the "faithfulness filtering" of summarisation data); here the report keeps its wording and drops
each true finding whose kind and location the evidence words do not state: its sentence leaves its
organ's section (an emptied section gets that section's normal sentence), its impression item goes
and the others are renumbered (none left: the normal impression). Nothing untrue is added: a false
finding of the evidence stays out of the target.

Answers (eighth round): a question about a finding (its location, the abnormality, its organ) was
answered from the truth while the words missed ~20 % of findings and listed some false ones, so the
model learnt to doubt its words: on held-out scans it answered "no enlarged lymph node is seen"
beside words that named one, and named a node where the words named none.
:func:`faithful_answer` gives the answer the words support instead, when that answer is one of
the question's choices; otherwise the truth stays (plane and phase questions always keep it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any


def stated_pairs(words: str) -> set[tuple[str, str | None]]:
    """(kind, location) pairs the evidence line states after its "Found:" (the metric's reading)."""
    from napari_tghmoe.eval.metrics import extract_stated_findings

    found = words.split("Found:", 1)[1] if "Found:" in words else ""
    return {(s.kind, s.location) for s in extract_stated_findings(found.replace(";", "."))}


def _field(finding: Any, name: str) -> Any:
    return finding[name] if isinstance(finding, Mapping) else getattr(finding, name)


def report_without(report: str, dropped: Iterable[Any], region: str) -> str:
    """``report`` (a phantom report) with the ``dropped`` findings taken out of its findings
    sections and its impression; every other line stays as written."""
    from napari_tghmoe.phantom._text import _NORMAL_IMPRESSION, _SECTIONS
    from napari_tghmoe.phantom._types import FINDING_SENTENCE, IMPRESSION_ITEM

    dropped = list(dropped)
    if not dropped:
        return report
    sentences, items = set(), set()
    for finding in dropped:
        values = {"size": round(float(_field(finding, "size_mm"))), "kind": _field(finding, "kind"), "location": _field(finding, "location")}
        sentences.add(FINDING_SENTENCE.format(**values))
        items.add(IMPRESSION_ITEM.format(**values))
    normals = {heading: options[0] for heading, _, options in _SECTIONS[region]}
    lines, kept, in_impression = [], [], False
    for line in report.split("\n"):
        numbered = re.match(r"^\d+\.\s*(.*)$", line)
        if in_impression and numbered:  # an impression item: kept unless dropped, renumbered below
            if numbered.group(1) not in items:
                kept.append(numbered.group(1))
            continue
        in_impression = in_impression or line.startswith("IMPRESSION:")
        heading, sep, text = line.partition(": ")
        if not in_impression and sep and heading in normals:
            for sentence in sentences:
                text = text.replace(sentence, "")
            text = re.sub(r"\s+", " ", text).strip()
            line = f"{heading}: {text or normals[heading]}"
        lines.append(line)
    # a report with a finding to drop had numbered items; none left: the normal impression
    lines += [f"{i}. {item}" for i, item in enumerate(kept, 1)] or [_NORMAL_IMPRESSION[0].format(region=region)]
    return "\n".join(lines)


def faithful_report(report: str, findings: Iterable[Any], words: str, region: str) -> str:
    """The report stating only the true findings the evidence ``words`` state (kind and location)."""
    shown = stated_pairs(words)
    dropped = [f for f in findings if (_field(f, "kind"), _field(f, "location")) not in shown]
    return report_without(report, dropped, region)


#: Closed-question types whose answer is a finding (``napari_tghmoe.phantom._text.make_vqa``).
FINDING_QTYPES = ("location", "abnormality", "organ")


def _asked_kind(question: str) -> str | None:
    """The finding kind a location question names (the longest kind found in it)."""
    from napari_tghmoe.phantom._types import FINDING_KINDS

    named = [kind for kind in FINDING_KINDS if kind in question.lower()]
    return max(named, key=len) if named else None


def supported_answer(qtype: str, question: str, words: str, region: str) -> str | None:
    """The answer the evidence ``words`` give to a phantom question about a finding, or None when
    they give none (two candidates, a kind without its location, another question type)."""
    from napari_tghmoe.phantom._text import NO_ABNORMALITY, NONE_OF_THEM, _absent
    from napari_tghmoe.phantom._types import FINDING_KINDS

    pairs = stated_pairs(words)
    if qtype == "location":
        kind = _asked_kind(question)
        if kind is None:
            return None
        return _the_one({location for stated, location in pairs if stated == kind}, _absent(kind))
    in_region = {kind for kind, _ in pairs if kind in FINDING_KINDS and region in FINDING_KINDS[kind][1]}
    if qtype == "abnormality":
        return _the_one(in_region, NO_ABNORMALITY)
    if qtype == "organ":
        return _the_one({FINDING_KINDS[kind][0] for kind in in_region}, NONE_OF_THEM)
    return None


def _the_one(named: set[str | None], nothing: str) -> str | None:
    """The answer of words that name ``named``: ``nothing`` for none, the one named (None for a kind
    stated without its place), no answer (None) for several."""
    if not named:
        return nothing
    return next(iter(named)) if len(named) == 1 else None


def faithful_answer(qtype: str | None, meta: Mapping[str, Any], words: str) -> str:
    """The answer text a question about a finding is trained on: the one the words support when it
    is among the choices, else the true one (``meta["answer_text"]``)."""
    truth = str(meta["answer_text"])
    if qtype not in FINDING_QTYPES or "region" not in meta:
        return truth
    supported = supported_answer(qtype, str(meta.get("question", "")), words, str(meta["region"]))
    return supported if supported is not None and supported in list(meta.get("choices", ())) else truth
