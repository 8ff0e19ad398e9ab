"""Synthetic CT with known findings, a consistent report and closed VQA items.

No CT ships offline, yet training, evaluation, tests and the napari sample data need
scans with ground truth. :func:`make_phantom` builds one virtual patient per seed (body
wall, lungs with lobes and vessels, heart, aorta, airways, liver, spleen, kidneys,
pancreas, bowel, spine and ribs, in plausible Hounsfield units that follow the contrast
phase), places 0-3 findings where their location words are true, and writes the report
and the VQA items from that ground truth.

Array convention as in :mod:`napari_tghmoe.io`: ``hu[z, y, x]``, z towards superior, y
towards posterior, x towards the patient's LEFT (so patient right is at small x index).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

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
    "QTYPES",
    "REGIONS",
    "DEFAULT_SPACING",
    "Finding",
    "Phantom",
    "VQAItem",
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


def make_phantom(
    seed: int,
    region: str = "chest",
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    phase: str | None = None,
    findings: bool = True,
) -> Phantom:
    """A synthetic CT of ``region`` with 0-3 known findings, its report and VQA items.

    ``shape``/``spacing`` are (z, y, x). Give neither for a clinical-like scan (5 mm
    slices, 0.75 mm pixels, field of view cropped to the body); give one and the other is
    chosen so the whole body fits; give both and the body is cropped if it does not fit.
    ``phase`` is "non-contrast", "arterial" or "portal venous" (default: drawn from the
    seed). The same arguments always give the same phantom. ``findings=False`` renders the
    same case without its findings (same anatomy, phase and noise): the lesion-free twin that
    detection experiments compare against.
    """
    _check_region(region)
    if phase is not None and phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES} or None, got {phase!r}")
    shape, spacing = _grid(region, shape, spacing)
    root = np.random.default_rng(seed)
    # Independent streams: the case (phase, anatomy, findings, words) does not depend on
    # the grid, only the voxels do.
    rng_case, rng_anatomy, rng_findings, rng_noise, rng_text = root.spawn(5)
    drawn_phase = PHASES[int(rng_case.integers(len(PHASES)))]
    phase = phase or drawn_phase
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
    hu_int = _render(hu, spacing, rng_noise)

    report = write_report(region, phase, sz, findings, rng_text)
    vqa = make_vqa(region, phase, findings, rng_text)
    description = f"Phantom {region} CT, {phase}"
    volume = CTVolume(
        hu=hu_int,
        spacing=spacing,
        origin=(float(cv.x[0]), float(cv.y[0]), float(cv.z[0])),
        modality="CT",
        series_uid=_uid(seed, region, shape, spacing, phase, "series"),
        study_uid=_uid(seed, region, "study"),
        frame_of_reference_uid=_uid(seed, region, "frame"),
        description=description,
        window=(40.0, 400.0),
        source=f"napari_tghmoe.phantom(seed={seed}, region={region!r})",
        metadata={
            "source_format": "phantom",
            "modality": "CT",
            "body_part": region.upper(),
            "series_description": description,
            "slice_thickness_mm": sz,
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
        labels=cv.labels,
        label_names=dict(LABEL_NAMES),
        lesions=lesions,
        info={"anatomy": anatomy, "aorta_hu": organ_hu("aorta", phase)},
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
