"""Where the findings an answer states lie in the volume, from the 3D segmentation (no Qt).

The language model says *what* it sees ("a 12 mm renal cyst in the left kidney, lower pole");
the Med3DInsight segmenter knows *where* each focal finding is (``SegFinding.voxel_zyx`` on
the scan's grid). :func:`stated_findings` reads the finding kinds an answer names (the
project's finding vocabulary, :data:`napari_tghmoe.phantom.FINDING_KINDS`), with the location
the text gives and the span of the words, skipping negated ones ("no renal cyst");
:func:`locate_findings` pairs each with a segmentation finding of the same kind, preferring one
whose organ and side agree with the stated location and never one on the other side, each
segmentation finding used at most once. A stated finding without a partner stays unlocated:
the chat shows it as plain text.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LocatedFinding",
    "StatedFinding",
    "location_agreement",
    "locate_findings",
    "stated_findings",
]

#: Words that, earlier in the same clause, make a finding absent ("no renal cyst", "without ...").
_NEGATION = re.compile(
    r"\b(no|not|without|negative for|absence of|absent|free of|rule out|ruled out|neither|nor|none)\b",
    re.IGNORECASE,
)
#: Where a clause ends (a negation before it does not reach a later finding).
_CLAUSE_END = re.compile(r"[.;:!?\n]|\bbut\b|\bhowever\b|\b[A-H]\.\s", re.IGNORECASE)
#: Organ words -> the compartment they name; two different compartments disagree.
_ORGAN_WORDS: dict[str, str] = {
    "lung": "chest", "lungs": "chest", "lobe": "chest", "pulmonary": "chest", "pleura": "chest",
    "pleural": "chest",
    "liver": "liver", "hepatic": "liver",
    "kidney": "kidney", "kidneys": "kidney", "renal": "kidney",
    "spleen": "spleen", "splenic": "spleen",
}
#: "... in the <place>" for a place outside the vocabulary ("in the left kidney"): up to six
#: words, ending at punctuation, a number or a word that starts another phrase.
_FREE_LOCATION = re.compile(
    r"\s+(?:is\s+|are\s+)?(?:seen\s+|noted\s+|present\s+|located\s+)?in\s+the\s+"
    r"([a-z\-]+(?:,?\s+[a-z\-]+){0,5}?)"
    r"(?=\s*(?:[.;:!?\n]|$|\d)|,?\s+(?:measuring|with|which|that|and|is|are|of|without)\b)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class StatedFinding:
    """A finding kind the text names, where it says it is, and the words' span in the text."""

    kind: str
    location: str  # "" when the text gives no place
    start: int  # span [start, end) of the words to link in the answer text
    end: int


@dataclass(frozen=True)
class LocatedFinding:
    """A stated finding with its place in the scan, from the segmentation."""

    kind: str
    location: str  # as the answer states it ("" when it gives none)
    voxel_zyx: tuple[int, int, int]  # on the scan's own grid (the CT layer's data grid)
    position_mm: tuple[float, float, float]  # patient (x, y, z) mm
    segmented_location: str  # the organ the segmenter found it in ("" when unknown)
    probability: float
    volume_ml: float
    start: int = -1  # span of the words in the answer text (-1: none)
    end: int = -1

    @property
    def label(self) -> str:
        """Name for a point on the CT: kind and where."""
        where = self.location or self.segmented_location
        return f"{self.kind} ({where})" if where else self.kind

    def to_dict(self) -> dict[str, Any]:
        """For the transcript and the JSON export."""
        return {
            "kind": self.kind,
            "location": self.location,
            "voxel_zyx": [int(v) for v in self.voxel_zyx],
            "position_mm": [round(float(v), 3) for v in self.position_mm],
            "segmented_location": self.segmented_location,
            "probability": round(float(self.probability), 4),
            "volume_ml": round(float(self.volume_ml), 3),
            "span": [int(self.start), int(self.end)],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocatedFinding:
        span = list(data.get("span") or (-1, -1))
        return cls(
            kind=str(data["kind"]),
            location=str(data.get("location") or ""),
            voxel_zyx=tuple(int(v) for v in data["voxel_zyx"]),  # type: ignore[arg-type]
            position_mm=tuple(float(v) for v in data["position_mm"]),  # type: ignore[arg-type]
            segmented_location=str(data.get("segmented_location") or ""),
            probability=float(data.get("probability", 0.0)),
            volume_ml=float(data.get("volume_ml", 0.0)),
            start=int(span[0]),
            end=int(span[1]),
        )


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[re.Pattern[str], re.Pattern[str], tuple[str, ...]]:
    from napari_tghmoe.phantom import FINDING_KINDS, KIND_LOCATIONS

    kinds = tuple(sorted(FINDING_KINDS, key=len, reverse=True))
    places = sorted({loc for locs in KIND_LOCATIONS.values() for loc in locs}, key=len, reverse=True)
    kind_re = re.compile(r"\b(" + "|".join(re.escape(k) for k in kinds) + r")s?\b", re.IGNORECASE)
    place_re = re.compile(
        r"\s+(?:is\s+|are\s+)?(?:seen\s+|noted\s+|present\s+|located\s+)?in\s+the\s+("
        + "|".join(re.escape(p) for p in places)
        + r")\b",
        re.IGNORECASE,
    )
    return kind_re, place_re, tuple(places)


def _negated(text: str, position: int) -> bool:
    """A negation word between the start of the clause and ``position``."""
    clause_start = 0
    for match in _CLAUSE_END.finditer(text, 0, position):
        clause_start = match.end()
    return bool(_NEGATION.search(text[clause_start:position]))


def _side_before(text: str, position: int) -> str:
    """"left" / "right" just before a kind ("a left renal cyst"), else ""."""
    match = re.search(r"\b(left|right)\s+(?:\w+\s+)?$", text[max(0, position - 24) : position], re.IGNORECASE)
    return match.group(1).lower() if match else ""


def stated_findings(text: str, question: str = "") -> list[StatedFinding]:
    """Finding kinds ``text`` states (not negated), in order, with the location it gives.

    An answer that names no kind but a location ("left kidney, lower pole") to a question that
    names exactly one kind ("Where is the renal cyst?") states that kind there.
    """
    kind_re, place_re, places = _vocabulary()
    found: list[StatedFinding] = []
    for match in kind_re.finditer(text or ""):
        if _negated(text, match.start()):
            continue
        kind = match.group(1).lower()
        end = match.end()
        location = ""
        known = place_re.match(text, end)
        free = _FREE_LOCATION.match(text, end) if known is None else None
        if known is not None:
            location, end = known.group(1).lower(), known.end()
        elif free is not None:
            location, end = free.group(1).strip().lower(), free.end(1)
        else:
            location = _side_before(text, match.start())
        found.append(StatedFinding(kind, location, match.start(), end))
    if found or not question:
        return found
    asked = {m.group(1).lower() for m in kind_re.finditer(question)}
    if len(asked) != 1:
        return []
    lowered = text.lower()
    for place in places:
        index = lowered.find(place)
        if index >= 0 and not _negated(text, index):
            return [StatedFinding(asked.pop(), place, index, index + len(place))]
    return []


def _side(text: str) -> str:
    words = set(re.findall(r"[a-z]+", text.lower()))
    sides = words & {"left", "right"}
    return sides.pop() if len(sides) == 1 else ""


def _compartment(text: str) -> str:
    found = {_ORGAN_WORDS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in _ORGAN_WORDS}
    return found.pop() if len(found) == 1 else ""


def location_agreement(stated: str, segmented: str | None) -> int | None:
    """How well a segmentation finding's organ fits the stated location: None when they disagree
    (another side, or another organ), else a score, higher the better (0: nothing to compare)."""
    stated, segmented = (stated or "").lower(), (segmented or "").lower()
    if not stated or not segmented:
        return 0
    side_a, side_b = _side(stated), _side(segmented)
    if side_a and side_b and side_a != side_b:
        return None
    organ_a, organ_b = _compartment(stated), _compartment(segmented)
    if organ_a and organ_b and organ_a != organ_b:
        return None
    score = 0
    if segmented in stated or stated in segmented:
        score += 4
    if organ_a and organ_a == organ_b:
        score += 2
    if side_a and side_a == side_b:
        score += 1
    return score


def _inside(voxel: Sequence[int], box: Any) -> bool:
    return box is not None and all(a <= int(v) < b for v, (a, b) in zip(voxel, box))


def locate_findings(
    stated: Iterable[StatedFinding], segmented: Iterable[Any], *, prefer_box: Any = None
) -> list[LocatedFinding | None]:
    """One entry per stated finding: its :class:`LocatedFinding`, or None when no segmentation
    finding of that kind fits.

    ``segmented``: ``SegFinding``-like objects (``kind``, ``voxel_zyx``, ``position_mm``,
    ``location``, ``probability``, ``volume_ml``). Among those of the stated kind whose location
    does not disagree with the stated one, the best agreement wins, then one inside
    ``prefer_box`` (the region a question was about, ``((z0, z1), (y0, y1), (x0, x1))``), then the
    most probable. Each segmentation finding is given to one stated finding at most.
    """
    pool = list(segmented)
    used: set[int] = set()
    chosen: dict[tuple[str, str], int | None] = {}  # a finding stated twice (findings, impression) is one
    result: list[LocatedFinding | None] = []
    for finding in stated:
        same = (finding.kind, finding.location)
        if same in chosen and finding.location:
            index = chosen[same]
            result.append(None if index is None else _located(finding, pool[index]))
            continue
        best: tuple[Any, ...] | None = None
        for index, candidate in enumerate(pool):
            if index in used or str(candidate.kind).lower() != finding.kind:
                continue
            agreement = location_agreement(finding.location, getattr(candidate, "location", None))
            if agreement is None:
                continue
            key = (agreement, _inside(candidate.voxel_zyx, prefer_box), float(candidate.probability), -index)
            if best is None or key > best[0]:
                best = (key, index, candidate)
        if best is None:
            chosen[same] = None
            result.append(None)
            continue
        _, index, candidate = best
        used.add(index)
        chosen[same] = index
        result.append(_located(finding, candidate))
    return result


def _located(finding: StatedFinding, candidate: Any) -> LocatedFinding:
    return LocatedFinding(
        kind=finding.kind,
        location=finding.location,
        voxel_zyx=tuple(int(v) for v in candidate.voxel_zyx),  # type: ignore[arg-type]
        position_mm=tuple(float(v) for v in candidate.position_mm),  # type: ignore[arg-type]
        segmented_location=str(getattr(candidate, "location", "") or ""),
        probability=float(candidate.probability),
        volume_ml=float(getattr(candidate, "volume_ml", 0.0)),
        start=finding.start,
        end=finding.end,
    )
