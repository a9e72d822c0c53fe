"""Whole REINFORCE++ steps on a fixed CPU workload, against the compute floor.

Workload: SmolLM2-135M-Instruct fp32, 8 prompts x 4 samples, <= 64 new tokens, one
optimizer step per rollout batch, one in-process worker. After one warm-up step, times
``--steps`` steps and prints the per-phase breakdown next to the compute floor:

    floor = (6 * P * trained_tokens + 2 * P * tokens * extra_forwards) / matmul_rate

where P is the parameter count, ``extra_forwards`` the scoring forwards the step runs
(reference, and old-policy when needed) and ``matmul_rate`` the fp32 GEMM rate measured
in the same run on this machine. Target: step <= 1.5 x floor + generation time.

    python benchmarks/bench_rl_step.py [--steps 2] [--kl-in-reward] [key=value ...]

Trailing ``key=value`` arguments are config overrides (e.g. ``model.fused_output_layer=false``
to time Megatron's output layer + the logits kernel instead of the fused output layer).
Writes benchmarks/results/rl_step.json (or ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def matmul_rate(n: int = 1024, reps: int = 10) -> float:
    """Measured fp32 GEMM FLOP/s (square n x n, best of ``reps``)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def count_params(hf_dir: str) -> int:
    """Parameters of the HF checkpoint (from the safetensors headers; tied weights once)."""
    import math

    from megatron_rpp.checkpoint.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)
    return sum(math.prod(h["shape"]) for hdr in reader.headers.values() for k, h in hdr.items() if k != "__metadata__")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--kl-in-reward", action="store_true", help="KL in the reward (needs an old-policy forward)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rl_step.json"))
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="extra config overrides")
    args = ap.parse_args()

    from megatron_rpp.config import load_config
    from megatron_rpp.trainer.loop import iteration, needs_old_forward
    from megatron_rpp.trainer.setup import setup_run
    from megatron_rpp.utils.logging import Timer

    overrides = [
        "model.hf_dir=smollm2", "model.max_prompt_length=128", "model.max_response_length=64",
        "rollout.rollout_batch_size=8", "rollout.n_samples_per_prompt=4", "trainer.train_batch_size=32",
        "trainer.micro_batch_size=8", "trainer.num_workers=1", "trainer.output_dir=/tmp/megatron_rpp_bench_rl_step",
        "trainer.progress=false", "data.num_eval_prompts=0", "algorithm.kl_coef=0.001",
        f"algorithm.kl_use_loss={'false' if args.kl_in_reward else 'true'}", "algorithm.kl_loss_estimator=k2",
        *args.overrides,
    ]
    cfg = load_config(Path(__file__).parents[1] / "examples/configs/cpu_demo.yaml", overrides)
    ctx = setup_run(cfg)
    from megatron_rpp.trainer.setup import resolve_hf_dir

    ctx_hf_dir = resolve_hf_dir(cfg.model.hf_dir)
    try:
        rate = matmul_rate()
        timer = Timer()
        iteration(ctx, 0, timer)  # warm-up
        timer.pop()
        rows = []
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            m = iteration(ctx, step, timer)
            m.update(timer.pop())
            m["timing/step"] = time.perf_counter() - t0
            rows.append(m)
    finally:
        ctx.close()
    params = count_params(ctx_hf_dir)
    extra_forwards = int(cfg.algorithm.kl_coef > 0) + int(needs_old_forward(cfg))
    phases = ["generate", "old_log_probs", "ref_log_probs", "reward", "advantages", "train", "weight_sync"]
    avg = {p: sum(r.get(f"timing/{p}", 0.0) for r in rows) / len(rows) for p in phases}
    step_s = sum(r["timing/step"] for r in rows) / len(rows)
    tokens = sum(r["_tokens"] for r in rows) / len(rows)
    trained = tokens  # every token of the batch goes through forward+backward once
    floor = (6 * params * trained + 2 * params * tokens * extra_forwards) / rate
    result = {
        "overrides": args.overrides, "matmul_gflops": rate / 1e9, "tokens_per_step": tokens, "extra_forwards": extra_forwards,
        "phases_s": avg, "step_s": step_s, "compute_floor_s": floor,
        "target_s": 1.5 * floor + avg["generate"], "ratio_step_over_floor_plus_gen": step_s / (floor + avg["generate"]),
    }
    print(f"{'phase':<16}{'seconds':>10}")
    for p in phases:
        print(f"{p:<16}{avg[p]:>10.2f}")
    print(f"{'step':<16}{step_s:>10.2f}")
    print(f"\nfp32 matmul rate {rate / 1e9:.1f} GFLOP/s; tokens/step {tokens:.0f}; extra forwards {extra_forwards}")
    print(f"compute floor {floor:.2f} s; floor + generate {floor + avg['generate']:.2f} s; "
          f"target (1.5 x floor + generate) {result['target_s']:.2f} s; step / (floor + gen) = "
          f"{result['ratio_step_over_floor_plus_gen']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
