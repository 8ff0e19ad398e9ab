"""A Qwen2.5-VL folder in the exact Hugging Face layout a user brings, small or at the real 3B size.

No Qwen2.5-VL checkpoint can be downloaded here, yet ``tghmoe convert``, the loader and the engine
must take the real ``Qwen/Qwen2.5-VL-3B-Instruct`` folder as it is. :func:`build_hf_layout_folder`
writes one with the same files and formats: ``config.json`` in Qwen's own flat layout (text fields at
the top, ``rope_scaling`` with ``mrope_section``, ``vision_config`` with ``fullatt_block_indexes``),
random weights saved sharded as ``model-0000x-of-0000y.safetensors`` with
``model.safetensors.index.json``, a real byte-level BPE tokenizer in Qwen2's format
(``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``, ``merges.txt``; Qwen's NFC
normaliser and split regex; the 14 special tokens after the BPE vocabulary in Qwen's order, so
``<|endoftext|>`` is the first added id as 151643 is in the real one), Qwen's multimodal chat template
in ``chat_template.json``, ``preprocessor_config.json`` and ``video_preprocessor_config.json`` with
Qwen's keys, and ``generation_config.json``. Dimensions default small (tests); :data:`QWEN2_5_VL_3B`
gives the real ones (benchmarks: random weights, since speed and memory do not depend on values).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from napari_tghmoe.model.preprocess import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD

#: Qwen2.5-VL's added tokens in id order (151643.. in the real tokenizer).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
CLIP_MEAN = DEFAULT_IMAGE_MEAN
CLIP_STD = DEFAULT_IMAGE_STD

#: Qwen2.5-VL's chat template (``chat_template.json``), the default system prompt as a slot.
_QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "@@SYSTEM@@<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_chat_template(system_prompt: str = QWEN_DEFAULT_SYSTEM_PROMPT) -> str:
    """Qwen2.5-VL's chat template with ``system_prompt`` as its default system turn."""
    return _QWEN_CHAT_TEMPLATE.replace("@@SYSTEM@@", system_prompt)


@dataclass(frozen=True)
class QwenDims:
    """The shape of a Qwen2.5-VL model (defaults: small, for tests)."""

    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    vocab_size: int = 448  # >= the tokenizer's size (Qwen pads 151665 tokens to 151936)
    vision_depth: int = 4
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    fullatt_block_indexes: tuple[int, ...] = (1, 3)
    window_size: int = 112
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    tokens_per_second: int = 2
    tie_word_embeddings: bool = True
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 128000

    @property
    def mrope_section(self) -> list[int]:
        """(t, h, w) split of head_dim / 2: Qwen's 16/24/24 of 64 for head_dim 128."""
        half = self.text_hidden // self.text_heads // 2
        t = half // 4
        return [t, (half - t) // 2, half - t - (half - t) // 2]


#: Qwen2.5-VL-3B-Instruct's dimensions (its config.json).
QWEN2_5_VL_3B = QwenDims(
    text_hidden=2048,
    text_layers=36,
    text_heads=16,
    text_kv_heads=2,
    text_intermediate=11008,
    vocab_size=151936,
    vision_depth=32,
    vision_hidden=1280,
    vision_heads=16,
    vision_intermediate=3420,
    fullatt_block_indexes=(7, 15, 23, 31),
    window_size=112,
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
)


def build_qwen_tokenizer(corpus: Iterable[str] | None = None, bpe_vocab_size: int = 400):
    """A byte-level BPE trained on ``corpus`` in Qwen2's format, with Qwen's special tokens.

    Qwen2's normaliser (NFC), split regex and byte-level decoder; the specials are added after the
    BPE vocabulary in Qwen's order. Returns a ``Qwen2Tokenizer`` (transformers' Qwen2TokenizerFast).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from napari_tghmoe.model.tokenizer import DEFAULT_CORPUS

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(list(corpus or DEFAULT_CORPUS), trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return Qwen2Tokenizer(
        tokenizer_object=backend,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=131072,
    )


def token_ids(tokenizer: Any) -> dict[str, int]:
    """The special-token ids a Qwen2.5-VL config names, read from the tokenizer."""
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in QWEN_SPECIAL_TOKENS}
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }


def qwen_config_dict(dims: QwenDims, ids: dict[str, int]) -> dict[str, Any]:
    """``config.json`` as Qwen2.5-VL-3B-Instruct ships it (the flat layout of transformers 4.4x)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "vision_start_token_id": ids["vision_start_token_id"],
        "vision_end_token_id": ids["vision_end_token_id"],
        "vision_token_id": ids["vision_token_id"],
        "image_token_id": ids["image_token_id"],
        "video_token_id": ids["video_token_id"],
        "hidden_act": "silu",
        "hidden_size": dims.text_hidden,
        "initializer_range": 0.02,
        "intermediate_size": dims.text_intermediate,
        "max_position_embeddings": dims.max_position_embeddings,
        "max_window_layers": 70,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": dims.text_heads,
        "num_hidden_layers": dims.text_layers,
        "num_key_value_heads": dims.text_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": dims.rope_theta,
        "sliding_window": 32768,
        "tie_word_embeddings": dims.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": dims.vision_depth,
            "hidden_act": "silu",
            "hidden_size": dims.vision_hidden,
            "intermediate_size": dims.vision_intermediate,
            "num_heads": dims.vision_heads,
            "in_chans": 3,
            "out_hidden_size": dims.text_hidden,
            "patch_size": dims.patch_size,
            "spatial_merge_size": dims.spatial_merge_size,
            "spatial_patch_size": dims.patch_size,
            "window_size": dims.window_size,
            "fullatt_block_indexes": list(dims.fullatt_block_indexes),
            "tokens_per_second": dims.tokens_per_second,
            "temporal_patch_size": dims.temporal_patch_size,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": dims.mrope_section},
        "vocab_size": dims.vocab_size,
    }


def preprocessor_config_dicts(
    dims: QwenDims,
    image_mean: tuple[float, ...] = CLIP_MEAN,
    image_std: tuple[float, ...] = CLIP_STD,
    min_pixels: int = 3136,
    max_pixels: int = 12845056,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``preprocessor_config.json``, ``video_preprocessor_config.json``) with Qwen's keys."""
    image = {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": dims.patch_size,
        "temporal_patch_size": dims.temporal_patch_size,
        "merge_size": dims.spatial_merge_size,
        "image_mean": list(image_mean),
        "image_std": list(image_std),
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    video = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": False,
        "image_mean": list(image_mean),
        "image_std": list(image_std),
        "max_frames": 768,
        "max_pixels": max_pixels,
        "merge_size": dims.spatial_merge_size,
        "min_frames": 4,
        "min_pixels": min_pixels,
        "patch_size": dims.patch_size,
        "processor_class": "Qwen2_5_VLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
        "temporal_patch_size": dims.temporal_patch_size,
        "video_processor_type": "Qwen2VLVideoProcessor",
    }
    return image, video


def _tokenizer_config(tokenizer: Any, chat_template: str) -> dict[str, Any]:
    """``tokenizer_config.json`` as Qwen ships it (transformers 4.4x keys, the template inside)."""
    decoder = {
        str(tokenizer.convert_tokens_to_ids(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True
        }
        for t in QWEN_SPECIAL_TOKENS
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_hf_layout_folder(
    folder: str | Path,
    dims: QwenDims | None = None,
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "200KB",
    image_mean: tuple[float, ...] = CLIP_MEAN,
    image_std: tuple[float, ...] = CLIP_STD,
    min_pixels: int = 3136,
    max_pixels: int = 12845056,
    system_prompt: str = QWEN_DEFAULT_SYSTEM_PROMPT,
    tokenizer_system_prompt: str | None = None,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Write a Qwen2.5-VL folder in the Hugging Face layout into ``folder``; return it.

    ``chat_template.json`` carries ``system_prompt``; ``tokenizer_config.json`` carries the same
    template with ``tokenizer_system_prompt`` (default: the same), so a test can tell which file a
    prompt came from. ``max_shard_size`` goes to ``save_pretrained`` (several shards + index).
    """
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    dims = dims or QwenDims()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tokenizer = build_qwen_tokenizer(corpus)
    if len(tokenizer) > dims.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size {dims.vocab_size}")
    ids = token_ids(tokenizer)
    config_dict = qwen_config_dict(dims, ids)
    _write_json(folder / "config.json", config_dict)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)  # parsed as a user's would be

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    del model
    _write_json(folder / "config.json", config_dict)  # Qwen's own layout, not transformers 5's

    tokenizer.save_pretrained(folder)
    tokenizer.backend_tokenizer.model.save(str(folder))  # vocab.json + merges.txt
    template = qwen_chat_template(system_prompt)
    tokenizer_template = qwen_chat_template(
        system_prompt if tokenizer_system_prompt is None else tokenizer_system_prompt
    )
    _write_json(folder / "tokenizer_config.json", _tokenizer_config(tokenizer, tokenizer_template))
    for stray in ("chat_template.jinja", "special_tokens_map.json"):
        (folder / stray).unlink(missing_ok=True)
    _write_json(folder / "chat_template.json", {"chat_template": template})

    image, video = preprocessor_config_dicts(dims, image_mean, image_std, min_pixels, max_pixels)
    _write_json(folder / "preprocessor_config.json", image)
    _write_json(folder / "video_preprocessor_config.json", video)
    _write_json(
        folder / "generation_config.json",
        {
            "bos_token_id": ids["bos_token_id"],
            "pad_token_id": ids["pad_token_id"],
            "do_sample": True,
            "eos_token_id": [ids["eos_token_id"], ids["bos_token_id"]],
            "repetition_penalty": 1.05,
            "temperature": 0.1,
            "top_p": 0.001,
            "top_k": 1,
            "transformers_version": "4.37.0",
        },
    )
    return folder


def dims_as_dict(dims: QwenDims) -> dict[str, Any]:
    """Plain dict of the dimensions (benchmark reports)."""
    return asdict(dims)


__all__ = [
    "QWEN2_5_VL_3B",
    "QWEN_SPECIAL_TOKENS",
    "QwenDims",
    "build_hf_layout_folder",
    "build_qwen_tokenizer",
    "qwen_chat_template",
    "qwen_config_dict",
]
