"""Peak resident memory per rank attributable to the rollout engine: engine TP=1 vs engine TP=2.

SmolLM2-135M-Instruct, Megatron TP=2 on two spawned gloo ranks (fp32), as in training: each
rank first builds its Megatron shard and loads the weights, then (measured from here) imports
vLLM, builds its engine part, syncs the weights into it, generates a few tokens and syncs
again (the loop's steady state: one sync per step). Engine TP=1: one full engine per rank;
engine TP=2: one engine over both ranks (external launcher), each rank holding half of its
weights (the engine runs Megatron's 4 KV groups; the direct-shard sync). The self-check runs
last, apart: it runs Megatron's forward too, whose memory is the trainer's, not the engine's.

Per rank, from ``/proc/self/status`` (``VmHWM`` reset through ``clear_refs``): RSS before
(Megatron's shard), after ``import vllm`` (the library: the same for every TP), the peak over
the engine's phases, what it keeps, and the peak of the self-check. Large allocations go
straight to mmap (``M_MMAP_THRESHOLD`` = 1 MiB) so freed buffers leave RSS. Three runs, each
in its own spawn (fresh processes):

* engine TP=1 with ``kv_cache_gib`` per rank;
* engine TP=2 with the same ``kv_cache_gib`` per rank: a TP=2 rank keeps half of the KV heads,
  so that engine holds more tokens (vLLM's ``kv_cache_memory_bytes`` is per worker);
* engine TP=2 sized to the TP=1 engine's token capacity (``kv_cache_gib`` x bytes-per-token
  ratio): the same engine, sharded; the comparison the ~1/k claim is about.

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
FP32 = 4


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def kv_bytes_per_token(engine_spec, engine_tp: int) -> int:
    """One rank's KV bytes per token (fp32): vLLM gives each rank ``groups / tp`` KV heads (at least 1)."""
    from megatron_rpp.planning.terms import kv_bytes_per_token as per_token

    heads = max(1, engine_spec.num_query_groups // engine_tp)
    return per_token(engine_spec.num_layers, heads, engine_spec.kv_channels, FP32)


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
    import vllm  # noqa: F401  (the library's own RSS, measured apart)
    import vllm.v1.engine.llm_engine  # noqa: F401

    after_import = _kib("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        engine = VllmEngine.from_hf_config(engine_hf_config(cfg, spec, plan.engine_spec), f"{tmp}/rank{dist.get_rank()}",
                                           dtype=torch.float32, max_model_len=256, tensor_parallel_size=engine_tp,
                                           kv_cache_gib=kv_cache_gib, max_num_seqs=8)
    try:
        stats = sync_weights(model, groups, spec, arch, engine, bucket_bytes=8 * MiB)
        engine.generate([[1, 9690, 314, 260, 3575, 28]], SamplingConfig(temperature=0.0, max_tokens=16))
        sync_weights(model, groups, spec, arch, engine, bucket_bytes=8 * MiB)
        engine_peak, kept = _kib("VmHWM"), _kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        check = check_engine_matches_trainer(engine, model, groups, probe_sequences(spec.vocab_size, num=2, length=16),
                                             max_abs_tol=1e-4)
        return {"engine_tp": engine_tp, "path": stats.path, "kv_cache_gib": kv_cache_gib,
                "kv_cache_tokens": int(kv_cache_gib * (1 << 30)) // kv_bytes_per_token(plan.engine_spec, engine_tp),
                "rss_before_kib": before, "rss_after_import_kib": after_import, "peak_kib": engine_peak,
                "rss_after_kib": kept, "self_check_peak_kib": _kib("VmHWM"), "sync_bytes": stats.bytes,
                "self_check": check["max_abs_diff"]}
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-cache-gib", type=float, default=0.25, help="the TP=1 engine's KV cache per rank")
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "engine_memory.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    for k, v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_gib (vllm_engine.py)
    from megatron_rpp.checkpoint.smollm2 import materialize_smollm2
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.spec import load_hf_config
    from megatron_rpp.parallel.spawn import run_ranks
    from megatron_rpp.rollout.engine_layout import engine_spec

    hf_dir = str(materialize_smollm2())
    spec = architecture_for_config(load_hf_config(hf_dir)).model_spec(load_hf_config(hf_dir)).for_tp(2)
    per_token = {tp: kv_bytes_per_token(engine_spec(spec, tp, 2), tp) for tp in (1, 2)}
    equal_tokens_gib = args.kv_cache_gib * per_token[2] / per_token[1]
    runs = {"tp1": (1, args.kv_cache_gib), "tp2_equal_bytes": (2, args.kv_cache_gib),
            "tp2_equal_tokens": (2, equal_tokens_gib)}
    rows = []
    for name, (tp, kv) in runs.items():
        for rank, r in enumerate(run_ranks(_rank, 2, hf_dir, tp, kv, timeout=1200)):
            rows.append({"run": name, **r, "rank": rank,
                         "library_bytes": (r["rss_after_import_kib"] - r["rss_before_kib"]) * 1024,
                         "engine_peak_bytes": (r["peak_kib"] - r["rss_before_kib"]) * 1024,
                         "engine_peak_after_import_bytes": (r["peak_kib"] - r["rss_after_import_kib"]) * 1024,
                         "engine_kept_bytes": (r["rss_after_kib"] - r["rss_before_kib"]) * 1024,
                         "self_check_peak_bytes": (r["self_check_peak_kib"] - r["rss_before_kib"]) * 1024})

    def peak(run: str, key: str) -> int:
        return max(r[key] for r in rows if r["run"] == run)

    result = {"model": "SmolLM2-135M-Instruct (538 MB fp32)", "megatron": "TP=2, gloo, fp32",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "kv_cache_gib": args.kv_cache_gib,
              "rows": rows,
              # the engine TP=2 engine at the TP=1 engine's token capacity, vLLM's library excluded:
              "engine_peak_ratio_tp2_to_tp1": peak("tp2_equal_tokens", "engine_peak_after_import_bytes")
              / peak("tp1", "engine_peak_after_import_bytes"),
              "engine_peak_ratio_tp2_to_tp1_with_library": peak("tp2_equal_tokens", "engine_peak_bytes")
              / peak("tp1", "engine_peak_bytes"),
              "engine_peak_ratio_tp2_equal_bytes_with_library": peak("tp2_equal_bytes", "engine_peak_bytes")
              / peak("tp1", "engine_peak_bytes")}
    print("\nPeak RSS per rank attributable to the vLLM engine (build + sync + generate + sync), MiB")
    print(f"{'run':>17}{'rank':>5}{'path':>7}{'KV GiB':>7}{'KV tokens':>10}{'before':>8}{'vllm lib':>9}"
          f"{'engine peak':>12}{'(w/o lib)':>10}{'kept':>7}{'check peak':>11}{'check':>9}")
    for r in rows:
        print(f"{r['run']:>17}{r['rank']:>5}{r['path']:>7}{r['kv_cache_gib']:>7.3f}{r['kv_cache_tokens']:>10}"
              f"{r['rss_before_kib'] / 1024:>8.0f}{r['library_bytes'] / MiB:>9.0f}{r['engine_peak_bytes'] / MiB:>12.0f}"
              f"{r['engine_peak_after_import_bytes'] / MiB:>10.0f}{r['engine_kept_bytes'] / MiB:>7.0f}"
              f"{r['self_check_peak_bytes'] / MiB:>11.0f}{r['self_check']:>9.1e}")
    print(f"engine peak TP=2 / TP=1, same token capacity, without vLLM's library: {result['engine_peak_ratio_tp2_to_tp1']:.2f}"
          f"; with it: {result['engine_peak_ratio_tp2_to_tp1_with_library']:.2f}"
          f"; same KV bytes per rank, with it: {result['engine_peak_ratio_tp2_equal_bytes_with_library']:.2f}")
    from bench_weight_sync import write_result  # this folder is on sys.path when run as a script

    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
