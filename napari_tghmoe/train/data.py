"""Training and evaluation data: one sample schema, loaders for each source, collation.

Every source becomes a list of :class:`Sample` (volume or a path to it, prompt, target,
task, question type, meta), so training, evaluation and the demo share one code path:

* **M3D-Cap** (``.npy`` 1x32x256x256 display intensities in [0, 1], not HU, + a caption
  text file), as M3D ships it: a folder with ``M3D_Cap.json`` (``{"train": [{"image", "text"}],
  ...}``) or just case folders holding ``*.npy`` and a ``.txt``.
* **M3D-VQA** (CSV: ``Image Path, Question, Choice A..D, Answer, Answer Choice,
  Question Type``): closed prompt ``"{question} Choices: A. {a} B. {b} C. {c} D. {d}"``,
  target ``"{letter}. {answer}"``; open prompt = question, target = answer.
* **CT-RATE** (``.nii.gz`` + reports CSV with ``VolumeName, Findings_EN, Impressions_EN``).
* **Phantoms** generated from seeds and cached to disk as ``.npz`` (no pickle), keyed by
  seed, region, shape, spacing and a hash of the phantom code.

Volumes stay paths until :func:`load_sample_volume` (called by :func:`collate`), so a
dataset of thousands of scans costs no memory and DataLoader workers do the reading.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_tghmoe.io import CTVolume, VolumeReadError
from napari_tghmoe.io._geometry import orientation_name
from napari_tghmoe.model.preprocess import INTENSITY_HU, INTENSITY_UNIT, intensity_kind, volume_intensity
from napari_tghmoe.train import phrasings as _phr

TASKS = ("report", "vqa_closed", "vqa_open")
#: M3D-VQA's numeric "Question Type" column, in the order of the M3D paper.
M3D_QTYPES = {1: "plane", 2: "phase", 3: "organ", 4: "abnormality", 5: "location"}
#: M3D volumes are display intensities in [0, 1] (JPEG/PNG slices as exported for display, then
#: min-max normalised per volume), not HU. They stay so: their samples and volumes say
#: ``intensity = "unit"`` and ``napari_tghmoe.model.preprocess`` maps each kind to the channels of
#: the model's ``input_intensity`` explicitly (no pseudo-HU at load time).
#: M3D's .npy files carry no spacing; a nominal one keeps depth positions consistent.
M3D_NOMINAL_SPACING = (5.0, 1.5, 1.5)


def default_cache_dir() -> Path:
    """Where derived files go (phantom cache, WordNet folder): ``$TGHMOE_CACHE_DIR`` or ~/.cache."""
    root = os.environ.get("TGHMOE_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "napari-tghmoe"


@dataclass
class Sample:
    """One (volume, instruction, answer) training or evaluation item.

    ``volume``: a ``CTVolume``, a (z, y, x) HU array or tensor (spacing in
    ``meta["spacing"]``), or a path (``.npy`` M3D, ``.npz`` phantom cache, anything
    :func:`napari_tghmoe.io.load_volume` reads). ``meta`` carries what evaluation needs:
    ``id``, ``source``, and per task ``choices`` / ``answer_letter`` / ``answer_text``
    (closed VQA), ``question`` (the question before any framing), ``findings`` (phantom
    reports: list of {kind, location, size_mm}), ``intensity`` ("hu" or "unit", see
    :mod:`napari_tghmoe.model.preprocess`; "normalized" is read as "unit").
    """

    volume: Any
    prompt: str
    target: str
    task: str  # "report" | "vqa_closed" | "vqa_open"
    qtype: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")


# --------------------------------------------------------------------------- prompts


def closed_vqa_prompt(question: str, choices: Sequence[str]) -> str:
    """M3D closed-VQA prompt: ``"{question} Choices: A. {a} B. {b} C. {c} D. {d}"``."""
    from napari_tghmoe.model.prompts import format_closed_question  # the engine's own formatter

    if len(choices) != 4:
        raise ValueError(f"closed VQA needs four choices, got {len(choices)}")
    return format_closed_question(question, [str(choice).strip() for choice in choices])


def closed_vqa_target(letter: str, answer: str) -> str:
    return f"{letter.strip().upper()}. {str(answer).strip()}"


class Phrasing:
    """Picks report requests and question framings deterministically from a seed.

    ``style``: "train" (the training lists), "heldout" (evaluation-only lists) or "none"
    (the first report prompt — what the engine sends — and questions unchanged; the M3D
    benchmark protocol).
    """

    def __init__(self, style: str = "train", seed: int = 0, report_list: str | None = None, question_list: str | None = None):
        if style not in ("train", "heldout", "none"):
            raise ValueError(f"phrasing style must be train, heldout or none, got {style!r}")
        self.style = style
        self.rng = random.Random(seed)
        default_report = "report_heldout" if style == "heldout" else "report_train"
        default_question = "question_heldout" if style == "heldout" else "question_train"
        self.reports = _phr.get_phrasings(report_list or default_report)
        self.questions = _phr.get_phrasings(question_list or default_question)

    def report_request(self) -> str:
        if self.style == "none":
            return _phr.REPORT_TRAIN[0]
        return _phr.pick(self.reports, self.rng)

    def question(self, question: str) -> str:
        if self.style == "none":
            return question.strip()
        return _phr.apply_question_template(_phr.pick(self.questions, self.rng), question)


# --------------------------------------------------------------------------- volumes


def read_m3d_npy(path: str | Path) -> np.ndarray:
    """An M3D ``.npy`` (1, D, H, W) or (D, H, W) in [0, 1] -> (D, H, W) float32."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise VolumeReadError(path, f"not a readable .npy array ({err})") from err
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise VolumeReadError(path, f"expected a (1, D, H, W) or (D, H, W) array, got shape {array.shape}")
    return array.astype(np.float32, copy=False)


def load_sample_volume(sample: Sample) -> CTVolume:
    """The sample's volume as a ``CTVolume`` (reading its file if it is a path), its intensity kind
    in ``metadata["intensity"]``: the sample's ``meta["intensity"]``, "unit" for an M3D ``.npy``,
    "hu" for a phantom; left unset (guessed from the values by the preprocessing) otherwise.
    Values are never converted here: an M3D volume stays in [0, 1]."""
    volume = sample.volume
    meta = sample.meta
    spacing = tuple(meta.get("spacing") or (1.0, 1.0, 1.0))
    declared = intensity_kind(meta["intensity"]) if meta.get("intensity") else None
    if isinstance(volume, CTVolume):
        return volume
    if hasattr(volume, "detach"):  # a torch tensor
        volume = volume.detach().cpu().numpy()
    if isinstance(volume, np.ndarray):
        array = volume[0] if volume.ndim == 4 and volume.shape[0] == 1 else volume
        return CTVolume(hu=array, spacing=spacing, metadata={"intensity": declared} if declared else {})
    if not isinstance(volume, (str, Path)):
        raise TypeError(f"sample volume must be a CTVolume, array, tensor or path, got {type(volume).__name__}")
    path = Path(volume)
    if not path.exists():
        raise VolumeReadError(path, "file not found")
    name = path.name.lower()
    if name.endswith(".npy"):
        array = read_m3d_npy(path)
        return CTVolume(
            hu=array,
            spacing=tuple(meta.get("spacing") or M3D_NOMINAL_SPACING),
            source=str(path),
            metadata={"source_format": "M3D npy", "intensity": declared or INTENSITY_UNIT},
        )
    if name.endswith(".npz"):
        return read_phantom_cache(path).volume
    from napari_tghmoe.io import load_volume

    ct = load_volume(path)
    rescale = meta.get("rescale")
    if rescale and float(np.min(ct.hu)) >= 0:  # stored without the DICOM rescale (CT-RATE)
        slope, intercept = rescale
        ct.hu = ct.hu.astype(np.float32) * float(slope) + float(intercept)
    if declared:
        ct.metadata["intensity"] = declared
    return ct


def samples_intensity(samples: Sequence[Sample]) -> str:
    """The intensity kind most training samples hold (ties: "hu"): what a model trained on them
    is trained on (``config.input_intensity``); the minority is converted to it by the
    preprocessing, in training as at inference."""
    counts = {INTENSITY_HU: 0, INTENSITY_UNIT: 0}
    for sample in samples:
        if sample.meta.get("intensity"):
            kind = intensity_kind(sample.meta["intensity"])
        elif isinstance(sample.volume, CTVolume):
            kind = volume_intensity(sample.volume).kind
        elif isinstance(sample.volume, (str, Path)) and str(sample.volume).lower().endswith(".npy"):
            kind = INTENSITY_UNIT
        else:
            kind = INTENSITY_HU
        counts[kind] += 1
    return INTENSITY_UNIT if counts[INTENSITY_UNIT] > counts[INTENSITY_HU] else INTENSITY_HU


# --------------------------------------------------------------------------- phantoms


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


# --------------------------------------------------------------------------- M3D


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as err:
        raise VolumeReadError(path, f"caption text not readable ({err})") from err


def load_m3d_cap(
    root: str | Path,
    split: str = "test",
    phrasing: Phrasing | str = "none",
    limit: int | None = None,
    seed: int = 0,
) -> list[Sample]:
    """M3D-Cap report samples from ``root``.

    With an ``M3D_Cap.json`` (or any ``*.json`` holding ``{split: [{"image", "text"}]}``)
    in ``root``, the entries of ``split`` are used, paths relative to ``root``; otherwise
    every folder under ``root`` that holds ``.npy`` files and one ``.txt`` caption gives one
    sample per ``.npy``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: M3D-Cap folder not found")
    phrasing = phrasing if isinstance(phrasing, Phrasing) else Phrasing(phrasing, seed=seed)
    pairs: list[tuple[Path, Path]] = []
    index_files = sorted(root.glob("*.json"))
    if index_files:
        index_path = next((p for p in index_files if p.name == "M3D_Cap.json"), index_files[0])
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise VolumeReadError(index_path, f"not a readable M3D-Cap index ({err})") from err
        if split not in index:
            raise VolumeReadError(index_path, f"no split {split!r} (has {', '.join(index)})")
        for entry in index[split]:
            pairs.append((root / entry["image"], root / entry["text"]))
    else:
        for text_path in sorted(root.rglob("*.txt")):
            for image_path in sorted(text_path.parent.glob("*.npy")):
                pairs.append((image_path, text_path))
    if not pairs:
        raise VolumeReadError(root, "no M3D-Cap samples (.npy + .txt) found")
    samples = []
    for image_path, text_path in pairs[: limit or None]:
        samples.append(
            Sample(
                volume=str(image_path),
                prompt=phrasing.report_request(),
                target=_read_text(text_path),
                task="report",
                meta={
                    "id": str(image_path.relative_to(root)) if image_path.is_relative_to(root) else str(image_path),
                    "source": "m3d-cap",
                    "intensity": INTENSITY_UNIT,
                    "spacing": list(M3D_NOMINAL_SPACING),
                },
            )
        )
    return samples


def _m3d_qtype(value: Any) -> str:
    text = str(value).strip()
    try:
        return M3D_QTYPES.get(int(float(text)), text)
    except ValueError:
        return text.lower()


def _resolve_data_root(csv_path: Path, first_image: str, data_root: str | Path | None) -> Path:
    if data_root is not None:
        return Path(data_root)
    for candidate in (csv_path.parent, csv_path.parent.parent, csv_path.parent.parent.parent):
        if (candidate / first_image).exists():
            return candidate
    return csv_path.parent


def load_m3d_vqa(
    csv_path: str | Path,
    data_root: str | Path | None = None,
    mode: str = "closed",
    phrasing: Phrasing | str = "none",
    limit: int | None = None,
    seed: int = 0,
) -> list[Sample]:
    """M3D-VQA samples from its CSV; ``mode`` "closed", "open" or "both".

    ``Image Path`` is relative to ``data_root`` (default: the CSV's folder or the first
    parent in which the first image exists).
    """
    csv_path = Path(csv_path)
    if mode not in ("closed", "open", "both"):
        raise ValueError(f"mode must be closed, open or both, got {mode!r}")
    phrasing = phrasing if isinstance(phrasing, Phrasing) else Phrasing(phrasing, seed=seed)
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise VolumeReadError(csv_path, f"not a readable CSV ({err})") from err
    required = {"Image Path", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer", "Answer Choice", "Question Type"}
    missing = required - set(rows[0] if rows else {})
    if not rows or missing:
        raise VolumeReadError(csv_path, f"not an M3D-VQA CSV: missing columns {sorted(missing) or 'and rows'}")
    root = _resolve_data_root(csv_path, rows[0]["Image Path"], data_root)
    samples: list[Sample] = []
    for row_index, row in enumerate(rows[: limit or None]):
        choices = [row[f"Choice {letter}"].strip() for letter in "ABCD"]
        qtype = _m3d_qtype(row["Question Type"])
        question = phrasing.question(row["Question"])
        meta = {
            "id": f"{csv_path.stem}-{row_index}",
            "source": "m3d-vqa",
            "intensity": INTENSITY_UNIT,
            "spacing": list(M3D_NOMINAL_SPACING),
            "question": row["Question"].strip(),
            "choices": choices,
            "answer_letter": row["Answer Choice"].strip().upper(),
            "answer_text": row["Answer"].strip(),
        }
        volume = str(root / row["Image Path"])
        if mode in ("closed", "both"):
            samples.append(
                Sample(
                    volume, closed_vqa_prompt(question, choices),
                    closed_vqa_target(row["Answer Choice"], row["Answer"]), "vqa_closed", qtype, dict(meta),
                )
            )
        if mode in ("open", "both"):
            samples.append(Sample(volume, question, row["Answer"].strip(), "vqa_open", qtype, dict(meta)))
    return samples


# --------------------------------------------------------------------------- CT-RATE


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


# --------------------------------------------------------------------------- specs


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


def tasks_for(task: str) -> tuple[str, ...]:
    """CLI task name -> sample tasks: report, vqa (closed and open), vqa_closed, vqa_open, all."""
    mapping = {
        "report": ("report",),
        "vqa": ("vqa_closed", "vqa_open"),
        "vqa_closed": ("vqa_closed",),
        "vqa_open": ("vqa_open",),
        "all": TASKS,
    }
    if task not in mapping:
        raise ValueError(f"task must be one of {', '.join(mapping)}, got {task!r}")
    return mapping[task]


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


# --------------------------------------------------------------------------- collation

#: Tasks the model's groups are named after when the config has no ``group_names``.
DEFAULT_GROUP_NAMES = ("shared", "report", "vqa_closed", "vqa_open")
IGNORE_INDEX = -100


def _prompt_builder(tokenizer: Any, model_config: Any):
    """The engine's own prompt code, without a model: one rendering for training and inference."""
    from napari_tghmoe.engine import InferenceEngine

    class _PromptOnly(InferenceEngine):
        def __init__(self) -> None:  # noqa: D401 - deliberately skips loading a model
            self.tokenizer = tokenizer
            self.video_token_id = int(model_config.video_token_id)
            self.vision_start_token = "<|vision_start|>"
            self.vision_end_token = "<|vision_end|>"
            self.video_token = tokenizer.convert_ids_to_tokens(self.video_token_id)

    return _PromptOnly()


def instruction_for(prompt: str) -> str:
    """What the engine sends for a typed prompt (report requests become its report template)."""
    from napari_tghmoe.model.prompts import plan_prompt

    return plan_prompt(prompt).text


def collate(
    samples: Sequence[Sample],
    tokenizer: Any,
    model_config: Any,
    *,
    max_length: int | None = None,
    rewrite_like_engine: bool = True,
    zero_image: bool = False,
) -> dict[str, Any]:
    """Batch samples into keyword arguments for ``TGHMoEForConditionalGeneration.forward``.

    The prompt is rendered by the engine's own code (``InferenceEngine.build_inputs``):
    chat template, ``<|vision_start|>`` + ``<|video_pad|>`` x N + ``<|vision_end|>`` +
    instruction, assistant turn; then the target tokens and the end-of-turn token
    (``tokenizer.eos_token``). With ``rewrite_like_engine`` the instruction is what the
    engine would send for ``sample.prompt`` (``plan_prompt``), so training sees exactly what
    inference sees. Sequences are right-padded.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (prompt, vision tokens and padding
    = -100), ``mm_token_type_ids`` (2 on video tokens), ``text_guidance_mask`` (the
    instruction tokens only), ``pixel_values_videos`` (concatenated over the batch),
    ``video_grid_thw`` (B, 3), ``second_per_grid_ts`` (B,), ``task_labels`` (index of each
    sample's task in ``model_config.group_names``).
    ``max_length`` truncates the target (never the prompt or the vision tokens).
    ``zero_image`` (recipe ``[data] zero_image``) replaces ``pixel_values_videos`` by zeros of the
    same shape: the image-free control trained on the same budget (grid, tokens, positions and
    text unchanged, so the model differs only in what it sees).
    """
    import torch

    from napari_tghmoe.model.preprocess import prepare_volume
    from napari_tghmoe.model.prompts import routing_label

    if not samples:
        raise ValueError("collate needs at least one sample")
    builder = _prompt_builder(tokenizer, model_config)
    group_names = list(getattr(model_config, "group_names", None) or DEFAULT_GROUP_NAMES)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    rows: list[tuple[list[int], list[int], list[bool]]] = []
    pixels, grids, seconds, task_labels = [], [], [], []
    for sample in samples:
        inputs = prepare_volume(load_sample_volume(sample), None, model_config)
        instruction = instruction_for(sample.prompt) if rewrite_like_engine else sample.prompt.strip()
        prompt = builder.build_inputs(instruction, inputs.num_video_tokens)
        prompt_ids = prompt.input_ids[0].tolist()
        guidance = prompt.text_guidance_mask[0].tolist()
        target_ids = tokenizer(sample.target.strip(), add_special_tokens=False)["input_ids"] + [eos_id]
        if max_length is not None:
            room = max_length - len(prompt_ids)
            if room < 1:
                raise ValueError(
                    f"sample {sample.meta.get('id', '?')}: the prompt alone has {len(prompt_ids)} tokens, "
                    f"more than max_length={max_length}"
                )
            target_ids = target_ids[:room]
        ids = prompt_ids + target_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
        rows.append((ids, labels, guidance + [False] * len(target_ids)))
        pixels.append(inputs.pixel_values_videos)
        grids.append(inputs.video_grid_thw[0])
        seconds.append(inputs.second_per_grid_ts[0])
        task_labels.append(routing_label(sample.task, instruction, group_names))
    width = max(len(ids) for ids, _, _ in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    guidance_mask = torch.zeros((batch, width), dtype=torch.bool)
    for row, (ids, row_labels, guidance) in enumerate(rows):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(row_labels)
        guidance_mask[row, :n] = torch.tensor(guidance)
    video_token_id = int(model_config.video_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "mm_token_type_ids": (input_ids == video_token_id).to(torch.int32) * 2,
        "text_guidance_mask": guidance_mask,
        "pixel_values_videos": torch.zeros_like(torch.cat(pixels, dim=0)) if zero_image else torch.cat(pixels, dim=0),
        "video_grid_thw": torch.stack(grids).to(torch.long),
        "second_per_grid_ts": torch.stack(seconds).to(torch.float32),
        "task_labels": torch.tensor(task_labels, dtype=torch.long),
    }


def make_collate_fn(tokenizer: Any, model_config: Any, **options: Any):
    """``collate`` bound to a tokenizer and config, for ``torch.utils.data.DataLoader(collate_fn=...)``."""
    import functools

    return functools.partial(collate, tokenizer=tokenizer, model_config=model_config, **options)
