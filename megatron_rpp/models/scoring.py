"""Forward-only scoring of a :class:`RolloutBatch`: the one path used by the workers'
old/ref log-probs, the reward model, the sync self-check and ``verify.py``.

    values = forward_score(model, groups, batch, head, micro_batch_size=8)   # [B, ...] on the last stage

Rows are length-sorted into micro-batches (:func:`~megatron_rpp.data.rollout_batch.micro_batch_indices`,
each trimmed to its own longest row), run through Megatron's schedule (any TP/PP), handed
to ``head`` on the last pipeline stage, and put back in the batch's order. With
``hidden_states=True`` the model's output layer hands its input through
(:func:`~megatron_rpp.models.lm_head.hidden_states_output`), so ``head`` gets the final
hidden states [b, S, H] instead of logits [b, S, V/tp].

Ready-made heads: :func:`response_log_probs_head` (log π of the response tokens, fused or
from logits) and :func:`last_token_head` (a scalar head's value at the last token).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import Tensor

from megatron_rpp.data.rollout_batch import RolloutBatch, pad_right
from megatron_rpp.parallel.groups import ParallelGroups

#: ``head(output, micro_batch, input_ids, resp_index) -> [b, ...]`` on the last stage.
Head = Callable[[Tensor, RolloutBatch, Tensor, Tensor], Tensor]


def to_micro_batches(batch: RolloutBatch, micro_batch_size: int, device: torch.device | str, max_tokens: int = 0):
    """Megatron micro-batches of ``batch`` (length-sorted, trimmed, every tensor moved to
    ``device``: the model's, ``pipeline.model_device(model)``; a token budget when ``max_tokens``,
    see :func:`~megatron_rpp.data.rollout_batch.micro_batch_indices`); each carries
    ``extras = {"batch": rows, "rows": indices, "resp_index": [b, T']}``."""
    from megatron_rpp.models.pipeline import MicroBatch

    out = []
    for idx, mb in batch.micro_batches(micro_batch_size, max_tokens):
        mb = mb.to(device)
        input_ids, resp_index = mb.model_inputs()
        out.append(MicroBatch(input_ids, extras={"batch": mb, "rows": idx, "resp_index": resp_index}))
    return out


def output_context(model, hidden_states: bool):
    """Within it, the last stage of ``model`` returns hidden states (``hidden_states``) or logits."""
    from megatron_rpp.models.lm_head import hidden_states_output

    return hidden_states_output(model) if hidden_states else nullcontext()


@torch.no_grad()
def forward_score(model, groups: ParallelGroups, batch: RolloutBatch, head: Head, *, micro_batch_size: int,
                  max_tokens: int = 0, hidden_states: bool = False) -> Tensor | None:
    """``head``'s output for every row of ``batch``, in the batch's order (collective over the
    model's TP x PP group: every rank passes the same rows).

    Per-micro-batch outputs of different widths (dim 1) are right-padded with 0 to the widest.

    Returns:
        [B, ...] on the last pipeline stage (CPU); None on other stages.
    """
    from megatron_rpp.models.pipeline import forward_backward, model_device

    mbs = to_micro_batches(batch, micro_batch_size, model_device(model), max_tokens)

    def loss_fn(output, mb):
        e = mb.extras
        return output.new_zeros(()), {"value": head(output, e["batch"], mb.input_ids, e["resp_index"]).detach()}

    was_training = model.training
    model.eval()
    try:
        with output_context(model, hidden_states):
            aux = forward_backward(model, mbs, loss_fn, groups, forward_only=True) if mbs else []
    finally:
        model.train(was_training)
    if not groups.is_last_stage:
        return None
    if not mbs:
        return torch.zeros(0)
    values = [a["value"].cpu() for a in aux]
    if values[0].dim() >= 2:
        width = max(v.shape[1] for v in values)
        values = [pad_right(list(v), width=width) if v.shape[1] < width else v for v in values]
    out = torch.empty((len(batch), *values[0].shape[1:]), dtype=values[0].dtype)
    for mb, v in zip(mbs, values):
        out[mb.extras["rows"]] = v
    return out


def response_log_probs_head(model, groups: ParallelGroups, *, temperature: float, fused: bool,
                            with_entropy: bool = False):
    """A head giving log π(response token) [b, T] fp32 (0 on padding); with ``with_entropy``
    [b, T, 2] (log-prob, entropy).

    ``fused``: the output is hidden states and the vocabulary work runs in
    :func:`~megatron_rpp.models.lm_head.response_log_probs` on the response rows only;
    else the output is vocab-parallel logits and :func:`~megatron_rpp.kernels.vocab_parallel_log_probs`
    runs on every position.
    """
    tp_group = groups.tp_group if groups.tp_size > 1 else None

    def head(output: Tensor, mb: RolloutBatch, input_ids: Tensor, resp_index: Tensor) -> Tensor:
        lp, ent = token_log_probs(output, model, mb, input_ids, resp_index, tp_group=tp_group,
                                  temperature=temperature, fused=fused, with_entropy=with_entropy)
        return torch.stack([lp, ent], dim=-1) if with_entropy else lp

    return head


def token_log_probs(output: Tensor, model, mb: RolloutBatch, input_ids: Tensor, resp_index: Tensor, *, tp_group,
                    temperature: float, fused: bool, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropy) of ``mb``'s response tokens from the last stage's output
    (differentiable: training uses it too).

    Shape: output [b, S, H] (``fused``) or [b, S, V/tp] -> ([b, T] fp32, [b, T] fp32 or None).
    """
    from megatron_rpp.models.pipeline import unwrap
    from megatron_rpp.models.provider import real_vocab_size

    mask = mb.response_mask
    vocab_size = real_vocab_size(model)  # logits / output rows beyond it are vocabulary padding
    if fused:
        from megatron_rpp.models.lm_head import output_weight, response_log_probs

        return response_log_probs(output, output_weight(model), input_ids, resp_index, mask, tp_group=tp_group,
                                  temperature=temperature, with_entropy=with_entropy, vocab_size=vocab_size,
                                  sequence_parallel=unwrap(model).config.sequence_parallel)
    from megatron_rpp.kernels import vocab_parallel_log_probs

    out = vocab_parallel_log_probs(output[:, :-1], input_ids[:, 1:], tp_group=tp_group, temperature=temperature,
                                   with_entropy=with_entropy, vocab_size=vocab_size)  # [b, S-1]
    per_position = out if with_entropy else (out, None)
    zero = torch.zeros((), device=output.device)

    def take(values: Tensor | None) -> Tensor | None:  # [b, S-1] -> [b, T]
        if values is None:
            return None
        return torch.where(mask, values.gather(1, resp_index.clamp(max=values.shape[1] - 1)), zero)

    return take(per_position[0]), take(per_position[1])


def last_token_head(output: Tensor, mb: RolloutBatch, input_ids: Tensor, resp_index: Tensor) -> Tensor:
    """A scalar head's value at each sequence's last real token (a reward model's score).

    Shape: output [b, S, 1] -> [b] fp32.
    """
    assert output.dim() == 3 and output.shape[-1] == 1, f"expected scores [b, S, 1], got {tuple(output.shape)}"
    rows = torch.arange(output.shape[0], device=output.device)
    last = mb.sequence_lengths.to(output.device) - 1
    return output[rows, last, 0].float()
