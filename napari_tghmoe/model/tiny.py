"""Small Qwen2.5-VL-architecture configs for tests, the demo model and benchmarks.

No pretrained VLM weights can be downloaded here, so everything that needs a model offline
builds one of these (random weights) with the real ``Qwen2_5_VLForConditionalGeneration``.
"""

from __future__ import annotations

from typing import Any

# Token ids of the special tokens at the top of a small vocabulary, so a tiny tokenizer can
# put its own specials there. Real Qwen2.5-VL uses 151643.. for these.
TINY_SPECIAL_TOKENS = {
    "pad": 0,
    "eos": 1,
    "bos": 2,
    "vision_start": 3,
    "vision_end": 4,
    "image": 5,
    "video": 6,
}


def tiny_base_config(
    vocab_size: int = 512,
    text_hidden: int = 64,
    text_layers: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 4,
    patch_size: int = 8,
    spatial_merge_size: int = 2,
    **overrides: Any,
):
    """A Qwen2.5-VL config small enough for CPU tests (a forward pass in milliseconds).

    ``mrope_section`` must sum to head_dim / 2 of the text model. ``spatial_merge_size``: patches
    per LLM token along each in-plane axis (Qwen2.5-VL: 2); smaller patches with a larger merge
    let the vision tower see finer detail for the same number of LLM tokens.
    """
    from transformers import Qwen2_5_VLConfig

    text_heads = 4
    head_dim = text_hidden // text_heads
    half = head_dim // 2
    t = half // 4
    mrope = [half - 2 * ((half - t) // 2), (half - t) // 2, (half - t) // 2]
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": text_hidden,
        "intermediate_size": text_hidden * 2,
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        "bos_token_id": TINY_SPECIAL_TOKENS["bos"],
        "eos_token_id": TINY_SPECIAL_TOKENS["eos"],
        "pad_token_id": TINY_SPECIAL_TOKENS["pad"],
    }
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_hidden,
        "intermediate_size": vision_hidden * 2,
        "num_heads": 2,
        "patch_size": patch_size,
        "spatial_merge_size": spatial_merge_size,
        "temporal_patch_size": 2,
        "window_size": patch_size * spatial_merge_size * 4,  # 4x4 merged patches per attention window
        "out_hidden_size": text_hidden,
        "fullatt_block_indexes": [vision_depth - 1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=TINY_SPECIAL_TOKENS["image"],
        video_token_id=TINY_SPECIAL_TOKENS["video"],
        vision_start_token_id=TINY_SPECIAL_TOKENS["vision_start"],
        vision_end_token_id=TINY_SPECIAL_TOKENS["vision_end"],
        **overrides,
    )
    return config


def build_tiny_base_model(seed: int = 0, **config_kwargs: Any):
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` (the 2D base to adapt)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_base_config(**config_kwargs))
    model.eval()
    return model
