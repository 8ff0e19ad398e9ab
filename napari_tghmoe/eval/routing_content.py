"""Does level 1 route by what a prompt is about, or only by its answer format?

The level-1 (task) router of each MoE block reads only the text vector of the instruction, so its
group probabilities can be read for any prompt without an image. Grouping prompts by answer format
(report / closed / open question) and by topic (:func:`napari_tghmoe.model.prompts.prompt_topic`:
chest, abdomen, acquisition, general) and comparing the mean distributions says which of the two
the router separates: a "liver" and a "lung" closed question that route alike are routed by format.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np


def level1_probabilities(engine: Any, instructions: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(task groups, (N, groups) level-1 probabilities) of each instruction, averaged over the
    blocks that carry task groups: what the chat's task-group plot shows for that question
    (``InferenceEngine.router_task_probs``, the engine's own prompt and instruction mask)."""
    rows = []
    for instruction in instructions:
        inputs = engine.build_inputs(instruction, 1)
        rows.append(
            engine.router_task_probs(
                {
                    "input_ids": inputs.input_ids.to(engine.model.device),
                    "attention_mask": inputs.attention_mask.to(engine.model.device),
                    "text_guidance_mask": inputs.text_guidance_mask.to(engine.model.device),
                }
            )
        )
    groups = list(rows[0]) if rows else []
    return groups, np.array([[row[g] for g in groups] for row in rows], dtype=float)


def mean_by_label(probs: np.ndarray, labels: Sequence[str]) -> dict[str, np.ndarray]:
    labels = np.asarray(labels)
    return {str(label): probs[labels == label].mean(0) for label in dict.fromkeys(labels.tolist())}


def separation(probs: np.ndarray, labels: Sequence[str]) -> float | None:
    """Mean total-variation distance between the label groups' mean distributions (0 = the router
    treats the groups alike, 1 = disjoint); None with fewer than two groups."""
    means = list(mean_by_label(probs, labels).values())
    if len(means) < 2:
        return None
    return float(np.mean([0.5 * np.abs(a - b).sum() for a, b in combinations(means, 2)]))


def routing_content_summary(engine: Any, samples: Sequence[Any]) -> dict[str, Any]:
    """Level-1 routing of ``samples`` by answer format and by topic.

    ``format_separation``: between report / closed / open (all topics); ``topic_separation``:
    between topics *within* each question format (then averaged), i.e. whether two closed
    questions about different organs route differently; ``cells``: the mean distribution of each
    (format, topic).
    """
    from napari_tghmoe.model.prompts import REPORT_TOPIC, instruction_for, prompt_topic

    instructions = [instruction_for(s.prompt) for s in samples]
    formats = [s.task for s in samples]
    topics = [REPORT_TOPIC if s.task == "report" else prompt_topic(i) for s, i in zip(samples, instructions)]
    groups, probs = level1_probabilities(engine, instructions)
    within = {}
    cells = {}
    for task in dict.fromkeys(formats):
        rows = [i for i, f in enumerate(formats) if f == task]
        value = separation(probs[rows], [topics[i] for i in rows])
        if value is not None:
            within[task] = value
        for topic in dict.fromkeys(topics[i] for i in rows):
            cell = [i for i in rows if topics[i] == topic]
            cells[f"{task}/{topic}"] = {"n": len(cell), "probs": dict(zip(groups, probs[cell].mean(0).round(4).tolist()))}
    return {
        "n": len(samples),
        "groups": groups,
        "format_separation": separation(probs, formats),
        "topic_separation_within_format": within,
        "topic_separation": float(np.mean(list(within.values()))) if within else None,
        "cells": cells,
    }
