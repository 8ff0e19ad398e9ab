"""The real 3B size, measured: load time, peak memory, vision tower, time to first token, decode.

Builds Qwen2.5-VL-3B-Instruct's exact shape (``hf_layout.QWEN2_5_VL_3B``: 36 text layers of 2048,
vision depth 32 of 1280) with random bf16 weights in the Hugging Face folder layout (two shards +
index; values do not change speed or memory), converts it with ``tghmoe convert`` (experts only,
referring to the base), then for each precision starts a fresh process that loads it through
``InferenceEngine.from_pretrained`` (the chat dock's and ``tghmoe ask``'s path, the memory check
included) and answers one question about a 300 x 512 x 512 CT on the model's default grid
(32 x 256 x 256 -> 16 x 18 x 18 patches -> 1296 LLM video tokens). One process per precision so
each peak memory is its own. Measured: load seconds, peak memory (CPU: peak anonymous RSS, sampled,
and the kernel's VmHWM, which also counts the mmapped shards; CUDA: max allocated), the vision
tower's seconds inside the prefill, time to first token (preprocessing + vision + LLM prefill),
decode tokens/s, and beside it the physical limit: memory bandwidth / bytes of weights read per
token (decoder layers + the tied embedding as lm_head). Ratios are against fp32 of the same run.

    .venv/bin/python benchmarks/bench_real_size.py --precisions fp32,bf16,int8,nf4 --steps 16
    .venv/bin/python benchmarks/bench_real_size.py --device cuda --precisions bf16,int8,nf4 --steps 256

``--part vision`` times only the vision tower in fp32 (a bf16 load with the tower cast to fp32),
for a machine where the whole fp32 model does not fit. The 3B folders (7.5 GB) are kept in
``--work-dir`` between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

GIB = 1024**3
DEFAULT_WORK_DIR = Path("/tmp/tghmoe-bench-3b")
CT_SHAPE = (300, 512, 512)
CT_SPACING = (1.0, 0.7, 0.7)
QUESTION = "Is there a lesion in the liver?"
#: precision -> load options of InferenceEngine.from_pretrained (rest dtype: the device's default).
PRECISION_OPTIONS: dict[str, dict[str, Any]] = {
    "fp32": {"quantization": "none", "dtype": "float32"},
    "bf16": {"quantization": "none", "dtype": "bfloat16"},
    "int8": {"quantization": "8bit"},
    "nf4": {"quantization": "4bit"},
}


# --------------------------------------------------------------------------- folders


def ensure_folders(work_dir: Path) -> tuple[Path, Path, dict[str, float]]:
    """(base folder, converted folder, seconds spent building them); built once, then reused."""
    from napari_tghmoe.model.convert import convert_checkpoint
    from napari_tghmoe.model.hf_layout import QWEN2_5_VL_3B, build_hf_layout_folder

    base, converted = work_dir / "Qwen2.5-VL-3B-random", work_dir / "tghmoe-3b"
    spent: dict[str, float] = {}
    if not (base / ".complete").is_file():
        start = time.perf_counter()
        build_hf_layout_folder(base, QWEN2_5_VL_3B, max_shard_size="4GB", dtype="bfloat16")
        (base / ".complete").write_text("ok")
        spent["build_base_s"] = time.perf_counter() - start
    if not (converted / "tghmoe_base.json").is_file():
        start = time.perf_counter()
        convert_checkpoint(base, converted, overwrite=True)
        spent["convert_s"] = time.perf_counter() - start
    return base, converted, spent


# --------------------------------------------------------------------------- machine


def memory_bandwidth(device: str, gib: float = 1.0, repeats: int = 3) -> dict[str, float]:
    """GB/s: read (a sum over all threads / the GPU) and copy (numpy, one thread: read + write)."""
    import numpy as np
    import torch

    n = int(gib * GIB) // 4
    result: dict[str, float] = {}
    if device.startswith("cuda"):
        x = torch.ones(n, device=device)
        y = torch.empty_like(x)
        for name, run, moved in (("read_GBps", lambda: x.sum(), n * 4), ("copy_GBps", lambda: y.copy_(x), 2 * n * 4)):
            run()
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            result[name] = moved / best / 1e9
        return result
    a = np.ones(n, dtype=np.float32)
    b = np.empty_like(a)
    t = torch.from_numpy(a)
    for name, run, moved in (
        ("read_GBps", lambda: t.sum(), n * 4),
        ("copy_GBps", lambda: np.copyto(b, a), 2 * n * 4),
    ):
        run()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        result[name] = moved / best / 1e9
    return result


def machine() -> dict[str, Any]:
    import psutil
    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_GiB": psutil.virtual_memory().total / GIB,
        "available_GiB": psutil.virtual_memory().available / GIB,
        "torch": torch.__version__,
    }
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------- one precision (worker)


class RssSampler:
    """Peak anonymous resident memory (``RssAnon``), sampled: the memory the process really needs,
    without the page cache of mmapped weight files that VmHWM also counts."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def status(field: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.status("RssAnon"))
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.status("RssAnon"))


def synthetic_ct(shape: tuple[int, int, int] = CT_SHAPE):
    """A 300 x 512 x 512 int16 CT in HU: air outside an elliptic body of soft tissue, noise."""
    import numpy as np

    from napari_tghmoe.io import CTVolume

    z, y, x = shape
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) / (0.4 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1.0
    rng = np.random.default_rng(0)
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[:, body] = 40
    hu += rng.integers(-20, 20, size=shape, dtype=np.int16)
    return CTVolume(hu=hu, spacing=CT_SPACING, description="synthetic CT")


def llm_bytes_per_token(model: Any) -> int:
    """Bytes of weights a decode step reads: every decoder layer (as stored: 4-bit packed, int8,
    bf16...) + the lm_head matrix (the tied embedding); the embedding lookup reads one row."""
    language_model = model.model.language_model
    total = sum(p.numel() * p.element_size() for p in language_model.layers.parameters())
    total += sum(b.numel() * b.element_size() for b in language_model.layers.buffers())
    head = model.lm_head.weight
    return int(total + head.numel() * head.element_size())


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Load one precision, answer once, report the numbers (printed as one JSON line)."""
    import torch

    from napari_tghmoe.engine import InferenceEngine
    from napari_tghmoe.model.loading import ModelLoadError
    from napari_tghmoe.model.memory import check_fits

    precision, device = args.worker, args.device
    on_cuda = device.startswith("cuda")
    folder = Path(args.model)
    result: dict[str, Any] = {"precision": precision, "device": device, "load_avg_start": os.getloadavg()[0]}
    options = dict(PRECISION_OPTIONS["bf16" if args.part == "vision" else precision])
    fit = check_fits(folder, "bf16" if args.part == "vision" else precision, device)
    result["estimate_GiB"] = fit.needed_bytes / GIB
    result["available_GiB"] = None if fit.available_bytes is None else fit.available_bytes / GIB
    baseline_anon = RssSampler.status("RssAnon")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with RssSampler() as sampler:
        start = time.perf_counter()
        try:
            engine = InferenceEngine.from_pretrained(folder, device=device, hash_weights=False, **options)
        except ModelLoadError as err:
            result["refused"] = str(err).split(": ", 1)[-1]
            return result
        result["load_s"] = time.perf_counter() - start
        model = engine.model
        result["load_peak_anon_GiB"] = sampler.peak / GIB
        result["bytes_per_token"] = llm_bytes_per_token(model)

        ct = synthetic_ct(tuple(args.ct_shape))
        if args.part == "vision":
            model.model.visual.float()
            inputs = engine.prepare(ct)
            pixels = inputs.pixel_values_videos.to(device=model.device, dtype=torch.float32)
            grid = inputs.video_grid_thw.to(model.device)
            with torch.inference_mode():
                start = time.perf_counter()
                model.model.visual(pixels, grid_thw=grid)
                if on_cuda:
                    torch.cuda.synchronize()
                result["vision_s"] = time.perf_counter() - start
            result["precision"] = "fp32 (vision tower only)"
        else:
            vision_times: list[float] = []
            marks: dict[str, float] = {}

            def before(module: Any, inputs: Any) -> None:
                if on_cuda:
                    torch.cuda.synchronize()
                marks["start"] = time.perf_counter()

            def after(module: Any, inputs: Any, output: Any) -> None:
                if on_cuda:
                    torch.cuda.synchronize()
                vision_times.append(time.perf_counter() - marks["start"])

            hooks = [model.model.visual.register_forward_pre_hook(before), model.model.visual.register_forward_hook(after)]
            start = time.perf_counter()
            inputs = engine.prepare(ct)  # resample + windows + patches, as inside answer()
            preprocess_s = time.perf_counter() - start
            answer = engine.ask(
                inputs, QUESTION, max_new_tokens=args.steps, generation_options={"min_new_tokens": args.steps}
            )
            for hook in hooks:
                hook.remove()
            timings = answer.timings
            result["preprocess_s"] = preprocess_s
            result["vision_s"] = sum(vision_times)
            result["ttft_s"] = preprocess_s + timings["time_to_first_token_s"]
            result["decode_tok_s"] = timings["tokens_per_s"]
            result["n_tokens"] = timings["n_tokens"]
            result["video_tokens"] = inputs.num_video_tokens
    result["peak_anon_GiB"] = sampler.peak / GIB
    result["baseline_anon_GiB"] = baseline_anon / GIB
    result["vm_hwm_GiB"] = RssSampler.status("VmHWM") / GIB
    if on_cuda:
        result["gpu_peak_GiB"] = torch.cuda.max_memory_allocated(device) / GIB
    result["load_avg_end"] = os.getloadavg()[0]
    return result


# --------------------------------------------------------------------------- driver


def run_precision(precision: str, args: argparse.Namespace, model: Path, part: str = "all") -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", precision, "--model", str(model),
               "--device", args.device, "--steps", str(args.steps), "--part", part,
               "--ct-shape", ",".join(str(v) for v in args.ct_shape)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"precision": precision, "device": args.device, "error": " | ".join(tail) or f"exit {done.returncode}"}
    return json.loads(lines[-1])


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _memory(result: dict[str, Any]) -> float | None:
    """Peak memory that must be physically there: GPU max allocated, else the resident peak (VmHWM:
    anonymous memory + the mmapped weight pages, which a bf16 load reads in place)."""
    return result.get("gpu_peak_GiB", result.get("vm_hwm_GiB"))


def table(results: list[dict[str, Any]], bandwidth_GBps: float) -> str:
    """Markdown table with each value's ratio against fp32 of this run (value / fp32)."""
    base = next((r for r in results if r["precision"] == "fp32" and "load_s" in r), None)
    rows = [
        "| precision | load s | peak memory GiB: resident (anon) [estimate] | vision s | TTFT s | decode tok/s | "
        "weights read/token GiB | limit tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ratio(value: float | None, reference: float | None) -> str:
        return f" ({value / reference:.2f}x)" if value and reference and base is not None else ""

    def cell(result: dict[str, Any], key: str, digits: int = 1) -> str:
        value = result.get(key)
        if value is None:
            return "-"
        return _fmt(value, digits) + (ratio(value, base.get(key)) if base is not None and base is not result else "")

    for r in results:
        if "error" in r or "refused" in r:
            status = "refused by the memory check" if "refused" in r else "failed"
            rows.append(f"| {r['precision']} | {status}: {r.get('refused') or r.get('error')} |" + " |" * 6)
            continue
        memory = _memory(r)
        memory_text = "-"
        if memory is not None:
            memory_text = f"{memory:.1f}"
            if base is not None and base is not r:
                memory_text += ratio(memory, _memory(base))
            if r.get("peak_anon_GiB") is not None and "gpu_peak_GiB" not in r:
                memory_text += f" ({r['peak_anon_GiB']:.1f})"
            if r.get("estimate_GiB"):
                memory_text += f" [{r['estimate_GiB']:.1f}]"
        per_token = r.get("bytes_per_token")
        limit = bandwidth_GBps * 1e9 / per_token if per_token else None
        rows.append(
            f"| {r['precision']} | {cell(r, 'load_s')} | {memory_text} | {cell(r, 'vision_s')} | "
            f"{cell(r, 'ttft_s')} | {cell(r, 'decode_tok_s', 2)} | "
            f"{_fmt(per_token / GIB if per_token else None)} | {_fmt(limit, 2)} |"
        )
    return "\n".join(rows)


def merged_table(files: list[Path]) -> str:
    """One table from several runs: fp32 first (the baseline), the best bandwidth measured."""
    order = list(PRECISION_OPTIONS)
    runs = [json.loads(Path(f).read_text()) for f in files]
    results = [r for run in runs for r in run["results"]]
    results.sort(key=lambda r: order.index(r["precision"]) if r["precision"] in order else len(order))
    bandwidth = max(run["bandwidth"]["read_GBps"] for run in runs)
    loads = [r.get(k) for r in results for k in ("load_avg_start", "load_avg_end") if r.get(k) is not None]
    note = f"read bandwidth {bandwidth:.1f} GB/s (best of the runs); load average {min(loads):.1f}-{max(loads):.1f}"
    return table(results, bandwidth) + "\n\n" + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="fp32,bf16,int8,nf4", help="comma-separated: fp32,bf16,int8,nf4")
    parser.add_argument("--steps", type=int, default=16, help="decode tokens per answer")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="where the 3B folders are kept")
    parser.add_argument("--part", choices=["all", "vision"], default="all", help="vision: the tower alone, fp32")
    parser.add_argument("--ct-shape", type=lambda s: [int(v) for v in s.split(",")], default=list(CT_SHAPE))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per precision")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--merge", type=Path, nargs="+", metavar="JSON",
        help="print one table from the --json files of earlier runs (one precision each, to keep a run short)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        import warnings

        warnings.simplefilter("ignore")
        print(json.dumps(run_worker(args)), flush=True)
        return 0

    if args.merge:
        print(merged_table(args.merge))
        return 0
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    _, converted, spent = ensure_folders(args.work_dir)
    about = machine()
    bandwidth = memory_bandwidth(args.device)
    print(f"machine: {about}", file=sys.stderr)
    print(f"memory bandwidth ({args.device}): {bandwidth}", file=sys.stderr)
    if spent:
        print(f"folders: {spent}", file=sys.stderr)
    results = []
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        if precision not in PRECISION_OPTIONS:
            parser.error(f"unknown precision {precision!r}")
        result = run_precision(precision, args, converted, args.part)
        print(json.dumps(result), file=sys.stderr, flush=True)
        results.append(result)
    print(table(results, bandwidth["read_GBps"]))
    if args.json:
        args.json.write_text(json.dumps({"machine": about, "bandwidth": bandwidth, "folders": spent,
                                         "steps": args.steps, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
