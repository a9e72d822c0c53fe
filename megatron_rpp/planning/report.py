"""A plan as a table (for people) and as one JSON document (for programs).

JSON schema (``schema_version`` 1; the keys below are stable — docs/plan.md):

- ``total_params`` (int): the HF model's parameter count, no padding;
- ``fits`` (bool): every phase fits and every check passes;
- ``peak_bytes_per_gpu`` (int): the worst rank's worst phase;
- ``gpu_memory_bytes`` (int): the capacity compared with (CPU: host memory, all ranks together);
- ``phases``: ``{phase: {rank_kind: {"terms": {term: bytes}, "total_bytes", "released",
  "pipeline_rank"}}}`` for phases ``generate``, ``score``, ``train``, ``weight_sync`` and rank kinds
  ``only`` (PP = 1) or ``first`` / ``middle`` (PP >= 3) / ``last``;
- ``verdicts``: ``{phase: {"fits", "peak_bytes", "headroom_bytes", "worst_rank_kind", "dominant_term"}}``;
- ``checks``, ``suggestions``, ``notes``, ``shape``, ``layout``, ``switches``, ``model``, ``ranks``,
  ``device``, ``host_peak_bytes`` (CPU).
"""
from __future__ import annotations

from dataclasses import asdict

from megatron_rpp.planning.inputs import GiB
from megatron_rpp.planning.plan import PHASES, TERMS, Plan

SCHEMA_VERSION = 1


def _kind_of(plan: Plan) -> dict[int, str]:
    return {r: k for k, r in plan.kinds().items()}


def verdicts(plan: Plan) -> dict[str, dict]:
    """Per phase: fits, the peak compared with the capacity, headroom, the worst rank kind and
    its dominant term."""
    out = {}
    names = _kind_of(plan)
    for phase in PHASES:
        per = plan.phases[phase]
        worst = max(per, key=lambda pm: pm.total)
        peak = plan.phase_peak(phase)
        out[phase] = {"fits": peak <= plan.capacity_bytes, "peak_bytes": peak,
                      "headroom_bytes": plan.capacity_bytes - peak,
                      "worst_rank_kind": names.get(worst.pp_rank, f"pp_rank_{worst.pp_rank}"),
                      "dominant_term": worst.dominant, "dominant_bytes": worst.terms[worst.dominant]}
    return out


def to_json(plan: Plan) -> dict:
    """The plan as a JSON-serialisable dict (module doc)."""
    inp = plan.input
    phases = {p: {kind: {"pipeline_rank": r, "terms": dict(plan.phases[p][r].terms),
                         "total_bytes": plan.phases[p][r].total, "released": list(plan.phases[p][r].released)}
                  for kind, r in plan.kinds().items()} for p in PHASES}
    out = {
        "schema_version": SCHEMA_VERSION,
        "total_params": plan.total_params,
        "fits": plan.fits,
        "peak_bytes_per_gpu": plan.peak_bytes_per_gpu,
        "gpu_memory_bytes": plan.capacity_bytes,
        "device": inp.device,
        "phases": phases,
        "verdicts": verdicts(plan),
        "checks": [asdict(c) for c in plan.checks],
        "suggestions": plan.suggestions,
        "notes": plan.notes,
        "shape": plan.shape,
        "layout": asdict(inp.layout),
        "switches": asdict(inp.switches),
        "model": {"architecture": inp.policy.arch_name, "source": inp.policy.source,
                  "reference": inp.reference,
                  "reward_model": inp.reward_model.source if inp.reward_model else None,
                  "critic": inp.critic.source if inp.critic else None},
        "ranks": {kind: {"pipeline_rank": r, "layers": plan.ranks[r].num_layers,
                         "chunks": [list(c) for c in plan.ranks[r].chunks],
                         "params": plan.ranks[r].elements, "padding_params": plan.ranks[r].padding,
                         "engine_params": plan.engine.elements}
                  for kind, r in plan.kinds().items()},
    }
    if inp.device == "cpu":
        out["host_peak_bytes"] = max(plan.host_bytes(p) for p in PHASES)
    return out


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}" if n else "-"


def format_plan(plan: Plan) -> str:
    """The plan as text: a header, one table per rank kind (terms x phases, GiB), verdicts,
    checks, notes and suggestions."""
    inp, lay, sw, sh = plan.input, plan.input.layout, plan.input.switches, plan.shape
    cap = plan.capacity_bytes
    where = (f"{lay.world} GPUs of {cap / GiB:.1f} GiB" if inp.device == "gpu"
             else f"{lay.world} CPU ranks, host memory {cap / GiB:.1f} GiB (all ranks together)")
    lines = [
        f"megatron-rpp plan: {inp.policy.arch_name} ({plan.total_params / 1e9:.2f} B parameters, "
        f"{inp.policy.source}) on {where}",
        f"layout: TP {lay.tp} x PP {lay.pp}" + (f" (VPP {lay.vpp})" if lay.vpp > 1 else "")
        + f" x DP {lay.dp}; engine TP {lay.engine_tp} x {lay.engine_dp} engines; {sw.dtype}, "
        f"{sw.layer_spec} layer spec, recompute {sw.recompute}"
        + (", sequence parallel" if sw.sequence_parallel else "")
        + (", distributed optimizer" if sw.distributed_optimizer and lay.dp > 1 else "")
        + (f", sleep level {sw.sleep_level}" if inp.device == "gpu" else "")
        + (", optimizer offloaded during rollout" if sw.offload_optimizer_during_rollout else ""),
        f"step: {sh['sequences_per_iteration']} sequences ({sh['sequences_per_engine']} per engine), micro-batch "
        f"{sh['micro_batch_sequences']} x {inp.batch.seq_len} tokens, {sh['micro_batches_per_optimizer_step']} "
        f"micro-batches per optimizer step, {sh['optimizer_steps_per_iteration']} optimizer steps per iteration",
        "",
    ]
    for kind, r in plan.kinds().items():
        rp = plan.ranks[r]
        lines.append(f"[{kind}] pipeline rank {r}: {rp.num_layers} layers, {rp.elements / 1e9:.3f} B parameters "
                     f"per rank; GiB")
        lines.append(f"  {'term':<22}" + "".join(f"{p:>13}" for p in PHASES))
        for term in TERMS:
            vals = [plan.phases[p][r].terms[term] for p in PHASES]
            if any(vals):
                lines.append(f"  {term:<22}" + "".join(f"{_gib(v):>13}" for v in vals))
        lines.append(f"  {'total':<22}" + "".join(f"{_gib(plan.phases[p][r].total):>13}" for p in PHASES))
        lines.append("")
    for phase, v in verdicts(plan).items():
        scope = "host" if inp.device == "cpu" else f"per GPU, worst: {v['worst_rank_kind']}"
        if v["fits"]:
            lines.append(f"{phase:<12} fits: {v['peak_bytes'] / GiB:.1f} of {cap / GiB:.1f} GiB ({scope}), "
                         f"{v['headroom_bytes'] / GiB:.1f} GiB free")
        else:
            lines.append(f"{phase:<12} DOES NOT FIT: {v['peak_bytes'] / GiB:.1f} of {cap / GiB:.1f} GiB ({scope}), "
                         f"over by {-v['headroom_bytes'] / GiB:.1f} GiB; dominant term {v['dominant_term']} "
                         f"({v['dominant_bytes'] / GiB:.1f} GiB)")
    for c in plan.checks:
        if not c.ok:
            lines.append(f"check {c.name} FAILED: {c.message}")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"verdict: {'FITS' if plan.fits else 'DOES NOT FIT'} (peak {plan.peak_bytes_per_gpu / GiB:.1f} GiB "
                 f"per {'GPU' if inp.device == 'gpu' else 'rank'})")
    for s in plan.suggestions:
        lines.append(f"suggestion: {' '.join(s['overrides'])}  (peak {s['peak_bytes_per_gpu'] / GiB:.1f} GiB)")
    return "\n".join(lines)


def summary_lines(plan: Plan) -> list[str]:
    """A few lines for a config's header comment: the peak of each rank kind per phase, the
    largest terms of the worst phase and the verdict."""
    unit = "GiB per GPU" if plan.input.device == "gpu" else "GiB per rank"
    lines = [f"{unit + f' (of {plan.capacity_bytes / GiB:.0f})':<24}" + "".join(f"{p:>12}" for p in PHASES)]
    for kind, r in plan.kinds().items():
        lines.append(f"{kind + ' stage':<24}" + "".join(f"{plan.phases[p][r].total / GiB:>12.1f}" for p in PHASES))
    worst = max((pm for per in plan.phases.values() for pm in per), key=lambda pm: pm.total)
    top = sorted(worst.terms.items(), key=lambda kv: -kv[1])[:4]
    lines.append(f"largest terms ({worst.phase}, pipeline rank {worst.pp_rank}): "
                 + ", ".join(f"{k} {v / GiB:.1f}" for k, v in top))
    lines.append(f"verdict: {'FITS' if plan.fits else 'DOES NOT FIT'}, peak {plan.peak_bytes_per_gpu / GiB:.1f} GiB "
                 f"({worst.phase}), {(plan.capacity_bytes - plan.peak_bytes_per_gpu) / GiB:.1f} GiB free")
    return lines
