"""What the likelihood readout of multiple-choice questions costs: ranked options vs free letters.

``InferenceEngine.rank_choices`` adds one teacher-forced forward per option after the generation.
This times a closed question answered both ways, interleaved (free, ranked, free, ranked...), on
two models:
- the bundled demo model (its 3D evidence read once beforehand, as the chat does after the first
  question about a scan);
- the mid-size random Qwen2.5-VL of ``bench_model.py`` (1024 vision patches, 256 video tokens).

Usage::

    .venv/bin/python benchmarks/bench_choices.py [--rounds 9] [--docs docs/benchmarks.md]

``--docs`` replaces the ``## Multiple-choice readout`` section of that file.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import BENCH_GRID, interleaved, mid_size_base_model, replace_section  # noqa: E402

QUESTION = "Which organ holds the abnormality? Choices: A. liver B. spleen C. kidney D. lymph node"
SECTION = "## Multiple-choice readout"


def _engines(threads: int):
    import torch

    from napari_tghmoe._resources import demo_model_path
    from napari_tghmoe.engine import InferenceEngine
    from napari_tghmoe.model.modeling import adapt_2d_mllm
    from napari_tghmoe.model.preprocess import prepare_volume
    from napari_tghmoe.model.tokenizer import DEFAULT_CORPUS, build_tokenizer
    from napari_tghmoe.phantom import make_phantom

    torch.set_grad_enabled(False)
    torch.set_num_threads(threads)
    demo = InferenceEngine.from_pretrained(demo_model_path(), device="cpu", quantization="none")
    phantom = make_phantom(100001, "abdomen", spacing=(2.5, 1.5, 1.5))
    demo_inputs = demo.prepare(phantom.volume)  # segments once; the timed calls reuse it

    mid = adapt_2d_mllm(copy.deepcopy(mid_size_base_model()), {"volume_grid": list(BENCH_GRID), "experts_per_group": 4})
    mid.eval()
    mid_engine = InferenceEngine(mid, build_tokenizer(DEFAULT_CORPUS, vocab_size=512))
    ct = np.random.default_rng(0).normal(0, 400, (60, 256, 256)).astype(np.float32)
    mid_inputs = prepare_volume(ct, (2.0, 0.8, 0.8), mid.config)
    return {"bundled demo model": (demo, demo_inputs), "mid-size random model": (mid_engine, mid_inputs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens the free answer may take")
    parser.add_argument("--docs", type=Path)
    args = parser.parse_args(argv)

    rows = ["| model | free letter, median CPU s | ranked options, median CPU s | ratio ranked / free (baseline) |", "|---|---:|---:|---:|"]
    for name, (engine, inputs) in _engines(args.threads).items():

        def ask(ranked: bool, engine=engine, inputs=inputs):
            engine.ranks_choices = ranked
            return engine.ask(inputs, QUESTION, max_new_tokens=args.new_tokens, trace=False)

        times = interleaved({"free": lambda: ask(False), "ranked": lambda: ask(True)}, args.rounds)
        free, ranked = statistics.median(times["free"]), statistics.median(times["ranked"])
        rows.append(f"| {name} | {free:.4f} | {ranked:.4f} | {ranked / free:.2f}x |")
    table = "\n".join(rows)
    print(table)
    if args.docs:
        write_docs(args.docs, table, args)
    return 0


def write_docs(path: Path, table: str, args: argparse.Namespace) -> None:
    import torch

    section = f"""{SECTION}

`InferenceEngine.rank_choices` answers a multiple-choice question with the option the model
finds most likely: one teacher-forced forward per option after the free answer is generated
(docs/results.md, issue 15). Cost per closed question, free letter (the baseline) against ranked
options, four options, at most {args.new_tokens} free tokens, CPU seconds of this process
(`time.process_time`, {args.threads} torch thread), median of {args.rounds} interleaved rounds.
Machine: {platform.machine()} CPU, 2 cores shared with other jobs, no GPU; torch {torch.__version__}.
Command: `.venv/bin/python benchmarks/bench_choices.py --docs docs/benchmarks.md`. Date: {_dt.date.today().isoformat()}.

{table}
"""
    replace_section(path, SECTION, section)

if __name__ == "__main__":
    sys.exit(main())
