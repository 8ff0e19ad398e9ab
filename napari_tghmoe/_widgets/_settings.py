"""The docks' remembered choices (model folder, device, layout): a small JSON file, no Qt.

Settings are a convenience: a missing or damaged file reads as empty and a failed write is
ignored, so they never stop the viewer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from napari_tghmoe.transcript import user_data_dir


def settings_path() -> Path:
    """The chat dock's settings file in the per-user data folder."""
    return user_data_dir() / "chat_settings.json"


def load_settings(path: Path | None = None) -> dict[str, Any]:
    path = path or settings_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_settings(data: dict[str, Any], path: Path | None = None) -> None:
    path = path or settings_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # settings are a convenience; never fail the UI over them
