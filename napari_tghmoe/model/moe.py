"""The TGH-MoE layer that sits beside a frozen Qwen2.5-VL vision MLP.

``y = MLP(x) + sum_e g_e * (x A_e^T) B_e * (alpha / rank)`` with
``g_e = P(group | t) * P(expert | x, t, group)``:

- level 1 (task): ``task_router(t)`` -> softmax over the block's *task* groups. The "shared"
  group is always on with weight 1 (not a share of the softmax), so the task groups add
  specialisation on top of a fixed shared path; the total gate mass per token is 1 (shared) + 1
  (task groups).
- level 2 (token): in each group ``router(x) + text_router(t)`` -> softmax over the group's experts,
  top-k kept and renormalised (detached denominator, so the router learns from the answer even at
  top-1). The text term is a per-sample bias on the expert logits (the same as
  a linear router over ``x + W t``, computed once per sample instead of once per token).

``t`` is the RMS-normalised mean LLM input embedding of the sample's instruction (see modeling.py).
The vision tower flattens a whole batch and permutes tokens into attention windows, so per-token
text guidance arrives as ``VisionRouting.token_sample`` (the sample of each token, in window order),
passed down the tower as the ``tghmoe_routing`` keyword (it reaches every block, also when gradient
checkpointing replays a block in backward).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionBlock

from napari_tghmoe.model.prompts import SHARED_GROUP

ROUTING_KWARG = "tghmoe_routing"


def rms_normalise(vectors: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale-free text vector: routers then see unit-RMS input whatever the embedding scale."""
    vectors = vectors.float()
    return vectors * torch.rsqrt(vectors.pow(2).mean(-1, keepdim=True) + eps)


def block_group_probs(
    task_probs: torch.Tensor | None, task_groups: Sequence[str], group_names: Sequence[str], batch: int | None = None
) -> torch.Tensor:
    """(B, G) gate mass of each group in one block: shared 1.0 (always on), the block's task groups
    their level-1 probability, groups the block does not carry 0. ``batch`` sizes a block
    without task groups (``task_probs`` None)."""
    if task_probs is None:
        probs = torch.zeros(int(batch or 1), len(group_names))
    else:
        probs = task_probs.new_zeros(task_probs.shape[0], len(group_names))
        probs[:, [list(group_names).index(g) for g in task_groups]] = task_probs
    probs[:, list(group_names).index(SHARED_GROUP)] = 1.0
    return probs


def mean_task_group_probs(
    blocks: Iterable[tuple[torch.Tensor | None, Sequence[str]]], group_names: Sequence[str]
) -> torch.Tensor | None:
    """(B, G) task-group probabilities of a prompt: :func:`block_group_probs` averaged over the
    blocks that carry task groups (a group a block lacks counts 0 there), or None when none does.

    The one rule behind ``TGHMoEOutput.group_probs`` and the engine's untraced task probabilities;
    ``RoutingTrace.task_probs`` applies it to the recorded per-block rows.
    """
    rows = [block_group_probs(probs, groups, group_names) for probs, groups in blocks if probs is not None]
    return torch.stack(rows).mean(0) if rows else None


@dataclass
class BlockRouting:
    """What one MoE block decided in one forward (for the losses and, when recording, traces)."""

    block: int
    groups: list[str]
    task_probs: torch.Tensor | None  # (B, G_task of this block) level-1 probabilities
    task_logits: torch.Tensor | None  # (B, G_task) for the task-supervision loss
    # scalar, Switch-style, mean over the groups with more experts than top-k
    load_balancing: torch.Tensor | None
    z_loss: torch.Tensor | None  # scalar, mean squared logsumexp of all router logits
    gates: torch.Tensor | None = None  # (T, E_block) gate weights in window order (recording only)


@dataclass
class VisionRouting:
    """Per-forward routing inputs for one vision-tower call (one modality of one batch)."""

    text_features: torch.Tensor  # (B, D_text) RMS-normalised text vectors
    token_sample: torch.Tensor  # (T,) sample index of each patch token, in window order
    window_index: torch.Tensor  # merge-group permutation used by the tower
    cu_window_seqlens: torch.Tensor
    grid_thw: torch.Tensor  # (N_visual, 3)
    visual_sample: torch.Tensor  # (N_visual,) batch sample of each image / video
    compute_aux: bool = False
    record: bool = False
    blocks: list[BlockRouting] = field(default_factory=list)


class ExpertGroup(nn.Module):
    """One group's LoRA experts and its token router.

    ``lora_A`` (E, r, d_in) and ``lora_B`` (E, r, d_out): expert e adds ``(x @ A_e^T) @ B_e``.
    B starts at zero so an adapted model computes exactly what the base computed.
    """

    def __init__(self, hidden_size: int, text_size: int, num_experts: int, rank: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.rank = rank
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, hidden_size))
        self.lora_B = nn.Parameter(torch.empty(num_experts, rank, hidden_size))
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.text_router = nn.Linear(text_size, num_experts, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA init (A uniform like kaiming(a=sqrt 5), B zero); routers at nn.Linear's scale.

        Uses ``transformers.initialization`` so tensors already loaded by ``from_pretrained`` are
        left alone.
        """
        bound_hidden = 1.0 / math.sqrt(self.lora_A.shape[-1])
        init.uniform_(self.lora_A, -bound_hidden, bound_hidden)
        init.zeros_(self.lora_B)
        init.uniform_(self.router.weight, -bound_hidden, bound_hidden)
        bound_text = 1.0 / math.sqrt(self.text_router.weight.shape[-1])
        init.uniform_(self.text_router.weight, -bound_text, bound_text)


class TGHMoELayer(nn.Module):
    """Text-guided hierarchical experts for one vision block (added beside its frozen MLP)."""

    def __init__(
        self,
        block_index: int,
        hidden_size: int,
        text_size: int,
        groups: list[str],
        experts_per_group: dict[str, int],
        global_expert_offset: dict[str, int],
        top_k: int,
        rank: int,
        alpha: float,
        dropout: float,
    ) -> None:
        super().__init__()
        if groups[0] != SHARED_GROUP:
            raise ValueError(f"block {block_index}: the first group must be {SHARED_GROUP!r}")
        self.block_index = block_index
        self.group_names = list(groups)
        self.task_group_names = [g for g in groups if g != SHARED_GROUP]
        self.top_k = top_k
        self.scaling = float(alpha) / rank
        self.groups = nn.ModuleDict(
            {g: ExpertGroup(hidden_size, text_size, experts_per_group[g], rank) for g in groups}
        )
        self.task_router = (
            nn.Linear(text_size, len(self.task_group_names)) if self.task_group_names else None
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Global expert index of each of this block's experts (the expert axis of routing traces).
        self.global_expert_index = [
            global_expert_offset[g] + i for g in groups for i in range(experts_per_group[g])
        ]
        self._most_experts = max(experts_per_group[g] for g in groups)
        self._expert_columns = [
            gi * self._most_experts + e
            for gi, g in enumerate(groups)
            for e in range(experts_per_group[g])
        ]
        # Stage 2 copies the shared experts into the task experts once; the flag is saved.
        self.register_buffer("task_experts_initialised", torch.zeros((), dtype=torch.bool))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for group in self.groups.values():
            group.reset_parameters()
        if self.task_router is not None:
            bound = 1.0 / math.sqrt(self.task_router.weight.shape[-1])
            init.uniform_(self.task_router.weight, -bound, bound)
            init.zeros_(self.task_router.bias)
        init.zeros_(self.task_experts_initialised)

    @property
    def num_experts(self) -> int:
        return sum(g.num_experts for g in self.groups.values())

    def forward(self, x: torch.Tensor, routing: VisionRouting | None = None) -> torch.Tensor:
        """The experts' contribution for ``x`` (T, d) = the block's normalised hidden states.

        All groups are routed at once: expert logits of every group come from one matmul, then sit
        in a (T, groups, max experts) tensor padded with -inf, so softmax / top-k run per group in
        one call.
        """
        groups = list(self.groups.values())
        n_tokens = x.shape[0]
        if routing is None:
            # Called outside TGHMoEForConditionalGeneration.forward (e.g. the tower alone): no text.
            text = x.new_zeros(1, groups[0].text_router.in_features)
            token_sample = torch.zeros(n_tokens, dtype=torch.long, device=x.device)
        else:
            text = routing.text_features.to(x.dtype)
            token_sample = routing.token_sample

        # Level 1: text -> task-group probabilities; shared always 1.
        task_probs = task_logits = None
        group_weight = x.new_ones(n_tokens, len(groups), dtype=torch.float32)
        if self.task_router is not None:
            task_logits = self.task_router(text).float()
            task_probs = task_logits.softmax(-1)
            group_weight[:, 1:] = task_probs[token_sample]

        # Level 2: token (+ text bias) -> experts inside each group.
        router_weight = torch.cat([g.router.weight for g in groups])  # (E, d)
        text_weight = torch.cat([g.text_router.weight for g in groups])  # (E, D_text)
        logits = (x @ router_weight.t()).float() + (text @ text_weight.t()).float()[token_sample]
        most = self._most_experts
        padded = logits.new_full((n_tokens, len(groups) * most), float("-inf"))
        padded[:, self._expert_columns] = logits
        padded = padded.view(n_tokens, len(groups), most)
        probs = padded.softmax(-1)
        k = min(self.top_k, most)
        top_probs, top_index = probs.topk(k, dim=-1)  # padded experts have probability 0
        # Renormalise over the chosen experts with a *detached* denominator: the gate values are
        # those of plain renormalisation (1.0 at top-1), but the answer's gradient still reaches
        # the router through the numerator. With the denominator attached, top-1 gates are
        # p / p = 1 and the router learns nothing from the task loss.
        chosen = top_probs / top_probs.sum(-1, keepdim=True).detach()
        gate = torch.zeros_like(probs).scatter(-1, top_index, chosen) * group_weight[..., None]
        gate_all = gate.view(n_tokens, -1)[:, self._expert_columns]  # (T, E_block)

        lora_A = torch.cat([g.lora_A for g in groups])  # (E, r, d)
        lora_B = torch.cat([g.lora_B for g in groups])
        n_experts, rank, hidden = lora_A.shape
        low_rank = self.dropout(x) @ lora_A.reshape(n_experts * rank, hidden).t()  # (T, E*r)
        low_rank = (
            low_rank.view(n_tokens, n_experts, rank)
            * (gate_all.to(x.dtype) * self.scaling)[..., None]
        )
        delta = low_rank.reshape(n_tokens, n_experts * rank) @ lora_B.reshape(n_experts * rank, -1)

        if routing is not None:
            load_balancing = z_loss = None
            if routing.compute_aux:
                z_terms = torch.logsumexp(padded, -1).pow(2).mean(0)  # (G,)
                if task_logits is not None:
                    z_terms = torch.cat(
                        [z_terms, torch.logsumexp(task_logits, -1).pow(2).mean()[None]]
                    )
                z_loss = z_terms.mean()
                # Switch-style balancing (1 when uniform) in groups where top-k actually chooses.
                sizes = torch.tensor([g.num_experts for g in groups], device=x.device)
                sparse = sizes > k
                if bool(sparse.any()):
                    routed = F.one_hot(top_index, most).float().sum(-2).mean(0) / k  # (G, most)
                    balance = sizes * (routed * probs.mean(0)).sum(-1)
                    load_balancing = balance[sparse].mean()
            routing.blocks.append(
                BlockRouting(
                    block=self.block_index,
                    groups=self.group_names,
                    task_probs=task_probs,
                    task_logits=task_logits,
                    load_balancing=load_balancing,
                    z_loss=z_loss,
                    gates=gate_all.detach() if routing.record else None,
                )
            )
        return delta


class TGHMoEVisionBlock(Qwen2_5_VLVisionBlock):
    """A Qwen2.5-VL vision block whose frozen MLP gets the TGH-MoE experts beside it.

    Same submodule names as the base block plus ``moe``, so base tensors keep their state_dict keys.
    Base blocks are turned into this class in place (``convert``), nothing is copied.
    """

    moe: TGHMoELayer

    @classmethod
    def convert(cls, block: Qwen2_5_VLVisionBlock, moe: TGHMoELayer) -> TGHMoEVisionBlock:
        block.__class__ = cls
        block.add_module("moe", moe)
        return block

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        routing = kwargs.pop(ROUTING_KWARG, None)
        hidden_states = hidden_states + self.attn(
            self.norm1(hidden_states),
            cu_seqlens=cu_seqlens,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        normed = self.norm2(hidden_states)
        return hidden_states + self.mlp(normed) + self.moe(normed, routing)
