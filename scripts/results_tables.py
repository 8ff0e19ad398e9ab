"""Summarise `tghmoe eval` JSON files into the Markdown tables of docs/results.md.

    python scripts/results_tables.py "a) TGH-MoE two-stage=runs/eval/abl_a.json" "b) stage 1 only=runs/eval/abl_b.json" ...

A ``tghmoe eval-baseline`` JSON gives one row per image-free rule (closed VQA only). Values carry
their 95 % interval where the JSON has one ("0.288 [0.25, 0.32]").

Besides the M3D numbers (closed-VQA accuracy by answer letter, report text metrics, finding
recall/precision) it prints the *answer-text* accuracy of closed VQA: whether the text after the
letter is the correct choice. The two differ when a model knows the answer but not which letter
the choice list gave it, which is exactly what small models trained briefly get wrong.
"""

from __future__ import annotations

import json
import re
import sys


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def answer_text_accuracy(samples: list[dict]) -> float | None:
    closed = [s for s in samples if s["task"] == "vqa_closed"]
    if not closed:
        return None
    hits = 0
    for s in closed:
        target = s["target"].split(". ", 1)[-1]
        predicted = s["prediction"].split(". ", 1)[-1] if re.match(r"^[A-D]\.", s["prediction"].strip()) else s["prediction"]
        hits += _norm(predicted) == _norm(target)
    return hits / len(closed)


def fmt(value, interval=None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if not interval else f"{value:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def main(argv: list[str]) -> int:
    rows = []
    for item in argv:
        label, _, path = item.rpartition("=")
        results = json.load(open(path))
        if "baselines" in results:  # tghmoe eval-baseline: closed VQA of each image-free rule
            for name, closed in results["baselines"].items():
                rows.append((f"{label}: {name}", closed, {}, {}, {}, None))
            continue
        closed = results.get("vqa_closed") or {}
        report = results.get("report") or {}
        findings = report.get("findings") or {}
        open_vqa = results.get("vqa_open") or {}
        rows.append((label, closed, report, findings, open_vqa, answer_text_accuracy(results.get("samples", []))))
    print("| Arm | Closed-VQA acc. (letter) | Closed-VQA answer text | Finding recall | Finding precision | Report BLEU-1 | BLEU-4 | ROUGE-1 | ROUGE-L | METEOR | Open-VQA BLEU-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, closed, report, findings, open_vqa, text_acc in rows:
        print(
            f"| {label} | {fmt(closed.get('accuracy'), closed.get('accuracy_ci'))} | {fmt(text_acc)} | "
            f"{fmt(findings.get('recall'), findings.get('recall_ci'))} | "
            f"{fmt(findings.get('precision'), findings.get('precision_ci'))} | {fmt(report.get('bleu1'))} | {fmt(report.get('bleu4'))} | "
            f"{fmt(report.get('rouge1'))} | {fmt(report.get('rougeL'))} | {fmt(report.get('meteor'))} | {fmt(open_vqa.get('bleu1'))} |"
        )
    print()
    types = sorted({t for _, closed, *_ in rows for t in (closed.get("per_type") or {})})
    print("| Arm | " + " | ".join(types) + " |")
    print("|---|" + "---|" * len(types))
    for label, closed, *_ in rows:
        per = closed.get("per_type") or {}
        cells = [fmt((per.get(t) or {}).get("accuracy"), (per.get(t) or {}).get("accuracy_ci")) for t in types]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
