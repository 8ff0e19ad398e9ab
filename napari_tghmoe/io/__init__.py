"""Read CT files into :class:`CTVolume` (no Qt, no torch).

See :mod:`napari_tghmoe.io._types` for the one orientation convention all readers follow.
Readers: DICOM folders and files (incl. enhanced multi-frame CT, compressed transfer
syntaxes), NIfTI, MetaImage and NRRD. Writers: a DICOM CT series, NIfTI/MHA/NRRD.
"""

from napari_tghmoe.io._load import list_series, load_volume
from napari_tghmoe.io._types import AXIAL_DIRECTION, CTVolume, SeriesInfo, VolumeReadError
from napari_tghmoe.io._write import write_dicom_series, write_nifti, write_volume

__all__ = [
    "AXIAL_DIRECTION",
    "CTVolume",
    "SeriesInfo",
    "VolumeReadError",
    "list_series",
    "load_volume",
    "write_dicom_series",
    "write_nifti",
    "write_volume",
]
