"""Evidence from a phantom's ground truth, with the cascade's kind of errors (issue 15 training).

Why: the chat model learns to *copy* the evidence words only if copying pays. Trained on the
cascade's own evidence for 200 phantoms, the 3-layer demo LLM learnt those 200 reports by heart
instead (on its training phantoms it stated findings at recall 0.52, on held-out ones 0.25, while
the evidence it was given held 57 of the 85 held-out findings and it copied 22 of them). Running
the cascade on thousands of scans costs 15-20 s each on a CPU; the truth costs nothing. So
:func:`truth_segmentation` builds the :class:`~napari_tghmoe.med3d.types.SegmentationResult` a
perfect cascade would return for a :class:`~napari_tghmoe.phantom.Phantom` (organ labels from its
label map, one finding per lesion), and :class:`CascadeNoise` spoils it the way the real cascade
errs (misses, unsure findings, false findings), so the model also learns that the evidence is not
gospel. :func:`~napari_tghmoe.med3d.evidence.scan_evidence` then reduces it exactly as it reduces
a real segmentation. Evaluation always reads the real cascade.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_tghmoe.med3d.types import DEFAULT_ORGANS, SegFinding, SegmentationResult

#: Where a false finding of each kind is put (the organ it is drawn inside).
_FALSE_FINDING_HOSTS: dict[str, tuple[str, ...]] = {
    "lung nodule": DEFAULT_ORGANS[5:10],
    "pleural effusion": DEFAULT_ORGANS[5:10],
    "enlarged lymph node": ("aorta",),
    "hypodense liver lesion": ("liver",),
    "hyperdense liver lesion": ("liver",),
    "renal cyst": ("right kidney", "left kidney"),
    "hypodense splenic lesion": ("spleen",),
}


@dataclass(frozen=True)
class CascadeNoise:
    """How often the simulated cascade errs. The defaults follow the real cascade on training
    phantoms 300000-300199 at certainty 0.5 (findings by kind: recall 0.80, precision 0.85,
    docs/results.md, issue 15)."""

    miss: float = 0.12  # a true finding is not found at all
    unsure: float = 0.08  # found, but below the words' certainty cut (in the tokens, not the words)
    false_per_scan: float = 0.15  # mean number of false findings per scan (Poisson)
    sure_range: tuple[float, float] = (0.55, 0.99)
    unsure_range: tuple[float, float] = (0.2, 0.49)


NO_NOISE = CascadeNoise(miss=0.0, unsure=0.0, false_per_scan=0.0)


def organ_label_map(labels: np.ndarray, label_names: dict[int, str]) -> np.ndarray:
    """A phantom label map as the organ model's: ``DEFAULT_ORGANS[i]`` -> i + 1, all else 0."""
    lut = np.zeros(max(label_names) + 1, dtype=np.uint8)
    for value, name in label_names.items():
        if name in DEFAULT_ORGANS:
            lut[value] = DEFAULT_ORGANS.index(name) + 1
    return lut[np.asarray(labels)]


def _host_organ(organs: np.ndarray, voxels: np.ndarray) -> str | None:
    """The organ most common in a two-voxel shell around ``voxels`` (as the cascade names it)."""
    from napari_tghmoe.med3d.segment import _location

    return _location(organs, voxels, len(DEFAULT_ORGANS), ["background", *DEFAULT_ORGANS])


def _finding(
    volume: Any, organs: np.ndarray, kind: str, voxels: np.ndarray, certainty: float, rng: np.random.Generator
) -> SegFinding:
    from napari_tghmoe.med3d.segment import snapped_centre

    centre = snapped_centre(voxels)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    return SegFinding(
        kind=kind,
        label=0,
        voxel_zyx=centre,
        position_mm=tuple(round(float(p), 2) for p in volume.index_to_patient(centre)),  # type: ignore[arg-type]
        volume_ml=round(len(voxels) * voxel_ml, 3),
        probability=round(float(min(1.0, certainty + rng.uniform(0.0, 0.1))), 4),
        location=_host_organ(organs, voxels),
        voxel_count=int(len(voxels)),
        peak_probability=round(float(min(1.0, certainty + rng.uniform(0.05, 0.2))), 4),
        verifier_probability=round(float(certainty), 4),
    )


def _false_voxels(organs: np.ndarray, host: str, volume: Any, rng: np.random.Generator) -> np.ndarray | None:
    """A small ball inside ``host`` (None when the scan does not show that organ)."""
    inside = np.argwhere(organs == DEFAULT_ORGANS.index(host) + 1)
    if len(inside) == 0:
        return None
    centre = inside[rng.integers(len(inside))]
    radius_mm = float(rng.uniform(4.0, 12.0))
    reach = np.ceil(radius_mm / np.asarray(volume.spacing, dtype=float)).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), axis=-1).reshape(-1, 3)
    ball = grid[((grid * np.asarray(volume.spacing)) ** 2).sum(axis=1) <= radius_mm**2] + centre
    ball = ball[np.all((ball >= 0) & (ball < organs.shape), axis=1)]
    return ball if len(ball) else centre[None]


def truth_segmentation(
    phantom: Any, noise: CascadeNoise = NO_NOISE, rng: np.random.Generator | None = None
) -> SegmentationResult:
    """What a cascade with ``noise`` would return for ``phantom`` (a ``make_phantom`` result):
    its organ labels and one finding per lesion (``phantom.lesions == i + 1``), some missed or
    unsure, plus false ones drawn inside the organs a real false finding of that kind sits in."""
    from napari_tghmoe.phantom._types import FINDING_KINDS

    rng = rng if rng is not None else np.random.default_rng(0)
    volume = phantom.volume
    organs = organ_label_map(phantom.labels, phantom.label_names)
    lesions = np.asarray(phantom.lesions)
    findings: list[SegFinding] = []
    for index, truth in enumerate(phantom.findings):
        draw = rng.random()
        if draw < noise.miss:
            continue
        voxels = np.argwhere(lesions == index + 1)
        if len(voxels) == 0:
            voxels = np.asarray([truth.center_voxel])
        low, high = noise.unsure_range if draw < noise.miss + noise.unsure else noise.sure_range
        findings.append(_finding(volume, organs, truth.kind, voxels, float(rng.uniform(low, high)), rng))
    kinds = [kind for kind, (_, regions) in FINDING_KINDS.items() if phantom.region in regions]
    for _ in range(int(rng.poisson(noise.false_per_scan))):
        kind = kinds[int(rng.integers(len(kinds)))]
        hosts = _FALSE_FINDING_HOSTS[kind]
        voxels = _false_voxels(organs, hosts[int(rng.integers(len(hosts)))], volume, rng)
        if voxels is not None:
            findings.append(_finding(volume, organs, kind, voxels, float(rng.uniform(0.5, 0.8)), rng))
    findings.sort(key=lambda f: -f.probability)
    return SegmentationResult(
        labels=organs,
        label_names={0: "background", **{i + 1: name for i, name in enumerate(DEFAULT_ORGANS)}},
        findings=findings,
        structure_volumes_ml={},
        finding_presence={},
        model_name=f"phantom truth ({noise})",
        seconds=0.0,
    )
