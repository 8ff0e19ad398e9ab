"""Frames -> stacks -> geometry: which images form one volume, in which order, at which spacing.

The way 3D Slicer does it: frames are grouped into series and stacks (same size and orientation,
localizers apart); slices are sorted by their position along the slice normal (the cross product
of ImageOrientationPatient), never by file name or InstanceNumber, and spacing comes from the
positions. Missing slices, duplicates, 4D series and gantry tilt are found here, from the headers
alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_tghmoe.io._dicom.header import _Frame
from napari_tghmoe.io._geometry import orientation_name
from napari_tghmoe.io._types import SeriesInfo, VolumeReadError

#: Two slice gaps differing by less than this fraction of the median gap count as equal.
_SPACING_TOLERANCE = 0.02
#: Positions closer than this (mm) along the normal are the same slice position.
_SAME_POSITION_MM = 1e-3
#: Tilt (degrees) between the slice normal and the stacking direction worth a warning.
_TILT_WARN_DEGREES = 0.5


@dataclass
class _Stack:
    """Frames of one series that share orientation and size: a candidate volume."""

    series_uid: str
    frames: list[_Frame]
    dropped: list[str] = field(default_factory=list)
    #: Set when no slice size holds a clear majority of the series (cannot pick one).
    size_conflict: str | None = None

    @property
    def first(self) -> _Frame:
        return self.frames[0]

    @property
    def orientation(self) -> str:
        return orientation_name(_direction_of(self.first))


# --------------------------------------------------------------------------- grouping


def _direction_of(frame: _Frame) -> np.ndarray:
    """Direction (columns k, j, i) of a frame's slice: normal, column cosine, row cosine."""
    if frame.orientation is None:
        return np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    row, col = _unit(frame.orientation[:3]), _unit(frame.orientation[3:])
    normal = _unit(np.cross(row, col))
    return np.stack([normal, col, row], axis=1)


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def build_stacks(frames: list[_Frame]) -> list[_Stack]:
    """Split each series into its main stack; localizers, other orientations/sizes dropped."""
    by_series: dict[str, list[_Frame]] = {}
    for frame in frames:
        by_series.setdefault(frame.series_uid, []).append(frame)
    stacks = []
    for series_uid, members in by_series.items():
        clusters: list[list[_Frame]] = []
        for frame in members:
            for cluster in clusters:
                ref = cluster[0]
                if (
                    ref.rows == frame.rows
                    and ref.columns == frame.columns
                    and ref.is_localizer == frame.is_localizer
                    and _same_orientation(ref.orientation, frame.orientation)
                ):
                    cluster.append(frame)
                    break
            else:
                clusters.append([frame])
        clusters.sort(key=lambda c: (not c[0].is_localizer, len(c)), reverse=True)
        main, others = clusters[0], clusters[1:]
        dropped = []
        for other in others:
            ref = other[0]
            why = (
                "localizer/scout"
                if ref.is_localizer
                else f"size {ref.rows}x{ref.columns}"
                if (ref.rows, ref.columns) != (main[0].rows, main[0].columns)
                else f"other orientation ({orientation_name(_direction_of(ref))})"
            )
            dropped.append(f"dropped {len(other)} image(s) of series {series_uid}: {why}")
        conflict = None
        images = sum(len(c) for c in clusters if not c[0].is_localizer)
        other_sizes = sum(
            len(c) for c in others if not c[0].is_localizer and (c[0].rows, c[0].columns) != (main[0].rows, main[0].columns)
        )
        if other_sizes and 2 * len(main) <= images:
            sizes = sorted({f"{c[0].rows}x{c[0].columns}" for c in clusters if not c[0].is_localizer})
            conflict = f"inconsistent slice sizes in one series ({', '.join(sizes)}), none holds a majority"
        stacks.append(_Stack(series_uid=series_uid, frames=main, dropped=dropped, size_conflict=conflict))
    return stacks


def _same_orientation(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.max(np.abs(a - b)) < 1e-3)


def _stack_score(stack: _Stack) -> tuple[Any, ...]:
    first = stack.first
    return (
        first.modality == "CT",
        not first.is_localizer,
        stack.orientation == "axial",
        len(stack.frames) * first.rows * first.columns,
    )


def choose_stack(stacks: list[_Stack], series_uid: str | None, root: str) -> tuple[_Stack, list[str]]:
    """The requested series, else the largest axial CT; warnings name the others."""
    if series_uid is not None:
        matching = [s for s in stacks if s.series_uid == series_uid]
        if not matching:
            available = ", ".join(f"{s.series_uid} ({s.first.description!r})" for s in stacks)
            raise VolumeReadError(root, f"series {series_uid} not found; available: {available}")
        chosen = matching[0]
    else:
        chosen = max(stacks, key=_stack_score)
    warnings = list(chosen.dropped)
    for other in stacks:
        if other is chosen:
            continue
        kind = "localizer series" if other.first.is_localizer else "other series"
        warnings.append(
            f"{kind} not loaded: {other.first.description or '(no description)'!r} "
            f"({other.first.modality or '?'}, {len(other.frames)} image(s), uid {other.series_uid}); "
            "pass series_uid= to load it"
        )
    if chosen.first.modality not in ("CT", ""):
        warnings.append(f"modality is {chosen.first.modality}, not CT: values are not Hounsfield units")
    return chosen, warnings


# --------------------------------------------------------------------------- geometry


@dataclass
class _Geometry:
    frames: list[_Frame]  # sorted along the normal
    distances: np.ndarray  # positions along the normal, ascending
    spacing: tuple[float, float, float]  # (k, j, i) before reorientation
    origin: tuple[float, float, float]
    direction: np.ndarray
    warnings: list[str]
    resample_to: np.ndarray | None  # uniform target distances when spacing is irregular


def stack_geometry(stack: _Stack, root: str, *, allow_2d: bool, resample: bool) -> _Geometry:
    frames = list(stack.frames)
    warnings: list[str] = []
    first = frames[0]
    if stack.size_conflict:
        raise VolumeReadError(root, stack.size_conflict)
    direction = _direction_of(first)
    normal = direction[:, 0]
    if first.orientation is None:
        warnings.append("no ImageOrientationPatient: assumed axial")

    if any(f.position is None for f in frames):
        if len(frames) > 1:
            warnings.append("no ImagePositionPatient: slices ordered by InstanceNumber, spacing from SliceThickness")
        frames.sort(key=lambda f: (f.instance_number or 0, f.frame_index or 0))
        thickness = first.slice_thickness if first.slice_thickness and first.slice_thickness > 0 else None
        if thickness is None and len(frames) > 1:
            warnings.append("no usable SliceThickness either: assumed 1 mm between slices")
        thickness = thickness or 1.0
        distances = np.arange(len(frames), dtype=float) * thickness
        positions = None
    else:
        positions = np.stack([f.position for f in frames])  # type: ignore[misc]
        distances = positions @ normal
        order = np.argsort(distances, kind="stable")
        frames = [frames[i] for i in order]
        distances = distances[order]
        positions = positions[order]

    frames, distances, positions = _one_volume(frames, distances, positions, root, warnings)

    n = len(frames)
    if n == 1 and not allow_2d:
        raise VolumeReadError(
            root,
            "only one 2D image: a 3D volume needs a series of slices (open the folder holding the "
            "whole series, or load with allow_2d=True)",
        )
    pixel_spacing = first.pixel_spacing
    if pixel_spacing is None:
        warnings.append("no PixelSpacing (or a zero or negative one): assumed 1 mm pixels, sizes in mm are unknown")
        pixel_spacing = (1.0, 1.0)

    resample_to = None
    if n >= 2:
        gaps = np.diff(distances)
        step = float(np.median(gaps))
        irregular = np.abs(gaps - step) > max(_SPACING_TOLERANCE * step, 1e-3)
        if np.any(irregular):
            smallest = float(np.min(gaps))
            multiples = gaps / smallest
            missing = int(np.sum(np.round(multiples) - 1)) if np.allclose(multiples, np.round(multiples), atol=0.05) else None
            step = smallest  # mixed spacing keeps its finest (resample=False keeps the slices)
            what = (
                f"{missing} missing slice(s) (gaps of {', '.join(f'{g:.3g}' for g in sorted(set(np.round(gaps, 3))))} mm)"
                if missing
                else f"non-uniform slice spacing ({float(gaps.min()):.3g} to {float(gaps.max()):.3g} mm)"
            )
            if resample:
                # floor, not round: no slice is placed past the last one that holds data
                count = int(np.floor((distances[-1] - distances[0]) / step + 1e-3)) + 1
                resample_to = distances[0] + step * np.arange(count)
                warnings.append(f"{what}: resampled to a uniform {step:.4g} mm grid ({count} slices) by linear interpolation")
            else:
                median = float(np.median(gaps))
                warnings.append(f"{what}: NOT resampled, the volume's slice spacing is only the median {median:.4g} mm")
                step = median
        spacing_k = step
        if positions is not None:
            stacking = _unit(positions[-1] - positions[0])
            tilt = float(np.degrees(np.arccos(np.clip(abs(stacking @ normal), -1.0, 1.0))))
            if tilt > _TILT_WARN_DEGREES:
                travel = positions[-1] - positions[0]
                shear_mm = float(np.linalg.norm(travel - normal * (travel @ normal)))
                warnings.append(
                    f"gantry/detector tilt of {tilt:.1f} degrees: slices are sheared and shown without tilt "
                    f"correction (the last slice sits {shear_mm:.1f} mm off the straight stack); slice "
                    f"spacing {step:.4g} mm is measured along the slice normal"
                )
    else:
        spacing_k = first.slice_thickness or 1.0

    origin = tuple(float(v) for v in (frames[0].position if frames[0].position is not None else np.zeros(3)))
    spacing = (float(spacing_k), float(pixel_spacing[0]), float(pixel_spacing[1]))
    return _Geometry(frames, distances, spacing, origin, direction, warnings, resample_to)  # type: ignore[arg-type]


def _one_volume(
    frames: list[_Frame],
    distances: np.ndarray,
    positions: np.ndarray | None,
    root: str,
    warnings: list[str],
) -> tuple[list[_Frame], np.ndarray, np.ndarray | None]:
    """Repeated slice positions: drop duplicate files, or keep the first volume of a 4D series."""
    if len(frames) < 2 or np.all(np.diff(distances) > _SAME_POSITION_MM):
        return frames, distances, positions
    keep = _unique_instances(frames)
    if len(keep) < len(frames):
        warnings.append(f"ignored {len(frames) - len(keep)} duplicate file(s) of the same image")
        frames, distances = [frames[i] for i in keep], distances[keep]
        positions = positions[keep] if positions is not None else None
        if np.all(np.diff(distances) > _SAME_POSITION_MM):
            return frames, distances, positions
    keys = sorted({f.temporal_key for f in frames}, key=lambda k: tuple((v is None, v or 0) for v in k))
    if len(keys) > 1:
        selected = [i for i, f in enumerate(frames) if f.temporal_key == keys[0]]
        sub = distances[selected]
        if len(selected) >= 1 and (len(sub) < 2 or np.all(np.diff(sub) > _SAME_POSITION_MM)):
            warnings.append(
                f"4D/multi-phase series: {len(keys)} volumes share the slice positions; loaded the first "
                "(temporal position / acquisition), the others are ignored"
            )
            positions = positions[selected] if positions is not None else None
            return [frames[i] for i in selected], sub, positions
    raise VolumeReadError(
        root,
        "several images share the same slice position and nothing (temporal position, "
        "acquisition number) tells their volumes apart",
    )


def _unique_instances(frames: list[_Frame]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for i, frame in enumerate(frames):
        uid = frame.sop_instance_uid or f"{frame.path}#{frame.frame_index}"
        if uid in seen:
            continue
        seen.add(uid)
        keep.append(i)
    return keep


def series_info(stack: _Stack) -> SeriesInfo:
    """A quick summary of a stack from its headers only (no pixel data read)."""
    first = stack.first
    direction = _direction_of(first)
    positions = [f.position for f in stack.frames if f.position is not None]
    if len(positions) >= 2:
        distances = np.sort(np.stack(positions) @ direction[:, 0])
        gaps = np.diff(distances)
        gaps = gaps[gaps > _SAME_POSITION_MM]
        spacing_k = float(np.median(gaps)) if len(gaps) else (first.slice_thickness or 1.0)
    else:
        spacing_k = first.slice_thickness or 1.0
    pixel = first.pixel_spacing or (1.0, 1.0)
    return SeriesInfo(
        uid=stack.series_uid,
        description=first.description,
        modality=first.modality,
        slice_count=len(stack.frames),
        shape=(len(stack.frames), first.rows, first.columns),
        spacing=(spacing_k, float(pixel[0]), float(pixel[1])),
        orientation="localizer" if first.is_localizer else orientation_name(direction),
        files=tuple(sorted({f.path for f in stack.frames})),
    )
