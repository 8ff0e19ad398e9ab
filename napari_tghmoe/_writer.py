"""npe2 writer: a CT image layer -> ``.nii.gz`` / ``.nii`` / ``.mha`` / ``.mhd`` / ``.nrrd``.

Geometry comes from the layer's ``CTVolume`` when it has one (origin and direction of the
source scan are kept), else from the layer's ``scale`` and ``translate`` (axial, LPS).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from napari_tghmoe.io._types import AXIAL_DIRECTION, CTVolume
from napari_tghmoe.layers import CT_VOLUME_KEY

WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def volume_from_layer_data(data: Any, meta: dict[str, Any]) -> CTVolume:
    """The CTVolume to write for one image layer's ``(data, meta)``."""
    array = np.asarray(data)
    if array.ndim != 3:
        raise ValueError(f"only 3D image layers can be written as a volume, got {array.ndim}D")
    source = (meta.get("metadata") or {}).get(CT_VOLUME_KEY)
    scale = tuple(float(s) for s in meta.get("scale", (1.0, 1.0, 1.0)))
    if isinstance(source, CTVolume):
        return dataclasses.replace(source, hu=array, spacing=scale, warnings=[])
    translate = np.asarray(meta.get("translate", (0.0, 0.0, 0.0)), dtype=float)
    # translate is (z, y, x) along the array axes; origin is LPS (x, y, z)
    origin = tuple(float(v) for v in AXIAL_DIRECTION @ translate)
    return CTVolume(
        hu=array,
        spacing=scale,
        origin=origin,
        description=str(meta.get("name", "")),
    )


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for image layers; returns the written path."""
    from napari_tghmoe.io._write import write_volume

    if not path.lower().endswith(WRITABLE_SUFFIXES):
        path = path + ".nii.gz"
    written = write_volume(volume_from_layer_data(data, meta), Path(path))
    return [str(written)]
