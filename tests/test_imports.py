"""Import boundaries: what one part of the package may pull in of another."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import napari_tghmoe.eval


def test_evaluation_imports_nothing_from_training():
    """Evaluating a model needs its data and metrics, never the trainer: importing every module of
    ``napari_tghmoe.eval`` leaves ``napari_tghmoe.train`` unimported (a fresh interpreter, so
    nothing an earlier test imported can hide it)."""
    modules = ["napari_tghmoe.eval"] + [
        f"napari_tghmoe.eval.{info.name}" for info in pkgutil.iter_modules(napari_tghmoe.eval.__path__)
    ]
    assert len(modules) >= 5  # cli, evaluate, metrics, routing_content, baselines at least
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('napari_tghmoe'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(modules) <= set(loaded)
    assert [m for m in loaded if m == "napari_tghmoe.train" or m.startswith("napari_tghmoe.train.")] == []
