"""Qwen3ForCausalLM: the Llama layout plus RMSNorm on each head's query and key (QK-norm)."""
from __future__ import annotations

from typing import Any, Mapping

from megatron_rpp.models.architectures.base import ARCHITECTURES, Architecture
from megatron_rpp.models.architectures.llama import LLAMA_HF
from megatron_rpp.models.architectures.qwen2 import QKV_BIAS
from megatron_rpp.models.architectures.table import HF
from megatron_rpp.models.spec import ModelSpec, llama_family_spec


class Qwen3(Architecture):
    name = "Qwen3ForCausalLM"
    # attention_bias (optional in Qwen3) adds the Q/K/V bias role.
    hf_layout = LLAMA_HF.with_roles(
        q_norm=HF("self_attn.q_norm.weight"), k_norm=HF("self_attn.k_norm.weight"), qkv_bias=QKV_BIAS
    )

    def model_spec(self, hf_config: Mapping[str, Any]) -> ModelSpec:
        return llama_family_spec(
            hf_config, add_qkv_bias=bool(hf_config.get("attention_bias", False)), qk_layernorm=True
        )


ARCHITECTURES.register(Qwen3.name, Qwen3())
