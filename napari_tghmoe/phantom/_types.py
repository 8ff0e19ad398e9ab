"""Typed outputs of the phantom and its fixed vocabulary.

The vocabulary is closed on purpose: reports and VQA items are training and evaluation
data, so every finding is named with one of :data:`FINDING_KINDS`, lies in one of the
locations of :data:`KIND_LOCATIONS` and is written with one sentence pattern
(:data:`FINDING_SENTENCE`). That makes finding recall/precision computable from text
(see :func:`napari_tghmoe.phantom.extract_findings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_tghmoe.io import CTVolume

REGIONS = ("chest", "abdomen")
#: Contrast phases a phantom is drawn in, each with probability 1/4 (delayed: the equilibrium
#: phase a few minutes after injection, when vessels and organs have washed out below portal venous).
PHASES = ("non-contrast", "arterial", "portal venous", "delayed")
#: Planes a phantom's slices can be stored in, each with probability 1/4 when drawn: the volume
#: is stored as axial, coronal or sagittal slices, or as oblique slices tilted 20-35 degrees from
#: axial about the left-right axis, with its true geometry in ``CTVolume.direction`` (as M3D stores
#: each scan in the plane it was shown in), so the plane is in the slice order the model sees.
PLANES = ("axial", "coronal", "sagittal", "oblique")
QTYPES = ("plane", "phase", "organ", "abnormality", "location")

#: kind -> (organ, region it is generated in)
FINDING_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lung nodule": ("lung", ("chest",)),
    "pleural effusion": ("pleura", ("chest",)),
    "enlarged lymph node": ("lymph node", ("chest", "abdomen")),
    "hypodense liver lesion": ("liver", ("abdomen",)),
    "hyperdense liver lesion": ("liver", ("abdomen",)),
    "renal cyst": ("kidney", ("abdomen",)),
    "hypodense splenic lesion": ("spleen", ("abdomen",)),
}

LUNG_LOBES = (
    "right upper lobe",
    "right middle lobe",
    "right lower lobe",
    "left upper lobe",
    "left lower lobe",
)
LIVER_SECTORS = (
    "right lobe of the liver, anterior segment",
    "right lobe of the liver, posterior segment",
    "left lobe of the liver",
)
KIDNEY_ZONES = tuple(
    f"{side} kidney, {zone}"
    for side in ("right", "left")
    for zone in ("upper pole", "interpolar region", "lower pole")
)
SPLEEN_ZONES = ("spleen, upper pole", "spleen, lower pole")
PLEURAL_SPACES = ("right pleural space", "left pleural space")
CHEST_NODE_STATIONS = ("right paratracheal region", "subcarinal region", "left hilar region")
ABDOMEN_NODE_STATIONS = ("left para-aortic region", "mesenteric root")

#: kind -> every location that kind can be generated at (region-independent union)
KIND_LOCATIONS: dict[str, tuple[str, ...]] = {
    "lung nodule": LUNG_LOBES,
    "pleural effusion": PLEURAL_SPACES,
    "enlarged lymph node": CHEST_NODE_STATIONS + ABDOMEN_NODE_STATIONS,
    "hypodense liver lesion": LIVER_SECTORS,
    "hyperdense liver lesion": LIVER_SECTORS,
    "renal cyst": KIDNEY_ZONES,
    "hypodense splenic lesion": SPLEEN_ZONES,
}

#: The one sentence every finding is reported with (findings section and impression).
FINDING_SENTENCE = "There is a {size} mm {kind} in the {location}."
IMPRESSION_ITEM = "{size} mm {kind} in the {location}."

#: Organs a VQA "organ" question may name (abnormal ones plus plausible distractors).
ORGANS_BY_REGION: dict[str, tuple[str, ...]] = {
    "chest": ("lung", "pleura", "lymph node", "heart", "aorta", "esophagus"),
    "abdomen": ("liver", "kidney", "spleen", "lymph node", "pancreas", "stomach"),
}


@dataclass
class Finding:
    """One abnormality placed in the phantom, with its ground truth."""

    kind: str  # one of FINDING_KINDS
    organ: str  # e.g. "lung", "liver", "kidney"
    location: str  # one of KIND_LOCATIONS[kind], e.g. "right upper lobe"
    size_mm: float  # largest diameter (effusion: depth of the fluid layer)
    center_voxel: tuple[int, int, int]  # index of a voxel inside the finding, in volume.hu order
    mean_hu: float  # designed attenuation of the finding (before blur and noise)
    label: int = 0  # label value (in Phantom.labels) of the structure containing it

    @property
    def sentence(self) -> str:
        return FINDING_SENTENCE.format(size=round(self.size_mm), kind=self.kind, location=self.location)


@dataclass
class VQAItem:
    """A closed (four-choice) question about the volume, M3D-VQA style."""

    question: str
    choices: tuple[str, str, str, str]
    answer_letter: str  # "A".."D"
    answer_text: str
    qtype: str  # one of QTYPES

    @property
    def prompt(self) -> str:
        """M3D closed-VQA prompt: question followed by the lettered choices."""
        options = " ".join(f"{letter}. {text}" for letter, text in zip("ABCD", self.choices))
        return f"{self.question} Choices: {options}"

    @property
    def target(self) -> str:
        return f"{self.answer_letter}. {self.answer_text}"


@dataclass
class Phantom:
    """A synthetic CT with everything that is true about it."""

    volume: CTVolume
    findings: list[Finding]
    report: str
    vqa: list[VQAItem]
    region: str
    phase: str
    seed: int
    labels: np.ndarray  # uint8 anatomical label map, same grid (and axis order) as volume.hu
    label_names: dict[int, str]  # label value -> structure name
    lesions: np.ndarray  # (z, y, x) uint8: 0 background, i + 1 for findings[i]
    info: dict[str, Any] = field(default_factory=dict)  # anatomy parameters (mm)
    #: Plane the slices are stored in (one of PLANES). labels, lesions and every finding's
    #: center_voxel are indexed like volume.hu, i.e. in the stored (slice, row, column) order.
    plane: str = "axial"

    def organ_mask(self, organ: str) -> np.ndarray:
        """Boolean mask of every label that belongs to ``organ`` (e.g. "lung", "kidney")."""
        wanted = [value for value, name in self.label_names.items() if LABEL_ORGAN.get(name) == organ]
        return np.isin(self.labels, wanted)

    def label_of(self, name: str) -> int:
        for value, label_name in self.label_names.items():
            if label_name == name:
                return value
        raise KeyError(name)


#: Label map values and names (the same for every phantom).
LABEL_NAMES: dict[int, str] = {
    0: "air",
    1: "subcutaneous fat",
    2: "muscle",
    3: "cortical bone",
    4: "cancellous bone",
    5: "rib",
    6: "visceral fat",
    7: "right upper lobe",
    8: "right middle lobe",
    9: "right lower lobe",
    10: "left upper lobe",
    11: "left lower lobe",
    12: "pulmonary vessels",
    13: "airway",
    14: "myocardium",
    15: "cardiac blood pool",
    16: "aorta",
    17: "inferior vena cava",
    18: "liver",
    19: "spleen",
    20: "right kidney",
    21: "left kidney",
    22: "pancreas",
    23: "stomach",
    24: "bowel",
    25: "bowel gas",
    26: "esophagus",
    27: "spinal canal",
    28: "intervertebral disc",
    29: "lymph node",
    30: "right pleural effusion",
    31: "left pleural effusion",
    32: "gallbladder",
    33: "stomach gas",
}
LABEL_VALUES: dict[str, int] = {name: value for value, name in LABEL_NAMES.items()}

#: Label name -> organ group used by findings and tests.
LABEL_ORGAN: dict[str, str] = {
    **{lobe: "lung" for lobe in LUNG_LOBES},
    "pulmonary vessels": "lung vessels",
    "right pleural effusion": "pleura",
    "left pleural effusion": "pleura",
    "lymph node": "lymph node",
    "liver": "liver",
    "spleen": "spleen",
    "right kidney": "kidney",
    "left kidney": "kidney",
    "cortical bone": "bone",
    "cancellous bone": "bone",
    "rib": "bone",
    "myocardium": "heart",
    "cardiac blood pool": "heart",
    "aorta": "aorta",
    "inferior vena cava": "inferior vena cava",
    "pancreas": "pancreas",
    "stomach": "stomach",
    "stomach gas": "stomach",
    "subcutaneous fat": "fat",
    "visceral fat": "fat",
    "muscle": "muscle",
    "air": "air",
    "airway": "airway",
}
