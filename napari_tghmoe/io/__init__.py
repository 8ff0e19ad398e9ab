"""Read CT files into :class:`CTVolume` (no Qt, no torch).

See :mod:`napari_tghmoe.io._types` for the one orientation convention all readers follow.
"""

from napari_tghmoe.io._types import AXIAL_DIRECTION, CTVolume, SeriesInfo, VolumeReadError

__all__ = ["AXIAL_DIRECTION", "CTVolume", "SeriesInfo", "VolumeReadError"]
