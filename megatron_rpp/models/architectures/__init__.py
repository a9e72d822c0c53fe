"""One module per HF architecture, registered by its ``architectures[0]`` name.

    from megatron_rpp.models.architectures import get_architecture
    arch = get_architecture("LlamaForCausalLM")
    spec = arch.model_spec(hf_config)
"""
from __future__ import annotations

from megatron_rpp.models.architectures.base import ARCHITECTURES, Architecture

# Importing the modules registers them.
from megatron_rpp.models.architectures import llama, qwen2, qwen3, sequence_classification  # noqa: E402,F401


def get_architecture(name: str) -> Architecture:
    """The registered architecture for a HF ``architectures[0]`` name (error lists the valid ones)."""
    return ARCHITECTURES.get(name)


def architecture_for_config(hf_config: dict) -> Architecture:
    names = hf_config.get("architectures") or []
    if not names:
        raise ValueError(
            f"HF config has no 'architectures' field; supported: {', '.join(ARCHITECTURES.names())}"
        )
    return ARCHITECTURES.get(names[0])


__all__ = ["ARCHITECTURES", "Architecture", "get_architecture", "architecture_for_config"]
