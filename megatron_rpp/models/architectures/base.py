"""The Architecture interface and its registry."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from megatron_rpp.algorithms.registry import Registry
from megatron_rpp.models.architectures.table import DEFAULT_NAMING, HFLayout, ParamTable, build_table
from megatron_rpp.models.spec import ModelSpec

ARCHITECTURES: Registry["Architecture"] = Registry("architecture")


class Architecture:
    """A HF architecture: how to read its config, and its parameter table.

    A subclass sets ``name`` and ``hf_layout`` (the HF names and conversions per role,
    :class:`~megatron_rpp.models.architectures.table.HFLayout`) and implements
    :meth:`model_spec`. :meth:`param_table` is the one source of truth for conversion,
    checkpoints, live loading, the weight sync to the rollout engine and HF export; the
    three name/tensor methods below are read from it (``to_hf`` is what the weight sync calls).
    """

    name: str = ""
    hf_layout: HFLayout

    def model_spec(self, hf_config: Mapping[str, Any]) -> ModelSpec:
        raise NotImplementedError

    def param_table(self, spec: ModelSpec, naming: str = DEFAULT_NAMING) -> ParamTable:
        """Every Megatron parameter of the model built from ``spec`` (cached per spec)."""
        cache = self.__dict__.setdefault("_tables", {})
        if (spec, naming) not in cache:
            cache[(spec, naming)] = build_table(spec, self.hf_layout, naming)
        return cache[(spec, naming)]

    def hf_names_for(self, spec: ModelSpec, name: str) -> list[str]:
        """The HF tensor names that make up Megatron parameter ``name``."""
        return list(self.param_table(spec)[name].hf_names)

    def to_megatron(self, spec: ModelSpec, name: str, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
        """Full Megatron tensor of ``name`` from its HF tensors (in ``hf_names_for`` order)."""
        return self.param_table(spec).to_megatron(name, hf_tensors)

    def to_hf(self, spec: ModelSpec, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``(hf_name, tensor)`` pieces of full Megatron tensor ``name`` (padding dropped)."""
        return self.param_table(spec).to_hf(name, tensor)
