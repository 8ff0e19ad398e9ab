"""Segment a CT volume with a Med3DInsight segmentation model.

Resample the CT (HU) to the model's working spacing, MONAI ``sliding_window_inference``
(Gaussian-weighted windows), labels back to the scan's own grid by nearest neighbour, then one
finding per connected component of each finding kind's label. The finding-classification head
runs on every window; a kind's volume-level presence is its highest window probability.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from napari_tghmoe.io import CTVolume
from napari_tghmoe.io._geometry import ALIGNED_COSINE, orientation_name
from napari_tghmoe.io._types import AXIAL_DIRECTION
from napari_tghmoe.med3d.nodules import NODULE_KIND, NoduleShapeStage
from napari_tghmoe.med3d.types import SegFinding, SegmentationResult, SegmentationStopped, SegModelError

def _resolve_model_dir(model_dir: str | Path | None) -> Path:
    if model_dir is not None:
        return Path(model_dir)
    from napari_tghmoe._resources import resources_dir

    return Path(resources_dir()) / "demo-seg-model"


def check_ct_volume(volume: CTVolume) -> None:
    """A clear one-line error for input the segmenter cannot take (non-CT, 2D)."""
    name = volume.source or volume.description or "volume"
    modality = (volume.modality or "").upper()
    if modality and modality != "CT":
        raise SegModelError(f"{name}: modality {modality}, not CT (the segmenter is trained on CT in HU)")
    if min(volume.shape) < 2:
        raise SegModelError(f"{name}: a 2D image (shape {volume.shape}), not a 3D volume")


def window_count(image_size: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """How many windows ``sliding_window_inference`` visits (its scan-interval rule)."""
    count = 1
    for size, window in zip(image_size, roi):
        size = max(size, window)  # MONAI pads smaller images up to the window
        interval = max(int(window * (1 - overlap)), 1) if size > window else window
        count *= int(np.ceil((size - window) / interval)) + 1 if size > window else 1
    return count


_cached: dict[str, Any] = {}


def _model(folder: Path, keep_others: bool = False, loader: Callable[[Path], Any] | None = None) -> Any:
    """Load once per folder (the dock segments several volumes with one model).

    ``keep_others``: a cascade's finding model (and its verifier, ``loader``) is cached beside
    its organ model.
    """
    from napari_tghmoe.med3d.encoder import load_seg_model

    key = str(folder.resolve())
    # a new weights file or an edited config (a cut, a stage) loads again
    stamp = tuple((folder / name).stat().st_mtime if (folder / name).exists() else None for name in ("model.safetensors", "config.json"))
    if key not in _cached or _cached[key][0] != stamp:
        if not keep_others:
            _cached.clear()
        _cached[key] = (stamp, (loader or load_seg_model)(folder))
    return _cached[key][1]


def predict_working_grid(
    model: Any,
    image: np.ndarray,
    *,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C, z, y, x) working-grid image -> (labels (z, y, x) uint8, softmax (L, z, y, x), presence (K,))."""
    import torch
    from monai.inferers import sliding_window_inference

    config = model.config
    roi = tuple(config.patch_size)
    total = window_count(image.shape[1:], roi, config.sw_overlap)
    state = {"done": 0, "presence": None}

    def predictor(window: torch.Tensor) -> torch.Tensor:
        if should_stop is not None and should_stop():
            raise SegmentationStopped("segmentation stopped")
        logits, finding_logits = model(window)
        window_presence = torch.sigmoid(finding_logits).amax(0)
        previous = state["presence"]
        state["presence"] = window_presence if previous is None else torch.maximum(previous, window_presence)
        state["done"] += window.shape[0]
        if progress is not None:
            progress(min(state["done"], total), total)
        return logits

    with torch.inference_mode():
        tensor = torch.from_numpy(np.ascontiguousarray(image))[None].float()
        device = next(model.parameters()).device  # windows run there; the stitched map stays on the CPU
        logits = sliding_window_inference(
            tensor, roi, config.sw_batch_size, predictor, overlap=config.sw_overlap, mode="gaussian",
            sw_device=device, device="cpu",
        )
        probabilities = torch.softmax(logits[0].float(), dim=0)
        labels = probabilities.argmax(0).to(torch.uint8).numpy()
    presence = state["presence"].cpu().numpy() if state["presence"] is not None else np.zeros(len(config.finding_kinds))
    return labels, probabilities.numpy(), presence


def finding_components(labels: np.ndarray, value: int, min_voxels: int = 1) -> list[np.ndarray]:
    """Index arrays (N, 3) of each connected component (26-neighbour) of ``labels == value``."""
    from scipy import ndimage

    mask = labels == value
    if not mask.any():
        return []
    nonzero = np.nonzero(mask)
    lo = [int(a.min()) for a in nonzero]
    hi = [int(a.max()) + 1 for a in nonzero]
    sub = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    components, count = ndimage.label(sub, structure=np.ones((3, 3, 3), bool))
    found = []
    for index in range(1, count + 1):
        voxels = np.argwhere(components == index)
        if len(voxels) >= min_voxels:
            found.append(voxels + np.array(lo))
    return found


def snapped_centre(voxels: np.ndarray) -> tuple[int, int, int]:
    """The component voxel nearest its centre of mass (inside even for a crescent)."""
    centre = voxels.mean(axis=0)
    nearest = voxels[np.argmin(((voxels - centre) ** 2).sum(axis=1))]
    return tuple(int(v) for v in nearest)  # type: ignore[return-value]


def _location(labels_work: np.ndarray, voxels_work: np.ndarray, organ_count: int, names: list[str]) -> str | None:
    """The organ label most common in a one-voxel shell around the component (working grid)."""
    lo = np.maximum(voxels_work.min(axis=0) - 2, 0)
    hi = np.minimum(voxels_work.max(axis=0) + 3, labels_work.shape)
    patch = labels_work[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    organs = patch[(patch >= 1) & (patch <= organ_count)]
    if organs.size == 0:
        return None
    return names[int(np.bincount(organs).argmax())]


def axial_view(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How to view an array stored in any plane as (z, y, x) towards (S, P, L): axis order + flips.

    Each array axis is matched to the patient axis its direction column points at most (an
    oblique scan goes to its nearest plane), so a coronal or sagittal series reaches the network
    in the axial orientation it was trained on.
    """
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    # direction columns are the LPS vectors of array axes (k, j, i); LPS rows 0=x(L), 1=y(P), 2=z(S)
    wanted_rows = (2, 1, 0)  # canonical array axis 0 <- S, 1 <- P, 2 <- L
    order, flips, used = [], [], set()
    for row in wanted_rows:
        scores = [abs(direction[row, axis]) if axis not in used else -1.0 for axis in range(3)]
        axis = int(np.argmax(scores))
        used.add(axis)
        order.append(axis)
        flips.append(bool(direction[row, axis] < 0))
    return tuple(order), tuple(flips)  # type: ignore[return-value]


def _to_axial(array: np.ndarray, order, flips) -> np.ndarray:
    view = np.transpose(array, order)
    for axis, flip in enumerate(flips):
        if flip:
            view = np.flip(view, axis=axis)
    return view


def _from_axial(array: np.ndarray, order, flips) -> np.ndarray:
    for axis, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis=axis)
    return np.ascontiguousarray(np.transpose(array, np.argsort(order)))


def is_oblique(direction: np.ndarray) -> bool:
    """True when some array axis is not along a patient axis (the slice normal or an in-plane one)."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    norms = np.linalg.norm(direction, axis=0)
    cosines = np.abs(direction) / np.where(norms > 0, norms, 1.0)
    return orientation_name(direction) == "oblique" or bool((cosines.max(axis=0) < ALIGNED_COSINE).any())


@dataclass
class PatientAxisGrid:
    """An axial grid (z, y, x towards S, P, L) over a scan, and the affine map between the two."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]  # LPS (x, y, z) mm of grid voxel [0, 0, 0]
    matrix: np.ndarray  # scan index (k, j, i) = matrix @ grid index (z, y, x) + offset
    offset: np.ndarray

    def to_grid(self, scan_array: np.ndarray, *, order: int, cval: float, dtype: Any = None) -> np.ndarray:
        """A scan-grid array sampled on this grid (``order`` 1: trilinear, 0: nearest); ``cval`` outside the scan."""
        from scipy import ndimage

        return ndimage.affine_transform(
            scan_array, self.matrix, self.offset, output_shape=self.shape, output=dtype, order=order,
            mode="constant", cval=cval,
        )

    def to_scan(self, grid_array: np.ndarray, scan_shape: tuple[int, ...]) -> np.ndarray:
        """A map on this grid sampled back on the scan's own grid by nearest neighbour."""
        from scipy import ndimage

        inverse = np.linalg.inv(self.matrix)
        # every scan voxel centre lies inside the grid; "nearest" only absorbs rounding at its corners
        return ndimage.affine_transform(
            grid_array, inverse, -inverse @ self.offset, output_shape=tuple(scan_shape), order=0, mode="nearest"
        )

    def scan_index(self, grid_index: Any) -> np.ndarray:
        """The (fractional) scan index of a grid index."""
        return self.matrix @ np.asarray(grid_index, dtype=float) + self.offset


def patient_axis_grid(volume: CTVolume) -> PatientAxisGrid:
    """The axis-aligned grid an oblique ``volume`` is segmented on.

    The networks only saw scans whose array axes run along the patient's axes; an oblique series
    reaches them turned and they find nothing in it. So it is resampled onto this grid: axes
    towards (S, P, L) as an axial scan, each with the spacing of the scan axis nearest to it, just
    large enough to hold every scan voxel centre (centred on them).
    """
    direction = np.asarray(volume.direction, dtype=float)
    order, _ = axial_view(direction)
    spacing = np.array([volume.spacing[a] for a in order], dtype=float)
    scan_to_lps = direction @ np.diag(volume.spacing)  # scan index -> LPS mm from the origin
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in volume.shape])), dtype=float)
    corners_zyx = (np.asarray(volume.origin) + corners @ scan_to_lps.T)[:, ::-1]
    lo, hi = corners_zyx.min(axis=0), corners_zyx.max(axis=0)
    shape = np.ceil((hi - lo) / spacing - 1e-6).astype(int) + 1
    first_zyx = (lo + hi) / 2.0 - spacing * (shape - 1) / 2.0
    grid_to_lps = AXIAL_DIRECTION @ np.diag(spacing)  # grid index (z, y, x) -> LPS mm
    lps_to_scan = np.linalg.inv(scan_to_lps)
    return PatientAxisGrid(
        shape=tuple(int(n) for n in shape),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in first_zyx[::-1]),  # type: ignore[arg-type]
        matrix=lps_to_scan @ grid_to_lps,
        offset=lps_to_scan @ (first_zyx[::-1] - np.asarray(volume.origin)),
    )


@dataclass
class _GridPrediction:
    """One model's prediction on its working grid, and how scan voxels index into that grid."""

    labels: np.ndarray  # (z, y, x) working-grid labels
    probabilities: np.ndarray  # (L, z, y, x) softmax
    presence: np.ndarray  # (K,) finding-presence head, max over windows
    axial_axes: list[np.ndarray]  # per axial axis: the working-grid index of each axial voxel
    scan_axes: list[np.ndarray]  # the same per scan array axis (the scan's own order and flips)
    grid: tuple[int, int, int]
    image: np.ndarray | None = None  # (C, z, y, x) the model's input (kept for a verifier's crops)

    def on_scan(self, labels_work: np.ndarray, order: Any, flips: Any) -> np.ndarray:
        """A working-grid map on the scan's own grid (nearest neighbour, the scan's axis order)."""
        return _from_axial(labels_work[np.ix_(*self.axial_axes)], order, flips)

    def working_indices(self, voxels: np.ndarray, order: Any) -> np.ndarray:
        """Distinct working-grid (z, y, x) indices of scan voxels (N, 3)."""
        work = np.stack([self.scan_axes[a][voxels[:, a]] for a in order], axis=1)
        return np.unique(work, axis=0)


def _predict_scan(
    model: Any, axial: CTVolume, order: Any, flips: Any, *, progress: Any, should_stop: Any,
    organ_labels: tuple[np.ndarray, list[str]] | None = None, keep_image: bool = False,
) -> _GridPrediction:
    """Resample the (axially viewed) scan to ``model``'s grid and segment it there.

    ``organ_labels`` (the organ pass's map and label names) feed a finding model's context channels.
    """
    from napari_tghmoe.med3d.data import nearest_indices, prepare_image

    image, grid = prepare_image(axial, model.config)
    image = with_organ_context(image, model.config, organ_labels)
    labels_work, probabilities, presence = predict_working_grid(
        model, image, progress=progress, should_stop=should_stop
    )
    if should_stop is not None and should_stop():
        raise SegmentationStopped("segmentation stopped")
    # Work-grid indices of every scan voxel (per axis) let findings look their probabilities up
    # without resampling the probability maps back to the scan.
    axial_axes = [nearest_indices(m, n) for m, n in zip(grid, axial.shape)]
    scan_axes: list[np.ndarray] = [np.empty(0, np.int64)] * 3
    for canonical, source_axis in enumerate(order):
        index = axial_axes[canonical]
        scan_axes[source_axis] = index[::-1] if flips[canonical] else index
    return _GridPrediction(labels_work, probabilities, presence, axial_axes, scan_axes, grid, image if keep_image else None)


def with_organ_context(image: np.ndarray, config: Any, organ_labels: tuple[np.ndarray, list[str]] | None) -> np.ndarray:
    """``image`` plus the finding model's organ-context channels (unchanged for a model without them)."""
    from napari_tghmoe.med3d.data import organ_context_channels

    if not config.context_groups:
        return image
    if organ_labels is None:
        raise SegModelError("this finding model reads the organ model's labels: run it inside its cascade folder")
    labels, names = organ_labels
    context = organ_context_channels(labels, names, config.context_groups, image.shape[1:])
    return np.concatenate([image, context.astype(image.dtype)], axis=0)


def organ_only_labels(model: Any, axial: CTVolume) -> np.ndarray:
    """The organ model's organs-and-background labels of an axial volume on its working grid.

    What a cascade's finding model reads as context, at training and at segmentation time alike.
    """
    from napari_tghmoe.med3d.data import prepare_image

    image, _ = prepare_image(axial, model.config)
    _, probabilities, _ = predict_working_grid(model, image)
    return probabilities[: 1 + len(model.config.organ_names)].argmax(0).astype(np.uint8)


def check_cascade(organ_config: Any, finder_config: Any, where: Path) -> None:
    """A finding model fits an organ model: findings only, known kinds, known context organs."""
    if finder_config.organ_names:
        raise SegModelError(f"{where}: a finding model segments finding kinds only, this one also has organs")
    unknown = sorted(set(finder_config.finding_kinds) - set(organ_config.finding_kinds))
    if unknown:
        raise SegModelError(f"{where}: finding kinds {', '.join(unknown)} are not labels of the organ model")
    missing = sorted({n for group in finder_config.context_groups for n in group} - set(organ_config.organ_names))
    if missing:
        raise SegModelError(f"{where}: context organs {', '.join(missing)} are not organs of the organ model")
    sites = sorted({n for organs in finder_config.finding_sites.values() for n in organs} - set(organ_config.organ_names))
    if sites:
        raise SegModelError(f"{where}: finding sites {', '.join(sites)} are not organs of the organ model")


def finding_model_of(folder: Path, config: Any) -> Any | None:
    """The cascade's finding model (``config.finding_model`` sub-folder), checked, or None."""
    if not config.finding_model:
        return None
    sub = folder / config.finding_model
    finder = _model(sub, keep_others=True)
    check_cascade(config, finder.config, sub)
    return finder


def verifier_of(folder: Path, finder_config: Any) -> Any | None:
    """The finding model's verifier (``finding_verifier`` sub-folder), checked, or None."""
    if not finder_config.finding_verifier:
        return None
    from napari_tghmoe.med3d.verifier import load_verifier

    sub = folder / finder_config.finding_verifier
    verifier = _model(sub, keep_others=True, loader=load_verifier)
    check_verifier(finder_config, verifier.config, sub)
    return verifier


def check_verifier(finder_config: Any, verifier_config: Any, where: Path) -> None:
    """A verifier fits a finding model: the same kinds, input channels and grid."""
    same = (
        list(verifier_config.finding_kinds) == list(finder_config.finding_kinds)
        and verifier_config.in_channels == finder_config.in_channels
        and list(verifier_config.working_spacing) == list(finder_config.working_spacing)
    )
    if not same:
        raise SegModelError(f"{where}: this verifier was trained for another finding model (kinds, channels or grid differ)")


def attach_finding_model(
    organ_dir: str | Path, finding_dir: str | Path, out_dir: str | Path, name: str = "findings",
    verifier_dir: str | Path | list[str | Path] | None = None,
) -> Path:
    """One segmentation folder from an organ model and a finer finding model (``tghmoe seg-bundle``).

    ``out_dir`` gets the organ model's files with ``finding_model = name`` in its config and the
    finding model's files in ``out_dir/name``; ``tghmoe segment`` then runs both. A
    ``verifier_dir`` (``tghmoe train-verifier``) goes to ``out_dir/name/verifier``; several make
    one :class:`~napari_tghmoe.med3d.verifier.VerifierEnsemble` there.
    """
    from napari_tghmoe.med3d.encoder import _quiet_loading, load_seg_model

    organ_dir, finding_dir, out_dir = Path(organ_dir), Path(finding_dir), Path(out_dir)
    organs = load_seg_model(organ_dir)
    finder = load_seg_model(finding_dir)
    check_cascade(organs.config, finder.config, finding_dir)
    verifier = None
    if verifier_dir is not None:
        from napari_tghmoe.med3d.verifier import load_verifier, verifier_ensemble

        folders = [Path(v) for v in (verifier_dir if isinstance(verifier_dir, list) else [verifier_dir])]
        loaded = [load_verifier(folder) for folder in folders]
        for folder, one in zip(folders, loaded):
            check_verifier(finder.config, one.config, folder)
        verifier = verifier_ensemble(loaded)
    out_dir.mkdir(parents=True, exist_ok=True)
    organs.config.finding_model = name
    finder.config.finding_verifier = "verifier" if verifier is not None else ""
    with _quiet_loading():  # no "Writing model shards" bars: the CLI says one line
        organs.save_pretrained(str(out_dir), safe_serialization=True)
        finder.save_pretrained(str(out_dir / name), safe_serialization=True)
    if verifier is not None:
        from napari_tghmoe.med3d.verifier import save_verifier

        save_verifier(verifier, out_dir / name / "verifier")
    return out_dir


def _structure_volumes(labels: np.ndarray, names: list[str], voxel_ml: float) -> dict[str, float]:
    """mL of every labelled structure in ``labels``."""
    # slab by slab: one bincount over a 78 M-voxel map makes a 600 MB int64 copy (and stalled
    # for seconds in the kernel here: docs/benchmarks.md)
    counts = np.zeros(len(names), dtype=np.int64)
    for slab in labels:
        counts += np.bincount(slab.ravel(), minlength=len(names))[: len(names)]
    return {names[v]: round(float(counts[v]) * voxel_ml, 3) for v in range(1, len(names)) if counts[v]}


def segment_volume(
    volume: CTVolume,
    model_dir: str | Path | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SegmentationResult:
    """Label map + findings on ``volume``'s own grid (``model_dir=None``: resources/demo-seg-model).

    A model whose config names a ``finding_model`` is a cascade: the organ model gives the organ
    labels on its grid, the finer finding model the finding labels on its own grid; finding
    voxels are drawn over the organs. ``progress(done, total)`` is called after each batch of
    sliding windows (of both models); when ``should_stop()`` returns True the run ends with
    :class:`SegmentationStopped`. An oblique series (:func:`is_oblique`) is segmented on
    :func:`patient_axis_grid` and its results brought back, with :data:`OBLIQUE_WARNING`.
    """
    started = time.perf_counter()
    check_ct_volume(volume)
    if not is_oblique(volume.direction):
        return _segment_on_grid(volume, model_dir, progress, should_stop, started)
    return _segment_oblique(volume, model_dir, progress, should_stop, started)


def _segment_on_grid(
    volume: CTVolume,
    model_dir: str | Path | None,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
    started: float,
) -> SegmentationResult:
    """:func:`segment_volume` on an axis-aligned volume (axial, coronal or sagittal storage)."""
    from napari_tghmoe.med3d.data import working_shape

    folder = _resolve_model_dir(model_dir)
    model = _model(folder)
    config = model.config
    finder = finding_model_of(folder, config)
    axial, order, flips = _reordered_axial(volume)
    stages = [model] if finder is None else [model, finder]
    totals = [
        window_count(working_shape(axial.shape, axial.spacing, m.config.working_spacing), tuple(m.config.patch_size), m.config.sw_overlap)
        for m in stages
    ]

    def stage_progress(offset: int) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, _total: progress(offset + done, sum(totals))

    organ_pass = _predict_scan(model, axial, order, flips, progress=stage_progress(0), should_stop=should_stop)
    organ_count = len(config.organ_names)
    organ_labels_work = organ_pass.labels
    if finder is not None:  # the finding model decides the findings: organs (and background) only here
        organ_labels_work = organ_pass.probabilities[: 1 + organ_count].argmax(0).astype(np.uint8)
    labels = organ_pass.on_scan(organ_labels_work, order, flips)
    finding_passes: dict[str, tuple[_GridPrediction, int, np.ndarray]] = {}
    verifier = None
    presence = dict(zip(config.finding_kinds, organ_pass.presence))
    organ_scan: np.ndarray | None = None  # a cascade's organ labels under its findings
    finder_nodules: np.ndarray | None = None  # a cascade's finder's lung-nodule voxels, kept or not
    if finder is None:
        for kind in config.finding_kinds:
            finding_passes[kind] = (organ_pass, config.finding_label(kind), organ_pass.labels)
    else:
        verifier = verifier_of(folder / config.finding_model, finder.config)
        finder_pass = _predict_scan(
            finder, axial, order, flips, progress=stage_progress(totals[0]), should_stop=should_stop,
            organ_labels=(organ_labels_work, config.label_names), keep_image=verifier is not None,
        )
        lut = np.zeros(finder.config.num_labels_total, dtype=labels.dtype)
        for kind in finder.config.finding_kinds:
            lut[finder.config.finding_label(kind)] = config.finding_label(kind)
            finding_passes[kind] = (finder_pass, finder.config.finding_label(kind), finder_pass.labels)
        presence.update(zip(finder.config.finding_kinds, finder_pass.presence))
        finder_on_scan = lut[finder_pass.on_scan(finder_pass.labels, order, flips)]
        finder_nodules = finder_on_scan == config.finding_label(NODULE_KIND) if NODULE_KIND in config.finding_kinds else None
        organ_scan = labels
        labels = np.where(finder_on_scan > 0, finder_on_scan, labels)

    names = config.label_names
    label_names = {value: name for value, name in enumerate(names)}
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    min_voxels = max(1, int(np.ceil(config.min_finding_ml / voxel_ml))) if config.min_finding_ml > 0 else 1
    # a cascade's finding model sets how sure a finding must be; the organ model's own otherwise
    stage_config = finder.config if finder is not None else config
    threshold = stage_config.min_finding_probability
    sites = stage_config.finding_sites
    nodule_stage = NoduleShapeStage.from_config(getattr(stage_config, "nodule_stage", None))
    # each small focal kind's second look at the scan's own spacing (med3d.nodules), where one is set
    shape_stages = {kind: NoduleShapeStage.from_config(values) for kind, values in getattr(stage_config, "lesion_stages", {}).items() if values}
    if nodule_stage is not None:
        shape_stages[NODULE_KIND] = nodule_stage
    findings: list[SegFinding] = []
    for kind in config.finding_kinds:
        if kind not in finding_passes:
            continue
        source, source_value, source_labels = finding_passes[kind]
        if not (source_labels == source_value).any():  # skip full-grid searches for absent kinds
            continue
        value = config.finding_label(kind)
        for voxels in finding_components(labels, value):
            if len(voxels) < min_voxels:  # too small to report: not left labelled as a finding either
                labels[tuple(voxels.T)] = 0 if organ_scan is None else organ_scan[tuple(voxels.T)]
                continue
            inside = source.probabilities[source_value][tuple(source.working_indices(voxels, order).T)]
            probability = float(inside.mean())
            location = _location(organ_labels_work, organ_pass.working_indices(voxels, order), organ_count, names)
            # unsure, or where this kind cannot be (a "lung nodule" in the liver): no finding,
            # its voxels go back to the organs
            rejected = probability < threshold or (kind in sites and location not in sites[kind])
            second_look = None
            if not rejected and kind in shape_stages:
                # the second look of a nodule (or another small focal kind): is it a ball, on the
                # scan's own voxels (med3d.nodules)
                second_look = shape_stages[kind].probability(volume.hu, volume.spacing, snapped_centre(voxels))
                rejected = second_look < shape_stages[kind].min_probability
            elif not rejected and verifier is not None:  # the second look, on the finder's grid
                from napari_tghmoe.med3d.verifier import verify

                second_look = verify(verifier, source.image, [(kind, source.working_indices(voxels, order))])[0]
                rejected = second_look < verifier.config.verifier_min_probability
            if rejected:
                labels[tuple(voxels.T)] = 0 if organ_scan is None else organ_scan[tuple(voxels.T)]
                continue
            findings.append(_seg_finding(kind, value, voxels, volume, voxel_ml, inside, location, second_look))
    if nodule_stage is not None and nodule_stage.propose_scales_mm and organ_scan is not None and NODULE_KIND in sites:
        source, source_value, _ = finding_passes[NODULE_KIND]
        for proposal in _stage_proposals(volume, organ_scan, names, sites[NODULE_KIND], finder_nodules, nodule_stage):
            inside = source.probabilities[source_value][tuple(source.working_indices(proposal.voxels, order).T)]
            location = _location(organ_labels_work, organ_pass.working_indices(proposal.voxels, order), organ_count, names)
            if location not in sites[NODULE_KIND]:
                continue
            value = config.finding_label(NODULE_KIND)
            labels[tuple(proposal.voxels.T)] = value
            findings.append(
                _seg_finding(NODULE_KIND, value, proposal.voxels, volume, voxel_ml, inside, location, proposal.probability)
            )
    findings.sort(key=lambda f: -f.probability)
    structure_volumes = _structure_volumes(labels, names, voxel_ml)
    grid = organ_pass.grid
    return SegmentationResult(
        labels=labels,
        label_names=label_names,
        findings=findings,
        structure_volumes_ml=structure_volumes,
        finding_presence={k: round(float(p), 4) for k, p in presence.items()},
        model_name=folder.name,
        seconds=round(time.perf_counter() - started, 3),
        working_spacing=tuple(n * s / g for n, s, g in zip(axial.shape, axial.spacing, grid)),  # type: ignore[arg-type]
    )


def _seg_finding(
    kind: str, value: int, voxels: np.ndarray, volume: CTVolume, voxel_ml: float, inside: np.ndarray,
    location: str | None, second_look: float | None,
) -> SegFinding:
    """A finding from its component's scan voxels and the finder's probabilities inside it."""
    centre = snapped_centre(voxels)
    return SegFinding(
        kind=kind,
        label=value,
        voxel_zyx=centre,
        position_mm=tuple(round(float(p), 2) for p in volume.index_to_patient(centre)),  # type: ignore[arg-type]
        volume_ml=round(len(voxels) * voxel_ml, 3),
        probability=round(float(inside.mean()), 4),
        location=location,
        voxel_count=int(len(voxels)),
        peak_probability=round(float(inside.max()), 4),
        verifier_probability=None if second_look is None else round(second_look, 4),
    )


def _stage_proposals(
    volume: CTVolume, organ_scan: np.ndarray, names: list[str], lung_organs: list[str], finder_nodules: np.ndarray | None,
    stage: NoduleShapeStage,
) -> list[Any]:
    """The nodule stage's own balls (:func:`napari_tghmoe.med3d.nodules.propose_nodules`): in the
    organs a nodule may lie in (holes filled: the organ model does not label a nodule as lung), a
    few mm away from anything the finder proposed as a nodule."""
    from scipy import ndimage

    from napari_tghmoe.med3d.nodules import SEARCH_RADIUS_MM, ball_footprint, propose_nodules

    lungs = np.isin(organ_scan, [names.index(n) for n in lung_organs if n in names])
    lungs = np.stack([ndimage.binary_fill_holes(s) for s in lungs])  # per slice: a nodule at the wall is a notch in 3D
    exclude = None
    if finder_nodules is not None and finder_nodules.any():
        exclude = ndimage.binary_dilation(finder_nodules, structure=ball_footprint(SEARCH_RADIUS_MM, volume.spacing))
    return propose_nodules(volume.hu, volume.spacing, lungs, stage, exclude)


#: Told to the user when :func:`segment_volume` resampled an oblique series.
OBLIQUE_WARNING = "oblique series: resampled to the patient axes for segmentation"

#: Air kept on each side of the body when an oblique series is segmented on the patient axes (mm).
BODY_MARGIN_MM = 10.0


def _body_box(hu: np.ndarray, spacing: tuple[float, float, float]) -> tuple[slice, slice, slice]:
    """The box of the voxels above ``BODY_HU`` plus :data:`BODY_MARGIN_MM` (all of ``hu`` without a body).

    An oblique series turned onto the patient axes gains wedges and slabs of air; the networks,
    trained on fields of view fitted to the body, call such air lung or liver (seed 300007:
    eight findings in it, the liver three times its size), so they only see the body's box.
    """
    from napari_tghmoe.med3d.data import BODY_HU

    body = hu > BODY_HU
    box = []
    for axis in range(3):
        present = np.nonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        if not len(present):
            return (slice(None),) * 3  # type: ignore[return-value]
        margin = int(np.ceil(BODY_MARGIN_MM / spacing[axis]))
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, hu.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


def _oblique_on_grid(volume: CTVolume, grid: PatientAxisGrid) -> tuple[CTVolume, tuple[slice, slice, slice]]:
    """An oblique ``volume`` on ``grid`` (trilinear), cut to the body's box: what the networks read."""
    hu = grid.to_grid(np.asarray(volume.hu), order=1, cval=-1024.0, dtype=np.float32)
    box = _body_box(hu, grid.spacing)
    start = np.array([b.indices(n)[0] for b, n in zip(box, grid.shape)])
    axial = CTVolume(
        hu=hu[box],
        spacing=grid.spacing,
        origin=tuple(np.asarray(grid.origin) + AXIAL_DIRECTION @ (np.asarray(grid.spacing) * start)),
        modality=volume.modality,
        source=volume.source,
        description=volume.description,
    )
    return axial, box


def network_view(volume: CTVolume, maps: tuple[np.ndarray, ...] = ()) -> tuple[CTVolume, list[np.ndarray]]:
    """The axial volume :func:`segment_volume`'s networks read for ``volume``, and ``maps`` (label
    maps on ``volume``'s grid) carried the same way by nearest neighbour.

    A coronal or sagittal series is only reordered; an oblique one is resampled onto
    :func:`patient_axis_grid` and cut to the body's box. Training data made with it (a phantom
    stored in any plane, ``phantom:...,plane=drawn``) thus looks to a network as that scan will
    at segmentation time: the cascade trained on axial phantoms only lost most small findings of
    oblique series (docs/results-med3d.md).
    """
    if is_oblique(volume.direction):
        grid = patient_axis_grid(volume)
        axial, box = _oblique_on_grid(volume, grid)
        carried = [grid.to_grid(np.asarray(m), order=0, cval=0, dtype=np.asarray(m).dtype)[box] for m in maps]
        return axial, carried
    axial, order, flips = _reordered_axial(volume)
    return axial, [np.ascontiguousarray(_to_axial(np.asarray(m), order, flips)) for m in maps]


def _reordered_axial(volume: CTVolume) -> tuple[CTVolume, tuple[int, int, int], tuple[bool, bool, bool]]:
    """An axis-aligned (axial, coronal or sagittal) ``volume`` reordered to axial, with the axis
    order and flips that take results back to its own grid."""
    order, flips = axial_view(volume.direction)
    axial = CTVolume(
        hu=np.ascontiguousarray(_to_axial(np.asarray(volume.hu), order, flips)),
        spacing=tuple(volume.spacing[a] for a in order),
        modality=volume.modality,
        source=volume.source,
        description=volume.description,
    )
    return axial, order, flips


def _segment_oblique(
    volume: CTVolume,
    model_dir: str | Path | None,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
    started: float,
) -> SegmentationResult:
    """:func:`segment_volume` of an oblique series: segmented on :func:`patient_axis_grid` (the body's
    box of it), results brought back to the scan's own grid (labels by nearest neighbour, each
    finding's component with them; its centre, position and volume measured there)."""
    grid = patient_axis_grid(volume)
    axial, box = _oblique_on_grid(volume, grid)
    start = np.array([b.indices(n)[0] for b, n in zip(box, grid.shape)])
    result = _segment_on_grid(axial, model_dir, progress, should_stop, started)
    on_grid = np.zeros(grid.shape, dtype=result.labels.dtype)  # outside the body's box: background
    on_grid[box] = result.labels
    labels = grid.to_scan(on_grid, volume.shape)
    # each finding's component (1-based, in findings order) on the grid, sampled back exactly as the labels
    owner = np.zeros(grid.shape, dtype=np.uint16)
    for value in sorted({f.label for f in result.findings}):
        for voxels in finding_components(result.labels, value):
            for number, finding in enumerate(result.findings, start=1):
                if finding.label == value and (voxels == finding.voxel_zyx).all(axis=1).any():
                    owner[tuple((voxels + start).T)] = number
    owner_scan = grid.to_scan(owner, volume.shape) if result.findings else owner
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    findings = []
    for number, finding in enumerate(result.findings, start=1):
        voxels = np.argwhere(owner_scan == number)
        if len(voxels):
            centre = snapped_centre(voxels)
            count, volume_ml = len(voxels), round(len(voxels) * voxel_ml, 3)
        else:  # thinner than the scan's voxels: one voxel marks it, its volume is the grid's
            index = np.rint(grid.scan_index(np.asarray(finding.voxel_zyx) + start)).astype(int)
            centre = tuple(int(v) for v in np.clip(index, 0, np.asarray(volume.shape) - 1))
            labels[centre] = finding.label
            count, volume_ml = 1, finding.volume_ml
        position = volume.index_to_patient(centre)
        findings.append(
            dataclasses.replace(
                finding, voxel_zyx=centre, position_mm=tuple(round(float(p), 2) for p in position),
                volume_ml=volume_ml, voxel_count=int(count),
            )
        )
    names = [result.label_names[v] for v in range(len(result.label_names))]
    return dataclasses.replace(
        result,
        labels=labels,
        findings=findings,
        structure_volumes_ml=_structure_volumes(labels, names, voxel_ml),
        seconds=round(time.perf_counter() - started, 3),
        warnings=[*result.warnings, OBLIQUE_WARNING],
    )
