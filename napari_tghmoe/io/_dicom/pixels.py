"""Pixel data -> HU: pass 2 of reading a series, and the ``CTVolume`` it makes.

The output is preallocated once and slices are decoded into it in parallel: uncompressed
16-bit slices are read straight from their file offset (found in pass 1), compressed ones go
through pydicom's decoders (pylibjpeg plugins for JPEG, JPEG 2000 and RLE). Values are
rescaled to HU in int16 when that is exact, else float32.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np

from napari_tghmoe.io._dicom.header import _DEFLATED, _check_allocation, _Frame, _short, _sop_class_name
from napari_tghmoe.io._dicom.stack import _Stack, stack_geometry
from napari_tghmoe.io._geometry import reorient_to_lps
from napari_tghmoe.io._metadata import dicom_metadata
from napari_tghmoe.io._types import CTVolume, VolumeReadError


def _workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


class _Int16Overflow(Exception):
    """A slice's HU do not fit int16: decode again into float32."""


def _is_integer(value: float) -> bool:
    return abs(value - round(value)) < 1e-6


def _check_rescale(frames: list[_Frame]) -> bool:
    """True when every slice's HU are integers (int16 output is exact)."""
    for frame in frames:
        if not (np.isfinite(frame.slope) and np.isfinite(frame.intercept)) or frame.slope == 0:
            raise VolumeReadError(
                frame.path, f"invalid rescale slope/intercept ({frame.slope}, {frame.intercept})"
            )
    return all(_is_integer(f.slope) and _is_integer(f.intercept) for f in frames)


def _read_native(frame: _Frame) -> np.ndarray:
    """Raw stored values of an uncompressed 16-bit slice, straight from its file offset."""
    count = frame.rows * frame.columns
    dtype = np.dtype("<i2") if frame.pixel_representation else np.dtype("<u2")
    raw = np.empty(count, dtype=dtype)
    with open(frame.path, "rb") as handle:
        handle.seek(frame.pixel_offset)  # type: ignore[arg-type]
        got = handle.readinto(memoryview(raw).cast("B"))
    if got != count * 2:
        raise VolumeReadError(frame.path, f"truncated file: pixel data has {got} of {count * 2} bytes")
    raw = raw.reshape(frame.rows, frame.columns)
    bits = frame.bits_stored
    if 0 < bits < 16:
        if frame.pixel_representation:
            shift = 16 - bits
            raw = np.right_shift(np.left_shift(raw, shift), shift)
        else:
            raw &= np.uint16((1 << bits) - 1)
    return raw


def _decode_file(path: str, frames: list[_Frame]) -> Iterable[tuple[_Frame, np.ndarray]]:
    """Raw stored values of the given frames of one file, via pydicom's decoders."""
    from pydicom.pixels import iter_pixels, pixel_array

    try:
        if frames[0].transfer_syntax in _DEFLATED:
            # pixel_array(path) reads the file as stored; a deflated one must be inflated first.
            import pydicom

            source = pydicom.dcmread(path)
        else:
            source = path
        if frames[0].frame_index is None:
            yield frames[0], pixel_array(source)
            return
        wanted = {f.frame_index: f for f in frames}
        for index, array in enumerate(iter_pixels(source)):
            if index in wanted:
                yield wanted[index], array
    except VolumeReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
        raise VolumeReadError(path, f"cannot decode pixel data ({type(exc).__name__}: {_short(exc)})") from exc


def _store(frame: _Frame, raw: np.ndarray, out: np.ndarray) -> None:
    """Rescale stored values to HU into one output slice without unsigned overflow."""
    if raw.shape != out.shape:
        raise VolumeReadError(frame.path, f"pixel data shape {raw.shape} does not match {out.shape}")
    if out.dtype == np.int16:
        slope, intercept = int(round(frame.slope)), int(round(frame.intercept))
        if slope == 1 and intercept == 0 and raw.dtype == np.int16:
            out[...] = raw
            return
        lo, hi = int(raw.min()), int(raw.max())
        ends = (lo * slope + intercept, hi * slope + intercept)
        if min(ends) < -32768 or max(ends) > 32767:
            raise _Int16Overflow
        # int32 arithmetic (uint16 - 1024 must not wrap), cast back once into the output.
        if slope == 1:
            np.add(raw, np.int32(intercept), out=out, casting="unsafe")
        else:
            np.add(raw.astype(np.int32) * slope, np.int32(intercept), out=out, casting="unsafe")
        return
    np.multiply(raw, np.float64(frame.slope), out=out, casting="unsafe")
    out += np.float32(frame.intercept)
    if raw.dtype.kind == "f" and not np.all(np.isfinite(out)):
        raise VolumeReadError(frame.path, "pixel data contains NaN or infinite values")


def decode_into(frames: list[_Frame], dtype: np.dtype, root: str) -> np.ndarray:
    """Preallocate the (n, rows, cols) output once and fill it slice by slice, in parallel."""
    first = frames[0]
    shape = (len(frames), first.rows, first.columns)
    _check_allocation(shape, dtype, root)
    out = np.empty(shape, dtype=dtype)
    slot = {id(f): i for i, f in enumerate(frames)}
    tasks: dict[str, list[_Frame]] = {}
    for frame in frames:
        tasks.setdefault(frame.path, []).append(frame)

    def work(item: tuple[str, list[_Frame]]) -> None:
        path, members = item
        if members[0].truncated:
            raise VolumeReadError(path, members[0].truncated)
        if len(members) == 1 and members[0].native:
            frame = members[0]
            _store(frame, _read_native(frame), out[slot[id(frame)]])
            return
        for frame, raw in _decode_file(path, members):
            if raw.ndim != 2:
                raise VolumeReadError(frame.path, f"unexpected pixel array shape {raw.shape}")
            _store(frame, raw, out[slot[id(frame)]])

    items = list(tasks.items())
    if len(items) > 4:
        with ThreadPoolExecutor(_workers()) as pool:
            for _ in pool.map(work, items):
                pass
    else:
        for item in items:
            work(item)
    return out


def _resample_slices(hu: np.ndarray, distances: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Linear interpolation along k onto uniform target positions (missing slices, gaps)."""
    out = np.empty((len(targets),) + hu.shape[1:], dtype=hu.dtype)
    upper = np.clip(np.searchsorted(distances, targets, side="left"), 1, len(distances) - 1)
    lower = upper - 1
    span = distances[upper] - distances[lower]
    weight = np.clip((targets - distances[lower]) / np.where(span > 0, span, 1.0), 0.0, 1.0)
    for index, (lo, hi, w) in enumerate(zip(lower, upper, weight)):
        value = hu[lo].astype(np.float32) * (1.0 - w) + hu[hi].astype(np.float32) * w
        out[index] = np.rint(value) if hu.dtype.kind == "i" else value
    return out


def stack_to_volume(
    stack: _Stack,
    root: str,
    warnings: list[str],
    *,
    allow_2d: bool,
    resample: bool,
    source_format: str,
) -> CTVolume:
    geometry = stack_geometry(stack, root, allow_2d=allow_2d, resample=resample)
    warnings = warnings + geometry.warnings
    frames = geometry.frames
    exact = _check_rescale(frames)
    dtype = np.dtype(np.int16 if exact else np.float32)
    try:
        hu = decode_into(frames, dtype, root)
    except _Int16Overflow:
        hu = decode_into(frames, np.dtype(np.float32), root)
    if geometry.resample_to is not None:
        hu = _resample_slices(hu, geometry.distances, geometry.resample_to)
    hu, spacing, origin, direction = reorient_to_lps(hu, geometry.spacing, geometry.origin, geometry.direction)

    first = frames[0]
    header = first.header
    metadata = dicom_metadata(header, source_format)
    metadata["number_of_slices"] = int(hu.shape[0])
    if first.transfer_syntax:
        metadata["transfer_syntax"] = _sop_class_name(first.transfer_syntax)
    if len({f.slope for f in frames}) > 1 or len({f.intercept for f in frames}) > 1:
        warnings.append("rescale slope/intercept vary between slices: applied per slice")
    return CTVolume(
        hu=hu,
        spacing=spacing,
        origin=origin,
        direction=direction,
        modality=first.modality or "CT",
        series_uid=stack.series_uid if not stack.series_uid.startswith("no-series-uid:") else None,
        description=first.description,
        window=first.window,
        source=root,
        warnings=warnings,
        metadata=metadata,
        study_uid=first.study_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
    )

