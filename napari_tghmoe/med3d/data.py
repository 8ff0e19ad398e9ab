"""Volumes on the model's working grid: CT -> normalised channels, phantom truth -> labels.

One code path for training, segmentation and evaluation: a scan of any spacing is resampled
(box average, then trilinear: ``napari_tghmoe.model.preprocess.resample_to_grid``) to the
working spacing, and label maps go between the two grids by nearest neighbour with the same
voxel-centre mapping (:func:`nearest_indices`), so training phantoms rendered at a clinical-like
grid look to the network exactly as a scan given to ``tghmoe segment`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from napari_tghmoe.io import CTVolume


@dataclass
class WorkingVolume:
    """A volume on the working grid: normalised channels, (optional) labels and its text facts."""

    image: np.ndarray  # (C, z, y, x) float32, each HU window mapped to [0, 1]
    labels: np.ndarray | None  # (z, y, x) uint8 model label values, or None (unlabelled)
    name: str
    hu: np.ndarray | None = None  # (z, y, x) float32 HU on the working grid (for the 2D targets)
    region: str = "CT"
    finding_kinds: list[str] = field(default_factory=list)  # kinds present (phantom truth)
    lookalike_voxels: np.ndarray | None = None  # (N, 3) working-grid voxels of look-alike structures


#: At most this many look-alike voxels are kept per volume (a random spread, to pick crop centres).
MAX_LOOKALIKE_VOXELS = 4000


def lookalike_voxels(phantom: Any, structures: Sequence[str], grid: Sequence[int]) -> np.ndarray:
    """(N, 3) working-grid voxels on the named phantom structures (seeded subsample, sorted)."""
    values = [value for value, name in phantom.label_names.items() if name in set(structures)]
    mask = resample_nearest(np.isin(phantom.labels, values), grid)
    voxels = np.argwhere(mask)
    if len(voxels) > MAX_LOOKALIKE_VOXELS:
        keep = np.random.default_rng([int(phantom.seed), 23]).choice(len(voxels), MAX_LOOKALIKE_VOXELS, replace=False)
        voxels = voxels[np.sort(keep)]
    return voxels.astype(np.int32)


def working_shape(shape: Sequence[int], spacing: Sequence[float], working_spacing: Sequence[float]) -> tuple[int, int, int]:
    """Grid of the same physical extent at (about) the working spacing."""
    return tuple(max(1, int(round(n * s / w))) for n, s, w in zip(shape, spacing, working_spacing))  # type: ignore[return-value]


def nearest_indices(source_size: int, target_size: int) -> np.ndarray:
    """For each target voxel along one axis, the source voxel whose extent holds its centre."""
    centres = (np.arange(target_size) + 0.5) * (source_size / target_size)
    return np.clip(np.floor(centres).astype(np.int64), 0, source_size - 1)


def resample_nearest(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a (z, y, x) array onto a grid of the same extent."""
    zi, yi, xi = (nearest_indices(n, m) for n, m in zip(array.shape, shape))
    return array[np.ix_(zi, yi, xi)]


def window_channels(hu: Any, windows: Sequence[Sequence[float]]) -> Any:
    """(z, y, x) HU tensor -> (C, z, y, x): each (centre, width) window mapped to [0, 1]."""
    import torch

    channels = [((hu - (c - w / 2.0)) / w).clamp(0.0, 1.0) for c, w in windows]
    return torch.stack(channels, dim=0)


def prepare_image(volume: CTVolume, config: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A CT in HU -> (C, z, y, x) float32 on the working grid, and that grid's shape."""
    image, _, grid = prepare_image_and_hu(volume, config)
    return image, grid


def prepare_image_and_hu(volume: CTVolume, config: Any) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Like :func:`prepare_image`, also returning the working-grid HU (z, y, x) float32."""
    from napari_tghmoe.model.preprocess import resample_to_grid

    grid = working_shape(volume.shape, volume.spacing, config.working_spacing)
    hu = resample_to_grid(np.asarray(volume.hu), grid)
    image = window_channels(hu, config.ct_windows).numpy()
    hu_array = hu.numpy()
    if getattr(config, "position_channels", False):
        image = np.concatenate([image, position_channels(hu_array)], axis=0)
    return image, hu_array, grid


#: Voxels above this HU count as body when finding its bounding box.
BODY_HU = -500.0


def position_channels(hu: np.ndarray) -> np.ndarray:
    """(3, z, y, x) float32: each voxel's position along z, y, x relative to the body's box, -1..1.

    The box is that of voxels above :data:`BODY_HU`, so the same anatomy gets the same values
    whatever the field of view; outside the box values go beyond +-1 (clipped at +-2).
    """
    body = hu > BODY_HU
    channels = np.empty((3, *hu.shape), dtype=np.float32)
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.nonzero(body.any(axis=others))[0]
        lo, hi = (int(present[0]), int(present[-1])) if len(present) else (0, hu.shape[axis] - 1)
        coordinate = (np.arange(hu.shape[axis], dtype=np.float32) - lo) / max(1, hi - lo) * 2.0 - 1.0
        shape = [1, 1, 1]
        shape[axis] = hu.shape[axis]
        channels[axis] = np.clip(coordinate, -2.0, 2.0).reshape(shape)
    return channels


def phantom_model_labels(phantom: Any, config: Any) -> np.ndarray:
    """Phantom truth -> model label values (organs by name, then each finding by its kind).

    Structures the model does not segment (bone, fat, vessels, heart...) are background.
    """
    lut = np.zeros(256, dtype=np.uint8)
    for value, name in phantom.label_names.items():
        if name in config.organ_names:
            lut[value] = 1 + config.organ_names.index(name)
    labels = lut[phantom.labels]
    for index, finding in enumerate(phantom.findings):
        if finding.kind in config.finding_kinds:
            labels[phantom.lesions == index + 1] = config.finding_label(finding.kind)
    return labels


def phantom_working_volume(
    phantom: Any, config: Any, extra_channels: Any = None, lookalikes: Sequence[str] = ()
) -> WorkingVolume:
    """``extra_channels(volume, image)`` returns the image with more channels (a finding model's context).

    ``lookalikes`` names phantom structures whose voxels are kept as hard-negative crop centres.
    """
    image, hu, grid = prepare_image_and_hu(phantom.volume, config)
    if extra_channels is not None:
        image = extra_channels(phantom.volume, image)
    labels = resample_nearest(phantom_model_labels(phantom, config), grid)
    kinds = sorted({f.kind for f in phantom.findings if f.kind in config.finding_kinds})
    return WorkingVolume(
        image=image, labels=labels, name=f"phantom-{phantom.seed}", hu=hu, region=phantom.region, finding_kinds=kinds,
        lookalike_voxels=lookalike_voxels(phantom, lookalikes, grid) if lookalikes else None,
    )


def organ_context_channels(
    organ_labels: np.ndarray, organ_label_names: Sequence[str], groups: Sequence[Sequence[str]], shape: Sequence[int]
) -> np.ndarray:
    """(G, z, y, x) float16 on a grid of ``shape``: 1 where the organ labels name an organ of group g.

    ``organ_labels`` is the organ model's label map on its own (coarser) grid of the same
    physical extent; it reaches ``shape`` by nearest neighbour, as labels go between grids here.
    """
    coarse_to_fine = resample_nearest(organ_labels, shape)
    channels = np.zeros((len(groups), *coarse_to_fine.shape), dtype=np.float16)
    for index, group in enumerate(groups):
        values = [organ_label_names.index(name) for name in group if name in organ_label_names]
        channels[index] = np.isin(coarse_to_fine, values)
    return channels


# --------------------------------------------------------------------------- data specs


def parse_phantom_spec(spec: str) -> dict[str, Any]:
    """``phantom:seeds=0-39,region=both[,spacing=2.5x1.5x1.5][,shape=...][,plane=drawn]`` -> make_phantom arguments.

    ``plane``: the plane the slices are stored in (axial, coronal, sagittal, oblique, or ``drawn``
    from each seed as the chat's phantoms are); default axial."""
    from napari_tghmoe.datasets.specs import _shape_or_spacing, _spec_parts, parse_seed_range

    kind, _, body = spec.partition(":")
    if kind.strip().lower() != "phantom":
        raise ValueError(f"not a phantom spec: {spec!r}")
    _, options = _spec_parts(body)
    if "seeds" not in options:
        raise ValueError(f"phantom spec {spec!r} needs seeds=, e.g. seeds=0-39")
    return {
        "seeds": parse_seed_range(options["seeds"]),
        "region": options.get("region", "both"),
        "spacing": _shape_or_spacing(options["spacing"], float) if "spacing" in options else None,
        "shape": _shape_or_spacing(options["shape"], int) if "shape" in options else None,
        "plane": _plane_option(spec, options.get("plane", "axial")),
    }


def _plane_option(spec: str, plane: str) -> str | None:
    from napari_tghmoe.phantom import PLANES

    plane = plane.strip().lower()
    if plane == "drawn":
        return None
    if plane not in PLANES:
        raise ValueError(f"phantom spec {spec!r}: plane must be one of {', '.join(PLANES)} or drawn, got {plane!r}")
    return plane


def segmentation_view(phantom: Any) -> Any:
    """``phantom`` as the cascade's networks see it: volume, labels and lesions on the axial grid
    :func:`napari_tghmoe.med3d.segment.network_view` gives its stored scan (the same phantom when
    it is stored axial). Each finding's ``center_voxel`` becomes its lesion voxel nearest the
    lesion's centroid on that grid (one that was cut away keeps the stored one)."""
    import dataclasses

    from napari_tghmoe.med3d.segment import network_view, snapped_centre

    if phantom.plane == "axial":
        return phantom
    volume, (labels, lesions) = network_view(phantom.volume, (phantom.labels, phantom.lesions))
    findings = []
    for number, finding in enumerate(phantom.findings, start=1):
        voxels = np.argwhere(lesions == number)
        findings.append(dataclasses.replace(finding, center_voxel=snapped_centre(voxels)) if len(voxels) else finding)
    return dataclasses.replace(phantom, volume=volume, labels=labels, lesions=lesions, findings=findings, plane="axial")


def iter_phantoms(spec: str):
    """The phantoms (with their ground truth) a phantom spec names, one at a time; one stored in
    another plane than axial comes as the networks see it (:func:`segmentation_view`)."""
    from napari_tghmoe.phantom import make_phantom
    from napari_tghmoe.datasets.phantom import phantom_region

    parsed = parse_phantom_spec(spec)
    for seed in parsed["seeds"]:
        region = phantom_region(parsed["region"], int(seed))
        phantom = make_phantom(
            int(seed), region, shape=parsed["shape"], spacing=parsed["spacing"] or (2.5, 1.5, 1.5), plane=parsed["plane"]
        )
        yield segmentation_view(phantom)


def compacted(volume: WorkingVolume) -> WorkingVolume:
    """The same volume for fine-tuning only: float16 channels, no HU copy (a third of the memory).

    A finer working grid (a 2 mm finding model) over a hundred phantoms would otherwise hold
    several GB; [0, 1] window values lose nothing that matters in float16 (3 decimal digits).
    """
    volume.image = volume.image.astype(np.float16)
    volume.hu = None
    return volume


def load_working_volumes(
    specs: Sequence[str], config: Any, *, labelled: bool = True, compact: bool = False, extra_channels: Any = None,
    lookalikes: Sequence[str] = (),
) -> list[WorkingVolume]:
    """Every volume of ``specs`` on the working grid (``compact``: see :func:`compacted`).

    Phantom specs carry their labels and truth; other specs (``m3d-cap:``, ``ct-rate:``,
    through :func:`napari_tghmoe.datasets.load_dataset_spec`) give unlabelled volumes, which
    pre-training can use and fine-tuning cannot.
    """
    volumes: list[WorkingVolume] = []
    for spec in specs:
        if spec.strip().lower().startswith("phantom:"):
            for phantom in iter_phantoms(spec):
                volume = phantom_working_volume(phantom, config, extra_channels, lookalikes)
                volumes.append(compacted(volume) if compact else volume)
            continue
        if labelled:
            raise ValueError(f"{spec}: fine-tuning needs labelled volumes (phantom specs); this spec has none")
        from napari_tghmoe.datasets import load_dataset_spec, load_sample_volume

        seen: set[str] = set()
        for sample in load_dataset_spec(spec, task="report"):
            key = str(sample.volume)
            if key in seen:
                continue
            seen.add(key)
            ct = load_sample_volume(sample)
            image, hu, _ = prepare_image_and_hu(ct, config)
            volumes.append(WorkingVolume(image=image, labels=None, name=str(sample.meta.get("id", key)), hu=hu))
    return volumes


# --------------------------------------------------------------------------- crops


def crop_box(shape: Sequence[int], size: Sequence[int], centre: Sequence[int]) -> tuple[slice, ...]:
    """A ``size`` box around ``centre`` kept inside ``shape`` where it fits."""
    box = []
    for n, s, c in zip(shape, size, centre):
        start = int(np.clip(c - s // 2, 0, max(0, n - s)))
        box.append(slice(start, start + s))
    return tuple(box)


def crop(array: np.ndarray, box: tuple[slice, ...], size: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """``array[..., box]`` padded with ``fill`` up to ``size`` where the volume is smaller."""
    spatial = array[(Ellipsis, *box)]
    pad = [(0, 0)] * (array.ndim - 3) + [(0, s - n) for s, n in zip(size, spatial.shape[-3:])]
    if any(after for _, after in pad):
        spatial = np.pad(spatial, pad, constant_values=fill)
    return np.ascontiguousarray(spatial)
