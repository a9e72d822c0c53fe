"""The memory planner: per-GPU (or per-host) bytes of every phase, before launch.

    from megatron_rpp.planning import plan_for_config, format_plan, to_json
    plan = plan_for_config(cfg, device="gpu", capacity_bytes=80 << 30)
    print(format_plan(plan)); plan.fits; to_json(plan)["peak_bytes_per_gpu"]

``megatron-rpp plan`` prints it; ``megatron-rpp train`` runs the same check before building
anything (docs/plan.md). The math (``params``, ``terms``, ``plan``, ``suggest``) is pure: no
torch.distributed, no Megatron, no vLLM; only ``inputs.plan_input_from_config`` reads the
Config and the HF ``config.json`` files, and ``capacity`` the machine.
"""
from __future__ import annotations

from megatron_rpp.planning.inputs import PlanError, PlanInput, plan_input_from_config
from megatron_rpp.planning.plan import PHASES, TERMS, Plan, make_plan
from megatron_rpp.planning.report import format_plan, to_json


def plan_for_config(cfg, *, device: str, capacity_bytes: int, gpus_per_node: int = 8,
                    with_suggestions: bool = True) -> Plan:
    """The plan of the run ``cfg`` (with suggestions when it does not fit)."""
    from megatron_rpp.planning.suggest import suggest

    inp = plan_input_from_config(cfg, device=device, capacity_bytes=capacity_bytes, gpus_per_node=gpus_per_node)
    plan = make_plan(inp)
    if with_suggestions and not plan.fits:
        plan.suggestions = suggest(inp)
    return plan


__all__ = ["PHASES", "TERMS", "Plan", "PlanError", "PlanInput", "format_plan", "make_plan", "plan_for_config",
           "plan_input_from_config", "to_json"]
