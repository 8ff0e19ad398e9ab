"""Held-out evaluation of a segmentation model through :func:`segment_volume` (``tghmoe eval-seg``).

Per phantom of a data spec: Dice of each organ against the phantom truth on the scan's own
grid; finding recall (a true finding counts as found when its mask overlaps at least one voxel
predicted as its kind); false findings (predicted components of a kind, the same minimum size
``segment_volume`` uses, that touch no true finding of that kind). Means over volumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from napari_tghmoe.med3d.encoder import DEFAULT_ORGANS

#: The organs the issue's Dice target is over: the ones the demo segments.
DICE_ORGANS = DEFAULT_ORGANS


def dice(prediction: np.ndarray, truth: np.ndarray) -> float | None:
    """Dice of two boolean masks (None when both are empty: the organ is not in the scan)."""
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return None
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def evaluate_phantom(phantom: Any, result: Any, config: Any) -> dict[str, Any]:
    """Metrics of one segmentation result against its phantom's truth."""
    from napari_tghmoe.med3d.data import phantom_model_labels
    from napari_tghmoe.med3d.segment import finding_components

    truth = phantom_model_labels(phantom, config)
    predicted = result.labels
    dices = {}
    for organ in DICE_ORGANS:
        if organ in config.organ_names:
            value = 1 + config.organ_names.index(organ)
            score = dice(predicted == value, truth == value)
            if score is not None and (truth == value).sum() > 0:
                dices[organ] = round(score, 4)
    found, missed = [], []
    for index, finding in enumerate(phantom.findings):
        if finding.kind not in config.finding_kinds:
            continue
        mask = phantom.lesions == index + 1
        hit = bool((predicted[mask] == config.finding_label(finding.kind)).any())
        (found if hit else missed).append({"kind": finding.kind, "location": finding.location, "size_mm": finding.size_mm})
    voxel_ml = float(np.prod(phantom.volume.spacing)) / 1000.0
    min_voxels = max(1, int(np.ceil(config.min_finding_ml / voxel_ml))) if config.min_finding_ml > 0 else 1
    false_findings = []
    for kind in config.finding_kinds:
        value = config.finding_label(kind)
        true_mask = truth == value
        for voxels in finding_components(predicted, value, min_voxels):
            if not true_mask[tuple(voxels.T)].any():
                false_findings.append({"kind": kind, "voxels": int(len(voxels)), "volume_ml": round(len(voxels) * voxel_ml, 3)})
    return {
        "seed": phantom.seed,
        "region": phantom.region,
        "dice": dices,
        "findings_true": len(found) + len(missed),
        "findings_found": found,
        "findings_missed": missed,
        "false_findings": false_findings,
        "finding_presence": result.finding_presence,
        "seconds": result.seconds,
    }


def evaluate_model(
    model_dir: str | Path | None,
    data_spec: str,
    *,
    limit: int | None = None,
    on_volume: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``segment_volume`` on every phantom of ``data_spec`` and summarise the metrics."""
    from napari_tghmoe.med3d.data import iter_phantoms
    from napari_tghmoe.med3d.encoder import SEG_ARCHITECTURE, read_folder_config
    from napari_tghmoe.med3d.segment import _resolve_model_dir, segment_volume

    folder = _resolve_model_dir(model_dir)
    config = read_folder_config(folder, SEG_ARCHITECTURE)
    started = time.perf_counter()
    volumes = []
    for count, phantom in enumerate(iter_phantoms(data_spec)):
        if limit is not None and count >= limit:
            break
        result = segment_volume(phantom.volume, folder)
        row = evaluate_phantom(phantom, result, config)
        volumes.append(row)
        if on_volume is not None:
            on_volume(row)
    per_organ: dict[str, list[float]] = {}
    for row in volumes:
        for organ, score in row["dice"].items():
            per_organ.setdefault(organ, []).append(score)
    organ_means = {organ: round(float(np.mean(scores)), 4) for organ, scores in per_organ.items()}
    true_total = sum(row["findings_true"] for row in volumes)
    found_total = sum(len(row["findings_found"]) for row in volumes)
    false_total = sum(len(row["false_findings"]) for row in volumes)
    by_kind: dict[str, list[int]] = {}
    for row in volumes:
        for item in row["findings_found"]:
            by_kind.setdefault(item["kind"], [0, 0])[0] += 1
        for item in row["findings_missed"]:
            by_kind.setdefault(item["kind"], [0, 0])[1] += 1
    return {
        "model": str(folder),
        "data": data_spec,
        "volumes": len(volumes),
        "mean_dice": round(float(np.mean(list(organ_means.values()))), 4) if organ_means else None,
        "dice_per_organ": organ_means,
        "finding_recall": round(found_total / true_total, 4) if true_total else None,
        "findings_true": true_total,
        "findings_found": found_total,
        "recall_per_kind": {k: {"found": v[0], "missed": v[1]} for k, v in sorted(by_kind.items())},
        "false_findings_per_volume": round(false_total / len(volumes), 4) if volumes else None,
        "seconds": round(time.perf_counter() - started, 1),
        "per_volume": volumes,
    }


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
