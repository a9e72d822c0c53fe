"""Forward (and backward) of a Megatron model over micro-batches, through Megatron's schedules.

One entry point, :func:`forward_backward`, works for every TP/PP layout: with PP > 1
Megatron's pipeline schedule moves activations between stages and the loss function
runs on the last stage only.

Loss convention: ``loss_fn`` returns the micro-batch's share of the *global* loss
(e.g. a token sum divided by the global token count). Megatron must not rescale it,
so :func:`prepare_config_for_rl` sets ``calculate_per_token_loss`` (no division by the
number of micro-batches; Megatron DDP then sums, rather than averages, gradients
across data-parallel replicas) and a ``finalize_model_grads_func`` that does not
rescale by a token count. The gradient is then exactly the gradient of the global
loss, whatever the DP size or the micro-batching.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from megatron_rpp.parallel.groups import ParallelGroups


@dataclass
class MicroBatch:
    """Token ids of one micro-batch (right-padded) and whatever the loss needs.

    Shape: input_ids [B, S] long; position_ids [B, S] long (default arange).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


LossFn = Callable[[torch.Tensor, MicroBatch], "tuple[torch.Tensor, dict[str, Any]]"]


def _finalize_without_token_scaling(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, num_tokens=None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)


def prepare_config_for_rl(model_config) -> None:
    """Make Megatron leave our globally normalised loss and gradients unscaled (see module doc)."""
    model_config.calculate_per_token_loss = True
    model_config.finalize_model_grads_func = _finalize_without_token_scaling


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def forward_backward(
    model,
    micro_batches: list[MicroBatch],
    loss_fn: LossFn,
    groups: ParallelGroups,
    *,
    forward_only: bool,
) -> list[dict[str, Any]]:
    """Run ``model`` over ``micro_batches``; backward too unless ``forward_only``.

    ``loss_fn(logits, micro_batch) -> (loss, aux)`` gets this rank's vocab-parallel
    logits ``[B, S, V/tp]`` on the last pipeline stage.

    Returns:
        The ``aux`` dicts, one per micro-batch, on the last pipeline stage; ``[]`` on
        other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model_chunk):
        mb: MicroBatch = next(data_iterator)
        pos = mb.position_ids
        if pos is None:
            pos = torch.arange(mb.input_ids.shape[1], device=mb.input_ids.device).expand_as(mb.input_ids)
        output = model_chunk(input_ids=mb.input_ids, position_ids=pos, attention_mask=None)

        def loss_func(logits):
            loss, aux = loss_fn(logits, mb)
            return loss, torch.tensor(1, dtype=torch.int), aux

        return output, loss_func

    seq_length = max(mb.input_ids.shape[1] for mb in micro_batches)
    mbs = micro_batches[0].input_ids.shape[0]
    fb = get_forward_backward_func()
    out = fb(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )
    return list(out) if groups.is_last_stage else []
