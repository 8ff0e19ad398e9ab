"""A region the user marks on the CT (a box or a point) and what the chat sends for it (no Qt).

"What is this?" is about a place, not the whole scan. The user draws a rectangle or clicks a
point on a plane view; the chat turns it into a :class:`Region` on the CT's voxel grid, and
:func:`region_context` gives the words the model gets (the region's voxel ranges and its
extent in patient mm) and the volume it sees: the region grown by a margin, so the model has
the surroundings too, cut from the scan on its own geometry (the engine resamples it to the
model's grid like any volume). The crop's place in the scan (:attr:`RegionContext.box`) lets
the routing overlay and the finding links map back onto the CT.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from napari_tghmoe.io._types import CTVolume

#: Surroundings added on every side of a drawn box: enough to tell a lesion from its organ.
REGION_MARGIN_MM = 10.0
#: A clicked point is asked about with this much around it on every side.
POINT_CONTEXT_MM = 20.0
#: The smallest crop along any axis, in voxels (the model's patches span 2 slices, 14 pixels).
MIN_CROP_VOXELS = 2
_AXIS_NAMES = ("z", "y", "x")
_LPS_NAMES = ("x", "y", "z")

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Region:
    """A box (``kind="box"``) or a point (``"point"``) on a volume's voxel grid, (z, y, x).

    ``start`` is the first voxel, ``stop`` one past the last (a point is one voxel); ``plane``
    is the view it was drawn on ("axial", "coronal", "sagittal"), or "" when unknown.
    """

    kind: str
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    plane: str = ""

    @classmethod
    def from_voxels(cls, kind: str, voxels: Any, shape: Sequence[int], plane: str = "") -> Region:
        """The region spanned by voxel coordinates (floats allowed; (n, 3) or (3,)), clipped to ``shape``.

        Raises ValueError when it lies wholly outside the volume.
        """
        if kind not in ("box", "point"):
            raise ValueError(f"a region is a box or a point, not {kind!r}")
        points = np.asarray(voxels, dtype=float).reshape(-1, 3)
        if points.size == 0 or not np.isfinite(points).all():
            raise ValueError("the region has no coordinates")
        shape_arr = np.asarray(shape[-3:], dtype=int)
        low = np.floor(points.min(axis=0) + 0.5).astype(int)
        high = np.floor(points.max(axis=0) + 0.5).astype(int) + 1
        if np.any(high <= 0) or np.any(low >= shape_arr):
            raise ValueError("the region lies outside the volume")
        low = np.clip(low, 0, shape_arr - 1)
        high = np.clip(high, low + 1, shape_arr)
        return cls(kind, tuple(int(v) for v in low), tuple(int(v) for v in high), plane)  # type: ignore[arg-type]

    @property
    def box(self) -> Box:
        return tuple((int(a), int(b)) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def centre(self) -> tuple[float, float, float]:
        """Centre in voxel coordinates (z, y, x)."""
        return tuple((a + b - 1) / 2.0 for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def voxel_text(self) -> str:
        """"z 5, y 10-29, x 8-27" (0-based voxel indices, inclusive)."""
        return ", ".join(_range_text(name, a, b) for name, (a, b) in zip(_AXIS_NAMES, self.box))

    def mm_text(self, volume: CTVolume) -> str:
        """The region's extent in patient coordinates, e.g. "x -20.0 to -6.3, y 1.5 to 17.0, z 30.0 mm"."""
        return mm_extent_text(volume, self.box)

    def describe(self, volume: CTVolume | None = None) -> str:
        """Short words for the dock and the transcript: "box on axial: voxels z 5, y 10-29, x 8-27"."""
        where = f" on {self.plane}" if self.plane else ""
        text = f"{self.kind}{where}: voxel{'s' if self.kind == 'box' else ''} {self.voxel_text()}"
        return f"{text} ({self.mm_text(volume)})" if volume is not None else text

    def to_dict(self, volume: CTVolume | None = None) -> dict[str, Any]:
        """For the transcript and the JSON export."""
        data: dict[str, Any] = {
            "kind": self.kind,
            "plane": self.plane,
            "voxel_start_zyx": list(self.start),
            "voxel_stop_zyx": list(self.stop),
        }
        if volume is not None:
            data["corners_mm"] = [list(c) for c in _corners_mm(volume, self.box)]
        return data


def _range_text(name: str, start: int, stop: int) -> str:
    return f"{name} {start}" if stop - start == 1 else f"{name} {start}-{stop - 1}"


def _corners_mm(volume: CTVolume, box: Box) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Patient (x, y, z) mm of the first and last voxel centres of ``box``, per axis low to high."""
    corners = np.array(
        [volume.index_to_patient(tuple(float(v) for v in index)) for index in _box_corners(box)], dtype=float
    )
    return tuple(float(v) for v in corners.min(axis=0)), tuple(float(v) for v in corners.max(axis=0))


def _box_corners(box: Box) -> list[tuple[int, int, int]]:
    ends = [(a, b - 1) for a, b in box]
    return [(z, y, x) for z in ends[0] for y in ends[1] for x in ends[2]]


def mm_extent_text(volume: CTVolume, box: Box) -> str:
    """Extent of a voxel box in patient mm along x, y and z (LPS), low to high."""
    low, high = _corners_mm(volume, box)
    parts = []
    for name, a, b in zip(_LPS_NAMES, low, high):
        parts.append(f"{name} {a:.1f}" if abs(b - a) < 0.05 else f"{name} {a:.1f} to {b:.1f}")
    return ", ".join(parts) + " mm"


def crop_box(volume: CTVolume, region: Region, margin_mm: float | None = None) -> Box:
    """The region grown by ``margin_mm`` on every side (default: :data:`REGION_MARGIN_MM` for a
    box, :data:`POINT_CONTEXT_MM` for a point), inside the volume, at least
    :data:`MIN_CROP_VOXELS` along each axis where the volume allows."""
    if margin_mm is None:
        margin_mm = POINT_CONTEXT_MM if region.kind == "point" else REGION_MARGIN_MM
    box = []
    for axis, (start, stop) in enumerate(region.box):
        count = int(volume.shape[axis])
        grow = int(round(float(margin_mm) / float(volume.spacing[axis])))
        low, high = max(start - grow, 0), min(stop + grow, count)
        want = min(MIN_CROP_VOXELS, count)
        if high - low < want:  # too thin: widen inwards from the edge
            low = max(min(low, count - want), 0)
            high = low + want
        box.append((low, high))
    return tuple(box)  # type: ignore[return-value]


def crop_volume(volume: CTVolume, box: Box, label: str = "region") -> CTVolume:
    """The voxels of ``box`` as a CTVolume on the scan's own geometry (origin at the box's first voxel)."""
    take = tuple(slice(a, b) for a, b in box)
    start = tuple(float(a) for a, _ in box)
    spans = ", ".join(_range_text(n, a, b) for n, (a, b) in zip(_AXIS_NAMES, box))
    return replace(
        volume,
        hu=np.ascontiguousarray(np.asarray(volume.hu)[take]),
        origin=tuple(float(v) for v in volume.index_to_patient(start)),
        description=f"{volume.description} ({label}, voxels {spans})".strip(),
        warnings=list(volume.warnings),
        metadata=dict(volume.metadata),
    )


@dataclass
class RegionContext:
    """What the chat sends for a question about a region: the words, the crop and where it lies."""

    region: Region
    box: Box  # the crop's voxel ranges [start, stop) in the scan
    crop: CTVolume
    text: str  # the region in words, voxels and mm

    def question_for_model(self, question: str) -> str:
        """The user's question prefixed with the region it is about and what the volume shows."""
        n = " x ".join(str(b - a) for a, b in self.box)
        spans = ", ".join(_range_text(name, a, b) for name, (a, b) in zip(_AXIS_NAMES, self.box))
        return (
            f"The question is about a {self.text}. The volume shown is that region with its surroundings, "
            f"voxels {spans} of the scan ({n} voxels). {question.strip()}"
        )

    def to_dict(self, volume: CTVolume | None = None) -> dict[str, Any]:
        data = self.region.to_dict(volume)
        data["input_box_zyx"] = [list(pair) for pair in self.box]
        return data


def region_context(volume: CTVolume, region: Region, margin_mm: float | None = None) -> RegionContext:
    """Prompt words, crop volume and its place in the scan for a question about ``region``."""
    for axis, (start, stop) in enumerate(region.box):
        if not 0 <= start < stop <= volume.shape[axis]:
            raise ValueError(f"the region ({region.voxel_text()}) is outside the volume {tuple(volume.shape)}")
    box = crop_box(volume, region, margin_mm)
    return RegionContext(region, box, crop_volume(volume, box), region.describe(volume))
