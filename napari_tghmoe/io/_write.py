"""Write a CTVolume as a DICOM CT series or as a NIfTI/MetaImage/NRRD file.

Used by tests, the phantom and users who want to take a volume to another tool. The
DICOM writer produces CT Image Storage files (one per slice) the way scanners do: 16-bit
stored values with RescaleIntercept, positions and orientation from the volume's
geometry, and fresh UIDs. Everything written reads back through ``load_volume`` to the
same HU, spacing and direction.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from napari_tghmoe.io._geometry import array_to_itk_direction
from napari_tghmoe.io._itk import itk_format
from napari_tghmoe.io._metadata import ALLOWED_DICOM_KEYWORDS
from napari_tghmoe.io._types import CTVolume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

#: Metadata keys written back as DICOM attributes (reverse of the reader's allow-list).
_WRITABLE = {key: keyword for keyword, key in ALLOWED_DICOM_KEYWORDS.items() if keyword not in (
    "Modality", "SeriesDescription", "SliceThickness", "ImageType", "SOPClassUID")}


def _ds(value: float) -> str:
    """A DS string (max 16 characters) that keeps enough precision."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.8g}"
    return text


def _storage(hu: np.ndarray, unsigned: bool, intercept: float) -> tuple[type, int]:
    """Stored dtype and PixelRepresentation for stored = HU - intercept; raises if out of range."""
    limits = (0, 65535) if unsigned else (-32768, 32767)
    dtype = np.uint16 if unsigned else np.int16
    lo, hi = float(np.min(hu)), float(np.max(hu))
    if lo - intercept < limits[0] or hi - intercept > limits[1]:
        raise ValueError(
            f"HU range [{lo}, {hi}] does not fit {np.dtype(dtype).name} with intercept {intercept}"
        )
    return dtype, 0 if unsigned else 1


def write_dicom_series(
    volume: CTVolume,
    folder: str | Path,
    *,
    shuffle_names: bool = False,
    series_description: str | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_name: str = "Phantom^Anonymous",
    patient_id: str = "PHANTOM",
    series_number: int = 1,
    unsigned: bool = False,
    rescale_intercept: float = -1024.0,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    transfer_syntax: str | None = None,
    extra_attributes: dict[str, Any] | None = None,
    seed: int = 0,
    name_prefix: str = "",
) -> list[Path]:
    """Write one CT Image Storage file per slice into ``folder``; return the paths (slice order).

    ``shuffle_names`` gives files random names unrelated to slice order (tests that a
    reader sorts by position). ``unsigned`` stores uint16 with ``rescale_intercept`` (as
    many scanners do); otherwise int16. ``transfer_syntax`` (a UID such as
    ``pydicom.uid.RLELossless`` or ``JPEGLosslessSV1``) compresses the pixel data.
    ``extra_attributes`` (keyword -> value) are set on every file, e.g. to test that a
    reader never leaks identifying tags.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hu = np.asarray(volume.hu)
    dtype, pixel_representation = _storage(hu, unsigned, rescale_intercept)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or volume.study_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or volume.frame_of_reference_uid or generate_uid()
    description = series_description if series_description is not None else (volume.description or "CT")
    direction = np.asarray(volume.direction, dtype=float)
    row_cosine, column_cosine = direction[:, 2], direction[:, 1]
    orientation = [_ds(v) for v in (*row_cosine, *column_cosine)]
    n_slices, rows, columns = hu.shape
    names = [f"{name_prefix}slice_{k:04d}.dcm" for k in range(n_slices)]
    if shuffle_names:
        rng = random.Random(seed)
        order = list(range(n_slices))
        rng.shuffle(order)
        names = [f"{name_prefix}{rng.getrandbits(40):010x}" for _ in order]
    metadata = volume.metadata or {}
    paths = []
    for k in range(n_slices):
        position = volume.index_to_patient((k, 0, 0))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.ImageType = list(image_type)
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.StudyDate = ds.SeriesDate = ""
        ds.StudyTime = ds.SeriesTime = ""
        ds.StudyID = ""
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = str(metadata.get("manufacturer", "napari-tghmoe"))
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.KVP = _ds(float(metadata["kvp"])) if "kvp" in metadata else ""
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = orientation
        ds.SliceLocation = _ds(float(position @ direction[:, 0]))
        ds.SliceThickness = _ds(float(metadata.get("slice_thickness_mm", volume.spacing[0])))
        ds.PixelSpacing = [_ds(volume.spacing[1]), _ds(volume.spacing[2])]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_representation
        ds.RescaleIntercept = _ds(rescale_intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        if volume.window is not None:
            ds.WindowCenter = _ds(volume.window[0])
            ds.WindowWidth = _ds(volume.window[1])
        for key, keyword in _WRITABLE.items():
            if key in metadata and keyword not in ("Manufacturer", "KVP") and keyword in pydicom.datadict.keyword_dict:
                value = metadata[key]
                try:
                    setattr(ds, keyword, value if not isinstance(value, float) else _ds(value))
                except (TypeError, ValueError):
                    pass
        for keyword, value in (extra_attributes or {}).items():
            setattr(ds, keyword, value)
        stored = np.rint(np.asarray(hu[k], dtype=np.float64) - rescale_intercept).astype(dtype)
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        if transfer_syntax is not None and transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, stored)
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_volume(volume: CTVolume, path: str | Path) -> Path:
    """Write ``.nii``/``.nii.gz``/``.mha``/``.mhd``/``.nrrd``/``.nhdr`` via SimpleITK."""
    import SimpleITK as sitk

    path = Path(path)
    if itk_format(path) is None:
        raise ValueError(f"{path}: unknown volume format; use .nii, .nii.gz, .mha, .mhd, .nrrd or .nhdr")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.hu))
    image.SetSpacing(tuple(float(s) for s in volume.spacing[::-1]))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(array_to_itk_direction(volume.direction))
    compress = path.name.lower().endswith((".gz", ".mha", ".nrrd"))
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def write_nifti(volume: CTVolume, path: str | Path) -> Path:
    """Write a NIfTI file (``.nii`` or ``.nii.gz``; ``.nii.gz`` is added if no suffix fits)."""
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        path = path.with_name(path.name + ".nii.gz")
    return write_volume(volume, path)
