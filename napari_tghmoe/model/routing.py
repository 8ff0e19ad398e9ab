"""Routing traces: which experts each visual token used, mapped back onto the CT volume.

Recorded only inside ``with model.record_routing() as recorder:``; without a recorder the model
keeps no copies (no ``.cpu()``, no extra tensors).

Patch layout (what ``prepare_volume`` must produce and what this module inverts). For one volume
with ``video_grid_thw = (t, h, w)`` (in patches), the rows of ``pixel_values_videos`` are ordered
exactly as ``Qwen2VLVideoProcessor`` / ``Qwen2VLImageProcessor`` flatten them::

    row index   = ((((t_i * (h // m) + hb) * (w // m) + wb) * m + hi) * m + wi)
    patch (row) = t_i,  h_patch = hb * m + hi,  w_patch = wb * m + wi    (m = spatial_merge_size)
    row content = (channel, temporal_patch_size, patch_size, patch_size), flattened in that order

i.e. rows are (t, h_block, w_block, h_in, w_in) with h_in/w_in the position inside the m x m merge
group. Temporal patch ``t_i`` covers model slices ``[t_i * tp, (t_i + 1) * tp)``; patch ``(h_patch,
w_patch)`` covers pixels ``[h_patch * p, (h_patch + 1) * p)`` etc. of the model grid, and the model
grid covers the whole volume (prepare_volume resamples the full CT onto it), so a trace maps to the
CT by pure resampling.

Inside the vision tower the rows are permuted into attention windows: ``window_index`` (from
``transformers.vision_utils.get_vision_window_index``) permutes merge groups, keeping the m*m
patches of a group together, so the token at window position ``j`` is original row
``window_index[j // m**2] * m**2 + j % m**2``. ``unpermute_to_grids`` inverts both steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def window_order_to_rows(window_index: torch.Tensor, merge_unit: int) -> torch.Tensor:
    """For each token position in window order, its row in the processor (pixel_values) order."""
    import torch

    offsets = torch.arange(merge_unit, device=window_index.device)
    return (window_index[:, None] * merge_unit + offsets).reshape(-1)


def unpermute_to_grids(
    values_window_order: torch.Tensor,
    window_index: torch.Tensor,
    grid_thw: torch.Tensor,
    spatial_merge_size: int,
) -> list[torch.Tensor]:
    """(T, ...) per-token values in window order -> one (t, h, w, ...) tensor per image / video."""
    import torch

    unit = spatial_merge_size**2
    rows = window_order_to_rows(window_index.to(values_window_order.device), unit)
    in_row_order = torch.empty_like(values_window_order)
    in_row_order[rows] = values_window_order
    grids = []
    start = 0
    m = spatial_merge_size
    for t, h, w in grid_thw.tolist():
        count = t * h * w
        chunk = in_row_order[start : start + count]
        trailing = chunk.shape[1:]
        chunk = chunk.reshape(t, h // m, w // m, m, m, *trailing)
        chunk = chunk.permute(0, 1, 3, 2, 4, *range(5, 5 + len(trailing)))
        grids.append(chunk.reshape(t, h, w, *trailing))
        start += count
    return grids


def _nearest_indices(n_source: int, n_target: int) -> np.ndarray:
    """Cell-centred nearest neighbour: target cell i takes the source cell that contains its
    centre."""
    centres = (np.arange(n_target) + 0.5) * n_source / n_target
    return np.clip(np.floor(centres).astype(np.int64), 0, n_source - 1)


@dataclass
class RoutingTrace:
    """Expert routing of one vision forward.

    Attributes:
        blocks: MoE vision block indices.
        group_names: all groups of the config ("shared" first).
        expert_names: global expert axis ("shared.0", ..., "report.1", ...); a block's experts
        occupy
            their global indices, experts the block does not carry have weight 0.
        group_probs: block -> (B, G) per batch sample: shared 1.0 (always on), task groups the
        level-1
            probabilities (sum 1 over the block's task groups), groups absent from the block 0.
        expert_weights: block -> (N, t, h, w, E) gate weights on the vision *patch* grid of each
            image / video (window reordering and patch merging undone). A list of (t, h, w, E)
            arrays instead when the inputs have different grids.
        grid_thw: (N, 3) patch grid per image / video. visual_sample: (N,) batch sample of each.
        volume_gate: (B, E) the text-guided gate over the volume projector's experts, for a model
            with a 3D volume encoder (None otherwise).
    """

    blocks: list[int]
    group_names: list[str]
    expert_names: list[str]
    block_groups: dict[int, list[str]]
    group_probs: dict[int, np.ndarray]
    expert_weights: dict[int, np.ndarray | list[np.ndarray]]
    grid_thw: np.ndarray
    visual_sample: np.ndarray
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    modality: str = "video"
    volume_gate: np.ndarray | None = None

    @property
    def task_group_names(self) -> list[str]:
        return [g for g in self.group_names if g != "shared"]

    def _check_block(self, block: int) -> None:
        if block not in self.expert_weights:
            raise KeyError(f"block {block} carries no experts (MoE blocks: {self.blocks})")

    def weights_for(self, block: int, sample: int = 0) -> np.ndarray:
        """(t, h, w, E) gate weights of one image / video."""
        self._check_block(block)
        return np.asarray(self.expert_weights[block][sample])

    def utilisation(self, block: int, sample: int | None = None) -> np.ndarray:
        """Mean gate weight of each expert over the visual tokens (of one input, or all): shape
        (E,)."""
        self._check_block(block)
        if sample is not None:
            weights = self.weights_for(block, sample)
            return weights.reshape(-1, weights.shape[-1]).mean(0)
        stacked = [
            np.asarray(w).reshape(-1, len(self.expert_names)) for w in self.expert_weights[block]
        ]
        return np.concatenate(stacked).mean(0)

    def task_probs(self, sample: int = 0) -> dict[str, float]:
        """Text -> task-group probabilities, averaged over the blocks that carry task groups."""
        task_groups = self.task_group_names
        rows = [
            self.group_probs[b][sample]
            for b in self.blocks
            if any(g in self.block_groups[b] for g in task_groups)
        ]
        if not rows:
            return {}
        mean = np.mean(rows, axis=0)
        return {g: float(mean[self.group_names.index(g)]) for g in task_groups}

    def expert_map(
        self, block: int, target_shape: Sequence[int] | None = None, expert: int | None = None, sample: int = 0
    ) -> np.ndarray:
        """A map aligned with the original CT (``target_shape`` = its (z, y, x) shape).

        ``expert=None``: the dominant expert index per voxel (int16, nearest resampling, so block
        edges stay sharp); otherwise that expert's gate weight (float32, trilinear, cell-centred).

        ``target_shape=None``: the same map on the token grid itself, (t, h, w), without
        resampling. Cell ``j`` of ``n`` covers the CT voxels whose centres lie in
        ``[j, j + 1) * n_ct / n`` along each axis, as the resampled map does, so a viewer can
        place it over the CT with a scale of ``n_ct / n`` CT voxels per cell instead of holding
        a CT-sized copy.
        """
        weights = self.weights_for(block, sample)
        if target_shape is None:
            if expert is None:
                return weights.argmax(-1).astype(np.int16)
            if not 0 <= expert < weights.shape[-1]:
                raise IndexError(f"expert {expert} out of range ({weights.shape[-1]} experts)")
            return weights[..., expert].astype(np.float32)
        target_shape = tuple(int(s) for s in target_shape)
        if len(target_shape) != 3:
            raise ValueError(f"target_shape must be (z, y, x), got {target_shape}")
        if expert is None:
            dominant = weights.argmax(-1).astype(np.int16)
            index = [_nearest_indices(n, m) for n, m in zip(dominant.shape, target_shape)]
            return dominant[np.ix_(*index)]
        if not 0 <= expert < weights.shape[-1]:
            raise IndexError(f"expert {expert} out of range ({weights.shape[-1]} experts)")
        from scipy import ndimage

        grid = weights[..., expert].astype(np.float32)
        zoom = [m / n for n, m in zip(grid.shape, target_shape)]
        resampled = ndimage.zoom(grid, zoom, order=1, mode="nearest", grid_mode=True)
        if resampled.shape != target_shape:  # float rounding in zoom's output size
            index = [_nearest_indices(n, m) for n, m in zip(resampled.shape, target_shape)]
            resampled = resampled[np.ix_(*index)]
        return resampled.astype(np.float32, copy=False)

    def dominant_per_slice(self, block: int, n_slices: int, sample: int = 0) -> np.ndarray:
        """Dominant expert of each of ``n_slices`` CT slices (axis 0), from the mean weights of its
        temporal patch: shape (n_slices,) int."""
        weights = self.weights_for(block, sample)
        per_temporal_patch = weights.mean(axis=(1, 2)).argmax(-1)
        return per_temporal_patch[_nearest_indices(len(per_temporal_patch), int(n_slices))]

    def summary(self) -> dict[str, Any]:
        """JSON-able overview: task probabilities and expert utilisation per block and sample."""
        n_samples = int(next(iter(self.group_probs.values())).shape[0]) if self.group_probs else 0
        return {
            "blocks": list(self.blocks),
            "group_names": list(self.group_names),
            "expert_names": list(self.expert_names),
            "block_groups": {str(b): list(g) for b, g in self.block_groups.items()},
            "grid_thw": self.grid_thw.tolist(),
            "task_probs": [self.task_probs(s) for s in range(n_samples)],
            "group_probs": {str(b): p.tolist() for b, p in self.group_probs.items()},
            "utilisation": {str(b): self.utilisation(b).tolist() for b in self.blocks},
            **({"volume_gate": np.asarray(self.volume_gate).tolist()} if self.volume_gate is not None else {}),
        }


@dataclass
class RoutingRecorder:
    """Collects the traces of the vision forwards that run while it is active."""

    traces: list[RoutingTrace] = field(default_factory=list)

    @property
    def trace(self) -> RoutingTrace | None:
        """The most recent trace (the prefill step of ``generate``), None when no vision forward
        ran."""
        return self.traces[-1] if self.traces else None
