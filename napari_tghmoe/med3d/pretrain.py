"""PSAT pre-training (``tghmoe pretrain``): the 3D encoder learns the frozen 2D MLLM's language.

For fixed crops of unlabelled volumes (phantoms, M3D-Cap, CT-RATE), every ``slice_stride``-th
slice of each plane gets two frozen targets from our own TGH-MoE base (``resources/demo-model``
by default): the vision tower's embedding of that slice (fed as a 2-frame video, mean of the
merged tokens the LLM reads) and the LLM's input-embedding mean of the slice's text ("axial
slice 12 of 32 of a chest CT; shows liver, right kidney..."; organs and findings from the
phantom truth where there is one). They are computed once and cached (``targets.safetensors``)
so training never runs the 2D model. Each step encodes a few crops and asks PSAT for several
(plane, slice) pairs of each; the loss aligns PSAT's embedding with both targets (partial OT or
InfoNCE) and reconstructs the crop from the encoder's bottleneck (MSE).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_tghmoe.med3d.data import WorkingVolume, crop, crop_box
from napari_tghmoe.med3d.psat import PLANE_AXIS, PLANES
from napari_tghmoe.med3d.recipe import Med3DRecipe

TARGETS_NAME = "targets.safetensors"


@dataclass
class PretrainCrop:
    """One fixed crop of a volume with the slice positions that have targets."""

    image: np.ndarray  # (C, pz, py, px)
    hu: np.ndarray  # (pz, py, px)
    labels: np.ndarray | None
    name: str
    region: str
    positions: dict[str, list[int]]  # plane -> slice indices with targets


def fixed_crops(volumes: list[WorkingVolume], patch: tuple[int, int, int], per_volume: int, stride: int, seed: int) -> list[PretrainCrop]:
    """``per_volume`` crops around the body centre of each volume (jittered by a seeded draw)."""
    rng = np.random.default_rng([seed, 7])
    crops = []
    for volume in volumes:
        body = np.argwhere(volume.hu > -500) if volume.hu is not None else np.empty((0, 3))
        centre = body.mean(axis=0) if len(body) else np.array(volume.image.shape[1:]) / 2
        for index in range(per_volume):
            jitter = rng.uniform(-0.25, 0.25, 3) * np.array(patch) if index else np.zeros(3)
            box = crop_box(volume.image.shape[1:], patch, (centre + jitter).astype(int))
            hu = volume.hu if volume.hu is not None else np.full(volume.image.shape[1:], -1000.0, np.float32)
            crops.append(
                PretrainCrop(
                    image=crop(volume.image, box, patch),
                    hu=crop(hu, box, patch, fill=-1000.0),
                    labels=None if volume.labels is None else crop(volume.labels, box, patch),
                    name=f"{volume.name}#{index}",
                    region=volume.region,
                    positions={p: list(range(stride // 2, patch[PLANE_AXIS[p]], stride)) for p in PLANES},
                )
            )
    return crops


def _take_slice(array: np.ndarray, plane: str, index: int) -> np.ndarray:
    return np.take(array, index, axis=PLANE_AXIS[plane])


def slice_text(plane: str, index: int, count: int, region: str, labels: np.ndarray | None, config: Any, min_voxels: int = 10) -> str:
    """The slice's caption from ground truth: plane, position, organs and findings it shows."""
    text = f"{plane} slice {index + 1} of {count} of a {region} CT"
    if labels is None:
        return text
    counts = np.bincount(labels.ravel(), minlength=config.num_labels_total)
    names = config.label_names
    organs = [names[v] for v in range(1, 1 + len(config.organ_names)) if counts[v] >= min_voxels]
    findings = [names[v] for v in range(1 + len(config.organ_names), len(names)) if counts[v] > 0]
    text += "; shows " + (", ".join(organs) if organs else "no labelled organ")
    if findings:
        text += "; with " + ", ".join(findings)
    return text


def _frozen_2d_model(folder: str) -> tuple[Any, Any, Path]:
    import torch
    from transformers import AutoTokenizer

    from napari_tghmoe._resources import demo_model_path
    from napari_tghmoe.model.loading import OFFLINE_LOAD_KWARGS
    from napari_tghmoe.model.modeling import TGHMoEForConditionalGeneration

    path = demo_model_path() if folder == "demo" else Path(folder)
    model = TGHMoEForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32, **OFFLINE_LOAD_KWARGS)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer, path


def compute_targets(crops: list[PretrainCrop], config: Any, settings: Any, batch: int = 32) -> dict[str, Any]:
    """Frozen 2D targets of every (crop, plane, slice position): ``{key: (S, D) tensor}``.

    Keys ``image/{crop}/{plane}`` and ``text/{crop}/{plane}``; rows follow ``positions[plane]``.
    """
    import torch
    import torch.nn.functional as F

    from napari_tghmoe.model.preprocess import InputSettings, frames_to_patches, round_grid, window_channels

    model, tokenizer, _ = _frozen_2d_model(settings.target_model)
    inputs = InputSettings.from_config(model.config)
    size = settings.target_image_size
    multiple = inputs.patch_size * inputs.merge_size
    size = round_grid((1, size, size), 1, multiple)[1]  # the model's legal slice size nearest the setting
    video_id = int(model.config.video_token_id)
    tokens_per_slice = (size // inputs.patch_size) ** 2 // inputs.merge_size**2
    jobs = []
    for crop_index, item in enumerate(crops):
        for plane in PLANES:
            count = item.hu.shape[PLANE_AXIS[plane]]
            for row, index in enumerate(item.positions[plane]):
                labels = None if item.labels is None else _take_slice(item.labels, plane, index)
                jobs.append((crop_index, plane, row, index, slice_text(plane, index, count, item.region, labels, config)))
    image_out: dict[tuple[int, str], list] = {}
    text_out: dict[tuple[int, str], list] = {}
    with torch.inference_mode():
        for start in range(0, len(jobs), batch):
            chunk = jobs[start : start + batch]
            encoded = tokenizer([job[4] for job in chunk], return_tensors="pt", padding=True)
            mask = encoded["attention_mask"].bool()
            text = model.text_features(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], text_guidance_mask=mask)
            pixels, grids = [], []
            for crop_index, plane, _, index, _ in chunk:
                hu = torch.from_numpy(np.ascontiguousarray(_take_slice(crops[crop_index].hu, plane, index))).float()
                square = F.interpolate(hu[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
                frames = window_channels(square[None].repeat(inputs.temporal_patch_size, 1, 1), inputs)
                patches, grid = frames_to_patches(frames, inputs)
                pixels.append(patches)
                grids.append(grid)
            video_ids = torch.full((len(chunk), tokens_per_slice), video_id, dtype=torch.long)
            output, _ = model.encode_visual(
                torch.cat(pixels), torch.tensor(grids, dtype=torch.long), text, input_ids=video_ids, modality="video"
            )
            pooled = output.pooler_output
            if isinstance(pooled, (tuple, list)):  # one tensor per video
                pooled = torch.cat(list(pooled))
            merged = pooled.reshape(len(chunk), tokens_per_slice, -1).mean(1)
            for job, image_vec, text_vec in zip(chunk, merged, text):
                image_out.setdefault((job[0], job[1]), []).append(image_vec.float().clone())
                text_out.setdefault((job[0], job[1]), []).append(text_vec.float().clone())
    targets = {}
    for (crop_index, plane), rows in image_out.items():
        targets[f"image/{crop_index}/{plane}"] = torch.stack(rows)
        targets[f"text/{crop_index}/{plane}"] = torch.stack(text_out[(crop_index, plane)])
    return targets


def targets_key(crops: list[PretrainCrop], config: Any, settings: Any) -> str:
    """What the cached targets depend on (crops, slice positions, 2D model, captions' config)."""
    digest = hashlib.sha256()
    for item in crops:
        digest.update(item.name.encode())
        digest.update(np.ascontiguousarray(item.hu[::4, ::4, ::4]).tobytes())
        digest.update(json.dumps(item.positions, sort_keys=True).encode())
    digest.update(json.dumps([settings.target_model, settings.target_image_size, config.label_names]).encode())
    return digest.hexdigest()[:16]


def cached_targets(crops: list[PretrainCrop], config: Any, settings: Any, out_dir: Path) -> dict[str, Any]:
    """Targets from ``out_dir/targets.safetensors`` when they match these crops, else computed and saved."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = out_dir / TARGETS_NAME
    key = targets_key(crops, config, settings)
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") == key:
                return {name: handle.get_tensor(name) for name in handle.keys()}
    targets = compute_targets(crops, config, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in targets.items()}, str(path), metadata={"key": key})
    return targets


def pretrain(
    recipe: Med3DRecipe,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> Any:
    """Pre-train the recipe's encoder with PSAT into ``out_dir`` (a ``Med3DPretrainModel`` folder)."""
    import torch

    from napari_tghmoe.med3d.data import load_working_volumes
    from napari_tghmoe.med3d.encoder import Med3DPretrainModel
    from napari_tghmoe.med3d.losses import alignment_loss, reconstruction_loss
    from napari_tghmoe.med3d.training import run_loop

    out_dir = Path(out_dir)
    settings = recipe.pretrain
    config = recipe.config()
    volumes = load_working_volumes(recipe.data.train, config, labelled=False)
    patch = tuple(config.patch_size)
    crops = fixed_crops(volumes, patch, settings.crops_per_volume, settings.slice_stride, recipe.seed)
    targets = cached_targets(crops, config, settings, out_dir)
    target_dim = next(iter(targets.values())).shape[1]
    if target_dim != config.target_dim:
        config.target_dim = int(target_dim)
    torch.manual_seed(recipe.seed)
    model = Med3DPretrainModel(config)
    images = torch.from_numpy(np.stack([c.image for c in crops])).float()

    def step(model: Any, rng: np.random.Generator) -> dict[str, Any]:
        chosen = rng.choice(len(crops), size=min(settings.batch_size, len(crops)), replace=False)
        planes, slices, owner, image_rows, text_rows = [], [], [], [], []
        for batch_index, crop_index in enumerate(chosen):
            for _ in range(settings.slices_per_crop):
                plane_index = int(rng.integers(len(PLANES)))
                plane = PLANES[plane_index]
                row = int(rng.integers(len(crops[crop_index].positions[plane])))
                planes.append(plane_index)
                slices.append(crops[crop_index].positions[plane][row])
                owner.append(batch_index)
                image_rows.append(targets[f"image/{crop_index}/{plane}"][row])
                text_rows.append(targets[f"text/{crop_index}/{plane}"][row])
        device = next(model.parameters()).device
        output = model(
            images[torch.as_tensor(chosen)].to(device),
            torch.tensor(planes, device=device),
            torch.tensor(slices, device=device),
            torch.tensor(owner, device=device),
        )
        align = alignment_loss(
            output["embedding"],
            torch.stack(image_rows).to(device),
            torch.stack(text_rows).to(device),
            model.mahalanobis_factor,
            align=config.align,
            reg=config.ot_reg,
            mass=config.ot_mass,
            temperature=config.infonce_temperature,
        )
        recon = reconstruction_loss(output["reconstruction"], output["recon_target"])
        total = align["image"] + align["text"] + config.recon_weight * recon
        return {"total": total, "align_image": align["image"], "align_text": align["text"], "reconstruction": recon}

    summary = {"recipe": recipe.to_dict(), "crops": len(crops), "volumes": len(volumes), "target_model": settings.target_model}
    return run_loop(
        model, settings, out_dir, phase="pretrain", seed=recipe.seed, step_fn=step,
        resume=resume, progress=progress, stop_after=stop_after, summary=summary,
    )
