"""Evidence files: what ``TGHMOE_EVIDENCE_CACHE`` serves to training and evaluation.

One JSON per phantom, named after the phantom's cache file (``<out>/<stem>.json``), holding the
:class:`~napari_tghmoe.med3d.evidence.ScanEvidence` the chat model reads plus the phantom's truth
for diagnostics. ``scripts/scan_evidence.py`` writes them from the real cascade and
``scripts/oracle_evidence.py`` from the simulated one; both share this module's writer and their
command line (seed range, spacing, output folder, worker processes).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any


def truth_record(phase: str, plane: str, spacing: Sequence[float], findings: Iterable[Any]) -> dict[str, Any]:
    """The phantom's truth beside its evidence (findings as objects or dicts)."""

    def field(finding: Any, name: str) -> Any:
        return finding[name] if isinstance(finding, dict) else getattr(finding, name)

    return {
        "phase": phase,
        "plane": plane,
        "spacing": [float(v) for v in spacing],
        "findings": [
            {
                "kind": field(f, "kind"),
                "location": field(f, "location"),
                "organ": field(f, "organ"),
                "center_voxel": [int(v) for v in field(f, "center_voxel")],
            }
            for f in findings
        ],
    }


def write_evidence_file(target: str | Path, evidence: dict[str, Any]) -> None:
    """Write under a temporary name, then rename: a reader (or a killed run) never sees half a file."""
    target = Path(target)
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(evidence), encoding="utf-8")
    os.replace(temporary, target)


def seeds_main(
    description: str,
    work: Callable[[tuple], str],
    argv: list[str] | None = None,
    *,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    job: Callable[[int, tuple[float, float, float], argparse.Namespace], tuple] | None = None,
) -> int:
    """The command line of an evidence writer: ``--seeds A-B --spacing ZxYxX --out DIR --workers N``
    (plus ``add_arguments``'s own); runs ``work(job(seed, spacing, args))`` for each seed in
    ``--workers`` processes and prints each returned line as it comes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", required=True, help="A-B (inclusive)")
    parser.add_argument("--spacing", default="2.5x1.5x1.5")
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=2)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    first, last = (int(v) for v in args.seeds.split("-"))
    spacing = tuple(float(v) for v in args.spacing.split("x"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    make_job = job or (lambda seed, spacing, args: (seed, spacing, args.out))
    jobs = [make_job(seed, spacing, args) for seed in range(first, last + 1)]  # type: ignore[arg-type]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for line in pool.map(work, jobs):
            print(line, flush=True)
    return 0
