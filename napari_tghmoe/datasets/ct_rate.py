"""CT-RATE (``.nii.gz`` volumes + a reports CSV with ``VolumeName, Findings_EN, Impressions_EN``)
as report :class:`~napari_tghmoe.datasets.samples.Sample` lists."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from napari_tghmoe.datasets.samples import Phrasing, Sample
from napari_tghmoe.io import VolumeReadError
from napari_tghmoe.model.preprocess import INTENSITY_HU


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def load_ct_rate(
    root: str | Path,
    reports_csv: str | Path | None = None,
    metadata_csv: str | Path | None = None,
    phrasing: Phrasing | str = "none",
    target: str = "findings_impression",
    limit: int | None = None,
    seed: int = 0,
) -> list[Sample]:
    """CT-RATE report samples: every ``.nii.gz`` under ``root`` named in the reports CSV.

    ``reports_csv`` defaults to the ``*.csv`` files under ``root`` that have a
    ``Findings_EN`` column; a metadata CSV with ``RescaleSlope``/``RescaleIntercept`` (found
    the same way) is applied to volumes stored without the rescale. ``target``:
    "findings" or "findings_impression" (``"Findings: ...\\nImpression: ..."``).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: CT-RATE folder not found")
    if target not in ("findings", "findings_impression"):
        raise ValueError(f"target must be findings or findings_impression, got {target!r}")
    phrasing = phrasing if isinstance(phrasing, Phrasing) else Phrasing(phrasing, seed=seed)
    csv_files = [Path(reports_csv)] if reports_csv else sorted(root.rglob("*.csv"))
    reports: dict[str, dict[str, str]] = {}
    rescales: dict[str, tuple[float, float]] = {}
    for path in csv_files + ([Path(metadata_csv)] if metadata_csv else []):
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise VolumeReadError(path, f"not a readable CSV ({err})") from err
        for row in rows:
            name = (row.get("VolumeName") or "").strip()
            if not name:
                continue
            if "Findings_EN" in row:
                reports[name] = row
            slope, intercept = _float_or_none(row.get("RescaleSlope")), _float_or_none(row.get("RescaleIntercept"))
            if slope is not None and intercept is not None:
                rescales[name] = (slope, intercept)
    if not reports:
        raise VolumeReadError(root, "no CT-RATE reports CSV (with VolumeName and Findings_EN columns) found")
    volumes = {p.name: p for p in root.rglob("*.nii.gz")}
    samples = []
    for name in sorted(reports):
        if name not in volumes:
            continue
        row = reports[name]
        findings = (row.get("Findings_EN") or "").strip()
        impression = (row.get("Impressions_EN") or "").strip()
        text = findings if target == "findings" or not impression else f"Findings: {findings}\nImpression: {impression}"
        meta: dict[str, Any] = {"id": name, "source": "ct-rate", "intensity": INTENSITY_HU}
        if name in rescales:
            meta["rescale"] = list(rescales[name])
        samples.append(Sample(str(volumes[name]), phrasing.report_request(), text, "report", None, meta))
        if limit and len(samples) >= limit:
            break
    if not samples:
        raise VolumeReadError(root, "no .nii.gz volume under this folder is named in the reports CSV")
    return samples
