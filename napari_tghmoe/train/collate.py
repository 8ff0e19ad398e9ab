"""Samples -> one batch of keyword arguments for ``TGHMoEForConditionalGeneration.forward``.

Training only: the prompt goes through the engine's own :class:`~napari_tghmoe.model.prompts.PromptBuilder`
and the volume through the engine's own preprocessing, so a model is trained on exactly the tokens
and pixels it is asked with.
"""

from __future__ import annotations

import weakref

from collections.abc import Sequence
from typing import Any

from napari_tghmoe.datasets.samples import Sample
from napari_tghmoe.datasets.volumes import load_sample_volume
from napari_tghmoe.model.prompts import DEFAULT_GROUP_NAMES  # the groups when the config names none

__all__ = ["DEFAULT_GROUP_NAMES", "IGNORE_INDEX", "collate", "make_collate_fn"]

IGNORE_INDEX = -100


def collate(
    samples: Sequence[Sample],
    tokenizer: Any,
    model_config: Any,
    *,
    max_length: int | None = None,
    rewrite_like_engine: bool = True,
    zero_image: bool = False,
    volume_features: Any = None,
    faithful_reports: bool = False,
    faithful_answers: bool = False,
) -> dict[str, Any]:
    """Batch samples into keyword arguments for ``TGHMoEForConditionalGeneration.forward``.

    The prompt is rendered by the engine's own code (:class:`napari_tghmoe.model.prompts.PromptBuilder`):
    chat template, ``<|vision_start|>`` + ``<|video_pad|>`` x N + ``<|vision_end|>`` +
    instruction, assistant turn; then the target tokens and the end-of-turn token
    (``tokenizer.eos_token``). With ``rewrite_like_engine`` the instruction is what the
    engine would send for ``sample.prompt`` (``plan_prompt``), so training sees exactly what
    inference sees. Sequences are right-padded.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (prompt, vision tokens and padding
    = -100), ``mm_token_type_ids`` (2 on video tokens), ``text_guidance_mask`` (the
    instruction tokens only), ``pixel_values_videos`` (concatenated over the batch),
    ``video_grid_thw`` (B, 3), ``second_per_grid_ts`` (B,), ``task_labels`` (index of each
    sample's task in ``model_config.group_names``).
    ``max_length`` truncates the target (never the prompt or the vision tokens).
    ``zero_image`` (recipe ``[data] zero_image``) replaces ``pixel_values_videos`` by zeros of the
    same shape: the image-free control trained on the same budget (grid, tokens, positions and
    text unchanged, so the model differs only in what it sees); the 3D encoder's tokens too.
    A model with a 3D volume encoder (``model_config.num_volume_tokens``) also gets
    ``volume_features`` (B, N, C + K), from ``volume_features.features(sample)``
    (a :class:`napari_tghmoe.model.volume_tokens.VolumeFeatureCache`: the frozen encoder runs
    once per volume); the prompt builder puts the N placeholders after the video block.
    ``faithful_reports`` (recipe ``[data] faithful_reports``): a report target states only the
    true findings its evidence words state (:func:`napari_tghmoe.train.faithful.faithful_report`).
    ``faithful_answers`` (recipe ``[data] faithful_answers``): a question about a finding is
    answered as its evidence words answer it (:func:`napari_tghmoe.train.faithful.faithful_answer`).
    """
    import torch

    from napari_tghmoe.model.prompts import PromptBuilder, instruction_for, routing_label

    if not samples:
        raise ValueError("collate needs at least one sample")
    num_volume_tokens = int(getattr(model_config, "num_volume_tokens", 0) or 0)
    if num_volume_tokens and volume_features is None:
        raise ValueError("the model has a 3D volume encoder: collate needs volume_features (a VolumeFeatureCache)")
    builder = PromptBuilder(tokenizer, model_config)
    group_names = list(getattr(model_config, "group_names", None) or DEFAULT_GROUP_NAMES)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    rows: list[tuple[list[int], list[int], list[bool]]] = []
    pixels, grids, seconds, task_labels, volumes = [], [], [], [], []
    for sample in samples:
        inputs = _prepared_volume(sample, model_config)
        instruction = instruction_for(sample.prompt) if rewrite_like_engine else sample.prompt.strip()
        words = volume_features.words(sample) if num_volume_tokens and hasattr(volume_features, "words") else ""
        prompt = builder.build_inputs(instruction, inputs.num_video_tokens, evidence_words=words)
        prompt_ids = prompt.input_ids[0].tolist()
        guidance = prompt.text_guidance_mask[0].tolist()
        target = sample.target
        if faithful_reports and words and sample.task == "report" and "findings" in sample.meta:
            from napari_tghmoe.train.faithful import faithful_report

            target = faithful_report(target, sample.meta["findings"], words, sample.meta["region"])
        if faithful_answers and words and sample.task != "report" and "answer_text" in sample.meta:
            target = _faithful_target(sample, words)
        target_ids = tokenizer(target.strip(), add_special_tokens=False)["input_ids"] + [eos_id]
        if max_length is not None:
            room = max_length - len(prompt_ids)
            if room < 1:
                raise ValueError(
                    f"sample {sample.meta.get('id', '?')}: the prompt alone has {len(prompt_ids)} tokens, "
                    f"more than max_length={max_length}"
                )
            target_ids = target_ids[:room]
        ids = prompt_ids + target_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
        rows.append((ids, labels, guidance + [False] * len(target_ids)))
        pixels.append(inputs.pixel_values_videos)
        grids.append(inputs.video_grid_thw[0])
        seconds.append(inputs.second_per_grid_ts[0])
        task_labels.append(routing_label(sample.task, instruction, group_names))
        if num_volume_tokens:
            volumes.append(volume_features.features(sample))
    width = max(len(ids) for ids, _, _ in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    guidance_mask = torch.zeros((batch, width), dtype=torch.bool)
    for row, (ids, row_labels, guidance) in enumerate(rows):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(row_labels)
        guidance_mask[row, :n] = torch.tensor(guidance)
    video_token_id = int(model_config.video_token_id)
    extra: dict[str, Any] = {}
    if num_volume_tokens:
        stacked = torch.stack(volumes).to(torch.float32)
        extra["volume_features"] = torch.zeros_like(stacked) if zero_image else stacked
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "mm_token_type_ids": (input_ids == video_token_id).to(torch.int32) * 2,
        "text_guidance_mask": guidance_mask,
        "pixel_values_videos": torch.zeros_like(torch.cat(pixels, dim=0)) if zero_image else torch.cat(pixels, dim=0),
        "video_grid_thw": torch.stack(grids).to(torch.long),
        "second_per_grid_ts": torch.stack(seconds).to(torch.float32),
        "task_labels": torch.tensor(task_labels, dtype=torch.long),
        **extra,
    }


def _faithful_target(sample: Sample, words: str) -> str:
    """A question's target with the answer its evidence words support (closed: letter and text)."""
    from napari_tghmoe.datasets.samples import closed_vqa_target
    from napari_tghmoe.train.faithful import faithful_answer

    answer = faithful_answer(sample.qtype, sample.meta, words)
    if answer == sample.meta["answer_text"]:
        return sample.target
    if sample.task == "vqa_open":
        return answer
    return closed_vqa_target("ABCD"[list(sample.meta["choices"]).index(answer)], answer)


def make_collate_fn(tokenizer: Any, model_config: Any, **options: Any):
    """``collate`` bound to a tokenizer and config, for ``torch.utils.data.DataLoader(collate_fn=...)``."""
    import functools

    return functools.partial(collate, tokenizer=tokenizer, model_config=model_config, **options)


#: Prepared video inputs per loaded volume (a preloaded CTVolume is shared by its samples): a
#: full-size CT is resampled to the model grid once, not at every step it is drawn.
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepared_volume(sample: Any, model_config: Any) -> Any:
    from napari_tghmoe.model.preprocess import prepare_volume

    volume = load_sample_volume(sample)
    signature = (id(model_config), tuple(getattr(model_config, "volume_grid", ()) or ()))
    try:
        held = _PREPARED.get(volume)
    except TypeError:  # not weak-referenceable: prepare every time
        return prepare_volume(volume, None, model_config)
    if held is not None and held[0] == signature:
        return held[1]
    inputs = prepare_volume(volume, None, model_config)
    _PREPARED[volume] = (signature, inputs)
    return inputs
