#!/usr/bin/env bash
# Set up clintune in ./.venv (idempotent: a second call only checks the stamp and returns).
# On a machine without an NVIDIA GPU it installs PyTorch's CPU build first, so the torch
# requirement does not pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
stamp=$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.setup-stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --quiet --disable-pip-version-check"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP "torch==2.13.0"            # CUDA build from PyPI
  else
    # CPU build: PyTorch's CPU index; a local wheel in pip's find-links (if any) is taken first.
    $PIP "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu --retries 0 --timeout 15 \
      || $PIP "torch==2.13.0"
  fi
fi
$PIP -e ".[dev]"
echo "$stamp" > "$VENV/.setup-stamp"
echo "clintune is set up in $VENV (activate with: . $VENV/bin/activate)" >&2
