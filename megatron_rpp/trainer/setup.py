"""Everything a run needs before its first step: output dir, model folder, data, reward, workers."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_rpp.config import Config
from megatron_rpp.data.prompts import Prompt, PromptStream, load_rows, tokenize_prompts
from megatron_rpp.utils import console


class OutputDirError(RuntimeError):
    """The output directory cannot be written (checked before training starts)."""


def check_output_dir(path: str | Path, min_free_bytes: int = 256 << 20) -> Path:
    """Create ``path`` and prove it is writable with enough free space, before any training."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write_probe"
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"trainer.output_dir {str(p)!r} is not writable: {e}") from None
    free = shutil.disk_usage(p).free
    if free < min_free_bytes:
        raise OutputDirError(f"trainer.output_dir {str(p)!r}: only {free >> 20} MiB free (need {min_free_bytes >> 20} MiB)")
    return p


def resolve_hf_dir(hf_dir: str) -> str:
    """``smollm2`` -> the materialised SmolLM2-135M-Instruct folder; otherwise the path itself."""
    if hf_dir == "smollm2":
        from megatron_rpp.checkpoint.smollm2 import materialize_smollm2

        return str(materialize_smollm2())
    if not (Path(hf_dir) / "config.json").is_file():
        raise FileNotFoundError(f"model.hf_dir {hf_dir!r}: no config.json there")
    return hf_dir


@dataclass
class RunContext:
    cfg: Config
    tokenizer: Any
    stream: PromptStream
    eval_prompts: list[Prompt]
    skipped_prompts: int
    scorer: Any
    reward_norm: Any
    group: Any
    layout: Any
    logger: Any

    def close(self) -> None:
        self.logger.close()
        if self.scorer is not None:
            self.scorer.close()
        self.group.shutdown()


def setup_run(cfg: Config, resume_step: int | None = None) -> RunContext:
    """Build everything; ``resume_step``: keep metrics.jsonl rows up to that step (else start it anew)."""
    from transformers import AutoTokenizer

    from megatron_rpp.algorithms.reward_norm import RunningRewardNorm
    from megatron_rpp.config.hyper import needs_critic
    from megatron_rpp.rewards import make_scorer
    from megatron_rpp.trainer.group import make_worker_group
    from megatron_rpp.trainer.phases import Layout
    from megatron_rpp.utils.logging import MetricsLogger

    say = console.say
    out = check_output_dir(cfg.trainer.output_dir)
    hf_dir = resolve_hf_dir(cfg.model.hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    train_rows, eval_rows = load_rows(cfg.data)
    train_prompts, skipped = tokenize_prompts(train_rows, tokenizer, cfg.data, cfg.model.max_prompt_length)
    eval_prompts, skipped_eval = tokenize_prompts(eval_rows, tokenizer, cfg.data, cfg.model.max_prompt_length)
    say(f"{console.PREFIX} model {hf_dir}; {len(train_prompts)} training and {len(eval_prompts)} evaluation prompts")
    if skipped + skipped_eval:
        say(f"{console.PREFIX} skipped {skipped + skipped_eval} prompts longer than {cfg.model.max_prompt_length} tokens")
    scorer = make_scorer(cfg.reward)  # before engines start
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.rollout.kv_cache_gib))))
    m, n = cfg.model, cfg.trainer.num_workers
    dp = n // (m.tensor_parallel_size * m.pipeline_parallel_size)
    say(f"{console.PREFIX} starting {n} worker{'s' if n > 1 else ''} (TP {m.tensor_parallel_size} × PP "
        f"{m.pipeline_parallel_size} × DP {dp}): policy, {'reference, ' if cfg.algorithm.kl_coef > 0 else ''}"
        f"{'reward model, ' if cfg.reward.model_dir else ''}{'critic, ' if needs_critic(cfg) else ''}vLLM engine")
    t0 = time.perf_counter()
    group = make_worker_group(cfg, hf_dir)
    layout = Layout.from_infos(group.call("info"))
    say(f"{console.PREFIX} workers ready in {time.perf_counter() - t0:.0f} s; training to step {cfg.trainer.steps}")
    return RunContext(
        cfg=cfg, tokenizer=tokenizer, stream=PromptStream(train_prompts, cfg.data.seed), eval_prompts=eval_prompts,
        skipped_prompts=skipped + skipped_eval, scorer=scorer,
        reward_norm=RunningRewardNorm() if cfg.reward.normalize else None,
        group=group, layout=layout, logger=MetricsLogger(out, resume_step=resume_step),
    )
