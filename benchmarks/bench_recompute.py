"""Activation recompute (``model.recompute``): peak memory of a training step vs its time.

    python benchmarks/bench_recompute.py            # Llama-shaped 8 x 512 model, 4 x 1024 tokens (~3 min on 2 cores)
    python benchmarks/bench_recompute.py --quick    # smoke run, ~1 min

Each mode (``none``, ``selective``, ``full`` with 1 and 2 layers per unit) runs in a fresh
process on one gloo rank: the real ``provider.build_model`` + Megatron DDP + the trainer's
``forward_backward`` with the fused output layer (so the vocabulary costs no activation memory
and the rows compare the transformer layers' activations). Memory: peak RSS (``VmHWM``, reset
through ``/proc/self/clear_refs`` before the step, ``MALLOC_MMAP_THRESHOLD_=131072`` so freed
buffers leave RSS, as in bench_logprob.py) above the RSS before the step. Time: median of
``--reps`` steps after one warm-up, in the same process. The loss of every mode must equal
``none``'s (printed; tests/distributed/test_parallel_layouts.py asserts loss and gradients).

Writes benchmarks/results/recompute.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_logprob import _rss_reset_and_read, _status_kib  # noqa: E402  (same memory meter)

RESULTS = Path(__file__).resolve().parent / "results" / "recompute.json"
MIB = 1 << 20
MODES = {"none": {}, "selective": dict(recompute="selective"), "full-1": dict(recompute="full", recompute_num_layers=1),
         "full-2": dict(recompute="full", recompute_num_layers=2)}


def _config(quick: bool) -> dict:
    layers, hidden, seq, batch = (4, 256, 512, 2) if quick else (8, 512, 1024, 4)
    return {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": hidden * 11 // 4,
            "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 128,
            "head_dim": 64, "vocab_size": 32000, "max_position_embeddings": seq, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "_seq": seq, "_batch": batch}


def worker(mode: str, quick: bool, reps: int) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_rpp.data.rollout_batch import RolloutBatch
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.pipeline import forward_backward
    from megatron_rpp.models.provider import ModelOptions, build_model
    from megatron_rpp.models.scoring import output_context, to_micro_batches, token_log_probs
    from megatron_rpp.parallel.groups import initialize_parallel
    from megatron_rpp.parallel.spawn import free_port
    from megatron_rpp.trainer.optim import OptimConfig, wrap_for_training, zero_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = _config(quick)
    seq, batch_size = cfg.pop("_seq"), cfg.pop("_batch")
    groups = initialize_parallel(1, 1, seed=0)
    spec = architecture_for_config(cfg).model_spec(cfg).for_tp(1)
    model = build_model(spec, groups, options=ModelOptions(**MODES[mode]))
    ddp, opt = wrap_for_training(model, OptimConfig(lr=1e-4))
    g = torch.Generator().manual_seed(0)
    prompt = seq // 4
    batch = RolloutBatch.from_sequences(torch.randint(0, cfg["vocab_size"], (batch_size, prompt), generator=g).tolist(),
                                        torch.randint(0, cfg["vocab_size"], (batch_size, seq - prompt), generator=g).tolist())
    mbs = to_micro_batches(batch, batch_size, "cpu")
    n = batch.num_response_tokens

    def loss_fn(output, mb):
        b = mb.extras["batch"]
        lp, _ = token_log_probs(output, ddp, b, mb.input_ids, mb.extras["resp_index"], tp_group=None,
                                temperature=1.0, fused=True, with_entropy=False)
        loss = -lp.sum() / n
        return loss, {"loss": loss.detach()}

    def step() -> float:
        zero_grad(ddp, opt)
        with output_context(ddp, True):
            aux = forward_backward(ddp, mbs, loss_fn, groups, forward_only=False)
        return float(aux[0]["loss"])

    loss = step()  # warm-up (allocator, caches)
    times, peaks = [], []
    for _ in range(reps):
        base = _rss_reset_and_read()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peaks.append(_status_kib("VmHWM") * 1024 - base)
    dist.destroy_process_group()
    return {"mode": mode, "loss": loss, "step_s": statistics.median(times), "peak_extra_mib": max(peaks) / MIB,
            "params": sum(p.numel() for p in model.parameters()), "tokens": batch_size * seq,
            "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.quick, args.reps)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONWARNINGS="ignore")
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--worker", mode, "--reps", str(args.reps), "--threads", str(args.threads)]
        cmd += ["--quick"] if args.quick else []
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode:
            sys.exit(f"{mode} failed:\n{out.stderr[-4000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{rows[0]['layers']} layers x {rows[0]['hidden']} hidden, {rows[0]['params'] / 1e6:.1f} M params, "
          f"{rows[0]['tokens']} tokens per step, fp32, {args.threads} threads")
    print(f"| model.recompute | step s | peak extra MiB | memory vs none | time vs none | loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["memory_vs_none"] = r["peak_extra_mib"] / base["peak_extra_mib"]
        r["time_vs_none"] = r["step_s"] / base["step_s"]
        print(f"| {r['mode']} | {r['step_s']:.2f} | {r['peak_extra_mib']:.0f} | {r['memory_vs_none']:.2f}x | "
              f"{r['time_vs_none']:.2f}x | {r['loss']:.6f} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "quick": args.quick,
                                   "threads": args.threads, "reps": args.reps, "rows": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
