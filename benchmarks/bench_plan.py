"""The memory planner against measurement: predicted vs measured peak per rank and phase (CPU).

For each workload (SmolLM2-135M-Instruct and a tiny random Llama, fp32, at TP=1, TP=2 and
PP=2) this runs the trainer's real workers (``trainer.worker.Worker`` in Ray actors, one per
rank) through the real loop (``trainer.loop.iteration``): one warm-up iteration (Adam's state
is allocated at the first step), then one measured iteration whose phase timer also resets
and reads every rank's peak resident memory around each phase:

- before a phase, each rank calls ``malloc_trim(0)`` (freed heap goes back to the OS) and
  writes ``5`` to ``/proc/self/clear_refs`` (VmHWM := current RSS);
- after it, each rank reads ``VmHWM`` (the phase's peak).

The process baseline (Python, torch, megatron-core, transformers and vLLM imported, before
any model) is measured once per rank when the worker starts and reported separately;
``measured`` is VmHWM minus it, ``predicted`` the plan's total minus its ``runtime`` term. The
plan is made for the step's realised shape (the longest prompt + response of the batch; the
shape is read from the batch ``phases.generate`` returns), with the engine TP the trainer
builds. Phases: generate; score = the old- and reference-log-prob forwards (their max);
train; weight_sync.

    python benchmarks/bench_plan.py [--workloads smollm2:tp1,tiny:pp2,...] [--out PATH] [--append]
    python benchmarks/bench_plan.py --replan      # re-predict the stored measurements (planner changes)

Writes benchmarks/results/plan.json. Needs ~6 GiB free (SmolLM2 at TP=2: two ranks of ~2.8 GiB).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # testlib: the tiny random Llama with SmolLM2's tokenizer
for _key, _value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                     "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)  # the test suite's settings (tests/conftest.py), before the imports below

from megatron_rpp.trainer.worker import Worker  # noqa: E402
from megatron_rpp.utils.logging import Timer  # noqa: E402

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
#: loop phase -> planner phase
PHASE_OF = {"generate": "generate", "old_log_probs": "score", "ref_log_probs": "score", "train": "train",
            "weight_sync": "weight_sync"}
MiB = 1 << 20


def memory_status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) << 10
    return out


def reset_peak() -> dict[str, int]:
    """Return freed heap to the OS, then VmHWM := current RSS; the status right after."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return memory_status()


class MeasuredWorker(Worker):
    """The trainer's Worker, plus two calls that reset / read this process's peak memory."""

    def __init__(self, rank, world_size, master_port, cfg, hf_dir):
        import megatron.core  # noqa: F401  the libraries of the baseline
        import transformers  # noqa: F401
        import vllm  # noqa: F401

        self.baseline = reset_peak()
        super().__init__(rank, world_size, master_port, cfg, hf_dir)
        self.built = memory_status()

    def mem_reset(self) -> dict[str, int]:
        return reset_peak()

    def mem_read(self) -> dict[str, int]:
        return memory_status()

    def mem_baseline(self) -> dict[str, int]:
        return {**self.baseline, "built_hwm": self.built["VmHWM"]}


class MeasuringTimer(Timer):
    """The loop's phase timer, also resetting / reading every rank's peak around each phase."""

    def __init__(self, group):
        super().__init__()
        self.group, self.start, self.peak = group, {}, {}

    @contextmanager
    def __call__(self, name: str):
        measured = name in PHASE_OF
        if measured:
            self.start[name] = self.group.call("mem_reset")
        with super().__call__(name):
            yield
        if measured:
            self.peak[name] = self.group.call("mem_read")


def workload_config(model: str, layout: str, workdir: Path):
    from megatron_rpp.config import load_config

    tp, pp = LAYOUTS[layout]
    if model == "smollm2":
        hf_dir = "smollm2"
    else:
        from testlib.tiny_hf import make_tiny_hf_dir

        hf_dir = str(make_tiny_hf_dir(workdir / "tiny_llama"))
    overrides = [
        f"model.hf_dir={hf_dir}", f"model.tensor_parallel_size={tp}", f"model.pipeline_parallel_size={pp}",
        "model.max_prompt_length=128", "model.max_response_length=32", "rollout.rollout_batch_size=8",
        "rollout.n_samples_per_prompt=4", "trainer.train_batch_size=32", "trainer.micro_batch_size=4",
        f"trainer.num_workers={tp * pp}", f"trainer.output_dir={workdir / f'{model}_{layout}'}",
        "trainer.progress=false", "data.num_eval_prompts=0", "algorithm.kl_coef=0.001",
        "algorithm.kl_use_loss=false", "trainer.export_hf=false", "rollout.bucket_mb=64",
        "trainer.skip_memory_check=true",
    ]
    return load_config(ROOT / "examples/configs/cpu_demo.yaml", overrides)


def predict(cfg, shape: dict):
    """The plan at the realised shape of the measured step, with the engine TP the trainer builds."""
    from megatron_rpp.planning import make_plan, plan_input_from_config
    from megatron_rpp.planning.capacity import host_memory_bytes

    inp = plan_input_from_config(cfg, device="cpu", capacity_bytes=host_memory_bytes())
    batch = replace(inp.batch, prompt_len=shape["longest"] - shape["response"], response_len=shape["response"])
    return make_plan(replace(inp, batch=batch))


def run_workload(model: str, layout: str, workdir: Path) -> dict:
    import megatron_rpp.trainer.group as group_mod
    from megatron_rpp.trainer import loop, phases
    from megatron_rpp.trainer.setup import setup_run

    cfg = workload_config(model, layout, workdir)
    group_mod.make_worker_group = lambda c, hf: group_mod.RayWorkerGroup(c, hf, c.trainer.num_workers,
                                                                         worker_cls=MeasuredWorker)
    shapes: list[dict] = []
    generate = phases.generate

    def observed_generate(group, layout, prompts, *args, **kwargs):  # reads the batch's shape; returns it unchanged
        batch = generate(group, layout, prompts, *args, **kwargs)
        if len(prompts) == cfg.rollout.rollout_batch_size:
            shapes.append({"longest": int(batch.sequence_lengths.max()), "response": int(batch.response_lengths.max())})
        return batch

    phases.generate = observed_generate
    t0 = time.perf_counter()
    ctx = setup_run(cfg)
    try:
        infos = ctx.group.call("info")
        baselines = ctx.group.call("mem_baseline")
        loop.iteration(ctx, 1, Timer())  # warm-up: Adam's state is allocated at the first optimizer step
        timer = MeasuringTimer(ctx.group)
        loop.iteration(ctx, 2, timer)
    finally:
        ctx.close()
        phases.generate = generate
    rows = []
    for info, base, in zip(infos, baselines):
        r = info["rank"]
        for phase in ("generate", "score", "train", "weight_sync"):
            loop_phases = [k for k, v in PHASE_OF.items() if v == phase and k in timer.peak]
            if not loop_phases:
                continue
            rows.append({
                "workload": f"{model}:{layout}", "rank": r, "pp_rank": info["pp_rank"], "phase": phase,
                "measured_bytes": max(timer.peak[k][r]["VmHWM"] for k in loop_phases) - base["VmHWM"],
                "measured_resident_bytes": max(timer.start[k][r]["VmRSS"] for k in loop_phases) - base["VmHWM"],
            })
    res = {"workload": f"{model}:{layout}", "shape": shapes[-1], "seconds": time.perf_counter() - t0,
           "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "baselines": [{"rank": i["rank"], **b} for i, b in zip(infos, baselines)], "rows": rows}
    return add_predictions(res, workdir)


def add_predictions(res: dict, workdir: Path) -> dict:
    """Fill in the plan's prediction of every measured row (the current planner; pure, no workers)."""
    model, layout = res["workload"].split(":")
    plan = predict(workload_config(model, layout, workdir), res["shape"])
    transient_terms = ("activations", "logprob_workspace", "grad_check", "weight_sync_buffer")
    for row in res["rows"]:
        pm = plan.phases[row["phase"]][row["pp_rank"]]
        row["predicted_bytes"] = pm.total - pm.terms["runtime"]
        row["error"] = row["predicted_bytes"] / row["measured_bytes"] - 1
        row["predicted_transient_bytes"] = sum(pm.terms[t] for t in transient_terms)
        row["terms"] = dict(pm.terms)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="tiny:tp1,tiny:tp2,tiny:pp2,smollm2:tp1,smollm2:tp2,smollm2:pp2")
    ap.add_argument("--workdir", default="/tmp/megatron_rpp_bench_plan")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan.json"))
    ap.add_argument("--append", action="store_true",
                    help="keep the other workloads already in --out (re-measure only these: a shared machine's "
                         "OOM killer may stop a long run)")
    ap.add_argument("--replan", action="store_true",
                    help="no measurement: re-predict the measurements already in --out with the current planner")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    if args.replan:
        stored = json.loads(out.read_text())["workloads"]
        runs = [(res["workload"], lambda res=res: add_predictions(res, workdir)) for res in stored]
    else:
        runs = [(spec, lambda spec=spec: run_workload(*spec.split(":"), workdir)) for spec in args.workloads.split(",")]
    results = []
    for _, run in runs:
        res = run()
        results.append(res)
        print(f"\n{res['workload']}: step shape {res['shape']}; process baseline per rank "
              + ", ".join(f"{b['VmHWM'] / MiB:.0f} MiB" for b in res["baselines"]))
        print(f"  {'rank':>4} {'pp':>3} {'phase':<12}{'predicted MiB':>14}{'measured MiB':>14}{'error':>8}"
              f"{'resident MiB':>14}")
        for row in res["rows"]:
            print(f"  {row['rank']:>4} {row['pp_rank']:>3} {row['phase']:<12}{row['predicted_bytes'] / MiB:>14.0f}"
                  f"{row['measured_bytes'] / MiB:>14.0f}{row['error']:>+8.1%}{row['measured_resident_bytes'] / MiB:>14.0f}")
    if args.append and not args.replan and out.is_file():
        names = {res["workload"] for res in results}
        results = [res for res in json.loads(out.read_text())["workloads"] if res["workload"] not in names] + results
    errors = [abs(r["error"]) for res in results for r in res["rows"]]
    summary = {"max_abs_error": max(errors), "within_15_percent": sum(e <= 0.15 for e in errors), "rows": len(errors)}
    print(f"\nmax |error| {summary['max_abs_error']:.1%}; {summary['within_15_percent']} of {summary['rows']} "
          "rank x phase peaks within 15 %")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "workloads": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
