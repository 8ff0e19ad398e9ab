"""Synthetic CT with known findings, a consistent report and closed VQA items.

No CT ships offline, yet training, evaluation, tests and the napari sample data need
scans with ground truth. :func:`make_phantom` builds one virtual patient per seed (body
wall, lungs with lobes and vessels, heart, aorta, airways, liver, spleen, kidneys,
pancreas, bowel, spine and ribs, in plausible Hounsfield units that follow the contrast
phase), places 0-3 findings where their location words are true, and writes the report
and the VQA items from that ground truth.

Array convention as in :mod:`napari_tghmoe.io`: ``hu[z, y, x]``, z towards superior, y
towards posterior, x towards the patient's LEFT (so patient right is at small x index).
That is the default (``plane="axial"``). With ``plane=None`` the plane is drawn from the seed
(:data:`PLANES`, 1/4 each, as the training and evaluation data do): the same patient is then
stored as coronal, sagittal or oblique slices, ``volume.direction`` says how, and the label
map, lesion map and finding centres follow the stored order. M3D stores each scan in the plane
it was shown in, and its "plane" questions ask which; here too the plane is only in the image.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from napari_tghmoe.ct_windows import SOFT_TISSUE
from napari_tghmoe.io import CTVolume
from napari_tghmoe.phantom._anatomy import (
    REGION_FOV_MM,
    REGION_Z_WINDOW,
    Canvas,
    draw_anatomy,
    hu_lut,
    organ_hu,
    paint_anatomy,
)
from napari_tghmoe.phantom._findings import place_findings
from napari_tghmoe.phantom._text import extract_findings, finding_recall_precision, make_vqa, write_report
from napari_tghmoe.phantom._types import (
    FINDING_KINDS,
    FINDING_SENTENCE,
    KIND_LOCATIONS,
    LABEL_NAMES,
    LABEL_ORGAN,
    PHASES,
    PLANES,
    QTYPES,
    REGIONS,
    Finding,
    Phantom,
    VQAItem,
)

__all__ = [
    "FINDING_KINDS",
    "FINDING_SENTENCE",
    "KIND_LOCATIONS",
    "LABEL_NAMES",
    "LABEL_ORGAN",
    "PHASES",
    "PLANES",
    "QTYPES",
    "REGIONS",
    "DEFAULT_SPACING",
    "Finding",
    "Phantom",
    "VQAItem",
    "acquisition",
    "default_shape",
    "extract_findings",
    "finding_recall_precision",
    "make_phantom",
    "make_phantom_dataset",
    "organ_hu",
    "write_dicom_series",
    "write_nifti",
]

#: 5 mm axial slices with 0.75 mm pixels, as a routine clinical reconstruction.
DEFAULT_SPACING: tuple[float, float, float] = (5.0, 0.75, 0.75)
#: Image noise (HU, standard deviation) in uniform tissue after the blur.
NOISE_HU = 12.0
#: In-plane point-spread (Gaussian sigma, mm). Through-plane, 5 mm slices are point
#: samples of the shapes: their stair-step edges are the partial-volume look of thick slices.
PSF_SIGMA_MM = 0.6


def default_shape(region: str = "chest", spacing: Sequence[float] = DEFAULT_SPACING) -> tuple[int, int, int]:
    """Smallest grid at ``spacing`` that holds the region's field of view (the body fits)."""
    _check_region(region)
    return tuple(int(np.ceil(f / s - 1e-6)) for f, s in zip(REGION_FOV_MM[region], spacing))  # type: ignore[return-value]


def _check_region(region: str) -> None:
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")


def _grid(region: str, shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Fill in whichever of shape / spacing is missing so that the body fits the grid."""
    fov = REGION_FOV_MM[region]
    if shape is None and spacing is None:
        spacing = DEFAULT_SPACING
    if shape is None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing}")
        shape = default_shape(region, spacing)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be three integers >= 2 (z, y, x), got {shape}")
    if spacing is None:
        in_plane = max(fov[1] / shape[1], fov[2] / shape[2])
        spacing = (fov[0] / shape[0], in_plane, in_plane)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing}")
    return shape, spacing  # type: ignore[return-value]


def _uid(*parts: object) -> str:
    """A deterministic DICOM UID under the UUID-derived root 2.25 (no registry needed)."""
    digest = hashlib.sha256("/".join(map(str, ("napari-tghmoe-phantom",) + parts)).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:15], "big"))


def _kernel_noise_gain(sigma: float) -> float:
    """How much a (scipy, truncate=4) Gaussian of ``sigma`` voxels scales white noise std."""
    if sigma <= 0:
        return 1.0
    radius = int(4.0 * sigma + 0.5)
    t = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w /= w.sum()
    return float(np.sqrt((w**2).sum()))


def _render(hu: np.ndarray, spacing, rng: np.random.Generator) -> np.ndarray:
    """In-plane blur (scanner point-spread, partial volume at edges) over correlated
    quantum noise, then int16 as a scanner writes. Works in place on ``hu``."""
    from scipy import ndimage

    sigma_yx = (PSF_SIGMA_MM / spacing[1], PSF_SIGMA_MM / spacing[2])
    gain = _kernel_noise_gain(sigma_yx[0]) * _kernel_noise_gain(sigma_yx[1])
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise *= np.float32(NOISE_HU / gain)
    hu += noise
    del noise
    for axis, sigma in zip((1, 2), sigma_yx):
        ndimage.gaussian_filter1d(hu, sigma, axis=axis, output=hu, mode="nearest")
    np.clip(hu, -1024, 3071, out=hu)
    np.rint(hu, out=hu)
    return hu.astype(np.int16)


#: Tilt (degrees, either sign) of an oblique phantom's slices from axial, about the left-right axis.
OBLIQUE_TILT_DEG = (20.0, 35.0)
#: Direction columns (slice, row, column) in LPS of the orthogonal planes, as DICOM stores them:
#: rows and columns as a radiologist reads the plane (coronal/sagittal: head at the top), the
#: slice axis their cross product.
_PLANE_DIRECTIONS = {
    "axial": ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),
    "coronal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0)),
    "sagittal": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
}


def acquisition(seed: int) -> dict[str, object]:
    """What the seed draws for the acquisition, without building the phantom: ``plane`` (one of
    :data:`PLANES`, 1/4 each), ``tilt_deg`` (of an oblique plane) and ``delayed`` (the case is
    scanned in the delayed phase, probability 1/4; otherwise the phase is one of the other three,
    as drawn before the delayed phase existed). Its own random stream: anatomy, findings and
    noise of a seed do not depend on it."""
    stream = np.random.default_rng(seed).spawn(6)[5]
    delayed = bool(stream.random() < 0.25)
    plane = PLANES[int(stream.integers(len(PLANES)))]
    tilt = float(stream.uniform(*OBLIQUE_TILT_DEG)) * (1.0 if stream.random() < 0.5 else -1.0)
    return {"plane": plane, "tilt_deg": tilt, "delayed": delayed}


def make_phantom(
    seed: int,
    region: str = "chest",
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    phase: str | None = None,
    findings: bool = True,
    plane: str | None = "axial",
) -> Phantom:
    """A synthetic CT of ``region`` with 0-3 known findings, its report and VQA items.

    ``shape``/``spacing`` are (z, y, x). Give neither for a clinical-like scan (5 mm
    slices, 0.75 mm pixels, field of view cropped to the body); give one and the other is
    chosen so the whole body fits; give both and the body is cropped if it does not fit.
    ``phase`` is one of :data:`PHASES` (default: drawn from the seed, 1/4 each). The same
    arguments always give the same phantom. ``findings=False`` renders the same case without
    its findings (same anatomy, phase and noise): the lesion-free twin that detection
    experiments compare against. ``plane``: the plane the slices are stored in (one of
    :data:`PLANES`; None: drawn from the seed, see :func:`acquisition`); ``shape`` and
    ``spacing`` always describe the patient's (z, y, x) grid, which other planes reorder
    (coronal, sagittal) or resample (oblique).
    """
    _check_region(region)
    if phase is not None and phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES} or None, got {phase!r}")
    if plane is not None and plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES} or None, got {plane!r}")
    shape, spacing = _grid(region, shape, spacing)
    root = np.random.default_rng(seed)
    # Independent streams: the case (phase, anatomy, findings, words) does not depend on
    # the grid, only the voxels do. A sixth stream is the acquisition (see acquisition()).
    rng_case, rng_anatomy, rng_findings, rng_noise, rng_text = root.spawn(5)
    drawn = acquisition(seed)
    drawn_phase = "delayed" if drawn["delayed"] else PHASES[int(rng_case.integers(3))]
    phase = phase or drawn_phase
    plane = plane or str(drawn["plane"])
    shift_xyz = rng_case.uniform(-5.0, 5.0, 3) * np.array([1.0, 1.0, 2.0])
    anatomy = draw_anatomy(rng_anatomy)

    nz, ny, nx = shape
    sz, sy, sx = spacing
    z_centre = float(np.mean(REGION_Z_WINDOW[region])) + shift_xyz[2]
    cv = Canvas(
        z=(z_centre + (np.arange(nz) - (nz - 1) / 2.0) * sz),
        y=(shift_xyz[1] + (np.arange(ny) - (ny - 1) / 2.0) * sy),
        x=(shift_xyz[0] + (np.arange(nx) - (nx - 1) / 2.0) * sx),
    )
    paint_anatomy(cv, anatomy, rng_anatomy)

    hu = hu_lut(phase)[cv.labels]
    _lung_texture(cv, hu, anatomy)
    lesions = np.zeros(cv.labels.shape, dtype=np.uint8)
    findings = place_findings(cv, anatomy, hu, lesions, region, phase, rng_findings) if findings else []
    stored = _store_in_plane(cv, hu, lesions, findings, plane, float(drawn["tilt_deg"]))
    hu_int = _render(stored.hu, stored.spacing, rng_noise)
    findings = stored.findings

    report = write_report(region, phase, stored.spacing[0], findings, rng_text, plane=plane)
    vqa = make_vqa(region, phase, findings, rng_text, plane=plane)
    description = f"Phantom {region} CT, {phase}" if plane == "axial" else f"Phantom {region} CT, {plane}, {phase}"
    volume = CTVolume(
        hu=hu_int,
        spacing=stored.spacing,
        origin=stored.origin,
        direction=stored.direction,
        modality="CT",
        series_uid=_uid(seed, region, shape, spacing, phase, "series") if plane == "axial" else _uid(seed, region, shape, spacing, phase, plane, "series"),
        study_uid=_uid(seed, region, "study"),
        frame_of_reference_uid=_uid(seed, region, "frame"),
        description=description,
        window=SOFT_TISSUE,
        source=f"napari_tghmoe.phantom(seed={seed}, region={region!r})",
        metadata={
            "source_format": "phantom",
            "modality": "CT",
            "body_part": region.upper(),
            "series_description": description,
            "slice_thickness_mm": stored.spacing[0],
            "acquisition_plane": plane,
            "kvp": 120,
            "convolution_kernel": "STANDARD",
            "manufacturer_model": "napari-tghmoe phantom",
            "contrast_agent": "none" if phase == "non-contrast" else "iodinated contrast",
            "contrast_phase": phase,
            "patient_position": "HFS",
        },
    )
    return Phantom(
        volume=volume,
        findings=findings,
        report=report,
        vqa=vqa,
        region=region,
        phase=phase,
        seed=int(seed),
        labels=stored.labels,
        label_names=dict(LABEL_NAMES),
        lesions=stored.lesions,
        info={"anatomy": anatomy, "aorta_hu": organ_hu("aorta", phase), "plane": plane, "tilt_deg": stored.tilt_deg},
        plane=plane,
    )


@dataclass
class _Stored:
    """The painted patient grid as stored in its acquisition plane."""

    hu: np.ndarray
    labels: np.ndarray
    lesions: np.ndarray
    findings: list[Finding]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    tilt_deg: float | None


def _store_in_plane(cv: Canvas, hu: np.ndarray, lesions: np.ndarray, findings: list[Finding], plane: str, tilt_deg: float) -> _Stored:
    """Reorder (coronal, sagittal) or resample (oblique) the patient (z, y, x) grid into the
    stored slice order, with the geometry that says so; finding centres follow.

    Orthogonal planes are exact transposes and flips. The oblique plane turns the axial one
    about the left-right axis by ``tilt_deg``: scipy's ``affine_transform`` resamples HU
    (linear) and labels and lesions (nearest) on a grid of the same spacings that holds the whole
    turned field of view (nothing is cut off), air outside it.
    """
    spacing_zyx = np.asarray(cv.spacing, dtype=float)
    first_lps = np.array([cv.x[0], cv.y[0], cv.z[0]], dtype=float)
    if plane in _PLANE_DIRECTIONS:
        direction = np.array(_PLANE_DIRECTIONS[plane], dtype=float).T  # columns: slice, row, column
        # stored axis n runs along LPS axis a_n (0 x, 1 y, 2 z) = patient array axis 2 - a_n
        lps_axis = [int(np.argmax(np.abs(direction[:, n]))) for n in range(3)]
        signs = [float(np.sign(direction[lps_axis[n], n])) for n in range(3)]
        order = [2 - a for a in lps_axis]
        flips = tuple(slice(None, None, -1) if sign < 0 else slice(None) for sign in signs)

        def reorder(array: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(np.transpose(array, order)[flips])

        shape_zyx = hu.shape
        corner = [shape_zyx[order[n]] - 1 if signs[n] < 0 else 0 for n in range(3)]  # stored [0,0,0] in patient axes
        patient_index = np.zeros(3)
        for n in range(3):
            patient_index[order[n]] = corner[n]
        origin = tuple(float(v) for v in first_lps + (spacing_zyx * patient_index)[::-1])
        moved = []
        for f in findings:
            centre = [f.center_voxel[order[n]] if signs[n] > 0 else shape_zyx[order[n]] - 1 - f.center_voxel[order[n]] for n in range(3)]
            moved.append(dataclasses.replace(f, center_voxel=tuple(int(c) for c in centre)))
        return _Stored(
            hu=reorder(hu),
            labels=reorder(cv.labels),
            lesions=reorder(lesions),
            findings=moved,
            spacing=tuple(float(spacing_zyx[o]) for o in order),  # type: ignore[arg-type]
            origin=origin,  # type: ignore[arg-type]
            direction=direction,
            tilt_deg=None,
        )
    return _store_oblique(cv, hu, lesions, findings, tilt_deg)


def _store_oblique(cv: Canvas, hu: np.ndarray, lesions: np.ndarray, findings: list[Finding], tilt_deg: float) -> _Stored:
    from scipy import ndimage

    c, s = np.cos(np.radians(tilt_deg)), np.sin(np.radians(tilt_deg))
    # Axial turned about LPS x: slice normal (0, -s, c), rows (0, c, s), columns along x.
    direction = np.array([[0.0, 0.0, 1.0], [-s, c, 0.0], [c, s, 0.0]])
    spacing = np.asarray(cv.spacing, dtype=float)  # slice, row, column spacings as the axial ones
    extent_zyx = np.asarray(hu.shape, dtype=float) * spacing
    extent = np.array(
        [abs(c) * extent_zyx[0] + abs(s) * extent_zyx[1], abs(s) * extent_zyx[0] + abs(c) * extent_zyx[1], extent_zyx[2]]
    )
    shape = tuple(int(np.ceil(e / d - 1e-6)) for e, d in zip(extent, spacing))
    centre_lps = np.array([(cv.x[0] + cv.x[-1]) / 2, (cv.y[0] + cv.y[-1]) / 2, (cv.z[0] + cv.z[-1]) / 2])
    half = (np.asarray(shape, dtype=float) - 1.0) / 2.0
    first_zyx = np.array([cv.z[0], cv.y[0], cv.x[0]])
    to_zyx = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # LPS (x, y, z) -> (z, y, x)
    # stored index o -> LPS centre + D (spacing * (o - half)) -> patient index
    matrix = np.diag(1.0 / spacing) @ to_zyx @ direction @ np.diag(spacing)
    offset = np.diag(1.0 / spacing) @ (to_zyx @ centre_lps - first_zyx) - matrix @ half
    air = float(hu_lut("non-contrast")[0])
    stored_hu = ndimage.affine_transform(hu, matrix, offset, output_shape=shape, order=1, mode="constant", cval=air)
    labels = ndimage.affine_transform(cv.labels, matrix, offset, output_shape=shape, order=0, mode="constant", cval=0)
    stored_lesions = ndimage.affine_transform(lesions, matrix, offset, output_shape=shape, order=0, mode="constant", cval=0)
    inverse = np.linalg.inv(matrix)
    kept: list[Finding] = []
    renumber = np.zeros(256, dtype=np.uint8)
    for index, f in enumerate(findings):
        voxels = np.argwhere(stored_lesions == index + 1)
        if voxels.size == 0:  # too small to survive resampling: not in the image, so not in the truth
            continue
        target = inverse @ (np.asarray(f.center_voxel, dtype=float) - offset)
        nearest = voxels[int(np.argmin(((voxels - target) ** 2).sum(axis=1)))]
        renumber[index + 1] = len(kept) + 1
        kept.append(dataclasses.replace(f, center_voxel=tuple(int(v) for v in nearest)))
    origin = centre_lps + direction @ (spacing * -half)
    return _Stored(
        hu=stored_hu.astype(np.float32, copy=False),
        labels=labels,
        lesions=renumber[stored_lesions],
        findings=kept,
        spacing=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=direction,
        tilt_deg=float(tilt_deg),
    )


def _lung_texture(cv: Canvas, hu: np.ndarray, anatomy) -> None:
    """Dependent (posterior) lung is denser, by about 40 HU front to back."""
    lung = (cv.labels >= 7) & (cv.labels <= 11)
    gradient = (0.25 * (cv.y - anatomy.cav_yc)).astype(np.float32)
    hu += lung * gradient[None, :, None]


def make_phantom_dataset(
    seeds: Iterable[int], region: str | Sequence[str] = "chest", **kwargs
) -> list[Phantom]:
    """Phantoms for several seeds; ``region="both"`` or a list alternates regions by seed."""
    seeds = list(seeds)
    if region == "both":
        region = REGIONS
    regions = [region] * len(seeds) if isinstance(region, str) else [region[i % len(region)] for i in range(len(seeds))]
    return [make_phantom(seed, region=r, **kwargs) for seed, r in zip(seeds, regions)]


def write_dicom_series(volume: CTVolume, folder: str | Path, **kwargs):
    """Write ``volume`` as a CT DICOM series (see :func:`napari_tghmoe.io.write_dicom_series`)."""
    from napari_tghmoe.io import write_dicom_series as _write

    return _write(volume, folder, **kwargs)


def write_nifti(volume: CTVolume, path: str | Path, **kwargs):
    """Write ``volume`` as NIfTI (see :func:`napari_tghmoe.io.write_nifti`)."""
    from napari_tghmoe.io import write_nifti as _write

    return _write(volume, path, **kwargs)
