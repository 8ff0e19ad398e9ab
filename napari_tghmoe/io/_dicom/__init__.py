"""DICOM series -> CTVolume, the way 3D Slicer does it, in two passes.

Pass 1 (:mod:`.header`) reads every header with pixel data deferred and turns each image into a
frame; :mod:`.stack` groups frames into series and stacks and works out the geometry from the
headers alone; pass 2 (:mod:`.pixels`) preallocates the output once and decodes slices into it
in parallel. ``napari_tghmoe.io._load`` drives them through the names below.
"""

from __future__ import annotations

from napari_tghmoe.io._dicom.header import MAX_VOXELS, Scan, _Skipped, iter_candidate_files, read_frames, scan
from napari_tghmoe.io._dicom.pixels import stack_to_volume
from napari_tghmoe.io._dicom.stack import _stack_score, build_stacks, choose_stack, series_info

__all__ = [
    "MAX_VOXELS",
    "Scan",
    "_Skipped",
    "_stack_score",
    "build_stacks",
    "choose_stack",
    "iter_candidate_files",
    "read_frames",
    "scan",
    "series_info",
    "stack_to_volume",
]
