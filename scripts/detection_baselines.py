"""Can the phantoms' lesions be found per volume at the demo's grid, and by what? Three baselines.

docs/results.md ("Is the lesion there to be seen?") reports the numbers this script prints:

    # the lesions are visible: count voxels that differ from their organ, given the organ mask
    .venv/bin/python scripts/detection_baselines.py oracle
    # a per-patch classifier on the raw windowed patches the vision tower embeds
    .venv/bin/python scripts/detection_baselines.py patch-mlp --patch 16
    .venv/bin/python scripts/detection_baselines.py patch-mlp --patch 4 --twins
    # the same, told where the organs are (the context the oracle has)
    .venv/bin/python scripts/detection_baselines.py patch-mlp --patch 16 --organ-masks
    # the same on the bounding-box labels used before issue 19 (to compare the labels on the same phantoms)
    .venv/bin/python scripts/detection_baselines.py patch-mlp --patch 16 --box-labels
    # control: a small 3D CNN, dense targets, fresh phantoms and their twins every step
    .venv/bin/python scripts/detection_baselines.py cnn --steps 1500
    # the same with organ context, hard negatives, and where its highest cell lies (stop 12)
    .venv/bin/python scripts/detection_baselines.py cnn --steps 1500 --organ-input --threads 1
    .venv/bin/python scripts/detection_baselines.py cnn --steps 1000 --dense-loss hard --save cnn.safetensors
    .venv/bin/python scripts/detection_baselines.py cnn-errors cnn.safetensors
    # check the training path: the CNN memorises the renal cysts of one fixed batch
    .venv/bin/python scripts/detection_baselines.py cnn-overfit --steps 50

``oracle`` is not a model: it reads the phantom's organ labels, which no model gets, and counts the
voxels more than 40 HU brighter (hyperdense) or darker (hypodense, cysts) than the organ's median.
It answers whether the demo grid (32 x 64 x 96, 10 mm slices, ~4 mm pixels) keeps the lesions.

``patch-mlp`` trains a two-layer MLP per patch (the same 3-window voxels, ``patch`` pixels a side,
2 slices deep) on the per-patch labels of the vision probe (``lesion_patch_targets``: the patches
holding a voxel of the phantom's lesion mask; bounding boxes before issue 19), on phantoms
of both regions for the training seeds. ``--twins`` adds, for every phantom with findings, the same
phantom rendered without them (same anatomy, same noise: the only difference is the lesion), and
``--shift S`` adds copies rolled in-plane by multiples of S pixels (lesions at every position of a
patch). ``--organ-masks`` appends each patch's voxels of the liver, spleen and kidney masks (taken
from the phantom rendered without findings, so they cannot give the lesion away). It prints the held-out per-patch AUC and the volume-level AUC (highest patch logit per
kind), as ``scripts/probe_detection.py`` reads the vision tower. A diagnostic, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_detection import REGION_OF_KIND, auc  # noqa: E402

GRID = (32, 64, 96)  # the demo model's volume grid (recipes/demo.toml)
#: Focal kinds whose organ the oracle reads, and the sign of their contrast to it.
ORACLE_KINDS = {
    "hyperdense liver lesion": (("liver",), 1),
    "hypodense liver lesion": (("liver",), -1),
    "hypodense splenic lesion": (("spleen",), -1),
    "renal cyst": (("right kidney", "left kidney"), -1),
}


def seed_range(text: str) -> range:
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def phantom(seed: int, region: str, findings: bool = True):
    """A phantom on the demo grid; ``findings=False`` renders the same case without its findings."""
    import napari_tghmoe.phantom as phantoms

    return phantoms.make_phantom(seed, region=region, shape=GRID, findings=findings)


def organ_mask(case, organs: tuple[str, ...]) -> np.ndarray:
    """Voxels of ``case`` labelled as any of ``organs``."""
    return np.isin(case.labels, [value for value, name in case.label_names.items() if name in organs])


def oracle(seeds: range) -> None:
    """Volume-level AUC of counting lesion-like voxels inside the (known) organ, abdomen phantoms."""
    from scipy import ndimage

    scores: dict[str, list[int]] = {kind: [] for kind in ORACLE_KINDS}
    present: dict[str, list[bool]] = {kind: [] for kind in ORACLE_KINDS}
    for seed in seeds:
        case = phantom(seed, "abdomen")
        hu = case.volume.hu.astype(np.float32)
        kinds = {finding.kind for finding in case.findings}
        for kind, (organs, sign) in ORACLE_KINDS.items():
            organ = organ_mask(case, organs)
            inside = ndimage.binary_erosion(organ | (case.lesions > 0), iterations=1)
            contrast = sign * (hu[inside] - np.median(hu[organ]))
            scores[kind].append(int((contrast > 40).sum()))
            present[kind].append(kind in kinds)
    print(f"oracle (organ mask given), abdomen seeds {seeds.start}-{seeds.stop - 1}")
    print("| kind | positives / volumes | volume AUC |\n|---|---|---|")
    for kind in ORACLE_KINDS:
        labels = np.array(present[kind])
        if not 0 < labels.sum() < len(labels):
            print(f"| {kind} | {labels.sum()}/{len(labels)} | n/a |")
            continue
        print(f"| {kind} | {labels.sum()}/{len(labels)} | {auc(np.array(scores[kind]), labels):.2f} |")


#: Organs whose masks ``--organ-masks`` appends to each patch (the organs of the focal abdominal kinds).
CONTEXT_ORGANS = (("liver",), ("spleen",), ("right kidney", "left kidney"))


@functools.lru_cache(maxsize=4)  # a phantom and its twin ask for the same masks: render them once
def organ_masks(seed: int, region: str) -> np.ndarray:
    """(organs, z, y, x) 0/1 masks from the phantom rendered *without* findings (no lesion leaks in)."""
    normal = phantom(seed, region, findings=False)
    return np.stack([organ_mask(normal, organs) for organs in CONTEXT_ORGANS]).astype(np.float32)


def patches_of(case, patch: int, findings: list[dict], shift: tuple[int, int] = (0, 0), masks=None, boxes: bool = False):
    """(patches, features) windowed voxels as the processor feeds the tower (then, if given, the
    patch's voxels of each organ mask), and (patches, kinds) labels: the patches holding a voxel of a
    finding of each kind (``findings``: ``case``'s own, or [] for its lesion-free twin). ``boxes``: the
    labels before issue 19 instead (each finding's bounding box), to compare the two on the same phantoms."""
    import torch

    from napari_tghmoe.model.preprocess import InputSettings, frames_to_patches, window_channels
    from napari_tghmoe.train.vision_probe import box_patch_targets, lesion_patch_targets

    settings = dataclasses.replace(InputSettings.from_config(None), volume_grid=GRID, patch_size=patch, merge_size=1)
    hu = np.roll(np.asarray(case.volume.hu, dtype=np.float32), shift, axis=(1, 2))
    flat, _ = frames_to_patches(window_channels(torch.from_numpy(hu), settings), settings)
    if masks is not None:  # as extra "channels": (z, organs, y, x) frames, patched like the image
        frames = torch.from_numpy(np.roll(masks, shift, axis=(2, 3))).permute(1, 0, 2, 3)
        flat = torch.cat([flat, frames_to_patches(frames, settings)[0]], dim=1)
    if boxes:
        moved = [dict(f, center_voxel=(f["center_voxel"][0], f["center_voxel"][1] + shift[0], f["center_voxel"][2] + shift[1])) for f in findings]
        labels = box_patch_targets(moved, hu.shape, case.volume.spacing, GRID, 2, patch, 1)
    else:
        lesions = np.roll(case.lesions, shift, axis=(1, 2)) if findings else np.zeros_like(case.lesions)
        labels = lesion_patch_targets(lesions, findings, GRID, 2, patch, 1)
    return flat.numpy().astype(np.float16), labels.reshape(len(flat), -1)


def patch_mlp(args: argparse.Namespace) -> None:
    import torch

    from napari_tghmoe.train.vision_probe import KINDS

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    offsets = range(0, args.patch, args.shift) if args.shift else range(1)
    shifts = [(dy, dx) for dy in offsets for dx in offsets]
    features, targets, started = [], [], time.perf_counter()
    for seed in seed_range(args.train_seeds):
        for region in ("chest", "abdomen"):
            renders = [(phantom(seed, region), True)]
            if args.twins and renders[0][0].findings:
                renders.append((phantom(seed, region, findings=False), False))
            truth = [dataclasses.asdict(finding) for finding in renders[0][0].findings]
            masks = organ_masks(seed, region) if args.organ_masks else None  # once, for every shift
            for shift in shifts:
                keep = None
                for case, with_findings in renders:
                    x, y = patches_of(case, args.patch, truth if with_findings else [], shift, masks, args.box_labels)
                    if keep is None:  # every positive patch, a sample of the rest (same patches in the twin)
                        keep = (y.max(1) > 0) | (rng.random(len(y)) < args.negatives / len(shifts))
                    features.append(x[keep])
                    targets.append(y[keep])
    x_train, y_train = torch.from_numpy(np.concatenate(features)), torch.from_numpy(np.concatenate(targets))
    held, regions = [], []
    for seed in seed_range(args.seeds):
        for region in ("chest", "abdomen"):
            case = phantom(seed, region)
            masks = organ_masks(seed, region) if args.organ_masks else None
            held.append(patches_of(case, args.patch, [dataclasses.asdict(f) for f in case.findings], masks=masks, boxes=args.box_labels))
            regions.append(region)
    x_held = torch.from_numpy(np.concatenate([h[0] for h in held])).float()
    y_held = np.concatenate([h[1] for h in held]) > 0.5
    print(f"patch {args.patch}, twins {args.twins}, shift {args.shift}, organ masks {args.organ_masks}, "
          f"{'box' if args.box_labels else 'lesion-mask'} labels: {len(x_train)} training patches "
          f"({time.perf_counter() - started:.0f} s to render), {len(held)} held-out volumes", flush=True)

    model = torch.nn.Sequential(
        torch.nn.Linear(x_train.shape[1], 256), torch.nn.GELU(),
        torch.nn.Linear(256, 256), torch.nn.GELU(),
        torch.nn.Linear(256, len(KINDS)),
    )
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    prevalence = y_train.float().mean(0).clamp(min=1e-4)
    for epoch in range(1, args.epochs + 1):
        for batch in torch.randperm(len(x_train)).split(512):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(x_train[batch].float()), y_train[batch].float(), pos_weight=(1 - prevalence) / prevalence
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        logits = model(x_held).numpy()
    volumes = logits.reshape(len(held), -1, len(KINDS)).max(1)
    has = y_held.reshape(len(held), -1, len(KINDS)).any(1)
    print("| kind | per-patch AUC | volume AUC | positives / volumes |\n|---|---|---|---|")
    for k, kind in enumerate(KINDS):
        region = REGION_OF_KIND.get(kind, "abdomen")
        keep = np.array([region is None or r == region for r in regions])
        if not 0 < has[keep, k].sum() < keep.sum():  # too few held-out volumes for this kind
            print(f"| {kind} | n/a | n/a | {has[keep, k].sum()}/{keep.sum()} |")
            continue
        patch_auc, volume_auc = auc(logits[:, k], y_held[:, k]), auc(volumes[keep, k], has[keep, k])
        print(f"| {kind} | {patch_auc:.3f} | {volume_auc:.2f} | {has[keep, k].sum()}/{keep.sum()} |")


def _windowed(case):
    """(3, z, y, x) float tensor: the processor's three CT windows of ``case`` as channels."""
    import torch

    from napari_tghmoe.model.preprocess import InputSettings, window_channels

    settings = dataclasses.replace(InputSettings.from_config(None), volume_grid=GRID)
    hu = torch.from_numpy(np.asarray(case.volume.hu, dtype=np.float32))
    return window_channels(hu, settings).permute(1, 0, 2, 3).contiguous()


def _kind_grid(case, cell: int):
    """(kinds, z, y/cell, x/cell) 0/1: does a voxel of a finding of kind k lie in the cell."""
    import torch

    from napari_tghmoe.train.vision_probe import KINDS

    per_voxel = np.zeros((len(KINDS), *case.lesions.shape), dtype=np.float32)
    for index, finding in enumerate(case.findings):
        per_voxel[KINDS.index(finding.kind)][case.lesions == index + 1] = 1.0
    return torch.nn.functional.max_pool3d(torch.from_numpy(per_voxel)[None], (1, cell, cell))[0]


def small_cnn(kinds: int, width: int, channels: int = 3):
    """A plain 3D CNN: full-resolution stem, two in-plane stride-2 stages, dilated context, then
    one logit per kind on the (z, y/4, x/4) grid (the resolution of 4-pixel patches)."""
    import torch

    def block(cin, cout, stride=(1, 1, 1), dilation=1):
        pad = (dilation if stride == (1, 1, 1) else 1, dilation, dilation)
        return [torch.nn.Conv3d(cin, cout, 3, stride, pad, (pad[0], dilation, dilation)), torch.nn.BatchNorm3d(cout), torch.nn.GELU()]

    return torch.nn.Sequential(
        *block(channels, width), *block(width, 2 * width, (1, 2, 2)), *block(2 * width, 2 * width, (1, 2, 2)),
        *block(2 * width, 2 * width, dilation=2), *block(2 * width, 2 * width, dilation=4),
        torch.nn.Conv3d(2 * width, kinds, 1),
    )


def cnn_input(case, organ_input: bool):
    """The CNN's input: the windowed volume, with the organ masks of its lesion-free twin as extra
    channels under --organ-input (the context the oracle has, given rather than learnt)."""
    import torch

    image = _windowed(case)
    if organ_input:
        image = torch.cat([image, torch.from_numpy(organ_masks(case.seed, case.region))])
    return image


def cnn(args: argparse.Namespace) -> None:
    """Control: can *any* small trained detector find the lesions on the demo grid? A 3D CNN
    on whole volumes, dense per-cell targets from the phantom's lesion map, fresh phantoms every
    step (never repeated), lesion-free twins in every batch, balanced BCE plus the volume-level
    (max over cells) BCE the vision probe uses. Prints the held-out volume AUC per kind (highest
    cell logit per volume) and, in brackets, the per-cell AUC (lesion cells against every other
    cell of the volumes of the kind's region)."""
    import torch

    from napari_tghmoe.train.vision_probe import KINDS, balanced_bce, hard_negative_bce

    torch.manual_seed(0)

    def organ_target(case):
        """(organs, z, y/4, x/4): the fraction of each 4-px cell that is liver, spleen, kidney
        (labels of the lesion-free twin), the --organ-aux target."""
        masks = torch.from_numpy(organ_masks(case.seed, case.region))
        return torch.nn.functional.avg_pool3d(masks[None], (1, 4, 4))[0]

    held = []
    for seed in seed_range(args.seeds):
        for region in ("chest", "abdomen"):
            case = phantom(seed, region)
            held.append((cnn_input(case, args.organ_input), {f.kind for f in case.findings}, region, _kind_grid(case, 4).numpy() > 0.5))
    organ_heads = len(CONTEXT_ORGANS) if args.organ_aux else 0
    network = small_cnn(len(KINDS) + organ_heads, args.width, 3 + (len(CONTEXT_ORGANS) if args.organ_input else 0))

    def model(images):
        return network(images)[:, : len(KINDS)]

    optimiser = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=0.01)
    print(f"cnn width {args.width}, {args.dense_loss} dense BCE + {args.presence} x presence, "
          f"organ input {args.organ_input}, organ aux {args.organ_aux}: "
          f"{sum(p.numel() for p in network.parameters())} parameters, "
          f"{args.steps} steps of {args.batch} fresh phantoms (+ twins), {len(held)} held-out volumes", flush=True)
    seed, started = 0, time.perf_counter()
    for step in range(1, args.steps + 1):
        network.train()
        images, targets, organs = [], [], []
        while len(images) < args.batch:
            case = phantom(seed, ("chest", "abdomen")[seed % 2])
            seed += 1
            images.append(cnn_input(case, args.organ_input))
            targets.append(_kind_grid(case, 4))
            if organ_heads:
                organs.append(organ_target(case))
            if case.findings and args.twins:
                twin = phantom(case.seed, case.region, findings=False)
                images.append(cnn_input(twin, args.organ_input))
                targets.append(torch.zeros_like(targets[-1]))
                if organ_heads:
                    organs.append(organs[-1])
        outputs = network(torch.stack(images))
        logits = outputs[:, : len(KINDS)]
        target = torch.stack(targets)
        # the vision probe's volume_presence_loss for a whole batch at once (one BCE per volume and kind)
        presence = torch.nn.functional.binary_cross_entropy_with_logits(logits.amax((2, 3, 4)), target.amax((2, 3, 4)))
        if args.dense_loss == "balanced":
            dense = balanced_bce(logits, target)
        elif args.dense_loss == "hard":
            dense = hard_negative_bce(logits.flatten(2), target.flatten(2), args.hardest)
        else:
            dense = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        loss = dense + args.presence * presence
        if organ_heads:
            loss = loss + args.organ_aux * torch.nn.functional.binary_cross_entropy_with_logits(
                outputs[:, len(KINDS):], torch.stack(organs)
            )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % args.every == 0 or step == args.steps:
            network.eval()
            with torch.no_grad():
                maps = [model(image[None])[0].numpy() for image, *_ in held]
            scores = np.stack([m.max((1, 2, 3)) for m in maps])
            cells = []
            for k, kind in enumerate(KINDS):
                region = REGION_OF_KIND.get(kind, "abdomen")
                keep = np.array([region is None or r == region for _, _, r, _ in held])
                labels = np.array([kind in kinds for _, kinds, _, _ in held])[keep]
                if not 0 < labels.sum() < len(labels):
                    cells.append(f"{kind} n/a")
                    continue
                in_region = np.flatnonzero(keep)
                cell_scores = np.concatenate([maps[i][k].ravel() for i in in_region])
                cell_labels = np.concatenate([held[i][3][k].ravel() for i in in_region])
                cells.append(f"{kind} {auc(scores[keep, k], labels):.2f} (cells {auc(cell_scores, cell_labels):.2f})")
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s): " + ", ".join(cells), flush=True)
    if args.save:
        from safetensors.torch import save_file

        save_file(network.state_dict(), args.save)


def _cell_label(case, z: int, y: int, x: int, cell: int = 4) -> str:
    """The structure that fills most of 4-px cell (z, y, x) of ``case``."""
    values, counts = np.unique(case.labels[z, y * cell : (y + 1) * cell, x * cell : (x + 1) * cell], return_counts=True)
    return case.label_names.get(int(values[counts.argmax()]), "?")


def cnn_overfit(args: argparse.Namespace) -> None:
    """Is the CNN's training path able to find a lesion at all? Train it on one fixed batch (the
    first ``--volumes`` abdomen phantoms from seed 0 with a finding of ``--kind``, and their
    lesion-free twins) and print, every ``--every`` steps, on how many of those volumes the kind's
    highest cell lies on the finding. Memorising a batch is not detecting: this only rules out a
    bug in the targets or the loss."""
    import torch

    from napari_tghmoe.train.vision_probe import KINDS, balanced_bce, hard_negative_bce

    torch.manual_seed(0)
    k = KINDS.index(args.kind)
    cases, seed = [], 1
    while len(cases) < args.volumes:
        case = phantom(seed, "abdomen")
        if any(finding.kind == args.kind for finding in case.findings):
            cases.append(case)
        seed += 2  # odd seeds: the abdomen phantoms of region=both
    twins = [phantom(case.seed, "abdomen", findings=False) for case in cases]
    images = torch.stack([_windowed(case) for case in cases + twins])
    targets = torch.stack([_kind_grid(case, 4) for case in cases] + [torch.zeros_like(_kind_grid(cases[0], 4))] * len(twins))
    network = small_cnn(len(KINDS), args.width)
    optimiser = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=0.01)
    print(f"cnn width {args.width}, {args.dense_loss} dense BCE + presence, fixed batch: abdomen seeds "
          f"{[case.seed for case in cases]} with a {args.kind} and their twins", flush=True)
    for step in range(1, args.steps + 1):
        network.train()
        logits = network(images)
        presence = torch.nn.functional.binary_cross_entropy_with_logits(logits.amax((2, 3, 4)), targets.amax((2, 3, 4)))
        if args.dense_loss == "hard":
            dense = hard_negative_bce(logits.flatten(2), targets.flatten(2), args.hardest)
        else:
            dense = balanced_bce(logits, targets)
        loss = dense + presence
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % args.every == 0 or step == args.steps:
            network.eval()
            with torch.no_grad():
                maps = network(images[: len(cases)])[:, k]
            on_finding = 0
            for index, case in enumerate(cases):
                top = np.unravel_index(int(maps[index].argmax()), tuple(maps[index].shape))
                on_finding += bool(targets[index, k][top] > 0.5)
            print(f"step {step} loss {loss.item():.3f}: top {args.kind} cell on the finding in {on_finding}/{len(cases)} volumes", flush=True)


def cnn_errors(args: argparse.Namespace) -> None:
    """Where does a trained CNN (``cnn --save``) put its highest cell? Per kind, on the held-out
    volumes of the kind's region: the share of volumes with the finding whose top cell lies on the
    finding, and the structures under the top cell of the volumes without it (the false positives
    that outrank the lesions)."""
    from collections import Counter

    import torch
    from safetensors.torch import load_file

    from napari_tghmoe.train.vision_probe import KINDS

    weights = load_file(args.weights)
    last = max(int(name.split(".")[0]) for name in weights)  # the 1x1 head closes the Sequential
    channels = weights["0.weight"].shape[1]
    network = small_cnn(weights[f"{last}.weight"].shape[0], args.width, channels)
    network.load_state_dict(weights)
    network.eval()
    hits, mimics = {k: [] for k in KINDS}, {k: Counter() for k in KINDS}
    with torch.no_grad():
        for seed in seed_range(args.seeds):
            for region in ("chest", "abdomen"):
                case = phantom(seed, region)
                logits = network(cnn_input(case, channels > 3)[None])[0, : len(KINDS)].numpy()
                truth = _kind_grid(case, 4).numpy() > 0.5
                present = {f.kind for f in case.findings}
                for k, kind in enumerate(KINDS):
                    if REGION_OF_KIND.get(kind, "abdomen") not in (None, region):
                        continue
                    top = np.unravel_index(logits[k].argmax(), logits[k].shape)
                    if kind in present:
                        hits[kind].append(bool(truth[k][top]))
                    else:
                        where = _cell_label(case, *top)
                        edge = top[0] in (0, logits.shape[1] - 1)
                        mimics[kind][where + (" (end slice)" if edge else "")] += 1
    for kind in KINDS:
        if not hits[kind]:
            continue
        common = ", ".join(f"{name} {n}" for name, n in mimics[kind].most_common(args.most))
        print(f"{kind}: top cell on the finding in {sum(hits[kind])}/{len(hits[kind])} volumes with it; "
              f"top cell of the {sum(mimics[kind].values())} without it: {common}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="baseline", required=True)
    first = sub.add_parser("oracle", help="count lesion-like voxels inside the known organ")
    first.add_argument("--seeds", default="100000-100199")
    second = sub.add_parser("patch-mlp", help="a per-patch MLP on raw windowed voxels")
    second.add_argument("--patch", type=int, default=16, choices=[4, 8, 16])
    second.add_argument("--train-seeds", default="0-399", help="each seed gives a chest and an abdomen phantom")
    second.add_argument("--seeds", default="100000-100099", help="held-out seeds (chest and abdomen each)")
    second.add_argument("--twins", action="store_true", help="add each phantom rendered without its findings")
    second.add_argument("--shift", type=int, default=0, help="add in-plane rolls by multiples of this many pixels")
    second.add_argument(
        "--organ-masks", action="store_true",
        help="give the MLP the liver, spleen and kidney masks of each patch (from the phantom without findings)",
    )
    second.add_argument("--negatives", type=float, default=0.3, help="fraction of lesion-free patches kept")
    second.add_argument(
        "--box-labels", action="store_true",
        help="train and score with the bounding-box labels used before issue 19 instead of the lesion mask",
    )
    second.add_argument("--epochs", type=int, default=5)
    second.add_argument("--threads", type=int, default=2)
    third = sub.add_parser("cnn", help="control: a small 3D CNN with dense targets on fresh phantoms")
    third.add_argument("--steps", type=int, default=600)
    third.add_argument("--batch", type=int, default=4, help="phantoms per step (each with findings adds its twin)")
    third.add_argument("--width", type=int, default=16)
    third.add_argument("--lr", type=float, default=2e-3)
    third.add_argument("--no-twins", dest="twins", action="store_false")
    third.add_argument(
        "--dense-loss", choices=["balanced", "plain", "hard"], default="balanced",
        help="per-cell BCE with positives weighted half (as the vision probe), the plain mean, or "
        "positives against the --hardest negative cells of each volume and kind",
    )
    third.add_argument("--hardest", type=int, default=32, help="negative cells per volume and kind for --dense-loss hard")
    third.add_argument("--presence", type=float, default=1.0, help="weight of the volume-level (max over cells) BCE")
    third.add_argument(
        "--organ-input", action="store_true",
        help="give the CNN the liver, spleen and kidney masks (of the lesion-free twin) as extra input channels",
    )
    third.add_argument(
        "--organ-aux", type=float, default=0.0,
        help="weight of an auxiliary per-cell organ (liver, spleen, kidney) segmentation loss; no masks as input",
    )
    third.add_argument("--save", help="write the trained CNN's weights to this .safetensors file")
    third.add_argument("--every", type=int, default=100, help="held-out AUC every this many steps")
    third.add_argument("--seeds", default="100000-100039", help="held-out seeds (chest and abdomen each)")
    third.add_argument("--threads", type=int, default=2)
    fourth = sub.add_parser("cnn-errors", help="where a trained CNN (cnn --save) puts its highest cell")
    fourth.add_argument("weights", help="the .safetensors file written by cnn --save")
    fourth.add_argument("--width", type=int, default=16, help="the width the CNN was trained with")
    fourth.add_argument("--seeds", default="100000-100039", help="held-out seeds (chest and abdomen each)")
    fourth.add_argument("--most", type=int, default=5, help="how many structures to list per kind")
    fourth.add_argument("--threads", type=int, default=2)
    fifth = sub.add_parser("cnn-overfit", help="check: the CNN memorises the lesions of one fixed batch")
    fifth.add_argument("--kind", default="renal cyst")
    fifth.add_argument("--volumes", type=int, default=4, help="phantoms with the finding (each with its twin)")
    fifth.add_argument("--steps", type=int, default=50)
    fifth.add_argument("--every", type=int, default=10)
    fifth.add_argument("--width", type=int, default=16)
    fifth.add_argument("--lr", type=float, default=2e-3)
    fifth.add_argument("--dense-loss", choices=["balanced", "hard"], default="hard")
    fifth.add_argument("--hardest", type=int, default=32)
    fifth.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.baseline == "oracle":
        oracle(seed_range(args.seeds))
        return
    import torch

    torch.set_num_threads(args.threads)
    if args.baseline == "patch-mlp":
        patch_mlp(args)
    elif args.baseline == "cnn-errors":
        cnn_errors(args)
    elif args.baseline == "cnn-overfit":
        cnn_overfit(args)
    else:
        cnn(args)


if __name__ == "__main__":
    main()
