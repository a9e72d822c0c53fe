"""Config values a new user might try that must stop ``megatron-rpp train`` at load time (exit 2).

Each case: (overrides, the key the error must name, a fragment of the allowed range/values it
must state). ``{tiny}`` / ``{odd_ffn}`` in an override stand for model folders made by
:func:`model_folders` (a ``config.json`` only: validation reads nothing else).
"""
from __future__ import annotations

import json
from pathlib import Path

from testlib.tiny_models import tiny_llama

# overrides (space-separated) | the key the error names | what it must say is allowed.
# The seven values of issue 13 first, then more ranges, plug-ins and layouts; the rollout engine
# layout of issue 14, then issue 15's parallelism and memory switches.
_TABLE = """
algorithm.gamma=2                                         | algorithm.gamma   | a number in (0, 1]
algorithm.estimator=grpo algorithm.gamma=0.5              | algorithm.gamma   | must be 1.0 for the group estimator
algorithm.clip_low=1.5                                    | algorithm.clip_low | a number in [0, 1)
rollout.top_p=0                                           | rollout.top_p     | a number in (0, 1]
rollout.top_k=0                                           | rollout.top_k     | -1 (off) or an integer >= 1
trainer.clip_grad=-1                                      | trainer.clip_grad | a finite number > 0
rollout.check_sync_tolerance=-1                           | rollout.check_sync_tolerance | a finite number > 0
algorithm.dual_clip=0.5                                   | algorithm.dual_clip | 0 (off) or a finite number > 1
rollout.temperature=.nan                                  | rollout.temperature | a finite number > 0
rollout.gpu_memory_utilization=1.5                        | rollout.gpu_memory_utilization | a number in (0, 1]
trainer.lr=0                                              | trainer.lr        | a finite number > 0
trainer.seed=-1                                           | trainer.seed      | an integer in [0, 2147483647]
algorithm.estimator=gae critic.warmup_steps=100 trainer.steps=10 | critic.warmup_steps | must be < trainer.steps (10)
algorithm.estimator=gae critic.clip_value=-0.1            | critic.clip_value | a finite number >= 0
algorithm.lam=1.5                                         | algorithm.lam     | a number in [0, 1]
algorithm.estimator=ppo2                                  | algorithm.estimator | allowed values: dr_grpo, gae, grpo, reinforce_pp
reward.function=examples/reward_fns/short_answer.py:no_fn | reward.function   | no attribute
algorithm.estimator=rloo rollout.n_samples_per_prompt=1   | rollout.n_samples_per_prompt | >= 2
trainer.num_workers=3 model.tensor_parallel_size=2        | trainer.num_workers | multiple of
trainer.train_batch_size=7                                | trainer.train_batch_size | must divide
trainer.num_workers=2 trainer.train_batch_size=8 trainer.micro_batch_size=8 | trainer.train_batch_size | multiple of data-parallel size (2)
model.hf_dir={tiny} model.pipeline_parallel_size=4 trainer.num_workers=4 | model.pipeline_parallel_size | must divide num_hidden_layers (2)
model.hf_dir={odd_ffn} model.tensor_parallel_size=2 trainer.num_workers=2 | model.tensor_parallel_size | must divide intermediate_size (255)
model.hf_dir={tiny} model.max_prompt_length=500 model.max_response_length=100 | model.max_response_length | <= max_position_embeddings (512)
trainer.num_workers=4 rollout.tensor_parallel_size=3                  | rollout.tensor_parallel_size | must divide trainer.num_workers (4)
trainer.num_workers=6 model.tensor_parallel_size=2 rollout.tensor_parallel_size=3 trainer.train_batch_size=6 trainer.micro_batch_size=1 rollout.rollout_batch_size=6 | rollout.tensor_parallel_size | a divisor or a multiple of model.tensor_parallel_size (2)
rollout.sleep_level=3                                     | rollout.sleep_level | 0 (never sleep), 1 or 2
trainer.offload_optimizer_during_rollout=true             | trainer.offload_optimizer_during_rollout | GPU only
model.hf_dir={odd_ffn} trainer.num_workers=2 rollout.tensor_parallel_size=2 | rollout.tensor_parallel_size | must divide intermediate_size (255)
model.virtual_pipeline_size=2                             | model.virtual_pipeline_size | needs model.pipeline_parallel_size > 1
model.hf_dir={tiny} model.pipeline_parallel_size=2 model.virtual_pipeline_size=2 trainer.num_workers=2 | model.virtual_pipeline_size | must divide num_hidden_layers (2)
model.sequence_parallel=true                              | model.sequence_parallel | needs model.tensor_parallel_size > 1
model.recompute=partial                                   | model.recompute   | allowed values: none, selective, full
model.recompute_num_layers=2                              | model.recompute_num_layers | only used with model.recompute=full
model.hf_dir={tiny} model.recompute=full model.recompute_num_layers=3 | model.recompute_num_layers | must divide the layers of one pipeline chunk
model.context_parallel_size=2                             | model.context_parallel_size | only 1 is supported
trainer.distributed_optimizer=maybe                       | trainer.distributed_optimizer | expected bool
"""
BAD_VALUES: list[tuple[list[str], str, str]] = [
    (overrides.split(), key.strip(), allowed.strip())
    for overrides, key, allowed in (line.split("|") for line in _TABLE.strip().splitlines())
]


def model_folders(root: Path) -> dict[str, str]:
    """``{"tiny": folder, "odd_ffn": folder}``: the config.json of a 2-layer Llama with 512 positions,
    and of one whose FFN size (255) no even TP size divides."""
    out = {}
    for name, update in (("tiny", {"num_hidden_layers": 2, "max_position_embeddings": 512}),
                         ("odd_ffn", {"intermediate_size": 255, "max_position_embeddings": 512})):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({**tiny_llama(), **update}))
        out[name] = str(folder)
    return out


def with_folders(overrides: list[str], folders: dict[str, str]) -> list[str]:
    return [o.format(**folders) for o in overrides]
