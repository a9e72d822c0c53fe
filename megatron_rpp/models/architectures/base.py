"""The Architecture interface and its registry."""
from __future__ import annotations

from typing import Any, Mapping

from megatron_rpp.algorithms.registry import Registry
from megatron_rpp.models.spec import ModelSpec

ARCHITECTURES: Registry["Architecture"] = Registry("architecture")


class Architecture:
    """A HF architecture: how to read its config (and, in conversion, its weights).

    Subclasses set ``name`` and implement :meth:`model_spec`.
    """

    name: str = ""

    def model_spec(self, hf_config: Mapping[str, Any]) -> ModelSpec:
        raise NotImplementedError
