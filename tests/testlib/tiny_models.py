"""Tiny HF configs for tests. head_dim 64: vLLM's CPU attention rejects smaller heads."""
from __future__ import annotations

import copy


def _base(arch: str, *, tied: bool, model_type: str) -> dict:
    return {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 512,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def tiny_llama(*, tied: bool = False, rope_scaling: bool = False) -> dict:
    cfg = _base("LlamaForCausalLM", tied=tied, model_type="llama")
    cfg.update(attention_bias=False, mlp_bias=False)
    if rope_scaling:
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # Small so that all three frequency bands occur at head_dim 64.
            "original_max_position_embeddings": 64,
        }
    return cfg


def tiny_qwen2(*, tied: bool = False) -> dict:
    cfg = _base("Qwen2ForCausalLM", tied=tied, model_type="qwen2")
    cfg.update(use_sliding_window=False)
    return cfg


def tiny_qwen3(*, tied: bool = False) -> dict:
    cfg = _base("Qwen3ForCausalLM", tied=tied, model_type="qwen3")
    cfg.update(attention_bias=False, use_sliding_window=False)
    return cfg


TINY_CONFIGS = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "qwen3": tiny_qwen3,
}


def tiny_config(name: str, **kw) -> dict:
    return copy.deepcopy(TINY_CONFIGS[name](**kw))
