"""Starting a short-lived Megatron world: ``run_ranks`` with spawned ranks vs ranks forked from a
preloading forkserver (``megatron_rpp.parallel.spawn.default_start_method``), side by side.

Each call starts ``--ranks`` gloo ranks that do what a distributed test's rank does first:
initialise Megatron's parallel state at TP = ``--ranks`` and build the SmolLM2-135M-Instruct
shape (random weights, fp32), then return. A spawned rank re-imports torch, megatron-core and
the trainer; a forked one has them from the server. The calls alternate between the two start
methods, ``--repeats`` of each; the first forkserver call also starts the server (its own
import), so it is reported apart from the median of the later ones.

    python benchmarks/bench_rank_start.py [--ranks 2] [--repeats 3] [--out PATH]

Prints a table and writes benchmarks/results/rank_start.json.
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
METHODS = ("spawn", "forkserver")


def _build(hf_dir: str, tp: int) -> int:
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.provider import build_gpt_model
    from megatron_rpp.models.spec import load_hf_config
    from megatron_rpp.parallel.groups import initialize_parallel

    groups = initialize_parallel(tp, 1)
    cfg = load_hf_config(hf_dir)
    model = build_gpt_model(architecture_for_config(cfg).model_spec(cfg).for_tp(tp), groups)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rank_start.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_weight_sync import write_result

    from megatron_rpp.checkpoint.smollm2 import materialize_smollm2
    from megatron_rpp.parallel.spawn import PRELOAD, run_ranks

    hf = str(materialize_smollm2())
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    numels = set()
    for i in range(args.repeats):
        for method in METHODS:
            t0 = time.perf_counter()
            numels.update(run_ranks(_build, args.ranks, hf, args.ranks, backend="gloo", start_method=method))
            times[method].append(time.perf_counter() - t0)
            print(f"[bench_rank_start] call {i + 1}/{args.repeats} {method}: {times[method][-1]:.2f} s", flush=True)
    first = times["forkserver"][0]
    later = {m: statistics.median(times[m][1:] if m == "forkserver" and len(times[m]) > 1 else times[m])
             for m in METHODS}
    result = {"what": f"run_ranks of {args.ranks} gloo ranks: Megatron TP={args.ranks}, build SmolLM2-135M shape",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "preload": list(PRELOAD),
              "parameters_per_rank": sorted(numels), "repeats": args.repeats, "all_seconds": times,
              "seconds": later, "forkserver_first_call_seconds": first,
              "speedup": later["spawn"] / later["forkserver"]}
    print(f"\nrun_ranks, {args.ranks} ranks (TP={args.ranks}, SmolLM2-135M shape built), seconds per call")
    print(f"{'start method':>14}{'median':>10}{'first call':>12}")
    for m in METHODS:
        print(f"{m:>14}{later[m]:>10.2f}{times[m][0]:>12.2f}")
    print(f"forked ranks start {result['speedup']:.1f}x faster (the server's own start: the first call)")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
