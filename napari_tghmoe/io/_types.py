"""The in-memory CT volume every part of the project passes around (no Qt, no torch).

Orientation convention (one for every file format):

* ``hu`` is indexed ``[k, j, i]`` = ``(z, y, x)``. Volumes are reoriented to the nearest
  *LPS* orientation: ``i`` (x, columns) runs towards the patient's Left, ``j`` (y, rows)
  towards Posterior, ``k`` (z, slices) towards Superior. An axial CT therefore shows slice
  0 at the feet, with the patient's right on the left of the screen, as radiologists read.
* ``spacing`` is ``(z, y, x)`` in millimetres, in array-axis order.
* ``origin`` is the patient (LPS, DICOM) position ``(x, y, z)`` in mm of voxel ``[0, 0, 0]``.
* ``direction`` is a 3x3 matrix whose *columns* are the LPS unit vectors of the array axes
  in array order ``(k, j, i)``, so the patient position of voxel ``(k, j, i)`` is
  ``origin + direction @ (spacing * (k, j, i))``. For a plain axial scan
  ``direction == [[0, 0, 1], [0, 1, 0], [1, 0, 0]]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Axial LPS direction matrix in the convention above (columns: k, j, i).
AXIAL_DIRECTION = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


class VolumeReadError(ValueError):
    """A file or folder could not be read as a CT volume.

    ``str(err)`` is one line naming the path and the reason, fit for a notification or a
    CLI error line.
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units with its geometry and a de-identified summary."""

    hu: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: AXIAL_DIRECTION.copy())
    modality: str = "CT"
    series_uid: str | None = None
    description: str = ""
    window: tuple[float, float] | None = None  # (centre, width) in HU, from the file
    source: str | None = None
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)  # de-identified allow-list only
    # DICOM references kept to let an export (e.g. a Structured Report) point back at the
    # study and series; UIDs only, never names or IDs.
    study_uid: str | None = None
    frame_of_reference_uid: str | None = None

    def __post_init__(self) -> None:
        self.hu = np.asarray(self.hu)
        if self.hu.ndim != 3:
            raise ValueError(f"CTVolume.hu must be 3D (z, y, x), got shape {self.hu.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.shape, self.spacing))  # type: ignore[return-value]

    def index_to_patient(self, index: tuple[float, float, float]) -> np.ndarray:
        """LPS position (x, y, z) in mm of a (k, j, i) voxel index."""
        return np.asarray(self.origin) + self.direction @ (np.asarray(self.spacing) * index)

    def napari_translate(self) -> tuple[float, float, float]:
        """World offset for a napari layer in array-axis order (z, y, x), in mm.

        napari layers are axis-aligned; we place voxel [0,0,0] at the origin projected on
        the array axes so overlays made from this volume line up exactly.
        """
        return tuple(float(v) for v in self.direction.T @ np.asarray(self.origin))  # type: ignore[return-value]

    def summary(self) -> dict[str, Any]:
        """Provenance safe to export: no identifiers."""
        return {
            "description": self.description,
            "modality": self.modality,
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing),
            "source_format": self.metadata.get("source_format"),
        }


@dataclass(frozen=True)
class SeriesInfo:
    """One image series found in a folder (what ``list_series`` returns)."""

    uid: str
    description: str
    modality: str
    slice_count: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str = "axial"  # axial / coronal / sagittal / oblique
    files: tuple[str, ...] = ()
