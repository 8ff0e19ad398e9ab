"""A small byte-level BPE tokenizer with Qwen2.5-VL's special tokens at the tiny model's ids.

No pretrained tokenizer can be downloaded here, so tests and the bundled demo model train one
on a small corpus with the ``tokenizers`` library. Its special tokens carry Qwen's names
(``<|im_start|>``, ``<|video_pad|>``...) so the engine's prompt code is the same for a real
Qwen2.5-VL checkpoint and for a tiny one; only their ids differ (``TINY_SPECIAL_TOKENS``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from napari_tghmoe.model.tiny import TINY_SPECIAL_TOKENS

#: Token text for each key of ``TINY_SPECIAL_TOKENS`` (Qwen2.5-VL's own spellings).
SPECIAL_TOKEN_TEXT = {
    "pad": "<|endoftext|>",
    "eos": "<|im_end|>",
    "bos": "<|im_start|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
}

#: The ChatML shape Qwen uses, without Qwen's default system prompt or tool handling.
#: Content may be a plain string (what the engine passes).
MINIMAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


#: Where a model folder keeps its chat template, in transformers' processor order: the legacy
#: processor file first (Qwen2.5-VL ships its multimodal template there), then the raw Jinja file.
CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")


class ChatTemplateError(ValueError):
    """A chat-template file of the folder cannot be read (the message names the file)."""


def folder_chat_template(folder: Any) -> tuple[str, str] | None:
    """(template, file name) of the folder's own chat template, or None when it has no file.

    ``AutoTokenizer`` reads only the tokenizer's template; a Qwen2.5-VL folder keeps its
    multimodal template in ``chat_template.json`` for the processor, and a model must be asked
    the way it was trained, so the processor's file wins, as in transformers' ``ProcessorMixin``.
    """
    import json
    from pathlib import Path

    folder = Path(folder)
    for name in CHAT_TEMPLATE_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            text = file.read_text(encoding="utf-8")
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ChatTemplateError(f"{name} cannot be read ({type(err).__name__}: {err})") from None
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {str(t.get("name")): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str) or not template.strip():
            raise ChatTemplateError(f"{name} holds no chat template")
        return template, name
    return None


def special_tokens_in_id_order() -> list[str]:
    """Special token strings sorted by their id in ``TINY_SPECIAL_TOKENS`` (ids 0, 1, 2...)."""
    ordered = sorted(TINY_SPECIAL_TOKENS.items(), key=lambda item: item[1])
    ids = [token_id for _, token_id in ordered]
    if ids != list(range(len(ids))):  # the trainer assigns specials the first ids in order
        raise ValueError(f"TINY_SPECIAL_TOKENS must use ids 0..n-1, got {ids}")
    return [SPECIAL_TOKEN_TEXT[key] for key, _ in ordered]


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512, **trainer_kwargs: Any):
    """Train a byte-level BPE on ``corpus`` and wrap it as a transformers fast tokenizer.

    The specials take ids 0..6 exactly as ``TINY_SPECIAL_TOKENS``; ``vocab_size`` must match
    the model's ``text_config.vocab_size`` or be smaller. Save with ``save_pretrained(folder)``
    (writes ``tokenizer.json`` + ``tokenizer_config.json`` with the chat template).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens_in_id_order()
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        **trainer_kwargs,
    )
    backend.train_from_iterator(list(corpus), trainer=trainer)
    for name, token_id in TINY_SPECIAL_TOKENS.items():
        actual = backend.token_to_id(SPECIAL_TOKEN_TEXT[name])
        if actual != token_id:  # pragma: no cover - guarded by special_tokens_in_id_order
            raise RuntimeError(f"special token {name} got id {actual}, expected {token_id}")
    if backend.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {backend.get_vocab_size()} tokens, more than {vocab_size}")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=SPECIAL_TOKEN_TEXT["eos"],
        pad_token=SPECIAL_TOKEN_TEXT["pad"],
        bos_token=None,
        additional_special_tokens=specials[2:],
        model_max_length=32768,
        padding_side="left",  # batched generation pads on the left
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = MINIMAL_CHAT_TEMPLATE
    return tokenizer


#: A few sentences in the register of CT reports and questions: enough for a tiny BPE.
DEFAULT_CORPUS = (
    "The lungs are clear. No pleural effusion or pneumothorax.",
    "A 2 cm hypodense lesion is seen in the right lobe of the liver.",
    "Findings: the liver, spleen, pancreas and kidneys are unremarkable.",
    "Impression: no acute abnormality in the chest, abdomen or pelvis.",
    "Which organ shows an abnormality? Choices: A. liver B. spleen C. kidney D. lung",
    "In which plane is this image acquired? axial coronal sagittal",
    "What phase is this CT scan? arterial portal venous non-contrast delayed",
    "Where is the nodule located? upper lobe lower lobe left right",
    "Generate a radiology report with the findings of this CT volume.",
    "Describe the findings of this scan. Answer the question about the image.",
    "There is a calcified nodule in the left upper lobe measuring 8 mm.",
    "Bone windows show no fracture. The aorta is of normal calibre.",
)
