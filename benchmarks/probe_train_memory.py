"""Where the training phase's memory goes: peak RSS and peak malloc'd bytes per part of one step.

One gloo rank builds the policy exactly as the trainer's worker does (``build_model`` +
``load_hf_weights`` + ``wrap_for_training``, fp32, fused output layer) and runs
``trainer.update.policy_update`` on a synthetic batch of the bench_plan workload's shape
(32 sequences, prompt + response = ``--prompt`` + ``--response`` tokens, micro-batches of 4):
one warm-up step (Adam's state), then ``--steps`` measured ones. A sampler thread reads, every
~1 ms, the RSS (``/proc/self/statm``) and glibc's bytes in use (``mallinfo2``: ``uordblks`` +
``hblkhd``), and keeps their maxima per *part* of the step (the RSS maximum is exact: ``VmHWM``
is reset through ``/proc/self/clear_refs`` when a part starts and read when it ends; the malloc'd
maximum is sampled, so it misses transients shorter than ~1 ms); the part is set by hooks:

- ``forward``: the decoder's forward; ``head``: the final norm + fused output layer and loss;
- ``backward_head``: from the start of backward to the first decoder layer's backward
  (output layer, final norm, the loss);
- ``backward_layers``: the decoder layers' backward; ``backward_embedding``: after the
  last decoder layer's backward (embedding backward, the tied weight's gradient accumulation,
  DDP's hook folding it into the gradient buffer);
- ``optimizer``: ``optimizer.step`` (Megatron's clip + Adam).

Both maxima are reported above the RSS / bytes in use at the start of the step. RSS minus
malloc'd bytes is memory glibc keeps but no tensor uses (free chunks inside the heaps).

    python benchmarks/probe_train_memory.py [--model smollm2] [--steps 2] [--out PATH]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    return 0


class Sampler(threading.Thread):
    """Max RSS and max malloc'd bytes per part, sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.001):
        super().__init__(daemon=True)
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallinfo2.restype = _Mallinfo2
        self.period, self.part, self.stop = period, "idle", False
        self.peak: dict[str, list[int]] = {}

    def sample(self) -> tuple[int, int]:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        m = self.libc.mallinfo2()
        return rss, m.uordblks + m.hblkhd

    def mark(self, part: str) -> None:
        """End the current part (its exact peak RSS: VmHWM since its start), start ``part``."""
        self._record(hwm=_vm_hwm())
        self.part = part
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        self._record()

    def _record(self, hwm: int = 0) -> None:
        rss, used = self.sample()
        cur = self.peak.setdefault(self.part, [0, 0])
        cur[0], cur[1] = max(cur[0], rss, hwm), max(cur[1], used)

    def run(self) -> None:
        while not self.stop:
            self._record()
            time.sleep(self.period)


def _probe(model_name: str, steps: int, prompt: int, response: int, rows: int, micro: int, profile: float) -> dict:
    import torch

    from megatron_rpp.algorithms.policy_loss import PolicyLossConfig
    from megatron_rpp.checkpoint.hf_loader import load_hf_weights
    from megatron_rpp.data.rollout_batch import RolloutBatch
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.provider import build_model
    from megatron_rpp.models.spec import load_hf_config
    from megatron_rpp.parallel.groups import initialize_parallel
    from megatron_rpp.trainer.optim import OptimConfig, wrap_for_training
    from megatron_rpp.trainer.setup import resolve_hf_dir
    from megatron_rpp.trainer.update import StepSettings, policy_update

    if model_name == "smollm2":
        hf_dir = resolve_hf_dir("smollm2")
    else:
        from testlib.tiny_hf import make_tiny_hf_dir

        hf_dir = str(make_tiny_hf_dir(Path("/tmp/megatron_rpp_probe_train") / "tiny_llama"))
    groups = initialize_parallel(1, 1, seed=0)
    hf = load_hf_config(hf_dir)
    arch = architecture_for_config(hf)
    spec = arch.model_spec(hf).for_tp(1)
    policy = build_model(spec, groups, dtype=torch.float32)
    load_hf_weights(policy, groups, arch, spec, hf_dir)
    ddp, opt = wrap_for_training(policy, OptimConfig(lr=1e-6), dtype=torch.float32)

    g = torch.Generator().manual_seed(0)
    batch = RolloutBatch.from_sequences([torch.randint(3, spec.vocab_size, (prompt,), generator=g).tolist()] * rows,
                                        [torch.randint(3, spec.vocab_size, (response,), generator=g).tolist()] * rows)
    mask = batch.response_mask
    batch = batch.replace(advantages=torch.randn(mask.shape, generator=g) * mask,
                          rollout_log_probs=-torch.rand(mask.shape, generator=g) * mask, old_log_probs=None)
    counts = {"tokens": batch.num_response_tokens, "seqs": rows, "max_response_len": response}
    settings = StepSettings(temperature=1.0, fused_output_layer=True, micro_batch_size=micro)

    sampler = Sampler()
    gpt = policy[0] if hasattr(policy, "__getitem__") else policy
    gpt = getattr(gpt, "module", gpt)
    layers = list(gpt.decoder.layers)
    layers[0].register_forward_pre_hook(lambda m, i: sampler.mark("forward"))
    gpt.decoder.final_layernorm.register_forward_pre_hook(lambda m, i: sampler.mark("head"))
    layers[-1].register_full_backward_pre_hook(lambda m, g: sampler.mark("backward_layers"))
    layers[0].register_full_backward_hook(lambda m, gi, go: sampler.mark("backward_embedding"))
    step = opt.step

    def timed_step(*a, **k):
        sampler.mark("optimizer")
        try:
            return step(*a, **k)
        finally:
            sampler.mark("idle")

    opt.step = timed_step
    loss_cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.2)
    orig_backward = torch.Tensor.backward

    def marked_backward(self, *a, **k):
        sampler.mark("backward_head")
        return orig_backward(self, *a, **k)

    torch.Tensor.backward = marked_backward  # Megatron's schedule calls torch.autograd.backward
    orig_autograd_backward = torch.autograd.backward

    def marked_autograd_backward(*a, **k):
        sampler.mark("backward_head")
        return orig_autograd_backward(*a, **k)

    torch.autograd.backward = marked_autograd_backward
    sampler.start()
    results, allocations = [], []
    for i in range(steps + 1):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        sampler.mark("idle")
        start_rss, start_used = sampler.sample()
        sampler.peak = {}
        if profile and i == steps:  # the allocations of the last step, op by op
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                policy_update(ddp, opt, groups, batch, counts, loss_cfg, settings)
            big = [(e.name, e.self_cpu_memory_usage / MiB, e.time_range.start) for e in prof.events()
                   if abs(e.self_cpu_memory_usage) >= profile * MiB]
            allocations = [{"op": n, "self_mib": round(m, 1)} for n, m, _ in sorted(big, key=lambda x: x[2])]
        else:
            policy_update(ddp, opt, groups, batch, counts, loss_cfg, settings)
        sampler.mark("idle")
        parts = {k: {"rss_above_start_mib": (v[0] - start_rss) / MiB, "malloc_above_start_mib": (v[1] - start_used) / MiB}
                 for k, v in sampler.peak.items() if k != "idle"}
        results.append({"step": i, "warmup": i == 0, "start_rss_mib": start_rss / MiB,
                        "start_malloc_mib": start_used / MiB, "parts": parts})
    sampler.stop = True
    largest = max(p.numel() for p in policy.parameters())
    return {"model": model_name, "prompt": prompt, "response": response, "rows": rows, "micro_batch": micro,
            "layers": len(layers), "largest_param_mib": largest * 4 / MiB,
            "tied": bool(spec.tie_word_embeddings), "steps": results, "allocations": allocations}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=36)
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--profile", type=float, default=0,
                    help="profile the last step (torch.profiler, profile_memory) and list every op whose own "
                         "allocations minus frees are at least this many MiB")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "probe_train_memory.json"))
    args = ap.parse_args()
    from megatron_rpp.parallel.spawn import run_ranks

    (res,) = run_ranks(_probe, 1, args.model, args.steps, args.prompt, args.response, args.rows, args.micro_batch,
                       args.profile, timeout=3600)
    for st in res["steps"]:
        print(f"step {st['step']}{' (warm-up)' if st['warmup'] else ''}: start RSS {st['start_rss_mib']:.0f} MiB, "
              f"malloc'd {st['start_malloc_mib']:.0f} MiB")
        for part, v in st["parts"].items():
            print(f"  {part:<20} RSS +{v['rss_above_start_mib']:7.1f} MiB   malloc'd +{v['malloc_above_start_mib']:7.1f} MiB")
    for a in res["allocations"]:
        print(f"  {a['self_mib']:+9.1f} MiB  {a['op']}")
    Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
