"""Does the demo's vision tower see lesions? Volume-level detection AUC from the vision-probe heads.

The numbers in docs/results.md ("Does the vision tower see a lesion?") come from this script:

    # probe heads of a training checkpoint
    .venv/bin/python scripts/probe_detection.py MODEL_DIR --probe CKPT/vision_probe.safetensors
    # train the vision tower alone (no LLM in the loop) with fresh heads, AUC every 500 steps
    .venv/bin/python scripts/probe_detection.py MODEL_DIR --vision-only-steps 3000 --lr 1e-3
    # the same with the hard-negative per-patch loss, keeping the trained tower and heads
    .venv/bin/python scripts/probe_detection.py MODEL_DIR --vision-only-steps 1500 --dense hard --save OUT

Per kind, a volume's score is its highest patch logit; the AUC is over the volumes of the region
where that kind can occur (lymph nodes: all). The vision-only training's per-patch targets are the
patches holding a voxel of the phantom's lesion mask (``lesion_patch_targets``, via the phantom
cache); until issue 19 they were bounding boxes around each finding's centre. A diagnostic for phantom-trained models, not a test.
Checkpoints written before the heads were saved as safetensors hold them only in accelerate's
``custom_checkpoint_1.pkl``; ``--probe`` reads that too, as tensors only (``weights_only``).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np

REGION_OF_KIND = {"lung nodule": "chest", "pleural effusion": "chest", "enlarged lymph node": None}


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (positives x negatives))."""
    from scipy.stats import mannwhitneyu

    positives, negatives = scores[labels], scores[~labels]
    return float(mannwhitneyu(positives, negatives).statistic) / (len(positives) * len(negatives))


class VisionEncoder:
    """Runs only the vision tower of a TGH-MoE model (with its text-guided routing) on samples,
    so the probe loss can train it without the LLM."""

    def __init__(self, model, tokenizer, probe_loss) -> None:
        self.model, self.tokenizer, self.probe_loss = model, tokenizer, probe_loss

    def __call__(self, samples) -> None:
        from napari_tghmoe.train.data import collate

        model, config = self.model, self.model.config
        batch = collate(samples, self.tokenizer, config)
        ids, grid, pixels = batch["input_ids"], batch["video_grid_thw"], batch["pixel_values_videos"]
        text = model.text_features(ids, None, batch["attention_mask"], batch.get("text_guidance_mask"))
        self.probe_loss.reset()
        model.encode_visual(pixels, grid, text, ids, compute_aux=model.training)


def detection_auc(encode, probe, samples, config) -> dict[str, float]:
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
    scores, present = np.array(scores), np.array(present)
    result = {}
    for k, kind in enumerate(KINDS):
        region = REGION_OF_KIND.get(kind, "abdomen")
        keep = np.array([region is None or r == region for r in regions])
        if 0 < present[keep, k].sum() < keep.sum():
            result[kind] = auc(scores[keep, k], present[keep, k])
    return result


def main() -> None:
    from napari_tghmoe.train.vision_probe import DENSE_LOSSES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="TGH-MoE model folder (a demo stage-1 output)")
    parser.add_argument(
        "--probe", help="probe heads: a checkpoint's vision_probe.safetensors (or older custom_checkpoint_1.pkl); default: fresh"
    )
    parser.add_argument("--data", default="phantom:seeds=100000-100079,region=both,shape=32x64x96")
    parser.add_argument("--train-data", default="phantom:seeds=0-799,region=both,shape=32x64x96")
    parser.add_argument(
        "--phrasing", default=None, choices=["train", "heldout", "none"],
        help="wording of the report request whose text guides the routing (default: the dataset's)",
    )
    parser.add_argument("--vision-only-steps", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--dense", choices=DENSE_LOSSES, default="balanced",
        help="per-patch loss of the vision-only training (the recipe's vision_probe_dense)",
    )
    parser.add_argument("--hardest", type=int, default=8, help="negative patches per volume and kind for --dense hard")
    parser.add_argument("--save", help="after the vision-only steps, write the tower and probe heads into this folder")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from napari_tghmoe.model.modeling import TGHMoEForConditionalGeneration
    from napari_tghmoe.train.data import load_dataset_spec
    from napari_tghmoe.train.trainer import preload_volumes
    from napari_tghmoe.train.vision_probe import VisionProbeLoss, make_probe

    torch.set_num_threads(args.threads)
    model = TGHMoEForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    vision = model.config.vision_config
    probe = make_probe(int(vision.out_hidden_size), int(vision.spatial_merge_size) ** 2)
    if args.probe:
        if args.probe.endswith(".safetensors"):
            from safetensors.torch import load_file

            probe.load_state_dict(load_file(args.probe))
        else:
            probe.load_state_dict(torch.load(args.probe, weights_only=True))
    probe_loss = VisionProbeLoss(model, probe, presence=1.0, dense=args.dense, hardest=args.hardest)
    encode = VisionEncoder(model.eval(), tokenizer, probe_loss)
    held_out = load_dataset_spec(args.data, task="report", phrasing=args.phrasing)
    preload_volumes(held_out)

    def show(step: int, loss: float | None = None) -> None:
        aucs = detection_auc(encode, probe, held_out, model.config)
        loss_text = "" if loss is None else f" loss {loss:.3f}"
        print(f"step {step}{loss_text}: " + ", ".join(f"{k} {v:.2f}" for k, v in aucs.items()), flush=True)

    show(0)
    if args.vision_only_steps <= 0:
        return
    train = load_dataset_spec(args.train_data, task="report", phrasing="train")
    preload_volumes(train)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    params = [*model.model.visual.parameters(), *probe.parameters()]
    for parameter in params:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    rng, losses, started = random.Random(0), [], time.perf_counter()
    model.train()
    for step in range(1, args.vision_only_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / 50)
        batch = rng.sample(train, 8)
        encode(batch)
        loss = encode.probe_loss.loss(batch, model.config)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 500 == 0:
            model.eval()
            show(step, float(np.mean(losses[-50:])))
            print(f"  {time.perf_counter() - started:.0f} s", flush=True)
            model.train()
    if args.save:
        from safetensors.torch import save_file

        model.eval()
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
        save_file(probe.state_dict(), str(Path(args.save) / "vision_probe.safetensors"))
        print(f"wrote {args.save} (model with the trained tower, vision_probe.safetensors)", flush=True)


if __name__ == "__main__":
    main()
