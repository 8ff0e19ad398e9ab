#!/usr/bin/env bash
# Set up (idempotent), then open napari with the CT phantom in 3D, the linked orthogonal
# views and the plugin's docks.
#   bash scripts/demo.sh                      # interactive window
#   bash scripts/demo.sh --screenshot out.png # headless: save the whole window, exit 0
#   bash scripts/demo.sh [--region abdomen] [FILE]  # a DICOM folder/file, NIfTI, MHA, NRRD
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_setup_env.sh"
cd "$ROOT"
unset QT_QPA_PLATFORM  # offscreen has no OpenGL; napari needs a real (or virtual) X server

if [ -z "${DISPLAY:-}" ]; then
  if ! command -v Xvfb >/dev/null 2>&1; then
    echo "error: no DISPLAY and no Xvfb; install xvfb (Debian: apt-get install xvfb)" >&2
    exit 2
  fi
  # Start our own virtual X server on a free display number and stop it on exit.
  for n in $(seq 90 140); do
    [ -e "/tmp/.X${n}-lock" ] || [ -e "/tmp/.X11-unix/X${n}" ] || { DISPLAY_NUM=$n; break; }
  done
  Xvfb ":${DISPLAY_NUM}" -screen 0 1920x1200x24 -nolisten tcp >/dev/null 2>&1 &
  XVFB_PID=$!
  trap 'kill "$XVFB_PID" 2>/dev/null || true' EXIT
  export DISPLAY=":${DISPLAY_NUM}"
  for _ in $(seq 50); do [ -e "/tmp/.X11-unix/X${DISPLAY_NUM}" ] && break; sleep 0.1; done
fi

python -m napari_tghmoe "$@"
