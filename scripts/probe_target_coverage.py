"""How well do the vision probe's per-patch targets match the lesions? Box targets vs mask targets.

    .venv/bin/python scripts/probe_target_coverage.py                 # seeds 0-199, both regions
    .venv/bin/python scripts/probe_target_coverage.py --seeds 100000-100099

Phantoms are rendered on the demo grid (recipes/demo.toml: 32 x 64 x 96 voxels, temporal patch 2,
patch 16, merge 2), so a patch is a plain 2 x 16 x 16 block of the phantom's own lesion mask
(``Phantom.lesions``) and "the patch holds a voxel of the finding" is read off that block directly,
independently of the code under test. For each kind, and for the targets before issue 19
(``box_patch_targets``: a cube of ``size_mm`` around the finding's centre) and after
(``lesion_patch_targets``: the mask on the model grid), it prints:

* precision: the share of positive patches that hold a voxel of a finding of that kind;
* recall: the share of patches holding such a voxel that are positive (for pleural effusion: the
  share of the fluid's patches).

A diagnostic of the labels, not of a model; a couple of CPU minutes for 400 phantoms.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

GRID = (32, 64, 96)
TEMPORAL_PATCH, PATCH, MERGE = 2, 16, 2


def seed_range(text: str) -> range:
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def patches_holding(lesions: np.ndarray, values: list[int]) -> np.ndarray:
    """(slabs, rows, columns) bool: the 2 x 16 x 16 blocks of ``lesions`` (a volume on the model grid)
    holding a voxel of any of ``values``."""
    t, h, w = GRID[0] // TEMPORAL_PATCH, GRID[1] // PATCH, GRID[2] // PATCH
    blocks = np.isin(lesions, values).reshape(t, TEMPORAL_PATCH, h, PATCH, w, PATCH)
    return blocks.any(axis=(1, 3, 5))


def to_patch_grid(targets: np.ndarray) -> np.ndarray:
    """Targets in the merger's order (tokens, merge*merge, kinds) -> (slabs, rows, columns, kinds)."""
    t, h, w = GRID[0] // TEMPORAL_PATCH, GRID[1] // PATCH, GRID[2] // PATCH
    kinds = targets.shape[-1]
    blocks = targets.reshape(t, h // MERGE, w // MERGE, MERGE, MERGE, kinds).transpose(0, 1, 3, 2, 4, 5)
    return blocks.reshape(t, h, w, kinds) > 0.5


def coverage(seeds: range) -> dict[str, dict[str, list[int]]]:
    """Per target kind ("box", "mask") and finding kind: [positive, positive holding a voxel,
    patches holding a voxel, of those positive] summed over the phantoms."""
    from napari_tghmoe.phantom import make_phantom
    from napari_tghmoe.train.vision_probe import KINDS, box_patch_targets, lesion_patch_targets

    counts = {name: {kind: [0, 0, 0, 0] for kind in KINDS} for name in ("box", "mask")}
    for seed in seeds:
        for region in ("chest", "abdomen"):
            case = make_phantom(seed, region=region, shape=GRID)
            findings = [dataclasses.asdict(finding) for finding in case.findings]
            geometry = (GRID, TEMPORAL_PATCH, PATCH, MERGE)
            targets = {
                "box": to_patch_grid(box_patch_targets(findings, case.lesions.shape, case.volume.spacing, *geometry)),
                "mask": to_patch_grid(lesion_patch_targets(case.lesions, findings, *geometry)),
            }
            for k, kind in enumerate(KINDS):
                values = [i + 1 for i, finding in enumerate(case.findings) if finding.kind == kind]
                holding = patches_holding(case.lesions, values)
                for name, target in targets.items():
                    positive = target[..., k]
                    counts[name][kind][0] += int(positive.sum())
                    counts[name][kind][1] += int((positive & holding).sum())
                    counts[name][kind][2] += int(holding.sum())
                    counts[name][kind][3] += int((holding & positive).sum())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-199", help="each seed gives a chest and an abdomen phantom")
    args = parser.parse_args()
    seeds = seed_range(args.seeds)
    counts = coverage(seeds)
    print(f"seeds {seeds.start}-{seeds.stop - 1}, chest and abdomen, grid {GRID}, patches {TEMPORAL_PATCH}x{PATCH}x{PATCH}")
    print("| kind | box: positive patches holding a lesion voxel | box: lesion patches positive "
          "| mask: positive patches holding a lesion voxel | mask: lesion patches positive |")
    print("|---|---|---|---|---|")

    def share(part: int, whole: int) -> str:
        return f"{part / whole:.2f} ({part}/{whole})" if whole else "n/a"

    for kind in counts["box"]:
        cells = []
        for name in ("box", "mask"):
            positive, positive_holding, holding, holding_positive = counts[name][kind]
            cells += [share(positive_holding, positive), share(holding_positive, holding)]
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
