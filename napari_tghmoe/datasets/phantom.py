"""Phantoms as samples: generated from seeds once, cached to disk as ``.npz`` (no pickle).

The cache is keyed by seed, region, shape, spacing, a hash of the phantom code and the file
layout, so any change to the phantom regenerates its files; volumes stay cache paths until
:func:`napari_tghmoe.datasets.load_sample_volume` reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_tghmoe._resources import default_cache_dir
from napari_tghmoe.datasets.samples import TASKS, Phrasing, Sample, closed_vqa_prompt, closed_vqa_target
from napari_tghmoe.io import CTVolume, VolumeReadError
from napari_tghmoe.io._geometry import orientation_name
from napari_tghmoe.model.preprocess import INTENSITY_HU


#: Layout of the phantom cache files; part of the cache key, so a change regenerates them.
#: 2: the lesion mask (``Phantom.lesions``) is stored beside the HU array.
PHANTOM_CACHE_FORMAT = 2


@dataclass
class CachedPhantom:
    """What the phantom cache keeps: the volume, the ground truth text needs, and the lesion
    mask (``Phantom.lesions``: i + 1 on the voxels of ``findings[i]``) the vision probe's targets
    come from. The mask also rides on ``volume.metadata["phantom_lesions"]`` so that a sample whose
    volume was loaded from the cache carries it to the probe."""

    volume: CTVolume
    seed: int
    region: str
    phase: str
    report: str
    findings: list[dict[str, Any]]
    vqa: list[dict[str, Any]]
    lesions: np.ndarray | None = None


def phantom_code_version() -> str:
    """Short hash of the phantom package sources: any change to them invalidates the cache."""
    import napari_tghmoe.phantom as phantom_pkg

    digest = hashlib.sha256()
    for source in sorted(Path(phantom_pkg.__file__).parent.glob("*.py")):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def phantom_cache_path(
    seed: int,
    region: str,
    shape: Sequence[int] | None,
    spacing: Sequence[float] | None,
    cache_dir: str | Path | None = None,
) -> Path:
    """File that holds phantom ``seed`` for this grid and this phantom code version."""
    key = json.dumps(
        {
            "seed": int(seed),
            "region": region,
            "shape": list(shape) if shape else None,
            "spacing": [float(s) for s in spacing] if spacing else None,
            "version": phantom_code_version(),
            "format": PHANTOM_CACHE_FORMAT,
        },
        sort_keys=True,
    )
    short = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "phantoms"
    return root / f"phantom-{region}-{int(seed)}-{short}.npz"


def write_phantom_cache(phantom: Any, path: str | Path) -> Path:
    """Save a ``Phantom`` as a compressed ``.npz`` (arrays + one JSON string; no pickle).

    Written to a temporary name and renamed, so parallel workers never read half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    volume = phantom.volume
    meta = {
        "seed": int(phantom.seed),
        "region": phantom.region,
        "phase": phantom.phase,
        "report": phantom.report,
        "spacing": list(volume.spacing),
        "origin": list(volume.origin),
        "direction": np.asarray(volume.direction).tolist(),
        "description": volume.description,
        "findings": [
            {
                "kind": f.kind,
                "organ": f.organ,
                "location": f.location,
                "size_mm": float(f.size_mm),
                "center_voxel": [int(v) for v in f.center_voxel],
                "mean_hu": float(f.mean_hu),
            }
            for f in phantom.findings
        ],
        "vqa": [
            {
                "question": item.question,
                "choices": list(item.choices),
                "answer_letter": item.answer_letter,
                "answer_text": item.answer_text,
                "qtype": item.qtype,
            }
            for item in phantom.vqa
        ],
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    lesions = np.asarray(phantom.lesions, dtype=np.uint8)
    if lesions.shape != np.asarray(volume.hu).shape:
        raise ValueError(f"{path}: lesion mask shape {lesions.shape} differs from the volume's {np.asarray(volume.hu).shape}")
    np.savez_compressed(temporary, hu=np.asarray(volume.hu), lesions=lesions, meta=np.array(json.dumps(meta)))
    os.replace(temporary, path)
    return path


def read_phantom_cache(path: str | Path) -> CachedPhantom:
    """A phantom cache file (:func:`write_phantom_cache`) -> :class:`CachedPhantom`; a file
    without a lesion mask (written before format 2) is a ``VolumeReadError``, so the cache
    regenerates it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            hu = data["hu"]
            lesions = data["lesions"]
            meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError) as err:
        raise VolumeReadError(path, f"not a phantom cache file of format {PHANTOM_CACHE_FORMAT} ({err})") from err
    if lesions.shape != hu.shape:
        raise VolumeReadError(path, f"lesion mask shape {lesions.shape} differs from the volume's {hu.shape}")
    volume = CTVolume(
        hu=hu,
        spacing=tuple(meta["spacing"]),
        origin=tuple(meta["origin"]),
        direction=np.asarray(meta["direction"]),
        description=meta.get("description", ""),
        source=str(path),
        metadata={"source_format": "phantom", "intensity": INTENSITY_HU, "phantom_lesions": lesions},
    )
    return CachedPhantom(
        volume, meta["seed"], meta["region"], meta["phase"], meta["report"], meta["findings"], meta["vqa"], lesions
    )


def cached_phantom(
    seed: int,
    region: str = "chest",
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Path, CachedPhantom]:
    """Phantom ``seed`` from the cache, generating and caching it on first use."""
    path = phantom_cache_path(seed, region, shape, spacing, cache_dir)
    if path.is_file():
        try:
            return path, read_phantom_cache(path)
        except VolumeReadError:
            pass  # a damaged cache file: regenerate it
    from napari_tghmoe.phantom import make_phantom

    # plane=None: the stored plane is drawn from the seed (axial, coronal, sagittal or oblique),
    # so the plane questions vary and the slice order shows the answer.
    phantom = make_phantom(int(seed), region=region, shape=shape, spacing=spacing, plane=None)
    write_phantom_cache(phantom, path)
    return path, read_phantom_cache(path)


def phantom_region(region: str, seed: int) -> str:
    """``"both"`` alternates chest (even seeds) and abdomen (odd seeds)."""
    if region == "both":
        return "chest" if seed % 2 == 0 else "abdomen"
    return region


def load_phantoms(
    seeds: Iterable[int],
    region: str = "chest",
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    tasks: Sequence[str] = TASKS,
    phrasing: Phrasing | str = "train",
    cache_dir: str | Path | None = None,
    reports_per_phantom: int = 1,
    seed: int = 0,
) -> list[Sample]:
    """Samples of every requested task from phantoms ``seeds`` (generated once, cached).

    Per phantom: ``reports_per_phantom`` report samples (different request phrasings),
    and for each VQA item one closed and/or one open sample. Volumes stay cache paths.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; expected some of {TASKS}")
    phrasing = phrasing if isinstance(phrasing, Phrasing) else Phrasing(phrasing, seed=seed)
    samples: list[Sample] = []
    for phantom_seed in seeds:
        this_region = phantom_region(region, int(phantom_seed))
        path, cached = cached_phantom(int(phantom_seed), this_region, shape, spacing, cache_dir)
        base = {
            "source": "phantom",
            "seed": cached.seed,
            "region": cached.region,
            "phase": cached.phase,
            "plane": orientation_name(cached.volume.direction),  # the stored plane (what its question asks)
            "spacing": list(cached.volume.spacing),
            "intensity": "hu",
            "phantom_findings": cached.findings,  # ground truth for the demo's vision probe
        }
        if "report" in tasks:
            for copy in range(reports_per_phantom):
                samples.append(
                    Sample(
                        volume=str(path),
                        prompt=phrasing.report_request(),
                        target=cached.report,
                        task="report",
                        qtype=None,
                        meta={**base, "id": f"phantom-{cached.seed}-report-{copy}", "findings": cached.findings},
                    )
                )
        for index, item in enumerate(cached.vqa):
            question = phrasing.question(item["question"])
            item_meta = {
                **base,
                "question": item["question"],
                "choices": list(item["choices"]),
                "answer_letter": item["answer_letter"],
                "answer_text": item["answer_text"],
            }
            if "vqa_closed" in tasks:
                samples.append(
                    Sample(
                        volume=str(path),
                        prompt=closed_vqa_prompt(question, item["choices"]),
                        target=closed_vqa_target(item["answer_letter"], item["answer_text"]),
                        task="vqa_closed",
                        qtype=item["qtype"],
                        meta={**item_meta, "id": f"phantom-{cached.seed}-vqa{index}-closed"},
                    )
                )
            if "vqa_open" in tasks:
                samples.append(
                    Sample(
                        volume=str(path),
                        prompt=question,
                        target=item["answer_text"],
                        task="vqa_open",
                        qtype=item["qtype"],
                        meta={**item_meta, "id": f"phantom-{cached.seed}-vqa{index}-open"},
                    )
                )
    return samples
