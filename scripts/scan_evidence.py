"""Segment phantoms with the bundled cascade and store each one's scan evidence (issue 15).

    python scripts/scan_evidence.py --seeds 300000-300299 --spacing 2.5x1.5x1.5 --out runs/evidence

One JSON per phantom (``<out>/<phantom cache file stem>.json``: ``TGHMOE_EVIDENCE_CACHE=<out>``
then serves it to training and evaluation): the :class:`ScanEvidence` the chat model reads
plus the phantom's truth (findings, phase, plane) for diagnostics. Existing files are kept, so a
killed run continues. ``--workers`` processes of one torch thread each.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def _one(args: tuple[int, tuple[float, float, float], str, str, tuple[str, ...]]) -> str:
    seed, spacing, out, model, planes = args
    import torch

    torch.set_num_threads(1)
    from napari_tghmoe.datasets.phantom import cached_phantom, phantom_region
    from napari_tghmoe.io._geometry import orientation_name
    from napari_tghmoe.med3d.evidence import scan_evidence
    from napari_tghmoe.med3d.evidence_files import truth_record, write_evidence_file
    from napari_tghmoe.med3d.segment import segment_volume

    started = time.perf_counter()
    path, cached = cached_phantom(seed, phantom_region("both", seed), None, spacing, None)
    target = Path(out) / f"{path.stem}.json"  # the name the chat model's evidence cache looks for
    if target.exists():
        return f"{seed}: kept"
    plane = orientation_name(cached.volume.direction)
    if planes and plane not in planes:
        return f"{seed}: {plane}, skipped"
    result = segment_volume(cached.volume, model or None)
    evidence = scan_evidence(cached.volume, result).to_json()
    evidence["seed"] = seed
    evidence["truth"] = truth_record(cached.phase, plane, cached.volume.spacing, cached.findings)
    write_evidence_file(target, evidence)
    return f"{seed}: {len(evidence['findings'])} found, {len(cached.findings)} true, {time.perf_counter() - started:.1f} s"


def main(argv: list[str] | None = None) -> int:
    from napari_tghmoe.med3d.evidence_files import seeds_main

    def add_arguments(parser) -> None:
        parser.add_argument("--model", default="", help="segmentation model folder (default: the bundled cascade)")
        parser.add_argument("--planes", default="", help="only phantoms stored in these planes (comma-separated)")

    def job(seed, spacing, args) -> tuple:
        return (seed, spacing, args.out, args.model, tuple(p for p in args.planes.split(",") if p))

    return seeds_main(__doc__.split("\n")[0], _one, argv, add_arguments=add_arguments, job=job)


if __name__ == "__main__":
    sys.exit(main())
