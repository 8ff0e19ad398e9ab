"""Two-stage TGH-MoE training on ``accelerate``.

One code path for a laptop CPU and for several GPUs (``accelerate launch``):
``Accelerator(gradient_accumulation_steps=..., mixed_precision="bf16" on GPU / "no" on CPU)``,
AdamW, warm-up then cosine / linear decay, gradient clipping, a tqdm bar on the main process,
a JSONL log per optimiser step (loss components and expert utilisation), and checkpoints
(``accelerator.save_state`` with safetensors weights, plus ``trainer_state.json``).

Why resuming is exact: the samples of step ``s`` are drawn from a generator seeded with
``(seed, stage, s, micro-batch, process)``, not from a stream that would have to be replayed,
and the model, optimiser and schedule come back from the checkpoint. A run killed after a
checkpoint and resumed therefore ends where an unbroken run ends (up to float reordering).

Stage 1 trains what ``set_stage(model, 1)`` opens (shared experts, merger, LLM LoRA), stage 2
starts from the stage-1 folder (``init``) and trains task experts and routers. A base trained
from scratch (the demo: no pretrained VLM exists offline) may also open base parts in stage 1
with ``also_train``; a real Qwen2.5-VL base stays frozen.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from napari_tghmoe.train.recipe import Recipe, RecipeError, StageSettings

LOG_NAME = "train_log.jsonl"
STATE_NAME = "trainer_state.json"
SUMMARY_NAME = "training_summary.json"

#: Base parts a from-scratch model may train in stage 1 (``StageSettings.also_train``).
BASE_PARTS = {
    "vision": re.compile(r"^model\.visual\.(?!.*\.moe\.)(?!merger\.)"),
    "merger": re.compile(r"^model\.visual\.merger\.(?!lora_)"),
    "patch_embed": re.compile(r"^model\.visual\.patch_embed\."),
    "llm": re.compile(r"^model\.language_model\.layers\.(?!.*\.lora_)"),
    "llm_norm": re.compile(r"^model\.language_model\.norm\."),
    "embeddings": re.compile(r"^model\.language_model\.embed_tokens\."),
    "lm_head": re.compile(r"^lm_head\."),
}


@dataclass
class TrainResult:
    """What a finished (or stopped) stage left behind."""

    out_dir: Path
    stage: int
    steps_done: int
    total_steps: int
    seconds: float
    trainable: dict[str, int]
    last_log: dict[str, Any] = field(default_factory=dict)
    finished: bool = True


# --------------------------------------------------------------------------- model & tokenizer


def corpus_from_samples(samples: list[Any]) -> list[str]:
    """Texts the tokenizer should know: targets, prompts and every training phrasing."""
    from napari_tghmoe.model.prompts import REPORT_PROMPTS
    from napari_tghmoe.datasets import phrasings

    texts = {s.target for s in samples} | {s.prompt for s in samples}
    texts |= set(REPORT_PROMPTS) | set(phrasings.REPORT_TRAIN) | set(phrasings.QUESTION_TRAIN)
    return sorted(texts)


def build_tokenizer_for(recipe: Recipe, samples: list[Any]) -> Any:
    """The recipe's tokenizer: the base folder's, a folder, or a BPE trained on the corpus."""
    source = recipe.tokenizer.source
    if source == "build":
        from napari_tghmoe.model.tokenizer import build_tokenizer

        return build_tokenizer(corpus_from_samples(samples), vocab_size=recipe.tokenizer.vocab_size)
    from transformers import AutoTokenizer

    folder = recipe.model.base if source == "base" else source
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def build_model(
    recipe: Recipe, init: str | Path | None = None, tokenizer: Any = None, weights_from: str | Path | None = None
) -> Any:
    """Stage-1 model from the recipe (base folder or tiny shape, then ``adapt_2d_mllm``), or the
    TGH-MoE model saved in ``init`` (stage 2, or continuing). ``weights_from``: the folder whose
    matching tensors will be copied in (its tokenizer is ``tokenizer``): the embedding table then
    keeps that model's size, so no row is added for the volume placeholder."""
    import torch

    from napari_tghmoe.model.loading import OFFLINE_LOAD_KWARGS
    from napari_tghmoe.model.modeling import TGHMoEForConditionalGeneration, adapt_2d_mllm

    if init is not None:
        model = TGHMoEForConditionalGeneration.from_pretrained(str(init), dtype=torch.float32, **OFFLINE_LOAD_KWARGS)
        return _with_volume_encoder(model, recipe, tokenizer)
    if recipe.model.base:
        from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

        config = AutoConfig.from_pretrained(recipe.model.base, local_files_only=True)
        if getattr(config, "model_type", "") == "tghmoe_qwen2_5_vl":
            model = TGHMoEForConditionalGeneration.from_pretrained(
                recipe.model.base, dtype=torch.float32, **OFFLINE_LOAD_KWARGS
            )
            return _with_volume_encoder(model, recipe, tokenizer)
        base = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            recipe.model.base, dtype=torch.float32, **OFFLINE_LOAD_KWARGS
        )
        return _with_volume_encoder(adapt_2d_mllm(base, dict(recipe.model.moe)), recipe, tokenizer)
    from napari_tghmoe.model.tiny import build_tiny_base_model

    tiny = dict(recipe.model.tiny)
    if tokenizer is not None:
        if recipe.model.volume_encoder and "vocab_size" not in tiny and weights_from is None:
            from napari_tghmoe.model.volume_tokens import reserve_volume_token

            reserve_volume_token(tokenizer)  # a model built here gets a row for the placeholder
        tiny.setdefault("vocab_size", len(tokenizer))
    base = build_tiny_base_model(seed=recipe.seed, **tiny)
    torch.manual_seed(recipe.seed + 1)
    return _with_volume_encoder(adapt_2d_mllm(base, dict(recipe.model.moe)), recipe, tokenizer)


def _with_volume_encoder(model: Any, recipe: Recipe, tokenizer: Any) -> Any:
    """Attach the recipe's 3D encoder (a fresh projector) unless the model already has one; set
    the recipe's evidence settings on it (words' cut, copy bias; the model keeps its own otherwise)."""
    path = recipe.model.volume_encoder_path()
    has_encoder = bool(model.config.volume_encoder)
    if path is None and not has_encoder:
        return model
    settings = recipe.model.evidence_settings()
    for key, value in settings.items():  # an encoder attached below reads its cut from the config
        setattr(model.config, key, value)
    if has_encoder:
        if "volume_words_min_certainty" in settings:
            model.volume_encoder.words_min_certainty = settings["volume_words_min_certainty"]
        return model
    if tokenizer is None:
        raise RecipeError(f"{recipe.path}: attaching [model] volume_encoder needs the tokenizer")
    from napari_tghmoe.model.volume_tokens import VolumeEncoderError, attach_volume_encoder

    try:
        attach_volume_encoder(model, path, tokenizer, source=recipe.model.volume_token_source)
    except VolumeEncoderError as err:
        raise RecipeError(f"{recipe.path}: [model] volume_encoder: {err}") from None
    return model


def copy_matching_weights(model: Any, folder: str | Path) -> dict[str, list[str]]:
    """Copy every tensor of the TGH-MoE model in ``folder`` whose name and shape match ``model``.

    For ablations that change the adapters or the routing (dense LoRA, no text guidance) but
    start from the same trained base: what does not match stays as built. Returns the names
    copied and the names left as built.
    """
    import torch

    from napari_tghmoe.model.loading import OFFLINE_LOAD_KWARGS
    from napari_tghmoe.model.modeling import TGHMoEForConditionalGeneration

    source = TGHMoEForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32, **OFFLINE_LOAD_KWARGS)
    theirs = source.state_dict()
    copied, kept = [], []
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            other = theirs.get(name)
            if other is not None and other.shape == tensor.shape:
                tensor.copy_(other)
                copied.append(name)
            else:
                kept.append(name)
    return {"copied": copied, "kept": kept}


def open_parameters(model: Any, stage: int, settings: StageSettings) -> dict[str, int]:
    """``set_stage`` plus the recipe's ``also_train`` base parts; returns trainable counts."""
    from napari_tghmoe.model.modeling import set_stage

    counts = set_stage(model, stage)
    extra = 0
    for part in settings.also_train:
        if part not in BASE_PARTS:
            raise RecipeError(f"also_train: unknown part {part!r} (known: {', '.join(BASE_PARTS)})")
    patterns = [BASE_PARTS[p] for p in settings.also_train]
    for name, param in model.named_parameters():
        if not param.requires_grad and any(p.search(name) for p in patterns):
            param.requires_grad_(True)
            extra += param.numel()
    counts["base_opened"] = extra
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


# --------------------------------------------------------------------------- data


def load_training_samples(recipe: Recipe) -> list[Any]:
    from napari_tghmoe.datasets import load_dataset_spec

    samples = []
    for spec in recipe.data.train:
        samples.extend(
            load_dataset_spec(
                spec, task=recipe.data.tasks, phrasing=recipe.data.phrasing, cache_dir=recipe.data.cache_dir, seed=recipe.seed
            )
        )
    if not samples:
        raise RecipeError(f"{recipe.path}: the training data specs gave no samples")
    return samples


def preload_volumes(samples: list[Any]) -> None:
    """Read each distinct volume file once and share the ``CTVolume`` between its samples.

    A phantom gives a report and several questions on one volume; reading it once keeps a
    training step to a forward and a backward.
    """
    from napari_tghmoe.datasets import load_sample_volume

    loaded: dict[str, Any] = {}
    for sample in samples:
        if isinstance(sample.volume, (str, Path)):
            key = str(sample.volume)
            if key not in loaded:
                loaded[key] = load_sample_volume(sample)
            sample.volume = loaded[key]


class TaskSampler:
    """Deterministic micro-batches: step, micro-batch and process fix the draw (resume-safe)."""

    def __init__(self, samples: list[Any], weights: dict[str, float], seed: int, stage: int) -> None:
        self.pools: dict[str, list[Any]] = {}
        for sample in samples:
            self.pools.setdefault(sample.task, []).append(sample)
        self.tasks = sorted(self.pools)
        raw = [float(weights.get(t, len(self.pools[t]))) if weights else float(len(self.pools[t])) for t in self.tasks]
        if sum(raw) <= 0:
            raise RecipeError("task_weights must give some task a positive weight")
        self.probs = [w / sum(raw) for w in raw]
        self.seed = seed
        self.stage = stage

    def draw(self, step: int, micro: int, batch_size: int, process: int = 0) -> list[Any]:
        import numpy as np

        rng = np.random.default_rng([self.seed, self.stage, step, micro, process])
        chosen = []
        for _ in range(batch_size):
            task = self.tasks[int(rng.choice(len(self.tasks), p=self.probs))]
            pool = self.pools[task]
            chosen.append(pool[int(rng.integers(len(pool)))])
        return chosen


class _CollateConfig:
    """The model config as ``collate`` sees it: a model without task groups (dense ablation)
    still gets task labels computed against the default names, then dropped."""

    def __init__(self, config: Any) -> None:
        self._config = config
        names = list(getattr(config, "group_names", None) or [])
        self.has_task_groups = len(names) > 1
        from napari_tghmoe.model.prompts import DEFAULT_GROUP_NAMES

        self.group_names = names if self.has_task_groups else list(DEFAULT_GROUP_NAMES)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def make_batch(
    samples: list[Any],
    tokenizer: Any,
    collate_config: _CollateConfig,
    max_length: int | None,
    zero_image: bool = False,
    volume_features: Any = None,
    faithful_reports: bool = False,
    faithful_answers: bool = False,
) -> dict:
    from napari_tghmoe.train.collate import collate

    batch = collate(
        samples,
        tokenizer,
        collate_config,
        max_length=max_length,
        zero_image=zero_image,
        volume_features=volume_features,
        faithful_reports=faithful_reports,
        faithful_answers=faithful_answers,
    )
    if not collate_config.has_task_groups:
        batch.pop("task_labels", None)
    return batch


def per_sample_lm_loss(logits: Any, labels: Any) -> Any:
    """Next-token cross-entropy averaged within each sample, then over samples.

    The stock loss averages over all target tokens of the batch, so a 150-token report
    outweighs a closed answer whose one informative token is the letter; here every sample
    counts the same.
    """
    import torch.nn.functional as F

    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:].to(shifted_logits.device)
    losses = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shifted_labels.shape)
    counts = (shifted_labels != -100).sum(1)
    has_target = counts > 0
    per_sample = losses.sum(1)[has_target] / counts[has_target]
    return per_sample.mean()


# --------------------------------------------------------------------------- schedule & state


def lr_lambda(settings: StageSettings):
    """Linear warm-up, then cosine or linear decay to ``min_lr_ratio`` (or constant)."""
    total = max(1, settings.steps)
    warmup = max(0, min(settings.warmup_steps, total - 1))
    floor = settings.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if settings.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if settings.schedule == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


#: The vision-probe heads of a checkpoint (napari_tghmoe.train.vision_probe), safetensors.
PROBE_NAME = "vision_probe.safetensors"


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Completed checkpoints (they hold ``trainer_state.json``), oldest first."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and (d / STATE_NAME).is_file()]
    return sorted(found, key=lambda d: json.loads((d / STATE_NAME).read_text())["step"])


def _trim_log(log_path: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the killed run's tail)."""
    if not log_path.is_file():
        return
    kept = [line for line in log_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    log_path.write_text("".join(line + "\n" for line in kept))


def _utilisation(model: Any, batch: dict) -> dict[str, list[float]]:
    """Mean gate weight per expert and block on one batch (recorded without gradients)."""
    import torch

    with torch.no_grad(), model.record_routing() as recorder:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    trace = recorder.trace
    if trace is None:
        return {}
    return {str(b): [round(float(v), 4) for v in trace.utilisation(b)] for b in trace.blocks}


# --------------------------------------------------------------------------- training


def train(
    recipe: Recipe,
    stage: int,
    out_dir: str | Path,
    *,
    init: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    samples: list[Any] | None = None,
    init_weights: str | Path | None = None,
) -> TrainResult:
    """Run one stage of ``recipe`` into ``out_dir`` (model folder + log + checkpoints).

    ``init``: the folder to start from (stage 2: the stage-1 output; required there).
    ``resume``: continue from the latest checkpoint in ``out_dir/checkpoints``.
    ``init_weights``: build the model from the recipe, then copy in the matching tensors of this
    TGH-MoE folder (ablations from a common trained base; see :func:`copy_matching_weights`).
    ``stop_after``: stop once this optimiser step is done and checkpointed (as if the process
    were killed there; used to test resuming). ``samples``: training samples (default: the
    recipe's ``[data]``).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    settings = recipe.stage(stage)
    threads = os.environ.get("TGHMOE_TRAIN_THREADS")
    if threads:  # on a shared CPU one thread per process beats oversubscribed cores
        torch.set_num_threads(int(threads))
    if stage == 2 and init is None and init_weights is None:
        raise RecipeError("stage 2 starts from the stage-1 output: give init (--init DIR or --init-weights DIR)")
    out_dir = Path(out_dir)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        mixed_precision="bf16" if cuda else "no",
        cpu=not cuda,
    )
    set_seed(recipe.seed + 1000 * stage)
    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    if samples is None:
        samples = load_training_samples(recipe)
    if recipe.data.preload:
        preload_volumes(samples)
    if init is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(init), local_files_only=True)
    elif init_weights is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(init_weights), local_files_only=True)
    else:
        tokenizer = build_tokenizer_for(recipe, samples)
    model = build_model(recipe, init=init, tokenizer=tokenizer, weights_from=init_weights)
    if init is None:  # a new model is trained on its data's intensities (HU or [0, 1]); stage 2 keeps stage 1's
        from napari_tghmoe.datasets import samples_intensity

        model.config.input_intensity = samples_intensity(samples)
    weights_from = None
    if init_weights is not None and init is None:
        weights_from = copy_matching_weights(model, init_weights)
        weights_from = {"folder": str(init_weights), "copied": len(weights_from["copied"]), "kept": weights_from["kept"]}
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    counts = open_parameters(model, settings.trainable_stage or stage, settings)
    if counts["trainable"] == 0:
        raise RecipeError(f"stage {stage}: nothing to train for this model (trainable parameter count is 0)")
    model.train()

    probe = None
    if settings.vision_probe_coef > 0:
        from napari_tghmoe.train.vision_probe import make_probe

        vision = model.config.vision_config
        probe = make_probe(int(vision.out_hidden_size), int(vision.spatial_merge_size) ** 2).to(accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if probe is not None:
        params += list(probe.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    model, optimizer = accelerator.prepare(model, optimizer)
    # The schedule counts optimiser steps itself (one per step on every process), so it is not
    # wrapped by accelerate (which would scale it by the number of processes); it is saved with it.
    accelerator.register_for_checkpointing(scheduler)
    probe_loss = None
    if probe is not None:
        from napari_tghmoe.train.vision_probe import VisionProbeLoss

        accelerator.register_for_checkpointing(probe)
        probe_loss = VisionProbeLoss(
            accelerator.unwrap_model(model),
            probe,
            presence=settings.vision_probe_presence,
            dense=settings.vision_probe_dense,
            hardest=settings.vision_probe_hardest,
        )

    start_step = 0
    log_path = out_dir / LOG_NAME
    if resume:
        found = checkpoint_dirs(out_dir)
        if found:
            accelerator.load_state(str(found[-1]))
            state = json.loads((found[-1] / STATE_NAME).read_text())
            if state.get("stage") != stage:
                raise RecipeError(f"{found[-1]}: checkpoint of stage {state.get('stage')}, not stage {stage}")
            start_step = int(state["step"])
            if main:
                _trim_log(log_path, start_step)
    elif main and log_path.exists():
        log_path.unlink()

    sampler = TaskSampler(samples, recipe.data.task_weights, recipe.seed, stage)
    collate_config = _CollateConfig(accelerator.unwrap_model(model).config)
    volume_cache = _volume_feature_cache(accelerator.unwrap_model(model))
    total = settings.steps
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start_step, desc=f"stage {stage}", unit="step", dynamic_ncols=True)
    started = time.perf_counter()
    last_log: dict[str, Any] = {}
    done = start_step
    finished = True
    for step in range(start_step, total):
        sums: dict[str, float] = {}
        first_batch = None
        for micro in range(settings.gradient_accumulation_steps):
            chosen = sampler.draw(step, micro, settings.batch_size, accelerator.process_index)
            batch = make_batch(
                chosen,
                tokenizer,
                collate_config,
                recipe.data.max_length,
                recipe.data.zero_image,
                volume_cache,
                recipe.data.faithful_reports,
                recipe.data.faithful_answers,
            )
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            if first_batch is None:
                first_batch = batch
            with accelerator.accumulate(model):
                if probe_loss is not None:
                    probe_loss.reset()
                output = model(**batch)
                loss = output.loss
                if settings.lm_loss_per_sample and output.lm_loss is not None:
                    per_sample = per_sample_lm_loss(output.logits, batch["labels"])
                    loss = loss - output.lm_loss + per_sample
                    sums["lm_per_sample"] = sums.get("lm_per_sample", 0.0) + float(per_sample.detach()) / settings.gradient_accumulation_steps
                if probe_loss is not None:
                    aux = probe_loss.loss(chosen, accelerator.unwrap_model(model).config)
                    if aux is not None:
                        loss = loss + settings.vision_probe_coef * aux
                        sums["probe"] = sums.get("probe", 0.0) + float(aux.detach()) / settings.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients and settings.max_grad_norm > 0:
                    norm = accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                    if norm is not None:  # DeepSpeed clips inside its engine and returns None
                        sums["grad_norm"] = float(norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key in ("loss", "lm_loss", "load_balancing_loss", "z_loss", "task_loss"):
                value = getattr(output, key, None)
                if value is not None:
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) / settings.gradient_accumulation_steps
        scheduler.step()
        done = step + 1
        if done % settings.log_every == 0 or done == total or done == 1:
            entry = {
                "stage": stage,
                "step": done,
                "lr": scheduler.get_last_lr()[0],
                "lm": sums.get("lm_loss"),
                "load_balancing": sums.get("load_balancing_loss"),
                "z": sums.get("z_loss"),
                "task": sums.get("task_loss"),
                "probe": sums.get("probe"),
                "lm_per_sample": sums.get("lm_per_sample"),
                "total": sums.get("loss"),
                "grad_norm": sums.get("grad_norm"),
                "seconds": round(time.perf_counter() - started, 2),
            }
            unwrapped = accelerator.unwrap_model(model)
            if hasattr(unwrapped, "record_routing") and first_batch is not None:
                entry["expert_utilisation"] = _utilisation(unwrapped, first_batch)
            last_log = entry
            if main:
                with log_path.open("a") as handle:
                    handle.write(json.dumps(entry) + "\n")
        if bar is not None:
            bar.update(1)
            if sums.get("loss") is not None:
                bar.set_postfix(loss=f"{sums['loss']:.3f}")
        if done % settings.save_every == 0 or (stop_after is not None and done == stop_after):
            _save_checkpoint(accelerator, out_dir, stage, done, settings.keep_checkpoints, recipe, probe)
        if stop_after is not None and done >= stop_after and done < total:
            finished = False
            break
    if bar is not None:
        bar.close()
    if probe_loss is not None:
        probe_loss.close()
    seconds = time.perf_counter() - started
    steps_done = done
    accelerator.wait_for_everyone()
    if finished and main:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        summary = {
            "recipe": recipe.to_dict(),
            "stage": stage,
            "init": str(init) if init else None,
            "init_weights": weights_from,
            "steps": total,
            "resumed_from_step": start_step,
            "seconds_this_run": round(seconds, 1),
            "trainable": counts,
            "samples": len(samples),
            "device": str(accelerator.device),
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "volume_encoder": _volume_encoder_summary(unwrapped, volume_cache),
            "last_log": last_log,
        }
        (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    return TrainResult(out_dir, stage, steps_done, total, seconds, counts, last_log, finished)


def _volume_feature_cache(model: Any) -> Any:
    """Encoder features per training volume, for a model with a 3D volume encoder (else None)."""
    config = model.config
    if not getattr(config, "volume_encoder", ""):
        return None
    if model.volume_encoder is None:
        raise RecipeError("the model's config names a volume encoder but none is loaded")
    from napari_tghmoe.model.volume_tokens import VolumeFeatureCache

    return VolumeFeatureCache(model.volume_encoder, config.volume_tokens_grid, config.volume_encoder_windows)


def _volume_encoder_summary(model: Any, cache: Any) -> dict[str, Any] | None:
    if cache is None:
        return None
    source = getattr(model, "_volume_encoder_source", None)
    return {
        "source": str(source) if source is not None else None,
        "folder": model.config.volume_encoder,
        "tokens": int(model.config.num_volume_tokens),
        "volumes_encoded": len(cache),
        "frozen": not any(p.requires_grad for p in model.volume_encoder.parameters()),
    }


def _save_checkpoint(
    accelerator: Any, out_dir: Path, stage: int, step: int, keep: int, recipe: Recipe, probe: Any = None
) -> None:
    """``accelerator.save_state`` (safetensors model) + ``trainer_state.json``; prune old ones.

    The vision-probe heads, if any, also go to ``vision_probe.safetensors``: accelerate keeps
    registered objects as pickle, which nobody should have to unpickle to inspect a run.
    """
    target = out_dir / "checkpoints" / f"step-{step:07d}"
    accelerator.save_state(str(target), safe_serialization=True)
    if accelerator.is_main_process:
        if probe is not None:
            from safetensors.torch import save_file

            heads = accelerator.unwrap_model(probe).state_dict()
            save_file({name: t.detach().cpu().contiguous() for name, t in heads.items()}, str(target / PROBE_NAME))
        state = {"stage": stage, "step": step, "seed": recipe.seed, "data_rng": "numpy default_rng([seed, stage, step, micro, process])"}
        (target / STATE_NAME).write_text(json.dumps(state) + "\n")
        if keep > 0:
            for old in checkpoint_dirs(out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def result_dict(result: TrainResult) -> dict[str, Any]:
    data = asdict(result)
    data["out_dir"] = str(result.out_dir)
    return data
