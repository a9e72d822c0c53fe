"""Whole REINFORCE++ steps on CPU workloads, each phase against its compute floor, in one run.

Per workload (one in-process worker, SmolLM2-135M-Instruct fp32):

1. **standalone vLLM**: a fresh engine, built exactly as the worker builds its own, generates
   the prompt batches the trainer will use, with the same sampling and seeds (the floor of the
   generate phase), then is shut down;
2. **the trainer**: one warm-up step, then ``--steps`` timed steps (``loop.iteration``), with
   per-phase wall and process-CPU time (CPU utilisation: 2.0 = both cores busy);
3. **GEMM rate**: fp32 (and bf16 where the CPU multiplies it natively) matrix products at the
   model's own shapes, with the trainer's thread count.

Floors: train = 6·P·T_train / rate, each scoring forward (old, ref) = 2·P·T / rate (T: real
tokens of the sequences processed, P: parameters), generate = the standalone engine's time per
generated token x the tokens the trainer generated (the weights move between steps, so
response lengths differ; per-token time is the fair unit). The step's floor is their sum; the
phases without one (reward, advantages, weight sync, bookkeeping) count against the step.

    python benchmarks/bench_rl_step.py [--steps 2] [--workloads demo,gen64] [key=value ...]

Writes benchmarks/results/rl_step.json: per workload row ``step_over_floor`` and
``<phase>_over_floor`` (train, generate, old_log_probs, ref_log_probs), phase seconds, CPU
utilisation, real and padded token positions of training and scoring.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]

#: Workloads: config overrides on examples/configs/cpu_demo.yaml.
WORKLOADS = {
    # the demo as committed: 8 prompts x 4 samples, <= 32 new tokens, two optimizer steps per rollout batch
    "demo": [],
    # one optimizer step per rollout batch, <= 64 new tokens, KL as a loss (no old-policy forward)
    "gen64": ["model.max_response_length=64", "trainer.train_batch_size=32", "algorithm.kl_use_loss=true",
              "algorithm.kl_loss_estimator=k2"],
}
SCORED = {"old_log_probs": "tokens/score_real", "ref_log_probs": "tokens/score_real"}


def gemm_rate(hf_config: dict, dtype, rows: int = 1024, reps: int = 5) -> float:
    """FLOP/s of ``[rows, K] @ [K, N]`` products at the model's shapes (QKV, output projection,
    gate/up, down, vocabulary head), best of ``reps`` each, summed as the model does them."""
    import torch

    h, f, v = hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["vocab_size"]
    heads = hf_config["num_attention_heads"]
    d = hf_config.get("head_dim") or h // heads
    kv = hf_config.get("num_key_value_heads") or heads
    shapes = [(h, (heads + 2 * kv) * d), (heads * d, h), (h, 2 * f), (f, h), (h, v)]
    flops = seconds = 0.0
    for k, n in shapes:
        a, b = torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        flops += 2 * rows * k * n
        seconds += best
    return flops / seconds


def count_params(hf_dir: str) -> int:
    """Parameters of the HF checkpoint (from the safetensors headers; tied weights once)."""
    from megatron_rpp.checkpoint.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)
    return sum(math.prod(h["shape"]) for hdr in reader.headers.values() for k, h in hdr.items() if k != "__metadata__")


def time_generation(engine, cfg, prompt_batches, seeds) -> dict:
    """``engine`` generating ``prompt_batches`` (sampling and seeds as the trainer's); the first
    batch is a warm-up. Returns seconds and generated tokens of the others."""
    import torch

    from megatron_rpp.config.hyper import sampling_config

    r = cfg.rollout
    sampling = sampling_config(cfg, n=r.n_samples_per_prompt, temperature=r.temperature)
    seconds = tokens = 0.0
    for i, (prompts, seed) in enumerate(zip(prompt_batches, seeds)):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        out = engine.generate([p.token_ids for p in prompts], sampling)
        if i:
            seconds += time.perf_counter() - t0
            tokens += sum(len(o.token_ids) for o in out)
    return {"seconds": seconds, "tokens": tokens, "ms_per_token": 1e3 * seconds / max(tokens, 1)}


def standalone_generation(cfg, hf_dir: str, prompt_batches, seeds) -> dict:
    """A fresh engine, built as the worker builds its own (same threads), generating ``prompt_batches``."""
    from megatron_rpp.parallel.threads import claim_threads, rank_threads
    from megatron_rpp.rollout.vllm_engine import VllmEngine

    m, r = cfg.model, cfg.rollout
    threads = rank_threads(1)
    claim_threads(threads)
    engine = VllmEngine(hf_dir, dtype="float32" if m.dtype == "fp32" else "bfloat16", seed=cfg.trainer.seed,
                        max_model_len=m.max_prompt_length + m.max_response_length,
                        gpu_memory_utilization=r.gpu_memory_utilization, kv_cache_gib=r.kv_cache_gib)
    claim_threads(threads)
    try:
        return {**time_generation(engine, cfg, prompt_batches, seeds), "threads": threads}
    finally:
        engine.shutdown()


def run_workload(name: str, extra: list[str], steps: int, out_dir: str) -> dict:
    import torch

    from megatron_rpp.config import load_config
    from megatron_rpp.data.prompts import PromptStream, load_rows, tokenize_prompts
    from megatron_rpp.trainer.loop import iteration, needs_old_forward
    from megatron_rpp.trainer.setup import resolve_hf_dir, setup_run
    from megatron_rpp.utils.logging import Timer
    from transformers import AutoTokenizer

    overrides = ["trainer.num_workers=1", f"trainer.output_dir={out_dir}/{name}", "trainer.progress=false",
                 "data.num_eval_prompts=0", *WORKLOADS[name], *extra]
    cfg = load_config(ROOT / "examples/configs/cpu_demo.yaml", overrides)
    hf_dir = resolve_hf_dir(cfg.model.hf_dir)
    # The prompt batches and sampling seeds the trainer's steps 0..steps will use (loop.iteration).
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts, _ = tokenize_prompts(load_rows(cfg.data)[0], tokenizer, cfg.data, cfg.model.max_prompt_length)
    stream = PromptStream(prompts, cfg.data.seed)
    batches = [stream.next_batch(cfg.rollout.rollout_batch_size) for _ in range(steps + 1)]
    seeds = [(cfg.trainer.seed + step) * 1009 for step in range(steps + 1)]
    alone = standalone_generation(cfg, hf_dir, batches, seeds)

    ctx = setup_run(cfg)
    try:
        threads = ctx.group.call("info")[0]["threads"]
        timer = Timer(cpu=True)
        iteration(ctx, 0, timer)  # warm-up
        timer.pop()
        rows = []
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            row = iteration(ctx, step, timer)
            row.update(timer.pop())
            row["timing/step"] = time.perf_counter() - t0
            rows.append(row)
        # The trainer's own engine, called directly (no worker group, no RolloutBatch) after training.
        direct = time_generation(ctx.group.workers[0].engine, cfg, batches, seeds)
        rate = gemm_rate(json.loads((Path(hf_dir) / "config.json").read_text()), torch.float32)
        from megatron_rpp.kernels.backends import native_cpu_matmul

        rate_bf16 = (gemm_rate(json.loads((Path(hf_dir) / "config.json").read_text()), torch.bfloat16)
                     if native_cpu_matmul(torch.bfloat16) else None)
    finally:
        ctx.close()
    params = count_params(hf_dir)

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows) / len(rows)

    phases = ["generate", "reward", "old_log_probs", "ref_log_probs", "advantages", "train", "weight_sync"]
    seconds = {p: mean(f"timing/{p}") for p in phases}
    cpu_util = {p: mean(f"cpu_seconds/{p}") / seconds[p] for p in phases if seconds[p] > 0.05}
    gen_tokens = mean("response_length/mean") * cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    floors = {"train": 6 * params * mean("tokens/train_real") / rate,
              "generate": alone["seconds"] / alone["tokens"] * gen_tokens}
    scored = {"old_log_probs": needs_old_forward(cfg), "ref_log_probs": cfg.algorithm.kl_coef > 0}
    for p, on in scored.items():
        if on:
            floors[p] = 2 * params * mean("tokens/score_real") / rate
    step_s, step_floor = mean("timing/step"), sum(floors.values())
    row = {
        "workload": name, "overrides": overrides, "threads": threads, "params": params,
        "matmul_gflops_fp32": rate / 1e9, "matmul_gflops_bf16": rate_bf16 / 1e9 if rate_bf16 else None,
        "phases_s": seconds, "floors_s": floors, "cpu_utilisation": cpu_util, "step_s": step_s,
        "step_floor_s": step_floor, "step_over_floor": step_s / step_floor,
        **{f"{p}_over_floor": seconds[p] / f for p, f in floors.items()},
        "standalone_generate": alone, "trainer_engine_direct_generate": direct, "generated_tokens_per_step": gen_tokens,
        "generate_ms_per_token": 1e3 * seconds["generate"] / max(gen_tokens, 1),
        "tokens": {k.split("/", 1)[1]: mean(k) for k in ("tokens/train_real", "tokens/train_padded",
                                                          "tokens/score_real", "tokens/score_padded") if k in rows[0]},
    }
    return row


def print_row(row: dict) -> None:
    print(f"\n== {row['workload']}  ({row['threads']} threads, fp32 GEMM {row['matmul_gflops_fp32']:.0f} GFLOP/s, "
          f"P = {row['params'] / 1e6:.1f} M)")
    print(f"{'phase':<15}{'seconds':>9}{'floor':>9}{'x floor':>9}{'CPU util':>10}")
    for p, s in row["phases_s"].items():
        f = row["floors_s"].get(p)
        util = row["cpu_utilisation"].get(p)
        print(f"{p:<15}{s:>9.2f}{(f'{f:.2f}' if f else '-'):>9}{(f'{s / f:.2f}' if f else '-'):>9}"
              f"{(f'{util:.2f}' if util else '-'):>10}")
    print(f"{'step':<15}{row['step_s']:>9.2f}{row['step_floor_s']:>9.2f}{row['step_over_floor']:>9.2f}")
    t = row["tokens"]
    print(f"tokens: train {t.get('train_real', 0):.0f} real + {t.get('train_padded', 0):.0f} padded; "
          f"score {t.get('score_real', 0):.0f} real + {t.get('score_padded', 0):.0f} padded; "
          f"generated {row['generated_tokens_per_step']:.0f}/step")
    print(f"generation ms/token: in the trainer {row['generate_ms_per_token']:.1f}, its engine called directly "
          f"{row['trainer_engine_direct_generate']['ms_per_token']:.1f}, a fresh standalone engine "
          f"{row['standalone_generate']['ms_per_token']:.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--workloads", default="demo,gen64", help=f"comma-separated, of {', '.join(WORKLOADS)}")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rl_step.json"))
    ap.add_argument("--work-dir", default="/tmp/megatron_rpp_bench_rl_step")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every workload")
    args = ap.parse_args()
    rows = []
    for name in args.workloads.split(","):
        rows.append(run_workload(name, args.overrides, args.steps, args.work_dir))
        print_row(rows[-1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"workloads": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
