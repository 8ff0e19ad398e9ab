"""Med3DInsight: a 3D encoder pre-trained against the 2D MLLM through a Plane-Slice-Aware
Transformer (PSAT), fine-tuned for segmentation and per-volume finding classification.

Light on purpose (the napari dock imports it at start-up): torch, monai and POT are
imported inside the submodules' functions, not here.
"""

from __future__ import annotations

from napari_tghmoe.med3d.types import (
    SegFinding,
    SegmentationResult,
    SegmentationStopped,
    SegModelError,
)

__all__ = [
    "SegFinding",
    "SegModelError",
    "SegmentationResult",
    "SegmentationStopped",
    "segment_volume",
    "build_tiny_seg_model",
]


def segment_volume(volume, model_dir=None, *, progress=None, should_stop=None):
    """Segment a CT volume; see :func:`napari_tghmoe.med3d.segment.segment_volume`."""
    from napari_tghmoe.med3d.segment import segment_volume as _segment_volume

    return _segment_volume(volume, model_dir, progress=progress, should_stop=should_stop)


def build_tiny_seg_model(folder):
    """Write a tiny random-weight segmentation model folder (tests, dock development)."""
    from napari_tghmoe.med3d.encoder import build_tiny_seg_model as _build

    return _build(folder)
