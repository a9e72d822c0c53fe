"""LlamaForCausalLM: RMSNorm, SwiGLU, RoPE (optionally Llama-3 scaled), GQA, tied or untied.

:data:`LLAMA_HF` is the HF layout of the whole Llama family (Qwen2 and Qwen3 use it with
their extra roles): separate q/k/v and gate/up projections under ``model.layers.{i}.``.
"""
from __future__ import annotations

from typing import Any, Mapping

from megatron_rpp.models.architectures.base import ARCHITECTURES, Architecture
from megatron_rpp.models.architectures.conversions import GATE_UP, GROUPED_QKV, HEAD_COLUMNS, VOCAB_ROWS
from megatron_rpp.models.architectures.table import HF, HFLayout
from megatron_rpp.models.spec import ModelSpec, llama_family_spec

LLAMA_HF = HFLayout(
    roles={
        "embedding": HF("model.embed_tokens.weight", conversion=VOCAB_ROWS),
        "attn_norm": HF("input_layernorm.weight"),
        "qkv": HF("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  conversion=GROUPED_QKV),
        "proj": HF("self_attn.o_proj.weight", conversion=HEAD_COLUMNS),
        "mlp_norm": HF("post_attention_layernorm.weight"),
        "fc1": HF("mlp.gate_proj.weight", "mlp.up_proj.weight", conversion=GATE_UP),
        "fc2": HF("mlp.down_proj.weight"),
        "final_norm": HF("model.norm.weight"),
        "output": HF("lm_head.weight", conversion=VOCAB_ROWS),
    }
)


class Llama(Architecture):
    name = "LlamaForCausalLM"
    hf_layout = LLAMA_HF

    def model_spec(self, hf_config: Mapping[str, Any]) -> ModelSpec:
        return llama_family_spec(hf_config, add_qkv_bias=False, qk_layernorm=False)


ARCHITECTURES.register(Llama.name, Llama())
