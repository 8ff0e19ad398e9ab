"""Which plane and slice the user is looking at, and what the chat sends for "this slice" (no Qt).

The chat's model reads a whole volume; a question such as "what is on this slice?" is about
one plane at one position. :func:`slice_context` turns (CTVolume, plane, index) into the words
the model gets ("axial slice 42 of 120 (z = -153.5 mm)") and a thin slab of the volume around
that slice, on the CT's own geometry. :class:`PlaneTracker` follows napari's shared cursor
(``dims.point``): a scroll in a plane view moves one world axis (the plane's normal), a click
moves the two in-plane axes, so the last such move says which plane the user works in,
whether the move came from the orthogonal views, the main canvas or its slider.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from napari_tghmoe.io._types import CTVolume

#: Plane -> the array axis (z, y, x) it is perpendicular to.
PLANE_AXIS: dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}
AXIS_PLANE: dict[int, str] = {axis: plane for plane, axis in PLANE_AXIS.items()}
#: Total slab thickness sent for a slice question: enough context for a 10-30 mm lesion.
DEFAULT_SLAB_MM = 20.0
_LPS_NAMES = ("x", "y", "z")

#: Phrasings that ask about the slice on screen rather than the whole scan.
_SLICE_QUESTION = re.compile(
    r"\b(this|current|present|displayed|shown|visible)\s+(axial\s+|coronal\s+|sagittal\s+)?"
    r"(slice|section|plane|image|cut|level)\b"
    r"|\bon\s+(the\s+)?screen\b"
    r"|\b(slice|section|image)\s+(i\s+am|i'm)\s+(looking\s+at|viewing|on)\b",
    re.IGNORECASE,
)

#: The chat's quick action.
THIS_SLICE_QUESTION = "What is on this slice?"


def is_slice_question(question: str) -> bool:
    """True for a question about the slice on screen ("what is on this slice?", "this image")."""
    return bool(_SLICE_QUESTION.search(question or ""))


@dataclass
class SliceContext:
    """What the chat sends for a slice question: the words and the slab volume."""

    plane: str
    index: int  # 0-based slice index along the plane's normal
    count: int  # slices along that normal
    position_mm: float  # patient coordinate of the slice along its dominant LPS axis
    axis_name: str  # "x", "y" or "z"
    text: str  # "axial slice 42 of 120 (z = -153.5 mm)"
    slab: CTVolume
    slab_range: tuple[int, int]  # [start, stop) slice indices of the slab in the volume

    def question_for_model(self, question: str) -> str:
        """The user's question prefixed with where it applies."""
        n = self.slab_range[1] - self.slab_range[0]
        return f"This is {self.text}, shown as a slab of {n} slices around it. {question.strip()}"


def _dominant_axis(vector: np.ndarray) -> int:
    return int(np.argmax(np.abs(vector)))


def slice_position_mm(volume: CTVolume, plane: str, index: int) -> tuple[str, float]:
    """(LPS axis name, patient coordinate in mm) of a slice's centre along its normal."""
    axis = PLANE_AXIS[plane]
    centre = (np.asarray(volume.shape, dtype=float) - 1) / 2.0
    centre[axis] = index
    normal = np.asarray(volume.direction, dtype=float)[:, axis]
    lps = _dominant_axis(normal)
    return _LPS_NAMES[lps], float(volume.index_to_patient(tuple(centre))[lps])


def slice_label(volume: CTVolume, plane: str, index: int) -> str:
    """"axial slice 42 of 120 (z = -153.5 mm)" (slices counted from 1, as viewers number them)."""
    axis_name, position = slice_position_mm(volume, plane, index)
    count = volume.shape[PLANE_AXIS[plane]]
    return f"{plane} slice {index + 1} of {count} ({axis_name} = {position:.1f} mm)"


def slab_range(volume: CTVolume, plane: str, index: int, slab_mm: float = DEFAULT_SLAB_MM) -> tuple[int, int]:
    """[start, stop) of a slab about ``slab_mm`` thick centred on the slice (at least 3 slices).

    Near the edge of the scan the slab is shifted inwards, so it keeps its thickness.
    """
    axis = PLANE_AXIS[plane]
    count = volume.shape[axis]
    half = max(1, int(round(slab_mm / 2.0 / float(volume.spacing[axis]))))
    size = min(2 * half + 1, count)
    start = min(max(index - half, 0), count - size)
    return start, start + size


def slice_context(volume: CTVolume, plane: str, index: int, slab_mm: float = DEFAULT_SLAB_MM) -> SliceContext:
    """Prompt words and slab volume for a question about ``plane`` slice ``index`` of ``volume``."""
    if plane not in PLANE_AXIS:
        raise ValueError(f"plane must be one of {tuple(PLANE_AXIS)}, got {plane!r}")
    axis = PLANE_AXIS[plane]
    count = volume.shape[axis]
    if not 0 <= int(index) < count:
        raise ValueError(f"{plane} slice index {index} is outside the volume (0..{count - 1})")
    index = int(index)
    start, stop = slab_range(volume, plane, index, slab_mm)
    take = [slice(None)] * 3
    take[axis] = slice(start, stop)
    offset = [0.0, 0.0, 0.0]
    offset[axis] = float(start)
    text = slice_label(volume, plane, index)
    slab = replace(
        volume,
        hu=np.ascontiguousarray(volume.hu[tuple(take)]),
        origin=tuple(float(v) for v in volume.index_to_patient(tuple(offset))),
        description=f"{volume.description} ({plane} slab, slices {start + 1}-{stop})".strip(),
        warnings=list(volume.warnings),
        metadata=dict(volume.metadata),
    )
    axis_name, position = slice_position_mm(volume, plane, index)
    return SliceContext(plane, index, count, position, axis_name, text, slab, (start, stop))


def slice_index(point: Sequence[float], scale: Sequence[float], translate: Sequence[float], plane: str, count: int) -> int:
    """The slice of a layer (scale/translate in world mm) under the world point, clamped."""
    axis = PLANE_AXIS[plane]
    value = (float(point[-3:][axis]) - float(translate[-3:][axis])) / float(scale[-3:][axis])
    return int(min(max(int(round(value)), 0), count - 1))


class PlaneTracker:
    """Remembers the plane of the user's last scroll or click from changes of ``dims.point``.

    One world axis changed: a scroll through that axis (its plane). Two changed: a click in
    the plane of the third. All three (a jump to a finding, centring): the plane is kept.
    Before any move, a 2D main canvas names its own plane, else axial.
    """

    def __init__(self, dims: Any) -> None:
        self._dims = dims
        self._last_point = tuple(float(v) for v in dims.point)
        self._plane: str | None = None
        dims.events.point.connect(self._on_point)

    @property
    def plane(self) -> str:
        if self._plane is not None:
            return self._plane
        dims = self._dims
        if getattr(dims, "ndisplay", 3) == 2 and dims.ndim == 3:
            hidden = [axis for axis in range(3) if axis not in tuple(dims.displayed)]
            if hidden:
                return AXIS_PLANE[hidden[0]]
        return "axial"

    def _on_point(self, event: Any = None) -> None:
        point = tuple(float(v) for v in self._dims.point)
        previous, self._last_point = self._last_point, point
        if len(point) != 3 or len(previous) != 3:
            return
        changed = [axis for axis in range(3) if not np.isclose(point[axis], previous[axis])]
        if len(changed) == 1:
            self._plane = AXIS_PLANE[changed[0]]
        elif len(changed) == 2:
            self._plane = AXIS_PLANE[({0, 1, 2} - set(changed)).pop()]

    def disconnect(self) -> None:
        try:
            self._dims.events.point.disconnect(self._on_point)
        except Exception:
            pass


def context_for_layer(layer: Any, volume: CTVolume, plane: str, world_point: Sequence[float], slab_mm: float = DEFAULT_SLAB_MM) -> SliceContext:
    """The slice context of the cursor's slice in ``plane`` on a CT layer (its scale/translate)."""
    axis = PLANE_AXIS[plane]
    index = slice_index(world_point, np.asarray(layer.scale), np.asarray(layer.translate), plane, volume.shape[axis])
    return slice_context(volume, plane, index, slab_mm)
