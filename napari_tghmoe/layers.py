"""CTVolume -> napari layer data, and the CT window/level presets (pure Python, no Qt).

Kept free of Qt and of napari imports so readers, sample data, the CLI and tests can build
layer data without starting a GUI; the widgets in ``_widgets/`` only apply what is here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_tghmoe.ct_windows import NAMED_WINDOWS
from napari_tghmoe.io._types import CTVolume

#: Key under which every CT layer keeps its source volume (geometry, provenance, window).
CT_VOLUME_KEY = "ct_volume"


@dataclass(frozen=True)
class WindowPreset:
    """A display window in Hounsfield units, as a radiologist names it (width / level)."""

    name: str
    width: float
    level: float

    @property
    def contrast_limits(self) -> tuple[float, float]:
        return window_to_contrast_limits(self.level, self.width)


#: The standard CT windows (:mod:`napari_tghmoe.ct_windows`), in the order the dock shows them.
WINDOW_PRESETS: dict[str, WindowPreset] = {
    name: WindowPreset(name, width=width, level=centre) for name, (centre, width) in NAMED_WINDOWS.items()
}

#: Window used when the file carries none.
DEFAULT_PRESET = WINDOW_PRESETS["soft tissue"]

#: HU threshold of the bone iso-surface (cortical and dense trabecular bone).
BONE_ISO_THRESHOLD_HU = 300.0

#: Rendering modes the 3D view offers, mapped to napari ``Image.rendering`` values.
#: Label of the 3D depiction in which the CT is drawn as one plane at the cursor (the
#: reading layout's default, beside the bone surface); the other labels are volume renderings.
PLANE_AT_CURSOR = "axial plane at cursor"
RENDERING_MODES: dict[str, str] = {
    PLANE_AT_CURSOR: "plane",
    "attenuated MIP": "attenuated_mip",
    "MIP": "mip",
    "translucent": "translucent",
    "iso-surface (bone)": "iso",
    "average": "average",
}

#: Default 3D rendering of a CT layer: attenuated MIP shows the body surface, organs and
#: bone at once (denser tissue shines through) without a transfer-function editor.
DEFAULT_RENDERING = "attenuated_mip"
DEFAULT_ATTENUATION = 0.02


def window_to_contrast_limits(level: float, width: float) -> tuple[float, float]:
    """(level, width) in HU -> napari ``contrast_limits`` (low, high)."""
    width = max(float(width), 1.0)
    return (float(level) - width / 2.0, float(level) + width / 2.0)


def contrast_limits_to_window(contrast_limits: tuple[float, float]) -> tuple[float, float]:
    """napari ``contrast_limits`` (low, high) -> (level, width) in HU."""
    low, high = (float(v) for v in contrast_limits)
    return ((low + high) / 2.0, high - low)


def file_contrast_limits(volume: CTVolume) -> tuple[float, float] | None:
    """Contrast limits of the window stored in the file, or None when it has none."""
    if volume.window is None:
        return None
    centre, width = volume.window
    if not (np.isfinite(centre) and np.isfinite(width)) or width <= 0:
        return None
    return window_to_contrast_limits(centre, width)


def layer_name(volume: CTVolume) -> str:
    """Series description, else the file or folder name, else "CT"."""
    if volume.description and volume.description.strip():
        return volume.description.strip()
    if volume.source:
        name = Path(volume.source).name
        for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)] or name
        return name
    return volume.modality or "CT"


def ct_layer_kwargs(volume: CTVolume, name: str | None = None) -> dict[str, Any]:
    """Keyword arguments of ``Viewer.add_image`` that show ``volume`` correctly."""
    contrast_limits = file_contrast_limits(volume) or DEFAULT_PRESET.contrast_limits
    return {
        "name": name or layer_name(volume),
        "scale": tuple(float(s) for s in volume.spacing),
        "translate": volume.napari_translate(),
        "units": "mm",  # the scale is the voxel spacing in millimetres (the scale bar says so)
        "contrast_limits": contrast_limits,
        "colormap": "gray",
        "interpolation2d": "linear",
        "interpolation3d": "linear",
        "rendering": DEFAULT_RENDERING,
        "attenuation": DEFAULT_ATTENUATION,
        "iso_threshold": BONE_ISO_THRESHOLD_HU,
        "metadata": {CT_VOLUME_KEY: volume},
    }


def ct_layer_data(volume: CTVolume, name: str | None = None) -> tuple[Any, dict[str, Any], str]:
    """A napari layer data tuple ``(data, kwargs, "image")`` for one CT volume."""
    return (volume.hu, ct_layer_kwargs(volume, name), "image")


def ct_volume_of(layer: Any) -> CTVolume | None:
    """The CTVolume kept on a napari layer, if it came from this plugin."""
    metadata = getattr(layer, "metadata", None) or {}
    volume = metadata.get(CT_VOLUME_KEY)
    return volume if isinstance(volume, CTVolume) else None
