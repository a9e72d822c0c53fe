"""LlamaForCausalLM: RMSNorm, SwiGLU, RoPE (optionally Llama-3 scaled), GQA, tied or untied."""
from __future__ import annotations

from typing import Any, Mapping

from megatron_rpp.models.architectures.base import ARCHITECTURES, Architecture
from megatron_rpp.models.spec import ModelSpec, llama_family_spec


class Llama(Architecture):
    name = "LlamaForCausalLM"

    def model_spec(self, hf_config: Mapping[str, Any]) -> ModelSpec:
        return llama_family_spec(hf_config, add_qkv_bias=False, qk_layernorm=False)


ARCHITECTURES.register(Llama.name, Llama())
