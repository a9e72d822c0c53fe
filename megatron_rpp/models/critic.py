"""The critic of PPO: a Megatron GPTModel trunk with a scalar value head at every position.

    critic, spec = build_critic(policy_hf_dir, groups, model_dir="", vocab_size=policy_spec.vocab_size)
    values = forward_score(critic, groups, batch, value_head, micro_batch_size=8)   # [B, T] on the last stage

The head is :class:`~megatron_rpp.models.reward_model.ScalarHead` (the reward model's), so the
critic is built, split over TP x PP, loaded and checkpointed exactly like a reward model, but it
is trained (its own Megatron DDP + optimizer, ``critic.lr``).

Where it starts (``critic.model_dir``):

- empty: the policy's own HF folder, read through the matching ``*ForSequenceClassification``
  architecture (:func:`value_architecture`): every trunk weight from the policy, the value head
  ``score.weight`` [1, H] zero, so every value starts at exactly 0 (and the first step's GAE
  advantages are the λ-discounted token rewards);
- a HF sequence-classification folder (e.g. a Bradley-Terry reward model): trunk and head from it.

Alignment of values with response tokens. Sequence b is ``prompt_b + response_b`` (``p_b``
prompt tokens); response token t sits at position ``p_b + t``. Its value is

    values[b, t] = V(s_t),  s_t = prompt_b + response_b[:t]  (the state *before* token t is emitted),

read from the head at position ``p_b + t - 1`` — the same hidden state whose LM head predicts
token t (``resp_index`` of :meth:`~megatron_rpp.data.rollout_batch.RolloutBatch.model_inputs`).
GAE then uses δ_t = R_t + γ·V(s_{t+1}) − V(s_t) with V after the last response token = 0 (the
episode ends; the reward sits on the last token), :func:`~megatron_rpp.algorithms.advantages.gae`.

Letters: B sequences, S positions, T response tokens, H hidden size.
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from megatron_rpp.data.rollout_batch import RolloutBatch
from megatron_rpp.parallel.groups import ParallelGroups

__all__ = ["CriticError", "build_critic", "value_architecture", "value_head"]


class CriticError(ValueError):
    """A critic cannot be built from the given folder."""


def value_architecture(hf_config: Mapping[str, Any]):
    """``(architecture, config)`` of a scalar-head model for ``hf_config``.

    A ``*ForSequenceClassification`` config is taken as it is. A causal LM's config is read by the
    registered sequence-classification architecture over the same trunk, with one label (its
    ``score.weight`` is then new: :func:`build_critic` zero-initialises it).
    """
    from megatron_rpp.models.architectures import ARCHITECTURES
    from megatron_rpp.models.reward_model import reward_architectures

    names = list(hf_config.get("architectures") or [])
    if not names:
        raise CriticError("its config.json has no 'architectures' field")
    if names[0] in reward_architectures():
        return ARCHITECTURES.get(names[0]), dict(hf_config)
    heads = [n for n in reward_architectures() if getattr(ARCHITECTURES.get(n).trunk, "name", None) == names[0]]
    if not heads:
        raise CriticError(f"{names[0]} has no sequence-classification counterpart to put a value head on "
                          f"(supported: {', '.join(reward_architectures())} and their causal LMs)")
    return ARCHITECTURES.get(heads[0]), {**hf_config, "architectures": [heads[0]], "num_labels": 1}


def build_critic(policy_hf_dir: str | Path, groups: ParallelGroups, *, model_dir: str | Path = "",
                 dtype: torch.dtype = torch.float32, vocab_size: int | None = None):
    """This rank's shard of the critic, weights loaded, in train mode (module docstring).

    Args:
        policy_hf_dir: the policy's HF folder (the trunk when ``model_dir`` is empty).
        model_dir: ``critic.model_dir``: a HF sequence-classification folder, or empty.
        vocab_size: the policy's vocabulary size; the critic reads the policy's token ids, so a
            different one is an error.
    Returns:
        ``(model, spec)``; the model's forward gives values [B, S, 1] on the last stage.
    """
    from megatron_rpp.checkpoint.hf_loader import load_hf_weights
    from megatron_rpp.models.provider import build_gpt_model
    from megatron_rpp.models.spec import load_hf_config

    source = Path(model_dir or policy_hf_dir)
    try:
        arch, config = value_architecture(load_hf_config(source))
    except CriticError as e:
        raise CriticError(f"critic from {str(source)!r}: {e}") from None
    spec = arch.model_spec(config).for_tp(groups.tp_size)
    if vocab_size is not None and spec.vocab_size != vocab_size:
        raise CriticError(f"critic {str(source)!r} has vocab_size {spec.vocab_size}, the policy {vocab_size}: "
                          "the critic reads the policy's token ids and must share its tokenizer")
    model = build_gpt_model(spec, groups, dtype=dtype)
    load_hf_weights(model, groups, arch, spec, source, skip_roles=() if model_dir else ("score",))
    if not model_dir and groups.is_last_stage:
        with torch.no_grad():
            model.output_layer.score.weight.zero_()  # replicated over TP: zero on every rank
    model.sharded_state_dict = types.MethodType(_sharded_state_dict, model)  # checkpointable (see there)
    return model.train(), spec


def _sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
    """The critic's Megatron sharded state dict (for its ``dist_checkpointing`` checkpoint).

    Megatron's ``LanguageModule.sharded_state_dict`` marks the vocabulary head's
    ``output_layer.weight`` (padding) and fails without one; the value head has none: its
    ``output_layer.score.weight`` [1, H] is saved like any replicated parameter (one copy per TP
    group). The critic is untied and has no MTP, so GPTModel's other additions do not apply:
    Megatron's module-level default is the whole state.
    """
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets, ensure_metadata_has_dp_cp_group(metadata))


def value_head(output: Tensor, mb: RolloutBatch, input_ids: Tensor, resp_index: Tensor) -> Tensor:
    """The critic's value of each response token's state (module docstring), differentiable.

    Shape: output [b, S, 1] -> values [b, T] fp32 (0 where ``response_mask`` is 0).
    """
    assert output.dim() == 3 and output.shape[-1] == 1, f"expected values [b, S, 1], got {tuple(output.shape)}"
    per_position = output[..., 0].float()  # [b, S, 1] -> [b, S]
    values = per_position.gather(1, resp_index.to(output.device))  # [b, S] -> [b, T]
    mask = mb.response_mask.to(output.device)
    return torch.where(mask, values, torch.zeros((), device=output.device))
