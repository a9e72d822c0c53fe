"""Forward (and backward) of a Megatron model over micro-batches, through Megatron's schedules.

One entry point, :func:`forward_backward`, works for every TP/PP/VPP layout: with PP > 1
Megatron's pipeline schedule (1F1B; interleaved 1F1B over the model chunks of a virtual
pipeline) moves activations between stages and the loss function runs on the last stage only.
A model is one GPTModel or :class:`ModelChunks` (a stage's virtual-pipeline chunks).

Two layout needs are met here, so callers never see them:

- the interleaved schedule runs micro-batches in groups of PP per chunk and needs their
  number to be a multiple of PP: a shortfall is made up with repeats of the last
  micro-batch whose loss is multiplied by 0 (their gradient is exactly 0) and whose outputs
  are dropped;
- sequence parallelism splits the sequence over the TP ranks: each micro-batch's
  ``input_ids`` are right-padded with token 0 to a multiple of TP (causal attention keeps
  the padding from reaching any real position; ``loss_fn`` gets the padded micro-batch).

Every micro-batch must already be on the model's device (``scoring.to_micro_batches`` puts
it there); one elsewhere is an error naming both devices.

Loss convention: ``loss_fn`` returns the micro-batch's share of the *global* loss
(e.g. a token sum divided by the global token count). Megatron must not rescale it,
so :func:`prepare_config_for_rl` sets ``calculate_per_token_loss`` (no division by the
number of micro-batches; Megatron DDP then sums, rather than averages, gradients
across data-parallel replicas) and a ``finalize_model_grads_func`` that does not
rescale by a token count. The gradient is then exactly the gradient of the global
loss, whatever the DP size or the micro-batching.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from megatron_rpp.parallel.gather import model_chunks
from megatron_rpp.parallel.groups import ParallelGroups


class ModelChunks(list):
    """A pipeline stage's model: its virtual-pipeline chunks in order (one GPTModel, or DDP
    wrapper, without a virtual pipeline).

    A plain list, as Megatron's schedules, DDP and optimizer take model chunks, that also
    answers the few ``nn.Module`` calls made on a whole model (parameters, train/eval, freezing,
    zeroing DDP's gradient buffers). Parameter *names* go through
    ``parallel.gather.iter_local_params`` (global, canonical), never ``named_parameters``.
    """

    def parameters(self):
        return itertools.chain.from_iterable(c.parameters() for c in self)

    @property
    def training(self) -> bool:
        return self[0].training

    def train(self, mode: bool = True) -> "ModelChunks":
        for c in self:
            c.train(mode)
        return self

    def eval(self) -> "ModelChunks":
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> "ModelChunks":
        for c in self:
            c.requires_grad_(requires_grad)
        return self

    def zero_grad_buffer(self) -> None:
        """Megatron DDP's ``zero_grad_buffer`` on every chunk."""
        for c in self:
            c.zero_grad_buffer()


def model_device(model) -> torch.device:
    """The device of a model's parameters (the first chunk's)."""
    return next(model_chunks(model)[0].parameters()).device


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
    """The GPTModel inside DDP / Float16Module wrappers; of :class:`ModelChunks`, the last chunk
    (the one with the output layer on the last stage)."""
    return model_chunks(model)[-1]


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

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    _check_devices(micro_batches, model_device(chunks))
    config = chunks[0].config if hasattr(chunks[0], "config") else unwrap(chunks[0]).config
    if config.sequence_parallel:
        micro_batches = [_pad_sequence(mb, groups.tp_size) for mb in micro_batches]
    real = len(micro_batches)
    if len(chunks) > 1:  # interleaved: a multiple of PP micro-batches (module doc)
        micro_batches = micro_batches + [micro_batches[-1]] * (-real % groups.pp_size)

    def forward_step(data_iterator, model_chunk):
        i, mb = next(data_iterator)
        pos = mb.position_ids
        if pos is None:
            pos = torch.arange(mb.input_ids.shape[1], device=mb.input_ids.device).expand_as(mb.input_ids)
        output = model_chunk(input_ids=mb.input_ids, position_ids=pos, attention_mask=None)

        def loss_func(logits):
            loss, aux = loss_fn(logits, mb)
            if i >= real:  # a repeat that only fills the interleaved schedule
                loss, aux = loss * 0.0, None
            return loss, torch.tensor(1, dtype=torch.int, device=loss.device), aux

        return output, loss_func

    data = [iter(enumerate(micro_batches)) for _ in chunks]
    fb = get_forward_backward_func(pp_size=groups.pp_size, vp_size=len(chunks) if len(chunks) > 1 else None)
    out = fb(
        forward_step_func=forward_step,
        data_iterator=data if len(chunks) > 1 else data[0],
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=max(mb.input_ids.shape[1] for mb in micro_batches),
        micro_batch_size=micro_batches[0].input_ids.shape[0],
        forward_only=forward_only,
    )
    return [a for a in out if a is not None][:real] if groups.is_last_stage else []


def _pad_sequence(mb: MicroBatch, multiple: int) -> MicroBatch:
    """``mb`` with ``input_ids`` (and ``position_ids``) right-padded to a multiple of ``multiple``.

    Shape: [B, S] -> [B, ceil(S / multiple) * multiple]."""
    pad = -mb.input_ids.shape[1] % multiple
    if not pad:
        return mb
    pos = mb.position_ids
    if pos is not None:
        last = pos[:, -1:]
        pos = torch.cat([pos, last + torch.arange(1, pad + 1, device=pos.device)], dim=1)
    return replace(mb, input_ids=torch.nn.functional.pad(mb.input_ids, (0, pad)), position_ids=pos)


def _check_devices(micro_batches: list[MicroBatch], device: torch.device) -> None:
    for k, mb in enumerate(micro_batches):
        for name, t in (("input_ids", mb.input_ids), ("position_ids", mb.position_ids)):
            if t is not None and t.device != device:
                raise ValueError(f"micro-batch {k}: {name} is on {t.device}, the model on {device}; "
                                 "move the batch first (models.scoring.to_micro_batches(batch, size, device))")
