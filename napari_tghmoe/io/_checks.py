"""Checks every reader shares: what a path really is, and whether the values can be HU.

They turn what archives hold (FIFOs in a folder, a [0, 1] float export, a huge rescale slope,
an oblique acquisition, an MR series) into one-line reasons or warnings for the user, so no
reader hangs on a pipe and no volume passes as CT when it is not.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

#: HU a CT can hold after rescale (air -1024 .. the 12-bit top 3071) and how far outside them a
#: bulk of voxels may lie before the values are not HU: padding (-2000, -3024) and metal
#: (extended scales) stay inside the slack.
HU_RANGE = (-1024.0, 3071.0)
_HU_SLACK_LOW = -3100.0
_HU_SLACK_HIGH = 30000.0
#: Degrees between an array axis and its nearest patient axis worth a warning.
OBLIQUE_WARN_DEGREES = 1.0
#: Voxels looked at for the value checks (a stride through the volume: fast on 500 slices).
_SAMPLE_VOXELS = 2_000_000


def special_file_kind(path: str | Path) -> str | None:
    """``"named pipe (FIFO)"``, ``"socket"``, ... for what is not a regular file, else None.

    Uses ``os.stat`` only: opening a FIFO would block until a writer appears.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return None


def not_a_file_reason(kind: str) -> str:
    return f"a {kind}, not a file: it holds no image (reading it could wait forever)"


def value_warnings(hu: np.ndarray) -> list[str]:
    """Warnings for values that cannot be Hounsfield units ([0, 1] floats, far outside HU)."""
    from napari_tghmoe.model.preprocess import INTENSITY_UNIT, volume_intensity

    if hu.size == 0:
        return []
    intensity = volume_intensity(hu)  # the model's own guess: one rule for reader and engine
    if intensity.kind == INTENSITY_UNIT:
        return [
            f"values are not Hounsfield units: {intensity.reason} (a normalised or display image?); "
            "windows and the model's HU input will be wrong"
        ]
    stride = max(1, int(round((hu.size / _SAMPLE_VOXELS) ** (1 / 3))))
    sample = np.asarray(hu[::stride, ::stride, ::stride], dtype=np.float64)
    low, median, high = np.percentile(sample, [1, 50, 99])
    if high > _HU_SLACK_HIGH or low < -_HU_SLACK_HIGH or median < _HU_SLACK_LOW or median > HU_RANGE[1]:
        return [
            f"values are far outside the CT range {HU_RANGE[0]:.0f}..{HU_RANGE[1]:.0f} HU "
            f"(1st/50th/99th percentile {low:.4g} / {median:.4g} / {high:.4g}): check the rescale slope "
            "and intercept; this does not look like CT in Hounsfield units"
        ]
    return []


def oblique_warning(direction: np.ndarray) -> str | None:
    """Warn when the array axes are tilted from the patient axes (napari shows them axis-aligned)."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    cosines = np.clip(np.max(np.abs(direction), axis=0), -1.0, 1.0)
    worst = float(np.degrees(np.arccos(np.min(cosines))))
    if worst <= OBLIQUE_WARN_DEGREES:
        return None
    return (
        f"oblique acquisition: the image axes are {worst:.1f} degrees from the patient axes; shown on the "
        "image grid (labels such as axial/coronal are the nearest plane), positions keep the true geometry"
    )


def modality_problem(volume: Any) -> str | None:
    """Why the model must not read this volume as CT (its modality is another), else None."""
    modality = str(getattr(volume, "modality", "CT") or "CT").upper()
    if modality == "CT":
        return None
    return f"modality is {modality}, not CT: its values are not Hounsfield units and the model reads CT only"
