"""Level-1 routing by answer format or by content: the topic of a prompt, the supervision label a
topic-grouped model is taught, and the separation measure behind docs/results.md."""

from __future__ import annotations

import numpy as np
import pytest

from napari_tghmoe.engine import InferenceEngine
from napari_tghmoe.eval.routing_content import level1_probabilities, routing_content_summary, separation
from napari_tghmoe.model.prompts import prompt_topic, routing_label
from napari_tghmoe.datasets import Sample


@pytest.mark.parametrize(
    ("instruction", "topic"),
    [
        ("What abnormality is seen in the liver? Choices: A. lung nodule B. renal cyst C. x D. y", "abdomen"),
        ("Where is the lung nodule located?", "chest"),
        ("What abnormality is seen in the kidneys?", "abdomen"),
        ("In which contrast phase was this CT acquired?", "acquisition"),
        ("Which organ contains the abnormality?", "general"),
        ("Where is the enlarged lymph node located?", "general"),  # occurs in chest and abdomen
        ("Is anything wrong with the lungs or the liver?", "general"),  # two topics
        ("Please write a report of the findings in this CT volume.", "report"),
    ],
)
def test_the_topic_is_read_from_the_question_not_the_choices(instruction, topic):
    assert prompt_topic(instruction) == topic


def test_format_groups_are_taught_the_task_and_topic_groups_the_topic():
    question = "What abnormality is seen in the spleen?"
    assert routing_label("vqa_closed", question, ["shared", "report", "vqa_closed", "vqa_open"]) == 2
    topics = ["shared", "report", "chest", "abdomen", "acquisition", "general"]
    assert routing_label("vqa_closed", question, topics) == 3
    assert routing_label("vqa_open", "Where is the lung nodule located?", topics) == 2
    assert routing_label("report", "Write the report.", topics) == 1
    assert routing_label("vqa_open", question, ["shared", "chest"]) == -100  # no group: unsupervised


def test_separation_is_the_mean_total_variation_between_group_means():
    probs = np.array([[1.0, 0.0], [0.8, 0.2], [0.0, 1.0], [0.2, 0.8]])
    assert separation(probs, ["a", "a", "b", "b"]) == pytest.approx(0.8)  # means (0.9, 0.1) vs (0.1, 0.9)
    assert separation(probs, ["a", "b", "a", "b"]) == pytest.approx(0.0)  # both means (0.5, 0.5)
    assert separation(probs, ["a"] * 4) is None


@pytest.fixture(scope="module")
def engine(tuned_tghmoe_folder):
    return InferenceEngine.from_pretrained(tuned_tghmoe_folder, device="cpu")


def test_level1_probabilities_are_what_an_answer_reports(engine):
    """The measure reads the same numbers the chat's task-group plot shows for a question."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 300, (12, 70, 60)).astype(np.float32)
    question = "What abnormality is seen in the liver?"
    groups, probs = level1_probabilities(engine, [question, "Write the report."])
    answer = engine.ask(volume, question, spacing=(2.5, 0.8, 0.8), max_new_tokens=1, trace=False)
    assert groups == list(answer.task_probs)
    np.testing.assert_allclose(probs[0], [answer.task_probs[g] for g in groups], atol=1e-5)
    assert not np.allclose(probs[0], probs[1])


def test_summary_splits_by_format_and_by_topic_within_a_format(engine):
    def sample(task, prompt):
        return Sample(volume=None, prompt=prompt, target="", task=task)

    samples = [
        sample("vqa_closed", "What abnormality is seen in the liver? Choices: A. a B. b C. c D. d"),
        sample("vqa_closed", "What abnormality is seen in the lungs? Choices: A. a B. b C. c D. d"),
        sample("vqa_open", "Where is the renal cyst located?"),
        sample("report", "Write the report."),
    ]
    summary = routing_content_summary(engine, samples)
    assert summary["n"] == 4
    assert set(summary["cells"]) == {"vqa_closed/abdomen", "vqa_closed/chest", "vqa_open/abdomen", "report/report"}
    assert set(summary["topic_separation_within_format"]) == {"vqa_closed"}  # one topic elsewhere
    assert 0 <= summary["topic_separation"] <= 1 and 0 <= summary["format_separation"] <= 1
