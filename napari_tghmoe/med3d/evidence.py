"""What the 3D encoder found in a scan, as the chat model's evidence (issue 15).

A segmentation (:func:`napari_tghmoe.med3d.segment.segment_volume`) holds more than its findings
list: the organs it outlined, their attenuation (which tells the contrast phase: an arterial aorta
is bright, a delayed kidney too), where each finding lies relative to the body, to its organ and
to the aorta (which names a node's station or a kidney lesion's pole), and how sure the finder and
the verifier were. :func:`scan_evidence` reduces a segmentation to that summary (a small JSON-able
:class:`ScanEvidence`, computed once per scan and cached), and :func:`evidence_tokens` turns it
into the fixed-size token features the TGH-MoE model's volume projector reads: one scan token and
``max_findings`` finding slots (empty ones zero).

The stored plane: the slice normal of the series as stored (the DICOM header's geometry, as any
viewer shows it) is part of the scan token; the pixels are read in the axial view.

Coordinates are in the axial view (z towards the head, y towards the back, x towards the
patient's left), in mm, so a coronal series gives the same evidence as its axial twin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from napari_tghmoe.med3d.sites import MAX_SITES
from napari_tghmoe.med3d.types import DEFAULT_FINDING_KINDS, DEFAULT_ORGANS

#: Organ names the evidence knows (the bundled organ model's): a token slot each.
EVIDENCE_ORGANS = DEFAULT_ORGANS
#: Finding kinds, in the bundled models' order (a slot each in a finding token).
EVIDENCE_KINDS = DEFAULT_FINDING_KINDS
#: Finding slots per scan: more findings than this keep the most certain ones.
DEFAULT_MAX_FINDINGS = 6


@dataclass
class EvidenceFinding:
    kind: str
    organ: str | None  # the structure it lies in (organ model), None outside every organ
    voxel_zyx: tuple[int, int, int]  # on the scan's own grid (the link target)
    position_mm: tuple[float, float, float]  # patient mm (x, y, z)
    centre_axial_mm: tuple[float, float, float]  # (z, y, x) in the axial view, mm from the volume corner
    body_fraction: tuple[float, float, float]  # centre within the body's box, (z, y, x) in [0, 1]
    organ_fraction: tuple[float, float, float] | None  # centre within its organ's box
    from_aorta_mm: tuple[float, float, float] | None  # centre minus the aorta's centre at that level
    volume_ml: float
    probability: float
    peak_probability: float
    verifier_probability: float | None

    @property
    def certainty(self) -> float:
        return float(self.verifier_probability if self.verifier_probability is not None else self.probability)


@dataclass
class ScanEvidence:
    """The summary a chat model reads (see the module doc)."""

    findings: list[EvidenceFinding]
    organ_hu: dict[str, float]  # median HU inside each organ found
    organ_ml: dict[str, float]
    slice_normal: tuple[float, float, float]  # |x|, |y|, |z| of the stored slice normal (patient axes)
    model_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScanEvidence:
        findings = [
            EvidenceFinding(
                **{
                    key: (tuple(value) if isinstance(value, list) else value)
                    for key, value in item.items()
                }
            )
            for item in data.get("findings", [])
        ]
        return cls(
            findings=findings,
            organ_hu={str(k): float(v) for k, v in data.get("organ_hu", {}).items()},
            organ_ml={str(k): float(v) for k, v in data.get("organ_ml", {}).items()},
            slice_normal=tuple(float(v) for v in data.get("slice_normal", (0.0, 0.0, 0.0))),  # type: ignore[arg-type]
            model_name=str(data.get("model_name", "")),
            extra=dict(data.get("extra", {})),
        )


def _box_fraction(point: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[float, float, float]:
    extent = np.maximum(high - low, 1e-6)
    return tuple(float(v) for v in np.clip((point - low) / extent, -0.5, 1.5))  # type: ignore[return-value]


def scan_evidence(volume: Any, result: Any) -> ScanEvidence:
    """The evidence of one segmented scan (``volume``: the ``CTVolume`` that was segmented)."""
    from napari_tghmoe.med3d.segment import _to_axial, axial_view

    direction = np.asarray(getattr(volume, "direction", np.eye(3)), dtype=float).reshape(3, 3)
    order, flips = axial_view(direction)
    hu = _to_axial(np.asarray(volume.hu), order, flips)
    labels = _to_axial(np.asarray(result.labels), order, flips)
    spacing = np.asarray([float(volume.spacing[a]) for a in order])
    shape = np.asarray(hu.shape)

    def to_axial_index(voxel: tuple[int, int, int]) -> np.ndarray:
        index = np.asarray([voxel[a] for a in order], dtype=float)
        return np.where(np.asarray(flips), shape - 1 - index, index)

    body = hu > -500.0
    body_low, body_high = _bounds(body, spacing)
    names = {int(v): str(n) for v, n in result.label_names.items()}
    organ_hu: dict[str, float] = {}
    organ_ml: dict[str, float] = {}
    organ_boxes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    voxel_ml = float(np.prod(spacing)) / 1000.0
    aorta_mask = None
    for value, name in names.items():
        if name not in EVIDENCE_ORGANS:
            continue
        mask = labels == value
        count = int(mask.sum())
        if count == 0:
            continue
        organ_hu[name] = float(np.median(hu[mask]))
        organ_ml[name] = count * voxel_ml
        organ_boxes[name] = _bounds(mask, spacing)
        if name == "aorta":
            aorta_mask = mask
    findings = []
    for finding in result.findings:
        centre = to_axial_index(finding.voxel_zyx) * spacing
        box = organ_boxes.get(finding.location or "")
        findings.append(
            EvidenceFinding(
                kind=finding.kind,
                organ=finding.location if finding.location in EVIDENCE_ORGANS else None,
                voxel_zyx=tuple(int(v) for v in finding.voxel_zyx),  # type: ignore[arg-type]
                position_mm=tuple(float(v) for v in finding.position_mm),  # type: ignore[arg-type]
                centre_axial_mm=tuple(float(v) for v in centre),  # type: ignore[arg-type]
                body_fraction=_box_fraction(centre, body_low, body_high),
                organ_fraction=_box_fraction(centre, *box) if box is not None else None,
                from_aorta_mm=_from_aorta(aorta_mask, centre, spacing),
                volume_ml=float(finding.volume_ml),
                probability=float(finding.probability),
                peak_probability=float(finding.peak_probability),
                verifier_probability=(
                    float(finding.verifier_probability) if finding.verifier_probability is not None else None
                ),
            )
        )
    normal = direction[:, 0] / (np.linalg.norm(direction[:, 0]) or 1.0)
    return ScanEvidence(
        findings=findings,
        organ_hu=organ_hu,
        organ_ml=organ_ml,
        slice_normal=tuple(float(abs(v)) for v in normal),  # type: ignore[arg-type]
        model_name=str(getattr(result, "model_name", "")),
    )


def _bounds(mask: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask's box in mm, (z, y, x) low and high (the whole grid for an empty mask)."""
    lows, highs = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        if present.size == 0:
            lows.append(0.0)
            highs.append(mask.shape[axis] * spacing[axis])
        else:
            lows.append(present[0] * spacing[axis])
            highs.append((present[-1] + 1) * spacing[axis])
    return np.asarray(lows), np.asarray(highs)


def _from_aorta(aorta: np.ndarray | None, centre: np.ndarray, spacing: np.ndarray) -> tuple[float, float, float] | None:
    """Centre minus the aorta's centre on the nearest slab where the aorta is (mm, z y x)."""
    if aorta is None:
        return None
    slices = np.flatnonzero(aorta.any(axis=(1, 2)))
    if slices.size == 0:
        return None
    z = int(round(centre[0] / spacing[0]))
    nearest = int(slices[np.argmin(np.abs(slices - z))])
    low, high = max(0, nearest - 2), nearest + 3
    points = np.argwhere(aorta[low:high])
    mean = (points.mean(axis=0) + np.asarray([low, 0, 0])) * spacing
    return tuple(float(v) for v in centre - mean)  # type: ignore[return-value]


# --------------------------------------------------------------------------- token features

#: Feature layout of a finding token: type flags, geometry (kind, organ, position), certainty,
#: then the site head's probabilities (``napari_tghmoe.med3d.sites``; zeros without one). The
#: scan token's features come after all of those (the two layouts never share an index, so a
#: feature means one thing to the projector).
_KIND_SLOTS = len(EVIDENCE_KINDS)
_ORGAN_SLOTS = len(EVIDENCE_ORGANS) + 1  # + "outside every organ"
GEOMETRY_FEATURES = _KIND_SLOTS + _ORGAN_SLOTS + 3 + 4 + 4 + 1
FINDING_FEATURES = 2 + GEOMETRY_FEATURES + 3
#: Feature layout of the scan token: type flag, organ HU, organ seen, organ size, slice normal.
SCAN_FEATURES = 1 + 3 * len(EVIDENCE_ORGANS) + 3


SCAN_OFFSET = FINDING_FEATURES + MAX_SITES
EVIDENCE_FEATURES = SCAN_OFFSET + SCAN_FEATURES


def evidence_feature_names(site_names: list[str] | tuple[str, ...] = ()) -> dict[int, str]:
    """Feature index -> the words it stands for (kinds, organs, sites, the stored plane's axes):
    where the projector's verbal path starts."""
    names = {2 + i: kind for i, kind in enumerate(EVIDENCE_KINDS)}
    names.update({2 + _KIND_SLOTS + i: organ for i, organ in enumerate(EVIDENCE_ORGANS)})
    names.update({FINDING_FEATURES + i: site for i, site in enumerate(site_names)})
    normal = SCAN_OFFSET + 1 + 3 * len(EVIDENCE_ORGANS)
    names.update({normal: "sagittal", normal + 1: "coronal", normal + 2: "axial"})  # x (L), y (P), z (S)
    return names


def finding_geometry_vector(finding: EvidenceFinding) -> np.ndarray:
    """Kind, organ, position in the body, in its organ's box and from the aorta, size."""
    organ = [0.0] * _ORGAN_SLOTS
    organ[EVIDENCE_ORGANS.index(finding.organ) if finding.organ in EVIDENCE_ORGANS else -1] = 1.0
    kind = [1.0 if finding.kind == k else 0.0 for k in EVIDENCE_KINDS]
    organ_box = finding.organ_fraction
    aorta = finding.from_aorta_mm
    values = [
        *kind,
        *organ,
        *finding.body_fraction,
        *(organ_box if organ_box is not None else (0.0, 0.0, 0.0)), float(organ_box is not None),
        *(np.tanh(np.asarray(aorta) / 60.0) if aorta is not None else (0.0, 0.0, 0.0)), float(aorta is not None),
        math.log1p(max(finding.volume_ml, 0.0)) / 3.0,
    ]
    return np.asarray(values, dtype=np.float32)


def _finding_vector(finding: EvidenceFinding, site_head: Any = None) -> np.ndarray:
    certainty = [finding.probability, finding.peak_probability, finding.certainty]
    sites = np.zeros(MAX_SITES, dtype=np.float32)
    if site_head is not None:
        probabilities = site_head.probabilities(finding)
        sites[: probabilities.size] = probabilities
    return np.concatenate([[0.0, 1.0], finding_geometry_vector(finding), certainty, sites]).astype(np.float32)


def scan_vector(evidence: ScanEvidence) -> np.ndarray:
    """Organ attenuation, which organs were seen and their size, the stored slice normal."""
    hu = [math.tanh(evidence.organ_hu.get(name, 0.0) / 300.0) for name in EVIDENCE_ORGANS]
    seen = [float(name in evidence.organ_hu) for name in EVIDENCE_ORGANS]
    ml = [math.log1p(evidence.organ_ml.get(name, 0.0)) / 8.0 for name in EVIDENCE_ORGANS]
    values = [1.0, *hu, *seen, *ml, *evidence.slice_normal]
    return np.asarray(values, dtype=np.float32)


def evidence_tokens(
    evidence: ScanEvidence, max_findings: int = DEFAULT_MAX_FINDINGS, site_head: Any = None
) -> np.ndarray:
    """(1 + max_findings, EVIDENCE_FEATURES) float32: the scan token, then the findings by
    certainty (most certain first); empty slots are zero."""
    tokens = np.zeros((1 + int(max_findings), EVIDENCE_FEATURES), dtype=np.float32)
    scan = scan_vector(evidence)
    tokens[0, SCAN_OFFSET : SCAN_OFFSET + scan.size] = scan
    ranked = sorted(evidence.findings, key=lambda f: -f.certainty)[: int(max_findings)]
    for slot, finding in enumerate(ranked, start=1):
        vector = _finding_vector(finding, site_head)
        tokens[slot, : vector.size] = vector
    return tokens


# --------------------------------------------------------------------------- the evidence in words

#: Findings less certain than this stay out of the words (chosen on training phantoms 300000-300199
#: with the first cascade: recall 0.80, precision 0.85 of its findings by kind there). A model
#: carries its own cut (``TGHMoEConfig.volume_words_min_certainty``; the demo model's is 0.6,
#: chosen again with the current cascade; docs/results.md, issue 15, fourth round).
DEFAULT_WORDS_MIN_CERTAINTY = 0.5
PLANE_BY_AXIS = ("sagittal", "coronal", "axial")  # slice normal along x (L), y (P), z (S)


def stored_plane(evidence: ScanEvidence) -> str:
    """The plane the series is stored in, from its slice normal (the header's geometry)."""
    from napari_tghmoe.io._geometry import ALIGNED_COSINE

    normal = np.asarray(evidence.slice_normal, dtype=float)
    if not normal.any():
        return "unknown"
    axis = int(np.argmax(normal))
    return PLANE_BY_AXIS[axis] if normal[axis] >= ALIGNED_COSINE else "oblique"


def finding_size_mm(finding: EvidenceFinding) -> int:
    """The diameter of a sphere of the finding's volume."""
    return int(round((6.0 * max(finding.volume_ml, 0.0) * 1000.0 / math.pi) ** (1.0 / 3.0)))


def evidence_words(
    evidence: ScanEvidence,
    site_head: Any = None,
    phase_head: Any = None,
    min_certainty: float = DEFAULT_WORDS_MIN_CERTAINTY,
    max_findings: int = DEFAULT_MAX_FINDINGS,
) -> str:
    """The evidence as one short line of text the LLM reads after the volume tokens, e.g.
    ``"3D encoder: coronal series, arterial phase. Found: 14 mm lung nodule in the right upper
    lobe."``: what the encoder found, in the words a report uses (a tiny LLM copies words far
    sooner than it learns to decode them from embeddings)."""
    series = [f"{stored_plane(evidence)} series"]
    if phase_head is not None:
        series.append(f"{phase_head.phase(evidence)[0]} phase")
    found = []
    for finding in sorted(evidence.findings, key=lambda f: -f.certainty)[: int(max_findings)]:
        if finding.certainty < min_certainty:
            continue
        site = site_head.site(finding)[0] if site_head is not None else None
        where = site or finding.organ or "body"
        found.append(f"{finding_size_mm(finding)} mm {finding.kind} in the {where}")
    listed = "; ".join(found) if found else "nothing"
    return f"3D encoder: {', '.join(series)}. Found: {listed}."
