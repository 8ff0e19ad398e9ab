"""Dense phantom supervision for a vision tower trained from scratch (the demo model only).

A real Qwen2.5-VL base brings a pretrained vision transformer; the demo's tiny base starts
random, and the language-model loss alone (one answer letter per closed question) teaches it
to *see* too slowly for a CPU budget: after 1,900 steps the demo answered phase, organ and
location questions at chance while plane questions (answerable from the text) were right.

So stage 1 of the demo may add an auxiliary loss on the vision tower's merged tokens (what the
LLM reads), from the phantom's ground truth:

* per patch, which finding kinds it holds a voxel of and in which reported location they lie
  (multi-label, 2x2 patches per merged token, in the merger's order; from the phantom's lesion
  mask ``Phantom.lesions`` resampled as the image is, :func:`lesion_patch_targets`), so every LLM visual token
  says what lies where in words the report uses (the LLM's attention values carry no position,
  and the vision tower has no absolute position embedding, so "left upper lobe" must be in the
  token's content);
* the contrast phase, from every token on its own (a global fact each token should carry, so
  that whatever the LLM attends to tells it).

Both heads read the tokens RMS-normalised, as the LLM's first layer does.

Per-patch labels alone can be met by anatomy: a head that lights up wherever a liver lesion
*could* be keeps the per-patch loss low while it cannot tell a volume with a lesion from one
without (the demo's phase-6 probe: volume-level AUC at chance for most focal kinds,
``tghmoe probe-detection``, :mod:`napari_tghmoe.train.detection`, docs/results.md). So a ``presence`` weight adds the volume-level
question as multiple-instance learning: the highest patch logit of each kind (and location) must
say whether the volume has one.

The heads are thrown away after training: the saved model is a plain TGH-MoE checkpoint. The
loss is only computed for samples that carry phantom ground truth (``meta["phantom_findings"]``
and the lesion mask the phantom cache puts in ``CTVolume.metadata["phantom_lesions"]``).

The per-patch targets were once each finding's bounding box around its centre (``box_patch_targets``
and the script that measured it, ``scripts/probe_target_coverage.py``, are in commit 1b24178):
only 42-66 % of the patches it marked held a lesion voxel, and 86 % of an effusion's fluid
patches were left negative, because an effusion's ``size_mm`` is the depth of a crescent that
runs along the whole chest wall.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_tghmoe.phantom._types import FINDING_KINDS, KIND_LOCATIONS, PHASES

KINDS: tuple[str, ...] = tuple(FINDING_KINDS)
#: Per-patch losses: ``balanced`` (:func:`balanced_bce`) or ``hard`` (:func:`hard_negative_bce`).
DENSE_LOSSES = ("balanced", "hard")
#: Every location a finding can be reported in ("left upper lobe", "subcarinal region", ...).
LOCATIONS: tuple[str, ...] = tuple(dict.fromkeys(loc for locs in KIND_LOCATIONS.values() for loc in locs))


#: Where the phantom cache puts the lesion mask on the volume (``read_phantom_cache``).
LESIONS_KEY = "phantom_lesions"


def lesion_patch_targets(
    lesions: np.ndarray,
    findings: Sequence[dict[str, Any]],
    grid: Sequence[int],
    temporal_patch: int,
    patch: int,
    merge: int,
    field: str = "kind",
    vocabulary: Sequence[str] = KINDS,
) -> np.ndarray:
    """(tokens, merge*merge, len(vocabulary)) 0/1 array: does patch j of token i hold a voxel of a
    finding whose ``field`` (its kind, or its location) is word k.

    ``lesions``: the phantom's (z, y, x) mask, ``i + 1`` on the voxels of ``findings[i]``
    (``Phantom.lesions``). Each word's mask is resampled onto the model ``grid`` with
    :func:`napari_tghmoe.model.preprocess.resample_to_grid`, the very resampling the image gets, and
    a grid voxel belongs to the word when any of the word's voxels contributes to it (resampled
    fraction > 0; on a grid equal to the volume's that is the mask itself). A patch is positive iff
    it holds such a voxel. Tokens come in the merger's order (slab, block row, block column),
    patches within a token row-major.
    """
    from napari_tghmoe.model.preprocess import resample_to_grid

    depth, height, width = (int(g) for g in grid)
    t, h, w = depth // temporal_patch, height // patch, width // patch
    lesions = np.asarray(lesions)
    if lesions.ndim != 3:
        raise ValueError(f"the lesion mask must be (z, y, x), got shape {lesions.shape}")
    per_patch = np.zeros((t, h, w, len(vocabulary)), dtype=np.float32)
    words: dict[int, list[int]] = {}
    for index, finding in enumerate(findings):
        if finding.get(field) in vocabulary:
            words.setdefault(list(vocabulary).index(finding[field]), []).append(index + 1)
    for word, values in words.items():
        mask = np.isin(lesions, values)
        if not mask.any():
            continue
        on_grid = resample_to_grid(mask.astype(np.float32), (depth, height, width)).numpy() > 0
        cells = on_grid[: t * temporal_patch, : h * patch, : w * patch].reshape(t, temporal_patch, h, patch, w, patch)
        per_patch[..., word] = cells.any(axis=(1, 3, 5))
    blocks = per_patch.reshape(t, h // merge, merge, w // merge, merge, len(vocabulary))
    return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(t * (h // merge) * (w // merge), merge * merge, len(vocabulary))


def sample_patch_targets(
    volume: Any,
    findings: Sequence[dict[str, Any]],
    grid: Sequence[int],
    temporal_patch: int,
    patch: int,
    merge: int,
    field: str = "kind",
    vocabulary: Sequence[str] = KINDS,
    sample_id: str = "?",
) -> np.ndarray:
    """:func:`lesion_patch_targets` from the mask a phantom-cache ``CTVolume`` carries.

    A volume with findings but no mask is an error (an old cache, or a volume built by hand):
    falling back to boxes would silently teach the wrong patches.
    """
    lesions = (getattr(volume, "metadata", None) or {}).get(LESIONS_KEY)
    if lesions is None:
        if any(finding.get(field) in vocabulary for finding in findings):
            raise ValueError(
                f"sample {sample_id}: phantom findings but no lesion mask (CTVolume.metadata[{LESIONS_KEY!r}]); "
                "load phantoms through the phantom cache (napari_tghmoe.datasets.load_phantoms)"
            )
        lesions = np.zeros(np.asarray(volume.hu).shape, dtype=np.uint8)
    return lesion_patch_targets(lesions, findings, grid, temporal_patch, patch, merge, field=field, vocabulary=vocabulary)


def rms_normalised(tokens: Any) -> Any:
    """Tokens as the LLM's first RMSNorm sees them (scale-free): the heads must find the
    information in the direction of each token, where attention can read it, not in its norm."""
    return tokens * tokens.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()


def balanced_bce(logits: Any, target: Any) -> Any:
    """Binary cross-entropy with positives and negatives weighted half each.

    A finding covers a handful of the ~2,700 (patch, kind) cells of a volume; a plain mean
    would be near zero while every finding is missed.
    """
    import torch.nn.functional as F

    losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    positive = target > 0.5
    negative_part = losses[~positive].mean()
    if not bool(positive.any()):
        return negative_part
    return 0.5 * losses[positive].mean() + 0.5 * negative_part


def hard_negative_bce(logits: Any, target: Any, hardest: int = 32) -> Any:
    """Binary cross-entropy of every positive cell against the ``hardest`` negative cells of each
    unit (one volume's cells of one kind), positives and negatives weighted half each.

    ``logits``/``target``: (units, cells). Why not :func:`balanced_bce`: a lesion lies in an organ,
    and the organ's lesion-free cells are a sliver of a volume's negatives, so lighting up the
    whole organ costs a balanced BCE almost nothing and already ranks lesion cells above nearly
    every other cell; the lesion itself is never learnt (a CNN trained so put its highest cell
    inside the organ but off the lesion in every held-out volume, docs/results.md). A volume is
    read by its highest cell, so the cells that compete with a lesion are the ones to push down.
    """
    import torch
    import torch.nn.functional as F

    positive = target > 0.5
    negatives = logits.masked_fill(positive, float("-inf"))
    hardest = min(int(hardest), logits.shape[-1])
    hard = negatives.topk(hardest, dim=-1).values
    hard = hard[torch.isfinite(hard)]
    negative_part = F.binary_cross_entropy_with_logits(hard, torch.zeros_like(hard))
    if not bool(positive.any()):
        return negative_part
    positive_part = F.binary_cross_entropy_with_logits(logits[positive], torch.ones_like(logits[positive]))
    return 0.5 * positive_part + 0.5 * negative_part


def volume_presence_loss(logits: Any, target: Any) -> Any:
    """Multiple-instance BCE: per word (kind or location), the volume's highest patch logit
    against whether any patch of the volume carries that word. ``logits``/``target``: (tokens,
    patches per token, words)."""
    import torch.nn.functional as F

    words = logits.shape[-1]
    pooled = logits.reshape(-1, words).amax(0)
    present = target.reshape(-1, words).amax(0)
    return F.binary_cross_entropy_with_logits(pooled, present)


def make_probe(hidden: int, merge_unit: int) -> Any:
    """The linear heads (patch kinds, patch locations, phase) on merged visual tokens of width ``hidden``."""
    import torch

    class VisionProbe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.merge_unit = merge_unit
            self.patch_kinds = torch.nn.Linear(hidden, merge_unit * len(KINDS))
            self.patch_locations = torch.nn.Linear(hidden, merge_unit * len(LOCATIONS))
            self.phase = torch.nn.Linear(hidden, len(PHASES))

    return VisionProbe()


class VisionProbeLoss:
    """Captures the merged visual tokens of each forward (a hook on the vision tower) and turns
    them into the auxiliary loss for the samples of the current batch."""

    def __init__(self, model: Any, probe: Any, presence: float = 0.0, dense: str = "balanced", hardest: int = 8) -> None:
        if dense not in DENSE_LOSSES:
            raise ValueError(f"vision probe dense loss must be one of {DENSE_LOSSES}, got {dense!r}")
        self.probe = probe
        self.presence = float(presence)
        self.dense = dense
        self.hardest = int(hardest)
        self.visual = model.model.visual
        self.tokens: list[Any] = []
        self._handle = self.visual.register_forward_hook(self._capture)

    def _capture(self, module: Any, args: Any, output: Any) -> None:
        merged = getattr(output, "pooler_output", None)
        if merged is not None:
            self.tokens.append(merged)

    def reset(self) -> None:
        self.tokens = []

    def close(self) -> None:
        self._handle.remove()

    def _dense_loss(self, logits: Any, target: Any) -> Any:
        """The per-patch loss of one volume: (tokens, patches, words) logits and 0/1 targets."""
        if self.dense == "hard":
            words = logits.shape[-1]
            return hard_negative_bce(logits.reshape(-1, words).T, target.reshape(-1, words).T, self.hardest)
        return balanced_bce(logits, target)

    def loss(self, samples: Sequence[Any], config: Any) -> Any:
        """Mean of the patch-kind BCE and the phase cross-entropy over phantom samples (or None)."""
        import torch
        import torch.nn.functional as F

        from napari_tghmoe.datasets import load_sample_volume
        from napari_tghmoe.io import CTVolume

        captured, self.tokens = self.tokens, []
        if not captured:
            return None
        merged = captured[-1]  # the batch's own forward (a no-grad utilisation pass may follow)
        vision = config.vision_config
        merge = int(vision.spatial_merge_size)
        grid = [int(g) for g in config.volume_grid]
        per_sample = (grid[0] // int(vision.temporal_patch_size)) * (grid[1] // int(vision.patch_size)) * (
            grid[2] // int(vision.patch_size)
        ) // (merge * merge)
        if merged.shape[0] != per_sample * len(samples):
            return None  # not one model-grid video per sample: nothing to align the labels with
        kind_losses, phase_logits, phase_targets = [], [], []
        for index, sample in enumerate(samples):
            truth = sample.meta.get("phantom_findings")
            if truth is None:
                continue
            tokens = rms_normalised(merged[index * per_sample : (index + 1) * per_sample].float())
            volume = sample.volume if isinstance(sample.volume, CTVolume) else load_sample_volume(sample)
            geometry = (grid, int(vision.temporal_patch_size), int(vision.patch_size), merge)
            sample_id = str(sample.meta.get("id", "?"))
            for head, field, vocabulary in ((self.probe.patch_kinds, "kind", KINDS), (self.probe.patch_locations, "location", LOCATIONS)):
                target = sample_patch_targets(volume, truth, *geometry, field=field, vocabulary=vocabulary, sample_id=sample_id)
                target = torch.from_numpy(target)
                logits = head(tokens).view(per_sample, merge * merge, len(vocabulary))
                target = target.to(logits.device)
                kind_losses.append(self._dense_loss(logits, target))
                if self.presence > 0:
                    kind_losses.append(self.presence * volume_presence_loss(logits, target))
            phase = sample.meta.get("phase")
            if phase in PHASES:
                phase_logits.append(self.probe.phase(tokens))
                phase_targets.append(torch.full((per_sample,), PHASES.index(phase), device=tokens.device))
        if not kind_losses:
            return None
        loss = torch.stack(kind_losses).mean()
        if phase_logits:
            loss = loss + F.cross_entropy(torch.cat(phase_logits), torch.cat(phase_targets))
        return loss
