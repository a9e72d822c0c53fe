"""Peak resident memory per rank attributable to the rollout engine: engine TP=1 vs engine TP=2.

SmolLM2-135M-Instruct, Megatron TP=2 on two spawned gloo ranks (fp32), as in training: each
rank first builds its Megatron shard and loads the weights, then (measured from here) builds
its vLLM engine part, syncs the weights into it and generates a few tokens. Engine TP=1: one
full engine per rank; engine TP=2: one engine over both ranks (external launcher), each rank
holding half of its weights (the engine runs Megatron's 4 KV groups; the direct-shard sync).

Per rank, from ``/proc/self/status``: ``VmHWM`` (peak RSS; reset through ``clear_refs`` just
before the engine is built) minus ``VmRSS`` before it = the engine's peak; ``VmRSS`` after
minus before = what it keeps. Large allocations go straight to mmap (``M_MMAP_THRESHOLD`` =
1 MiB) so freed buffers leave RSS. The KV cache (``kv_cache_gib``) is allocated but only the
blocks written count as resident. Each engine TP runs in its own spawn (a fresh process).

    python benchmarks/bench_engine_memory.py [--kv-cache-gib 0.25]

Prints a table and writes benchmarks/results/engine_memory.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _rank(hf_dir: str, engine_tp: int, kv_cache_gib: float) -> dict:
    import ctypes

    import torch
    import torch.distributed as dist

    from megatron_rpp.rollout.engine import SamplingConfig
    from megatron_rpp.rollout.engine_layout import engine_hf_config
    from megatron_rpp.rollout.self_check import check_engine_matches_trainer, probe_sequences
    from megatron_rpp.rollout.vllm_engine import VllmEngine
    from megatron_rpp.rollout.weight_sync import plan_sync, sync_weights

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    from bench_weight_sync import tp2_policy  # this folder is on sys.path (as for write_result)

    groups, cfg, arch, spec, model = tp2_policy(hf_dir)
    plan = plan_sync(spec, arch, groups.tp_size, engine_tp)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _kib("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        engine = VllmEngine.from_hf_config(engine_hf_config(cfg, spec, plan.engine_spec), f"{tmp}/rank{dist.get_rank()}",
                                           dtype=torch.float32, max_model_len=256, tensor_parallel_size=engine_tp,
                                           kv_cache_gib=kv_cache_gib, max_num_seqs=8)
    try:
        stats = sync_weights(model, groups, spec, arch, engine, bucket_bytes=8 * MiB)
        engine.generate([[1, 9690, 314, 260, 3575, 28]], SamplingConfig(temperature=0.0, max_tokens=16))
        check = check_engine_matches_trainer(engine, model, groups, probe_sequences(spec.vocab_size, num=2, length=16),
                                             max_abs_tol=1e-4)
        return {"engine_tp": engine_tp, "path": stats.path, "rss_before_kib": before, "peak_kib": _kib("VmHWM"),
                "rss_after_kib": _kib("VmRSS"), "sync_bytes": stats.bytes, "self_check": check["max_abs_diff"]}
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-cache-gib", type=float, default=0.25)
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "engine_memory.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    for k, v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)
    from megatron_rpp.checkpoint.smollm2 import materialize_smollm2
    from megatron_rpp.parallel.spawn import run_ranks

    hf_dir = str(materialize_smollm2())
    runs = {tp: run_ranks(_rank, 2, hf_dir, tp, args.kv_cache_gib, timeout=1200) for tp in (1, 2)}
    rows = []
    for tp, per_rank in runs.items():
        for rank, r in enumerate(per_rank):
            rows.append({**r, "rank": rank, "engine_peak_bytes": (r["peak_kib"] - r["rss_before_kib"]) * 1024,
                         "engine_kept_bytes": (r["rss_after_kib"] - r["rss_before_kib"]) * 1024})
    peak = {tp: max(r["engine_peak_bytes"] for r in rows if r["engine_tp"] == tp) for tp in (1, 2)}
    result = {"model": "SmolLM2-135M-Instruct (538 MB fp32)", "megatron": "TP=2, gloo, fp32",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "kv_cache_gib": args.kv_cache_gib,
              "rows": rows, "engine_peak_ratio_tp2_to_tp1": peak[2] / peak[1]}
    print(f"\nPeak RSS per rank attributable to the vLLM engine (build + sync + generate), kv_cache_gib={args.kv_cache_gib}")
    print(f"{'engine TP':>9}{'rank':>5}{'path':>8}{'before MiB':>11}{'engine peak MiB':>16}{'kept MiB':>9}{'check':>10}")
    for r in rows:
        print(f"{r['engine_tp']:>9}{r['rank']:>5}{r['path']:>8}{r['rss_before_kib'] / 1024:>11.0f}"
              f"{r['engine_peak_bytes'] / MiB:>16.0f}{r['engine_kept_bytes'] / MiB:>9.0f}{r['self_check']:>10.1e}")
    print(f"engine peak, TP=2 / TP=1: {result['engine_peak_ratio_tp2_to_tp1']:.2f}")
    from bench_weight_sync import write_result  # this folder is on sys.path when run as a script

    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
