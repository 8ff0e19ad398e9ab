"""Segment phantoms with the bundled cascade and store each one's scan evidence (issue 15).

    python scripts/scan_evidence.py --seeds 300000-300299 --spacing 2.5x1.5x1.5 --out runs/evidence

One JSON per phantom (``<out>/<phantom cache file stem>.json``: ``TGHMOE_EVIDENCE_CACHE=<out>``
then serves it to training and evaluation): the :class:`ScanEvidence` the chat model reads
plus the phantom's truth (findings, phase, plane) for diagnostics. Existing files are kept, so a
killed run continues. ``--workers`` processes of one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _one(args: tuple[int, tuple[float, float, float], str, str, tuple[str, ...]]) -> str:
    seed, spacing, out, model, planes = args
    import torch

    torch.set_num_threads(1)
    from napari_tghmoe.datasets.phantom import cached_phantom, phantom_region
    from napari_tghmoe.io._geometry import orientation_name
    from napari_tghmoe.med3d.evidence import scan_evidence
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
    evidence["truth"] = {
        "phase": cached.phase,
        "plane": orientation_name(cached.volume.direction),
        "spacing": [float(v) for v in cached.volume.spacing],
        "findings": [
            {"kind": f["kind"], "location": f["location"], "organ": f["organ"], "center_voxel": list(f["center_voxel"])}
            for f in cached.findings
        ],
    }
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(evidence), encoding="utf-8")
    os.replace(temporary, target)
    return f"{seed}: {len(evidence['findings'])} found, {len(cached.findings)} true, {time.perf_counter() - started:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", required=True, help="A-B (inclusive)")
    parser.add_argument("--spacing", default="2.5x1.5x1.5")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="", help="segmentation model folder (default: the bundled cascade)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--planes", default="", help="only phantoms stored in these planes (comma-separated)")
    args = parser.parse_args(argv)
    first, last = (int(v) for v in args.seeds.split("-"))
    spacing = tuple(float(v) for v in args.spacing.split("x"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    planes = tuple(p for p in args.planes.split(",") if p)
    jobs = [(seed, spacing, args.out, args.model, planes) for seed in range(first, last + 1)]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for line in pool.map(_one, jobs):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
