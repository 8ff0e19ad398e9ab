"""Geometry helpers shared by every reader and writer.

All readers describe what they found in the same terms as :class:`CTVolume` (array
``[k, j, i]``, spacing ``(k, j, i)``, direction columns in array order ``(k, j, i)``) and
then call :func:`reorient_to_lps`, so one scan gives one array whatever the file format.
"""

from __future__ import annotations

import itertools

import numpy as np

#: LPS axis an array axis must point to after reorientation: axis 0 (k) -> S (z, index 2),
#: axis 1 (j) -> P (y, index 1), axis 2 (i) -> L (x, index 0).
_TARGET_LPS_AXIS = (2, 1, 0)

#: Above this cosine a direction counts as aligned with a patient axis.
ALIGNED_COSINE = 0.99


def nearest_lps_permutation(direction: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """For each array axis: the patient axis (0=L/x, 1=P/y, 2=S/z) it is closest to, and the sign.

    Chooses the one-to-one assignment with the largest total alignment, so an oblique
    scan still maps every array axis to a distinct patient axis.
    """
    absolute = np.abs(direction)
    best = max(
        itertools.permutations(range(3)),
        key=lambda perm: sum(absolute[perm[axis], axis] for axis in range(3)),
    )
    signs = tuple(1 if direction[best[axis], axis] >= 0 else -1 for axis in range(3))
    return tuple(best), signs


def reorient_to_lps(
    array: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: np.ndarray,
    *,
    dtype: np.dtype | type | None = None,
) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float], np.ndarray]:
    """Flip/transpose ``array`` so that k->Superior, j->Posterior, i->Left (nearest axes).

    Returns ``(array, spacing, origin, direction)`` in the :mod:`._types` convention. The
    array is copied (and cast to ``dtype``) once, only when a flip, transpose or cast is
    needed: an axial LPS scan passes through untouched.
    """
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    patient_axis, signs = nearest_lps_permutation(direction)
    shape = array.shape

    # Flip the array axes that run against their patient axis; the new voxel [0,0,0] is
    # the old corner at the far end of each flipped axis.
    corner_index = np.array([shape[a] - 1 if signs[a] < 0 else 0 for a in range(3)], dtype=float)
    new_origin = np.asarray(origin, dtype=float) + direction @ (np.asarray(spacing) * corner_index)
    flipped = array[tuple(slice(None, None, -1) if s < 0 else slice(None) for s in signs)]
    flipped_direction = direction * np.asarray(signs, dtype=float)[None, :]

    # Order array axes as (S, P, L): new axis n is the old axis mapped to _TARGET_LPS_AXIS[n].
    order = tuple(patient_axis.index(_TARGET_LPS_AXIS[n]) for n in range(3))
    result = np.transpose(flipped, order)
    new_spacing = tuple(float(spacing[a]) for a in order)
    new_direction = flipped_direction[:, list(order)]

    target_dtype = np.dtype(dtype) if dtype is not None else result.dtype
    needs_copy = (
        order != (0, 1, 2)
        or any(s < 0 for s in signs)
        or result.dtype != target_dtype
        or not result.flags.c_contiguous
    )
    if needs_copy:
        result = np.ascontiguousarray(result, dtype=target_dtype)
    return result, new_spacing, tuple(float(v) for v in new_origin), new_direction  # type: ignore[return-value]


def orientation_name(direction: np.ndarray) -> str:
    """``axial``/``coronal``/``sagittal`` from the slice normal (k column), else ``oblique``."""
    normal = np.asarray(direction, dtype=float).reshape(3, 3)[:, 0]
    normal = normal / (np.linalg.norm(normal) or 1.0)
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < ALIGNED_COSINE:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def itk_to_array_direction(itk_direction: tuple[float, ...], dimension: int = 3) -> np.ndarray:
    """ITK's row-major direction (columns = index axes i, j, k) -> our columns (k, j, i)."""
    matrix = np.asarray(itk_direction, dtype=float).reshape(dimension, dimension)[:3, :3]
    return matrix[:, [2, 1, 0]]


def array_to_itk_direction(direction: np.ndarray) -> tuple[float, ...]:
    """Our direction (columns k, j, i) -> ITK's row-major tuple (columns i, j, k)."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)[:, [2, 1, 0]]
    return tuple(float(v) for v in matrix.flatten())
