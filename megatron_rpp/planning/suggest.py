"""Layouts that fit: the smallest TP x PP (then recompute / offload switches) for the same GPUs.

    plan.suggestions = suggest(inp)          # [] when the input's own layout fits

Candidates keep the world size (``trainer.num_workers``): TP a power of two within a node
that the model's FFN and (padded) heads split into, PP a divisor of the layers, TP x PP
dividing the world; engine TP: the input's, the candidate's Megatron TP, or one engine per
node (whichever divides the world, in that order). They are tried in order of TP x PP (fewer pipeline stages first), each first with the
input's switches, then with full recompute, then (GPU) with the optimizer offloaded during
rollout. Each suggestion is a list of config overrides plus its peak.
"""
from __future__ import annotations

from dataclasses import replace

from megatron_rpp.planning.inputs import Layout, PlanInput
from megatron_rpp.planning.plan import make_plan


def _tp_candidates(inp: PlanInput) -> list[int]:
    spec, out, tp = inp.policy.spec, [], 1
    while tp <= inp.layout.gpus_per_node:
        padded = spec.for_tp(tp)
        if spec.ffn_hidden_size % tp == 0 and padded.megatron_attention_heads % tp == 0:
            out.append(tp)
        tp *= 2
    return out


def _layouts(inp: PlanInput) -> list[Layout]:
    world, layers = inp.layout.world, inp.policy.spec.num_layers
    out = []
    for tp in _tp_candidates(inp):
        for pp in (p for p in range(1, layers + 1) if layers % p == 0):
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            if inp.batch.train_batch_size % (dp * inp.batch.micro_batch_size):
                continue
            out.append(replace(inp.layout, tp=tp, pp=pp, dp=dp, vpp=1))
    return sorted(out, key=lambda lay: (lay.tp * lay.pp, lay.pp))


def _engine_tps(inp: PlanInput, lay: Layout) -> list[int]:
    """The input's engine TP, the candidate's Megatron TP, one engine per node (those dividing the world)."""
    out = []
    for etp in (inp.layout.engine_tp, lay.tp, min(lay.world, lay.gpus_per_node)):
        if lay.world % etp == 0 and etp not in out:
            out.append(etp)
    return out


def _overrides(inp: PlanInput, cand: PlanInput) -> list[str]:
    lay, sw = cand.layout, cand.switches
    out = [f"model.tensor_parallel_size={lay.tp}", f"model.pipeline_parallel_size={lay.pp}"]
    if lay.engine_tp != inp.layout.engine_tp:
        out.append(f"rollout.tensor_parallel_size={lay.engine_tp}")
    if sw.recompute != inp.switches.recompute:
        out.append(f"model.recompute={sw.recompute}")
    if sw.offload_optimizer_during_rollout != inp.switches.offload_optimizer_during_rollout:
        out.append(f"trainer.offload_optimizer_during_rollout={str(sw.offload_optimizer_during_rollout).lower()}")
    return out


def suggest(inp: PlanInput, limit: int = 3) -> list[dict]:
    """Up to ``limit`` fitting variants of ``inp`` (one per TP x PP), smallest first."""
    found = []
    switch_steps = [{}, {"recompute": "full"}]
    if inp.device == "gpu":
        switch_steps.append({"recompute": "full", "offload_optimizer_during_rollout": True})
    for lay in _layouts(inp):
        fit = next((cand for extra in switch_steps for etp in _engine_tps(inp, lay)
                    for cand in [replace(inp, layout=replace(lay, engine_tp=etp),
                                         switches=replace(inp.switches, **extra))]
                    if make_plan(cand).fits), None)
        if fit is not None:
            found.append({"overrides": _overrides(inp, fit), "peak_bytes_per_gpu": make_plan(fit).peak_bytes_per_gpu})
        if len(found) >= limit:
            break
    return found
