"""One module per HF architecture family, registered by its ``architectures[0]`` name.

    from megatron_rpp.models.architectures import get_architecture
    arch = get_architecture("LlamaForCausalLM")
    spec = arch.model_spec(hf_config)
    table = arch.param_table(spec.for_tp(tp))

Every module of this package is imported here, and importing a module registers its
architectures: adding a model family is adding one file (see ``phi3.py``).
"""
from __future__ import annotations

import importlib
import pkgutil

from megatron_rpp.models.architectures.base import ARCHITECTURES, Architecture

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")


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
