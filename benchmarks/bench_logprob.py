"""Naive vs fused log-probs: extra peak memory and time, forward and forward+backward.

    python benchmarks/bench_logprob.py            # full grid (CPU: ~20-30 min, ~11 GiB peak)
    python benchmarks/bench_logprob.py --quick    # smoke run, seconds
    python benchmarks/bench_logprob.py --rounds 3 --kinds linear   # interleaved repeats of a subset

Every (case, method) runs in a fresh subprocess, so one case's memory never hides
another's. Methods, side by side per case:

- ``naive``: ``log_softmax(logits.float() / T, -1).gather(-1, labels)`` (what the kernels replace);
  ``naive-linear``: the same on ``hidden @ weight.T``;
- ``fused-torch`` / ``fused-triton``: :func:`megatron_rpp.kernels.vocab_parallel_log_probs`
  with the backend forced; ``fused-linear-*``: :func:`fused_linear_log_probs`. Triton runs on CUDA only.

Memory. On CPU the subprocess runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so every large
buffer is its own mmap and goes back to the OS when freed; before each call the peak-RSS
counter is reset (``/proc/self/clear_refs`` ← 5) and the peak is read from ``VmHWM``.
On CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
The torch backend's kept chunk buffers are dropped before each call, so they count.
``extra`` = peak − memory before the call − the call's mandatory outputs (the log-probs,
and for forward+backward the gradients of the inputs, which any implementation must
return). The inputs are allocated before the baseline. Forward is measured under
``torch.no_grad()`` (scoring old/ref log-probs); forward+backward with autograd on
(training). Time: median over ``--reps`` calls after a small warm-up.

Writes benchmarks/results/logprob.json and prints a table.
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

RESULTS = Path(__file__).resolve().parent / "results" / "logprob.json"
MIB = 1 << 20


# ---- worker (one case, one method, fresh process) ----------------------------------------------


def _rss_reset_and_read() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _Meter:
    """Peak memory of one call above the memory held before it (bytes)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_reset_and_read()

    def stop(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def _make_call(spec: dict, scale: int = 1):
    """(inputs, fwd(), fwd_bwd()) for one case and method; scale > 1 shrinks it for warm-up."""
    import torch

    from megatron_rpp.kernels import fused_linear_log_probs, vocab_parallel_log_probs
    from megatron_rpp.kernels.reference import naive_log_probs

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    n, v, temperature = spec["N"] // scale, spec["V"] // scale, 0.9
    g = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    naive = spec["method"].startswith("naive")
    if spec["kind"] == "logits":
        x = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype)
        inputs = [x]

        def run(x):
            if naive:
                return naive_log_probs(x, labels, temperature)
            return vocab_parallel_log_probs(x, labels, temperature=temperature)
    else:
        h_dim = spec["H"] // scale
        hidden = torch.randn(n, h_dim, device=device, generator=g).to(dtype)
        weight = (torch.randn(v, h_dim, device=device, generator=g) / h_dim**0.5).to(dtype)
        inputs = [hidden, weight]

        def run(h, w):
            if naive:
                return naive_log_probs(h @ w.T, labels, temperature)
            return fused_linear_log_probs(h, w, labels, temperature=temperature)

    def fwd():
        with torch.no_grad():
            return run(*inputs)

    def fwd_bwd():
        leaves = [t.detach().requires_grad_() for t in inputs]
        run(*leaves).sum().backward()
        return [t.grad for t in leaves]

    return inputs, fwd, fwd_bwd


def _drop_workspaces() -> None:
    """Free the buffers the torch backend keeps between calls, so each measured call pays for them."""
    import torch

    from megatron_rpp.kernels.backends import TorchBackend, resolve_backend

    backend = resolve_backend(torch.device("cpu"), "torch")
    assert isinstance(backend, TorchBackend)
    backend.release_workspace()


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["method"].endswith("triton"):
        os.environ["MEGATRON_RPP_KERNEL_BACKEND"] = "triton"
    elif spec["method"].endswith("torch"):
        os.environ["MEGATRON_RPP_KERNEL_BACKEND"] = "torch"
    device = torch.device(spec["device"])
    for f in _make_call(spec, scale=16)[1:]:  # warm-up: libraries, kernels, Triton compile
        f()
    inputs, fwd, fwd_bwd = _make_call(spec)
    elem = inputs[0].element_size()
    grads_bytes = sum(t.numel() * elem for t in inputs)
    out = {}
    meter = _Meter(device)
    for mode, fn, mandatory in (("fwd", fwd, spec["N"] * 4), ("fwdbwd", fwd_bwd, spec["N"] * 4 + grads_bytes)):
        times, peaks = [], []
        for _ in range(spec["reps"]):
            _drop_workspaces()  # the backend's kept chunk buffers count as this call's memory
            meter.start()
            t0 = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            peaks.append(meter.stop())
            del result
        out[f"{mode}_s"] = statistics.median(times)
        out[f"{mode}_peak_mib"] = max(peaks) / MIB
        out[f"{mode}_extra_mib"] = (max(peaks) - mandatory) / MIB
    if device.type == "cuda" and spec["kind"] == "logits":
        x = inputs[0]
        copy = torch.empty_like(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            copy.copy_(x)
        torch.cuda.synchronize()
        out["copy_gbps"] = 2 * x.numel() * elem * 10 / (time.perf_counter() - t0) / 1e9
        out["fwd_read_gbps"] = x.numel() * elem / out["fwd_s"] / 1e9
    return out


# ---- driver -------------------------------------------------------------------------------------


def _native_bf16() -> bool:
    import torch

    from megatron_rpp.kernels.backends import native_cpu_matmul

    return native_cpu_matmul(torch.bfloat16)


def _grid(quick: bool, device: str, threads: int) -> list[dict]:
    cuda = device == "cuda"
    sizes_n, sizes_v, h_dim = ((256,), (8000,), 256) if quick else ((2048, 4096), (32000, 152064), 1024)
    methods = ["naive", "fused-torch"] + (["fused-triton"] if cuda else [])
    reps = 1 if quick else 3
    cases = []
    for n in sizes_n:
        for v in sizes_v:
            for dtype in ("float32", "bfloat16"):
                for m in methods:
                    cases.append(dict(kind="logits", N=n, V=v, H=None, dtype=dtype, method=m, reps=reps))
            # Without AMX / AVX512-BF16, CPU bf16 matmuls run at ~0.2 GFLOP/s: the naive bf16 linear
            # path is unmeasurable there (and the fused path computes fp32 tiles).
            for dtype in ("float32", "bfloat16") if cuda or _native_bf16() else ("float32",):
                for m in ["naive-linear"] + [f"fused-linear-{b.removeprefix('fused-')}" for b in methods[1:]]:
                    cases.append(dict(kind="linear", N=n, V=v, H=h_dim, dtype=dtype, method=m,
                                      reps=1 if (not cuda and not quick) else reps))
    for c in cases:
        c["device"], c["threads"] = device, threads
    return cases


def _run_case(spec: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(spec, error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    return dict(spec, **json.loads(proc.stdout.strip().splitlines()[-1]))


def _combine_rounds(runs: list[dict]) -> dict:
    """One (case, method) over the rounds: median times, largest memory; the first error if any failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    out = dict(runs[0], rounds=len(runs))
    for key in runs[0]:
        if key.endswith("_s") or key.endswith("gbps"):
            out[key] = statistics.median(r[key] for r in runs)
        elif key.endswith("_mib"):
            out[key] = max(r[key] for r in runs)
    return out


def _case_key(r: dict) -> tuple:
    return (r["kind"], r["N"], r["V"], r["H"], r["dtype"])


def _annotate(records: list[dict]) -> None:
    """Add each fused method's extra memory and time as a fraction of the naive method of its case."""
    naive = {_case_key(r): r for r in records if r["method"].startswith("naive") and "error" not in r}
    for r in records:
        base = naive.get(_case_key(r))
        if base is None or "error" in r or r is base:
            continue
        for mode in ("fwd", "fwdbwd"):
            r[f"{mode}_extra_vs_naive"] = r[f"{mode}_extra_mib"] / max(base[f"{mode}_extra_mib"], 1e-9)
            r[f"{mode}_time_vs_naive"] = r[f"{mode}_s"] / base[f"{mode}_s"]


def _table(records: list[dict]) -> str:
    head = ("| case | method | fwd s | fwd+bwd s | fwd extra MiB | fwd+bwd extra MiB | extra vs naive (fwd / f+b) "
            "| time vs naive (fwd / f+b) |")
    lines = [head, "|" + "---|" * 8]
    for r in records:
        case = f"{r['kind']} N={r['N']} V={r['V']}" + (f" H={r['H']}" if r["H"] else "") + f" {r['dtype']}"
        if "error" in r:
            lines.append(f"| {case} | {r['method']} | error: {r['error']} |||||")
            continue
        rel = (f"{100 * r['fwd_extra_vs_naive']:.1f}% / {100 * r['fwdbwd_extra_vs_naive']:.1f}%"
               if "fwd_extra_vs_naive" in r else "—")
        tim = (f"{r['fwd_time_vs_naive']:.2f}x / {r['fwdbwd_time_vs_naive']:.2f}x" if "fwd_time_vs_naive" in r else "—")
        lines.append(f"| {case} | {r['method']} | {r['fwd_s']:.3f} | {r['fwdbwd_s']:.3f} | {r['fwd_extra_mib']:.1f} "
                     f"| {r['fwdbwd_extra_mib']:.1f} | {rel} | {tim} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small case per kind (smoke test)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per run (default 1: on a shared machine, multi-threaded small ops "
                         "stall on descheduled OpenMP threads, which measures the neighbours, not the kernels)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole grid this many times, interleaved, and keep each (case, method)'s median "
                         "time and largest memory (a slow spell of a shared machine then hits every method)")
    ap.add_argument("--kinds", default="logits,linear", help="comma-separated subset of: logits, linear")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    load_start = os.getloadavg()
    kinds = set(args.kinds.split(","))
    if not kinds <= {"logits", "linear"} or args.rounds < 1:
        ap.error("--kinds takes logits and/or linear; --rounds at least 1")
    grid = [spec for spec in _grid(args.quick, device, args.threads) if spec["kind"] in kinds]
    rounds: list[list[dict]] = []
    for r in range(args.rounds):
        rounds.append([])
        for spec in grid:
            t0 = time.perf_counter()
            rounds[-1].append(_run_case(spec))
            print(f"  [round {r + 1}/{args.rounds}] {spec['kind']} N={spec['N']} V={spec['V']} {spec['dtype']} "
                  f"{spec['method']}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    records = [_combine_rounds(list(runs)) for runs in zip(*rounds)]
    _annotate(records)
    meta = dict(device=device, torch=torch.__version__, python=platform.python_version(),
                cpus=os.cpu_count(), threads=args.threads, cpu_native_bf16_matmul=_native_bf16(),
                load_avg_start=load_start, load_avg_end=os.getloadavg(), quick=args.quick, rounds=args.rounds,
                gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    print(_table(records))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
