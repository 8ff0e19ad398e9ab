"""Model benchmark: TGH-MoE cost vs the unadapted base, trace overhead, preprocessing, generation.

Ratios are measured in one run with the compared variants interleaved (A, B, A, B...), so the
varying load of a shared machine falls on both alike; medians are reported. The model is a
mid-size random Qwen2.5-VL (vision hidden 256, depth 8, patch 14 as the real one; LLM hidden
256, 4 layers) so the expert overhead is measured against a tower of realistic shape, not a
toy one. Usage::

    .venv/bin/python benchmarks/bench_model.py [--rounds 7] [--docs docs/benchmarks.md]

``--docs`` replaces the ``## Model`` section of that file (other sections are kept).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

BENCH_GRID = (8, 224, 224)  # -> video grid (4, 16, 16): 1024 vision patches, 256 LLM tokens


def mid_size_base_model(seed: int = 0):
    from napari_tghmoe.model.tiny import build_tiny_base_model

    return build_tiny_base_model(
        seed=seed, vocab_size=512, text_hidden=256, text_layers=4, vision_hidden=256, vision_depth=8, patch_size=14
    )


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """CPU seconds of each variant, once per round, in turn; one untimed warm-up call each first.

    CPU time (``time.process_time``, all threads of this process) rather than wall time: on a
    machine shared with other jobs, wall time mostly measures the others; with one torch thread
    CPU time is what this code costs.
    """
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.process_time()
            run()
            times[name].append(time.process_time() - start)
    return times


def wall_times(run: Callable[[], object], rounds: int) -> list[float]:
    run()
    result = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        result.append(time.perf_counter() - start)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--docs", type=Path, help="write the table into this markdown file's '## Model' section")
    args = parser.parse_args(argv)

    import torch

    from napari_tghmoe.engine import InferenceEngine
    from napari_tghmoe.model.modeling import adapt_2d_mllm
    from napari_tghmoe.model.preprocess import prepare_volume
    from napari_tghmoe.model.tokenizer import DEFAULT_CORPUS, build_tokenizer

    torch.set_grad_enabled(False)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    tokenizer = build_tokenizer(DEFAULT_CORPUS, vocab_size=512)

    base = mid_size_base_model()
    moe = {"volume_grid": list(BENCH_GRID), "experts_per_group": 4, "router_top_k": 2}
    tgh = adapt_2d_mllm(copy.deepcopy(base), moe)  # default MoE blocks: the deepest quarter
    tgh_all = adapt_2d_mllm(copy.deepcopy(base), {**moe, "moe_blocks": list(range(8))})
    for model in (base, tgh, tgh_all):
        model.eval()
    config = tgh.config

    ct = rng.normal(0, 400, (60, 256, 256)).astype(np.float32)
    inputs = prepare_volume(ct, (2.0, 0.8, 0.8), config)
    pixels, grid = inputs.pixel_values_videos, inputs.video_grid_thw
    engine = InferenceEngine(tgh, tokenizer)
    prompt = engine.build_inputs("Is there a nodule in the left lung?", inputs.num_video_tokens)
    forward_kwargs = {
        "input_ids": prompt.input_ids,
        "attention_mask": prompt.attention_mask,
        "mm_token_type_ids": prompt.mm_token_type_ids,
        "text_guidance_mask": prompt.text_guidance_mask,
        **inputs.model_kwargs(),
    }
    base_kwargs = {k: v for k, v in forward_kwargs.items() if k != "text_guidance_mask"}

    def traced_forward():
        with tgh.record_routing() as recorder:
            tgh(**forward_kwargs)
        assert recorder.trace is not None

    rows: list[tuple[str, str, str, str, str]] = []

    # 1. vision tower alone
    tower = interleaved(
        {
            "base": lambda: base.model.visual(pixels, grid_thw=grid),
            "tgh": lambda: tgh.model.visual(pixels, grid_thw=grid),
            "tgh_all": lambda: tgh_all.model.visual(pixels, grid_thw=grid),
        },
        args.rounds,
    )
    # 2. full prefill forward (text routing + vision + LLM), and trace recording
    prefill = interleaved(
        {
            "base": lambda: base(**base_kwargs),
            "tgh": lambda: tgh(**forward_kwargs),
            "tgh_traced": traced_forward,
        },
        args.rounds,
    )
    times = {f"tower_{k}": v for k, v in tower.items()}
    times.update({f"prefill_{k}": v for k, v in prefill.items()})

    def row(name: str, key: str, reference: str | None, target: str) -> tuple[str, str, str, str]:
        med, best = statistics.median(times[key]), min(times[key])
        if reference is None:
            return (name, f"{med:.4f}", f"{best:.4f}", "1.00x (baseline)", target)
        ratio_med = med / statistics.median(times[reference])
        ratio_best = best / min(times[reference])
        return (name, f"{med:.4f}", f"{best:.4f}", f"{ratio_med:.3f}x / {ratio_best:.3f}x", target)

    n_moe = len(config.moe_blocks)
    rows += [
        row("vision tower, unadapted base", "tower_base", None, "baseline"),
        row(f"vision tower, TGH-MoE ({n_moe} of 8 blocks, 4 experts/group, top-2)", "tower_tgh", "tower_base", "<= 1.15x"),
        row("vision tower, TGH-MoE in all 8 blocks", "tower_tgh_all", "tower_base", "(stress case)"),
        row("prefill forward, unadapted base", "prefill_base", None, "baseline"),
        row("prefill forward, TGH-MoE", "prefill_tgh", "prefill_base", "<= 1.15x"),
        row("prefill forward, TGH-MoE + trace recording (vs TGH-MoE)", "prefill_tgh_traced", "prefill_tgh", "<= 1.05x"),
    ]

    # 3. prepare_volume on a 300 x 512 x 512 int16 volume, default 32 x 252 x 252 grid, all threads
    big = rng.integers(-1024, 2000, (300, 512, 512), dtype=np.int16)
    from napari_tghmoe.model.configuration import TGHMoEConfig
    from napari_tghmoe.model.tiny import tiny_base_config

    qwen_like = TGHMoEConfig.from_base_config(tiny_base_config(patch_size=14))
    torch.set_num_threads(default_threads)
    prep_cpu = interleaved({"prep": lambda: prepare_volume(big, (1.0, 0.7, 0.7), qwen_like)}, args.rounds)["prep"]
    prep_wall = wall_times(lambda: prepare_volume(big, (1.0, 0.7, 0.7), qwen_like), args.rounds)
    torch.set_num_threads(args.threads)
    rows.append(
        (
            f"prepare_volume 300x512x512 int16 -> {tuple(qwen_like.volume_grid)}, {default_threads} threads",
            f"{statistics.median(prep_cpu):.4f} CPU / {statistics.median(prep_wall):.4f} wall",
            f"{min(prep_cpu):.4f} CPU / {min(prep_wall):.4f} wall",
            "-",
            "< 1 s wall",
        )
    )

    # 4. generation through the engine (greedy, streamed, trace on)
    answers = []
    for _ in range(3):
        answers.append(
            engine.ask(
                inputs,
                "Is there a nodule in the left lung?",
                max_new_tokens=args.new_tokens,
                generation_options={"min_new_tokens": args.new_tokens},
            )
        )
    ttft = statistics.median(a.timings["time_to_first_token_s"] for a in answers)
    tps = statistics.median(a.timings["tokens_per_s"] for a in answers)
    rows.append(("engine: time to first token, wall s (prepared input)", f"{ttft:.4f} wall", "-", "-", "info"))
    rows.append((f"engine: decode speed, wall ({args.new_tokens} tokens, greedy)", "-", "-", f"{tps:.1f} tokens/s", "info"))
    peak = max(a.peak_memory for a in answers) / 2**20

    table = [
        "| measurement | median CPU s | best CPU s | ratio, median / best | target |",
        "|---|---:|---:|---:|---|",
    ]
    for cells in rows:
        table.append("| " + " | ".join(cells) + " |")
    text = "\n".join(table)
    print(text)
    print(f"\nprocess peak RSS {peak:.0f} MiB; torch threads {torch.get_num_threads()}")

    if args.docs:
        write_docs(args.docs, text, args, peak)
    return 0


def write_docs(path: Path, table: str, args: argparse.Namespace, peak_mib: float) -> None:
    import torch
    import transformers

    date = _dt.date.today().isoformat()
    section = f"""## Model

Machine: {platform.machine()} CPU, {args.threads} torch thread(s), shared with other
jobs, no GPU (the GPU rows, a Qwen2.5-VL-3B-shaped model in 4-bit vs bf16 on an H200, are in
"Real size" below). torch {torch.__version__}, transformers
{transformers.__version__}.

Model: a random mid-size Qwen2.5-VL (vision: hidden 256, depth 8, patch 14, window 112, as the
real tower's shape; LLM: hidden 256, 4 layers, vocab 512). TGH-MoE: 4 groups (shared, report,
vqa_closed, vqa_open) x 4 LoRA experts of rank 8, top-2 per group, in the default MoE blocks
(the deepest quarter: 2 of 8), plus LLM LoRA on q/v. Input: a 60 x 256 x 256 volume on the
{BENCH_GRID[0]} x {BENCH_GRID[1]} x {BENCH_GRID[2]} grid = 1024 vision patches, 256 LLM video
tokens. Each row: median and best of {args.rounds} rounds, compared variants interleaved; on a
shared machine (load average 6-8 on 2 cores during this run) wall time mostly measures the
other jobs, so times are CPU seconds of this process (`time.process_time`) with one torch
thread, which is what the code itself costs; wall time is given where the target is wall time.
Prefill = one full forward of the prompt (text routing + vision tower + LLM). The engine rows
are wall-clock, from `InferenceEngine.ask` on already prepared inputs ({args.new_tokens} new tokens, greedy, trace on);
process peak RSS {peak_mib:.0f} MiB.

Command: `.venv/bin/python benchmarks/bench_model.py --docs docs/benchmarks.md`. Date: {date}.

{table}
"""
    replace_section(path, "## Model", section)


def replace_section(path: Path, heading: str, section: str) -> None:
    """Put ``section`` (starting with ``heading``) in place of that section of ``path``, or at its end."""
    existing = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(existing):
        updated = pattern.sub(lambda _: section + "\n", existing, count=1)
    else:
        updated = existing.rstrip("\n") + "\n\n" + section
    path.write_text(updated.rstrip("\n") + "\n", encoding="utf-8")
    print(f"wrote the {heading[3:]} section of {path}")


if __name__ == "__main__":
    sys.exit(main())
