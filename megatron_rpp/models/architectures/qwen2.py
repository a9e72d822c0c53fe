"""Qwen2ForCausalLM: the Llama layout plus a bias on the Q/K/V projections."""
from __future__ import annotations

from typing import Any, Mapping

from megatron_rpp.models.architectures.base import ARCHITECTURES, Architecture
from megatron_rpp.models.architectures.conversions import GROUPED_QKV
from megatron_rpp.models.architectures.llama import LLAMA_HF
from megatron_rpp.models.architectures.table import HF
from megatron_rpp.models.spec import ModelSpec, llama_family_spec

QKV_BIAS = HF("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", conversion=GROUPED_QKV)


class Qwen2(Architecture):
    name = "Qwen2ForCausalLM"
    hf_layout = LLAMA_HF.with_roles(qkv_bias=QKV_BIAS)

    def model_spec(self, hf_config: Mapping[str, Any]) -> ModelSpec:
        return llama_family_spec(hf_config, add_qkv_bias=True, qk_layernorm=False)


ARCHITECTURES.register(Qwen2.name, Qwen2())
