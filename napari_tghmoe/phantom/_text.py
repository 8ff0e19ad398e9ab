"""Report and VQA text for a phantom, written from its ground truth.

Findings are always written with the same sentence (``FINDING_SENTENCE``) so a reader
(or :func:`extract_findings`) can recover (kind, location) pairs; the surrounding normal
statements vary in wording and never contain a finding-kind phrase, so an absent kind is
never named.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from napari_tghmoe.phantom._types import (
    FINDING_KINDS,
    FINDING_SENTENCE,
    IMPRESSION_ITEM,
    KIND_LOCATIONS,
    PHASES,
    PLANES,
    Finding,
    VQAItem,
)

NO_ABNORMALITY = "no abnormality"
NONE_OF_THEM = "none of these organs"

_PHASE_TECHNIQUE = {
    "non-contrast": "without intravenous contrast",
    "arterial": "with intravenous contrast in the arterial phase",
    "portal venous": "with intravenous contrast in the portal venous phase",
    "delayed": "with intravenous contrast in the delayed phase",
}
_TECHNIQUE = (
    "{Plane} CT of the {region} {phase}, reconstructed at {thickness} mm slice thickness.",
    "CT of the {region} was performed {phase}. {Plane} images at {thickness} mm slice thickness.",
    "Helical CT of the {region} {phase}; {thickness} mm {plane} reconstructions.",
)

#: Report sections per region: (heading, organ group or None, normal phrasings).
_SECTIONS: dict[str, tuple[tuple[str, str | None, tuple[str, ...]], ...]] = {
    "chest": (
        ("Lungs", "lung", ("The lungs are clear.", "No focal pulmonary opacity.", "The lungs are well aerated, without focal opacity.")),
        ("Pleura", "pleura", ("No pleural fluid.", "The pleural spaces are clear.", "No pleural fluid or thickening.")),
        ("Mediastinum and hila", "lymph node", ("No mediastinal or hilar lymphadenopathy.", "Mediastinal and hilar nodes are not enlarged.", "No lymphadenopathy.")),
        ("Heart and great vessels", None, ("The heart is normal in size. The thoracic aorta is normal in caliber.", "Normal heart size, no pericardial fluid. Normal caliber of the aorta.")),
        ("Upper abdomen", None, ("The imaged upper abdomen is unremarkable.", "Unremarkable imaged upper abdomen.")),
        ("Bones", None, ("No aggressive osseous lesion.", "The imaged skeleton is unremarkable.")),
    ),
    "abdomen": (
        ("Liver", "liver", ("The liver is normal in size and attenuation, without focal abnormality.", "Homogeneous liver without focal lesions.", "The liver is unremarkable.")),
        ("Gallbladder", None, ("The gallbladder is unremarkable.", "Normal gallbladder.")),
        ("Spleen", "spleen", ("The spleen is normal in size and attenuation.", "Unremarkable spleen.", "The spleen is homogeneous.")),
        ("Pancreas", None, ("The pancreas is unremarkable.", "Normal pancreas.")),
        ("Kidneys", "kidney", ("Both kidneys are normal, without focal abnormality or hydronephrosis.", "The kidneys are unremarkable.", "Normal kidneys.")),
        ("Lymph nodes", "lymph node", ("No retroperitoneal or mesenteric lymphadenopathy.", "No enlarged abdominal nodes.", "No lymphadenopathy.")),
        ("Lung bases", None, ("The lung bases are clear.", "Clear lung bases.")),
        ("Bones", None, ("No aggressive osseous lesion.", "The imaged skeleton is unremarkable.")),
    ),
}
_NORMAL_IMPRESSION = ("No acute abnormality.", "Normal CT of the {region}.", "No significant abnormality in the {region}.")


def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def write_report(
    region: str, phase: str, slice_thickness: float, findings: list[Finding], rng: np.random.Generator, plane: str = "axial"
) -> str:
    """A sectioned radiology report (technique with the stored plane, findings by organ, impression)."""
    thickness = f"{slice_thickness:.3g}"
    technique = _pick(_TECHNIQUE, rng).format(
        region=region, phase=_PHASE_TECHNIQUE[phase], thickness=thickness, plane=plane, Plane=plane.capitalize()
    )
    lines = ["TECHNIQUE: " + technique, "", "FINDINGS:"]
    by_organ: dict[str, list[Finding]] = {}
    for f in findings:
        by_organ.setdefault(f.organ, []).append(f)
    for heading, organ, normals in _SECTIONS[region]:
        present = by_organ.get(organ, []) if organ else []
        text = " ".join(f.sentence for f in present) if present else _pick(normals, rng)
        lines.append(f"{heading}: {text}")
    lines += ["", "IMPRESSION:"]
    if findings:
        lines += [f"{i}. " + IMPRESSION_ITEM.format(size=round(f.size_mm), kind=f.kind, location=f.location) for i, f in enumerate(findings, 1)]
    else:
        lines.append(_pick(_NORMAL_IMPRESSION, rng).format(region=region))
    return "\n".join(lines)


_KIND_PATTERN = "|".join(sorted((re.escape(k) for k in FINDING_KINDS), key=len, reverse=True))
_LOCATION_PATTERN = "|".join(
    sorted({re.escape(loc) for locs in KIND_LOCATIONS.values() for loc in locs}, key=len, reverse=True)
)
_FINDING_RE = re.compile(rf"({_KIND_PATTERN}) in the ({_LOCATION_PATTERN})", re.IGNORECASE)


def extract_findings(text: str) -> list[tuple[str, str]]:
    """(kind, location) pairs a report states, in order, without duplicates.

    Reads the fixed finding sentence ("... {kind} in the {location}"), so finding recall
    and precision of a generated report can be scored against ``Phantom.findings``.
    """
    pairs: list[tuple[str, str]] = []
    for match in _FINDING_RE.finditer(text):
        pair = (match.group(1).lower(), match.group(2).lower())
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def fraction(part: int, whole: int) -> float | None:
    """``part / whole``, or None when ``whole`` is 0: the one 0/0 rule of finding scores.

    A fraction of nothing is undefined, not perfect (1.0) nor failed (0.0): a normal scan has no
    recall, a report that states nothing has no precision. Averages skip such reports, and sums
    of counts (micro averages) are unchanged by them, so a correct "no finding" neither helps nor
    hurts, and the normal scans are scored on their own (``normal_correct``).
    """
    return part / whole if whole else None


@dataclass(frozen=True)
class FindingMatch:
    """Stated (kind, location) pairs matched against the true findings of one report."""

    n_true: int  # true findings (each counted, also two of the same kind and location)
    n_stated: int  # distinct stated (kind, location) pairs
    n_true_found: int  # true findings whose kind and location the report states
    n_stated_true: int  # stated pairs that are a true finding

    @property
    def recall(self) -> float | None:
        return fraction(self.n_true_found, self.n_true)

    @property
    def precision(self) -> float | None:
        return fraction(self.n_stated_true, self.n_stated)


def match_findings(stated: Iterable[tuple[str, str | None]], truth: Iterable[tuple[str, str]]) -> FindingMatch:
    """Kind AND location must match; a kind stated without a location (None) is never true.
    Shared by :func:`finding_recall_precision` and ``napari_tghmoe.eval.metrics.finding_scores``."""
    stated_pairs = set(stated)
    truth = list(truth)
    true_pairs = set(truth)
    return FindingMatch(
        n_true=len(truth),
        n_stated=len(stated_pairs),
        n_true_found=sum(pair in stated_pairs for pair in truth),
        n_stated_true=sum(pair in true_pairs for pair in stated_pairs),
    )


def finding_recall_precision(text: str, findings: list[Finding]) -> tuple[float | None, float | None]:
    """Fraction of true findings stated (kind and location), and of stated ones that are true,
    read with :func:`extract_findings`; None where the fraction is 0/0 (:func:`fraction`): no
    true findings (recall) or nothing stated (precision)."""
    match = match_findings(extract_findings(text), [(f.kind, f.location) for f in findings])
    return match.recall, match.precision


# ----------------------------------------------------------------------------- VQA
#
# Balanced choice lists. A four-choice question says nothing without the image only if every
# option text is right about as often as it is shown. The rule used here: for each kind of
# question, the *universe* of answers it can have (e.g. a chest organ question: lung, pleura,
# lymph node, none of these organs) and their design probabilities (from the generator's own
# constants, COUNT_PROBABILITIES and REGION_ORGANS) are fixed; the four options are drawn from a
# sampling design over four-answer sets whose inclusion probability is four times each answer's
# probability, conditioned on containing the correct answer. Then P(answer = v | options shown)
# is 1/4 for every option of every list (a text-only rule can do no better than chance), as long
# as the generator meets its design. Three consequences:
#
# * Answers more frequent than 1/4 are thinned: a normal case gets an organ/abnormality question
#   only with the probability that makes "none" as frequent as each organ, and an absent kind gets
#   a location question only as often as each of its locations is the answer.
# * Questions with two true answers are not asked: organ and abnormality questions only for cases
#   with at most one finding (with two, one abnormal organ could not be a distractor of the other).
# * Questions with fewer than four possible answers are not asked: pleural effusion (two sides),
#   splenic lesion and abdominal lymph node (two locations each) get no location question; a
#   fourth option would be one that is never right.

_PLANE_Q = ("In which plane is this image shown?", "Which imaging plane is displayed?", "What is the plane of this CT image?")
_PHASE_Q = ("In which contrast phase was this CT acquired?", "What is the contrast phase of this scan?", "Which phase of contrast enhancement is shown?")
_ORGAN_Q = ("Which organ contains the abnormality?", "Which of these organs shows an abnormality?", "In which organ is the abnormality found?")
_ABN_Q = ("What abnormality is seen in the {region}?", "What is the abnormal finding in the {region}?", "Which abnormality is present in the {region}?")
_LOC_Q = ("Where is the {kind} located?", "What is the location of the {kind}?", "In which location is the {kind} seen?")
#: Options per question (M3D closed VQA).
N_CHOICES = 4


def _absent(kind: str) -> str:
    return f"no {kind} is seen"


@functools.lru_cache(maxsize=64)
def _design(probabilities: tuple[float, ...]) -> tuple[tuple[tuple[int, ...], ...], np.ndarray]:
    """Four-answer sets and their probabilities Q(S) such that answer v is in the set with
    probability 4 p_v (the maximum-entropy design, fitted by iterative scaling).

    Drawing the correct answer y with probability p_y and then S with probability proportional to
    Q(S) among the sets holding y gives P(y = v | S) = Q(S) / 4 / P(S) = 1/4 for every v in S.
    """
    p = np.asarray(probabilities, dtype=float)
    p = p / p.sum()
    if p.size < N_CHOICES or np.any(p > 1.0 / N_CHOICES + 1e-9):
        raise ValueError(f"a balanced design needs >= {N_CHOICES} answers of probability <= 1/{N_CHOICES}, got {p}")
    sets = tuple(itertools.combinations(range(p.size), N_CHOICES))
    members = np.zeros((len(sets), p.size))
    for row, chosen in enumerate(sets):
        members[row, list(chosen)] = 1.0
    target = np.minimum(N_CHOICES * p, 1.0)
    log_weight = np.zeros(p.size)
    for _ in range(2000):
        q = np.exp(members @ log_weight)
        q /= q.sum()
        inclusion = q @ members
        if np.max(np.abs(inclusion - target)) < 1e-10:
            break
        log_weight += np.log(np.maximum(target, 1e-12) / np.maximum(inclusion, 1e-12))
        log_weight = np.clip(log_weight, -60.0, 60.0)
    return sets, q


def _choose(correct: str, universe: dict[str, float], rng: np.random.Generator) -> tuple[str, ...]:
    """Four options holding ``correct``, drawn from the balanced design over ``universe``
    (answer -> design probability), in random order."""
    texts = list(universe)
    sets, q = _design(tuple(universe[t] for t in texts))
    mine = texts.index(correct)
    candidates = [row for row, chosen in enumerate(sets) if mine in chosen]
    weights = q[candidates] / q[candidates].sum()
    chosen = sets[candidates[int(rng.choice(len(candidates), p=weights))]]
    options = [texts[i] for i in chosen]
    return tuple(options[i] for i in rng.permutation(N_CHOICES))


def _item(question: str, correct: str, universe: dict[str, float], qtype: str, rng: np.random.Generator) -> VQAItem:
    choices = _choose(correct, universe, rng)
    letter = "ABCD"[choices.index(correct)]
    return VQAItem(question=question, choices=choices, answer_letter=letter, answer_text=correct, qtype=qtype)  # type: ignore[arg-type]


def _uniform(texts) -> dict[str, float]:
    texts = list(dict.fromkeys(texts))
    return {t: 1.0 / len(texts) for t in texts}


def _region_plan(region: str) -> dict[str, object]:
    """Design constants of a region, from the generator's own: how often a case has one finding,
    none, each organ and kind, and how often to ask about a normal case or an absent kind."""
    from napari_tghmoe.phantom._findings import COUNT_PROBABILITIES, REGION_ORGANS

    organs = tuple(REGION_ORGANS[region])
    counts = np.asarray(COUNT_PROBABILITIES, dtype=float)
    p_none, p_one = float(counts[0]), float(counts[1])
    expected_count = float((np.arange(counts.size) * counts).sum())
    kinds_of = {o: [k for k, (organ, regions) in FINDING_KINDS.items() if organ == o and region in regions] for o in organs}
    p_one_organ = p_one / len(organs)  # a case whose one finding is in this organ
    present = {k: expected_count / len(organs) / len(kinds_of[o]) for o in organs for k in kinds_of[o]}
    return {
        "organs": organs,
        "kinds_of": kinds_of,
        # a normal case is asked with the probability that makes "none" as frequent as each organ
        "ask_normal": p_one_organ / p_none,
        "abnormality_universe": {
            **{k: p_one_organ / len(kinds_of[o]) for o in organs for k in kinds_of[o]},
            NO_ABNORMALITY: p_one_organ,
        },
        "p_present": present,
    }


def _locations(kind: str, region: str) -> list[str]:
    """Locations a kind really occurs at in this region."""
    from napari_tghmoe.phantom._types import ABDOMEN_NODE_STATIONS, CHEST_NODE_STATIONS

    if kind == "enlarged lymph node":
        return list(CHEST_NODE_STATIONS if region == "chest" else ABDOMEN_NODE_STATIONS)
    return list(KIND_LOCATIONS[kind])


def make_vqa(region: str, phase: str, findings: list[Finding], rng: np.random.Generator, plane: str = "axial") -> list[VQAItem]:
    """Closed VQA items of the five M3D types, all answerable from the image, with balanced
    choice lists (see the comment above): plane and phase always; organ and abnormality for a
    case with one finding (and some normal cases); location for each finding whose kind has at
    least three locations in the region (and some absent kinds)."""
    plan = _region_plan(region)
    items = [
        _item(_pick(_PLANE_Q, rng), plane, _uniform(PLANES), "plane", rng),
        _item(_pick(_PHASE_Q, rng), phase, _uniform(PHASES), "phase", rng),
    ]
    organs = plan["organs"]
    ask_normal = bool(rng.random() < plan["ask_normal"])  # type: ignore[operator]
    if len(findings) == 1 or (not findings and ask_normal):
        finding = findings[0] if findings else None
        organ_universe = _uniform(list(organs) + [NONE_OF_THEM])  # type: ignore[arg-type]
        items.append(_item(_pick(_ORGAN_Q, rng), finding.organ if finding else NONE_OF_THEM, organ_universe, "organ", rng))
        items.append(
            _item(
                _pick(_ABN_Q, rng).format(region=region),
                finding.kind if finding else NO_ABNORMALITY,
                plan["abnormality_universe"],  # type: ignore[arg-type]
                "abnormality",
                rng,
            )
        )
    present_kinds = {f.kind for f in findings}
    for f in findings:
        real = _locations(f.kind, region)
        if len(real) + 1 < N_CHOICES:
            continue
        question = _pick(_LOC_Q, rng).format(kind=f.kind)
        items.append(_item(question, f.location, _uniform(real + [_absent(f.kind)]), "location", rng))
    for organ in organs:  # type: ignore[attr-defined]
        for kind in plan["kinds_of"][organ]:  # type: ignore[index]
            real = _locations(kind, region)
            draw = rng.random()
            if kind in present_kinds or len(real) + 1 < N_CHOICES:
                continue
            p_present = plan["p_present"][kind]  # type: ignore[index]
            # as often as each location of the kind is the answer of a present one
            if draw < (p_present / len(real)) / (1.0 - p_present):
                question = _pick(_LOC_Q, rng).format(kind=kind)
                items.append(_item(question, _absent(kind), _uniform(real + [_absent(kind)]), "location", rng))
    return items
