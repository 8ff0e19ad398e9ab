"""DICOM headers -> frames: pass 1 of reading a series (no pixel data read).

Every file's header is read with pixel data deferred (so its file offset is known but its
bytes are not read); each 2D image becomes a :class:`_Frame` (a single-frame file, or one frame
of an enhanced multi-frame file) with what grouping, geometry and decoding need, or the file
becomes a :class:`_Skipped` that says why it holds no image. The fields of single-frame files
are read by :class:`_Fast`, which decodes the raw bytes of pydicom's not-yet-converted elements
itself: that depends on pydicom internals (``RawDataElement``, ``Dataset.items()`` handing out
stored elements), and ``tests/test_io.py`` checks it against pydicom's own reading of every
file pydicom and pydicom-data ship.
"""

from __future__ import annotations

import os
import stat
import warnings as py_warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from napari_tghmoe.io._checks import not_a_file_reason, special_file_kind
from napari_tghmoe.io._types import VolumeReadError

#: Values longer than this are not read in pass 1 (pixel data above all).
_DEFER_BYTES = 2048
#: Refuse volumes that would need more voxels than this (checked before allocating).
MAX_VOXELS = 2**31

_UNCOMPRESSED_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
#: Deflated Explicit VR Little Endian: the whole dataset is zlib-compressed in the file.
_DEFLATED = {"1.2.840.10008.1.2.1.99"}


@dataclass
class _Frame:
    """One 2D image: a single-frame file or one frame of an enhanced multi-frame file."""

    path: str
    frame_index: int | None
    series_uid: str
    study_uid: str | None
    frame_of_reference_uid: str | None
    sop_instance_uid: str | None
    modality: str
    image_type: tuple[str, ...]
    rows: int
    columns: int
    position: np.ndarray | None
    orientation: np.ndarray | None  # 6 direction cosines (row, column)
    pixel_spacing: tuple[float, float] | None  # (between rows = j, between columns = i)
    slope: float
    intercept: float
    window: tuple[float, float] | None
    transfer_syntax: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    pixel_offset: int | None  # file offset of native pixel data
    pixel_length: int | None
    temporal_key: tuple[Any, ...]
    instance_number: int | None
    truncated: str | None
    slice_thickness: float | None
    header: Any = field(repr=False, default=None)

    @property
    def description(self) -> str:
        return str(self.header.get("SeriesDescription", "") or "") if self.header is not None else ""

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    @property
    def native(self) -> bool:
        return (
            self.frame_index is None
            and self.transfer_syntax in _UNCOMPRESSED_LE
            and self.bits_allocated == 16
            and self.pixel_offset is not None
            and self.pixel_length is not None
            and self.pixel_length >= self.rows * self.columns * 2
        )


@dataclass
class _Skipped:
    path: str
    reason: str
    kind: str  # "empty", "not-dicom", "dicomdir", "non-image", "colour", "broken", "special", "unreadable"


def _float(value: Any, default: float | None = None) -> float | None:
    try:
        if value is None or value == "":
            return default
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return default


def _vector(value: Any, length: int) -> np.ndarray | None:
    try:
        vector = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return vector if vector.shape == (length,) and np.all(np.isfinite(vector)) else None


def _item(sequence_owner: Any, keyword: str) -> Any:
    sequence = sequence_owner.get(keyword) if sequence_owner is not None else None
    return sequence[0] if sequence else None


def _group_value(per_frame: Any, shared: Any, macro: str, keyword: str) -> Any:
    """A value from a functional group macro: the per-frame one wins over the shared one."""
    for owner in (per_frame, shared):
        item = _item(owner, macro)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _read_dataset(path: str) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except InvalidDicomError:
        # Old files without the 128-byte preamble: accept only if they parse as an image.
        dataset = pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=True)
        if "SOPClassUID" not in dataset and "Rows" not in dataset:
            raise InvalidDicomError("no DICOM preamble and no image attributes") from None
        return dataset


def _sop_class_name(uid: Any) -> str:
    try:
        from pydicom.uid import UID

        return UID(str(uid)).name
    except Exception:  # pragma: no cover - purely cosmetic
        return str(uid)


def read_frames(path: str) -> list[_Frame] | _Skipped:
    """Header pass for one file: its image frames, or why it holds none.

    pydicom's own warnings (forced reads of non-DICOM files, odd VRs) are silenced: a folder
    of thousands of stray files would otherwise print as many lines; what matters about a
    file is in its ``_Skipped`` reason or the volume's warnings.
    """
    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        return _read_frames(path)


def _read_frames(path: str) -> list[_Frame] | _Skipped:
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # never open a FIFO/socket: it would block
            kind = special_file_kind(path) or "special file"
            return _Skipped(path, not_a_file_reason(kind), "special")
        if info.st_size == 0:
            return _Skipped(path, "zero-byte file", "empty")
        dataset = _read_dataset(path)
    except OSError as exc:  # symlink loops, permissions: not a question of format
        return _Skipped(path, f"cannot open ({exc.strerror or _short(exc)})", "unreadable")
    except Exception as exc:  # noqa: BLE001 - anything unparsable is "not DICOM" here
        name = type(exc).__name__
        return _Skipped(path, f"not a readable DICOM file ({name}: {_short(exc)})", "not-dicom")
    try:
        return _frames_from_dataset(path, dataset)
    except VolumeReadError as exc:
        return _Skipped(path, exc.reason, "broken")
    except Exception as exc:  # noqa: BLE001 - a damaged header must not crash the scan
        return _Skipped(path, f"damaged DICOM header ({type(exc).__name__}: {_short(exc)})", "broken")


def _short(exc: BaseException) -> str:
    """One line of an exception's text, whole: a first line ending in ':' (pydicom's "raised by
    all available plugins:") takes the lines that follow, joined by '; '."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {'; '.join(lines[1:])}"
        return text if len(text) <= 400 else text[:399] + "\u2026"
    return text[:160]


class _Fast:
    """Fast read-only access to the header fields needed for every file.

    pydicom converts a value on first access, which costs ~50 us per DS/IS/UI element
    (validation, DSfloat objects) and dominated the scan of a 300-file series. The
    string-valued fields read here (UI, CS, DS, IS) are plain ASCII, so their raw bytes
    are decoded directly; anything already converted or deferred goes through pydicom.
    """

    __slots__ = ("ds", "elements")

    def __init__(self, ds: Any):
        self.ds = ds
        # Dataset.items() hands out the stored (raw, unconverted) elements: one C-level
        # dict copy instead of a Tag conversion per lookup.
        self.elements = dict(ds.items())

    def text(self, tag: int) -> str | None:
        from pydicom.dataelem import RawDataElement

        element = self.elements.get(tag)
        if element is None:
            return None
        if isinstance(element, RawDataElement) and element.value is not None:
            return element.value.decode("latin-1").strip(" \x00")
        value = self.ds[tag].value
        if value is None:
            return None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            return "\\".join(str(v) for v in value)
        return str(value).strip()

    def numbers(self, tag: int) -> list[float] | None:
        text = self.text(tag)
        if not text:
            return None
        try:
            return [float(v) for v in text.split("\\")]
        except ValueError:
            return None

    def number(self, tag: int, default: float | None = None) -> float | None:
        values = self.numbers(tag)
        return values[0] if values else default

    def integer(self, tag: int) -> int | None:
        value = self.number(tag)
        return int(value) if value is not None and np.isfinite(value) else None

    def binary(self, tag: int, default: int) -> int:
        """US values (Rows, Columns, Bits...): two bytes in the file's byte order."""
        from pydicom.dataelem import RawDataElement

        element = self.elements.get(tag)
        if element is None:
            return default
        if isinstance(element, RawDataElement) and element.value is not None and len(element.value) >= 2:
            return int.from_bytes(element.value[:2], "little" if element.is_little_endian else "big")
        value = self.ds[tag].value
        try:
            return int(value if not isinstance(value, (list, tuple)) else value[0])
        except (TypeError, ValueError):
            return default


def _frames_from_dataset(path: str, ds: Any) -> list[_Frame] | _Skipped:
    fast = _Fast(ds)
    meta = getattr(ds, "file_meta", None)
    sop_class = fast.text(0x00080016) or (str(meta.get("MediaStorageSOPClassUID", "")) if meta else "")
    if sop_class == _DICOMDIR_CLASS or ds.get_item(0x00041220, keep_deferred=True) is not None:
        return _Skipped(path, "DICOMDIR index file", "dicomdir")
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    if raw is None and not any(ds.get_item(tag, keep_deferred=True) is not None for tag in (0x7FE00008, 0x7FE00009)):
        kind = _sop_class_name(sop_class) if sop_class else "unknown SOP class"
        return _Skipped(path, f"DICOM file without image data ({kind})", "non-image")
    samples = fast.binary(0x00280002, 1)
    photometric = fast.text(0x00280004) or "MONOCHROME2"
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        return _Skipped(
            path,
            f"colour image ({photometric}, {samples} samples per pixel), not a greyscale CT",
            "colour",
        )
    rows, columns = fast.binary(0x00280010, 0), fast.binary(0x00280011, 0)
    if rows <= 0 or columns <= 0:
        return _Skipped(path, "image without Rows/Columns", "broken")

    transfer_syntax = str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")) if meta else "1.2.840.10008.1.2"
    pixel_offset = pixel_length = None
    # A deflated file's offsets point into the inflated stream, not the file: no direct reads there.
    if (
        raw is not None
        and transfer_syntax not in _DEFLATED
        and getattr(raw, "value_tell", None) is not None
        and raw.length not in (None, 0xFFFFFFFF)
    ):
        pixel_offset, pixel_length = int(raw.value_tell), int(raw.length)

    truncated = None
    if pixel_offset is not None and pixel_length is not None:
        file_size = os.path.getsize(path)
        if file_size < pixel_offset + pixel_length:
            truncated = f"truncated file: pixel data needs {pixel_length} bytes, only {max(file_size - pixel_offset, 0)} present"
    bits_allocated = fast.binary(0x00280100, 16)
    image_type = fast.text(0x00080008)
    common = dict(
        path=path,
        series_uid=fast.text(0x0020000E) or f"no-series-uid:{Path(path).parent}",
        study_uid=fast.text(0x0020000D) or None,
        frame_of_reference_uid=fast.text(0x00200052) or None,
        modality=fast.text(0x00080060) or "",
        image_type=tuple(v.strip().upper() for v in image_type.split("\\")) if image_type else (),
        rows=rows,
        columns=columns,
        transfer_syntax=transfer_syntax,
        bits_allocated=bits_allocated,
        bits_stored=fast.binary(0x00280101, bits_allocated),
        pixel_representation=fast.binary(0x00280103, 0),
        instance_number=fast.integer(0x00200013),
        truncated=truncated,
        header=ds,
    )
    n_frames = fast.integer(0x00280008) or 1
    _check_allocation((n_frames, rows, columns), np.dtype(np.int16), path)
    if n_frames <= 1 and ds.get_item(0x52009230, keep_deferred=True) is None:
        window_centre, window_width = fast.number(0x00281050), fast.number(0x00281051)
        return [
            _Frame(
                frame_index=None,
                sop_instance_uid=fast.text(0x00080018) or None,
                position=_vector(fast.numbers(0x00200032) or (), 3),
                orientation=_vector(fast.numbers(0x00200037) or (), 6),
                pixel_spacing=_spacing_pair(fast.numbers(0x00280030) or fast.numbers(0x00181164)),
                slope=fast.number(0x00281053, 1.0),  # type: ignore[arg-type]
                intercept=fast.number(0x00281052, 0.0),  # type: ignore[arg-type]
                window=_window(window_centre, window_width),
                pixel_offset=pixel_offset,
                pixel_length=pixel_length,
                temporal_key=(fast.integer(0x00200100), fast.integer(0x00200012), fast.number(0x00181060)),
                slice_thickness=fast.number(0x00180050),
                **common,
            )
        ]
    return _enhanced_frames(ds, n_frames, common)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _spacing_pair(value: Any) -> tuple[float, float] | None:
    vector = _vector(value, 2) if value is not None else None
    if vector is None or np.any(vector <= 0):
        return None
    return float(vector[0]), float(vector[1])


def _window(centre: Any, width: Any) -> tuple[float, float] | None:
    c, w = _float(centre), _float(width)
    if c is None or w is None or not np.isfinite(c) or not np.isfinite(w) or w <= 0:
        return None
    return float(c), float(w)


def _temporal_key(item: Any) -> tuple[Any, ...]:
    """What tells apart volumes of a 4D/multi-phase series sharing slice positions."""
    return (
        _int_or_none(item.get("TemporalPositionIdentifier")),
        _int_or_none(item.get("AcquisitionNumber")),
        _float(item.get("TriggerTime")),
    )


def _enhanced_frames(ds: Any, n_frames: int, common: dict[str, Any]) -> list[_Frame]:
    """Enhanced multi-frame CT: positions and rescale per frame from the functional groups."""
    per_frame_groups = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    frames = []
    top_position = _vector(ds.get("ImagePositionPatient"), 3)
    top_orientation = _vector(ds.get("ImageOrientationPatient"), 6)
    spacing_between = _float(ds.get("SpacingBetweenSlices")) or _float(ds.get("SliceThickness"))
    for index in range(n_frames):
        per_frame = per_frame_groups[index] if index < len(per_frame_groups) else None
        position = _vector(_group_value(per_frame, shared, "PlanePositionSequence", "ImagePositionPatient"), 3)
        orientation = _vector(
            _group_value(per_frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
        )
        if orientation is None:
            orientation = top_orientation
        if position is None and top_position is not None and orientation is not None and spacing_between:
            # Legacy multi-frame: frames stacked along the normal from the first position.
            normal = np.cross(orientation[:3], orientation[3:])
            position = top_position + normal * spacing_between * index
        pixel_spacing = _spacing_pair(
            _group_value(per_frame, shared, "PixelMeasuresSequence", "PixelSpacing") or ds.get("PixelSpacing")
        )
        slope = _float(_group_value(per_frame, shared, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _float(
            _group_value(per_frame, shared, "PixelValueTransformationSequence", "RescaleIntercept")
        )
        content = _item(per_frame, "FrameContentSequence")
        temporal = (
            _int_or_none(content.get("TemporalPositionIndex")) if content is not None else None,
            None,
            None,
        )
        frames.append(
            _Frame(
                frame_index=index,
                sop_instance_uid=f"{ds.get('SOPInstanceUID', '')}#{index}",
                position=position,
                orientation=orientation,
                pixel_spacing=pixel_spacing,
                slope=slope if slope is not None else (_float(ds.get("RescaleSlope"), 1.0) or 1.0),
                intercept=intercept if intercept is not None else (_float(ds.get("RescaleIntercept"), 0.0) or 0.0),
                window=_window(
                    _group_value(per_frame, shared, "FrameVOILUTSequence", "WindowCenter"),
                    _group_value(per_frame, shared, "FrameVOILUTSequence", "WindowWidth"),
                )
                or _window(ds.get("WindowCenter"), ds.get("WindowWidth")),
                pixel_offset=None,
                pixel_length=None,
                temporal_key=temporal,
                slice_thickness=_float(_group_value(per_frame, shared, "PixelMeasuresSequence", "SliceThickness")),
                **common,
            )
        )
    return frames


def iter_candidate_files(folder: Path) -> list[str]:
    """Every file below ``folder`` (any name, any depth), hidden files excluded.

    Folder symlinks are followed (archives link series in), each real folder once, so a
    symlink loop ends; FIFOs and sockets are listed and turned away by :func:`read_frames`
    without being opened.
    """
    files = []
    seen: set[tuple[int, int]] = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        try:
            info = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen:  # reached again through a symlink: a loop or a second link
            dirs[:] = []
            continue
        seen.add(key)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
    return files


@dataclass
class Scan:
    """What pass 1 found below a folder (or in one file)."""

    root: str
    frames: list[_Frame]
    skipped: list[_Skipped]


def scan(paths: Iterable[str], root: str) -> Scan:
    paths = list(paths)
    frames: list[_Frame] = []
    skipped: list[_Skipped] = []
    # Sequential on purpose: header parsing is pure Python and holds the GIL; threads
    # measured slower (1.1 s vs 0.8 s for 300 files) on this machine.
    results = [read_frames(p) for p in paths]
    for result in results:
        if isinstance(result, _Skipped):
            skipped.append(result)
        else:
            frames.extend(result)
    return Scan(root=root, frames=frames, skipped=skipped)


def _check_allocation(shape: tuple[int, ...], dtype: np.dtype, path: str) -> None:
    voxels = int(np.prod([int(s) for s in shape], dtype=object))
    if voxels > MAX_VOXELS:
        size_gib = voxels * np.dtype(dtype).itemsize / 2**30
        raise VolumeReadError(
            path, f"header dimensions {tuple(shape)} would need {size_gib:,.0f} GiB; refusing to allocate"
        )


