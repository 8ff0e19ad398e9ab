"""Image-free baselines of closed VQA: what a rule that never looks at the image scores.

A closed-VQA accuracy means something only beside what the question and its choice list give
away on their own. Three rules, none of which sees a pixel:

* **image-free prior** (:class:`ImageFreePrior`): learnt from training items. For each question
  type and option text it counts how often that option is right when it is shown; on a new item
  it picks the shown option with the highest rate. Rates are smoothed towards the 4-choice
  chance level, ``(right + 1) / (shown + 4)``, so an option never seen in training counts as
  chance; ties go to the alphabetically first option text (deterministic, blind to the letter).
* **image-free prior given the question**: the same, keyed by the exact question as well (so it
  can learn that "Where is the lung nodule located?" is never answered with a kidney zone).
  It shows what a text-only model could learn from question and choices together.
* **hand rule** (:func:`hand_rule_letter`): the rule that scored 0.528 on the phantoms' earlier,
  unbalanced choice lists: always "axial", always the "no X is seen" / "no abnormality" option, the first
  listed organ that can hold a finding, always "portal venous". Kept so the table shows it fell.

Scores carry 95 % bootstrap intervals resampled by case (see
:func:`napari_tghmoe.eval.metrics.cluster_bootstrap_interval`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_tghmoe.eval import metrics as M

LETTERS = "ABCD"
PRIOR = "image-free prior"
PRIOR_GIVEN_QUESTION = "image-free prior given the question"
HAND_RULE = "hand rule"
#: Options the hand rule takes for plane and phase questions.
HAND_RULE_PLANE = "axial"
HAND_RULE_PHASE = "portal venous"


def _norm(text: Any) -> str:
    return " ".join(str(text).strip().lower().split())


@dataclass(frozen=True)
class ClosedItem:
    """A closed question as an image-free rule sees it (no volume)."""

    qtype: str
    question: str
    choices: tuple[str, ...]
    answer_letter: str
    case: str

    @property
    def answer_text(self) -> str:
        return self.choices[LETTERS.index(self.answer_letter)]


def closed_items(samples: Sequence[Any]) -> list[ClosedItem]:
    """The closed-VQA samples of a dataset as :class:`ClosedItem` (other tasks are skipped)."""
    from napari_tghmoe.eval.evaluate import sample_case

    items = []
    for sample in samples:
        if getattr(sample, "task", None) != "vqa_closed":
            continue
        choices = tuple(str(c) for c in (sample.meta.get("choices") or ()))
        letter = str(sample.meta.get("answer_letter") or sample.target.strip()[:1]).upper()
        if len(choices) != 4 or letter not in LETTERS:
            raise ValueError(f"sample {sample.meta.get('id', '?')}: a closed item needs four choices and a letter A-D")
        question = str(sample.meta.get("question") or sample.prompt)
        items.append(ClosedItem(str(sample.qtype), question, choices, letter, sample_case(sample)))
    return items


@dataclass
class ImageFreePrior:
    """How often each option text is right when shown, per question type (optionally per question)."""

    by_question: bool = False
    shown: dict[tuple[str, ...], int] = field(default_factory=lambda: defaultdict(int))
    right: dict[tuple[str, ...], int] = field(default_factory=lambda: defaultdict(int))

    def _key(self, item: ClosedItem, option: str) -> tuple[str, ...]:
        if self.by_question:
            return (item.qtype, _norm(item.question), _norm(option))
        return (item.qtype, _norm(option))

    def fit(self, items: Sequence[ClosedItem]) -> ImageFreePrior:
        if not items:
            raise ValueError("the image-free prior needs training items (no closed questions in the training data)")
        for item in items:
            for letter, option in zip(LETTERS, item.choices):
                key = self._key(item, option)
                self.shown[key] += 1
                self.right[key] += int(letter == item.answer_letter)
        return self

    def rate(self, item: ClosedItem, option: str) -> float:
        """Smoothed rate at which ``option`` is right when shown: (right + 1) / (shown + 4)."""
        key = self._key(item, option)
        return (self.right.get(key, 0) + 1.0) / (self.shown.get(key, 0) + 4.0)

    def predict(self, item: ClosedItem) -> str:
        """The letter of the shown option most often right in training (ties: first text A-Z)."""
        ranked = sorted(zip(LETTERS, item.choices), key=lambda pair: (-self.rate(item, pair[1]), _norm(pair[1])))
        return ranked[0][0]

    def table(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per type (and question): option -> shown, right, raw rate; what the rule learnt."""
        out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
        for key, shown in sorted(self.shown.items()):
            group, option = " | ".join(key[:-1]), key[-1]
            out[group][option] = {"shown": shown, "right": self.right.get(key, 0), "rate": self.right.get(key, 0) / shown}
        return dict(out)


def _organs_that_hold_findings() -> set[str]:
    from napari_tghmoe.phantom import FINDING_KINDS

    return {_norm(organ) for organ, _ in FINDING_KINDS.values()}


def hand_rule_letter(item: ClosedItem) -> str:
    """The hand rule: "axial", the "no ..." option, the first organ that can hold a
    finding, "portal venous"; option A when the wanted text is not listed."""
    texts = [_norm(c) for c in item.choices]
    wanted: int | None = None
    if item.qtype == "plane" and HAND_RULE_PLANE in texts:
        wanted = texts.index(HAND_RULE_PLANE)
    elif item.qtype == "phase" and HAND_RULE_PHASE in texts:
        wanted = texts.index(HAND_RULE_PHASE)
    elif item.qtype == "organ":
        organs = _organs_that_hold_findings()
        wanted = next((i for i, t in enumerate(texts) if t in organs), None)
    elif item.qtype in ("abnormality", "location"):
        wanted = next((i for i, t in enumerate(texts) if t.startswith("no ")), None)
    return LETTERS[wanted if wanted is not None else 0]


def score_rule(predict: Callable[[ClosedItem], str], items: Sequence[ClosedItem]) -> dict[str, Any]:
    """Accuracy (overall and per type) of a letter rule, with 95 % intervals resampled by case."""
    if not items:
        raise ValueError("no closed questions to score")
    predictions = []
    for item in items:
        letter = predict(item)
        predictions.append(f"{letter}. {item.choices[LETTERS.index(letter)]}")
    summary = M.closed_vqa_accuracy(
        predictions, [i.answer_letter for i in items], qtypes=[i.qtype for i in items], choices=[i.choices for i in items]
    )
    rows = summary.pop("per_sample")
    return M.add_accuracy_intervals(summary, rows, [i.case for i in items])


def run_baselines(train_samples: Sequence[Any], test_samples: Sequence[Any], info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Learn the image-free priors on ``train_samples``, score them and the hand rule on ``test_samples``."""
    train = closed_items(train_samples)
    test = closed_items(test_samples)
    if not test:
        raise ValueError("no closed questions in the evaluation data")
    prior = ImageFreePrior().fit(train)
    prior_q = ImageFreePrior(by_question=True).fit(train)
    return {
        **(info or {}),
        "n_train_items": len(train),
        "n_train_cases": len({i.case for i in train}),
        "n": len(test),
        "n_cases": len({i.case for i in test}),
        "baselines": {
            PRIOR: score_rule(prior.predict, test),
            PRIOR_GIVEN_QUESTION: score_rule(prior_q.predict, test),
            HAND_RULE: score_rule(hand_rule_letter, test),
        },
        "prior_rates": prior.table(),
    }


def baselines_to_markdown(results: dict[str, Any]) -> str:
    """One table: question type x baseline, accuracy with its 95 % interval."""
    from napari_tghmoe.eval.evaluate import format_with_interval

    names = list(results["baselines"])
    first = results["baselines"][names[0]]
    lines = [
        f"# Image-free baselines on {results.get('data', 'data')}",
        "",
        f"Learnt from {results.get('n_train_items')} closed questions of {results.get('n_train_cases')} cases "
        f"({results.get('train', 'training data')}); scored on {results['n']} closed questions of "
        f"{results.get('n_cases')} cases. Accuracy [95 % interval].",
        "",
        "| Question type | n | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for qtype, row in first.get("per_type", {}).items():
        cells = [
            format_with_interval(results["baselines"][n]["per_type"][qtype]["accuracy"], results["baselines"][n]["per_type"][qtype].get("accuracy_ci"))
            for n in names
        ]
        lines.append(f"| {qtype} | {row['n']} | " + " | ".join(cells) + " |")
    overall = [format_with_interval(results["baselines"][n]["accuracy"], results["baselines"][n].get("accuracy_ci")) for n in names]
    lines += [f"| **overall** | {first['n']} | " + " | ".join(overall) + " |", "", first.get("interval", ""), ""]
    return "\n".join(lines) + "\n"


def write_baselines(results: dict[str, Any], json_path: str | Path) -> tuple[Path, Path]:
    """``results.json`` and the Markdown table beside it (``.md``)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    markdown = json_path.with_suffix(".md")
    markdown.write_text(baselines_to_markdown(results), encoding="utf-8")
    return json_path, markdown
