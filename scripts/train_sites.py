"""Train the cascade's site and phase heads on cached scan evidence (issue 15; napari_tghmoe.med3d.sites).

    python scripts/train_sites.py --evidence runs/ablation/evidence --seeds 300000-300199 \\
        --out resources/demo-seg-model

First a check: fitted on the first 80 % of the seeds, scored on the last 20 % (printed, and
written to ``<out>/sites_check.json``); then the head ships fitted on all of them. ``--simulated``
adds the findings of simulated evidence (``scripts/oracle_evidence.py``: phantom truth, many more
scans than the cascade can segment in a day) to every fit; the check stays on the cascade's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _records(folder: Path, first: int, last: int) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if first <= int(record.get("seed", -1)) <= last and "truth" in record:
            records.append(record)
    return sorted(records, key=lambda r: int(r["seed"]))


def main(argv: list[str] | None = None) -> int:
    from napari_tghmoe.med3d.evidence import ScanEvidence
    from napari_tghmoe.med3d.sites import SiteHead, train_phase_head, train_site_head, training_pairs

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--evidence", required=True, type=Path)
    parser.add_argument("--seeds", required=True, help="A-B (inclusive)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--simulated",
        type=Path,
        help="also fit the site head on simulated evidence (scripts/oracle_evidence.py) in this folder ...",
    )
    parser.add_argument("--simulated-seeds", default="", help="... of these seeds, A-B")
    args = parser.parse_args(argv)
    first, last = (int(v) for v in args.seeds.split("-"))
    records = _records(args.evidence, first, last)
    if not records:
        print(f"error: no evidence of seeds {args.seeds} in {args.evidence}", file=sys.stderr)
        return 1
    simulated: list = []
    if args.simulated is not None:
        low, high = (int(v) for v in args.simulated_seeds.split("-"))
        simulated = training_pairs(r for r in _records(args.simulated, low, high) if "simulated" in r.get("extra", {}))
    previous = SiteHead.load(args.out)
    names = previous.names if previous is not None else ()  # keep the slots a chat model reads
    cut = int(len(records) * 0.8)
    fit, check = training_pairs(records[:cut]) + simulated, training_pairs(records[cut:])
    head, fit_accuracy = train_site_head(fit, names=names)
    right = sum(head.site(finding)[0] == site for finding, site in check)
    by_kind: dict[str, list[int]] = {}
    for finding, site in check:
        by_kind.setdefault(finding.kind, [0, 0])
        by_kind[finding.kind][0] += head.site(finding)[0] == site
        by_kind[finding.kind][1] += 1
    summary = {
        "scans": len(records),
        "simulated_pairs": len(simulated),
        "fit_pairs": len(fit),
        "fit_accuracy": round(fit_accuracy, 3),
        "check_pairs": len(check),
        "check_accuracy": round(right / len(check), 3) if check else None,
        "check_by_kind": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_kind.items())},
    }
    final, final_accuracy = train_site_head(fit + check, names=names)
    summary["final_pairs"] = len(fit) + len(check)
    summary["final_fit_accuracy"] = round(final_accuracy, 3)
    final.save(args.out)
    phase, phase_fit = train_phase_head(records[:cut])
    held = records[cut:]
    right = sum(phase.phase(ScanEvidence.from_json(r))[0] == r["truth"]["phase"] for r in held)
    summary["phase"] = {"fit_accuracy": round(phase_fit, 3), "check_scans": len(held), "check_accuracy": round(right / max(len(held), 1), 3)}
    phase, _ = train_phase_head(records)
    phase.save(args.out)
    (args.out / "sites_check.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
