"""Typed outputs of the 3D segmenter (no torch, no Qt: the napari dock imports these)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Organs segmented by default (phantom ``label_names`` names); everything else is background.
DEFAULT_ORGANS = (
    "liver",
    "spleen",
    "right kidney",
    "left kidney",
    "aorta",
    "right upper lobe",
    "right middle lobe",
    "right lower lobe",
    "left upper lobe",
    "left lower lobe",
)
#: Focal finding kinds (phantom ``FINDING_KINDS``), one label each.
DEFAULT_FINDING_KINDS = (
    "lung nodule",
    "pleural effusion",
    "enlarged lymph node",
    "hypodense liver lesion",
    "hyperdense liver lesion",
    "renal cyst",
    "hypodense splenic lesion",
)


class SegmentationStopped(Exception):
    """Raised by :func:`segment_volume` when its ``should_stop`` callback returns True."""


class SegModelError(ValueError):
    """A folder is not a Med3DInsight segmentation model (one line: folder and reason)."""


@dataclass
class SegFinding:
    """One focal finding found as a connected component of its kind's label."""

    kind: str  # "renal cyst", "lung nodule", ...
    label: int  # label value in the label map
    voxel_zyx: tuple[int, int, int]  # centre (of mass, snapped inside the component) on the scan's own grid
    position_mm: tuple[float, float, float]  # the same point in patient mm (x, y, z), via the CTVolume geometry
    volume_ml: float
    probability: float  # mean foreground probability of the component
    location: str | None = None  # organ/structure it lies in, from the organ labels, e.g. "left kidney"
    voxel_count: int = 0
    peak_probability: float = 0.0  # highest probability of its kind inside it (a sure core in a vague rim)
    verifier_probability: float | None = None  # the verifier's second look (None: the model has none)


@dataclass
class SegmentationResult:
    """A label map on the input volume's own grid plus what was found in it."""

    labels: np.ndarray  # (z, y, x) uint8/uint16 on the input CTVolume's own grid
    label_names: dict[int, str]  # value -> structure name (0 = "background")
    findings: list[SegFinding]
    structure_volumes_ml: dict[str, float]
    finding_presence: dict[str, float]  # per finding kind, the classification head's probability
    model_name: str
    seconds: float
    working_spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)
    warnings: list[str] = field(default_factory=list)
