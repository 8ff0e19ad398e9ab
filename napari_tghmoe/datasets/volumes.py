"""A sample's volume, read when it is needed (by collation or evaluation, in DataLoader workers):
until then a dataset of thousands of scans is a list of paths and costs no memory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_tghmoe.datasets.m3d import M3D_NOMINAL_SPACING, read_m3d_npy
from napari_tghmoe.datasets.phantom import read_phantom_cache
from napari_tghmoe.datasets.samples import Sample
from napari_tghmoe.io import CTVolume, VolumeReadError
from napari_tghmoe.model.preprocess import INTENSITY_HU, INTENSITY_UNIT, intensity_kind, volume_intensity


def load_sample_volume(sample: Sample) -> CTVolume:
    """The sample's volume as a ``CTVolume`` (reading its file if it is a path), its intensity kind
    in ``metadata["intensity"]``: the sample's ``meta["intensity"]``, "unit" for an M3D ``.npy``,
    "hu" for a phantom; left unset (guessed from the values by the preprocessing) otherwise.
    Values are never converted here: an M3D volume stays in [0, 1]."""
    volume = sample.volume
    meta = sample.meta
    spacing = tuple(meta.get("spacing") or (1.0, 1.0, 1.0))
    declared = intensity_kind(meta["intensity"]) if meta.get("intensity") else None
    if isinstance(volume, CTVolume):
        return volume
    if hasattr(volume, "detach"):  # a torch tensor
        volume = volume.detach().cpu().numpy()
    if isinstance(volume, np.ndarray):
        array = volume[0] if volume.ndim == 4 and volume.shape[0] == 1 else volume
        return CTVolume(hu=array, spacing=spacing, metadata={"intensity": declared} if declared else {})
    if not isinstance(volume, (str, Path)):
        raise TypeError(f"sample volume must be a CTVolume, array, tensor or path, got {type(volume).__name__}")
    path = Path(volume)
    if not path.exists():
        raise VolumeReadError(path, "file not found")
    name = path.name.lower()
    if name.endswith(".npy"):
        array = read_m3d_npy(path)
        return CTVolume(
            hu=array,
            spacing=tuple(meta.get("spacing") or M3D_NOMINAL_SPACING),
            source=str(path),
            metadata={"source_format": "M3D npy", "intensity": declared or INTENSITY_UNIT},
        )
    if name.endswith(".npz"):
        volume = read_phantom_cache(path).volume
        volume.source = volume.source or str(path)  # names the scan (e.g. its evidence cache)
        return volume
    from napari_tghmoe.io import load_volume

    ct = load_volume(path)
    rescale = meta.get("rescale")
    if rescale and float(np.min(ct.hu)) >= 0:  # stored without the DICOM rescale (CT-RATE)
        slope, intercept = rescale
        ct.hu = ct.hu.astype(np.float32) * float(slope) + float(intercept)
    if declared:
        ct.metadata["intensity"] = declared
    return ct


def samples_intensity(samples: Sequence[Sample]) -> str:
    """The intensity kind most training samples hold (ties: "hu"): what a model trained on them
    is trained on (``config.input_intensity``); the minority is converted to it by the
    preprocessing, in training as at inference."""
    counts = {INTENSITY_HU: 0, INTENSITY_UNIT: 0}
    for sample in samples:
        if sample.meta.get("intensity"):
            kind = intensity_kind(sample.meta["intensity"])
        elif isinstance(sample.volume, CTVolume):
            kind = volume_intensity(sample.volume).kind
        elif isinstance(sample.volume, (str, Path)) and str(sample.volume).lower().endswith(".npy"):
            kind = INTENSITY_UNIT
        else:
            kind = INTENSITY_HU
        counts[kind] += 1
    return INTENSITY_UNIT if counts[INTENSITY_UNIT] > counts[INTENSITY_HU] else INTENSITY_HU
