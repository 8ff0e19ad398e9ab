#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite under a virtual X server (pytest-xvfb).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_setup_env.sh"
cd "$ROOT"
unset QT_QPA_PLATFORM
python -m pytest "$@"
