"""The finding verifier: a second look at each component the finding model proposes.

Why a third model. The cascade's finding model labels voxels from 64 mm windows; on phantoms it
finds most lesions, but it also calls fluid-filled bowel loops "enlarged lymph node" and
pulmonary vessels "lung nodule" (docs/results-med3d.md: 10 false findings per volume). Locally,
at 2 mm, such a look-alike and a lesion are the same blob; what tells them apart is the shape
around it (a tube, not a ball) and where it lies. Computer-aided detection has long been built in
two stages for this reason (candidate generation, then false-positive reduction, as in the
LUNA16 nodule challenge): the verifier is a small 3D classifier (MONAI ``Classifier``) that sees
a wider crop around one candidate, with the candidate's own mask as one more channel, and says
which finding kind it is, or none (class 0). It is trained on the finding model's own proposals
on training phantoms (``tghmoe train-verifier``), so it learns exactly the mistakes that model
makes, and in ``segment_volume`` a component the verifier gives less than
``verifier_min_probability`` for its kind goes back to the organ labels.

A verifier is a ``Med3DConfig`` folder (architecture ``Med3DFindingVerifier``) holding the finding
model's windows, context groups and grid, ``patch_size`` as its crop and ``verifier_channels``.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from napari_tghmoe.med3d.encoder import Med3DConfig, _Med3DBase, _quiet_loading, read_folder_config

VERIFIER_ARCHITECTURE = "Med3DFindingVerifier"
CANDIDATES_NAME = "candidates.npz"


class Med3DFindingVerifier(_Med3DBase):
    """(B, C + 1, *crop) crops (CT windows, organ context, candidate mask) -> (B, 1 + K) logits.

    Class 0 is "not a finding", class k the k-th finding kind.
    """

    def __init__(self, config: Med3DConfig) -> None:
        super().__init__(config)
        from monai.networks.nets import Classifier

        channels = list(config.verifier_channels)
        self.net = Classifier(
            in_shape=(config.in_channels + 1, *config.patch_size),
            classes=1 + len(config.finding_kinds),
            channels=channels,
            strides=[2] * len(channels),
            num_res_units=1,
        )
        self.post_init()

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net(crops)


def verifier_config(
    finder_config: Med3DConfig, crop: Sequence[int], channels: Sequence[int], min_probability: float,
    grow_lung_masks: bool = False,
) -> Med3DConfig:
    """A verifier's config: the finding model's inputs (windows, context, grid, kinds), its own crop."""
    values = finder_config.to_dict()
    for key in ("architectures", "model_type", "transformers_version", "finding_model", "finding_verifier"):
        values.pop(key, None)
    values.update(
        patch_size=[int(c) for c in crop],
        verifier_channels=[int(c) for c in channels],
        verifier_min_probability=float(min_probability),
        architectures=[VERIFIER_ARCHITECTURE],
    )
    if grow_lung_masks:
        values["verifier_grow_lung_masks"] = True
    return Med3DConfig(**values)


@dataclass
class VerifierEnsemble:
    """Verifiers of one finding model whose probabilities are averaged; ``members[0]`` is the folder's own.

    Why: two verifiers trained on different crops (v6 on axial phantoms, v7 with phantoms stored in
    every plane) err on different candidates, so their mean separates findings from look-alikes
    better than either (docs/results-med3d.md, "Scans in other planes"), as ensembles of CNNs did
    for false-positive reduction in the LUNA16 challenge. The other members live in sub-folders
    of the verifier folder named by its config's ``verifier_members``.
    """

    members: list[Med3DFindingVerifier]

    @property
    def config(self) -> Med3DConfig:
        return self.members[0].config


def _load_one_verifier(folder: Path) -> Med3DFindingVerifier:
    read_folder_config(folder, VERIFIER_ARCHITECTURE)
    with _quiet_loading():
        model = Med3DFindingVerifier.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    return model.float().eval()


def load_verifier(folder: str | Path) -> Med3DFindingVerifier | VerifierEnsemble:
    """The verifier in ``folder``; a :class:`VerifierEnsemble` when its config names members."""
    from napari_tghmoe.med3d.types import SegModelError

    folder = Path(folder)
    main = _load_one_verifier(folder)
    names = list(getattr(main.config, "verifier_members", None) or [])
    if not names:
        return main
    members = [main]
    for name in names:
        member = _load_one_verifier(folder / name)
        same = (
            list(member.config.finding_kinds) == list(main.config.finding_kinds)
            and member.config.in_channels == main.config.in_channels
            and list(member.config.working_spacing) == list(main.config.working_spacing)
            and list(member.config.patch_size) == list(main.config.patch_size)
        )
        if not same:
            raise SegModelError(f"{folder / name}: this ensemble member checks another finding model or crop than {folder}")
        members.append(member)
    return VerifierEnsemble(members)


def save_verifier(verifier: Med3DFindingVerifier | VerifierEnsemble, folder: str | Path) -> None:
    """``verifier`` into ``folder`` (an ensemble's other members as ``member-1``, ``member-2``... in it)."""
    folder = Path(folder)
    members = verifier.members if isinstance(verifier, VerifierEnsemble) else [verifier]
    names = [f"member-{n}" for n in range(1, len(members))]
    main = members[0]
    main.config.verifier_members = names
    with _quiet_loading():
        main.save_pretrained(str(folder), safe_serialization=True)
        for name, member in zip(names, members[1:]):
            member.config.verifier_members = []
            member.save_pretrained(str(folder / name), safe_serialization=True)


def verifier_ensemble(verifiers: Sequence[Med3DFindingVerifier | VerifierEnsemble]) -> Med3DFindingVerifier | VerifierEnsemble:
    """One verifier from several (``tghmoe seg-bundle --verifier A B``): the first alone, or their ensemble."""
    members = [m for v in verifiers for m in (v.members if isinstance(v, VerifierEnsemble) else [v])]
    return members[0] if len(members) == 1 else VerifierEnsemble(members)


# --------------------------------------------------------------------------- crops


def candidate_crop(image: np.ndarray, voxels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(C + 1, *size) float32: ``image`` channels around the candidate plus its mask (1 on ``voxels``)."""
    from napari_tghmoe.med3d.data import crop, crop_box
    from napari_tghmoe.med3d.segment import snapped_centre

    mask = np.zeros(image.shape[1:], dtype=np.float32)
    mask[tuple(voxels.T)] = 1.0
    box = crop_box(mask.shape, size, snapped_centre(voxels))
    return np.concatenate([crop(image, box, size).astype(np.float32), crop(mask, box, size)[None]], axis=0)


#: Denser than aerated lung: -400 HU (lung parenchyma is about -850, a nodule soft tissue).
DENSER_THAN_LUNG_HU = -400.0


def lung_channel(config: Any) -> int | None:
    """Index of the lungs' organ-context channel in a verifier crop (None without one)."""
    for index, group in enumerate(config.context_groups or []):
        if any("lobe" in name or "lung" in name for name in group):
            return len(config.ct_windows) + index
    return None


def grow_lung_mask(crop: np.ndarray, config: Any) -> np.ndarray:
    """The crop with its mask channel grown to the structure's own extent, for a candidate in the lungs.

    Why: the verifier reads the mask channel as the candidate's shape, and the finder's component
    often covers only part of a true nodule; a partial mask inside a ball looks like a vessel cut
    across, and such nodules were the ones the verifier dropped (docs/results-med3d.md). Grown
    through the connected voxels denser than lung inside the lungs' outline (holes filled: the
    organ model does not label nodule voxels as lung), a nodule shows as a whole ball. A candidate
    whose surroundings are not mostly lung, or a crop without a lung channel, is left as it is.
    """
    from scipy import ndimage

    channel = lung_channel(config)
    mask = crop[-1] > 0.5
    if channel is None or not mask.any():
        return crop
    lungs = crop[channel] > 0.5
    shell = ndimage.binary_dilation(mask, iterations=2) & ~mask
    if not shell.any() or lungs[shell].mean() < 0.5:
        return crop
    centre, width = config.ct_windows[0]
    threshold = (DENSER_THAN_LUNG_HU - (centre - width / 2.0)) / width  # on the first window's [0, 1] scale
    region = ((crop[0] > threshold) & ndimage.binary_fill_holes(lungs)) | mask
    labels, _ = ndimage.label(region)
    touched = np.unique(labels[mask])
    grown = crop.copy()
    grown[-1] = np.isin(labels, touched[touched > 0])
    return grown


#: The eight flips of a crop (sets of spatial axes): the verifier learnt with random flips, and the
#: mean over all eight is steadier than any one view (test-time augmentation).
FLIPS = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)]


def verify(
    verifier: Med3DFindingVerifier | VerifierEnsemble, image: np.ndarray, candidates: Sequence[tuple[str, np.ndarray]]
) -> list[float]:
    """Probability the verifier gives each (kind, working-grid voxels) candidate of being that kind.

    The mean of its softmax over the eight flips of each crop (and over an ensemble's members).
    """
    if not candidates:
        return []
    members = verifier.members if isinstance(verifier, VerifierEnsemble) else [verifier]
    config = verifier.config
    plain = [candidate_crop(image, voxels, config.patch_size) for _, voxels in candidates]
    views: dict[bool, torch.Tensor] = {}
    per_member = []
    for member in members:
        grow = bool(getattr(member.config, "verifier_grow_lung_masks", False))
        if grow not in views:
            views[grow] = torch.from_numpy(np.stack([grow_lung_mask(c, member.config) if grow else c for c in plain]))
        crops = views[grow].to(next(member.parameters()).device)
        with torch.inference_mode():
            per_member.append(torch.stack(
                [torch.softmax(member(torch.flip(crops, axes) if axes else crops).float(), dim=1) for axes in FLIPS]
            ).mean(0).cpu())
    probabilities = torch.stack(per_member).mean(0).numpy()
    return [float(probabilities[i, 1 + config.finding_kinds.index(kind)]) for i, (kind, _) in enumerate(candidates)]


# --------------------------------------------------------------------------- mining


@dataclass
class CandidateSet:
    """Training crops for the verifier: (N, C + 1, *crop) float16 and their classes (0 = none)."""

    crops: np.ndarray
    targets: np.ndarray
    proposed: np.ndarray  # 1 where the crop is a finding-model proposal, 0 for an added true finding

    def save(self, path: Path) -> None:
        np.savez(path, crops=self.crops, targets=self.targets, proposed=self.proposed)

    @classmethod
    def load(cls, path: Path) -> "CandidateSet":
        data = np.load(path)
        return cls(data["crops"], data["targets"], data["proposed"])

    def __add__(self, other: "CandidateSet") -> "CandidateSet":
        return CandidateSet(
            np.concatenate([self.crops, other.crops]), np.concatenate([self.targets, other.targets]),
            np.concatenate([self.proposed, other.proposed]),
        )


def proposals(labels: np.ndarray, config: Med3DConfig, min_voxels: int) -> list[tuple[str, np.ndarray]]:
    """(kind, voxels) of every connected component of each finding label on a working grid."""
    from napari_tghmoe.med3d.segment import finding_components

    found = []
    for kind in config.finding_kinds:
        for voxels in finding_components(labels, config.finding_label(kind), min_voxels):
            found.append((kind, voxels))
    return found


def labelled_volumes(specs: Sequence[str], config: Med3DConfig, extra_channels: Any = None) -> Iterator[Any]:
    """Phantom working volumes one at a time (a hundred at 2 mm would not fit in memory at once)."""
    from napari_tghmoe.med3d.data import iter_phantoms, phantom_working_volume

    for spec in specs:
        if not spec.strip().lower().startswith("phantom:"):
            raise ValueError(f"{spec}: the verifier learns from labelled volumes (phantom specs); this spec has none")
        for phantom in iter_phantoms(spec):
            yield phantom_working_volume(phantom, config, extra_channels)


def mine_candidates(
    finder: Any, volumes: Iterable[Any], crop_size: Sequence[int], log: Any = None, propose: bool = True
) -> CandidateSet:
    """The finding model's proposals on labelled working volumes, each with its true class.

    A proposal of kind k is class k when it touches a true finding of kind k, else class 0 (a
    look-alike). Every true finding is also added once with its own mask (class = its kind), so
    kinds the finding model still proposes rarely have examples too. ``propose=False``: the true
    findings only (no finding-model pass).
    """
    from napari_tghmoe.med3d.finetune import finding_instances
    from napari_tghmoe.med3d.segment import predict_working_grid

    config = finder.config
    voxel_ml = float(np.prod(config.working_spacing)) / 1000.0
    min_voxels = max(1, int(np.ceil(config.min_finding_ml / voxel_ml))) if config.min_finding_ml > 0 else 1
    crops, targets, proposed = [], [], []
    for volume in volumes:
        started = time.perf_counter()
        image = volume.image.astype(np.float32)
        labels = predict_working_grid(finder, image)[0] if propose else np.zeros_like(volume.labels)
        false = 0
        for kind, voxels in proposals(labels, config, min_voxels):
            true = bool((volume.labels[tuple(voxels.T)] == config.finding_label(kind)).any())
            crops.append(candidate_crop(image, voxels, crop_size).astype(np.float16))
            targets.append(1 + config.finding_kinds.index(kind) if true else 0)
            proposed.append(1)
            false += not true
        truths = finding_instances([volume.labels], config)
        for kind, found in truths.items():
            for _, voxels in found:
                crops.append(candidate_crop(image, voxels, crop_size).astype(np.float16))
                targets.append(1 + config.finding_kinds.index(kind))
                proposed.append(0)
        if log is not None:
            log(f"{volume.name}: {false} look-alikes, {sum(len(v) for v in truths.values())} true findings, "
                f"{time.perf_counter() - started:.0f} s")
    channels = config.in_channels + 1
    return CandidateSet(
        crops=np.stack(crops) if crops else np.zeros((0, channels, *crop_size), np.float16),
        targets=np.asarray(targets, dtype=np.int64),
        proposed=np.asarray(proposed, dtype=np.int8),
    )


# --------------------------------------------------------------------------- training


def train_verifier(
    recipe: Any,
    finder_dir: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Any = None,
) -> Any:
    """``tghmoe train-verifier``: mine the finding model's proposals, then train the verifier.

    The finding model (``finder_dir``, a finding-only segmentation folder) reads its organ context
    from ``[finetune] context_model`` as in its own training. Mined crops are cached in
    ``out_dir/candidates.npz`` (a resumed run does not mine again).
    """
    from napari_tghmoe.med3d.encoder import load_seg_model
    from napari_tghmoe.med3d.finetune import organ_context_reader
    from napari_tghmoe.med3d.training import run_loop

    settings = recipe.verifier
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    finder = load_seg_model(finder_dir)
    if finder.config.organ_names:
        from napari_tghmoe.med3d.types import SegModelError

        raise SegModelError(f"{finder_dir}: a verifier checks a finding model (finding kinds only); this one also has organs")
    crop_size = tuple(int(c) for c in settings.crop_size)
    cache = out_dir / CANDIDATES_NAME
    if cache.is_file():
        candidates = CandidateSet.load(cache)
    else:
        context = organ_context_reader(finder.config, recipe.finetune)
        candidates = mine_candidates(finder, labelled_volumes(settings.data, finder.config, context), crop_size, log=log)
        if settings.truth_data:
            truths = labelled_volumes(settings.truth_data, finder.config, context)
            candidates = candidates + mine_candidates(finder, truths, crop_size, log=log, propose=False)
        candidates.save(cache)
    if len(candidates.targets) == 0:
        raise ValueError(f"{finder_dir}: the finding model proposed nothing and the data hold no finding to learn from")
    config = verifier_config(
        finder.config, crop_size, settings.channels, settings.min_probability, settings.grow_lung_masks
    )
    if settings.grow_lung_masks:  # the cache holds the finder's own masks; grow them as verify() will
        grown = [grow_lung_mask(crop.astype(np.float32), config).astype(np.float16) for crop in candidates.crops]
        candidates = CandidateSet(np.stack(grown), candidates.targets, candidates.proposed)
    torch.manual_seed(recipe.seed + 3)
    model = Med3DFindingVerifier(config)
    positives = np.flatnonzero(candidates.targets > 0)
    negatives = np.flatnonzero(candidates.targets == 0)
    by_kind = [np.flatnonzero(candidates.targets == k) for k in np.unique(candidates.targets[positives])]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)

    def draw(rng: np.random.Generator) -> int:
        if (rng.random() < settings.positive_fraction and len(positives)) or not len(negatives):
            pool = by_kind[int(rng.integers(len(by_kind)))]  # each kind as often, however rare
        else:
            pool = negatives
        return int(pool[int(rng.integers(len(pool)))])

    def step(model: Any, rng: np.random.Generator) -> dict[str, Any]:
        chosen = [draw(rng) for _ in range(settings.batch_size)]
        batch = candidates.crops[chosen].astype(np.float32)
        for axis in (2, 3, 4):  # left-right and other flips: a lesion is a lesion either way round
            flip = rng.random(len(chosen)) < 0.5
            batch[flip] = np.flip(batch[flip], axis=axis)
        if settings.max_shift > 0:
            for i, shift in enumerate(rng.integers(-settings.max_shift, settings.max_shift + 1, (len(chosen), 3))):
                batch[i] = np.roll(batch[i], tuple(int(v) for v in shift), axis=(1, 2, 3))
        device = next(model.parameters()).device
        logits = model(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
        targets = torch.from_numpy(candidates.targets[chosen]).to(device)
        loss = loss_fn(logits, targets)
        accuracy = (logits.argmax(1) == targets).float().mean()
        return {"total": loss, "accuracy": accuracy}

    summary = {
        "recipe": recipe.to_dict(),
        "finding_model": str(finder_dir),
        "candidates": int(len(candidates.targets)),
        "look_alikes": int(len(negatives)),
        "true_findings": int(len(positives)),
        "proposals": int(candidates.proposed.sum()),
    }
    (out_dir / "candidates.json").write_text(json.dumps(summary, indent=2) + "\n")
    return run_loop(
        model, settings, out_dir, phase="verify", seed=recipe.seed, step_fn=step,
        resume=resume, progress=progress, summary=summary,
    )
