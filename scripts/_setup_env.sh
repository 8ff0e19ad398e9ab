# Sourced by demo.sh and test.sh: create .venv and install what is needed, idempotently.
# Nothing here runs at model run time; installs come from PyPI and Debian only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TGHMOE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

need_apt=()
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  command -v Xvfb >/dev/null 2>&1 || need_apt+=(xvfb)
  for pkg in libxcb-icccm4 libxcb-keysyms1 libgl1-mesa-dri libegl1 libgl1 libxkbcommon-x11-0 \
             libxcb-image0 libxcb-render-util0 libxcb-cursor0 libxcb-shape0 libfontconfig1 \
             libdbus-1-3 wordnet-base wordnet-sense-index dicom3tools; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
  done
  if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "[setup] installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  fi
fi

if [ ! -x "$PY" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi

# Reinstall only when the package definition changed.
STAMP="$VENV/.tghmoe-installed"
CONSTRAINTS="${TGHMOE_CONSTRAINTS-$ROOT/constraints.txt}"  # empty: newest releases (scripts/test_newest.sh)
WANT="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" ${CONSTRAINTS:+"$CONSTRAINTS"} | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing python packages into $VENV (torch==2.13.0 first, CPU build)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q -e "$ROOT[pyqt6,eval,test]" ${CONSTRAINTS:+-c "$CONSTRAINTS"}
  echo "$WANT" > "$STAMP"
fi

# NLTK METEOR needs WordNet: copy Debian's files plus our own lexnames list.
export NLTK_DATA="$VENV/nltk_data"
if [ -d /usr/share/wordnet ] && [ ! -f "$NLTK_DATA/corpora/wordnet/lexnames" ]; then
  mkdir -p "$NLTK_DATA/corpora/wordnet"
  cp -r /usr/share/wordnet/* "$NLTK_DATA/corpora/wordnet/"
  cp "$ROOT/resources/wordnet_lexnames.txt" "$NLTK_DATA/corpora/wordnet/lexnames"
fi

export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export PATH="$VENV/bin:$PATH"
