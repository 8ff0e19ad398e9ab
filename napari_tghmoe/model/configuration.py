"""``TGHMoEConfig``: a Qwen2.5-VL config + the text-guided hierarchical MoE + CT input fields.

It subclasses ``Qwen2_5_VLConfig`` (own ``model_type`` so a saved TGH-MoE folder is recognised), so
every piece of ``Qwen2_5_VLForConditionalGeneration`` machinery (generation, rope index, loading)
keeps working unchanged. All MoE fields are plain JSON values so ``save_pretrained`` /
``from_pretrained`` round-trip them through ``config.json``.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Qwen2_5_VLConfig

from napari_tghmoe.model.preprocess import (
    DEFAULT_CT_WINDOWS,
    DEFAULT_IMAGE_MEAN,
    DEFAULT_IMAGE_STD,
    intensity_kind,
    round_grid,
)
from napari_tghmoe.model.prompts import DEFAULT_GROUP_NAMES, SHARED_GROUP

LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: What the 3D encoder's tokens carry (``volume_token_source``).
VOLUME_TOKEN_SOURCES = ("encoder", "evidence")


@strict
class TGHMoEConfig(Qwen2_5_VLConfig):
    r"""Qwen2.5-VL config + TGH-MoE.

    MoE fields:
        moe_blocks: vision block indices with experts (default: the deepest quarter, at least 2).
        group_names: expert groups; ``"shared"`` must be first and is always on with weight 1.
        block_groups: ``{"<block>": [group, ...]}``; every MoE block carries "shared". Default: the
            shallower half of ``moe_blocks`` carries only "shared", the deeper half all groups (the
            hierarchy also runs over depth).
        experts_per_group: LoRA experts per group (an int for all groups, or a dict per group).
        router_top_k: experts chosen per visual token inside each group (softmax renormalised over
            the top-k). Not ``top_k``: transformers would read that as a sampling setting.
        lora_rank, lora_alpha, lora_dropout: the experts' LoRA shape; delta scaled by alpha / rank.
        text_pooling: how the text vector is pooled from the LLM input embeddings ("mean" only).
        text_guidance: False = ablation without text guidance: the text vector is zero, so routing
            depends on the visual tokens only (level-1 group probabilities become constants).
        router_aux_loss_coef, router_z_loss_coef, task_loss_coef: loss weights in ``loss``.
        merger_lora_rank, merger_lora_alpha: LoRA beside the vision->LLM merger's two linears
            (trained in stage 1 instead of the merger, so base tensors stay bit-identical; 0 = none).
        llm_lora_rank, llm_lora_alpha, llm_lora_dropout, llm_lora_targets: LoRA on the LLM's linear
            layers, trained in stage 1 (rank 0 disables it).
    Model-input fields (read by ``prepare_volume``):
        volume_grid: (depth, height, width) the CT is resampled to; rounded in ``__post_init__`` to
            multiples of temporal_patch_size (depth) and patch_size * spatial_merge_size (h, w).
        ct_windows: one (centre, width) HU window per input channel.
        image_mean, image_std: per-channel normalisation after windowing to [0, 1].
        depth_mm_per_position: None = one temporal rope position per temporal patch; a float =
            positions follow physical depth, one position per that many mm.
        input_intensity: the intensities the model was trained on: "hu" (CT in Hounsfield units) or
            "unit" ([0, 1] display intensities, M3D); written by the trainer from its data. Volumes of
            the other kind are converted (``napari_tghmoe.model.preprocess``) with a warning.
        min_pixels, max_pixels: the base processor's limits on pixels per frame (Qwen's
            ``preprocessor_config.json``; ``tghmoe convert`` copies them); None = no limit.
    3D volume encoder fields (``napari_tghmoe.model.volume_tokens``; all unused while
    ``volume_encoder`` is empty, so a model without one is exactly the model it was before):
        volume_encoder: sub-folder of the model folder holding a Med3DInsight segmentation model
            whose 3D encoder reads the CT beside the vision tower ("" = none).
        volume_tokens_grid: (z, y, x) grid the encoder's bottleneck is average-pooled to; one LLM
            token per cell.
        volume_projector_experts, volume_projector_hidden: the text-guided projector's MLP experts
            and their hidden size (None = the LLM hidden size).
        volume_encoder_windows: at most this many encoder windows per CT (the CPU cost; a larger CT
            is seen through evenly spread windows).
        volume_encoder_channels, volume_presence_features: the encoder's bottleneck channels and its
            finding kinds (the projector's input); written when the encoder is attached.
        volume_token_id: the placeholder token whose input embeddings the projected tokens replace.
        volume_token_source: what the tokens carry. "encoder": the encoder's pooled bottleneck and
            finding presences (one token per ``volume_tokens_grid`` cell). "evidence": what the
            encoder's segmentation found (``napari_tghmoe.med3d.evidence``: a scan token with
            organ attenuation and the stored plane, then ``volume_evidence_findings`` finding
            slots with kind, organ, position and certainty); the folder is then a whole cascade.
        volume_words_min_certainty: with "evidence", the findings at least this certain are also
            written out in the line of words after the tokens (``evidence_words``); the others
            are in the tokens only.
        volume_words_copy_bias: with "evidence", a logit bias toward ending a phrase the answer has
            begun to copy from the evidence words as the words end it (``napari_tghmoe.model.copying``;
            0 = off). A decoding setting: the weights do not depend on it.
    """

    model_type = "tghmoe_qwen2_5_vl"

    moe_blocks: list[int] | tuple[int, ...] | None = None
    group_names: list[str] | tuple[str, ...] = DEFAULT_GROUP_NAMES
    block_groups: dict[str, list[str]] | None = None
    experts_per_group: int | dict[str, int] = 4
    router_top_k: int = 2
    lora_rank: int = 8
    lora_alpha: float | int = 16.0
    lora_dropout: float | int = 0.0
    text_pooling: str = "mean"
    text_guidance: bool = True
    router_aux_loss_coef: float | int = 0.01
    router_z_loss_coef: float | int = 0.001
    task_loss_coef: float | int = 0.1
    llm_lora_rank: int = 8
    llm_lora_alpha: float | int = 16.0
    llm_lora_dropout: float | int = 0.0
    llm_lora_targets: list[str] | tuple[str, ...] = ("q_proj", "v_proj")
    merger_lora_rank: int = 16
    merger_lora_alpha: float | int = 32.0
    volume_grid: list[int] | tuple[int, ...] = (32, 256, 256)
    ct_windows: list[list[float]] | list[tuple[float, float]] | tuple[tuple[float, float], ...] = (
        DEFAULT_CT_WINDOWS
    )
    image_mean: list[float] | tuple[float, ...] = DEFAULT_IMAGE_MEAN
    image_std: list[float] | tuple[float, ...] = DEFAULT_IMAGE_STD
    depth_mm_per_position: float | int | None = None
    input_intensity: str = "hu"
    min_pixels: int | None = None
    max_pixels: int | None = None
    volume_encoder: str = ""
    volume_tokens_grid: list[int] | tuple[int, ...] = (2, 4, 4)
    volume_projector_experts: int = 4
    volume_projector_hidden: int | None = None
    volume_encoder_windows: int = 4
    volume_encoder_channels: int = 0
    volume_presence_features: int = 0
    volume_token_id: int | None = None
    volume_token_source: str = "encoder"
    volume_evidence_findings: int = 6
    volume_words_min_certainty: float = 0.5
    volume_words_copy_bias: float = 0.0

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._normalise_moe_fields()
        self._normalise_input_fields()
        self._normalise_volume_fields()

    # ------------------------------------------------------------------ validation
    def _normalise_moe_fields(self) -> None:
        depth = int(self.vision_config.depth)
        self.group_names = [str(name) for name in self.group_names]
        if not self.group_names or self.group_names[0] != SHARED_GROUP:
            raise ValueError(
                f"group_names must start with {SHARED_GROUP!r}, got {self.group_names}"
            )
        if len(set(self.group_names)) != len(self.group_names):
            raise ValueError(f"group_names must be unique, got {self.group_names}")
        if self.moe_blocks is None:
            count = min(depth, max(2, depth // 4))
            self.moe_blocks = list(range(depth - count, depth))
        self.moe_blocks = sorted({int(b) for b in self.moe_blocks})
        if any(b < 0 or b >= depth for b in self.moe_blocks):
            raise ValueError(f"moe_blocks {self.moe_blocks} outside the {depth} vision blocks")
        if self.block_groups is None:
            n_shallow = len(self.moe_blocks) // 2
            self.block_groups = {
                str(b): [SHARED_GROUP] if i < n_shallow else list(self.group_names)
                for i, b in enumerate(self.moe_blocks)
            }
        block_groups = {str(int(k)): [str(g) for g in v] for k, v in self.block_groups.items()}
        for block in self.moe_blocks:
            groups = block_groups.setdefault(str(block), list(self.group_names))
            unknown = [g for g in groups if g not in self.group_names]
            if unknown:
                raise ValueError(
                    f"block {block}: unknown groups {unknown} (known: {self.group_names})"
                )
            if SHARED_GROUP not in groups:
                raise ValueError(
                    f"block {block}: every MoE block carries the {SHARED_GROUP!r} group"
                )
            # Keep the config order so expert indices are stable.
            block_groups[str(block)] = [g for g in self.group_names if g in groups]
        extra = set(block_groups) - {str(b) for b in self.moe_blocks}
        if extra:
            raise ValueError(
                f"block_groups names blocks {sorted(extra)} that are not in moe_blocks"
            )
        self.block_groups = block_groups
        if isinstance(self.experts_per_group, int):
            self.experts_per_group = {g: int(self.experts_per_group) for g in self.group_names}
        else:
            missing = [g for g in self.group_names if g not in self.experts_per_group]
            if missing:
                raise ValueError(f"experts_per_group has no count for groups {missing}")
            self.experts_per_group = {g: int(self.experts_per_group[g]) for g in self.group_names}
        if any(n < 1 for n in self.experts_per_group.values()):
            raise ValueError(f"every group needs at least one expert: {self.experts_per_group}")
        if self.router_top_k < 1:
            raise ValueError(f"router_top_k must be >= 1, got {self.router_top_k}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.text_pooling != "mean":
            raise ValueError(f"text_pooling {self.text_pooling!r} is not supported (only 'mean')")
        self.llm_lora_targets = [str(t) for t in self.llm_lora_targets]
        bad = [t for t in self.llm_lora_targets if t not in LLM_LORA_TARGETS]
        if bad:
            raise ValueError(f"llm_lora_targets {bad} unknown (choose from {LLM_LORA_TARGETS})")

    def _normalise_input_fields(self) -> None:
        vision = self.vision_config
        if len(self.volume_grid) != 3:
            raise ValueError(f"volume_grid must be (depth, height, width), got {self.volume_grid}")
        temporal = int(vision.temporal_patch_size)
        spatial = int(vision.patch_size) * int(vision.spatial_merge_size)
        self.volume_grid = list(round_grid(tuple(int(v) for v in self.volume_grid), temporal, spatial))
        self.ct_windows = [[float(c), float(w)] for c, w in self.ct_windows]
        channels = int(vision.in_channels)
        for name in ("ct_windows", "image_mean", "image_std"):
            if len(getattr(self, name)) != channels:
                raise ValueError(f"{name} needs one entry per input channel ({channels})")
        self.image_mean = [float(v) for v in self.image_mean]
        self.image_std = [float(v) for v in self.image_std]
        self.input_intensity = intensity_kind(self.input_intensity)

    def _normalise_volume_fields(self) -> None:
        self.volume_encoder = str(self.volume_encoder or "")
        self.volume_tokens_grid = [int(v) for v in self.volume_tokens_grid]
        if len(self.volume_tokens_grid) != 3 or min(self.volume_tokens_grid) < 1:
            raise ValueError(f"volume_tokens_grid must be three positive sizes (z, y, x), got {self.volume_tokens_grid}")
        if self.volume_projector_experts < 1:
            raise ValueError(f"volume_projector_experts must be >= 1, got {self.volume_projector_experts}")
        if self.volume_encoder_windows < 1:
            raise ValueError(f"volume_encoder_windows must be >= 1, got {self.volume_encoder_windows}")
        if self.volume_projector_hidden is not None and self.volume_projector_hidden < 1:
            raise ValueError(f"volume_projector_hidden must be >= 1 or None, got {self.volume_projector_hidden}")
        if self.volume_token_source not in VOLUME_TOKEN_SOURCES:
            raise ValueError(f"volume_token_source must be one of {VOLUME_TOKEN_SOURCES}, got {self.volume_token_source!r}")
        if self.volume_evidence_findings < 0:
            raise ValueError(f"volume_evidence_findings must be >= 0, got {self.volume_evidence_findings}")
        if float(self.volume_words_copy_bias) < 0.0:
            raise ValueError(f"volume_words_copy_bias must be >= 0, got {self.volume_words_copy_bias}")
        if not 0.0 <= float(self.volume_words_min_certainty) <= 1.0:
            raise ValueError(f"volume_words_min_certainty must be in [0, 1], got {self.volume_words_min_certainty}")
        if not self.volume_encoder:
            return
        name = self.volume_encoder
        if "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
            raise ValueError(f"volume_encoder must be a plain sub-folder name, got {name!r}")
        minimum_channels = 1 if self.volume_token_source == "encoder" else 0
        if self.volume_encoder_channels < minimum_channels or self.volume_presence_features < 0:
            raise ValueError(
                "a volume encoder needs volume_encoder_channels >= 1 and volume_presence_features >= 0, "
                f"got {self.volume_encoder_channels} and {self.volume_presence_features}"
            )
        if self.volume_token_id is None:
            raise ValueError("a volume encoder needs volume_token_id (its placeholder token)")
        taken = {self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id}
        if int(self.volume_token_id) in taken:
            raise ValueError(
                f"volume_token_id {self.volume_token_id} is a vision token of the model; pick another placeholder"
            )

    # ------------------------------------------------------------------ helpers
    @property
    def num_volume_tokens(self) -> int:
        """LLM tokens the 3D encoder adds to a prompt (0 without a volume encoder)."""
        if not self.volume_encoder:
            return 0
        if self.volume_token_source == "evidence":
            return 1 + int(self.volume_evidence_findings)
        z, y, x = self.volume_tokens_grid
        return z * y * x

    @property
    def volume_feature_size(self) -> int:
        """Features per volume token the projector reads: encoder channels + finding presences."""
        return int(self.volume_encoder_channels) + int(self.volume_presence_features)

    @property
    def task_group_names(self) -> list[str]:
        """The groups chosen by the level-1 (text) router; "shared" is always on beside them."""
        return [g for g in self.group_names if g != SHARED_GROUP]

    def groups_for_block(self, block: int) -> list[str]:
        return list(self.block_groups[str(int(block))])

    def expert_names(self) -> list[str]:
        """Global expert list ("shared.0", "report.1", ...): the expert axis of routing traces."""
        return [f"{g}.{i}" for g in self.group_names for i in range(self.experts_per_group[g])]

    @classmethod
    def from_base_config(cls, base_config: Qwen2_5_VLConfig, **moe_kwargs: Any) -> TGHMoEConfig:
        """A TGH-MoE config that keeps every field of a plain Qwen2.5-VL config."""
        values = base_config.to_dict()
        for key in ("model_type", "transformers_version", "architectures"):
            values.pop(key, None)
        values.update(moe_kwargs)
        config = cls(**values)
        attn = getattr(base_config, "_attn_implementation_internal", None)
        if attn is not None:
            config._attn_implementation = attn
        return config


AutoConfig.register(TGHMoEConfig.model_type, TGHMoEConfig, exist_ok=True)
