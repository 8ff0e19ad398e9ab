"""The data names training code, recipes and older scripts import from ``napari_tghmoe.train.data``.

Samples, loaders and data specs live in :mod:`napari_tghmoe.datasets` (evaluation reads them
without importing training); collation lives in :mod:`napari_tghmoe.train.collate`; the prompt
rewrite in :func:`napari_tghmoe.model.prompts.instruction_for`. This module only re-exports them.
"""

from __future__ import annotations

from napari_tghmoe.datasets import (
    M3D_NOMINAL_SPACING,
    M3D_QTYPES,
    PHANTOM_CACHE_FORMAT,
    TASKS,
    CachedPhantom,
    Phrasing,
    Sample,
    cached_phantom,
    closed_vqa_prompt,
    closed_vqa_target,
    default_cache_dir,
    load_ct_rate,
    load_dataset_spec,
    load_m3d_cap,
    load_m3d_vqa,
    load_phantoms,
    load_sample_volume,
    parse_seed_range,
    phantom_cache_path,
    phantom_code_version,
    phantom_region,
    read_m3d_npy,
    read_phantom_cache,
    samples_intensity,
    tasks_for,
    write_phantom_cache,
)
from napari_tghmoe.model.prompts import instruction_for
from napari_tghmoe.train.collate import DEFAULT_GROUP_NAMES, IGNORE_INDEX, collate, make_collate_fn

__all__ = [
    "DEFAULT_GROUP_NAMES",
    "IGNORE_INDEX",
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
    "collate",
    "default_cache_dir",
    "instruction_for",
    "load_ct_rate",
    "load_dataset_spec",
    "load_m3d_cap",
    "load_m3d_vqa",
    "load_phantoms",
    "load_sample_volume",
    "make_collate_fn",
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
