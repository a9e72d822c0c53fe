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


def tiny_phi3(*, tied: bool = False) -> dict:
    """Phi-3: fused qkv_proj / gate_up_proj; head_dim is hidden_size / heads (64 here)."""
    cfg = _base("Phi3ForCausalLM", tied=tied, model_type="phi3")
    cfg.update(pad_token_id=None, sliding_window=None, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    return cfg


TINY_CONFIGS = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "qwen3": tiny_qwen3,
    "phi3": tiny_phi3,
}


def tiny_config(name: str, *, vocab_size: int | None = None, **kw) -> dict:
    """A tiny config of family ``name``; ``vocab_size`` replaces the default 512 (e.g. an odd 509
    that no TP size divides: the Megatron model then pads its vocabulary)."""
    cfg = copy.deepcopy(TINY_CONFIGS[name](**kw))
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    return cfg
