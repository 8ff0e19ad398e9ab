"""The two public entry points: ``load_volume`` and ``list_series``."""

from __future__ import annotations

from pathlib import Path

from napari_tghmoe.io import _dicom
from napari_tghmoe.io._checks import not_a_file_reason, oblique_warning, special_file_kind, value_warnings
from napari_tghmoe.io._itk import itk_format, read_itk
from napari_tghmoe.io._types import CTVolume, SeriesInfo, VolumeReadError


def load_volume(
    path: str | Path,
    series_uid: str | None = None,
    *,
    allow_2d: bool = False,
    resample: bool = True,
) -> CTVolume:
    """Read a CT volume from a DICOM folder or file, NIfTI, MetaImage or NRRD.

    A folder is searched recursively for DICOM files of any name. With several series the
    largest axial CT is loaded and the others are named in ``CTVolume.warnings``; pass
    ``series_uid`` (see :func:`list_series`) to choose. A single 2D image raises
    :class:`VolumeReadError` unless ``allow_2d=True`` (then it is a one-slice volume, e.g.
    to show one real slice). Missing slices or irregular spacing are resampled to a
    uniform grid (``resample=False`` keeps the slices as they are, with a warning).

    Every failure raises :class:`VolumeReadError` naming the file and the reason.
    """
    path = Path(path)
    _check_path(path)
    if path.is_dir():
        volume = _load_dicom_folder(path, series_uid, allow_2d=allow_2d, resample=resample)
    elif itk_format(path) is not None:
        volume = read_itk(path, allow_2d=allow_2d)
    else:
        volume = _load_dicom_file(path, series_uid, allow_2d=allow_2d, resample=resample)
    _add_value_warnings(volume)
    return volume


def _check_path(path: Path) -> None:
    """Refuse what is not a file or folder before opening it (a FIFO would block)."""
    try:
        path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise VolumeReadError(path, "broken symbolic link (its target does not exist)") from None
        raise VolumeReadError(path, "no such file or folder") from None
    except OSError as exc:  # symlink loops (ELOOP), permissions, names too long
        raise VolumeReadError(path, f"cannot open ({exc.strerror or exc})") from None
    kind = special_file_kind(path)
    if kind is not None:
        raise VolumeReadError(path, not_a_file_reason(kind))


def _add_value_warnings(volume: CTVolume) -> None:
    """What every reader tells about the values and the axes, once, in the same words."""
    volume.warnings.extend(value_warnings(volume.hu))
    oblique = oblique_warning(volume.direction)
    if oblique is not None:
        volume.warnings.append(oblique)


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """Image series under a folder (or in one DICOM file), largest axial CT first.

    Reads headers only, so it is fast and safe to call before choosing a series.
    Volume files (NIfTI, MetaImage, NRRD) are listed as one series named after the file.
    """
    folder = Path(folder)
    _check_path(folder)
    if folder.is_file() and itk_format(folder) is not None:
        volume_info = _itk_series_info(folder)
        return [volume_info]
    if folder.is_dir():
        scan = _scan_folder(folder)
    else:
        scan = _dicom.scan([str(folder)], str(folder))
        if not scan.frames:
            raise VolumeReadError(folder, scan.skipped[0].reason if scan.skipped else "no image")
    stacks = sorted(_dicom.build_stacks(scan.frames), key=_dicom._stack_score, reverse=True)
    return [_dicom.series_info(stack) for stack in stacks]


def _itk_series_info(path: Path) -> SeriesInfo:
    volume = read_itk(path, allow_2d=True)
    return SeriesInfo(
        uid=path.name,
        description=volume.description,
        modality=volume.modality,
        slice_count=volume.shape[0],
        shape=volume.shape,
        spacing=volume.spacing,
        orientation="axial",
        files=(str(path),),
    )


def _scan_folder(folder: Path) -> _dicom.Scan:
    files = _dicom.iter_candidate_files(folder)
    if not files:
        raise VolumeReadError(folder, "empty folder: no files found")
    scan = _dicom.scan(files, str(folder))
    if not scan.frames:
        raise VolumeReadError(folder, _why_no_images(scan))
    return scan


def _why_no_images(scan: _dicom.Scan) -> str:
    kinds: dict[str, list[_dicom._Skipped]] = {}
    for skipped in scan.skipped:
        kinds.setdefault(skipped.kind, []).append(skipped)
    parts = []
    for kind, items in kinds.items():
        example = items[0]
        parts.append(f"{len(items)} {kind} file(s), e.g. {Path(example.path).name}: {example.reason}")
    volumes = [s.path for s in scan.skipped if itk_format(Path(s.path))]
    hint = f"; volume files found, open one directly: {', '.join(Path(v).name for v in volumes[:3])}" if volumes else ""
    return "no DICOM images in folder (" + "; ".join(parts) + ")" + hint


def _load_dicom_folder(folder: Path, series_uid: str | None, *, allow_2d: bool, resample: bool) -> CTVolume:
    scan = _scan_folder(folder)
    stacks = _dicom.build_stacks(scan.frames)
    stack, warnings = _dicom.choose_stack(stacks, series_uid, str(folder))
    ignored = [s for s in scan.skipped if s.kind not in ("dicomdir",)]
    if ignored:
        names = ", ".join(f"{Path(s.path).name} ({s.reason})" for s in ignored[:5])
        more = f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""
        warnings.append(f"ignored {len(ignored)} file(s) that hold no usable image: {names}{more}")
    return _dicom.stack_to_volume(
        stack, str(folder), warnings, allow_2d=allow_2d, resample=resample, source_format="DICOM"
    )


def _load_dicom_file(path: Path, series_uid: str | None, *, allow_2d: bool, resample: bool) -> CTVolume:
    result = _dicom.read_frames(str(path))
    if isinstance(result, _dicom._Skipped):
        reason = result.reason
        if result.kind == "not-dicom":
            reason = "not a DICOM, NIfTI (.nii/.nii.gz), MetaImage (.mha/.mhd) or NRRD (.nrrd/.nhdr) file: " + reason
        raise VolumeReadError(path, reason)
    stacks = _dicom.build_stacks(result)
    stack, warnings = _dicom.choose_stack(stacks, series_uid, str(path))
    source_format = "DICOM (multi-frame)" if stack.first.frame_index is not None else "DICOM"
    try:
        return _dicom.stack_to_volume(
            stack, str(path), warnings, allow_2d=allow_2d, resample=resample, source_format=source_format
        )
    except VolumeReadError as exc:
        if exc.path != str(path):
            raise VolumeReadError(path, exc.reason) from exc
        raise
