"""The gradient check before the optimizer step: ``torch.isfinite(g).all()`` (the check until
2026-12-02) vs ``trainer.optim.all_finite`` (one ``aminmax`` reduction), side by side.

For fp32 buffers of SmolLM2-135M's gradient-buffer size (134,515,008 elements at TP=1) and a
quarter of it: median seconds of ``--repeats`` calls each (interleaved, after a warm-up), and the
bytes the call allocates (``torch.profiler`` with ``profile_memory``: the largest inclusive CPU
allocation of any op in the call).

    python benchmarks/bench_grad_check.py [--repeats 5] [--out PATH]

Prints a table and writes benchmarks/results/grad_check.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_rpp.trainer.optim import all_finite  # noqa: E402

MiB = 1 << 20
SIZES = {"SmolLM2-135M (TP=1)": 134_515_008, "a quarter of it": 134_515_008 // 4}


def _isfinite_all(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


CHECKS = {"isfinite(g).all()": _isfinite_all, "all_finite (aminmax)": all_finite}


def _allocated_bytes(fn, t) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(t)
    return max((e.cpu_memory_usage for e in prof.key_averages()), default=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grad_check.json"))
    args = ap.parse_args()
    rows = []
    for label, n in SIZES.items():
        g = torch.randn(n, generator=torch.Generator().manual_seed(0))
        times = {name: [] for name in CHECKS}
        for fn in CHECKS.values():
            assert fn(g)  # warm-up, and both agree on a finite buffer
        for _ in range(args.repeats):
            for name, fn in CHECKS.items():
                t0 = time.perf_counter()
                fn(g)
                times[name].append(time.perf_counter() - t0)
        for name, fn in CHECKS.items():
            rows.append({"buffer": label, "elements": n, "check": name,
                         "median_seconds": statistics.median(times[name]), "seconds": times[name],
                         "allocated_bytes": _allocated_bytes(fn, g)})
        del g
    print(f"{'buffer':<22}{'check':<24}{'median s':>10}{'allocated MiB':>15}")
    for r in rows:
        print(f"{r['buffer']:<22}{r['check']:<24}{r['median_seconds']:>10.4f}{r['allocated_bytes'] / MiB:>15.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows},
                              indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
