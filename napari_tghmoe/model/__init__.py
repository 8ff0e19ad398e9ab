"""TGH-MoE: a Qwen2.5-VL 2D multimodal LLM adapted to 3D CT (torch + transformers, no Qt).

Names are resolved lazily so ``import napari_tghmoe.model`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TGHMoEConfig": "napari_tghmoe.model.configuration",
    "TGHMoEForConditionalGeneration": "napari_tghmoe.model.modeling",
    "TGHMoEOutput": "napari_tghmoe.model.modeling",
    "adapt_2d_mllm": "napari_tghmoe.model.modeling",
    "set_stage": "napari_tghmoe.model.modeling",
    "RoutingTrace": "napari_tghmoe.model.routing",
    "prepare_volume": "napari_tghmoe.model.preprocess",
    "VolumeInputs": "napari_tghmoe.model.preprocess",
    "load_model": "napari_tghmoe.model.loading",
    "ModelLoadError": "napari_tghmoe.model.loading",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
