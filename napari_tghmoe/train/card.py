"""Package a trained model folder as the bundled demo model, with its model card.

``python -m napari_tghmoe.train.card --model runs/demo/stage2 --recipe recipes/demo.toml
--results runs/demo/eval/heldout.json --dest resources/demo-model``

Copies the weights (safetensors), config and tokenizer, writes ``README.md`` (what the model
is, how it was made, its held-out numbers) and ``card_check.json``: the greedy answers of the
shipped weights on a small fixed held-out subset. The test suite re-runs that subset and must
get exactly the same answers, so the card's numbers are tied to the weights that ship.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

SHIPPED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def card_check(model_dir: str | Path, data: str, limit: int = 16, max_new_tokens: int = 16, seed: int = 0) -> dict:
    """Greedy closed-VQA answers of ``model_dir`` on the first ``limit`` held-out items."""
    from napari_tghmoe.engine import InferenceEngine
    from napari_tghmoe.eval.evaluate import evaluate
    from napari_tghmoe.datasets import load_dataset_spec

    samples = load_dataset_spec(data, task="vqa_closed", limit=limit, seed=seed)
    engine = InferenceEngine.from_pretrained(model_dir, device="cpu", quantization="none")
    results = evaluate(engine, samples, task="vqa_closed", max_new_tokens=max_new_tokens, use_bertscore=False)
    return {
        "data": data,
        "limit": limit,
        "phrasing_seed": seed,
        "max_new_tokens": max_new_tokens,
        "accuracy": results["vqa_closed"]["accuracy"],
        "predictions": [r["prediction"] for r in results["samples"]],
    }


def encoder_lines(config: dict[str, Any]) -> list[str]:
    """The card's words on the model's 3D encoder (none without one)."""
    if not config.get("volume_encoder"):
        return []
    if config.get("volume_token_source") == "evidence":
        return [
            f"- 3D encoder: `{config['volume_encoder']}/`, a Med3DInsight segmentation cascade (with its site and "
            "phase heads) that segments the CT at its own spacing; what it found goes in as "
            f"{1 + int(config.get('volume_evidence_findings', 6))} evidence tokens and one line of words after the "
            "video tokens (napari_tghmoe.med3d.evidence). The first question about a scan segments it.",
            f"- Evidence words: the findings of certainty {float(config.get('volume_words_min_certainty', 0.5)):g} or more "
            "(the others are in the tokens only)"
            + (
                f"; answers are decoded with an evidence copy bias of {float(config['volume_words_copy_bias']):g} "
                "(a phrase begun from the words ends as the words end it; napari_tghmoe.model.copying)."
                if float(config.get("volume_words_copy_bias", 0.0) or 0.0) > 0
                else "."
            ),
        ]
    return [f"- 3D encoder: `{config['volume_encoder']}/`, a Med3DInsight encoder read beside the video tokens."]


def results_tables(results: dict[str, Any]) -> str:
    """The held-out numbers as Markdown (report, closed VQA per type, open VQA)."""
    from napari_tghmoe.eval.evaluate import results_to_markdown

    text = results_to_markdown(results)
    return text.split("\n", 2)[2] if text.startswith("# ") else text  # drop the title line


#: The issue's targets for the demo model on held-out phantoms.
TARGETS = {"closed-VQA accuracy": 0.85, "finding recall": 0.7, "finding precision": 0.8}

#: ... and every closed question type at least this.
TYPE_TARGET = 0.7


def target_verdict(
    closed_accuracy: float | None, recall: float | None, precision: float | None, type_accuracy: dict[str, float] | None = None
) -> str:
    """One sentence: which targets are met and by how much the others are missed (``type_accuracy``:
    closed accuracy per question type, each held to :data:`TYPE_TARGET`)."""
    values = dict(zip(TARGETS, (closed_accuracy, recall, precision)))
    missed = [
        f"{name} {_fmt(value)} is {TARGETS[name] - value:.2f} below {TARGETS[name]}"
        for name, value in values.items()
        if value is not None and value < TARGETS[name]
    ]
    missed += [
        f"closed-VQA {qtype} {_fmt(value)} is {TYPE_TARGET - value:.2f} below {TYPE_TARGET}"
        for qtype, value in sorted((type_accuracy or {}).items())
        if value is not None and value < TYPE_TARGET
    ]
    missed += [f"{name} was not measured" for name, value in values.items() if value is None]
    if not missed:
        return "All targets are met." if type_accuracy else "All three targets are met."
    return "**Targets missed**: " + "; ".join(missed) + "."


def input_intensity_line(config: dict[str, Any]) -> str:
    """The card's line on the intensities the model was trained on (``input_intensity``; a folder
    written before the field existed, like the first demo, was trained on HU)."""
    kind = config.get("input_intensity") or "hu"
    if kind == "unit":
        return (
            "- Input intensities (`input_intensity`): **unit**, [0, 1] display intensities as M3D ships them "
            "(grey in all three channels); a CT in HU is windowed (soft tissue) and min-max normalised first, with a warning."
        )
    return (
        "- Input intensities (`input_intensity`): **hu**, CT in Hounsfield units (three HU windows as channels); "
        "a [0, 1] display-normalised volume (M3D) is mapped to pseudo-HU first, with a warning."
    )


EVALUATION_HEADING = "## Evaluation on held-out phantoms"
CHECK_HEADING = "## Check"


def evaluation_section(results: dict[str, Any], note: str = "") -> str:
    """The card's held-out numbers (``note``: one paragraph on what changed since training; by
    default the one a refresh stored in the results as ``card_note``)."""
    note = note or str(results.get("card_note") or "")
    closed = results.get("vqa_closed") or {}
    findings = (results.get("report") or {}).get("findings") or {}
    lines = [
        EVALUATION_HEADING,
        "",
        f"Data `{results.get('data')}`: seeds never used in training, request and question wordings from",
        "the held-out phrasing lists (never seen in training), greedy decoding through the same engine",
        "the napari chat uses. The engine answers a multiple-choice question with the option the model finds",
        "most likely (`InferenceEngine.rank_choices`: each option's words scored after its letter); the",
        "letters the model writes itself score lower (`tghmoe eval --free-letters`, docs/results.md).",
        "",
        *([note, ""] if note else []),
        f"- Closed-VQA accuracy: **{_fmt(closed.get('accuracy'))}** (target >= 0.85, every question type >= {TYPE_TARGET})",
        f"- Report finding recall: **{_fmt(findings.get('recall'))}** (target >= 0.7), precision: "
        f"**{_fmt(findings.get('precision'))}** (target >= 0.8)",
        "",
        target_verdict(
            closed.get("accuracy"), findings.get("recall"), findings.get("precision"),
            {qtype: row.get("accuracy") for qtype, row in (closed.get("per_type") or {}).items()},
        ),
        "",
        results_tables(results),
        "",
    ]
    return "\n".join(lines)


def check_section(check: dict[str, Any]) -> str:
    return "\n".join([
        CHECK_HEADING,
        "",
        f"`card_check.json` holds this model's greedy answers to the first {check['limit']} closed questions of",
        f"`{check['data']}` (accuracy {_fmt(check['accuracy'])} on that subset); `tests/test_train.py` re-runs",
        "them and requires the same answers.",
        "",
    ])


def write_check_and_results(dest: Path, recipe: Any, results: dict[str, Any]) -> dict[str, Any]:
    """Re-run the card's check on ``dest`` and write ``card_check.json`` and ``eval_results.json``
    (without the per-sample records); returns the check."""
    check = card_check(dest, recipe.eval.data)
    (dest / "card_check.json").write_text(json.dumps(check, indent=2) + "\n")
    slim = {k: v for k, v in results.items() if k != "samples"}
    (dest / "eval_results.json").write_text(json.dumps(slim, indent=2, default=str) + "\n")
    return check


def refresh_evaluation(dest: Path, recipe_path: Path, results_path: Path, note: str = "") -> Path:
    """Re-measure a shipped model whose weights stay and whose 3D encoder folder changed.

    Why: the evidence a model reads comes from its cascade, so a retrained verifier changes its
    answers without any LLM training. The card's check answers, ``eval_results.json`` and the
    evaluation section are rewritten; what the card says of the model and its training is kept.
    """
    from napari_tghmoe.train.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    results = json.loads(results_path.read_text())
    if note:  # kept with the numbers it explains, so the card can be rewritten from its files alone
        results["card_note"] = note
    check = write_check_and_results(dest, recipe, results)
    (dest / "README.md").write_text(rewrite_evaluation((dest / "README.md").read_text(), results, check, note))
    return dest


def rewrite_evaluation(card: str, results: dict[str, Any], check: dict[str, Any], note: str = "") -> str:
    """``card`` with its evaluation and check sections (everything from the evaluation heading on)
    replaced by those of ``results`` and ``check``."""
    head = card[: card.index(EVALUATION_HEADING)] if EVALUATION_HEADING in card else card.rstrip("\n") + "\n\n"
    return head + evaluation_section(results, note) + "\n" + check_section(check)


def write_card(
    dest: Path,
    recipe: Any,
    results: dict[str, Any],
    timings: dict[str, float],
    command: str,
    summaries: list[dict[str, Any]],
    check: dict[str, Any],
) -> str:
    config = json.loads((dest / "config.json").read_text())
    merge = config["vision_config"].get("spatial_merge_size", 2)  # patches per LLM token along each axis
    size_mb = sum(p.stat().st_size for p in dest.iterdir() if p.is_file()) / 1e6
    trainable = {f"stage {s['stage']}": s["trainable"]["trainable"] for s in summaries}
    lines = [
        "# napari-tghmoe demo model",
        "",
        "**Synthetic data only. Not for clinical use.** This model has never seen a real CT scan: it",
        "was trained from scratch, on this machine, on synthetic CT phantoms (`napari_tghmoe.phantom`)",
        "so that the plugin works offline out of the box and so that the TGH-MoE method can be shown",
        "end to end. Its answers about a real patient's scan mean nothing.",
        "",
        "## What it is",
        "",
        f"- Architecture: Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) with TGH-MoE "
        f"(`{config.get('model_type')}`): vision tower depth {config['vision_config']['depth']}, hidden "
        f"{config['vision_config']['hidden_size']}, patch {config['vision_config']['patch_size']} merged "
        f"{merge}x{merge} per LLM token, model grid {config.get('volume_grid')}; LLM "
        f"{config['text_config']['num_hidden_layers']} layers, hidden {config['text_config']['hidden_size']}, "
        f"vocabulary {config['text_config']['vocab_size']} (byte-level BPE trained on the phantom corpus).",
        f"- Experts in vision blocks {config['moe_blocks']} (groups per block {config['block_groups']}), "
        f"{config['experts_per_group']} experts per group, top-{config['router_top_k']}, LoRA rank {config['lora_rank']}; "
        f"LLM LoRA rank {config['llm_lora_rank']} on {config['llm_lora_targets']}.",
        f"- Input: the CT resampled to {config['volume_grid']} (slices x rows x columns).",
        *encoder_lines(config),
        input_intensity_line(config),
        f"- Files: {size_mb:.1f} MB in total, safetensors weights.",
        "- Base weights: none exist offline, so stage 1 also trained the (randomly initialised) base",
        "  vision tower and LLM (`also_train` in the recipe); stage 2 trained only the task experts and",
        "  routers, as the method prescribes. A real Qwen2.5-VL base keeps its weights frozen (docs/training.md).",
        "",
        "## How it was made",
        "",
        f"- Command: `{command}`",
        f"- Recipe: `recipes/{Path(recipe.path).name}` (seed {recipe.seed}); training data "
        f"`{', '.join(recipe.data.train)}` with training phrasings.",
        f"- Stage 1: {timings.get('stage1_note') or f'{recipe.stage1.steps} steps'} (batch {recipe.stage1.batch_size}, "
        f"accumulation {recipe.stage1.gradient_accumulation_steps}, recipe lr {recipe.stage1.lr}, {recipe.stage1.schedule}); "
        f"{timings.get('stage1_s', 0) / 60:.1f} min in total.",
        f"- Stage 2: {recipe.stage2.steps} steps x batch {recipe.stage2.batch_size}, lr {recipe.stage2.lr}; "
        f"{timings.get('stage2_s', 0) / 60:.1f} min.",
        f"- Trainable parameters: {trainable}.",
        f"- Hardware: {timings.get('hardware', 'CPU')}.",
        *([f"- Chosen: {timings['chosen']}"] if timings.get("chosen") else []),
        "",
        evaluation_section(results),
        check_section(check),
    ]
    return "\n".join(lines)


def package(
    model_dir: Path,
    recipe_path: Path,
    results_path: Path,
    dest: Path,
    command: str,
    timings: dict[str, Any],
    stage1_dir: Path | None = None,
) -> Path:
    from napari_tghmoe.train.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        source = model_dir / name
        if source.is_file():
            shutil.copy2(source, dest / name)
    encoder = json.loads((model_dir / "config.json").read_text()).get("volume_encoder")
    if encoder:  # the 3D encoder's folder (a cascade for evidence tokens) ships inside the model
        if (dest / encoder).exists():
            shutil.rmtree(dest / encoder)
        shutil.copytree(model_dir / encoder, dest / encoder)
    results = json.loads(results_path.read_text())
    summaries = []
    for folder in (stage1_dir, model_dir):
        if folder is not None and (folder / "training_summary.json").is_file():
            summaries.append(json.loads((folder / "training_summary.json").read_text()))
    check = write_check_and_results(dest, recipe, results)
    (dest / "README.md").write_text(write_card(dest, recipe, results, timings, command, summaries, check))
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="trained (stage-2) model folder")
    parser.add_argument("--stage1", type=Path, help="stage-1 folder (for its training summary)")
    parser.add_argument("--recipe", required=True, type=Path)
    parser.add_argument("--results", required=True, type=Path, help="tghmoe eval JSON on the held-out seeds")
    parser.add_argument("--dest", required=True, type=Path)
    parser.add_argument("--command", default="scripts/train_demo.sh")
    parser.add_argument("--stage1-seconds", type=float, default=0.0)
    parser.add_argument("--stage2-seconds", type=float, default=0.0)
    parser.add_argument("--hardware", default="CPU")
    parser.add_argument("--stage1-note", default="", help="how stage 1 was run when it took several commands")
    parser.add_argument("--chosen", default="", help="how this model was chosen among candidates, and on which data")
    parser.add_argument(
        "--refresh", action="store_true",
        help="--dest is a shipped model whose 3D encoder changed: re-run its check, rewrite its numbers (--model unused)",
    )
    parser.add_argument("--note", default="", help="with --refresh: a paragraph on what changed")
    args = parser.parse_args(argv)
    if args.refresh:
        refresh_evaluation(args.dest, args.recipe, args.results, args.note)
        print(f"refreshed {args.dest}", file=sys.stderr)
        return 0
    if args.model is None:
        parser.error("--model is required (unless --refresh)")
    timings = {
        "stage1_s": args.stage1_seconds, "stage2_s": args.stage2_seconds, "hardware": args.hardware,
        "stage1_note": args.stage1_note, "chosen": args.chosen,
    }
    dest = package(args.model, args.recipe, args.results, args.dest, args.command, timings, args.stage1)
    print(f"wrote {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
