"""SegmentationResult -> napari Labels / Points layer data and the dock's tables (no Qt).

The "Segment" dock only shows what is computed here, so the layer geometry (the CT's scale
and translate: the label map lines up with the CT in 3D and in the three planes), the
colours, the structure table and the finding rows are testable without a GUI. Nothing here
imports napari or Qt: the layer data tuples are plain ``(data, kwargs, type)``.
"""

from __future__ import annotations

import colorsys
import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from napari_tghmoe.io._types import CTVolume
from napari_tghmoe.med3d.types import SegFinding, SegmentationResult

SEGMENTATION_PREFIX = "segmentation: "
FINDINGS_PREFIX = "findings: "
#: Overlay opacity: the structures are seen and the CT stays readable underneath.
LABELS_OPACITY = 0.4
#: Metadata keys on the Labels layer: the result and the CT it was computed from (for export).
SEG_RESULT_KEY = "segmentation_result"
SEG_SOURCE_VOLUME_KEY = "segmentation_source_volume"

#: Conventional colours (RGB 0-255) for the structures this project segments; close to
#: 3D Slicer's / TotalSegmentator's so a reader recognises them. Others get a hashed hue.
STRUCTURE_COLORS: dict[str, tuple[int, int, int]] = {
    "liver": (221, 130, 101),
    "spleen": (157, 108, 162),
    "right kidney": (185, 102, 83),
    "left kidney": (212, 126, 151),
    "aorta": (224, 47, 47),
    "inferior vena cava": (0, 151, 206),
    "pancreas": (249, 180, 111),
    "stomach": (216, 132, 105),
    "gallbladder": (139, 150, 98),
    "esophagus": (211, 171, 143),
    "right upper lobe": (172, 138, 115),
    "right middle lobe": (128, 174, 128),
    "right lower lobe": (111, 184, 210),
    "left upper lobe": (197, 165, 145),
    "left lower lobe": (64, 123, 147),
    "myocardium": (206, 110, 84),
    "cardiac blood pool": (206, 0, 0),
    "airway": (182, 228, 255),
    "pulmonary vessels": (0, 122, 171),
    "spinal canal": (244, 214, 49),
    "cortical bone": (241, 214, 145),
    "cancellous bone": (230, 220, 170),
    "rib": (241, 214, 145),
}
#: Focal findings are drawn in saturated warm colours that no organ uses.
FINDING_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 255),
    (0, 255, 0),
    (255, 255, 0),
    (0, 255, 255),
    (255, 128, 0),
)


def layer_names(ct_name: str) -> tuple[str, str]:
    """Names of the Labels and Points layers made for the CT layer ``ct_name``."""
    return f"{SEGMENTATION_PREFIX}{ct_name}", f"{FINDINGS_PREFIX}{ct_name}"


def finding_kinds(result: SegmentationResult) -> set[str]:
    """Structure names that are focal-finding kinds (labelled by kind, not by organ)."""
    kinds = {finding.kind for finding in result.findings}
    kinds.update(result.finding_presence)
    return kinds


def _hashed_color(name: str) -> tuple[int, int, int]:
    digest = int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16)
    hue = (digest % 360) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.55, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def structure_color(name: str, *, finding: bool = False, finding_index: int = 0) -> tuple[float, float, float, float]:
    """RGBA (0-1) of a structure: fixed for known organs, bright for findings, else hashed."""
    if finding:
        rgb = FINDING_COLORS[finding_index % len(FINDING_COLORS)]
    else:
        rgb = STRUCTURE_COLORS.get(name.lower(), None) or _hashed_color(name.lower())
    return (rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0, 1.0)


def label_colormap(result: SegmentationResult) -> dict[int | None, tuple[float, float, float, float]]:
    """A direct label colormap (napari ``DirectLabelColormap`` color_dict); 0 and unknown: clear."""
    kinds = sorted(finding_kinds(result))
    colors: dict[int | None, tuple[float, float, float, float]] = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for value, name in result.label_names.items():
        if int(value) == 0:
            continue
        is_finding = name in kinds
        colors[int(value)] = structure_color(name, finding=is_finding, finding_index=kinds.index(name) if is_finding else 0)
    return colors


@dataclass(frozen=True)
class StructureRow:
    """One line of the structure table."""

    name: str
    value: int
    volume_ml: float
    voxels: int


def structure_rows(result: SegmentationResult, spacing: Sequence[float]) -> list[StructureRow]:
    """Structures present in the label map with their volume in mL, largest first.

    Volumes are counted on the label map itself (voxels x voxel volume), so the table always
    matches what is drawn, whatever the model reported.
    """
    labels = np.asarray(result.labels)
    counts = np.bincount(labels.ravel().astype(np.int64, copy=False))
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    rows = []
    for value, count in enumerate(counts):
        if value == 0 or count == 0:
            continue
        name = result.label_names.get(value, f"label {value}")
        rows.append(StructureRow(name, value, float(count) * voxel_ml, int(count)))
    rows.sort(key=lambda row: (-row.volume_ml, row.name))
    return rows


def label_features(result: SegmentationResult, spacing: Sequence[float]) -> dict[str, list[Any]]:
    """Labels-layer features: napari's status bar shows ``structure`` and ``volume_ml`` on hover."""
    volumes = {row.value: row.volume_ml for row in structure_rows(result, spacing)}
    values = sorted(int(v) for v in result.label_names)
    return {
        "index": values,
        "structure": [result.label_names[v] for v in values],
        "volume_ml": [round(volumes.get(v, 0.0), 2) for v in values],
    }


def finding_label(finding: SegFinding) -> str:
    """Short text for a finding: kind and where it lies."""
    return f"{finding.kind} ({finding.location})" if finding.location else finding.kind


def finding_row(finding: SegFinding) -> str:
    """One line of the findings list: kind, location, size in mL, probability (and the verifier's)."""
    where = finding.location or "location unknown"
    checked = "" if finding.verifier_probability is None else f", checked {finding.verifier_probability:.2f}"
    return f"{finding.kind} \u2014 {where} \u2014 {finding.volume_ml:.2f} mL \u2014 p = {finding.probability:.2f}{checked}"


def sorted_findings(result: SegmentationResult) -> list[SegFinding]:
    """Findings most probable first (the list the dock shows, in its order)."""
    return sorted(result.findings, key=lambda f: (-float(f.probability), f.kind))


def world_point(voxel_zyx: Sequence[float], scale: Sequence[float], translate: Sequence[float]) -> tuple[float, ...]:
    """World (napari, mm) coordinates of a voxel of a layer: voxel * scale + translate."""
    voxel = np.asarray(voxel_zyx, dtype=float)
    return tuple(float(v) for v in voxel * np.asarray(scale, dtype=float)[-3:] + np.asarray(translate, dtype=float)[-3:])


def labels_layer_data(
    result: SegmentationResult,
    ct_name: str,
    scale: Sequence[float],
    translate: Sequence[float],
    *,
    volume: CTVolume | None = None,
) -> tuple[np.ndarray, dict[str, Any], str]:
    """Layer data tuple of the label map, placed exactly on the CT layer (same scale/translate)."""
    name, _ = layer_names(ct_name)
    metadata: dict[str, Any] = {SEG_RESULT_KEY: result}
    if volume is not None:
        metadata[SEG_SOURCE_VOLUME_KEY] = volume
    kwargs = {
        "name": name,
        "scale": tuple(float(s) for s in scale),
        "translate": tuple(float(t) for t in translate),
        "opacity": LABELS_OPACITY,
        "colormap": label_colormap(result),
        "features": label_features(result, scale),
        "metadata": metadata,
    }
    return np.asarray(result.labels), kwargs, "labels"


def points_layer_data(
    result: SegmentationResult,
    ct_name: str,
    scale: Sequence[float],
    translate: Sequence[float],
) -> tuple[np.ndarray, dict[str, Any], str]:
    """Layer data tuple of the findings as points (voxel coordinates, the CT's scale/translate)."""
    _, name = layer_names(ct_name)
    findings = sorted_findings(result)
    data = np.array([f.voxel_zyx for f in findings], dtype=float).reshape(-1, 3)
    kwargs = {
        "name": name,
        "scale": tuple(float(s) for s in scale),
        "translate": tuple(float(t) for t in translate),
        "features": {
            "name": [finding_label(f) for f in findings],
            "kind": [f.kind for f in findings],
            "probability": [float(f.probability) for f in findings],
        },
        "text": {"string": "{name}", "color": "yellow", "size": 9, "anchor": "upper_left"},
        "size": 8.0,  # voxels (data units)
        "face_color": "transparent",
        "border_color": "yellow",
        "symbol": "ring",
        "out_of_slice_display": True,
    }
    return data, kwargs, "points"
