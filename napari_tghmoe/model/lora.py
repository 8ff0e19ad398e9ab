"""A minimal LoRA for the LLM's linear layers and the vision->LLM merger (hand-written; ``peft`` is not a dependency).

Why not wrap the linear (as peft does): wrapping renames the base weight
(``q_proj.base_layer.weight``), which would break loading plain Qwen2.5-VL checkpoints and the
promise that every base tensor keeps its key. Instead the adapter is a *sibling* module
(``self_attn.lora_q_proj``) and a forward hook on the base linear adds ``dropout(x) @ A^T @ B^T *
alpha / rank`` to its output. The hook only calls the base module, never reads its ``.weight``, so
it works the same when bitsandbytes has swapped the base for a ``Linear4bit`` / ``Linear8bitLt``.
Quantization replaces modules after ``__init__``, which drops hooks: ``LLMLoRASite.ensure_hooked``
re-attaches them (an identity check, cheap enough to run every forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init


class LoRAAdapter(nn.Module):
    """Low-rank update for one linear layer; B starts at zero so the model starts equal to the
    base."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float
    ) -> None:
        super().__init__()
        self.rank = rank
        self.scaling = float(alpha) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        init.uniform_(self.lora_A, -bound, bound)
        init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling

    def add_to_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook for the base linear: base(x) + lora(x)."""
        return output + self(args[0]).to(output.dtype)


@dataclass
class LLMLoRASite:
    """Where one adapter applies: ``parent.<base_path or target>`` is the base linear,
    ``parent.lora_<target>`` the adapter (``base_path`` for a linear nested deeper, such as the
    merger's ``mlp.0``, whose Sequential must not get a sibling: it would run it)."""

    parent: nn.Module
    target: str
    base_path: str | None = None

    @property
    def adapter(self) -> LoRAAdapter:
        return getattr(self.parent, f"lora_{self.target}")

    def ensure_hooked(self) -> None:
        base = self.parent.get_submodule(self.base_path or self.target)
        adapter = self.adapter
        if getattr(base, "_tghmoe_lora_adapter", None) is adapter:
            return
        base.register_forward_hook(adapter.add_to_output)
        # object.__setattr__: a plain reference, not a submodule (its weights live at
        # parent.lora_<target>)
        object.__setattr__(base, "_tghmoe_lora_adapter", adapter)


def install_llm_lora(
    language_model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float
) -> list[LLMLoRASite]:
    """Add ``lora_<target>`` adapters beside the targets of every decoder layer and hook them."""
    sites: list[LLMLoRASite] = []
    if rank <= 0:
        return sites
    for layer in language_model.layers:
        for target in targets:
            parent = layer.self_attn if hasattr(layer.self_attn, target) else layer.mlp
            base = getattr(parent, target)
            adapter = LoRAAdapter(base.in_features, base.out_features, rank, alpha, dropout)
            parent.add_module(f"lora_{target}", adapter)
            site = LLMLoRASite(parent, target)
            site.ensure_hooked()
            sites.append(site)
    return sites


#: The merger's two linears (``merger.mlp`` is Sequential(Linear, GELU, Linear)).
MERGER_LORA_TARGETS = {"mlp_0": "mlp.0", "mlp_2": "mlp.2"}


def install_merger_lora(merger: nn.Module, rank: int, alpha: float, dropout: float) -> list[LLMLoRASite]:
    """LoRA beside the vision->LLM merger's linears (``merger.lora_mlp_0`` / ``lora_mlp_2``).

    Stage 1 trains these instead of the merger itself, so every base tensor, the merger's
    included, stays bit-identical through both stages.
    """
    sites: list[LLMLoRASite] = []
    if rank <= 0:
        return sites
    for target, path in MERGER_LORA_TARGETS.items():
        base = merger.get_submodule(path)
        merger.add_module(f"lora_{target}", LoRAAdapter(base.in_features, base.out_features, rank, alpha, dropout))
        site = LLMLoRASite(merger, target, base_path=path)
        site.ensure_hooked()
        sites.append(site)
    return sites
