"""Qwen3ForCausalLM: the Llama layout plus RMSNorm on each head's query and key (QK-norm)."""
from __future__ import annotations

from typing import Any, Mapping

from megatron_rpp.models.architectures.base import ARCHITECTURES, Architecture
from megatron_rpp.models.spec import ModelSpec, llama_family_spec


class Qwen3(Architecture):
    name = "Qwen3ForCausalLM"

    def model_spec(self, hf_config: Mapping[str, Any]) -> ModelSpec:
        return llama_family_spec(
            hf_config, add_qkv_bias=bool(hf_config.get("attention_bias", False)), qk_layernorm=True
        )


ARCHITECTURES.register(Qwen3.name, Qwen3())
