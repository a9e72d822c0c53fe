"""The Architecture interface and its registry."""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from megatron_rpp.algorithms.registry import Registry
from megatron_rpp.models.architectures import llama_layout
from megatron_rpp.models.spec import ModelSpec

ARCHITECTURES: Registry["Architecture"] = Registry("architecture")


class Architecture:
    """A HF architecture: how to read its config and map its weights to Megatron and back.

    Subclasses set ``name`` and implement :meth:`model_spec`. The weight mapping
    defaults to the Llama-family layout (:mod:`llama_layout`); an architecture with a
    different layout overrides the four mapping methods. These methods are the one
    source of truth for conversion, weight sync to the rollout engine and HF export.
    """

    name: str = ""

    def model_spec(self, hf_config: Mapping[str, Any]) -> ModelSpec:
        raise NotImplementedError

    def megatron_param_names(self, spec: ModelSpec) -> list[str]:
        """Full-model Megatron parameter names (global layer indices), in a fixed order."""
        return llama_layout.megatron_param_names(spec)

    def hf_names_for(self, spec: ModelSpec, name: str) -> list[str]:
        """The HF tensor names that make up Megatron parameter ``name``."""
        return llama_layout.hf_names_for(spec, name)

    def to_megatron(self, spec: ModelSpec, name: str, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
        """Full Megatron tensor of ``name`` from its HF tensors (in ``hf_names_for`` order)."""
        return llama_layout.to_megatron(spec, name, hf_tensors)

    def to_hf(self, spec: ModelSpec, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``(hf_name, tensor)`` pieces of full Megatron tensor ``name``."""
        return llama_layout.to_hf(spec, name, tensor)

    def iter_hf_to_megatron(self, spec: ModelSpec, get) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.megatron_param_names(spec):
            yield name, self.to_megatron(spec, name, [get(h) for h in self.hf_names_for(spec, name)])
