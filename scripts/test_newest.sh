#!/usr/bin/env bash
# The weekly-style check this workplace cannot schedule: install the NEWEST releases that setup.cfg
# allows (no constraints.txt) into a scratch venv (.venv-newest) and run the whole suite there.
# If it passes, refresh the pins: .venv-newest/bin/pip freeze --exclude-editable > constraints.txt
# (keep the header, write torch as torch==2.13.0). If it fails, the failure names the release that
# moved; pin or fix before bumping. Arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rm -rf "$ROOT/.venv-newest"
TGHMOE_VENV="$ROOT/.venv-newest" TGHMOE_CONSTRAINTS="" bash "$ROOT/scripts/test.sh" "$@"
"$ROOT/.venv-newest/bin/pip" freeze --exclude-editable | grep -iE '^(torch|transformers|accelerate|napari|monai|pot|highdicom|pydicom|numpy)=' || true
