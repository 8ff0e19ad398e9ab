"""``tghmoe eval``: score a model folder on a dataset by the M3D protocol (JSON + Markdown);
``tghmoe eval-baseline``: what rules that never look at the image score on the same questions."""

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
    parser.add_argument(
        "--zero-image",
        action="store_true",
        help="feed zeros instead of the pixels (scores a model trained with [data] zero_image = true)",
    )
    parser.add_argument(
        "--free-letters",
        action="store_true",
        help="score the letter the model writes itself, not the option it finds most likely "
        "(InferenceEngine.rank_choices, the engine's default for multiple-choice questions)",
    )
    parser.add_argument(
        "--prior-train",
        metavar="SPEC",
        help="also learn the image-free prior on this (training) data and show it beside every closed-VQA accuracy",
    )
    parser.set_defaults(func=run_eval)

    baseline = subparsers.add_parser(
        "eval-baseline",
        help="score image-free rules (learnt prior, hand rule) on the closed questions of a dataset",
    )
    baseline.add_argument("--train", required=True, metavar="SPEC", help="data the prior learns from (training seeds); " + DATA_HELP)
    baseline.add_argument("--data", required=True, metavar="SPEC", help="held-out data it is scored on")
    baseline.add_argument("--out", required=True, metavar="JSON", help="results file (a .md table is written beside it)")
    baseline.add_argument("--cache-dir", metavar="DIR", help="phantom cache folder (default: ~/.cache/napari-tghmoe)")
    baseline.set_defaults(func=run_eval_baseline)


def run_eval(args: argparse.Namespace) -> int:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.eval.evaluate import evaluate, write_results
    from napari_tghmoe.datasets import load_dataset_spec

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
    engine.ranks_choices = not args.free_letters
    from napari_tghmoe.eval.evaluate import engine_generate_fn

    answer_with = engine_generate_fn(engine, args.max_new_tokens, zero_image=True) if args.zero_image else engine
    results = evaluate(
        answer_with,
        samples,
        task=args.task,
        max_new_tokens=args.max_new_tokens,
        use_bertscore=not args.no_bertscore,
        progress=not args.no_progress,
        info={
            "model": str(model_path),
            "data": args.data,
            "device": engine.device,
            "precision": engine.precision,
            "zero_image": bool(args.zero_image),
            "closed_answers": "free letters" if args.free_letters else "ranked options",
        },
    )
    if args.prior_train:
        from napari_tghmoe.eval.baselines import PRIOR, run_baselines
        from napari_tghmoe.eval.evaluate import attach_baselines

        closed = [s for s in samples if s.task == "vqa_closed"]
        if closed and "vqa_closed" in results:
            prior = run_baselines(_load(args.prior_train, "vqa_closed", args.cache_dir), closed)
            attach_baselines(results, {PRIOR: prior["baselines"][PRIOR]})
            results["prior_train"] = args.prior_train
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


def _load(spec: str, task: str, cache_dir: str | None) -> list[Any]:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.datasets import load_dataset_spec

    try:
        samples = load_dataset_spec(spec, task=task, cache_dir=cache_dir)
    except ValueError as err:
        raise CLIError(str(err)) from err
    if not samples:
        raise CLIError(f"{spec}: no closed questions")
    return samples


def run_eval_baseline(args: argparse.Namespace) -> int:
    from napari_tghmoe.cli import CLIError
    from napari_tghmoe.eval.baselines import run_baselines, write_baselines

    train = _load(args.train, "vqa_closed", args.cache_dir)
    test = _load(args.data, "vqa_closed", args.cache_dir)
    try:
        results = run_baselines(train, test, info={"train": args.train, "data": args.data})
    except ValueError as err:
        raise CLIError(str(err)) from err
    json_path, markdown_path = write_baselines(results, args.out)
    for name, summary in results["baselines"].items():
        per_type = ", ".join(f"{q} {row['accuracy']:.3f}" for q, row in summary["per_type"].items())
        print(f"{name}: closed accuracy {summary['accuracy']:.3f} ({per_type})", file=sys.stderr)
    print(f"wrote {json_path} and {markdown_path}", file=sys.stderr)
    return 0
