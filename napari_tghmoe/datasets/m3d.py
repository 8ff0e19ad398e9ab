"""M3D-Cap and M3D-VQA (BAAI M3D-Data) as :class:`~napari_tghmoe.datasets.samples.Sample` lists.

* **M3D-Cap** (``.npy`` 1x32x256x256 display intensities in [0, 1], not HU, + a caption
  text file), as M3D ships it: a folder with ``M3D_Cap.json`` (``{"train": [{"image", "text"}],
  ...}``) or just case folders holding ``*.npy`` and a ``.txt``.
* **M3D-VQA** (CSV: ``Image Path, Question, Choice A..D, Answer, Answer Choice,
  Question Type``): closed prompt ``"{question} Choices: A. {a} B. {b} C. {c} D. {d}"``,
  target ``"{letter}. {answer}"``; open prompt = question, target = answer.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from napari_tghmoe.datasets.samples import Phrasing, Sample, closed_vqa_prompt, closed_vqa_target
from napari_tghmoe.io import VolumeReadError
from napari_tghmoe.model.preprocess import INTENSITY_UNIT

#: M3D-VQA's numeric "Question Type" column, in the order of the M3D paper.
M3D_QTYPES = {1: "plane", 2: "phase", 3: "organ", 4: "abnormality", 5: "location"}
#: M3D volumes are display intensities in [0, 1] (JPEG/PNG slices as exported for display, then
#: min-max normalised per volume), not HU. They stay so: their samples and volumes say
#: ``intensity = "unit"`` and ``napari_tghmoe.model.preprocess`` maps each kind to the channels of
#: the model's ``input_intensity`` explicitly (no pseudo-HU at load time).
#: M3D's .npy files carry no spacing; a nominal one keeps depth positions consistent.
M3D_NOMINAL_SPACING = (5.0, 1.5, 1.5)


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
