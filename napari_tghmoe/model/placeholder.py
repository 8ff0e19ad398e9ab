"""An untrained, randomly initialised TGH-MoE model folder: the tests' model and the chat's last resort.

The bundled demo model (``resources/demo-model``) is what a user meets first; this builds the
*placeholder* a user can still pick when no trained model is at hand (the chat's "untrained
placeholder" entry, built on first use into the cache folder), and the tiny real model folder
the tests and UI benchmarks load. It is a tiny Qwen2.5-VL (``model/tiny.py``) adapted to TGH-MoE
(``adapt_2d_mllm``) with a small BPE tokenizer (``build_tokenizer``), saved with
``save_pretrained`` (safetensors). A ``PLACEHOLDER.txt`` marker lets the UI say plainly that the
model is untrained: its text is random words, never a finding.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

MARKER_FILE = "PLACEHOLDER.txt"
MARKER_TEXT = (
    "untrained placeholder model: random weights built by napari-tghmoe for tests and the demo.\n"
    "Its answers are random text, not medical findings.\n"
)

_CORPUS = [
    "Generate a radiology report.",
    "Please write a report of the findings in this CT volume.",
    "In which plane is this CT scan acquired: axial, coronal or sagittal?",
    "Which CT phase is this: non-contrast, arterial, portal venous or delayed?",
    "Which organ shows an abnormality in this scan?",
    "What abnormality is seen in this CT scan?",
    "Where is the abnormality located?",
    "The lungs are clear. No pleural effusion. No pneumothorax.",
    "A 2 cm hypodense lesion in segment VI of the liver, likely a cyst.",
    "The kidneys, spleen and pancreas are unremarkable. No lymphadenopathy.",
    "A spiculated nodule in the right upper lobe measures 14 mm.",
    "Axial. Coronal. Sagittal. Arterial phase. Portal venous phase. Non-contrast.",
    "Liver, lung, kidney, spleen, pleura, lymph node, bone, heart, aorta.",
    "Choices: A. axial B. coronal C. sagittal D. oblique",
]


def placeholder_model_dir() -> Path:
    """Cache folder of the placeholder model (under the project's cache folder)."""
    from napari_tghmoe._resources import default_cache_dir

    return default_cache_dir() / "placeholder-model"


def is_placeholder(folder: str | Path) -> bool:
    """True for a folder built here (it holds the marker file): its answers are random."""
    return (Path(folder) / MARKER_FILE).is_file()


def build_placeholder_model(
    folder: str | Path,
    *,
    volume_grid: Sequence[int] = (16, 128, 128),
    seed: int = 0,
    moe_overrides: dict | None = None,
) -> Path:
    """Write a random tiny TGH-MoE model + tokenizer to ``folder`` (atomically) and return it."""
    import torch

    from napari_tghmoe.model.modeling import adapt_2d_mllm
    from napari_tghmoe.model.tiny import build_tiny_base_model
    from napari_tghmoe.model.tokenizer import build_tokenizer

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    base = build_tiny_base_model(seed=seed)
    moe = {"volume_grid": list(volume_grid), "experts_per_group": 2, "lora_rank": 4, "llm_lora_rank": 0}
    moe.update(moe_overrides or {})
    torch.manual_seed(seed)
    model = adapt_2d_mllm(base, moe)
    model.eval()
    tokenizer = build_tokenizer(_CORPUS, vocab_size=base.config.text_config.vocab_size)
    # Random weights pick byte tokens that are not valid UTF-8 on their own ("\ufffd" soup);
    # suppress them in the saved generation config so the untrained text is at least legible.
    model.generation_config.suppress_tokens = _illegible_token_ids(tokenizer, base.config.text_config.vocab_size)
    model.generation_config.repetition_penalty = 1.5  # random weights otherwise repeat one token
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / MARKER_FILE).write_text(MARKER_TEXT, encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _illegible_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids whose text is not printable ASCII (the end-of-answer token stays allowed)."""
    eos = tokenizer.eos_token_id
    bad = []
    for token_id in range(vocab_size):
        if token_id == eos:
            continue
        text = tokenizer.decode([token_id]) if token_id < len(tokenizer) else ""
        if token_id in tokenizer.all_special_ids or not text or not all(32 <= ord(c) < 127 for c in text):
            bad.append(token_id)
    return bad


def ensure_placeholder_model(folder: str | Path | None = None) -> Path:
    """The placeholder folder, built on first use (a few seconds on CPU)."""
    folder = Path(folder) if folder is not None else placeholder_model_dir()
    if is_placeholder(folder) and (folder / "config.json").is_file():
        return folder
    return build_placeholder_model(folder)
