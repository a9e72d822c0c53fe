"""Response log-probs straight from the last hidden states: the fused output layer.

With ``model.fused_output_layer`` the policy and reference models stop before their
output layer: :func:`hidden_states_output` makes the output layer hand its input through,
so the last pipeline stage returns hidden states [B, S, H] instead of logits
[B, S, V/tp], and :func:`response_log_probs` feeds only the rows that predict response
tokens to :func:`~megatron_rpp.kernels.fused_linear_log_probs` with the layer's weight.
No [tokens, V/tp] logits tensor is ever built, and prompt and padding positions cost no
vocabulary work at all.

The output layer keeps its parameters and state-dict keys (checkpoints, weight sync and
export are unchanged); only its forward is swapped, inside the context manager.
Gradients reach the weight through autograd (Megatron DDP's hooks see them as usual);
with tied embeddings the weight is the shared one, exactly as in Megatron's own forward.

Sequence parallelism: the last stage's hidden states are then split along the sequence over
the TP ranks ([B, S/tp, H] per rank; S padded to a multiple of tp). Megatron's own output
layer all-gathers the whole [S, B, H] first. Here only the response rows are gathered
(:class:`_GatherRows`): each rank fills the rows it holds into an [n, H] buffer and one
all-reduce over the TP group completes it, so the memory is that of the non-SP path (which
copies the same [n, H] rows out of the full hidden states) and the fused kernel's <= 5 %
extra-memory property is kept. The backward needs no communication of its own: the kernel
already all-reduces dL/dhidden over TP, so each rank takes its own rows of it.

Shape letters: B sequences, S positions, T response tokens, n response tokens of a
micro-batch, H hidden, V/tp vocabulary shard.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from megatron_rpp.models.pipeline import unwrap

__all__ = ["hidden_states_output", "output_weight", "response_log_probs"]


def output_weight(model) -> Tensor:
    """This rank's vocabulary shard of the output-layer weight [V/tp, H] (last pipeline stage)."""
    gpt = unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def _hand_through(hidden_states, weight=None, runtime_gather_output=None):
    return hidden_states, None  # (output, bias) like ColumnParallelLinear


@contextmanager
def hidden_states_output(model):
    """Within the block, ``model`` (a GPTModel, possibly DDP-wrapped) returns its final
    hidden states [B, S, H] instead of logits on the last pipeline stage. Other stages are
    unaffected (they have no output layer)."""
    gpt = unwrap(model)
    layer = getattr(gpt, "output_layer", None) if gpt.post_process else None
    if layer is None:
        yield
        return
    layer.forward = _hand_through  # instance attribute: shadows the class's forward
    try:
        yield
    finally:
        del layer.forward


class _GatherRows(torch.autograd.Function):
    """Sum of every TP rank's ``rows`` [n, H] (each rank filled the rows it holds, zeros
    elsewhere) -> the whole [n, H] on every rank. Backward: the incoming gradient is already
    summed over TP (by the fused kernel), so it passes through as it is."""

    @staticmethod
    def forward(ctx, rows: Tensor, tp_group) -> Tensor:
        import torch.distributed as dist

        out = rows.clone()
        dist.all_reduce(out, group=tp_group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def sequence_parallel_rows(hidden: Tensor, rows: Tensor, pos: Tensor, tp_group) -> Tensor:
    """The hidden states at (``rows``, ``pos``) from sequence-parallel shards (differentiable).

    TP rank r holds positions [r S/tp, (r+1) S/tp) of every sequence.
    Shape: hidden [B, S/tp, H] (this rank's slice), rows and pos [n] -> [n, H].
    """
    import torch.distributed as dist

    local = hidden.shape[1]
    mine = (pos // local) == dist.get_rank(group=tp_group)  # [n]
    picked = hidden.new_zeros(rows.shape[0], hidden.shape[2])
    picked = picked.index_put((mine.nonzero().squeeze(1),), hidden[rows[mine], pos[mine] % local])
    return _GatherRows.apply(picked, tp_group)


def response_log_probs(hidden: Tensor, weight: Tensor, input_ids: Tensor, resp_index: Tensor,
                       response_mask: Tensor, *, tp_group=None, temperature: float = 1.0,
                       with_entropy: bool = False, vocab_size: int | None = None,
                       sequence_parallel: bool = False) -> tuple[Tensor, Tensor | None]:
    """log π of the response tokens (and the entropy there) from the last hidden states.

    ``resp_index[b, t]`` is the position whose hidden state predicts response token t of
    sequence b (``RolloutBatch.model_inputs``); only positions where ``response_mask``
    is set are computed, the rest are 0. ``vocab_size``: the real vocabulary when ``weight``
    has padding rows (``provider.real_vocab_size(model)``); they get no probability mass.
    ``sequence_parallel``: ``hidden`` is this TP rank's slice of the sequence (module doc).

    Shape: hidden [B, S, H] ([B, S/tp, H] with ``sequence_parallel``), weight [V/tp, H],
    input_ids [B, S], resp_index and response_mask [B, T] -> log_probs [B, T] fp32 (and
    entropy [B, T] fp32 or None).
    """
    from megatron_rpp.kernels import fused_linear_log_probs

    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(resp_index)[response_mask]  # [n]
    pos = resp_index[response_mask]  # [n]
    if sequence_parallel and tp_group is not None:
        picked = sequence_parallel_rows(hidden, rows, pos, tp_group)  # [B, S/tp, H] -> [n, H]
    else:
        picked = hidden[rows, pos]  # [B, S, H] -> [n, H]
    out = fused_linear_log_probs(picked, weight, input_ids[rows, pos + 1], tp_group=tp_group,
                                 temperature=temperature, with_entropy=with_entropy,
                                 vocab_size=vocab_size)  # [n, H] -> [n]
    log_probs, entropy = out if with_entropy else (out, None)

    def scatter(values: Tensor) -> Tensor:  # [n] -> [B, T], differentiable
        return values.new_zeros(response_mask.shape).masked_scatter(response_mask, values)

    return scatter(log_probs), (scatter(entropy) if entropy is not None else None)
