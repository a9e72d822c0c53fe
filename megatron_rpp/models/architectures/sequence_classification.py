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

from megatron_rpp.models.architectures.base import ARCHITECTURES, Architecture
from megatron_rpp.models.architectures.llama import Llama
from megatron_rpp.models.architectures.qwen2 import Qwen2
from megatron_rpp.models.architectures.qwen3 import Qwen3
from megatron_rpp.models.architectures.table import HF
from megatron_rpp.models.spec import ModelSpec, with_score_head


class SequenceClassification(Architecture):
    """``trunk``'s layout with the vocabulary head replaced by the score head (HF ``score.weight``)."""

    def __init__(self, name: str, trunk: Architecture):
        self.name = name
        self.trunk = trunk
        self.hf_layout = trunk.hf_layout.with_roles(score=HF("score.weight"))

    def model_spec(self, hf_config: Mapping[str, Any]) -> ModelSpec:
        return with_score_head(self.trunk.model_spec(hf_config), hf_config)


for _name, _trunk in [
    ("LlamaForSequenceClassification", Llama()),
    ("Qwen2ForSequenceClassification", Qwen2()),
    ("Qwen3ForSequenceClassification", Qwen3()),  # QK-norm (and optional QKV bias) from the trunk
]:
    ARCHITECTURES.register(_name, SequenceClassification(_name, _trunk))
