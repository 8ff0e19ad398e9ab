"""The optimisation loop pre-training and fine-tuning share, in the house pattern of
``napari_tghmoe.train.trainer``: ``accelerate`` (CPU or GPUs), AdamW, warm-up then cosine,
gradient clipping, a tqdm bar, a JSONL log, ``accelerator.save_state`` checkpoints with
``trainer_state.json``, exact resume (the crops of step ``s`` come from a generator seeded with
``(seed, phase, s)``, not from a stream that would have to be replayed).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

LOG_NAME = "train_log.jsonl"
from napari_tghmoe.train.trainer import STATE_NAME, _trim_log, checkpoint_dirs  # one checkpoint layout for both trainers
SUMMARY_NAME = "training_summary.json"
_PHASE_IDS = {"pretrain": 1, "finetune": 2, "verify": 3}


@dataclass
class LoopResult:
    out_dir: Path
    phase: str
    steps_done: int
    total_steps: int
    seconds: float
    last_log: dict[str, Any] = field(default_factory=dict)
    finished: bool = True


def run_loop(
    model: Any,
    settings: Any,
    out_dir: Path,
    *,
    phase: str,
    seed: int,
    step_fn: Callable[[Any, np.random.Generator], dict[str, Any]],
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    summary: dict[str, Any] | None = None,
) -> LoopResult:
    """Train ``model`` for ``settings.steps``; ``step_fn(model, rng)`` returns losses ("total" is optimised)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from napari_tghmoe.train.trainer import lr_lambda

    threads = os.environ.get("TGHMOE_TRAIN_THREADS")
    if threads:  # on a shared CPU one or two threads beat oversubscribed cores
        torch.set_num_threads(int(threads))
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="no", cpu=not cuda)
    phase_id = _PHASE_IDS[phase]
    set_seed(seed + 1000 * phase_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    start_step = 0
    log_path = out_dir / LOG_NAME
    if resume:
        found = checkpoint_dirs(out_dir)
        if found:
            accelerator.load_state(str(found[-1]))
            state = json.loads((found[-1] / STATE_NAME).read_text())
            if state.get("phase") != phase:
                raise ValueError(f"{found[-1]}: a {state.get('phase')} checkpoint, not {phase}")
            start_step = int(state["step"])
            _trim_log(log_path, start_step)
    elif log_path.exists():
        log_path.unlink()

    total = settings.steps
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start_step, desc=phase, unit="step", dynamic_ncols=True)
    started = time.perf_counter()
    last_log: dict[str, Any] = {}
    done = start_step
    finished = True
    unwrapped = accelerator.unwrap_model(model)
    for step in range(start_step, total):
        rng = np.random.default_rng([seed, phase_id, step])
        losses = step_fn(unwrapped, rng)
        accelerator.backward(losses["total"])
        grad_norm = None
        if settings.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done = step + 1
        values = {k: round(float(v.detach() if hasattr(v, "detach") else v), 5) for k, v in losses.items()}
        if done % settings.log_every == 0 or done == total or done == 1:
            entry = {
                "phase": phase,
                "step": done,
                "lr": scheduler.get_last_lr()[0],
                **values,
                "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
                "seconds": round(time.perf_counter() - started, 2),
            }
            last_log = entry
            with log_path.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{values['total']:.3f}")
        if done % settings.save_every == 0 or (stop_after is not None and done == stop_after):
            _save_checkpoint(accelerator, out_dir, phase, done, settings.keep_checkpoints, seed)
        if stop_after is not None and done >= stop_after and done < total:
            finished = False
            break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    if finished:
        unwrapped.save_pretrained(str(out_dir), safe_serialization=True)
        record = {
            **(summary or {}),
            "phase": phase,
            "steps": total,
            "resumed_from_step": start_step,
            "seconds_this_run": round(seconds, 1),
            "device": str(accelerator.device),
            "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in unwrapped.parameters()),
            "last_log": last_log,
        }
        (out_dir / SUMMARY_NAME).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return LoopResult(out_dir, phase, done, total, seconds, last_log, finished)


def _save_checkpoint(accelerator: Any, out_dir: Path, phase: str, step: int, keep: int, seed: int) -> None:
    target = out_dir / "checkpoints" / f"step-{step:07d}"
    accelerator.save_state(str(target), safe_serialization=True)
    state = {"phase": phase, "step": step, "seed": seed, "data_rng": "numpy default_rng([seed, phase, step])"}
    (target / STATE_NAME).write_text(json.dumps(state) + "\n")
    if keep > 0:
        for old in checkpoint_dirs(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
