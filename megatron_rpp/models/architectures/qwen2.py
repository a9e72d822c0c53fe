"""Qwen2ForCausalLM: the Llama layout plus a bias on the Q/K/V projections."""
from __future__ import annotations

from typing import Any, Mapping

from megatron_rpp.models.architectures.base import ARCHITECTURES, Architecture
from megatron_rpp.models.spec import ModelSpec, llama_family_spec


class Qwen2(Architecture):
    name = "Qwen2ForCausalLM"

    def model_spec(self, hf_config: Mapping[str, Any]) -> ModelSpec:
        return llama_family_spec(hf_config, add_qkv_bias=True, qk_layernorm=False)


ARCHITECTURES.register(Qwen2.name, Qwen2())
