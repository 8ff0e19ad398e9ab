"""Report and VQA text for a phantom, written from its ground truth.

Findings are always written with the same sentence (``FINDING_SENTENCE``) so a reader
(or :func:`extract_findings`) can recover (kind, location) pairs; the surrounding normal
statements vary in wording and never contain a finding-kind phrase, so an absent kind is
never named.
"""

from __future__ import annotations

import re

import numpy as np

from napari_tghmoe.phantom._types import (
    FINDING_KINDS,
    FINDING_SENTENCE,
    IMPRESSION_ITEM,
    KIND_LOCATIONS,
    ORGANS_BY_REGION,
    PHASES,
    Finding,
    VQAItem,
)

NO_ABNORMALITY = "no abnormality"
NONE_OF_THEM = "none of these organs"

_PHASE_TECHNIQUE = {
    "non-contrast": "without intravenous contrast",
    "arterial": "with intravenous contrast in the arterial phase",
    "portal venous": "with intravenous contrast in the portal venous phase",
}
_TECHNIQUE = (
    "Axial CT of the {region} {phase}, reconstructed at {thickness} mm slice thickness.",
    "CT of the {region} was performed {phase}. Axial images at {thickness} mm slice thickness.",
    "Helical CT of the {region} {phase}; {thickness} mm axial reconstructions.",
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


def write_report(region: str, phase: str, slice_thickness: float, findings: list[Finding], rng: np.random.Generator) -> str:
    """A sectioned radiology report (technique, findings by organ, impression)."""
    thickness = f"{slice_thickness:g}"
    lines = ["TECHNIQUE: " + _pick(_TECHNIQUE, rng).format(region=region, phase=_PHASE_TECHNIQUE[phase], thickness=thickness), "", "FINDINGS:"]
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


def finding_recall_precision(text: str, findings: list[Finding]) -> tuple[float, float]:
    """Fraction of true findings stated (kind and location), and of stated ones that are true.

    With no true findings recall is 1.0; with nothing stated precision is 1.0.
    """
    stated = set(extract_findings(text))
    truth = {(f.kind, f.location) for f in findings}
    recall = len(stated & truth) / len(truth) if truth else 1.0
    precision = len(stated & truth) / len(stated) if stated else 1.0
    return recall, precision


# ----------------------------------------------------------------------------- VQA

_PLANE_Q = ("In which plane is this image shown?", "Which imaging plane is displayed?", "What is the plane of this CT image?")
_PHASE_Q = ("In which contrast phase was this CT acquired?", "What is the contrast phase of this scan?", "Which phase of contrast enhancement is shown?")
_ORGAN_Q = ("Which organ contains the abnormality?", "Which of these organs shows an abnormality?", "In which organ is the abnormality found?")
_ABN_Q = ("What abnormality is seen in the {organ}?", "What is the abnormal finding in the {organ}?", "Which abnormality is present in the {organ}?")
_LOC_Q = ("Where is the {kind} located?", "What is the location of the {kind}?", "In which location is the {kind} seen?")
#: How abnormality questions name each organ group.
_ORGAN_PHRASE = {
    ("chest", "lung"): "lungs",
    ("chest", "pleura"): "pleural spaces",
    ("chest", "lymph node"): "mediastinal lymph nodes",
    ("abdomen", "liver"): "liver",
    ("abdomen", "kidney"): "kidneys",
    ("abdomen", "spleen"): "spleen",
    ("abdomen", "lymph node"): "abdominal lymph nodes",
}


def _absent(kind: str) -> str:
    return f"no {kind} is seen"


def _item(question: str, correct: str, distractors: list[str], qtype: str, rng: np.random.Generator) -> VQAItem:
    unique = [d for d in dict.fromkeys(distractors) if d != correct][:3]
    if len(unique) < 3:  # pragma: no cover - every vocabulary below offers >= 3 distractors
        raise ValueError(f"not enough distractors for {question!r}")
    choices = [correct] + unique
    order = rng.permutation(4)
    shuffled = tuple(choices[i] for i in order)
    letter = "ABCD"[shuffled.index(correct)]
    return VQAItem(question=question, choices=shuffled, answer_letter=letter, answer_text=correct, qtype=qtype)  # type: ignore[arg-type]


def make_vqa(region: str, phase: str, findings: list[Finding], rng: np.random.Generator) -> list[VQAItem]:
    """Closed VQA items of the five M3D types, all answerable from the image.

    Every "organ", "abnormality" and "location" question offers the negative answer among
    its choices whether or not the case is normal, so the question and choices alone never
    give the answer away.
    """
    items = [
        _item(_pick(_PLANE_Q, rng), "axial", ["coronal", "sagittal", "oblique"], "plane", rng),
        _item(_pick(_PHASE_Q, rng), phase, [p for p in PHASES if p != phase] + ["delayed"], "phase", rng),
    ]
    region_organs = list(ORGANS_BY_REGION[region])
    abnormal = list(dict.fromkeys(f.organ for f in findings))
    normal_organs = [o for o in region_organs if o not in abnormal]
    # Organ: one abnormal organ (or "none") against normal organs.
    question = _pick(_ORGAN_Q, rng)
    if abnormal:
        correct = abnormal[int(rng.integers(len(abnormal)))]
        distractors = [NONE_OF_THEM] + [str(o) for o in rng.permutation(np.asarray(normal_organs, dtype=object))]
    else:
        correct = NONE_OF_THEM
        distractors = [str(o) for o in rng.permutation(np.asarray(normal_organs, dtype=object))]
    items.append(_item(question, correct, distractors, "organ", rng))
    # Abnormality: one question per organ group the region can show findings in.
    region_kinds = [k for k, (_, regions) in FINDING_KINDS.items() if region in regions]
    for (phrase_region, organ), phrase in _ORGAN_PHRASE.items():
        if phrase_region != region:
            continue
        present = [f.kind for f in findings if f.organ == organ]
        own_kinds = [k for k in region_kinds if FINDING_KINDS[k][0] == organ]
        other_kinds = [str(k) for k in rng.permutation(np.asarray([k for k in region_kinds if k not in own_kinds], dtype=object))]
        correct = present[0] if present else NO_ABNORMALITY
        distractors = [NO_ABNORMALITY] + own_kinds + other_kinds
        items.append(_item(_pick(_ABN_Q, rng).format(organ=phrase), correct, distractors, "abnormality", rng))
    # Location: each finding, plus one kind that is absent (always when the case is normal).
    for f in findings:
        real, extra = _region_locations(f.kind, region)
        others = [str(x) for x in rng.permutation(np.asarray([loc for loc in real if loc != f.location], dtype=object))]
        distractors = [_absent(f.kind)] + others + list(extra)
        items.append(_item(_pick(_LOC_Q, rng).format(kind=f.kind), f.location, distractors, "location", rng))
    absent_kinds = [k for k in region_kinds if k not in {f.kind for f in findings}]
    if absent_kinds and (not findings or rng.random() < 0.5):
        kind = absent_kinds[int(rng.integers(len(absent_kinds)))]
        real, extra = _region_locations(kind, region)
        locations = [str(x) for x in rng.permutation(np.asarray(real, dtype=object))] + list(extra)
        items.append(_item(_pick(_LOC_Q, rng).format(kind=kind), _absent(kind), locations, "location", rng))
    return items


#: Extra wrong-but-plausible locations for kinds with fewer than three locations in a region.
_EXTRA_LOCATIONS = {
    "pleural effusion": ("pericardial space", "right upper lobe", "left lower lobe"),
    "hypodense splenic lesion": ("spleen, hilum", "left kidney, upper pole", "left lobe of the liver"),
    "enlarged lymph node, chest": ("right hilar region", "aortopulmonary window"),
    "enlarged lymph node, abdomen": ("aortocaval region", "right para-caval region"),
}


def _region_locations(kind: str, region: str) -> tuple[list[str], list[str]]:
    """Locations a kind really occurs at in this region, and wrong-but-plausible extras
    that make up four choices where it has fewer."""
    from napari_tghmoe.phantom._types import ABDOMEN_NODE_STATIONS, CHEST_NODE_STATIONS

    if kind == "enlarged lymph node":
        real = list(CHEST_NODE_STATIONS if region == "chest" else ABDOMEN_NODE_STATIONS)
    else:
        real = list(KIND_LOCATIONS[kind])
    extras = _EXTRA_LOCATIONS.get(f"{kind}, {region}", _EXTRA_LOCATIONS.get(kind, ()))
    return real, [e for e in extras if e not in real][: max(0, 4 - len(real))]
