"""Peak memory of streaming checkpoint conversion vs model size (SmolLM2-135M-Instruct, fp32).

Each step runs in a fresh subprocess that reports its own peak RSS (``ru_maxrss``). The
"baseline" step only imports the converter (python + torch + safetensors), so
peak - baseline is what the conversion itself holds. The claim (docs/checkpoints.md):
extra memory is bounded by a small multiple of the largest parameter, not by the model size.

    python benchmarks/bench_convert_memory.py [--tp 2] [--pp 1]

Prints a table and writes benchmarks/results/convert_memory.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from megatron_rpp.checkpoint.convert import hf_to_megatron, megatron_to_hf
step, src, dst, tp, pp = {step!r}, {src!r}, {dst!r}, {tp}, {pp}
t = time.perf_counter()
if step == "hf_to_megatron":
    hf_to_megatron(src, dst, tp=tp, pp=pp)
elif step == "megatron_to_hf":
    megatron_to_hf(src, dst)
print(json.dumps({{"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   "seconds": time.perf_counter() - t}}))
"""


def run_step(step: str, src: str, dst: str, tp: int, pp: int) -> dict:
    code = _CHILD.format(repo=str(REPO), step=step, src=src, dst=dst, tp=tp, pp=pp)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size to convert to (default 2)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert to (default 1)")
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "convert_memory.json"),
                    help="where to write the JSON results")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from megatron_rpp.checkpoint.safetensors_stream import read_header
    from megatron_rpp.checkpoint.smollm2 import materialize_smollm2

    hf = materialize_smollm2()
    model_bytes = (hf / "model.safetensors").stat().st_size
    header = read_header(hf / "model.safetensors")
    largest_name = max(header, key=lambda n: header[n]["data_offsets"][1] - header[n]["data_offsets"][0])
    largest_bytes = header[largest_name]["data_offsets"][1] - header[largest_name]["data_offsets"][0]

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        mg, back = Path(tmp) / "mg", Path(tmp) / "hf"
        base = run_step("baseline", "", "", args.tp, args.pp)
        for step, src, dst in [("hf_to_megatron", hf, mg), ("megatron_to_hf", mg, back)]:
            t = time.perf_counter()
            r = run_step(step, str(src), str(dst), args.tp, args.pp)
            extra = r["peak_rss_bytes"] - base["peak_rss_bytes"]
            rows.append({
                "step": step, "tp": args.tp, "pp": args.pp,
                "peak_rss_mib": r["peak_rss_bytes"] / MiB, "baseline_rss_mib": base["peak_rss_bytes"] / MiB,
                "extra_rss_mib": extra / MiB, "model_mib": model_bytes / MiB, "largest_param_mib": largest_bytes / MiB,
                "extra_over_model": extra / model_bytes, "extra_over_largest_param": extra / largest_bytes,
                "convert_seconds": r["seconds"], "wall_seconds": time.perf_counter() - t,
            })

    print(f"SmolLM2-135M-Instruct fp32: model {model_bytes / MiB:.0f} MiB, largest parameter "
          f"{largest_name} {largest_bytes / MiB:.0f} MiB; baseline RSS (imports) {base['peak_rss_bytes'] / MiB:.0f} MiB")
    hdr = f"{'step':<16}{'tp':>3}{'pp':>3}{'peak MiB':>10}{'extra MiB':>11}{'extra/model':>13}{'extra/largest':>15}{'sec':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['step']:<16}{r['tp']:>3}{r['pp']:>3}{r['peak_rss_mib']:>10.0f}{r['extra_rss_mib']:>11.0f}"
              f"{r['extra_over_model']:>13.2f}{r['extra_over_largest_param']:>15.2f}{r['convert_seconds']:>7.1f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "dtype": "fp32", "rows": rows}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
