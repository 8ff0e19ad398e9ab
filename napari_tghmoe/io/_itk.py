"""NIfTI, MetaImage and NRRD through SimpleITK, into the same LPS convention as DICOM.

SimpleITK already converts NIfTI's RAS to DICOM's LPS patient frame; what remains is the
axis convention (ITK lists index axes i, j, k; we use k, j, i) and the reorientation to
the nearest LPS axes, shared with the DICOM reader. The header is read first so absurd
dimensions are refused before any allocation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_tghmoe.io._dicom import MAX_VOXELS
from napari_tghmoe.io._geometry import itk_to_array_direction, reorient_to_lps
from napari_tghmoe.io._types import CTVolume, VolumeReadError

#: File suffixes read by SimpleITK, with the format name written into metadata.
ITK_FORMATS = {
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
}


def itk_format(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, fmt in ITK_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file:line location; the useful part follows "Description:".
    for line in lines:
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def read_itk(path: Path, *, allow_2d: bool = False) -> CTVolume:
    import SimpleITK as sitk

    fmt = itk_format(path) or "ITK"
    if path.stat().st_size == 0:
        raise VolumeReadError(path, f"zero-byte file, not a {fmt} image")
    warnings: list[str] = []
    if fmt == "NIfTI":
        warnings.extend(nifti_geometry_warnings(path))
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's multi-line console warnings: ours say it
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeReadError(path, f"not a readable {fmt} file ({_first_line(exc)})") from exc

    dimension = reader.GetDimension()
    size = list(reader.GetSize())
    components = reader.GetNumberOfComponents()
    if components != 1:
        raise VolumeReadError(
            path, f"{components} values per voxel (colour or vector image), not a greyscale CT volume"
        )
    if dimension > 4 or dimension < 2:
        raise VolumeReadError(path, f"{dimension}D image; a CT volume is 3D")
    if dimension == 4:
        if size[3] > 1:
            warnings.append(f"4D image with {size[3]} volumes: loaded the first, the others are ignored")
        reader.SetExtractIndex([0, 0, 0, 0])
        reader.SetExtractSize([size[0], size[1], size[2], 0])
        size = size[:3]
    if dimension == 2 or size[2] == 1:
        if not allow_2d:
            raise VolumeReadError(
                path, f"2D image ({size[0]}x{size[1]}): a 3D volume is needed (or load with allow_2d=True)"
            )
    voxels = int(np.prod(np.asarray(size, dtype=object)))
    if voxels > MAX_VOXELS or any(s <= 0 for s in size):
        raise VolumeReadError(
            path, f"header dimensions {tuple(size)} would need an absurd allocation; refusing to read"
        )

    if fmt == "NIfTI":
        _check_nifti(path)

    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeReadError(path, f"cannot read the voxel data ({_first_line(exc)})") from exc

    spacing_ijk = image.GetSpacing()
    origin = image.GetOrigin()
    itk_direction = image.GetDirection()
    view = sitk.GetArrayViewFromImage(image)
    if image.GetDimension() == 2:
        view = view[None]
        spacing = (1.0, spacing_ijk[1], spacing_ijk[0])
        direction2 = np.asarray(itk_direction, dtype=float).reshape(2, 2)
        direction = np.eye(3)
        direction[:2, :2] = direction2
        direction = direction[:, [2, 1, 0]]
        origin = (origin[0], origin[1], 0.0)
    else:
        spacing = (spacing_ijk[2], spacing_ijk[1], spacing_ijk[0])
        direction = itk_to_array_direction(itk_direction, 3)

    if view.dtype.kind == "f":
        for index in range(view.shape[0]):
            if not np.all(np.isfinite(view[index])):
                raise VolumeReadError(path, f"NaN or infinite voxel values (slice {index})")
        target = np.float32
    elif view.dtype.kind in "iub":
        lo, hi = (int(view.min()), int(view.max())) if view.size else (0, 0)
        target = np.int16 if -32768 <= lo and hi <= 32767 else np.float32
    else:
        raise VolumeReadError(path, f"unsupported voxel type {view.dtype}")

    hu, spacing, origin, direction = reorient_to_lps(view, spacing, origin, direction, dtype=target)
    if np.shares_memory(hu, view):
        hu = hu.copy()  # the view dies with the SimpleITK image
    del view, image
    return CTVolume(
        hu=hu,
        spacing=spacing,
        origin=origin,
        direction=direction,
        modality="CT",
        description=_stem(path),
        source=str(path),
        warnings=warnings,
        metadata={"source_format": fmt, "number_of_slices": int(hu.shape[0])},
    )


def _check_nifti(path: Path) -> None:
    """What ITK's NIfTI reader lets through silently: truncated data and NaN/inf voxels.

    Measured here: SimpleITK 2.5 reads a NIfTI cut in half without an error, and returns
    NaN voxels as 0. nibabel reads the header (cheap) to know the expected data size; a
    gzip file is fully decompressed only when its trailer size disagrees.
    """
    import gzip
    import zlib

    import nibabel as nib

    try:
        with nib.imageglobals.LoggingOutputSuppressor():  # its header fixes are our warnings
            image = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad headers
        raise VolumeReadError(path, f"cannot read the NIfTI header ({type(exc).__name__}: {exc})") from exc
    header = image.header
    expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape(), dtype=np.int64)) * int(
        header.get_data_dtype().itemsize
    )
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as handle:
            handle.seek(-4, 2)
            trailer_size = int.from_bytes(handle.read(4), "little")
        if trailer_size != expected % 2**32:
            try:
                total = 0
                with gzip.open(path, "rb") as stream:
                    while chunk := stream.read(1 << 22):
                        total += len(chunk)
            except (EOFError, OSError, zlib.error) as exc:
                raise VolumeReadError(path, f"cannot read the voxel data: truncated or corrupt gzip ({exc})") from exc
            if total < expected:
                raise VolumeReadError(path, f"cannot read the voxel data: truncated, {total} of {expected} bytes")
    elif path.stat().st_size < expected:
        raise VolumeReadError(
            path, f"cannot read the voxel data: truncated file, {path.stat().st_size} of {expected} bytes"
        )
    if header.get_data_dtype().kind == "f":
        data = image.dataobj
        shape = header.get_data_shape()
        for index in range(shape[2] if len(shape) > 2 else 1):
            chunk = np.asanyarray(data[:, :, index] if len(shape) > 2 else data)
            if not np.all(np.isfinite(chunk)):
                raise VolumeReadError(path, f"NaN or infinite voxel values (slice {index})")


#: Degrees of shear between the axes of a NIfTI sform worth a warning.
_SHEAR_WARN_DEGREES = 0.1


def _raw_nifti_header(path: Path) -> Any:
    """The header as written (nibabel's ``load`` silently sets a zero pixdim to 1)."""
    import gzip
    import io

    import nibabel as nib

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            block = handle.read(540)
    except (OSError, EOFError) as exc:
        raise VolumeReadError(path, f"cannot read the NIfTI header ({exc})") from exc
    if len(block) < 348:
        raise VolumeReadError(path, f"not a NIfTI file: the header needs 348 bytes, the file holds {len(block)}")
    sizes = {int.from_bytes(block[:4], "little"), int.from_bytes(block[:4], "big")}
    header_class = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
    try:
        return header_class.from_fileobj(io.BytesIO(block), check=False)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad headers
        raise VolumeReadError(path, f"cannot read the NIfTI header ({type(exc).__name__}: {exc})") from exc


def nifti_geometry_warnings(path: Path) -> list[str]:
    """What ITK would change silently: a zero voxel size (-> 1 mm), a sheared sform (-> the qform).

    A sheared sform without a qform cannot be placed on napari's grid at all: refused.
    """
    header = _raw_nifti_header(path)
    warnings: list[str] = []
    dims = int(header["dim"][0])
    pixdim = [float(v) for v in header["pixdim"][1 : 1 + min(dims, 3)]]
    zero = [axis for axis, size in zip("xyz", pixdim) if not np.isfinite(size) or size == 0]
    if zero:
        warnings.append(
            f"voxel size along {', '.join(zero)} is {'zero' if all(np.isfinite(pixdim)) else 'not a number'} "
            "in the header: taken as 1 mm, so distances and sizes in mm are unknown"
        )
    if int(header["sform_code"]) > 0:
        matrix = np.asarray(header.get_sform(), dtype=float)[:3, :3]
        norms = np.linalg.norm(matrix, axis=0)
        if np.all(norms > 0):
            unit = matrix / norms
            cosines = np.abs(unit.T @ unit)[np.triu_indices(3, 1)]
            shear = float(np.degrees(np.arcsin(np.clip(np.max(cosines), 0.0, 1.0))))
            if shear > _SHEAR_WARN_DEGREES:
                if int(header["qform_code"]) <= 0:
                    raise VolumeReadError(
                        path,
                        f"sheared affine: the sform's axes are {shear:.1f} degrees off square and there is no "
                        "qform; a sheared grid cannot be shown without resampling (resample it first)",
                    )
                size = np.asarray(header["dim"][1:4], dtype=float) - 1
                corner_s = header.get_sform()[:3, :3] @ size
                corner_q = header.get_qform()[:3, :3] @ size
                off = float(np.linalg.norm(corner_s - corner_q))
                warnings.append(
                    f"sheared affine: the sform's axes are {shear:.1f} degrees off square; NOT used, the "
                    f"geometry comes from the qform (rigid), which places the far corner {off:.1f} mm away "
                    "from where the sform puts it"
                )
    return warnings


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(ITK_FORMATS, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
