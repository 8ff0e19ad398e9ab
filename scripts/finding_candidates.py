"""Every finding component a segmentation model proposes on phantoms, with what it really is.

Research tool for choosing how a finding model's components are kept (docs/results-med3d.md).
It runs :func:`segment_volume` once per phantom with the finding threshold set to 0, so each
proposed component is listed once with its kind, size, mean and peak probability, the organ it
lies in, the presence head's score for its kind, the true findings (of that kind) it overlaps and
the phantom structure most of it lies on (which look-alike a false one is). Keeping rules can then
be scored on the saved JSON in seconds (``--rules``) instead of re-segmenting for every setting.

    python scripts/finding_candidates.py collect --model DIR --data "phantom:seeds=800000-800015,region=both,spacing=2.5x1.5x1.5" --out cands.json
    python scripts/finding_candidates.py score cands.json [--threshold 0.5] [--peak 0.9] [--sites recipes/med3d-findings.toml]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _unthresholded_copy(model_dir: Path, scratch: Path) -> Path:
    """The model folder with every ``min_finding_probability`` at 0 (the cascade's too)."""
    out = scratch / model_dir.name
    shutil.copytree(model_dir, out)
    for config_path in out.rglob("config.json"):
        config = json.loads(config_path.read_text())
        if "min_finding_probability" in config:
            config["min_finding_probability"] = 0.0
            config["verifier_min_probability"] = 0.0
            config["finding_sites"] = {}
            config_path.write_text(json.dumps(config, indent=2))
    return out


def collect(model_dir: Path, data: str, out: Path) -> None:
    from napari_tghmoe.med3d.data import iter_phantoms
    from napari_tghmoe.med3d.segment import finding_components, segment_volume

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = _unthresholded_copy(model_dir, Path(scratch))
        for phantom in iter_phantoms(data):
            result = segment_volume(phantom.volume, folder)
            value_of = {name: value for value, name in result.label_names.items()}
            truths = [
                {"kind": f.kind, "location": f.location, "size_mm": f.size_mm}
                for f in phantom.findings if f.kind in value_of
            ]
            truth_index = {i: j for j, i in enumerate(i for i, f in enumerate(phantom.findings) if f.kind in value_of)}
            components = []
            for finding in result.findings:
                # the component holding this finding's centre voxel
                for voxels in finding_components(result.labels, finding.label):
                    if not (voxels == np.array(finding.voxel_zyx)).all(axis=1).any():
                        continue
                    where = tuple(voxels.T)
                    lesion_ids = np.unique(phantom.lesions[where])
                    hits = [
                        truth_index[int(i) - 1] for i in lesion_ids
                        if i > 0 and phantom.findings[int(i) - 1].kind == finding.kind and int(i) - 1 in truth_index
                    ]
                    structures = np.bincount(phantom.labels[where].astype(np.int64))
                    components.append({
                        "kind": finding.kind,
                        "volume_ml": finding.volume_ml,
                        "probability": finding.probability,
                        "peak_probability": finding.peak_probability,
                        "verifier_probability": finding.verifier_probability,
                        "location": finding.location,
                        "presence": result.finding_presence.get(finding.kind),
                        "true_findings": hits,
                        "structure": phantom.label_names.get(int(structures.argmax()), str(int(structures.argmax()))),
                    })
                    break
            row = {"seed": phantom.seed, "region": phantom.region, "truths": truths, "components": components}
            rows.append(row)
            false = sum(1 for c in components if not c["true_findings"])
            found = len({i for c in components for i in c["true_findings"]})
            print(f"phantom {phantom.seed} ({phantom.region}): {found}/{len(truths)} found, {false} false, "
                  f"{result.seconds:.0f} s", flush=True)
            out.write_text(json.dumps({"model": str(model_dir), "data": data, "volumes": rows}, indent=1) + "\n")


def score(path: Path, keep: Any) -> dict[str, Any]:
    """Recall and false findings per volume when only components with ``keep(component)`` stay."""
    volumes = json.loads(path.read_text())["volumes"]
    true_total = found_total = false_total = 0
    missed_kinds: dict[str, int] = {}
    false_kinds: dict[str, int] = {}
    for row in volumes:
        kept = [c for c in row["components"] if keep(c)]
        found = {i for c in kept for i in c["true_findings"]}
        true_total += len(row["truths"])
        found_total += len(found)
        for i, truth in enumerate(row["truths"]):
            if i not in found:
                missed_kinds[truth["kind"]] = missed_kinds.get(truth["kind"], 0) + 1
        for c in kept:
            if not c["true_findings"]:
                false_total += 1
                key = f'{c["kind"]} on {c["structure"]}'
                false_kinds[key] = false_kinds.get(key, 0) + 1
    return {
        "recall": found_total / true_total if true_total else None,
        "found": found_total, "true": true_total,
        "false_per_volume": false_total / len(volumes) if volumes else None,
        "missed": missed_kinds, "false": dict(sorted(false_kinds.items(), key=lambda kv: -kv[1])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--model", required=True, type=Path)
    c.add_argument("--data", required=True)
    c.add_argument("--out", required=True, type=Path)
    s = sub.add_parser("score")
    s.add_argument("candidates", type=Path)
    s.add_argument("--threshold", type=float, default=0.0, help="minimum mean probability")
    s.add_argument("--peak", type=float, default=0.0, help="minimum peak probability")
    s.add_argument("--min-ml", type=float, default=0.0)
    s.add_argument("--verified", type=float, default=0.0, help="minimum verifier probability")
    s.add_argument("--sites", type=Path, metavar="RECIPE", help="apply this recipe's [model.finding_sites]")
    args = parser.parse_args(argv)
    if args.command == "collect":
        collect(args.model, args.data, args.out)
        return 0
    sites: dict[str, list[str]] = {}
    if args.sites is not None:
        from napari_tghmoe.med3d.recipe import load_recipe

        sites = load_recipe(args.sites).config().finding_sites

    def keep(c: dict[str, Any]) -> bool:
        in_place = c["kind"] not in sites or c["location"] in sites[c["kind"]]
        second_look = c.get("verifier_probability")
        if second_look is not None and second_look < args.verified:
            return False
        return in_place and c["probability"] >= args.threshold and c["peak_probability"] >= args.peak and c["volume_ml"] >= args.min_ml

    result = score(args.candidates, keep)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
