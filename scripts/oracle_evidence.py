"""Store simulated-cascade evidence for phantoms: their truth, spoilt like the cascade errs (issue 15).

    python scripts/oracle_evidence.py --seeds 310000-310999 --spacing 2.5x1.5x1.5 --out runs/evidence-oracle

Writes the same files as ``scripts/scan_evidence.py`` (``<out>/<phantom cache file stem>.json``,
served by ``TGHMOE_EVIDENCE_CACHE=<out>``) without running the cascade: the evidence comes from
:func:`napari_tghmoe.med3d.oracle_evidence.truth_segmentation` with the default
:class:`~napari_tghmoe.med3d.oracle_evidence.CascadeNoise`, drawn from the seed. Generates and
caches each phantom on the way (the training run then reads it from the cache). Only for training:
evaluation reads the real cascade.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path


def _one(args: tuple[int, tuple[float, float, float], str]) -> str:
    seed, spacing, out = args
    import numpy as np

    from napari_tghmoe.datasets.phantom import phantom_cache_path, phantom_region, write_phantom_cache
    from napari_tghmoe.med3d.evidence import scan_evidence
    from napari_tghmoe.med3d.evidence_files import truth_record, write_evidence_file
    from napari_tghmoe.med3d.oracle_evidence import CascadeNoise, truth_segmentation
    from napari_tghmoe.phantom import make_phantom

    region = phantom_region("both", seed)
    path = phantom_cache_path(seed, region, None, spacing)
    target = Path(out) / f"{path.stem}.json"
    if target.exists() and path.exists() and "center_voxel" in target.read_text(encoding="utf-8"):
        return f"{seed}: kept"
    # the same call as datasets.phantom.cached_phantom, so the cached file is that phantom
    phantom = make_phantom(seed, region=region, shape=None, spacing=spacing, plane=None)
    if not path.exists():
        write_phantom_cache(phantom, path)
    noise = CascadeNoise()
    result = truth_segmentation(phantom, noise, np.random.default_rng([seed, 15]))
    evidence = scan_evidence(phantom.volume, result).to_json()
    evidence["seed"] = seed
    evidence["extra"] = {"simulated": asdict(noise)}
    evidence["truth"] = truth_record(phantom.phase, phantom.plane, phantom.volume.spacing, phantom.findings)
    write_evidence_file(target, evidence)
    return f"{seed}: {len(result.findings)} simulated, {len(phantom.findings)} true"


def main(argv: list[str] | None = None) -> int:
    from napari_tghmoe.med3d.evidence_files import seeds_main

    return seeds_main(__doc__.split("\n")[0], _one, argv)


if __name__ == "__main__":
    sys.exit(main())
