"""Padding rollout sequences into micro-batch tensors, and reading response tokens back out.

Letters: B sequences, S = longest prompt+response, T = longest response.
Sequence b is ``prompt_b + response_b`` right-padded to S. Response token t of b sits at
position ``p_b + t`` and is predicted by the logits at position ``p_b + t - 1``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SeqBatch:
    """Shape: input_ids [B, S] long; resp_index [B, T] long; response_mask [B, T] bool."""

    input_ids: torch.Tensor
    resp_index: torch.Tensor
    response_mask: torch.Tensor

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def pad_sequences(seqs: list[dict], pad_id: int = 0) -> SeqBatch:
    """``seqs[b]`` has ``prompt_ids`` and ``response_ids`` (lists of ints)."""
    lengths = [len(s["prompt_ids"]) + len(s["response_ids"]) for s in seqs]
    S = max(lengths)
    T = max(1, max(len(s["response_ids"]) for s in seqs))
    input_ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    resp_index = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids = list(s["prompt_ids"]) + list(s["response_ids"])
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        p, n = len(s["prompt_ids"]), len(s["response_ids"])
        resp_index[b, :n] = torch.arange(p - 1, p - 1 + n)
        mask[b, :n] = True
    return SeqBatch(input_ids, resp_index, mask)


def response_tensor(seqs: list[dict], key: str, T: int) -> torch.Tensor:
    """Per-response-token values ``seqs[b][key]`` (length n_b) as [B, T] fp32, 0-padded."""
    out = torch.zeros((len(seqs), T), dtype=torch.float32)
    for b, s in enumerate(seqs):
        v = s[key]
        out[b, : len(v)] = torch.as_tensor(v, dtype=torch.float32)
    return out


def take_response(per_position: torch.Tensor, batch: SeqBatch) -> torch.Tensor:
    """Values at the positions predicting response tokens.

    Shape: per_position [B, S-1] -> [B, T] (0 where the mask is 0).
    """
    idx = batch.resp_index.clamp(max=per_position.shape[1] - 1)
    out = per_position.gather(1, idx)
    return torch.where(batch.response_mask, out, torch.zeros((), dtype=out.dtype))
