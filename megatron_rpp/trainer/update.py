"""One optimizer step of the policy (or of the critic) on a data-parallel rank's share of a mini-batch.

    metrics = policy_update(ddp, optimizer, groups, batch, counts, loss_cfg, settings)
    metrics = value_update(critic_ddp, critic_optimizer, groups, batch, counts, clip_value, settings)

The worker calls it; tests call it on spawned ranks without an engine. Micro-batches come
from :func:`~megatron_rpp.models.scoring.to_micro_batches` (length-sorted; fixed size or a
token budget), the loss of each is its share of the *global* loss (``counts`` holds the
mini-batch's token and sequence counts over every DP rank), so the gradient does not depend
on the DP size or the micro-batching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_rpp.data.rollout_batch import RolloutBatch
from megatron_rpp.parallel.groups import ParallelGroups


@dataclass(frozen=True)
class StepSettings:
    """How a step runs (not what it computes)."""

    temperature: float
    """The rollout temperature: log-probs are of ``softmax(logits / temperature)``."""
    fused_output_layer: bool
    micro_batch_size: int
    max_tokens: int = 0
    """Token budget of a micro-batch (0: ``micro_batch_size`` sequences each)."""


def policy_update(ddp, optimizer, groups: ParallelGroups, batch: RolloutBatch, counts: dict, loss_cfg,
                  settings: StepSettings) -> dict[str, Any]:
    """Forward/backward of the PPO-clip policy loss over ``batch``'s micro-batches, then the
    optimizer step on every rank (skipped everywhere when any loss or gradient is non-finite).

    ``batch`` holds ``advantages``, ``rollout_log_probs``, ``old_log_probs`` (or None: then
    π_old = the detached current policy) and, for a KL loss, ``ref_log_probs``; ``counts``:
    the mini-batch's global ``tokens``, ``seqs`` and ``max_response_len``.

    Returns:
        ``grad_norm``, ``update_ok``, ``lr`` on every rank; on the last pipeline stage also
        ``loss``, ``pg_loss``, the loss's token-mean metrics and the rollout-vs-trainer gap
        (``rollout_logprob_abs_diff`` mean, ``rollout_logprob_max_abs_diff`` max), reduced over DP.
    """
    from megatron_rpp.algorithms.policy_loss import policy_loss
    from megatron_rpp.models.scoring import token_log_probs

    tp_group = groups.tp_group if groups.tp_size > 1 else None

    def loss_fn(output, mb):
        b: RolloutBatch = mb.extras["batch"]
        mask = b.response_mask
        lp, ent = token_log_probs(output, ddp, b, mb.input_ids, mb.extras["resp_index"], tp_group=tp_group,
                                  temperature=settings.temperature, fused=settings.fused_output_layer,
                                  with_entropy=True)
        old = b.old_log_probs if b.old_log_probs is not None else lp.detach()
        out = policy_loss(
            lp, old, b.advantages, mask, loss_cfg,
            global_token_count=counts["tokens"], global_seq_count=counts["seqs"],
            max_response_len=counts["max_response_len"], ref_log_probs=b.ref_log_probs,
            rollout_log_probs=b.rollout_log_probs, entropy=ent,
        )
        n = mask.sum()
        # Rollout engine vs trainer, both for the policy that sampled (π_old).
        gap = (old - b.rollout_log_probs).abs() * mask  # [b, T], 0 off the response
        sums = {k: v.detach().float() * n for k, v in out.metrics.items() if k != "pg_loss"}
        sums.update(tokens=n.float(), rollout_gap_sum=gap.sum(), pg_loss=out.metrics["pg_loss"].detach().float(),
                    loss=out.loss.detach().float())
        return out.loss, {"sums": sums, "rollout_gap_max": gap.max()}

    metrics, aux = _optimizer_step(ddp, optimizer, groups, batch, loss_fn, settings,
                                   hidden_states=settings.fused_output_layer)
    if groups.is_last_stage:
        sums = _dp_sums(aux, groups)
        gap_max = torch.stack([a["rollout_gap_max"] for a in aux]).max().reshape(1)  # [M] -> [1]
        dist.all_reduce(gap_max, op=dist.ReduceOp.MAX, group=groups.dp_group)
        tokens = max(sums.pop("tokens"), 1.0)
        metrics["loss"] = sums.pop("loss")
        metrics["pg_loss"] = sums.pop("pg_loss")
        metrics["rollout_logprob_abs_diff"] = sums.pop("rollout_gap_sum") / tokens
        metrics["rollout_logprob_max_abs_diff"] = float(gap_max)
        metrics.update({k: v / tokens for k, v in sums.items()})
    return metrics


def value_update(ddp, optimizer, groups: ParallelGroups, batch: RolloutBatch, counts: dict, clip_value: float,
                 settings: StepSettings) -> dict[str, Any]:
    """Forward/backward of the clipped value loss over ``batch``'s micro-batches, then the
    critic's optimizer step (skipped everywhere when any loss or gradient is non-finite).

    ``batch`` holds ``values`` (the critic's at rollout time: the clipping anchor) and the GAE
    ``returns`` (targets); ``counts``: the mini-batch's global ``tokens`` and ``seqs``. The loss is
    0.5·max((V − G)², (V_clip − G)²) per response token, summed over the mini-batch and divided by
    its global token count (``clip_value`` 0: unclipped), so the gradient is independent of the DP
    size and the micro-batching, like the policy's.

    Returns:
        ``grad_norm``, ``update_ok``, ``lr`` on every rank; on the last pipeline stage also
        ``value_loss``, ``value_clip_fraction``, ``values`` (mean of the trained values) and
        ``value_error`` (mean |V − G|), token means over the mini-batch (reduced over DP).
    """
    from megatron_rpp.algorithms.value_loss import value_loss
    from megatron_rpp.models.critic import value_head

    if batch.values is None or batch.returns is None:
        raise ValueError("value_update needs the batch's values (rollout-time critic) and returns (GAE targets)")

    def loss_fn(output, mb):
        b: RolloutBatch = mb.extras["batch"]
        values = value_head(output, b, mb.input_ids, mb.extras["resp_index"])  # [b, T]
        out = value_loss(values, b.values, b.returns, b.response_mask, clip_range=clip_value or None,
                         global_token_count=counts["tokens"], global_seq_count=counts["seqs"])
        n = b.response_mask.sum()
        sums = {k: v.detach().float() * n for k, v in out.metrics.items()}
        sums.update(tokens=n.float(), loss=out.loss.detach().float())
        return out.loss, {"sums": sums}

    metrics, aux = _optimizer_step(ddp, optimizer, groups, batch, loss_fn, settings, hidden_states=False)
    if groups.is_last_stage:
        sums = _dp_sums(aux, groups)
        tokens = max(sums.pop("tokens"), 1.0)
        metrics["value_loss"] = sums.pop("loss")
        metrics.update({k: v / tokens for k, v in sums.items()})
    return metrics


def _optimizer_step(ddp, optimizer, groups: ParallelGroups, batch: RolloutBatch, loss_fn, settings: StepSettings,
                    *, hidden_states: bool) -> tuple[dict[str, Any], list[dict]]:
    """Zero the gradients, forward/backward ``loss_fn`` over ``batch``'s micro-batches (length-sorted;
    fixed size or a token budget), step when every loss and gradient is finite.

    ``loss_fn(output, micro_batch) -> (loss, aux)``, ``aux["sums"]["loss"]`` the detached loss; the
    micro-batches' summed losses decide finiteness. Returns ``({grad_norm, update_ok, lr}, aux list)``
    (the aux list is empty off the last pipeline stage)."""
    from megatron_rpp.models.pipeline import forward_backward, model_device
    from megatron_rpp.models.scoring import output_context, to_micro_batches
    from megatron_rpp.trainer.optim import step_if_finite, zero_grad

    mbs = to_micro_batches(batch, settings.micro_batch_size, model_device(ddp), settings.max_tokens)
    zero_grad(ddp, optimizer)  # every virtual-pipeline chunk
    with output_context(ddp, hidden_states):
        aux = forward_backward(ddp, mbs, loss_fn, groups, forward_only=False)
    loss_sum = torch.stack([a["sums"]["loss"] for a in aux]).sum() if aux else torch.zeros(())
    ok, grad_norm = step_if_finite(ddp, optimizer, loss_sum)
    return {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "update_ok": bool(ok), "lr": optimizer.param_groups[0]["lr"]}, aux


def _dp_sums(aux: list[dict], groups: ParallelGroups) -> dict[str, float]:
    """The micro-batches' ``aux["sums"]`` added up, then summed over the data-parallel group."""
    keys = sorted(aux[0]["sums"])
    total = torch.stack([torch.stack([a["sums"][k] for k in keys]) for a in aux]).sum(0)  # [M, K] -> [K]
    dist.all_reduce(total, group=groups.dp_group)
    return dict(zip(keys, total.tolist()))
