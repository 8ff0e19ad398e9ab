"""A TGH-MoE folder that points at its base Qwen2.5-VL folder instead of copying its weights.

``tghmoe convert`` adds experts, routers and LoRA beside a base whose every tensor stays
bit-identical, so copying the base's shards (7.5 GB for the 3B model) into the new folder would
only duplicate them. The converted folder therefore holds the TGH-MoE ``config.json``, the small
added tensors in :data:`ADAPTER_WEIGHTS_FILE`, tokenizer / processor / chat-template files (a few
MB, copied so the folder describes itself), and :data:`BASE_REFERENCE_FILE`, which names the base
folder (relative and absolute path) with the size and a digest of each base weight file at
conversion, so a base that moved, was cut short or was replaced is named instead of loading a
model that is not the one the experts were added to. The adapter file has its own name (not
``model.safetensors``) so stock transformers refuses the folder rather than filling the base with
random weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

BASE_REFERENCE_FILE = "tghmoe_base.json"
ADAPTER_WEIGHTS_FILE = "tghmoe_adapter.safetensors"
REFERENCE_FORMAT = "tghmoe-base-reference/1"


class BaseReferenceError(ValueError):
    """The base reference is unreadable, or the base it names is missing or changed (one line)."""


@dataclass(frozen=True)
class BaseReference:
    """What :data:`BASE_REFERENCE_FILE` says, with the base folder resolved."""

    folder: Path  # the TGH-MoE folder holding the reference
    base_path: Path  # the base Qwen2.5-VL folder, resolved
    weight_files: dict[str, int]  # base weight file name -> size in bytes at conversion
    weights_sha256: str | None  # digest of the base weight files at conversion (sha256_of_files)
    adapter_file: str

    @property
    def base_weight_paths(self) -> tuple[Path, ...]:
        return tuple(self.base_path / name for name in sorted(self.weight_files))

    @property
    def adapter_path(self) -> Path:
        return self.folder / self.adapter_file


def write_base_reference(
    out: str | Path,
    base: str | Path,
    weight_files: list[Path] | tuple[Path, ...],
    weights_sha256: str | None,
    adapter_file: str = ADAPTER_WEIGHTS_FILE,
    final_folder: str | Path | None = None,
) -> Path:
    """Write :data:`BASE_REFERENCE_FILE` into ``out``; return its path.

    ``final_folder``: where ``out`` will end up (convert writes into a staging folder and renames
    it), so the relative path is computed from there.
    """
    base = Path(base).expanduser().resolve()
    final = Path(final_folder or out).expanduser().resolve()
    data = {
        "format": REFERENCE_FORMAT,
        "base_path": str(base),
        "base_path_relative": os.path.relpath(base, final),
        "weight_files": {Path(f).name: Path(f).stat().st_size for f in sorted(weight_files)},
        "weights_sha256": weights_sha256,
        "adapter_file": adapter_file,
    }
    file = Path(out) / BASE_REFERENCE_FILE
    file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return file


def read_base_reference(folder: str | Path) -> BaseReference | None:
    """The folder's base reference, or None for a folder that holds all its weights.

    Raises :class:`BaseReferenceError` when the file is broken or the base folder is gone.
    """
    folder = Path(folder).expanduser()
    file = folder / BASE_REFERENCE_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if data.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        weight_files = {str(k): int(v) for k, v in data["weight_files"].items()}
        absolute = Path(data["base_path"])
        relative = data.get("base_path_relative")
        adapter_file = str(data.get("adapter_file") or ADAPTER_WEIGHTS_FILE)
        digest = data.get("weights_sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise BaseReferenceError(f"{BASE_REFERENCE_FILE} is not a valid base reference ({err})") from None
    if not weight_files:
        raise BaseReferenceError(f"{BASE_REFERENCE_FILE} lists no base weight files")
    candidates = ([folder / relative] if relative else []) + [absolute]
    base = next((c for c in candidates if c.is_dir()), None)
    if base is None:
        raise BaseReferenceError(
            f"the base model folder {absolute} ({BASE_REFERENCE_FILE}) is not there: this TGH-MoE folder "
            "holds only the experts; put the base Qwen2.5-VL folder back or run tghmoe convert again"
        )
    return BaseReference(folder, base.resolve(), weight_files, str(digest) if digest else None, adapter_file)


def verify_base_files(reference: BaseReference) -> None:
    """Every base weight file is there with the size it had at conversion (cheap: no reading)."""
    missing, changed = [], []
    for name, size in sorted(reference.weight_files.items()):
        path = reference.base_path / name
        if not path.is_file():
            missing.append(name)
        elif path.stat().st_size != size:
            changed.append(f"{name} ({path.stat().st_size} bytes, was {size})")
    if missing:
        raise BaseReferenceError(
            f"{len(missing)} base weight file(s) missing in {reference.base_path}: {', '.join(missing[:3])}"
        )
    if changed:
        raise BaseReferenceError(
            f"base weights in {reference.base_path} changed since conversion: {', '.join(changed[:3])}"
        )
    if not reference.adapter_path.is_file():
        raise BaseReferenceError(f"the expert weights {reference.adapter_file} are missing")
