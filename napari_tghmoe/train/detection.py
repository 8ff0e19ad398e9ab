"""``tghmoe probe-detection``: does a phantom-trained model's vision tower see the lesions?

    tghmoe probe-detection MODEL --probe CKPT/vision_probe.safetensors   # heads of a training checkpoint
    tghmoe probe-detection MODEL --vision-only-steps 1500 --lr 1e-3      # train the tower alone, fresh heads
    tghmoe probe-detection MODEL --vision-only-steps 1500 --dense hard --save OUT

A report has to answer a per-volume question ("is there a renal cyst in this scan?"), so a volume's
score for a finding kind is the highest patch logit of the vision probe's kind head on the tower's
merged tokens, and the AUC is over the volumes of the regions where that kind occurs (lymph nodes:
every volume). Per-patch labels can be met by anatomy (a head lighting up wherever a lesion *can*
be); this volume-level AUC cannot. ``--vision-only-steps`` trains only the tower and the probe heads
(probe + presence loss, no LLM in the loop) on training phantoms and measures again every
``--every`` steps. The numbers of docs/results.md ("Does the vision tower see a lesion?") come from
this command. A diagnostic for phantom-trained models (the heads need phantom ground truth), not a
test of a real model.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: The held-out and training phantoms of docs/results.md (the demo grid, seeds never trained on).
HELD_OUT_DATA = "phantom:seeds=100000-100079,region=both,shape=32x64x96"
TRAINING_DATA = "phantom:seeds=0-799,region=both,shape=32x64x96"


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U of the positives over the negatives divided by
    (positives x negatives), i.e. the chance that a random positive outscores a random negative
    (ties count half)."""
    from scipy.stats import mannwhitneyu

    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    positives, negatives = scores[labels], scores[~labels]
    return float(mannwhitneyu(positives, negatives).statistic) / (len(positives) * len(negatives))


def volume_detection_auc(scores: np.ndarray, present: np.ndarray, regions: Sequence[str]) -> dict[str, float]:
    """Per finding kind, the AUC of the volumes' ``scores`` (volumes x kinds) for ``present`` (does
    the volume hold that kind), over the volumes of the regions the kind occurs in; kinds whose
    volumes are all positive or all negative are left out (no AUC)."""
    from napari_tghmoe.phantom._types import FINDING_KINDS
    from napari_tghmoe.train.vision_probe import KINDS

    scores, present = np.asarray(scores, dtype=float), np.asarray(present, dtype=bool)
    result = {}
    for k, kind in enumerate(KINDS):
        keep = np.array([region in FINDING_KINDS[kind][1] for region in regions], dtype=bool)
        if 0 < present[keep, k].sum() < keep.sum():
            result[kind] = auc(scores[keep, k], present[keep, k])
    return result


class VisionEncoder:
    """Runs only the vision tower of a TGH-MoE model (with its text-guided routing) on samples, so
    the probe loss can train it without the LLM. The routing text is the collated prompt's
    instruction mask, as in training and inference: a text vector built from every token would
    include the reference report and hand the answer to the tower."""

    def __init__(self, model: Any, tokenizer: Any, probe_loss: Any) -> None:
        self.model, self.tokenizer, self.probe_loss = model, tokenizer, probe_loss

    def __call__(self, samples: Sequence[Any]) -> None:
        from napari_tghmoe.train.collate import collate

        model, config = self.model, self.model.config
        batch = collate(samples, self.tokenizer, config)
        ids, grid, pixels = batch["input_ids"], batch["video_grid_thw"], batch["pixel_values_videos"]
        text = model.text_features(ids, None, batch["attention_mask"], batch.get("text_guidance_mask"))
        self.probe_loss.reset()
        model.encode_visual(pixels, grid, text, ids, compute_aux=model.training)


def detection_auc(encode: VisionEncoder, probe: Any, samples: Sequence[Any], config: Any) -> dict[str, float]:
    """Volume-level AUC per finding kind over ``samples`` (phantoms with ground truth)."""
    import torch

    from napari_tghmoe.train.vision_probe import KINDS, rms_normalised, sample_patch_targets

    vision = config.vision_config
    merge = int(vision.spatial_merge_size)
    scores, present, regions = [], [], []
    with torch.no_grad():
        for sample in samples:
            encode([sample])
            tokens = rms_normalised(encode.probe_loss.tokens[-1].float())
            logits = probe.patch_kinds(tokens).view(-1, len(KINDS))
            truth = sample_patch_targets(
                sample.volume, sample.meta["phantom_findings"], config.volume_grid,
                int(vision.temporal_patch_size), int(vision.patch_size), merge, sample_id=sample.meta["id"],
            )
            scores.append(logits.amax(0).numpy())
            present.append(truth.reshape(-1, len(KINDS)).any(0))
            regions.append(sample.meta["region"])
    encode.probe_loss.reset()
    return volume_detection_auc(np.array(scores), np.array(present), regions)


def load_probe_heads(probe: Any, path: str | Path) -> None:
    """Probe heads from a checkpoint's ``vision_probe.safetensors``, or (checkpoints written before
    those) accelerate's ``custom_checkpoint_1.pkl`` read as tensors only (``weights_only``)."""
    import torch

    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        probe.load_state_dict(load_file(str(path)))
    else:
        probe.load_state_dict(torch.load(str(path), weights_only=True))


def train_vision_only(
    model: Any,
    encode: VisionEncoder,
    probe: Any,
    train: Sequence[Any],
    steps: int,
    *,
    lr: float,
    batch_size: int = 8,
    every: int = 500,
    report: Callable[[int, float], None],
) -> None:
    """AdamW on the vision tower and the probe heads only (warm-up 50 steps, gradients clipped at 1),
    batches drawn from ``train`` with a fixed seed; ``report(step, mean loss of the last 50 steps)``
    every ``every`` steps, in eval mode."""
    import torch

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    params = [*model.model.visual.parameters(), *probe.parameters()]
    for parameter in params:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng, losses = random.Random(0), []
    model.train()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 50)
        batch = rng.sample(list(train), batch_size)
        encode(batch)
        loss = encode.probe_loss.loss(batch, model.config)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % every == 0:
            model.eval()
            report(step, float(np.mean(losses[-50:])))
            model.train()
    model.eval()


def register(subparsers: Any) -> None:
    from napari_tghmoe.train.vision_probe import DENSE_LOSSES

    parser = subparsers.add_parser(
        "probe-detection",
        help="volume-level lesion detection AUC of a phantom-trained model's vision tower (vision-probe heads)",
        description="Does a phantom-trained model's vision tower see the lesions? Volume-level AUC per finding kind "
        "of the vision probe's heads (highest patch logit), optionally after training the tower alone.",
    )
    parser.add_argument("model", help="TGH-MoE model folder (a phantom-trained demo model)")
    parser.add_argument(
        "--probe", help="probe heads: a checkpoint's vision_probe.safetensors (or older custom_checkpoint_1.pkl); default: fresh"
    )
    parser.add_argument("--data", default=HELD_OUT_DATA, help=f"held-out phantoms (default {HELD_OUT_DATA})")
    parser.add_argument("--train-data", default=TRAINING_DATA, help=f"phantoms of --vision-only-steps (default {TRAINING_DATA})")
    parser.add_argument(
        "--phrasing", default=None, choices=["train", "heldout", "none"],
        help="wording of the report request whose text guides the routing (default: the dataset's)",
    )
    parser.add_argument("--vision-only-steps", type=int, default=0, help="train the tower and heads alone this many steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--dense", choices=DENSE_LOSSES, default="balanced",
        help="per-patch loss of the vision-only training (the recipe's vision_probe_dense)",
    )
    parser.add_argument("--hardest", type=int, default=8, help="negative patches per volume and kind for --dense hard")
    parser.add_argument("--batch-size", type=int, default=8, help="phantoms per vision-only step")
    parser.add_argument("--every", type=int, default=500, help="measure the AUC every this many vision-only steps")
    parser.add_argument("--save", help="after the vision-only steps, write the tower and probe heads into this folder")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.set_defaults(func=run_probe_detection)


def run_probe_detection(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from napari_tghmoe.datasets import load_dataset_spec
    from napari_tghmoe.model.modeling import TGHMoEForConditionalGeneration
    from napari_tghmoe.train.trainer import preload_volumes
    from napari_tghmoe.train.vision_probe import VisionProbeLoss, make_probe

    torch.set_num_threads(args.threads)
    model = TGHMoEForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    vision = model.config.vision_config
    probe = make_probe(int(vision.out_hidden_size), int(vision.spatial_merge_size) ** 2)
    if args.probe:
        load_probe_heads(probe, args.probe)
    probe_loss = VisionProbeLoss(model, probe, presence=1.0, dense=args.dense, hardest=args.hardest)
    encode = VisionEncoder(model.eval(), tokenizer, probe_loss)
    held_out = load_dataset_spec(args.data, task="report", phrasing=args.phrasing)
    preload_volumes(held_out)
    started = [time.perf_counter()]

    def show(step: int, loss: float | None = None) -> None:
        aucs = detection_auc(encode, probe, held_out, model.config)
        loss_text = "" if loss is None else f" loss {loss:.3f}"
        print(f"step {step}{loss_text}: " + ", ".join(f"{k} {v:.2f}" for k, v in aucs.items()), flush=True)
        if step:
            print(f"  {time.perf_counter() - started[0]:.0f} s", flush=True)

    show(0)
    if args.vision_only_steps <= 0:
        return 0
    train = load_dataset_spec(args.train_data, task="report", phrasing="train")
    preload_volumes(train)
    started[0] = time.perf_counter()
    train_vision_only(
        model, encode, probe, train, args.vision_only_steps,
        lr=args.lr, batch_size=args.batch_size, every=args.every, report=show,
    )
    if args.save:
        from safetensors.torch import save_file

        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
        save_file(probe.state_dict(), str(Path(args.save) / "vision_probe.safetensors"))
        print(f"wrote {args.save} (model with the trained tower, vision_probe.safetensors)", flush=True)
    return 0
