"""How much of the held-out answers the evidence words hold: the ceiling of a model that reads them perfectly.

    TGHMOE_EVIDENCE_CACHE=runs/evidence python scripts/evidence_ceiling.py --results runs/x/eval/heldout.json \\
        --heads resources/demo-seg-model

For each report of an evaluation's results (``tghmoe eval --task all``): the evidence words written
out as a report, scored like the model's (finding recall and precision, kind and site). For each
closed question: whether the words name its right option (a "no ..." or "none ..." option counts when
they name none of the others), by question type. Beside each ceiling, where the model's answers are
lost: closed questions split by whether the words held the answer and whether the model was right
(held but wrong: lost in the reading; not held: lost in the evidence), and the words' findings a
report states, leaves out, or adds. Reads the cached evidence of each phantom
(``scripts/scan_evidence.py``); a diagnostic, measured after training, never used to choose anything.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from napari_tghmoe.eval.metrics import aggregate_finding_scores, extract_stated_findings, finding_scores
    from napari_tghmoe.med3d.evidence import ScanEvidence, evidence_words
    from napari_tghmoe.med3d.sites import PhaseHead, SiteHead
    from napari_tghmoe.model.prompts import closed_choices

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True, type=Path, help="tghmoe eval JSON with per-sample records")
    parser.add_argument("--heads", default="resources/demo-seg-model", help="folder with the site and phase heads")
    parser.add_argument("--evidence", default=os.environ.get("TGHMOE_EVIDENCE_CACHE", ""))
    parser.add_argument("--words-cut", type=float, default=0.5, help="the model's volume_words_min_certainty")
    args = parser.parse_args(argv)
    if not args.evidence:
        print("error: give --evidence or set TGHMOE_EVIDENCE_CACHE", file=sys.stderr)
        return 1
    sites, phases = SiteHead.load(args.heads), PhaseHead.load(args.heads)
    by_seed = {}
    for path in glob.glob(str(Path(args.evidence) / "*.json")):
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        if "seed" in record:
            by_seed[int(record["seed"])] = record
    words_of: dict[int, str] = {}

    def words(seed: int) -> str:
        if seed not in words_of:
            words_of[seed] = evidence_words(ScanEvidence.from_json(by_seed[seed]), sites, phases, min_certainty=args.words_cut)
        return words_of[seed]

    results = json.loads(args.results.read_text(encoding="utf-8"))
    report_scores, closed = [], defaultdict(lambda: [0, 0])
    reading: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    copied = {"in_words": 0, "stated": 0, "left_out": 0, "added": 0}
    for sample in results["samples"]:
        seed = int(re.search(r"-(\d+)-", sample["id"]).group(1))
        if seed not in by_seed:
            print(f"error: no cached evidence of phantom {seed} in {args.evidence}", file=sys.stderr)
            return 1
        said = words(seed).lower()
        if sample["task"] == "report":
            truth = by_seed[seed]["truth"]["findings"]
            words_part = said.split("found:", 1)[1].replace(";", ".")
            report_scores.append(finding_scores(words_part, truth))
            in_words = {(f.kind, f.location) for f in extract_stated_findings(words_part)}
            stated = {(f.kind, f.location) for f in extract_stated_findings(sample.get("prediction", "").lower())}
            copied["in_words"] += len(in_words)
            copied["stated"] += len(in_words & stated)
            copied["left_out"] += len(in_words - stated)
            copied["added"] += len(stated - in_words)
        elif sample["task"] == "vqa_closed":
            options = dict(closed_choices(sample["prompt"]))
            right = options[sample["target"][0]].lower()
            named = [text.lower() in said for letter, text in options.items() if text.lower() != right]
            negative = right.startswith(("no ", "none "))
            held = not any(named) if negative else right in said
            closed[sample["qtype"]][0] += held
            closed[sample["qtype"]][1] += 1
            if "correct" in sample:
                key = ("held" if held else "not held") + (", right" if sample["correct"] else ", wrong")
                reading[sample["qtype"]][key] += 1
    summary = {"results": str(args.results), "heads": str(args.heads)}
    if report_scores:
        found = aggregate_finding_scores(report_scores)
        summary["report"] = {k: found[k] for k in ("n_true", "n_stated", "recall", "precision")}
        summary["report"]["model_copies"] = copied
    if closed:
        summary["closed"] = {k: round(v[0] / v[1], 3) for k, v in sorted(closed.items())}
        summary["closed"]["overall"] = round(sum(v[0] for v in closed.values()) / sum(v[1] for v in closed.values()), 3)
        summary["closed_reading"] = {k: dict(sorted(v.items())) for k, v in sorted(reading.items())}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
