"""Fit and check the lung-nodule stage (napari_tghmoe.med3d.nodules) on the finder's own proposals.

``--kind`` (default "lung nodule") fits the same stage for another small focal kind, written to the
finding model's ``lesion_stages``; ``--polarity -1`` measures dark balls (a cyst) at collect time.

    collect: every lung-nodule component the cascade's finder proposes on phantoms (its thresholds
             at 0), with its finder probability, site, the verifier's probability, the ball
             measure at the scan's own spacing and whether it is a true nodule;
    fit:     the stage's logistic on collected candidates that pass the finder's own rules, written
             into a cascade's finding-model config (``nodule_stage``) with the cut to keep;
    score:   per cut, true nodules kept and false nodules per volume, for the verifier and for the
             stage, on collected candidates (ROC AUC of each as well).

    python scripts/nodule_stage.py collect --model resources/demo-seg-model --data "phantom:seeds=2000-2039,region=chest,spacing=2.5x1.5x1.5" --out train.json
    python scripts/nodule_stage.py fit train.json --model resources/demo-seg-model --cut 0.7 --propose-scales 2.5 3.5 4.5 --propose-cut 0.8
    python scripts/nodule_stage.py score val.json --model resources/demo-seg-model
    python scripts/nodule_stage.py collect --kind "hyperdense liver lesion" --model resources/demo-seg-model --data "phantom:seeds=2000-2079,region=abdomen,spacing=2.5x1.5x1.5" --out liver.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

NODULE = "lung nodule"


def _stage_key(config: dict[str, Any], kind: str) -> tuple[dict[str, Any], str]:
    """(the dict that holds ``kind``'s stage in a finding-model config, its key there)."""
    if kind == NODULE:
        return config, "nodule_stage"
    return config.setdefault("lesion_stages", {}), kind


def collect(model_dir: Path, data: str, out: Path, kind: str = NODULE, polarity: int = 1) -> None:
    from finding_candidates import _unthresholded_copy

    from napari_tghmoe.med3d.data import iter_phantoms
    from napari_tghmoe.med3d.nodules import ball_measure
    from napari_tghmoe.med3d.segment import finding_components, segment_volume

    volumes: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = _unthresholded_copy(model_dir, Path(scratch))
        for config_path in folder.rglob("config.json"):  # the stage must not decide what it is measured on
            config = json.loads(config_path.read_text())
            if config.pop("nodule_stage", None) is not None or config.pop("lesion_stages", None) is not None:
                config_path.write_text(json.dumps(config, indent=2))
        for phantom in iter_phantoms(data):
            result = segment_volume(phantom.volume, folder)
            truths = [i for i, f in enumerate(phantom.findings) if f.kind == kind]
            candidates = []
            for finding in result.findings:
                if finding.kind != kind:
                    continue
                for voxels in finding_components(result.labels, finding.label):
                    if not (voxels == np.array(finding.voxel_zyx)).all(axis=1).any():
                        continue
                    lesion_ids = np.unique(phantom.lesions[tuple(voxels.T)])
                    hits = [int(i) - 1 for i in lesion_ids if i > 0 and int(i) - 1 in truths]
                    measure = ball_measure(phantom.volume.hu, phantom.volume.spacing, finding.voxel_zyx, polarity=polarity)
                    candidates.append({
                        "probability": finding.probability, "location": finding.location,
                        "verifier_probability": finding.verifier_probability, "volume_ml": finding.volume_ml,
                        "true_findings": hits, "sizes_mm": [phantom.findings[i].size_mm for i in hits], "ball": asdict(measure),
                    })
                    break
            volumes.append({"seed": phantom.seed, "kind": kind, "polarity": polarity, "truth_sizes_mm": [phantom.findings[i].size_mm for i in truths], "truths": truths,
                            "candidates": candidates})
            found = {i for c in candidates for i in c["true_findings"]}
            print(f"phantom {phantom.seed}: {len(found)}/{len(truths)} {kind}s proposed, "
                  f"{sum(1 for c in candidates if not c['true_findings'])} look-alikes", flush=True)
            out.write_text(json.dumps({"model": str(model_dir), "data": data, "volumes": volumes}, indent=1) + "\n")


def _finder_rules(model_dir: Path, kind: str) -> tuple[float, list[str] | None]:
    from napari_tghmoe.med3d.encoder import Med3DConfig

    organ = Med3DConfig.from_pretrained(model_dir)
    finder = Med3DConfig.from_pretrained(model_dir / organ.finding_model) if organ.finding_model else organ
    return finder.min_finding_probability, finder.finding_sites.get(kind)


def _collected(path: Path) -> tuple[list[dict[str, Any]], str, int]:
    """(volumes, the kind they were collected for, its polarity)."""
    volumes = json.loads(path.read_text())["volumes"]
    first = volumes[0] if volumes else {}
    return volumes, first.get("kind", NODULE), int(first.get("polarity", 1))


def _passing(path: Path, model_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, candidates that pass the finder's probability and site rules: the stage's input)."""
    volumes, kind, _ = _collected(path)
    threshold, sites = _finder_rules(model_dir, kind)
    kept = []
    for volume in volumes:
        for c in volume["candidates"]:
            if c["probability"] >= threshold and (sites is None or c["location"] in sites):
                kept.append({**c, "seed": volume["seed"]})
    return volumes, kept


def _measure(c: dict[str, Any]):
    from napari_tghmoe.med3d.nodules import BallMeasure

    return BallMeasure(**c["ball"])


def fit(path: Path, model_dir: Path, cut: float, propose_scales: list[float], propose_cut: float) -> dict[str, Any]:
    from napari_tghmoe.med3d.encoder import Med3DConfig
    from napari_tghmoe.med3d.nodules import fit_nodule_stage

    _, candidates = _passing(path, model_dir)
    _, kind, polarity = _collected(path)
    stage = fit_nodule_stage([_measure(c) for c in candidates], [bool(c["true_findings"]) for c in candidates])
    stage.min_probability = float(cut)
    stage.polarity = polarity
    stage.propose_scales_mm = tuple(float(s) for s in propose_scales)
    stage.propose_min_probability = float(propose_cut)
    values = {**stage.to_config(), "fitted_on": json.loads(path.read_text())["data"]}
    organ = Med3DConfig.from_pretrained(model_dir)
    config_path = model_dir / (organ.finding_model or ".") / "config.json"
    config = json.loads(config_path.read_text())
    holder, key = _stage_key(config, kind)
    holder[key] = values
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    true = sum(1 for c in candidates if c["true_findings"])
    print(f"fitted on {len(candidates)} {kind} candidates ({true} true): {values}; written to {config_path}")
    return values


def _auc(scores: list[float], labels: list[bool]) -> float:
    """ROC AUC as the Mann-Whitney U of the true candidates' scores over the look-alikes' (ties count half)."""
    from scipy.stats import mannwhitneyu

    positive = [s for s, y in zip(scores, labels) if y]
    negative = [s for s, y in zip(scores, labels) if not y]
    if not positive or not negative:
        return float("nan")
    return float(mannwhitneyu(positive, negative).statistic) / (len(positive) * len(negative))


def score(path: Path, model_dir: Path, cuts: list[float]) -> None:
    from napari_tghmoe.med3d.encoder import Med3DConfig
    from napari_tghmoe.med3d.nodules import NoduleShapeStage

    organ = Med3DConfig.from_pretrained(model_dir)
    finder = Med3DConfig.from_pretrained(model_dir / organ.finding_model)
    _, kind, _ = _collected(path)
    stage = NoduleShapeStage.from_config(finder.nodule_stage if kind == NODULE else finder.lesion_stages.get(kind))
    if stage is None:
        raise SystemExit(f"{model_dir}: its finding model has no stage for {kind} (run fit first)")
    volumes, candidates = _passing(path, model_dir)
    true_total = sum(len(v["truths"]) for v in volumes)
    proposed = len({(v["seed"], i) for v in volumes for c in v["candidates"] for i in c["true_findings"]})
    print(f"{path}: {len(volumes)} volumes, {true_total} true {kind}s, {proposed} proposed by the finder at any probability, "
          f"{len(candidates)} candidates pass the finder's rules")
    labels = [bool(c["true_findings"]) for c in candidates]
    rows = {
        "verifier": [c["verifier_probability"] or 0.0 for c in candidates],
        "shape stage": [stage.probability_of(_measure(c)) for c in candidates],
    }
    print("| second look | ROC AUC | " + " | ".join(f"cut {c}: found, false / volume" for c in cuts) + " |")
    print("|---|---|" + "---|" * len(cuts))
    for name, scores in rows.items():
        cells = []
        for cut in cuts:
            found = {(c["seed"], i) for c, s in zip(candidates, scores) if s >= cut for i in c["true_findings"]}
            false = sum(1 for c, s, y in zip(candidates, scores, labels) if s >= cut and not y)
            cells.append(f"{len(found)}/{true_total}, {false / len(volumes):.2f}")
        print(f"| {name} | {_auc(scores, labels):.3f} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--model", required=True, type=Path)
    c.add_argument("--data", required=True)
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--kind", default=NODULE, help="the finding kind whose candidates are collected")
    c.add_argument("--polarity", type=int, choices=(1, -1), default=1, help="1: bright balls, -1: dark ones")
    f = sub.add_parser("fit")
    f.add_argument("candidates", type=Path)
    f.add_argument("--model", required=True, type=Path, help="cascade folder whose finding model gets the stage")
    f.add_argument("--cut", type=float, default=0.5, help="keep a lung nodule when the stage gives at least this")
    f.add_argument("--propose-scales", type=float, nargs="*", default=[], help="widths (mm) the stage looks for missed balls at")
    f.add_argument("--propose-cut", type=float, default=0.8, help="keep a ball the stage found itself from this probability")
    s = sub.add_parser("score")
    s.add_argument("candidates", type=Path)
    s.add_argument("--model", required=True, type=Path)
    s.add_argument("--cuts", type=float, nargs="+", default=[0.35, 0.5, 0.7])
    args = parser.parse_args(argv)
    if args.command == "collect":
        collect(args.model, args.data, args.out, args.kind, args.polarity)
    elif args.command == "fit":
        fit(args.candidates, args.model, args.cut, args.propose_scales, args.propose_cut)
    else:
        score(args.candidates, args.model, args.cuts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
