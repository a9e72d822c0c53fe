"""The optimizer step on CPU: torch's AdamW per-tensor loop (megatron-core's default without
apex / transformer-engine) vs its fused kernel (``trainer.optim.use_fused_cpu_adam``), side by side.

The real SmolLM2-135M-Instruct shape (random weights), Megatron TP=1 on one gloo rank, fp32,
wrapped exactly as the trainer wraps it (Megatron DDP + ``get_megatron_optimizer``, gradient
clipping at 1.0). The gradient buffers are filled with seeded normal values, then
``optimizer.step()`` (clip + Adam) is timed ``--repeats`` times per kernel, interleaved, after a
warm-up; the median is reported. Before timing, both kernels take one step from the same
weights, moments and gradients: their results are compared (the fused kernel is the same
update, so they agree to float32 rounding).

    python benchmarks/bench_optimizer.py [--repeats 5] [--out PATH]

Prints a table and writes benchmarks/results/optimizer.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("per-tensor loop", "fused")


def _set_kernel(optimizer, fused: bool) -> None:
    from megatron_rpp.trainer.optim import torch_optimizers

    for opt in torch_optimizers(optimizer):
        for g in opt.param_groups:
            g["fused"] = fused


def _rank(hf_dir: str, repeats: int) -> dict:
    import torch

    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.provider import build_gpt_model
    from megatron_rpp.models.spec import load_hf_config
    from megatron_rpp.parallel.groups import initialize_parallel
    from megatron_rpp.trainer.optim import OptimConfig, torch_optimizers, wrap_for_training

    torch.manual_seed(0)
    groups = initialize_parallel(1, 1)
    cfg = load_hf_config(hf_dir)
    spec = architecture_for_config(cfg).model_spec(cfg).for_tp(1)
    ddp, optimizer = wrap_for_training(build_gpt_model(spec, groups), OptimConfig(lr=1e-5, clip_grad=1.0))
    params = [p for o in torch_optimizers(optimizer) for g in o.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(1)
    for buf in ddp.buffers:
        buf.grad_data.copy_(torch.randn(buf.grad_data.shape, generator=gen) * 1e-3)
    for p in params:  # DDP's main_grad views -> the optimizer's .grad (what finish_grad_sync leaves)
        p.grad = p.main_grad
    optimizer.step()  # creates the Adam state

    # One step of each kernel from the same state.
    weights = [p.detach().clone() for p in params]
    state = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()}
             for o in torch_optimizers(optimizer) for k, s in o.state.items()}
    after = {}
    for name in KERNELS:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        for o in torch_optimizers(optimizer):
            for k in o.state:
                o.state[k] = {n: (v.clone() if torch.is_tensor(v) else v) for n, v in state[k].items()}
        _set_kernel(optimizer, name == "fused")
        optimizer.step()
        after[name] = [p.detach().clone() for p in params]
    diff = max(float((a - b).abs().max()) for a, b in zip(*after.values()))
    scale = max(float(a.abs().max()) for a in after["fused"])
    delta = max(float((a - w).abs().max()) for a, w in zip(after["fused"], weights))

    times: dict[str, list[float]] = {k: [] for k in KERNELS}
    for _ in range(repeats):
        for name in KERNELS:
            _set_kernel(optimizer, name == "fused")
            t0 = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - t0)
    return {"elements": sum(p.numel() for p in params), "max_abs_diff": diff, "max_abs_weight": scale,
            "max_abs_update": delta, "torch_threads": torch.get_num_threads(), "seconds": {k: statistics.median(v) for k, v in times.items()},
            "all_seconds": times}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "optimizer.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_weight_sync import write_result

    from megatron_rpp.checkpoint.smollm2 import materialize_smollm2
    from megatron_rpp.parallel.spawn import run_ranks

    r = run_ranks(_rank, 1, str(materialize_smollm2()), args.repeats, timeout=1800)[0]
    loop, fused = r["seconds"]["per-tensor loop"], r["seconds"]["fused"]
    result = {"model": "SmolLM2-135M-Instruct shape, Megatron TP=1, fp32", "machine": f"{platform.machine()}, "
              f"{os.cpu_count()} cores", **r,
              "speedup": loop / fused}
    print(f"\noptimizer.step() (clip + AdamW) over {r['elements']:,} fp32 parameters, median of {args.repeats}")
    print(f"{'kernel':>16}{'seconds':>10}")
    for k in KERNELS:
        print(f"{k:>16}{r['seconds'][k]:>10.3f}")
    print(f"speed-up {result['speedup']:.1f}x; one step from the same state: max |fused - loop| = "
          f"{r['max_abs_diff']:.1e} (weights up to {r['max_abs_weight']:.2f}, update up to {r['max_abs_update']:.1e})")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
