"""Segment a CT volume with a Med3DInsight segmentation model (work in progress)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from napari_tghmoe.io import CTVolume
from napari_tghmoe.med3d.types import SegmentationResult


def segment_volume(
    volume: CTVolume,
    model_dir: str | Path | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SegmentationResult:
    """Label map + findings on ``volume``'s own grid (``model_dir=None``: resources/demo-seg-model)."""
    raise NotImplementedError("segment_volume is being built (issue 14)")
