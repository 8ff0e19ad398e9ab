"""``tghmoe pretrain``, ``finetune-seg``, ``segment`` and ``eval-seg`` (Med3DInsight).

    tghmoe pretrain --config recipes/med3d-demo.toml --out runs/med3d/pretrain [--resume]
    tghmoe finetune-seg --config recipes/med3d-demo.toml --out runs/med3d/seg --init runs/med3d/pretrain
    tghmoe seg-bundle --organs DIR --findings DIR [--verifier DIR] --out DIR  # one cascade folder
    tghmoe train-verifier --config recipes/med3d-findings.toml --findings DIR --out DIR
    tghmoe segment SCAN --out OUT.nii.gz [--model DIR]      # + OUT.labels.json
    tghmoe eval-seg --model DIR --data SPEC --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    pre = subparsers.add_parser("pretrain", help="Med3DInsight: pre-train the 3D encoder with PSAT against the 2D MLLM")
    pre.add_argument("--config", required=True, metavar="TOML", help="recipe, e.g. recipes/med3d-demo.toml")
    pre.add_argument("--out", required=True, metavar="DIR", help="output folder (model, log, checkpoints, cached targets)")
    pre.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    pre.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    pre.add_argument("--no-progress", action="store_true")
    pre.set_defaults(func=run_pretrain)

    fine = subparsers.add_parser("finetune-seg", help="Med3DInsight: fine-tune segmentation + finding classification")
    fine.add_argument("--config", required=True, metavar="TOML")
    fine.add_argument("--out", required=True, metavar="DIR")
    fine.add_argument("--init", metavar="PRETRAINED_DIR", help="start the encoder from this `tghmoe pretrain` folder (or continue a segmentation model folder)")
    fine.add_argument("--label-fraction", type=float, metavar="F", help="use the labels of this share of the volumes")
    fine.add_argument("--resume", action="store_true")
    fine.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    fine.add_argument("--no-progress", action="store_true")
    fine.set_defaults(func=run_finetune)

    bundle = subparsers.add_parser("seg-bundle", help="one segmentation folder: an organ model plus a finer finding model")
    bundle.add_argument("--organs", required=True, metavar="DIR", help="segmentation model folder (organs and finding labels)")
    bundle.add_argument("--findings", required=True, metavar="DIR", help="finding model folder (finding kinds only, e.g. 2 mm)")
    bundle.add_argument(
        "--verifier", metavar="DIR", nargs="+",
        help="the finding model's verifier (tghmoe train-verifier); several make an ensemble (their mean)",
    )
    bundle.add_argument("--out", required=True, metavar="DIR")
    bundle.set_defaults(func=run_bundle)

    verify = subparsers.add_parser(
        "train-verifier", help="Med3DInsight: train the second look that rejects a finding model's look-alikes"
    )
    verify.add_argument("--config", required=True, metavar="TOML", help="the finding model's recipe ([verifier] table)")
    verify.add_argument("--findings", required=True, metavar="DIR", help="the finding model folder whose proposals it checks")
    verify.add_argument("--out", required=True, metavar="DIR")
    verify.add_argument("--resume", action="store_true")
    verify.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    verify.add_argument("--no-progress", action="store_true")
    verify.set_defaults(func=run_train_verifier)

    seg = subparsers.add_parser("segment", help="segment a CT: label map on the scan's own grid + labels.json")
    seg.add_argument("scan", metavar="SCAN", help="CT file or DICOM folder")
    seg.add_argument("--out", required=True, metavar="OUT.nii.gz", help="label map (NIfTI); OUT.labels.json beside it")
    seg.add_argument("--model", metavar="DIR", help="segmentation model folder (default: resources/demo-seg-model)")
    seg.set_defaults(func=run_segment)

    ev = subparsers.add_parser("eval-seg", help="Dice, finding recall and false findings on held-out phantoms")
    ev.add_argument("--model", metavar="DIR", help="segmentation model folder (default: the bundled demo)")
    ev.add_argument("--data", required=True, metavar="SPEC", help="phantom spec, e.g. phantom:seeds=900000-900009,region=both")
    ev.add_argument("--out", required=True, metavar="JSON")
    ev.add_argument("--limit", type=int)
    ev.set_defaults(func=run_eval)


def _recipe(args: argparse.Namespace) -> Any:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.med3d.recipe import Med3DRecipeError, load_recipe

    try:
        return load_recipe(args.config, args.set)
    except Med3DRecipeError as err:
        raise CLIError(str(err)) from err


def _report(result: Any) -> None:
    loss = result.last_log.get("total")
    loss_text = f", last loss {loss:.4f}" if isinstance(loss, float) else ""
    print(
        f"{result.phase}: {result.steps_done}/{result.total_steps} steps in {result.seconds:.1f} s{loss_text} -> {result.out_dir}",
        file=sys.stderr,
    )


def run_pretrain(args: argparse.Namespace) -> int:
    from napari_tghmoe.med3d.pretrain import pretrain

    _report(pretrain(_recipe(args), args.out, resume=args.resume, progress=not args.no_progress))
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.med3d.finetune import finetune
    from napari_tghmoe.med3d.types import SegModelError

    recipe = _recipe(args)
    try:
        result = finetune(
            recipe, args.out, init=args.init, label_fraction=args.label_fraction,
            resume=args.resume, progress=not args.no_progress,
        )
    except (SegModelError, ValueError) as err:
        raise CLIError(str(err)) from err
    _report(result)
    return 0


def run_bundle(args: argparse.Namespace) -> int:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.med3d.segment import attach_finding_model
    from napari_tghmoe.med3d.types import SegModelError

    try:
        out = attach_finding_model(args.organs, args.findings, args.out, verifier_dir=args.verifier)
    except SegModelError as err:
        raise CLIError(str(err)) from err
    verified = f" + verifier {' + '.join(args.verifier)}" if args.verifier else ""
    print(f"cascade: organs {args.organs} + findings {args.findings}{verified} -> {out}", file=sys.stderr)
    return 0


def run_train_verifier(args: argparse.Namespace) -> int:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.med3d.types import SegModelError
    from napari_tghmoe.med3d.verifier import train_verifier

    recipe = _recipe(args)
    if not recipe.verifier.data:
        raise CLIError(f"{args.config}: [verifier] data lists no labelled phantom spec to mine proposals from")
    try:
        result = train_verifier(
            recipe, args.findings, args.out, resume=args.resume, progress=not args.no_progress,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (SegModelError, ValueError) as err:
        raise CLIError(str(err)) from err
    _report(result)
    return 0


def labels_json_path(out: Path) -> Path:
    """``seg.nii.gz`` -> ``seg.labels.json`` (beside the label map)."""
    name = out.name
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out.with_name(name + ".labels.json")


def run_segment(args: argparse.Namespace) -> int:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.io import CTVolume, load_volume
    from napari_tghmoe.io._write import write_volume
    from napari_tghmoe.med3d.segment import segment_volume
    from napari_tghmoe.med3d.types import SegModelError

    out = Path(args.out)
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        raise CLIError(f"{out}: --out must be a NIfTI path (.nii or .nii.gz)")
    volume = load_volume(args.scan)
    if volume.source is None:
        volume.source = str(args.scan)
    try:
        result = segment_volume(volume, args.model)
    except SegModelError as err:
        raise CLIError(str(err)) from err
    labels = CTVolume(
        hu=result.labels, spacing=volume.spacing, origin=volume.origin, direction=volume.direction, modality="SEG"
    )
    write_volume(labels, out)
    names = {str(value): name for value, name in result.label_names.items()}
    labels_json_path(out).write_text(json.dumps(names, indent=2) + "\n")
    summary = {
        "labels": str(out),
        "structure_volumes_ml": result.structure_volumes_ml,
        "findings": [
            {"kind": f.kind, "location": f.location, "voxel_zyx": list(f.voxel_zyx), "position_mm": list(f.position_mm),
             "volume_ml": f.volume_ml, "probability": f.probability, "verifier_probability": f.verifier_probability}
            for f in result.findings
        ],
        "finding_presence": result.finding_presence,
        "seconds": result.seconds,
        "warnings": list(result.warnings),
    }
    print(json.dumps(summary, indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.med3d.evaluate import evaluate_model, write_results
    from napari_tghmoe.med3d.types import SegModelError

    def show(row: dict) -> None:
        dices = row["dice"]
        mean = sum(dices.values()) / len(dices) if dices else float("nan")
        print(
            f"phantom {row['seed']} ({row['region']}): mean Dice {mean:.3f}, findings {len(row['findings_found'])}/"
            f"{row['findings_true']}, false {len(row['false_findings'])}",
            file=sys.stderr,
        )

    try:
        results = evaluate_model(args.model, args.data, limit=args.limit, on_volume=show)
    except (SegModelError, ValueError) as err:
        raise CLIError(str(err)) from err
    write_results(results, args.out)
    print(
        f"mean Dice {results['mean_dice']}, finding recall {results['finding_recall']}, "
        f"false findings/volume {results['false_findings_per_volume']} -> {args.out}"
    )
    return 0
