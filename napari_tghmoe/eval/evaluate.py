"""Run a model over a dataset with greedy decoding and score it by the M3D protocol.

``evaluate`` takes an ``InferenceEngine`` (the same code path the napari chat uses, so the
numbers describe what a user gets) or any ``generate(sample) -> str`` function (handy for
baselines and tests), and returns one JSON-able dict; ``write_results`` saves it as JSON
plus a Markdown table.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_tghmoe.eval import metrics as M
from napari_tghmoe.datasets import Sample, load_sample_volume
from napari_tghmoe.model.prompts import instruction_for

GenerateFn = Callable[[Sample], str]


def engine_generate_fn(engine: Any, max_new_tokens: int = 256, zero_image: bool = False) -> GenerateFn:
    """Answer a sample through ``engine.answer`` (greedy; routing trace off for speed).

    ``zero_image``: the model sees zeros instead of the volume's pixels (the same zeros a recipe's
    ``[data] zero_image`` trains on): how an image-free model of the same budget is scored.
    """

    def generate(sample: Sample) -> str:
        inputs = engine.prepare(load_sample_volume(sample))
        if zero_image:
            inputs.pixel_values_videos = inputs.pixel_values_videos.new_zeros(inputs.pixel_values_videos.shape)
        answer = None
        for item in engine.answer(inputs, sample.prompt, max_new_tokens=max_new_tokens, trace=False):
            answer = item
        return str(getattr(answer, "text", "")).strip()

    return generate


def sample_case(sample: Sample) -> str:
    """The case (scan) a sample asks about: phantom seed, else the volume's file, else its id.

    Intervals resample cases, not questions: the questions of one scan are correlated.
    """
    meta = sample.meta
    if meta.get("source") == "phantom" and meta.get("seed") is not None:
        return f"phantom:{meta.get('region', '')}:{meta['seed']}"
    if isinstance(sample.volume, (str, Path)):
        return str(sample.volume)
    return str(meta.get("case") or meta.get("id") or id(sample.volume))


def _as_generate_fn(model: Any, max_new_tokens: int) -> GenerateFn:
    if hasattr(model, "answer") and hasattr(model, "tokenizer"):
        return engine_generate_fn(model, max_new_tokens)
    if callable(model):
        return model
    raise TypeError("evaluate needs an InferenceEngine or a function sample -> text")


def evaluate(
    model: Any,
    samples: Sequence[Sample],
    task: str | None = None,
    *,
    max_new_tokens: int = 256,
    limit: int | None = None,
    use_bertscore: bool = True,
    bertscore_model: str | Path | None = None,
    progress: bool | Callable[[int, int], None] = False,
    stop_event: threading.Event | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate an answer for each sample and score it; returns the results dict.

    ``task`` keeps only samples of that task ("report", "vqa_closed", "vqa_open", "vqa"
    for both VQA kinds); None keeps all. ``progress``: True for a tqdm bar, or a callback
    ``(done, total)``. ``stop_event`` ends the run early (the results cover what ran and
    say ``"stopped": true``).

    Result keys: ``n``, ``generation`` (decoding settings), ``report`` (text metrics and,
    for phantom samples, ``findings`` recall/precision), ``vqa_closed`` (accuracy overall and
    ``per_type``), ``vqa_open`` (text metrics overall and ``per_type``), ``samples`` (one
    record per sample with prompt, target, prediction and its scores), ``seconds``, plus
    whatever ``info`` holds (model, data spec).
    """
    from napari_tghmoe.datasets import tasks_for

    wanted = tasks_for(task) if task else None
    chosen = [s for s in samples if wanted is None or s.task in wanted]
    if limit:
        chosen = chosen[:limit]
    if not chosen:
        raise ValueError(f"no samples to evaluate for task {task!r}")
    generate = _as_generate_fn(model, max_new_tokens)
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chosen), desc="eval", unit="sample")
    started = time.perf_counter()
    predictions: list[str] = []
    for index, sample in enumerate(chosen):
        if stop_event is not None and stop_event.is_set():
            break
        predictions.append(generate(sample))
        if bar is not None:
            bar.update(1)
        elif callable(progress):
            progress(index + 1, len(chosen))
    if bar is not None:
        bar.close()
    generation_seconds = time.perf_counter() - started
    done = chosen[: len(predictions)]
    results: dict[str, Any] = {
        **(info or {}),
        "task": task or "all",
        "n": len(done),
        "stopped": len(done) < len(chosen),
        "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens},
    }
    records = [
        {
            "id": s.meta.get("id"),
            "task": s.task,
            "qtype": s.qtype,
            "prompt": s.prompt,
            "instruction": _sent(s.prompt),  # what the engine sends (report requests rewritten)
            "target": s.target,
            "prediction": p,
        }
        for s, p in zip(done, predictions)
    ]
    score_results(done, predictions, records, results, use_bertscore=use_bertscore, bertscore_model=bertscore_model)
    results["seconds"] = {
        "generation": generation_seconds,
        "per_sample": generation_seconds / max(1, len(done)),
        "total": time.perf_counter() - started,
    }
    results["samples"] = records
    return results


def score_results(
    samples: Sequence[Sample],
    predictions: Sequence[str],
    records: list[dict[str, Any]],
    results: dict[str, Any],
    *,
    use_bertscore: bool = True,
    bertscore_model: str | Path | None = None,
) -> dict[str, Any]:
    """Fill ``results`` with the metrics of each task present (and per-sample scores in ``records``)."""
    by_task: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        by_task.setdefault(sample.task, []).append(index)

    for task_name in ("report", "vqa_open"):
        indices = by_task.get(task_name)
        if not indices:
            continue
        summary = M.text_metrics(
            [predictions[i] for i in indices],
            [samples[i].target for i in indices],
            groups=[samples[i].qtype for i in indices] if task_name == "vqa_open" else None,
            use_bertscore=use_bertscore,
            bertscore_model=bertscore_model,
        )
        for i, scores in zip(indices, summary.pop("per_sample")):
            records[i]["scores"] = scores
        results[task_name] = summary

    report_indices = [i for i in by_task.get("report", []) if samples[i].meta.get("findings") is not None]
    if report_indices:
        finding_scores: list[M.FindingScore] = []
        for i in report_indices:
            score = M.finding_scores(predictions[i], samples[i].meta["findings"])
            finding_scores.append(score)
            records[i]["findings"] = {
                "recall": score.recall,
                "precision": score.precision,
                "n_true": score.n_true,
                "n_stated": score.n_stated,
                "stated": score.stated,
            }
        results["report"]["findings"] = M.add_finding_intervals(
            M.aggregate_finding_scores(finding_scores), finding_scores, [sample_case(samples[i]) for i in report_indices]
        )

    closed = by_task.get("vqa_closed")
    if closed:
        summary = M.closed_vqa_accuracy(
            [predictions[i] for i in closed],
            [
                samples[i].meta.get("answer_letter")
                or M.parse_answer_letter(samples[i].target, samples[i].meta.get("choices"))
                or ""
                for i in closed
            ],
            qtypes=[samples[i].qtype for i in closed],
            choices=[samples[i].meta.get("choices") for i in closed],
        )
        rows = summary.pop("per_sample")
        for i, row in zip(closed, rows):
            records[i]["parsed_letter"] = row["parsed"]
            records[i]["correct"] = row["correct"]
        results["vqa_closed"] = M.add_accuracy_intervals(summary, rows, [sample_case(samples[i]) for i in closed])
    return results


def _sent(prompt: str) -> str:
    try:
        return instruction_for(prompt)
    except ValueError:
        return prompt


# --------------------------------------------------------------------------- writing


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_with_interval(value: Any, interval: Sequence[float] | None, digits: int = 3) -> str:
    """``0.598 [0.54, 0.66]``: the value and its 95 % interval (two decimals), when there is one."""
    text = _fmt(value, digits)
    if interval is None or value is None:
        return text
    return f"{text} [{interval[0]:.2f}, {interval[1]:.2f}]"


def attach_baselines(results: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Put closed-VQA baseline summaries (name -> accuracy summary with ``per_type``, e.g. the
    image-free prior of :mod:`napari_tghmoe.eval.baselines`, or the ``vqa_closed`` of a model
    trained with the image zeroed) beside the model's, so the tables show them as columns."""
    closed = results.get("vqa_closed")
    if not closed:
        raise ValueError("results have no closed-VQA scores to compare baselines with")
    slot = closed.setdefault("baselines", {})
    for name, summary in baselines.items():
        slot[name] = {
            key: value for key, value in summary.items() if key in ("n", "accuracy", "accuracy_ci", "per_type", "interval")
        }
    return results


_TEXT_COLUMNS = (
    ("bleu1", "BLEU-1"),
    ("bleu4", "BLEU-4"),
    ("rouge1", "ROUGE-1"),
    ("rougeL", "ROUGE-L"),
    ("meteor", "METEOR"),
    ("bertscore_f1", "BERTScore F1"),
)


def results_to_markdown(results: dict[str, Any]) -> str:
    """Markdown tables of a results dict (report, closed VQA per type, open VQA per type)."""
    lines = [f"# Evaluation: {results.get('model', 'model')} on {results.get('data', 'data')}", ""]
    lines.append(
        f"Task `{results.get('task')}`, {results.get('n')} samples, greedy decoding, "
        f"max {results.get('generation', {}).get('max_new_tokens')} new tokens."
    )
    lines.append("")
    report = results.get("report")
    if report:
        findings = report.get("findings")
        header = ["n"] + [label for _, label in _TEXT_COLUMNS]
        values = [_fmt(report["n"])] + [_fmt(report.get(key)) for key, _ in _TEXT_COLUMNS]
        if findings:
            header += ["Finding recall", "Finding precision", "Normal correct"]
            values += [
                format_with_interval(findings.get("recall"), findings.get("recall_ci")),
                format_with_interval(findings.get("precision"), findings.get("precision_ci")),
                _fmt(findings.get("normal_correct")),
            ]
        lines += ["## Report generation", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(values) + " |", ""]
    closed = results.get("vqa_closed")
    if closed:
        baselines = closed.get("baselines") or {}
        header = ["Question type", "n", "Accuracy", "Accuracy (M3D rule)"] + list(baselines)
        lines += ["## Closed VQA (accuracy by answer letter, [95 % interval])", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

        def cells(row: dict[str, Any], qtype: str | None) -> list[str]:
            out = [
                format_with_interval(row.get("accuracy"), row.get("accuracy_ci")),
                format_with_interval(row.get("accuracy_m3d"), row.get("accuracy_m3d_ci")),
            ]
            for baseline in baselines.values():
                other = baseline if qtype is None else (baseline.get("per_type") or {}).get(qtype, {})
                out.append(format_with_interval(other.get("accuracy"), other.get("accuracy_ci")))
            return out

        for qtype, row in closed.get("per_type", {}).items():
            lines.append("| " + " | ".join([qtype, str(row["n"])] + cells(row, qtype)) + " |")
        lines += ["| " + " | ".join(["**overall**", str(closed["n"])] + cells(closed, None)) + " |", ""]
        if closed.get("interval"):
            lines += [f"Intervals: {closed['interval']}.", ""]
    open_vqa = results.get("vqa_open")
    if open_vqa:
        header = ["Question type", "n"] + [label for _, label in _TEXT_COLUMNS]
        lines += ["## Open VQA", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for qtype, row in open_vqa.get("per_type", {}).items():
            lines.append("| " + " | ".join([qtype, _fmt(row["n"])] + [_fmt(row.get(k)) for k, _ in _TEXT_COLUMNS]) + " |")
        lines.append(
            "| " + " | ".join(["**overall**", _fmt(open_vqa["n"])] + [_fmt(open_vqa.get(k)) for k, _ in _TEXT_COLUMNS]) + " |"
        )
        lines.append("")
    notes = {}
    for key in ("report", "vqa_open"):
        notes.update((results.get(key) or {}).get("notes", {}))
    if notes:
        lines += ["Notes: " + "; ".join(f"{k}: {v}" for k, v in sorted(notes.items())), ""]
    lines.append(
        "BLEU: sacrebleu sentence BLEU (13a, no smoothing) averaged over samples; ROUGE: rouge-score F1; "
        "METEOR: NLTK; BERTScore: local all-MiniLM-L6-v2 (not comparable with roberta-large numbers)."
    )
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], json_path: str | Path, markdown_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write the results as JSON and Markdown (default: the JSON path with ``.md``)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    markdown = Path(markdown_path) if markdown_path else json_path.with_suffix(".md")
    markdown.write_text(results_to_markdown(results), encoding="utf-8")
    return json_path, markdown
