"""Does the rollout engine compute the trainer's policy? Probe check after a sync, gap metrics every step.

Silently wrong weights after resharding (a swapped gate/up, a mis-grouped QKV, a stale
tensor) generate plausible-looking text and only show up as reward collapse. Two guards:

- :func:`check_engine_matches_trainer`: score a fixed probe batch with the engine and
  with the Megatron model (teacher forcing, temperature 1) and raise
  :class:`EngineTrainerMismatch` naming the gap when they disagree. Collective: every
  rank compares its own engine, and all ranks raise (or not) together.
- :func:`log_prob_gap_metrics`: pure torch, for the trainer to log each step on the
  sampled tokens it already has (rollout log-probs vs its own old log-probs).

Shapes: B sequences, S padded sequence length, T response length.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from megatron_rpp.parallel.groups import ParallelGroups


class EngineTrainerMismatch(RuntimeError):
    """The engine's log-probs differ from the trainer's beyond the tolerance."""


def log_prob_gap_metrics(
    rollout_log_probs: torch.Tensor, log_probs: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, float]:
    """Gap between the rollout engine's and the trainer's log-probs of the sampled tokens.

    Args:
        rollout_log_probs: [B, T] the engine's log-prob of each sampled token.
        log_probs: [B, T] the trainer's log-prob of the same tokens (same temperature).
        response_mask: [B, T] 1 for response tokens, 0 for padding.

    Returns:
        ``mean_abs_diff`` and ``max_abs_diff`` of δ = log_probs − rollout_log_probs over
        response tokens; ``kl``: the k3 estimate E[e^δ − 1 − δ] of
        KL(π_rollout ‖ π_trainer) (tokens were sampled from π_rollout, so it is unbiased
        and ≥ 0); ``num_tokens`` (to weight means across data-parallel ranks).
    """
    if rollout_log_probs.shape != log_probs.shape or log_probs.shape != response_mask.shape:
        raise ValueError(
            f"shape mismatch: rollout_log_probs {tuple(rollout_log_probs.shape)}, "
            f"log_probs {tuple(log_probs.shape)}, response_mask {tuple(response_mask.shape)}"
        )
    mask = response_mask.bool()
    n = int(mask.sum())
    if n == 0:
        return {"mean_abs_diff": 0.0, "max_abs_diff": 0.0, "kl": 0.0, "num_tokens": 0}
    delta = (log_probs.double() - rollout_log_probs.double())[mask]  # [B, T] -> [N]
    k3 = torch.expm1(delta) - delta
    return {
        "mean_abs_diff": float(delta.abs().mean()),
        "max_abs_diff": float(delta.abs().max()),
        "kl": float(k3.mean()),
        "num_tokens": n,
    }


def probe_sequences(vocab_size: int, *, num: int = 4, length: int = 32, seed: int = 0) -> list[list[int]]:
    """Deterministic random token sequences (identical on every rank) for the probe check.

    Random tokens are a good probe for mapping errors: every weight takes part, and no
    tokenizer is needed.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num, length), generator=g).tolist()


def trainer_sequence_log_probs(
    model, groups: ParallelGroups, sequences: Sequence[Sequence[int]], *, temperature: float = 1.0
) -> list[torch.Tensor]:
    """The Megatron model's teacher-forced log-probs of tokens 1..L-1 of each sequence,
    ``log_softmax(logits / temperature)``.

    Through Megatron's own output layer and the logits kernel (not the trainer's fused
    output layer): an independent path from training. Collective (one forward through the
    pipeline). Returns the same list on every rank.
    Shape: one [L_i - 1] fp32 tensor per sequence.
    """
    from megatron_rpp.data.rollout_batch import RolloutBatch
    from megatron_rpp.models.scoring import forward_score, response_log_probs_head

    batch = RolloutBatch.from_sequences([list(s[:1]) for s in sequences], [list(s[1:]) for s in sequences])
    head = response_log_probs_head(model, groups, temperature=temperature, fused=False)
    lp = forward_score(model, groups, batch, head, micro_batch_size=len(sequences))  # [B, T] on the last stage
    if lp is None:
        lp = torch.empty(batch.response_ids.shape)
    if groups.pp_size > 1:
        from megatron_rpp.models.pipeline import model_device

        lp = lp.to(model_device(model))  # NCCL moves only device tensors
        dist.broadcast(lp, src=groups.pp_ranks[-1], group=groups.pp_group)
    return [lp[i, : len(s) - 1].cpu() for i, s in enumerate(sequences)]


def check_engine_matches_trainer(
    engine,
    model,
    groups: ParallelGroups,
    sequences: Sequence[Sequence[int]],
    *,
    max_abs_tol: float = 1e-2,
) -> dict[str, float]:
    """Score ``sequences`` with ``engine`` and the Megatron ``model``; fail when they differ.

    Collective over the whole world. ``max_abs_tol`` bounds max |Δ log-prob| over all
    probe tokens and all ranks' engines. Guidance: fp32 engine and trainer agree to
    ~1e-5, so 1e-4 is tight there; bf16 rounding gives ~1e-2 .. 1e-1; a mapping error
    gives gaps of whole nats.

    Returns:
        ``max_abs_diff`` / ``mean_abs_diff`` (worst over ranks) and ``num_tokens``.
    Raises:
        EngineTrainerMismatch: with the gap, the worst sequence and token position.
    """
    trainer = trainer_sequence_log_probs(model, groups, sequences)
    engine_lp = engine.score([list(s[:1]) for s in sequences], [list(s[1:]) for s in sequences])
    diffs = [(e - t).abs() for e, t in zip(engine_lp, trainer)]
    flat = torch.cat(diffs)
    from megatron_rpp.models.pipeline import model_device

    worst = torch.tensor([float(flat.max()), float(flat.mean())], dtype=torch.float64, device=model_device(model))
    for group in (groups.mp_group, groups.dp_group):  # every rank ends with the world's worst
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    result = {"max_abs_diff": float(worst[0]), "mean_abs_diff": float(worst[1]), "num_tokens": int(flat.numel())}
    if not result["max_abs_diff"] <= max_abs_tol:  # also catches NaN
        i = max(range(len(diffs)), key=lambda k: float(diffs[k].max()))
        t = int(diffs[i].argmax())
        raise EngineTrainerMismatch(
            f"rollout engine and trainer disagree after the weight sync: max |Δ log-prob| = "
            f"{result['max_abs_diff']:.3g} > tolerance {max_abs_tol:g} (mean {result['mean_abs_diff']:.3g} "
            f"over {result['num_tokens']} probe tokens; on this rank sequence {i} token {t + 1}: engine "
            f"{float(engine_lp[i][t]):.4f} vs trainer {float(trainer[i][t]):.4f}). The weights the engine "
            f"runs are not the trainer's: check the architecture's weight mapping (to_hf) and the sync."
        )
    return result
