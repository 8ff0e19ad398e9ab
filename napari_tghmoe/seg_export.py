"""Save a label map as NIfTI (+ ``.labels.json``) or as DICOM SEG (highdicom); no Qt.

Both exports keep the label map on the CT's own grid: the NIfTI carries the CT's spacing,
origin and direction (through the project's SimpleITK writer), and the DICOM SEG is built
frame by frame on the *source* DICOM images it references, so a PACS or 3D Slicer overlays it
on the series it came from. Files are written atomically and never replace an existing file
unless ``overwrite`` is given. A DICOM SEG needs the source series: a CT read from NIfTI or a
phantom has no images to reference, and :func:`dicom_seg_unavailable_reason` says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from napari_tghmoe.io._types import CTVolume

#: Patient/study attributes blanked in a DICOM SEG unless identifiers are asked for
#: (the same list the report's DICOM SR uses).
_IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
)


class SegExportError(ValueError):
    """A label map could not be exported; ``str(err)`` is one line naming the file and reason."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = str(path) if path is not None else None
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


# ------------------------------------------------------------------------------ helpers


def labels_json_path(nifti_path: str | Path) -> Path:
    """``OUT.nii.gz`` -> ``OUT.labels.json`` (the sidecar ``tghmoe segment`` writes too)."""
    path = Path(nifti_path)
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(f"{name}.labels.json")


def labels_json_payload(label_names: Mapping[int, str]) -> dict[str, str]:
    """The sidecar: label value (as text, JSON keys are strings) -> structure name, sorted."""
    return {str(int(value)): str(name) for value, name in sorted(label_names.items(), key=lambda kv: int(kv[0]))}


def _atomic_write(path: Path, write, *, overwrite: bool) -> Path:
    """The report's atomic writer (temp file beside ``path``, then a no-replace move)."""
    from napari_tghmoe.report import _atomic_write as report_atomic_write

    return report_atomic_write(path, write, overwrite=overwrite)


def _check_targets(paths: Iterable[Path], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise SegExportError(path, "file exists (choose another name or allow overwriting)")


def _check_labels(labels: np.ndarray, volume: CTVolume, path: Path) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise SegExportError(path, f"label map shape {labels.shape} is not the CT's grid {volume.shape}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        raise SegExportError(path, "label map must hold non-negative integers")
    return labels


def _compact_dtype(labels: np.ndarray) -> np.ndarray:
    top = int(labels.max()) if labels.size else 0
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32
    return labels.astype(dtype, copy=False)


# --------------------------------------------------------------------------------- NIfTI


def save_label_nifti(
    labels: np.ndarray,
    volume: CTVolume,
    path: str | Path,
    label_names: Mapping[int, str],
    *,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write the label map on ``volume``'s grid and affine plus its ``.labels.json``; return both.

    A path without ``.nii``/``.nii.gz`` gets ``.nii.gz``. Both targets are checked before
    either is written, so a refusal leaves nothing half-saved.
    """
    from napari_tghmoe.io import write_volume

    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        path = path.with_name(path.name + ".nii.gz")
    sidecar = labels_json_path(path)
    labels = _compact_dtype(_check_labels(labels, volume, path))
    _check_targets((path, sidecar), overwrite)
    label_volume = CTVolume(
        hu=labels,
        spacing=volume.spacing,
        origin=volume.origin,
        direction=volume.direction,
        modality="SEG",
        description=f"labels of {volume.description}".strip(),
    )
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"

    def write_image(tmp: Path) -> None:
        staged = tmp.with_name(tmp.name + suffix)  # SimpleITK picks the format by suffix
        try:
            write_volume(label_volume, staged)
            os.replace(staged, tmp)
        finally:
            if staged.exists():
                staged.unlink()

    def write_json(tmp: Path) -> None:
        tmp.write_text(json.dumps(labels_json_payload(label_names), indent=2) + "\n", encoding="utf-8")

    try:
        written = _atomic_write(path, write_image, overwrite=overwrite)
        written_json = _atomic_write(sidecar, write_json, overwrite=overwrite)
    except FileExistsError as err:
        raise SegExportError(getattr(err, "path", path), "file exists (choose another name or allow overwriting)") from None
    except OSError as err:
        raise SegExportError(path, err.strerror or str(err)) from None
    return written, written_json


# ----------------------------------------------------------------------------- DICOM SEG


def dicom_seg_unavailable_reason(volume: CTVolume | None) -> str | None:
    """Why a DICOM SEG cannot reference this CT's source series, or None when it can."""
    if volume is None:
        return "no CT volume"
    fmt = str(volume.metadata.get("source_format") or "")
    if not fmt.startswith("DICOM"):
        what = fmt or "an unknown format"
        return f"DICOM SEG needs the source DICOM series; this CT came from {what} (save as NIfTI instead)"
    if "multi-frame" in fmt:
        return "DICOM SEG export supports single-frame CT series; this CT is one enhanced multi-frame file"
    if not volume.source or not Path(volume.source).exists():
        return f"the source DICOM series is no longer at {volume.source}"
    return None


def source_datasets(volume: CTVolume) -> list[Any]:
    """Headers (no pixel data) of the CT's source DICOM series, as the report re-reads them."""
    from napari_tghmoe.report import _series_headers

    reason = dicom_seg_unavailable_reason(volume)
    if reason is not None:
        raise SegExportError(volume.source, reason)
    headers = _series_headers(volume.source, volume.series_uid)
    headers = [ds for ds in headers if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds]
    if not headers:
        raise SegExportError(volume.source, f"no images of series {volume.series_uid} found to reference")
    return headers


def labels_on_source_frames(labels: np.ndarray, volume: CTVolume, datasets: Sequence[Any]) -> np.ndarray:
    """The label map resampled (nearest voxel) onto each source image, in ``datasets`` order.

    The CTVolume is reoriented to LPS and may have been resampled; the source frames are
    where a DICOM SEG must put its pixels, so each frame's pixel centres are mapped back to
    voxel indices through the patient coordinates. Pixels outside the volume get 0.
    """
    labels = np.asarray(labels)
    inverse = np.linalg.inv(np.asarray(volume.direction, dtype=float) @ np.diag(volume.spacing))
    origin = np.asarray(volume.origin, dtype=float)
    shape = np.asarray(labels.shape)
    frames = []
    for ds in datasets:
        rows, columns = int(ds.Rows), int(ds.Columns)
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        row_cosine, column_cosine = orientation[:3], orientation[3:]  # along a row / down a column
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        start = inverse @ (position - origin)
        step_column = inverse @ (row_cosine * column_spacing)  # next column (index b)
        step_row = inverse @ (column_cosine * row_spacing)  # next row (index a)
        a = np.arange(rows, dtype=float)[:, None, None]
        b = np.arange(columns, dtype=float)[None, :, None]
        index = np.rint(start + a * step_row + b * step_column).astype(np.int64)  # (rows, columns, 3)
        inside = np.all((index >= 0) & (index < shape), axis=-1)
        frame = np.zeros((rows, columns), dtype=labels.dtype)
        k, j, i = (index[..., n][inside] for n in range(3))
        frame[inside] = labels[k, j, i]
        frames.append(frame)
    return np.stack(frames)


def _code(name: str):
    from pydicom.sr.codedict import codes

    return getattr(codes.SCT, name)


#: structure name -> (SCT property type in pydicom's codes, laterality or None)
_ANATOMY_CODES: dict[str, tuple[str, str | None]] = {
    "liver": ("Liver", None),
    "spleen": ("Spleen", None),
    "right kidney": ("Kidney", "Right"),
    "left kidney": ("Kidney", "Left"),
    "aorta": ("Aorta", None),
    "inferior vena cava": ("InferiorVenaCava", None),
    "pancreas": ("Pancreas", None),
    "stomach": ("Stomach", None),
    "stomach gas": ("Stomach", None),
    "gallbladder": ("Gallbladder", None),
    "esophagus": ("Esophagus", None),
    "right upper lobe": ("UpperLobeOfLung", "Right"),
    "right middle lobe": ("MiddleLobeOfRightLung", None),
    "right lower lobe": ("LowerLobeOfLung", "Right"),
    "left upper lobe": ("StructureOfUpperLobeOfLeftLung", None),
    "left lower lobe": ("LowerLobeOfLung", "Left"),
    "myocardium": ("Heart", None),
    "cardiac blood pool": ("Heart", None),
    "airway": ("AirwayStructure", None),
    "pulmonary vessels": ("BloodVessel", None),
    "rib": ("Rib", None),
    "cortical bone": ("Bone", None),
    "cancellous bone": ("Bone", None),
    "muscle": ("SkeletalMuscle", None),
    "subcutaneous fat": ("SubcutaneousTissue", None),
    "visceral fat": ("AdiposeTissue", None),
    "lymph node": ("LymphNode", None),
    "spinal canal": ("SpinalCord", None),
}


def segment_codes(name: str, *, finding: bool) -> tuple[Any, Any, Any | None]:
    """(category, property type, laterality modifier or None) as SCT codes from pydicom.

    Findings are "Morphologically Abnormal Structure" coded by their kind (nodule, cyst,
    effusion) or else "Lesion"; organs are "Anatomical Structure" with their own code where
    pydicom has one; anything else is a generic anatomical structure with its name as label.
    """
    lowered = name.lower()
    if finding or "effusion" in lowered:
        category = _code("MorphologicallyAbnormalStructure")
        for word, code in (("nodule", "Nodule"), ("cyst", "Cyst"), ("effusion", "PleuralEffusion"), ("mass", "Mass")):
            if word in lowered:
                return category, _code(code), None
        if "lymph node" in lowered:
            return category, _code("LymphNode"), None
        return category, _code("Lesion"), None
    type_name, side = _ANATOMY_CODES.get(lowered, ("AnatomicalStructure", None))
    return _code("AnatomicalStructure"), _code(type_name), _code(side) if side else None


def build_dicom_seg(
    labels: np.ndarray,
    volume: CTVolume,
    label_names: Mapping[int, str],
    *,
    model_name: str,
    model_version: str | None = None,
    finding_names: Iterable[str] = (),
    datasets: Sequence[Any] | None = None,
    include_identifiers: bool = False,
) -> Any:
    """A highdicom ``Segmentation`` (binary, one segment per structure present) on the source series.

    Segment numbers run 1..n over the label values present, in value order; each segment is
    labelled with the structure name, coded with SCT, drawn in the dock's colour, and
    identified as produced by ``model_name`` (AUTOMATIC, family Artificial Intelligence).
    """
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from napari_tghmoe import __version__
    from napari_tghmoe.segmentation_layers import structure_color

    if datasets is None:
        datasets = source_datasets(volume)
    path = volume.source
    labels = _check_labels(labels, volume, Path(path or "label map"))
    frames = labels_on_source_frames(labels, volume, datasets)
    present = [int(v) for v in np.unique(frames) if v != 0]
    if not present:
        raise SegExportError(path, "the label map is empty on the source images: nothing to export")
    segment_of = np.zeros(int(max(present)) + 1, dtype=np.uint16)
    for number, value in enumerate(present, start=1):
        segment_of[value] = number
    segment_array = segment_of[frames]

    algorithm = hd.AlgorithmIdentificationSequence(
        name=str(model_name)[:64] or "segmentation model",
        family=codes.cid7162.ArtificialIntelligence,
        version=str(model_version or __version__)[:64],
    )
    findings = set(finding_names)
    finding_order = sorted(findings)
    descriptions = []
    for number, value in enumerate(present, start=1):
        name = str(label_names.get(value, f"label {value}"))
        is_finding = name in findings
        category, property_type, side = segment_codes(name, finding=is_finding)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=category,
            segmented_property_type=property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid(),
            tracking_id=f"{name} (label {value})"[:64],
            display_color=hd.color.CIELabColor.from_rgb(
                *[int(round(c * 255)) for c in structure_color(
                    name, finding=is_finding, finding_index=finding_order.index(name) if is_finding else 0
                )[:3]]
            ),
        )
        if side is not None:
            description.SegmentedPropertyTypeModifierCodeSequence = [CodedConcept.from_code(side)]
        descriptions.append(description)

    seg = hd.seg.Segmentation(
        source_images=list(datasets),
        pixel_array=segment_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="napari-tghmoe",
        manufacturer_model_name=str(model_name)[:64] or "segmentation model",
        software_versions=f"napari-tghmoe {__version__}",
        device_serial_number="0",
        series_description=f"Segmentation ({model_name})"[:64],
        content_label="SEGMENTATION",
        content_description=f"{len(descriptions)} structures by {model_name}"[:64],
    )
    if not include_identifiers:
        for keyword in _IDENTIFYING_KEYWORDS:
            if keyword in seg:
                setattr(seg, keyword, "")
    return seg


def save_dicom_seg(
    labels: np.ndarray,
    volume: CTVolume,
    path: str | Path,
    label_names: Mapping[int, str],
    *,
    model_name: str,
    model_version: str | None = None,
    finding_names: Iterable[str] = (),
    include_identifiers: bool = False,
    overwrite: bool = False,
) -> Path:
    """Build the DICOM SEG (see :func:`build_dicom_seg`) and write it atomically to ``path``."""
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".dcm")
    _check_targets((path,), overwrite)
    try:
        seg = build_dicom_seg(
            labels,
            volume,
            label_names,
            model_name=model_name,
            model_version=model_version,
            finding_names=finding_names,
            include_identifiers=include_identifiers,
        )
    except SegExportError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as err:  # highdicom's checks of the sources
        raise SegExportError(volume.source, f"cannot build a DICOM SEG on the source series: {err}") from None

    def write(tmp: Path) -> None:
        seg.save_as(tmp, enforce_file_format=True)

    try:
        return _atomic_write(path, write, overwrite=overwrite)
    except FileExistsError:
        raise SegExportError(path, "file exists (choose another name or allow overwriting)") from None
    except OSError as err:
        raise SegExportError(path, err.strerror or str(err)) from None
