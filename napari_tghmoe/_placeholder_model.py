"""Old home of :mod:`napari_tghmoe.model.placeholder`; kept for the chat dock, the conversation
and the UI benchmark, which import the placeholder model from here."""

from __future__ import annotations

from napari_tghmoe.model.placeholder import (
    MARKER_FILE,
    MARKER_TEXT,
    build_placeholder_model,
    ensure_placeholder_model,
    is_placeholder,
    placeholder_model_dir,
)

__all__ = [
    "MARKER_FILE",
    "MARKER_TEXT",
    "build_placeholder_model",
    "ensure_placeholder_model",
    "is_placeholder",
    "placeholder_model_dir",
]
