"""Decode overhead: the chat's path (``InferenceEngine.ask``) against a plain ``model.generate``.

Why: on an NVIDIA H200 the bundled demo model decoded at 14-21 tokens/s in bf16 and the 3B shape
at 12 tokens/s (docs/benchmarks.md), while the weights a token reads allow hundreds: decoding is
bound by the host, not the GPU. This script separates what the engine adds (streamer thread,
stop criteria, routing trace, text guidance) from what ``generate`` and the model cost, per
dtype, and with ``--profile`` writes torch's operator table of one short decode (kernel launches,
copies, syncs) so the next change can be aimed. The baseline of each row is the plain
``generate`` of the same dtype in the same run. One question about one full-size phantom; the
prompt and the 3D evidence are prepared once, outside the timings.

    .venv/bin/python benchmarks/bench_decode.py --device cuda --dtypes bfloat16,float32 --profile prof.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

QUESTION = "Generate a report for this CT."


def _synchronise(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_generate_kwargs(engine: Any, inputs: Any, device: str) -> dict[str, Any]:
    """What ``InferenceEngine.answer`` hands to ``generate``, minus its streamer and stop criteria."""
    prompt = engine.build_inputs(QUESTION, inputs.num_video_tokens, (), None, getattr(inputs, "evidence_words", ""))
    kwargs = {
        "input_ids": prompt.input_ids.to(device),
        "attention_mask": prompt.attention_mask.to(device),
        "mm_token_type_ids": prompt.mm_token_type_ids.to(device),
        **inputs.model_kwargs(device=device),
        **engine.volume_kwargs(inputs, device),
    }
    if engine.accepts_text_guidance:
        kwargs["text_guidance_mask"] = prompt.text_guidance_mask.to(device)
    return kwargs


def measure(model: str, device: str, dtype: str, tokens: int, rounds: int, profile: Path | None) -> dict[str, float]:
    """Tokens/s of the engine (trace on / off) and of plain ``generate``, median of ``rounds``."""
    import torch

    from napari_tghmoe.engine import InferenceEngine
    from napari_tghmoe.phantom import make_phantom

    engine = InferenceEngine.from_pretrained(model, device=device, dtype=dtype)
    volume = make_phantom(seed=100000, region="chest", spacing=(2.5, 1.5, 1.5)).volume
    inputs = engine.prepare(volume)
    engine.ask(inputs, QUESTION, max_new_tokens=8)  # warm-up: kernels, allocator, cuBLAS handles
    fixed = {"max_new_tokens": tokens, "generation_options": {"min_new_tokens": tokens}}
    kwargs = plain_generate_kwargs(engine, inputs, device)

    def plain() -> None:
        with torch.inference_mode():
            engine.model.generate(
                **kwargs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                pad_token_id=engine.tokenizer.pad_token_id,
            )

    variants = {
        "generate": plain,
        "engine, trace on": lambda: engine.ask(inputs, QUESTION, trace=True, **fixed),
        "engine, trace off": lambda: engine.ask(inputs, QUESTION, trace=False, **fixed),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            _synchronise(device)
            start = time.perf_counter()
            run()
            _synchronise(device)
            seconds[name].append(time.perf_counter() - start)
    if profile is not None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            plain()
        averages = prof.key_averages()
        profile.write_text(
            f"# {dtype} on {device}, one plain generate of {tokens} tokens\n\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=30) + "\n\n"
            + averages.table(sort_by="count", row_limit=20) + "\n",
            encoding="utf-8",
        )
    return {name: tokens / statistics.median(values) for name, values in seconds.items()}


def table(results: dict[str, dict[str, float]]) -> str:
    rows = ["| dtype | path | tokens/s | vs plain generate |", "|---|---|---:|---:|"]
    for dtype, per_path in results.items():
        base = per_path["generate"]
        for path, rate in per_path.items():
            rows.append(f"| {dtype} | {path} | {rate:.1f} | {rate / base:.2f}x |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resources/demo-model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="write the operator table of one bf16/first-dtype decode here")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    results = {}
    for i, dtype in enumerate(dtypes):
        profile = args.profile if i == 0 else None
        results[dtype] = measure(args.model, args.device, dtype, args.tokens, args.rounds, profile)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
