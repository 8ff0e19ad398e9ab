"""Locate files bundled with the project (demo model, presets, WordNet list) and the cache folder."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def resources_dir() -> Path:
    """The project's ``resources/`` folder (beside the package in a source checkout)."""
    for candidate in (_PACKAGE_DIR.parent / "resources", _PACKAGE_DIR / "resources"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"resources folder not found next to {_PACKAGE_DIR}")


def resource_path(*parts: str) -> Path:
    return resources_dir().joinpath(*parts)


def demo_model_path() -> Path:
    """Folder of the bundled demo model (``resources/demo-model``)."""
    return resource_path("demo-model")


def default_cache_dir() -> Path:
    """Where derived files go (phantom cache, WordNet folder, placeholder model):
    ``$TGHMOE_CACHE_DIR``, else the platform's user cache folder (``$XDG_CACHE_HOME`` or ~/.cache
    on Linux) / napari-tghmoe."""
    root = os.environ.get("TGHMOE_CACHE_DIR")
    if root:
        return Path(root)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-tghmoe", appauthor=False))
