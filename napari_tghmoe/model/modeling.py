"""TGH-MoE on Qwen2.5-VL: the model class, ``adapt_2d_mllm`` and ``set_stage``.

How text guidance reaches the vision tower (also inside ``generate()``): ``forward`` computes the
text vector of every sample from ``input_ids`` / ``inputs_embeds`` *before* any visual feature
exists, then runs the vision tower itself (``model.get_video_features`` / ``get_image_features``)
with a ``VisionRouting`` passed down as the ``tghmoe_routing`` keyword, and hands the finished
features to the stock Qwen2.5-VL forward through its ``mm_encoder_outputs`` argument. In
``generate()`` the pixel inputs exist only in the prefill step (transformers drops them afterwards),
which is exactly when the full prompt is available; decode steps skip the vision path.
``_supports_mm_encoder_outputs`` returns False so ``generate()`` does not encode the pixels on its
own, without the prompt, before the prefill.

A model with a 3D volume encoder (``config.volume_encoder``, :mod:`napari_tghmoe.model.volume_tokens`)
also takes ``volume_features`` (the encoder's pooled tokens): in the prefill step the
``volume_projector`` maps them, gated by the same text vector, and they replace the input embeddings
of the prompt's volume placeholders through a hook on the LLM's embedding module, held only while
the stock forward runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput
from transformers.vision_utils import get_vision_window_index

from napari_tghmoe.model.configuration import TGHMoEConfig
from napari_tghmoe.model.lora import LLMLoRASite, LoRAAdapter, install_llm_lora, install_merger_lora
from napari_tghmoe.model.moe import (
    ROUTING_KWARG,
    TGHMoELayer,
    TGHMoEVisionBlock,
    VisionRouting,
    block_group_probs,
    mean_task_group_probs,
    rms_normalise,
)
from napari_tghmoe.model.prompts import SHARED_GROUP
from napari_tghmoe.model.routing import (
    RoutingRecorder,
    RoutingTrace,
    unpermute_to_grids,
    window_order_to_rows,
)
from napari_tghmoe.model.volume_tokens import VolumeTokenProjector, build_projector

# TGHMoEConfig fields beyond the base Qwen2.5-VL config (the MoE and the model-input settings).
MOE_CONFIG_FIELDS = (
    "moe_blocks",
    "group_names",
    "block_groups",
    "experts_per_group",
    "router_top_k",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "text_pooling",
    "text_guidance",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "task_loss_coef",
    "llm_lora_rank",
    "llm_lora_alpha",
    "llm_lora_dropout",
    "llm_lora_targets",
    "volume_grid",
    "ct_windows",
    "image_mean",
    "image_std",
    "depth_mm_per_position",
    "merger_lora_rank",
    "merger_lora_alpha",
    "input_intensity",
    "min_pixels",
    "max_pixels",
    "volume_tokens_grid",
    "volume_projector_experts",
    "volume_projector_hidden",
    "volume_encoder_windows",
)

#: State-dict names of the tensors TGH-MoE adds beside the base (experts, routers, LoRA, the volume
#: projector): the rest are base tensors, which conversion and training never change.
ADAPTER_KEY = re.compile(r"(^|\.)(moe|lora_[A-Za-z0-9_]+|volume_projector)\.")
#: Structural fields a base folder must share with the TGH-MoE config that refers to it.
_BASE_MATCH_FIELDS = {
    "text_config": ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size"),
    "vision_config": ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
                      "temporal_patch_size", "spatial_merge_size"),
    "": ("video_token_id", "image_token_id", "vision_start_token_id", "vision_end_token_id"),
}

#: transformers 5.24 renamed the key/value cache from ``past_key_values`` to ``cache`` (in model
#: outputs and in ``forward``); the model speaks whichever name the installed version uses.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _is_prefill(cache: Any) -> bool:
    """No key/value cache yet, or an empty one: the step that reads the whole prompt."""
    if cache is None:
        return True
    length = getattr(cache, "get_seq_length", None)
    return not callable(length) or int(length()) == 0


def _task_groups(groups: list[str]) -> list[str]:
    """A block's groups that level 1 chooses between (all but the always-on shared group)."""
    return [g for g in groups if g != SHARED_GROUP]


@dataclass
class TGHMoEOutput(ModelOutput):
    """Causal-LM output plus the TGH-MoE losses, each on its own and in the weighted ``loss``.

    ``loss = lm_loss + router_aux_loss_coef * load_balancing_loss + router_z_loss_coef * z_loss
    + task_loss_coef * task_loss`` over the parts that exist (lm_loss needs ``labels``, task_loss
    ``task_labels``; the router losses exist when the vision tower ran in training or with labels).
    ``group_probs``: (B, G) over ``config.group_names``, averaged over the blocks with task groups;
    shared = 1 (always on). ``volume_gate``: (B, E) the volume projector's text-guided gate
    (models with a volume encoder, when the prompt carried volume tokens).
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    load_balancing_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    task_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    if CACHE_FIELD == "cache":
        cache: Any = None
    else:
        past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    group_probs: torch.Tensor | None = None
    volume_gate: torch.Tensor | None = None


class TGHMoEForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL + text-guided hierarchical LoRA experts in vision blocks + LoRA on the LLM."""

    config_class = TGHMoEConfig
    config: TGHMoEConfig

    def __init__(self, config: TGHMoEConfig) -> None:
        super().__init__(config)
        self._install_tghmoe(match_base_placement=False)

    # ------------------------------------------------------------------ construction
    def _install_tghmoe(self, match_base_placement: bool) -> None:
        """Add experts, routers and LLM LoRA to the (already built) base modules.

        ``match_base_placement``: put every new module on the device / dtype of the base module next
        to it (used by ``adapt_2d_mllm`` on a model that may already sit on a GPU, in bf16).
        """
        config = self.config
        visual = self.model.visual
        text_size = config.text_config.hidden_size
        offsets, offset = {}, 0
        for group in config.group_names:
            offsets[group] = offset
            offset += config.experts_per_group[group]
        for block_index in config.moe_blocks:
            block = visual.blocks[block_index]
            moe = TGHMoELayer(
                block_index=block_index,
                hidden_size=config.vision_config.hidden_size,
                text_size=text_size,
                groups=config.groups_for_block(block_index),
                experts_per_group=config.experts_per_group,
                global_expert_offset=offsets,
                top_k=config.router_top_k,
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
            )
            if match_base_placement:
                reference = block.norm2.weight
                moe.to(device=reference.device, dtype=reference.dtype)
            TGHMoEVisionBlock.convert(block, moe)
        language_model = self.model.language_model
        self._llm_lora_sites: list[LLMLoRASite] = install_llm_lora(
            language_model,
            list(config.llm_lora_targets),
            config.llm_lora_rank,
            config.llm_lora_alpha,
            config.llm_lora_dropout,
        )
        merger = visual.merger
        self._llm_lora_sites += install_merger_lora(
            merger, config.merger_lora_rank, config.merger_lora_alpha, config.lora_dropout
        )
        if match_base_placement:
            reference = merger.mlp[0].weight
            for name, child in merger.named_children():
                if name.startswith("lora_"):
                    child.to(device=reference.device, dtype=reference.dtype)
            for layer in language_model.layers:
                reference = layer.input_layernorm.weight
                for module in (layer.self_attn, layer.mlp):
                    for name, child in module.named_children():
                        if name.startswith("lora_"):
                            child.to(device=reference.device, dtype=reference.dtype)
        self._routing_recorder: RoutingRecorder | None = None
        object.__setattr__(self, "_volume_encoder", None)  # not a submodule: see volume_tokens
        self._volume_encoder_source: Path | None = None
        if config.volume_encoder:
            self._install_volume_projector(match_base_placement)

    def _install_volume_projector(self, match_base_placement: bool) -> None:
        """The volume projector (a top-level ``volume_projector`` module, saved with the experts)."""
        projector = build_projector(self.config)
        if match_base_placement:
            reference = self.get_input_embeddings().weight
            projector.to(device=reference.device, dtype=reference.dtype)
        self.volume_projector = projector

    # ------------------------------------------------------------------ volume encoder
    @property
    def volume_encoder(self) -> Any:
        """The frozen 3D encoder (a ``Med3DSegModel``) or None; outside ``state_dict()`` on purpose."""
        return self.__dict__.get("_volume_encoder")

    @property
    def volume_projector_module(self) -> VolumeTokenProjector | None:
        return self._modules.get("volume_projector")  # type: ignore[return-value]

    def set_volume_encoder(self, encoder: Any, source: str | Path | None = None) -> None:
        object.__setattr__(self, "_volume_encoder", encoder)
        self._volume_encoder_source = Path(source) if source is not None else None

    def _load_volume_encoder(self, folder: str | Path) -> None:
        """The encoder from ``folder/<config.volume_encoder>`` (one-line error naming it)."""
        from napari_tghmoe.model.volume_tokens import VolumeEncoderError, load_volume_encoder

        sub = Path(folder) / self.config.volume_encoder
        if not sub.is_dir():
            raise VolumeEncoderError(f"{sub}: the volume encoder folder config.json names is missing")
        config = self.config
        encoder = load_volume_encoder(
            sub, config.volume_token_source, config.volume_evidence_findings, config.volume_words_min_certainty
        )
        if config.volume_token_source == "evidence":
            from napari_tghmoe.med3d.evidence import EVIDENCE_FEATURES

            channels, kinds = 0, EVIDENCE_FEATURES
        else:
            channels, kinds = int(encoder.config.encoder_channels), len(encoder.config.finding_kinds)
        if (channels, kinds) != (self.config.volume_encoder_channels, self.config.volume_presence_features):
            raise VolumeEncoderError(
                f"{sub}: the encoder gives {channels} channels and {kinds} finding kinds, the projector expects "
                f"{self.config.volume_encoder_channels} and {self.config.volume_presence_features}"
            )
        self.set_volume_encoder(encoder, sub)

    def volume_features(self, volume: Any, spacing: Any = None) -> torch.Tensor:
        """(N, F) token features of one CT, on the CPU: the encoder's pooled tokens
        (``volume_tokens.encode_volume``), or what its segmentation found (``EvidenceReader``)."""
        from napari_tghmoe.model.volume_tokens import EvidenceReader, encode_volume

        if self.volume_encoder is None:
            raise ValueError("this model has no volume encoder loaded")
        if isinstance(self.volume_encoder, EvidenceReader):
            return self.volume_encoder.features(volume, spacing)
        config = self.config
        return encode_volume(
            self.volume_encoder, volume, config.volume_tokens_grid, spacing, max_windows=config.volume_encoder_windows
        )

    def volume_words(self, volume: Any, spacing: Any = None) -> str:
        """The evidence line that follows the volume tokens ("" unless the encoder gives evidence)."""
        from napari_tghmoe.model.volume_tokens import EvidenceReader

        if isinstance(self.volume_encoder, EvidenceReader):
            return self.volume_encoder.words(volume, spacing)
        return ""

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.save_pretrained`` plus the volume encoder's sub-folder."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if self.config.volume_encoder and kwargs.get("is_main_process", True):
            from napari_tghmoe.model.volume_tokens import save_encoder_folder

            if self.volume_encoder is None:
                raise ValueError("the config names a volume encoder but none is loaded: nothing to save it from")
            save_encoder_folder(
                self.volume_encoder, self._volume_encoder_source, Path(save_directory) / self.config.volume_encoder
            )
        return result

    def initialize_weights(self) -> None:
        """Base init, then the TGH-MoE init of experts / LoRA (B = 0).

        ``from_pretrained`` calls this for missing keys (e.g. a plain Qwen2.5-VL folder gets fresh
        experts); ``transformers.initialization`` leaves the loaded tensors alone.
        """
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, (TGHMoELayer, LoRAAdapter, VolumeTokenProjector)):
                module.reset_parameters()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained``, then aligned storage for the small TGH-MoE tensors.

        On CPU transformers leaves loaded tensors in buffers that are not 64-byte aligned, and BLAS
        then takes a differently rounded path for the small router / LoRA products: a reloaded
        model would differ from the saved one in the last bits. Copying the adapter tensors (a few
        MB) restores bit-identity. No Hub kernels unless asked for (``OFFLINE_LOAD_KWARGS``).

        A folder written by ``tghmoe convert`` that refers to its base (``tghmoe_base.json``, see
        :mod:`napari_tghmoe.model.base_ref`) loads the base folder with the same options
        (dtype, device map, quantization), then adds the experts and their saved weights.
        """
        kwargs.setdefault("use_kernels", False)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            from napari_tghmoe.model.base_ref import read_base_reference

            reference = read_base_reference(source)
            if reference is not None:
                if len(args) > 1:
                    raise TypeError("a TGH-MoE folder that refers to its base takes keyword options only")
                kwargs.pop("pretrained_model_name_or_path", None)
                return cls._from_base_reference(reference, **kwargs)
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._realign_adapter_tensors()
        if model.config.volume_encoder:
            if not (isinstance(source, (str, Path)) and Path(source).is_dir()):
                raise ValueError("a model with a volume encoder loads from a local folder only")
            model._load_volume_encoder(source)
        return loaded

    @classmethod
    def _from_base_reference(cls, reference: Any, **kwargs: Any):
        """Base weights from the base folder, experts / routers / LoRA from the adapter file."""
        from safetensors import safe_open
        from transformers import GenerationConfig

        from napari_tghmoe.model.base_ref import BaseReferenceError, verify_base_files

        verify_base_files(reference)
        folder = reference.folder
        output_loading_info = kwargs.pop("output_loading_info", False)
        config = kwargs.pop("config", None)
        if config is None:
            config = TGHMoEConfig.from_pretrained(str(folder), local_files_only=True)
        base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(reference.base_path), **kwargs)
        _check_same_base(config, base.config, reference.base_path)
        for name in ("_attn_implementation_internal", "quantization_config", "dtype"):
            if hasattr(base.config, name):
                setattr(config, name, getattr(base.config, name))
        config._name_or_path = str(folder)
        model = _become_tghmoe(base, config, match_base_placement=True)

        expected = set(adapter_state_dict(model))
        targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        with safe_open(str(reference.adapter_path), framework="pt") as handle:
            stored = set(handle.keys())
            missing, unexpected = sorted(expected - stored), sorted(stored - expected)
            if missing or unexpected:
                raise BaseReferenceError(
                    f"{reference.adapter_file} does not fit config.json: {len(missing)} expert tensor(s) missing "
                    f"({', '.join(missing[:2])}), {len(unexpected)} unexpected ({', '.join(unexpected[:2])})"
                )
            with torch.no_grad():
                for key in sorted(stored):
                    tensor = handle.get_tensor(key)
                    target = targets[key]
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise BaseReferenceError(
                            f"{reference.adapter_file}: {key} has shape {tuple(tensor.shape)}, "
                            f"the model expects {tuple(target.shape)}"
                        )
                    target.copy_(tensor)
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
        if config.volume_encoder:
            model._load_volume_encoder(folder)
        model.eval()
        if output_loading_info:
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    @torch.no_grad()
    def _realign_adapter_tensors(self) -> None:
        adapters = [m for m in self.modules() if isinstance(m, (TGHMoELayer, LoRAAdapter, VolumeTokenProjector))]
        for module in adapters:
            for param in module.parameters():
                if (
                    param.device.type == "cpu"
                    and type(param) is torch.nn.Parameter
                    and param.data_ptr() % 64
                ):
                    param.data = param.data.clone()

    def _supports_mm_encoder_outputs(self) -> bool:
        """Keep ``generate()`` from encoding pixels before the prefill step.

        transformers >= 5 pre-encodes images / videos in ``generate()`` without the prompt; the
        experts need the prompt's text vector, so the raw pixels must reach ``forward`` (prefill
        only; transformers drops them for decode steps). Chunked prefill (``prefill_chunk_size``) is
        therefore not supported.
        """
        return False

    def moe_layers(self) -> dict[int, TGHMoELayer]:
        return {i: self.model.visual.blocks[i].moe for i in self.config.moe_blocks}

    # ------------------------------------------------------------------ text guidance
    def _vision_token_ids(self) -> list[int]:
        config = self.config
        ids = [
            config.image_token_id,
            config.video_token_id,
            config.vision_start_token_id,
            config.vision_end_token_id,
        ]
        if self.volume_projector_module is not None:
            ids.append(int(config.volume_token_id))
        return ids

    def _token_mask(
        self, token_ids: list[int], input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor
    ):
        """(B, L) bool: positions holding one of ``token_ids`` (by id, or by embedding equality)."""
        if input_ids is not None:
            return torch.isin(input_ids, torch.tensor(token_ids, device=input_ids.device))
        ids = torch.tensor(token_ids, device=inputs_embeds.device)
        special = self.get_input_embeddings()(ids).to(inputs_embeds.dtype)  # (K, D)
        return (inputs_embeds[:, :, None, :] == special[None, None]).all(-1).any(-1)

    def text_features(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_guidance_mask: torch.Tensor | None = None,
        require_mask: bool = False,
    ) -> torch.Tensor:
        """The text vector ``t`` of each sample: (B, D_text) float32, RMS-normalised.

        Mean of the LLM's own input embeddings over the instruction tokens: exactly
        ``text_guidance_mask`` when given, else attended tokens that are not image / video /
        vision_start / vision_end. That fallback is only safe for a prompt without its answer
        (generation): in a training sequence it would pool the target tokens, leaking the answer
        into the routing. So a model in training mode, or a caller that asks ``require_mask``
        (auxiliary losses), gets a ValueError instead of the fallback.
        """
        if text_guidance_mask is None and (self.training or require_mask):
            raise ValueError(
                "text_guidance_mask is required when training or computing routing losses: "
                "without it the text vector would pool every text token, the answer included"
            )
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("text guidance needs input_ids or inputs_embeds")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if text_guidance_mask is not None:
            mask = text_guidance_mask.to(inputs_embeds.device).bool()
        else:
            mask = ~self._token_mask(self._vision_token_ids(), input_ids, inputs_embeds)
            if (
                attention_mask is None
                and input_ids is not None
                and self.config.text_config.pad_token_id is not None
            ):
                mask &= input_ids != self.config.text_config.pad_token_id
        if attention_mask is not None and attention_mask.dim() == 2:
            mask &= attention_mask.to(mask.device).bool()
        if not getattr(self.config, "text_guidance", True):
            mask = torch.zeros_like(mask)  # ablation: no text guidance (pooled vector is zero)
        weights = mask.to(torch.float32)[..., None]
        pooled = (inputs_embeds.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return rms_normalise(pooled)

    def _visual_samples(
        self,
        token_id: int,
        grid_thw: torch.Tensor,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """Sample of each image / video (they fill placeholders in (sample, position) order)."""
        unit = self.model.visual.spatial_merge_unit
        tokens_per_visual = grid_thw.prod(-1) // unit
        per_sample = (
            self._token_mask([token_id], input_ids, inputs_embeds).sum(1).to(grid_thw.device)
        )
        batch_size = per_sample.shape[0]
        if int(per_sample.sum()) != int(tokens_per_visual.sum()):
            # Placeholders do not match (the stock forward raises on that later): best effort.
            if len(grid_thw) == batch_size:
                return torch.arange(batch_size, device=grid_thw.device)
            return torch.zeros(len(grid_thw), dtype=torch.long, device=grid_thw.device)
        starts = tokens_per_visual.cumsum(0) - tokens_per_visual
        return torch.searchsorted(per_sample.cumsum(0), starts, right=True)

    def _vision_routing(
        self,
        grid_thw: torch.Tensor,
        token_id: int,
        text: torch.Tensor,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        device: torch.device,
        compute_aux: bool,
    ) -> VisionRouting:
        visual = self.model.visual
        window_index, cu_window_seqlens = get_vision_window_index(
            grid_thw,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        visual_sample = self._visual_samples(token_id, grid_thw, input_ids, inputs_embeds).to(
            device
        )
        patches_per_visual = grid_thw.prod(-1).to(device)
        sample_per_row = visual_sample.repeat_interleave(patches_per_visual)
        rows = window_order_to_rows(window_index.to(device), visual.spatial_merge_unit)
        return VisionRouting(
            text_features=text.to(device),
            token_sample=sample_per_row[rows],
            window_index=window_index,
            cu_window_seqlens=cu_window_seqlens,
            grid_thw=grid_thw,
            visual_sample=visual_sample,
            compute_aux=compute_aux,
            record=self._routing_recorder is not None,
        )

    def encode_visual(
        self,
        pixels: torch.Tensor,
        grid_thw: torch.Tensor,
        text: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        modality: str = "video",
        compute_aux: bool = False,
    ) -> tuple[Any, VisionRouting]:
        """Run the vision tower alone with the routing that ``text`` (from :meth:`text_features`)
        guides; returns the tower's output (``pooler_output``: the merged tokens the LLM reads)
        and the routing it used.

        ``forward`` calls this for every image / video input; vision-only training and probes
        (``tghmoe probe-detection``, :mod:`napari_tghmoe.train.detection`) call it without running the LLM.
        """
        token_id = getattr(self.config, f"{modality}_token_id")
        routing = self._vision_routing(
            grid_thw, token_id, text, input_ids, inputs_embeds, pixels.device, compute_aux
        )
        encode = getattr(self.model, f"get_{modality}_features")
        output = encode(
            pixels,
            grid_thw,
            return_dict=True,
            window_index=routing.window_index,  # the permutation the routing was built on
            cu_window_seqlens=routing.cu_window_seqlens,
            **{ROUTING_KWARG: routing},
        )
        return output, routing

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        task_labels: torch.LongTensor | None = None,
        text_guidance_mask: torch.Tensor | None = None,
        volume_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> TGHMoEOutput:
        r"""Qwen2.5-VL forward with text-guided routing.

        task_labels: (B,) index into ``config.group_names`` of each sample's task, for the optional
            task-supervision loss of the level-1 routers (-100 or "shared": no task, ignored).
        text_guidance_mask: (B, L) bool, the tokens whose embeddings form the text vector (the
            instruction only). Required with ``labels`` / ``task_labels`` or in training mode;
            without them it defaults to all attended non-vision tokens (a prompt being generated).
        volume_features: (B, N, C + K) the 3D encoder's tokens of each sample (models with a volume
            encoder; ``model.volume_features(ct)`` or the training collation). Read in the prefill
            step only: they replace the input embeddings of the N volume placeholders of each row.
        """
        for site in self._llm_lora_sites:
            site.ensure_hooked()
        kwargs.pop("return_dict", None)  # always a ModelOutput (generate passes return_dict=True)
        if past_key_values is None:  # generate passes the cache under the installed version's name
            past_key_values = kwargs.pop("cache", None)
        compute_aux = self.training or labels is not None or task_labels is not None
        routings: dict[str, VisionRouting] = {}
        text = None
        if pixel_values is not None or pixel_values_videos is not None:
            text = self.text_features(
                input_ids, inputs_embeds, attention_mask, text_guidance_mask, require_mask=compute_aux
            )
            mm_encoder_outputs = dict(mm_encoder_outputs or {})
            visual_inputs = {
                "image": (pixel_values, image_grid_thw),
                "video": (pixel_values_videos, video_grid_thw),
            }
            for modality, (pixels, grid_thw) in visual_inputs.items():
                if pixels is None:
                    continue
                if grid_thw is None:
                    raise ValueError(f"{modality} pixels need {modality}_grid_thw")
                mm_encoder_outputs[modality], routings[modality] = self.encode_visual(
                    pixels, grid_thw, text, input_ids, inputs_embeds, modality, compute_aux
                )

        volume_tokens = volume_gate = None
        if self.volume_projector_module is not None and _is_prefill(past_key_values):
            volume_tokens, volume_gate, text = self._project_volume_tokens(
                input_ids, attention_mask, volume_features, text,
                lambda: self.text_features(
                    input_ids, inputs_embeds, attention_mask, text_guidance_mask, require_mask=compute_aux
                ),
            )

        with self._volume_embeddings(volume_tokens):
            outputs = super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                pixel_values=None,
                pixel_values_videos=None,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                mm_token_type_ids=mm_token_type_ids,
                second_per_grid_ts=second_per_grid_ts,
                logits_to_keep=logits_to_keep,
                mm_encoder_outputs=mm_encoder_outputs or None,
                **{CACHE_FIELD: past_key_values},
                **kwargs,
            )
        result = TGHMoEOutput(
            lm_loss=outputs.loss,
            logits=outputs.logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            volume_gate=volume_gate,
        )
        if routings:
            self._routing_losses(result, list(routings.values()), task_labels)
            if self._routing_recorder is not None:
                modality = "video" if "video" in routings else "image"
                self._routing_recorder.traces.append(
                    self._build_trace(routings[modality], modality, volume_gate)
                )
        parts = [
            (result.lm_loss, 1.0),
            (result.load_balancing_loss, self.config.router_aux_loss_coef),
            (result.z_loss, self.config.router_z_loss_coef),
            (result.task_loss, self.config.task_loss_coef),
        ]
        if labels is not None or task_labels is not None:
            present = [value * coef for value, coef in parts if value is not None]
            result.loss = torch.stack(present).sum() if present else None
        return result

    # ------------------------------------------------------------------ volume tokens
    def volume_token_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) bool: the attended volume placeholders (padding never counts, even when the
        placeholder is the pad token)."""
        positions = input_ids == int(self.config.volume_token_id)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape == input_ids.shape:
            positions &= attention_mask.to(positions.device).bool()
        return positions

    def _project_volume_tokens(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        volume_features: torch.Tensor | None,
        text: torch.Tensor | None,
        text_fn: Any,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None, torch.Tensor | None]:
        """((placeholder positions, projected tokens), gate, text vector), or Nones when the prompt
        carries no volume tokens."""
        if input_ids is None:
            if volume_features is not None:
                raise ValueError("volume_features need input_ids (the placeholders are found by id)")
            return None, None, text
        positions = self.volume_token_positions(input_ids, attention_mask)
        expected = int(self.config.num_volume_tokens)
        counts = positions.sum(1)
        if volume_features is None:
            if bool((counts == expected).any()):
                raise ValueError(
                    f"the prompt holds {expected} volume placeholders but no volume_features were given "
                    "(model.volume_features(ct) computes them)"
                )
            return None, None, text
        if volume_features.dim() != 3 or volume_features.shape[:2] != (input_ids.shape[0], expected):
            raise ValueError(
                f"volume_features must be (batch {input_ids.shape[0]}, {expected} tokens, features), "
                f"got {tuple(volume_features.shape)}"
            )
        if not bool((counts == expected).all()):
            raise ValueError(
                f"every prompt needs {expected} volume placeholders (token {self.config.volume_token_id}), "
                f"got {counts.tolist()}"
            )
        if text is None:
            text = text_fn()
        tokens, gate = self.volume_projector_module(volume_features, text)
        return (positions, tokens), gate, text

    @contextmanager
    def _volume_embeddings(self, volume_tokens: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[None]:
        """While the stock forward runs, the embedding module's output takes the projected tokens
        at the placeholder positions (a hook on it, removed afterwards)."""
        if volume_tokens is None:
            yield
            return
        positions, tokens = volume_tokens

        def replace(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if output.shape[:2] != positions.shape:
                return output
            source = tokens.reshape(-1, tokens.shape[-1]).to(device=output.device, dtype=output.dtype)
            return output.masked_scatter(positions.to(output.device)[..., None], source)

        handle = self.get_input_embeddings().register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()

    def _routing_losses(
        self, result: TGHMoEOutput, routings: list[VisionRouting], task_labels: torch.Tensor | None
    ) -> None:
        blocks = [b for r in routings for b in r.blocks]
        balancing = [b.load_balancing for b in blocks if b.load_balancing is not None]
        z_terms = [b.z_loss for b in blocks if b.z_loss is not None]
        result.load_balancing_loss = torch.stack(balancing).mean() if balancing else None
        result.z_loss = torch.stack(z_terms).mean() if z_terms else None

        group_names = self.config.group_names
        result.group_probs = mean_task_group_probs(
            ((b.task_probs, _task_groups(b.groups)) for b in routings[-1].blocks), group_names
        )

        if task_labels is not None:
            losses = []
            for block in (b for b in blocks if b.task_logits is not None):
                task_groups = _task_groups(block.groups)
                # group_names index -> index among this block's task groups (-100: none)
                lookup = torch.full(
                    (len(group_names),), -100, dtype=torch.long, device=block.task_logits.device
                )
                for j, g in enumerate(task_groups):
                    lookup[group_names.index(g)] = j
                labels = task_labels.to(block.task_logits.device).long()
                valid = (labels >= 0) & (labels < len(group_names))
                targets = torch.where(valid, lookup[labels.clamp(0, len(group_names) - 1)], -100)
                if (targets != -100).any():
                    losses.append(F.cross_entropy(block.task_logits, targets, ignore_index=-100))
            result.task_loss = torch.stack(losses).mean() if losses else None

    # ------------------------------------------------------------------ routing traces
    @contextmanager
    def record_routing(self) -> Iterator[RoutingRecorder]:
        """Record a ``RoutingTrace`` of each vision forward inside the block (none otherwise)."""
        recorder = RoutingRecorder()
        previous = self._routing_recorder
        self._routing_recorder = recorder
        try:
            yield recorder
        finally:
            self._routing_recorder = previous

    def _build_trace(
        self, routing: VisionRouting, modality: str, volume_gate: torch.Tensor | None = None
    ) -> RoutingTrace:
        config = self.config
        vision = config.vision_config
        expert_names = config.expert_names()
        group_names = config.group_names
        layers = self.moe_layers()
        expert_weights: dict[int, Any] = {}
        group_probs = {}
        block_groups = {}
        for block in routing.blocks:
            if block.block in expert_weights or block.gates is None:
                continue  # a gradient-checkpointing replay appends blocks again
            layer = layers[block.block]
            gates = block.gates.float()
            full = gates.new_zeros(gates.shape[0], len(expert_names))
            full[:, layer.global_expert_index] = gates
            grids = unpermute_to_grids(
                full, routing.window_index, routing.grid_thw, vision.spatial_merge_size
            )
            arrays = [g.cpu().numpy() for g in grids]
            same_shape = all(a.shape == arrays[0].shape for a in arrays)
            expert_weights[block.block] = np.stack(arrays) if same_shape else arrays
            task_probs = block.task_probs.detach().float().cpu() if block.task_probs is not None else None
            probs = block_group_probs(task_probs, _task_groups(block.groups), group_names, routing.text_features.shape[0])
            group_probs[block.block] = probs.numpy()
            block_groups[block.block] = list(block.groups)
        return RoutingTrace(
            blocks=sorted(expert_weights),
            group_names=list(group_names),
            expert_names=expert_names,
            block_groups=block_groups,
            group_probs=group_probs,
            expert_weights=expert_weights,
            grid_thw=routing.grid_thw.cpu().numpy(),
            visual_sample=routing.visual_sample.cpu().numpy(),
            patch_size=int(vision.patch_size),
            temporal_patch_size=int(vision.temporal_patch_size),
            spatial_merge_size=int(vision.spatial_merge_size),
            modality=modality,
            volume_gate=volume_gate.detach().float().cpu().numpy() if volume_gate is not None else None,
        )


# Saved Qwen2.5-VL checkpoints use the legacy key layout ("visual.*", "model.layers.*"), which
# transformers maps by class name: give this class the same mapping (used for loading and saving).
register_checkpoint_conversion_mapping(
    TGHMoEForConditionalGeneration.__name__,
    get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration"),
    overwrite=True,
)
AutoModelForImageTextToText.register(TGHMoEConfig, TGHMoEForConditionalGeneration, exist_ok=True)


# ---------------------------------------------------------------------- adapt / stages
def _moe_kwargs(moe_config: TGHMoEConfig | dict[str, Any] | None) -> dict[str, Any]:
    if moe_config is None:
        return {}
    if isinstance(moe_config, TGHMoEConfig):
        return {name: getattr(moe_config, name) for name in MOE_CONFIG_FIELDS}
    if isinstance(moe_config, dict):
        unknown = set(moe_config) - set(MOE_CONFIG_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown TGH-MoE settings {sorted(unknown)} (known: {MOE_CONFIG_FIELDS})"
            )
        return dict(moe_config)
    raise TypeError(
        f"moe_config must be a TGHMoEConfig, a dict or None, not {type(moe_config).__name__}"
    )


def adapt_2d_mllm(
    base_model: Qwen2_5_VLForConditionalGeneration,
    moe_config: TGHMoEConfig | dict[str, Any] | None = None,
    *,
    match_base_placement: bool = True,
) -> TGHMoEForConditionalGeneration:
    """Turn a loaded Qwen2.5-VL model into a TGH-MoE model, in place.

    No base tensor is copied, moved or changed (every key of the base state_dict keeps its value):
    the object's class becomes ``TGHMoEForConditionalGeneration``, the MoE vision blocks become
    ``TGHMoEVisionBlock`` and the experts / routers / LLM LoRA are added beside the base modules, on
    their device and dtype. Experts start with B = 0, so the adapted model computes what the base
    did. ``moe_config``: None (defaults), a dict of MoE settings, or a ``TGHMoEConfig`` (its MoE
    fields). Keep a separate copy if the plain 2D model is still needed.
    ``match_base_placement=False`` leaves the new modules on the CPU in float32: ``tghmoe convert``
    adapts a base built on the meta device (no base weight read) and saves only the new tensors.
    """
    if isinstance(base_model, TGHMoEForConditionalGeneration):
        raise ValueError("the model is already a TGH-MoE model")
    if not isinstance(base_model, Qwen2_5_VLForConditionalGeneration):
        raise TypeError(
            f"expected a Qwen2_5_VLForConditionalGeneration, got {type(base_model).__name__}"
        )
    config = TGHMoEConfig.from_base_config(base_model.config, **_moe_kwargs(moe_config))
    return _become_tghmoe(base_model, config, match_base_placement)


def _become_tghmoe(
    base_model: Qwen2_5_VLForConditionalGeneration, config: TGHMoEConfig, match_base_placement: bool
) -> TGHMoEForConditionalGeneration:
    """Give ``base_model`` the TGH-MoE class and ``config``, and install the new modules."""
    # Modules keep references to the sub-configs: share them so there is one source of truth.
    config.text_config = base_model.config.text_config
    config.vision_config = base_model.config.vision_config
    base_model.__class__ = TGHMoEForConditionalGeneration
    base_model.config = config
    base_model.model.config = config
    base_model._install_tghmoe(match_base_placement=match_base_placement)
    return base_model


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors TGH-MoE added (experts, routers, LoRA, their buffers), by module name."""
    return {name: value for name, value in model.state_dict().items() if ADAPTER_KEY.search(name)}


def save_adapter_weights(model: torch.nn.Module, file: str | Path) -> list[str]:
    """Write only the added tensors as safetensors (module-name keys); return the keys."""
    from safetensors.torch import save_file

    tensors = {name: value.detach().to("cpu").contiguous() for name, value in adapter_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no TGH-MoE tensors to save")
    save_file(tensors, str(file), metadata={"format": "pt", "content": "tghmoe-adapter"})
    return sorted(tensors)


def _check_same_base(config: TGHMoEConfig, base_config: Any, base_path: Any) -> None:
    """The base folder must be the model the experts were added to (same shapes and token ids)."""
    from napari_tghmoe.model.base_ref import BaseReferenceError

    for part, fields in _BASE_MATCH_FIELDS.items():
        ours = getattr(config, part) if part else config
        theirs = getattr(base_config, part) if part else base_config
        for name in fields:
            mine, base_value = getattr(ours, name, None), getattr(theirs, name, None)
            if mine != base_value:
                where = f"{part}.{name}" if part else name
                raise BaseReferenceError(
                    f"the base folder {base_path} is not the model the experts were added to: "
                    f"{where} is {base_value} there, {mine} in config.json"
                )


_STAGE_PARTS = {
    "shared_experts": re.compile(rf"\.moe\.groups\.{SHARED_GROUP}\."),
    "task_experts": re.compile(rf"\.moe\.groups\.(?!{SHARED_GROUP}\.)[^.]+\.lora_[AB]$"),
    "routers": re.compile(
        rf"\.moe\.(task_router\.|groups\.(?!{SHARED_GROUP}\.)[^.]+\.(router|text_router)\.)"
    ),
    "merger": re.compile(r"^model\.visual\.merger\.lora_"),
    "llm_lora": re.compile(r"\.lora_[a-z]+_proj\.lora_[AB]$"),
    "volume_gate": re.compile(r"^volume_projector\.gate\."),
    "volume_projector": re.compile(r"^volume_projector\.(?!gate\.)"),
}
_STAGE_TRAINS = {
    1: ("shared_experts", "merger", "llm_lora", "volume_projector", "volume_gate"),
    2: ("task_experts", "routers", "volume_gate"),
}


def parameter_part(name: str) -> str | None:
    """Which trainable part a parameter belongs to (None: base weights, always frozen by set_stage).

    shared_experts includes the shared group's token/text routers; routers = level-1 task routers
    and the task groups' token/text routers.
    """
    for part, pattern in _STAGE_PARTS.items():
        if pattern.search(name):
            return part
    return None


@torch.no_grad()
def _copy_shared_into_task_experts(model: TGHMoEForConditionalGeneration) -> int:
    """Task expert j starts in shared expert (j mod n_shared)'s subspace, contributing nothing.

    A is copied, B is zeroed: the task experts add ``B A x = 0`` until stage 2 trains them, so
    stage 2 starts from exactly the stage-1 function (copying B as well would add the shared
    path a second time, doubling the experts' gate mass at the first step). Once per block; the
    flag is saved.
    """
    copied = 0
    for layer in model.moe_layers().values():
        if bool(layer.task_experts_initialised) or not layer.task_group_names:
            continue
        shared = layer.groups[SHARED_GROUP]
        for group_name in layer.task_group_names:
            group = layer.groups[group_name]
            source = (
                torch.arange(group.num_experts, device=shared.lora_A.device) % shared.num_experts
            )
            group.lora_A.copy_(shared.lora_A[source])
            group.lora_B.zero_()
        layer.task_experts_initialised.fill_(True)
        copied += 1
    return copied


def set_stage(model: TGHMoEForConditionalGeneration, stage: int) -> dict[str, int]:
    """Freeze everything except the parts trained in ``stage`` and return parameter counts.

    Stage 1 (task-shared): shared experts (+ their routers), LoRA on the vision->LLM merger, LLM
    LoRA, and the volume projector (models with a 3D encoder; its text gate trains in both stages).
    No base tensor trains in either stage (the merger itself included), nor the 3D encoder.
    Stage 2 (task-specific): starts the task experts from the shared experts' A with B = 0 (once;
    recorded in the ``task_experts_initialised`` buffers, so a second call or a reloaded checkpoint
    does not redo it), so the model computes exactly the stage-1 function at its first step; then
    trains the task experts and the routers: the level-1 task routers and the task groups' token
    and text routers. Shared parts stay frozen, the shared group's own routers included.
    Returns {part: trainable count} for every part, plus "trainable", "total" and
    "task_experts_copied" (blocks copied by this call).
    """
    if stage not in _STAGE_TRAINS:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if not isinstance(model, TGHMoEForConditionalGeneration):
        raise TypeError("set_stage needs a TGHMoEForConditionalGeneration (see adapt_2d_mllm)")
    copied = _copy_shared_into_task_experts(model) if stage == 2 else 0
    trains = _STAGE_TRAINS[stage]
    counts = dict.fromkeys(_STAGE_PARTS, 0)
    total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        part = parameter_part(name)
        trainable = part in trains
        param.requires_grad_(trainable)
        if trainable:
            counts[part] += param.numel()
    counts["trainable"] = sum(counts[p] for p in _STAGE_PARTS)
    counts["total"] = total
    counts["task_experts_copied"] = copied
    return counts
