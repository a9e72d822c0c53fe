"""<Family>ForSequenceClassification: a causal-LM family's trunk with a scalar score head.

This is how HF stores Bradley-Terry reward models (``LlamaForSequenceClassification``,
``Qwen2ForSequenceClassification``, ``Qwen3ForSequenceClassification``): the family's
``model.*`` weights plus ``score.weight`` [num_labels, H] and no ``lm_head``. The reward is
the score at the last token of a sequence.

Megatron side: the same GPTModel trunk, whose ``output_layer`` is a
:class:`megatron_rpp.models.reward_model.ScalarHead` holding ``output_layer.score.weight``
[1, H], replicated on every TP rank (not vocab-parallel) and never tied to the embedding.
Every other parameter maps exactly as in the family's causal-LM architecture, which this
class delegates to: one source of truth for the trunk.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from megatron_rpp.models.architectures.base import ARCHITECTURES, Architecture
from megatron_rpp.models.architectures.llama import Llama
from megatron_rpp.models.architectures.qwen2 import Qwen2
from megatron_rpp.models.architectures.qwen3 import Qwen3
from megatron_rpp.models.spec import ModelSpec, with_score_head

#: Megatron name of the scalar head's weight [num_labels, H], and its HF counterpart.
SCORE_PARAM = "output_layer.score.weight"
HF_SCORE = "score.weight"
_LM_OUTPUT = "output_layer.weight"


class SequenceClassification(Architecture):
    """``trunk``'s layout with the vocabulary head replaced by the score head."""

    def __init__(self, name: str, trunk: Architecture):
        self.name = name
        self.trunk = trunk

    def model_spec(self, hf_config: Mapping[str, Any]) -> ModelSpec:
        return with_score_head(self.trunk.model_spec(hf_config), hf_config)

    def megatron_param_names(self, spec: ModelSpec) -> list[str]:
        names = [n for n in self.trunk.megatron_param_names(spec) if n != _LM_OUTPUT]
        return names + [SCORE_PARAM]

    def hf_names_for(self, spec: ModelSpec, name: str) -> list[str]:
        return [HF_SCORE] if name == SCORE_PARAM else self.trunk.hf_names_for(spec, name)

    def to_megatron(self, spec: ModelSpec, name: str, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
        if name == SCORE_PARAM:
            (score,) = hf_tensors
            return score
        return self.trunk.to_megatron(spec, name, hf_tensors)

    def to_hf(self, spec: ModelSpec, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name == SCORE_PARAM:
            return [(HF_SCORE, tensor)]
        return self.trunk.to_hf(spec, name, tensor)


for _name, _trunk in [
    ("LlamaForSequenceClassification", Llama()),
    ("Qwen2ForSequenceClassification", Qwen2()),
    ("Qwen3ForSequenceClassification", Qwen3()),  # QK-norm (and optional QKV bias) from the trunk
]:
    ARCHITECTURES.register(_name, SequenceClassification(_name, _trunk))
