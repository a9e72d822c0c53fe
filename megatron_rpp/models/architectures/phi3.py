"""Phi3ForCausalLM: the Llama model with fused HF projections.

Megatron builds it exactly as Llama (RMSNorm, SwiGLU, full RoPE, GQA, no biases); only the
HF layout differs:

- ``self_attn.qkv_proj.weight`` [(n + 2g)·d, h] holds q, k, v one after the other (all
  query heads, then all key heads, then all value heads), not Megatron's per-KV-group
  interleaving: :data:`~megatron_rpp.models.architectures.conversions.FUSED_QKV` regroups it.
- ``mlp.gate_up_proj.weight`` [2f, h] is already [gate; up], Megatron's ``linear_fc1``.

Config fields that change the model and are not built here are errors naming the field:
``sliding_window`` (Phi-3-mini-4k sets 2047), ``partial_rotary_factor`` != 1, dropout > 0
(``resid_pdrop``, ``embd_pdrop``, ``attention_dropout``), and ``rope_scaling`` other than the
default (Phi-3's ``longrope`` / ``su``, the 128k-context variants).
"""
from __future__ import annotations

from typing import Any, Mapping

from megatron_rpp.models.architectures.base import ARCHITECTURES, Architecture
from megatron_rpp.models.architectures.conversions import FUSED_QKV, HEAD_COLUMNS, VOCAB_ROWS
from megatron_rpp.models.architectures.table import HF, HFLayout
from megatron_rpp.models.spec import ModelSpec, UnsupportedConfigError, llama_family_spec

PHI3_HF = HFLayout(
    roles={
        "embedding": HF("model.embed_tokens.weight", conversion=VOCAB_ROWS),
        "attn_norm": HF("input_layernorm.weight"),
        "qkv": HF("self_attn.qkv_proj.weight", conversion=FUSED_QKV),
        "proj": HF("self_attn.o_proj.weight", conversion=HEAD_COLUMNS),
        "mlp_norm": HF("post_attention_layernorm.weight"),
        "fc1": HF("mlp.gate_up_proj.weight"),
        "fc2": HF("mlp.down_proj.weight"),
        "final_norm": HF("model.norm.weight"),
        "output": HF("lm_head.weight", conversion=VOCAB_ROWS),
    }
)

_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attention_dropout")


def phi3_spec(cfg: Mapping[str, Any]) -> ModelSpec:
    """The Llama-family spec of a Phi-3 config, after rejecting what is not built."""
    arch = (cfg.get("architectures") or ["?"])[0]
    if cfg.get("sliding_window") is not None:
        raise UnsupportedConfigError(f"{arch}: sliding_window={cfg['sliding_window']} is not supported (supported: null)")
    for key in _DROPOUTS:
        if float(cfg.get(key) or 0.0) != 0.0:
            raise UnsupportedConfigError(f"{arch}: {key}={cfg[key]} is not supported (supported: 0.0)")
    rope = cfg.get("rope_parameters") or {}
    factor = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    if float(factor) != 1.0:
        raise UnsupportedConfigError(f"{arch}: partial_rotary_factor={factor} is not supported (supported: 1.0)")
    return llama_family_spec(cfg, add_qkv_bias=False, qk_layernorm=False)


class Phi3(Architecture):
    name = "Phi3ForCausalLM"
    hf_layout = PHI3_HF

    def model_spec(self, hf_config: Mapping[str, Any]) -> ModelSpec:
        return phi3_spec(hf_config)


ARCHITECTURES.register(Phi3.name, Phi3())
