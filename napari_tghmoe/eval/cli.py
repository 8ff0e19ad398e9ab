"""``tghmoe eval``: score a model folder on a dataset by the M3D protocol (JSON + Markdown)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

DATA_HELP = (
    "phantom:seeds=1000-1019,region=chest|abdomen|both[,shape=32x64x64] | "
    "m3d-vqa:/path/to.csv[,root=DIR] | m3d-cap:/folder[,split=test] | ct-rate:/folder"
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model on a dataset (BLEU, ROUGE, METEOR, BERTScore, accuracy)")
    parser.add_argument("--model", metavar="DIR", help="TGH-MoE model folder (default: the bundled demo model)")
    parser.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP)
    parser.add_argument("--task", default="all", choices=["report", "vqa", "vqa_closed", "vqa_open", "all"])
    parser.add_argument("--out", required=True, metavar="JSON", help="results file (a .md table is written beside it)")
    parser.add_argument("--markdown", metavar="MD", help="Markdown table path (default: --out with .md)")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N samples")
    parser.add_argument(
        "--phrasing",
        choices=["heldout", "train", "none"],
        help="request wording: heldout (phantom default), train, or none (M3D/CT-RATE default)",
    )
    parser.add_argument("--no-bertscore", action="store_true", help="skip BERTScore (it loads a sentence encoder)")
    parser.add_argument("--cache-dir", metavar="DIR", help="phantom cache folder (default: ~/.cache/napari-tghmoe)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phrasing choice")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--quantization", default="auto", choices=["auto", "4bit", "8bit", "none"])
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.eval.evaluate import evaluate, write_results
    from napari_tghmoe.train.data import load_dataset_spec

    try:
        samples = load_dataset_spec(
            args.data, task=args.task, phrasing=args.phrasing, limit=args.limit, cache_dir=args.cache_dir, seed=args.seed
        )
    except ValueError as err:
        raise CLIError(str(err)) from err
    if not samples:
        raise CLIError(f"{args.data}: no samples for task {args.task}")
    from napari_tghmoe.cli_infer import load_engine, resolve_model_path

    model_path = resolve_model_path(args.model)
    engine = load_engine(args)
    results = evaluate(
        engine,
        samples,
        task=args.task,
        max_new_tokens=args.max_new_tokens,
        use_bertscore=not args.no_bertscore,
        progress=not args.no_progress,
        info={"model": str(model_path), "data": args.data, "device": engine.device, "precision": engine.precision},
    )
    json_path, markdown_path = write_results(results, args.out, args.markdown)
    print(_summary_line(results), file=sys.stderr)
    print(f"wrote {json_path} and {markdown_path}", file=sys.stderr)
    return 0


def _summary_line(results: dict[str, Any]) -> str:
    parts = [f"{results['n']} samples"]
    report = results.get("report")
    if report:
        parts.append(f"report BLEU-1 {report['bleu1']:.3f} ROUGE-L {report['rougeL']:.3f}")
        findings = report.get("findings")
        if findings and findings.get("recall") is not None:
            parts.append(f"finding recall {findings['recall']:.3f}")
        if findings and findings.get("precision") is not None:
            parts.append(f"precision {findings['precision']:.3f}")
    closed = results.get("vqa_closed")
    if closed:
        parts.append(f"closed-VQA accuracy {closed['accuracy']:.3f}")
    open_vqa = results.get("vqa_open")
    if open_vqa:
        parts.append(f"open-VQA BLEU-1 {open_vqa['bleu1']:.3f}")
    return "; ".join(parts)
