"""Fine-tune segmentation + finding classification (``tghmoe finetune-seg``).

Labelled phantoms on the working grid; each step draws crops of the sliding-window size,
half of them (``lesion_crop_fraction``) centred on a finding voxel so that the rare focal
labels are seen often (``lesion_sampling = "kind"``: each kind as often), optionally a share
(``lookalike_crop_fraction``) on structures that look like findings, the rest anywhere in the
body. Loss: Dice + cross-entropy (MONAI ``DiceCELoss``) over all labels, plus binary
cross-entropy of the finding-presence head against "does this crop hold a voxel of that kind". ``--init`` copies a pre-trained encoder
(``tghmoe pretrain`` output) in; without it the same network starts from scratch; a
segmentation model folder given as ``--init`` is trained further (its own architecture).
``label_fraction`` keeps the labels of that share of the training volumes (seeded choice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_tghmoe.med3d.data import crop, crop_box
from napari_tghmoe.med3d.recipe import Med3DRecipe


#: Settings that act only after the network (which components count as findings): a continued
#: model takes them from the recipe; its architecture and weights stay its own.
INFERENCE_SETTINGS = ("finding_sites", "min_finding_probability", "min_finding_ml")


def labelled_subset(count: int, fraction: float, seed: int) -> list[int]:
    """Indices of the volumes whose labels a ``fraction`` run uses (at least one)."""
    keep = max(1, int(round(count * fraction)))
    return sorted(np.random.default_rng([seed, 11]).permutation(count)[:keep].tolist())


def segmentation_loss_for(settings: Any, num_labels: int) -> Any:
    """The recipe's per-voxel loss (MONAI): Dice + cross-entropy, or Dice + focal.

    For a finding model, whose labels are a few hundred of 32 768 voxels of a crop centred on a
    10 mm lesion, two settings matter: ``background_weight`` < 1 keeps the many easy background
    voxels from drowning the lesion's cross-entropy, and ``batch_dice`` takes one Dice per label
    over the batch, so a kind absent from one crop does not push that crop towards predicting
    nothing. (Measured on six fixed lesion crops, 80 steps: Dice + focal reached a mean
    probability of 0.42 for the true kind on lesion voxels, weighted Dice + CE 0.79.)
    """
    import torch
    from monai.losses import DiceCELoss, DiceFocalLoss

    weight = None
    if settings.background_weight != 1.0:
        weight = torch.ones(num_labels)
        weight[0] = settings.background_weight
    if settings.loss == "dice_focal":
        return DiceFocalLoss(
            to_onehot_y=True, softmax=True, gamma=settings.focal_gamma, batch=settings.batch_dice, weight=weight
        )
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=settings.batch_dice, weight=weight)


def organ_context_reader(config: Any, settings: Any) -> Any:
    """For a finding model with ``context_groups``: adds the organ model's context channels.

    The organ labels come from the organ model itself (``finetune.context_model``), as at
    segmentation time, so the finding model learns from the context it will be given.
    """
    if not config.context_groups:
        return None
    from napari_tghmoe._resources import resources_dir
    from napari_tghmoe.med3d.encoder import load_seg_model
    from napari_tghmoe.med3d.segment import check_cascade, organ_only_labels, with_organ_context

    if not settings.context_model:
        raise ValueError("[model] context_groups needs [finetune] context_model (the organ model folder, or \"demo\")")
    folder = Path(resources_dir()) / "demo-seg-model" if settings.context_model == "demo" else Path(settings.context_model)
    organs = load_seg_model(folder)
    check_cascade(organs.config, config, folder)

    def add(volume: Any, image: np.ndarray) -> np.ndarray:
        return with_organ_context(image, config, (organ_only_labels(organs, volume), organs.config.label_names))

    return add


def crop_centre_pool(
    draw: float, settings: Any, lesions: np.ndarray, lookalikes: np.ndarray | None, body: np.ndarray
) -> np.ndarray:
    """Where a crop is centred, for a uniform ``draw`` in [0, 1).

    The first ``lesion_crop_fraction`` of draws go to a finding voxel, the next
    ``lookalike_crop_fraction`` to a look-alike structure (hard negatives), the rest anywhere in
    the body; a volume without findings or look-alikes gives the body instead.
    """
    lesion_share = settings.lesion_crop_fraction
    if draw < lesion_share and len(lesions):
        return lesions
    if lesion_share <= draw < lesion_share + settings.lookalike_crop_fraction and lookalikes is not None and len(lookalikes):
        return lookalikes
    return body


def finding_instances(labels: list[np.ndarray], config: Any) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Per finding kind: (volume index, working-grid voxels (N, 3)) of each finding of it.

    One finding is one connected component (26-neighbour) of its kind's label.
    """
    from napari_tghmoe.med3d.segment import finding_components

    instances: dict[str, list[tuple[int, np.ndarray]]] = {}
    for index, volume_labels in enumerate(labels):
        for kind in config.finding_kinds:
            for voxels in finding_components(volume_labels, config.finding_label(kind)):
                instances.setdefault(kind, []).append((index, voxels))
    return instances


def draw_finding(rng: np.random.Generator, instances: dict[str, list[tuple[int, np.ndarray]]]) -> tuple[int, np.ndarray]:
    """A kind uniformly, then one finding of it uniformly: (volume index, that finding's voxels)."""
    kinds = sorted(instances)
    kind = kinds[int(rng.integers(len(kinds)))]
    return instances[kind][int(rng.integers(len(instances[kind])))]


def _is_seg_folder(folder: str | Path) -> bool:
    import json

    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    return "Med3DSegModel" in (json.loads(config.read_text()).get("architectures") or [])


def finetune(
    recipe: Med3DRecipe,
    out_dir: str | Path,
    *,
    init: str | Path | None = None,
    label_fraction: float | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> Any:
    """Fine-tune the recipe's segmentation model into ``out_dir`` (a ``Med3DSegModel`` folder)."""
    import torch

    from napari_tghmoe.med3d.data import load_working_volumes
    from napari_tghmoe.med3d.encoder import Med3DSegModel, copy_encoder, load_pretrain_model, load_seg_model
    from napari_tghmoe.med3d.training import run_loop

    out_dir = Path(out_dir)
    settings = recipe.finetune
    fraction = settings.label_fraction if label_fraction is None else float(label_fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    config = recipe.config()
    torch.manual_seed(recipe.seed + 1)
    model = Med3DSegModel(config)
    copied = 0
    continued = False
    if init is not None and _is_seg_folder(init):
        # Continue fine-tuning a segmentation model: its own architecture and weights.
        model = load_seg_model(init).train()
        config = model.config
        continued = True
        wanted = recipe.config()  # what decides which components are findings comes from the recipe
        for key in INFERENCE_SETTINGS:
            setattr(config, key, getattr(wanted, key))
    elif init is not None:
        pretrained = load_pretrain_model(init)
        # Convolution weights do not depend on the window size, so a finer-grid model with
        # smaller windows (the cascade's finding model) still starts from the pre-trained encoder;
        # tensors whose shape differs (e.g. a first layer with more input channels) stay fresh.
        if pretrained.config.encoder != config.encoder:
            raise ValueError(f"{init}: pre-trained with encoder {pretrained.config.encoder}, the recipe asks {config.encoder}")
        copied = copy_encoder(pretrained, model)
        del pretrained
    volumes = load_working_volumes(
        recipe.data.train, config, labelled=True, compact=True, extra_channels=organ_context_reader(config, settings),
        lookalikes=settings.lookalike_structures if settings.lookalike_crop_fraction > 0 else (),
    )
    chosen_volumes = [volumes[i] for i in labelled_subset(len(volumes), fraction, recipe.seed)]
    patch = tuple(config.patch_size)
    organ_count = len(config.organ_names)
    kinds = config.finding_kinds
    first_finding = 1 + organ_count
    lesion_voxels = [np.argwhere(v.labels >= first_finding) for v in chosen_volumes]
    instances = finding_instances([v.labels for v in chosen_volumes], config) if settings.lesion_sampling == "kind" else {}
    soft_tissue = len(config.ct_windows) - 1  # the soft-tissue window channel: > 0 is above -160 HU
    body_voxels = [np.argwhere(v.image[soft_tissue] > 0.0)[::7] for v in chosen_volumes]
    segmentation_loss = segmentation_loss_for(settings, config.num_labels_total)
    bce = torch.nn.BCEWithLogitsLoss()

    def draw_crop(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        draw = rng.random()
        if instances and draw < settings.lesion_crop_fraction:
            index, pool = draw_finding(rng, instances)
            volume = chosen_volumes[index]
        else:
            index = int(rng.integers(len(chosen_volumes)))
            volume = chosen_volumes[index]
            pool = crop_centre_pool(draw, settings, lesion_voxels[index], volume.lookalike_voxels, body_voxels[index])
        if len(pool) == 0:
            centre = np.array(volume.labels.shape) // 2
        else:
            centre = pool[int(rng.integers(len(pool)))] + rng.integers(-patch[0] // 4, patch[0] // 4 + 1, 3)
        box = crop_box(volume.labels.shape, patch, centre)
        return crop(volume.image, box, patch).astype(np.float32), crop(volume.labels, box, patch)

    def step(model: Any, rng: np.random.Generator) -> dict[str, Any]:
        pairs = [draw_crop(rng) for _ in range(settings.batch_size)]
        device = next(model.parameters()).device
        images = torch.from_numpy(np.stack([p[0] for p in pairs])).float().to(device)
        labels = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)).to(device)
        presence = torch.stack(
            [torch.stack([(labels[b] == config.finding_label(k)).any() for k in kinds]) for b in range(len(pairs))]
        ).float()
        logits, finding_logits = model(images)
        segmentation = segmentation_loss(logits, labels[:, None])
        classification = bce(finding_logits, presence)
        total = segmentation + settings.classification_weight * classification
        return {"total": total, "segmentation": segmentation, "classification": classification}

    summary = {
        "recipe": recipe.to_dict(),
        "init": str(init) if init else None,
        "encoder_tensors_from_init": copied,
        "continued_from_segmentation_model": continued,
        "label_fraction": fraction,
        "labelled_volumes": [v.name for v in chosen_volumes],
        "training_volumes": len(volumes),
    }
    return run_loop(
        model, settings, out_dir, phase="finetune", seed=recipe.seed, step_fn=step,
        resume=resume, progress=progress, stop_after=stop_after, summary=summary,
    )
