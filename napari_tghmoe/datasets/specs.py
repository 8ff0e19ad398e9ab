"""Data SPEC strings (``tghmoe eval --data``, recipes): ``"phantom:seeds=1000-1019,region=chest"``,
``"m3d-vqa:/data/test.csv,limit=5"`` ... -> samples of the right loader."""

from __future__ import annotations

import re
from pathlib import Path

from napari_tghmoe.datasets.ct_rate import load_ct_rate
from napari_tghmoe.datasets.m3d import load_m3d_cap, load_m3d_vqa
from napari_tghmoe.datasets.phantom import load_phantoms
from napari_tghmoe.datasets.samples import Phrasing, Sample, tasks_for


def parse_seed_range(text: str) -> list[int]:
    """``"1000-1019"``, ``"1,2,5"`` or ``"1-3+7"`` -> a list of seeds."""
    seeds: list[int] = []
    for part in re.split(r"[+;]", text):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if match:
            low, high = int(match.group(1)), int(match.group(2))
            if high < low:
                raise ValueError(f"seed range {part!r} runs backwards")
            seeds.extend(range(low, high + 1))
        else:
            seeds.extend(int(s) for s in part.split("|") if s.strip())
    if not seeds:
        raise ValueError(f"no seeds in {text!r}")
    return seeds


def _shape_or_spacing(text: str, cast: type) -> tuple:
    values = tuple(cast(v) for v in re.split(r"[x,]", text) if v.strip())
    if len(values) != 3:
        raise ValueError(f"expected three values like 32x64x64, got {text!r}")
    return values


def _spec_parts(body: str) -> tuple[str | None, dict[str, str]]:
    # "phantom:seeds=1-3,region=chest" / "m3d-vqa:/data/test.csv,limit=5"; seed lists use
    # "|" or "+" inside a value ("seeds=1|2|5"), so commas only separate options.
    pieces = [p for p in body.split(",") if p.strip()]
    location = None
    options: dict[str, str] = {}
    for piece in pieces:
        key, sep, value = piece.partition("=")
        if sep and re.fullmatch(r"[A-Za-z_][\w-]*", key.strip()):
            options[key.strip().replace("-", "_")] = value.strip()
        elif location is None:
            location = piece.strip()
        else:
            location += "," + piece  # a path that contains a comma
    return location, options


def load_dataset_spec(
    spec: str,
    task: str = "all",
    phrasing: str | None = None,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> list[Sample]:
    """Samples named by a data SPEC (what ``tghmoe eval --data`` and recipes accept).

    * ``phantom:seeds=1000-1019,region=chest[,shape=32x64x64][,spacing=5x1x1][,phrasing=heldout]``
      (region chest, abdomen or both)
    * ``m3d-vqa:/path/to.csv[,root=/data][,mode=closed|open|both]``
    * ``m3d-cap:/folder[,split=test]``
    * ``ct-rate:/folder[,target=findings]``

    ``phrasing`` (train/heldout/none) defaults to "heldout" for phantoms and "none" (the
    benchmark's own wording) for M3D and CT-RATE. Only samples of ``task`` are returned.
    """
    kind, sep, body = spec.partition(":")
    if not sep:
        raise ValueError(f"data spec {spec!r} must look like KIND:..., e.g. phantom:seeds=1-10,region=chest")
    kind = kind.strip().lower()
    location, options = _spec_parts(body)
    wanted = tasks_for(task)
    limit = int(options.pop("limit")) if "limit" in options and limit is None else limit
    style = options.pop("phrasing", None) or phrasing
    if kind == "phantom":
        if "seeds" not in options:
            raise ValueError(f"phantom spec {spec!r} needs seeds=, e.g. seeds=1000-1019")
        seeds = parse_seed_range(options.pop("seeds"))
        samples = load_phantoms(
            seeds,
            region=options.pop("region", "chest"),
            shape=_shape_or_spacing(options.pop("shape"), int) if "shape" in options else None,
            spacing=_shape_or_spacing(options.pop("spacing"), float) if "spacing" in options else None,
            tasks=wanted,
            phrasing=Phrasing(style or "heldout", seed=seed),
            cache_dir=cache_dir,
            seed=seed,
        )
    elif kind in ("m3d-vqa", "m3d_vqa"):
        if not location:
            raise ValueError(f"{spec!r}: give the CSV path, e.g. m3d-vqa:/data/M3D_VQA_test.csv")
        mode = options.pop("mode", None) or {
            ("vqa_closed",): "closed", ("vqa_open",): "open"
        }.get(tuple(t for t in wanted if t != "report"), "both")
        samples = load_m3d_vqa(location, options.pop("root", None), mode=mode, phrasing=style or "none", seed=seed)
    elif kind in ("m3d-cap", "m3d_cap"):
        if not location:
            raise ValueError(f"{spec!r}: give the folder, e.g. m3d-cap:/data/M3D_Cap_npy")
        samples = load_m3d_cap(location, split=options.pop("split", "test"), phrasing=style or "none", seed=seed)
    elif kind in ("ct-rate", "ct_rate"):
        if not location:
            raise ValueError(f"{spec!r}: give the folder, e.g. ct-rate:/data/CT-RATE/valid")
        samples = load_ct_rate(
            location,
            reports_csv=options.pop("reports", None),
            metadata_csv=options.pop("metadata", None),
            target=options.pop("target", "findings_impression"),
            phrasing=style or "none",
            seed=seed,
        )
    else:
        raise ValueError(f"unknown data kind {kind!r}: use phantom, m3d-vqa, m3d-cap or ct-rate")
    if options:
        raise ValueError(f"{spec!r}: unknown option(s) {', '.join(sorted(options))}")
    samples = [s for s in samples if s.task in wanted]
    return samples[:limit] if limit else samples
