#!/usr/bin/env bash
# Create (or reuse) ./.venv and install invpt with the given extras. Sourced by demo.sh and test.sh.
# torch comes from the package index (its CUDA build runs on CPU too); see docs in README "Install".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-test}"
PY="${PYTHON:-python3}"
if [[ ! -x "$ROOT/.venv/bin/python" ]]; then
  echo "[setup] creating $ROOT/.venv"
  "$PY" -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/python" -m pip install -q --upgrade pip
fi
echo "[setup] installing invpt[$EXTRAS] (first run downloads torch, a few minutes)"
"$ROOT/.venv/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
"$ROOT/.venv/bin/python" -c "import invpt, torch, onnxruntime; print('[setup] ok: invpt', invpt.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
