"""Training and evaluation data: one sample schema, a loader per source, data SPEC strings.

Every source becomes a list of :class:`Sample` (volume or a path to it, prompt, target, task,
question type, meta), so training, evaluation and the demo share one code path. Evaluation reads
data from here without importing training; collation (tokens for the model) is training's
(:mod:`napari_tghmoe.train.collate`).

* :mod:`.phantom`: synthetic phantoms from seeds, cached as ``.npz`` (no pickle);
* :mod:`.m3d`: M3D-Cap (``.npy`` in [0, 1] + captions) and M3D-VQA (CSV);
* :mod:`.ct_rate`: CT-RATE (``.nii.gz`` + reports CSV);
* :mod:`.specs`: ``"phantom:seeds=1000-1019,region=chest"`` and friends;
* :mod:`.volumes`: a sample's volume as a ``CTVolume``, read only when needed;
* :mod:`.phrasings`: report-request and question wordings (train and held-out lists).
"""

from __future__ import annotations

from napari_tghmoe._resources import default_cache_dir
from napari_tghmoe.datasets.ct_rate import load_ct_rate
from napari_tghmoe.datasets.m3d import M3D_NOMINAL_SPACING, M3D_QTYPES, load_m3d_cap, load_m3d_vqa, read_m3d_npy
from napari_tghmoe.datasets.phantom import (
    PHANTOM_CACHE_FORMAT,
    CachedPhantom,
    cached_phantom,
    load_phantoms,
    phantom_cache_path,
    phantom_code_version,
    phantom_region,
    read_phantom_cache,
    write_phantom_cache,
)
from napari_tghmoe.datasets.samples import TASKS, Phrasing, Sample, closed_vqa_prompt, closed_vqa_target, tasks_for
from napari_tghmoe.datasets.specs import load_dataset_spec, parse_seed_range
from napari_tghmoe.datasets.volumes import load_sample_volume, samples_intensity

__all__ = [
    "M3D_NOMINAL_SPACING",
    "M3D_QTYPES",
    "PHANTOM_CACHE_FORMAT",
    "TASKS",
    "CachedPhantom",
    "Phrasing",
    "Sample",
    "cached_phantom",
    "closed_vqa_prompt",
    "closed_vqa_target",
    "default_cache_dir",
    "load_ct_rate",
    "load_dataset_spec",
    "load_m3d_cap",
    "load_m3d_vqa",
    "load_phantoms",
    "load_sample_volume",
    "parse_seed_range",
    "phantom_cache_path",
    "phantom_code_version",
    "phantom_region",
    "read_m3d_npy",
    "read_phantom_cache",
    "samples_intensity",
    "tasks_for",
    "write_phantom_cache",
]
