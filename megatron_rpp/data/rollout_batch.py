"""RolloutBatch: the one typed container of a rollout batch, and the one micro-batching function.

Built once after generation; every later phase adds fields to it (rewards, old/ref
log-probs, values, advantages, returns) and it travels between the controller and the
workers as tensors. Slicing it per engine group, DP rank, mini-batch or micro-batch is
indexing (:meth:`RolloutBatch.select`, :meth:`RolloutBatch.split`) and never re-pads;
:meth:`RolloutBatch.trimmed` drops all-padding columns of a slice.

Letters: B sequences, P longest prompt, T longest response, S = longest prompt + response.
Sequence b is ``prompt_b + response_b``; :meth:`RolloutBatch.model_inputs` packs it
right-padded into one row of ``input_ids`` [B, S]. Response token t of b sits at position
``p_b + t`` and is predicted by the output at position ``p_b + t - 1`` (``resp_index``).

Only torch: importable by models/, rollout/, trainer/ and tests alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["RolloutBatch", "balanced_parts", "micro_batch_indices", "pad_right", "padded_tokens"]

#: Optional per-response-token fields, each [B, T] fp32 (0 on padding).
TOKEN_FIELDS = ("rollout_log_probs", "old_log_probs", "ref_log_probs", "values", "advantages", "returns")
#: Optional per-sequence fields, each [B] fp32.
SEQUENCE_FIELDS = ("rewards",)


def pad_right(rows: Sequence[Sequence[int] | Tensor], *, width: int | None = None, value: float = 0,
              dtype: torch.dtype = torch.long) -> Tensor:
    """Ragged rows -> one right-padded tensor (the project's only padding helper).

    ``rows`` are lists of numbers or tensors whose first dim is ragged; ``width`` (default:
    the longest row, at least 1) must fit every row.

    Shape: B rows of [n_b, ...] -> [B, width, ...].
    """
    tensors = [r if isinstance(r, Tensor) else torch.as_tensor(list(r), dtype=dtype) for r in rows]
    longest = max((t.shape[0] for t in tensors), default=0)
    width = max(1, longest) if width is None else width
    if longest > width:
        raise ValueError(f"pad_right: a row of length {longest} does not fit width {width}")
    trailing = tensors[0].shape[1:] if tensors else ()
    out_dtype = tensors[0].dtype if tensors and isinstance(rows[0], Tensor) else dtype
    out = torch.full((len(tensors), width, *trailing), value, dtype=out_dtype)
    for b, t in enumerate(tensors):
        out[b, : t.shape[0]] = t
    return out


def micro_batch_indices(lengths: Tensor, micro_batch_size: int, max_tokens: int = 0) -> list[Tensor]:
    """Split rows into micro-batches of similar length (less padding); each entry holds the
    original row indices of one micro-batch.

    Rows are sorted by length (stable). With ``max_tokens == 0`` they are cut into groups of
    ``micro_batch_size``; with a token budget, each micro-batch takes rows in that order while
    its padded size (rows x longest row) stays within ``max_tokens`` (a row longer than the
    budget goes alone), and ``micro_batch_size`` is not used. The grouping changes no result:
    losses are normalised by global counts and scores are put back in the original order.

    Shape: lengths [B] -> list of [b_i] long index tensors, sum b_i = B.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    order = torch.sort(lengths, stable=True).indices
    if not max_tokens:
        return list(order.split(micro_batch_size))
    sizes, count = [], 0
    for n in lengths[order].tolist():  # ascending: the newest row is the longest
        if count and (count + 1) * n > max_tokens:
            sizes.append(count)
            count = 0
        count += 1
    if count:
        sizes.append(count)
    return list(order.split(sizes))


def padded_tokens(lengths: Tensor, parts: list[Tensor]) -> int:
    """Positions a model processes for micro-batches ``parts`` of rows with ``lengths``
    (each micro-batch is right-padded to its longest row). Shape: lengths [B]."""
    return sum(len(p) * int(lengths[p].max()) for p in parts if len(p))


def balanced_parts(lengths: Tensor, parts: int) -> list[Tensor]:
    """Rows split into ``parts`` groups of near-equal total length (greedy longest-first: each
    row to the group with the fewest tokens so far, ties to the lower index), so data-parallel
    ranks finish together. Each group's indices are ascending (batch order is kept).

    Shape: lengths [B] -> ``parts`` [b_d] long index tensors.
    """
    load = [0] * parts
    members: list[list[int]] = [[] for _ in range(parts)]
    for i in torch.sort(lengths, descending=True, stable=True).indices.tolist():
        d = min(range(parts), key=lambda k: (load[k], len(members[k]), k))
        members[d].append(i)
        load[d] += int(lengths[i])
    return [torch.tensor(sorted(m), dtype=torch.long) for m in members]


@dataclass
class RolloutBatch:
    """Padded tensors of B sampled sequences (shapes in the module doc).

    Shape:
        prompt_ids [B, P] long (right-padded with 0), prompt_lengths [B] long,
        response_ids [B, T] long (right-padded with 0), response_mask [B, T] bool,
        group_index [B] long (the prompt's index: samples of one prompt share it),
        every TOKEN_FIELDS entry [B, T] fp32 or None, rewards [B] fp32 or None.
    """

    prompt_ids: Tensor
    prompt_lengths: Tensor
    response_ids: Tensor
    response_mask: Tensor
    group_index: Tensor
    rollout_log_probs: Tensor | None = None
    old_log_probs: Tensor | None = None
    ref_log_probs: Tensor | None = None
    values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    rewards: Tensor | None = None

    def __post_init__(self) -> None:
        B, T = self.response_ids.shape
        assert self.prompt_ids.dim() == 2 and self.prompt_ids.shape[0] == B, self._shapes()
        assert tuple(self.response_mask.shape) == (B, T) and self.response_mask.dtype == torch.bool, self._shapes()
        assert tuple(self.prompt_lengths.shape) == (B,) and tuple(self.group_index.shape) == (B,), self._shapes()
        for name in TOKEN_FIELDS:
            v = getattr(self, name)
            assert v is None or tuple(v.shape) == (B, T), f"{name}: {tuple(v.shape)} != {(B, T)}"
        assert self.rewards is None or tuple(self.rewards.shape) == (B,), f"rewards: {tuple(self.rewards.shape)}"

    def _shapes(self) -> str:
        return ", ".join(f"{f.name} {tuple(getattr(self, f.name).shape)}" for f in dataclasses.fields(self)
                         if getattr(self, f.name) is not None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sequences(cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                       group_index: Sequence[int] | Tensor | None = None,
                       rollout_log_probs: Sequence[Tensor] | None = None) -> "RolloutBatch":
        """From ragged token lists (``group_index`` default: one group per sequence)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        resp_len = torch.tensor([len(r) for r in responses], dtype=torch.long)
        response_ids = pad_right(responses)
        mask = torch.arange(response_ids.shape[1])[None, :] < resp_len[:, None]  # [B, T]
        lps = None
        if rollout_log_probs is not None:
            lps = pad_right([torch.as_tensor(x, dtype=torch.float32) for x in rollout_log_probs],
                            width=response_ids.shape[1])
        groups = torch.arange(len(prompts)) if group_index is None else torch.as_tensor(group_index, dtype=torch.long)
        return cls(pad_right(prompts), torch.tensor([len(p) for p in prompts], dtype=torch.long), response_ids,
                   mask, groups.clone(), rollout_log_probs=lps)

    @classmethod
    def cat(cls, batches: Sequence["RolloutBatch"]) -> "RolloutBatch":
        """Rows of all ``batches`` in order (widths padded to the widest; a field is kept only
        when every batch has it)."""
        batches = [b for b in batches if len(b)] or list(batches[:1])
        P = max(b.prompt_ids.shape[1] for b in batches)
        T = max(b.response_ids.shape[1] for b in batches)

        def widen(t: Tensor, w: int) -> Tensor:
            return torch.nn.functional.pad(t, (0, w - t.shape[1]))

        out = {"prompt_ids": torch.cat([widen(b.prompt_ids, P) for b in batches])}
        for name in ("response_ids", "response_mask", *TOKEN_FIELDS):
            vals = [getattr(b, name) for b in batches]
            out[name] = None if any(v is None for v in vals) else torch.cat([widen(v, T) for v in vals])
        for name in ("prompt_lengths", "group_index", *SEQUENCE_FIELDS):
            vals = [getattr(b, name) for b in batches]
            out[name] = None if any(v is None for v in vals) else torch.cat(vals)
        return cls(**out)

    def replace(self, **fields: Tensor | None) -> "RolloutBatch":
        """A copy with ``fields`` set (the tensors are shared, not copied)."""
        return dataclasses.replace(self, **fields)

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def response_lengths(self) -> Tensor:
        """[B] long."""
        return self.response_mask.sum(dim=1)

    @property
    def sequence_lengths(self) -> Tensor:
        """Prompt + response tokens per sequence, [B] long."""
        return self.prompt_lengths + self.response_lengths

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def select(self, index: Tensor | Sequence[int] | slice) -> "RolloutBatch":
        """The rows ``index`` (in that order), same widths."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return type(self)(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                             for f in dataclasses.fields(self)})

    def split(self, parts: int) -> list["RolloutBatch"]:
        """Contiguous, near-equal parts (the first ones one row longer); some may be empty."""
        q, r = divmod(len(self), parts)
        bounds = [0]
        for k in range(parts):
            bounds.append(bounds[-1] + q + (1 if k < r else 0))
        return [self.select(slice(a, b)) for a, b in zip(bounds, bounds[1:])]

    def trimmed(self) -> "RolloutBatch":
        """The same rows without all-padding columns (prompt and response widths = the longest row)."""
        P = max(1, int(self.prompt_lengths.max())) if len(self) else 1
        T = max(1, int(self.response_lengths.max())) if len(self) else 1
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and f.name == "prompt_ids":
                v = v[:, :P]
            elif v is not None and v.dim() == 2:
                v = v[:, :T]
            out[f.name] = v
        return type(self)(**out)

    def micro_batches(self, micro_batch_size: int, max_tokens: int = 0) -> list[tuple[Tensor, "RolloutBatch"]]:
        """``(row indices, trimmed rows)`` per micro-batch (:func:`micro_batch_indices`)."""
        return [(idx, self.select(idx).trimmed())
                for idx in micro_batch_indices(self.sequence_lengths, micro_batch_size, max_tokens)]

    def model_inputs(self) -> tuple[Tensor, Tensor]:
        """``(input_ids, resp_index)``: prompt + response packed right-padded, and the position
        whose output predicts each response token (0 where the mask is 0).

        Shape: input_ids [B, S] long (S = longest sequence, at least 1), resp_index [B, T] long.
        """
        B, T = self.response_ids.shape
        lengths = self.sequence_lengths
        S = max(1, int(lengths.max())) if B else 1
        input_ids = torch.zeros(B, S, dtype=torch.long, device=self.response_ids.device)
        P = self.prompt_ids.shape[1]
        pos = torch.arange(P, device=input_ids.device)[None, :]
        prompt_mask = pos < self.prompt_lengths[:, None]  # [B, P]
        input_ids[:, : min(P, S)] = torch.where(prompt_mask, self.prompt_ids, 0)[:, :S]
        t = torch.arange(T, device=input_ids.device)[None, :]
        resp_pos = self.prompt_lengths[:, None] + t  # [B, T] position of response token t
        rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T)
        m = self.response_mask
        input_ids[rows[m], resp_pos[m]] = self.response_ids[m]
        resp_index = torch.where(m, resp_pos - 1, 0)
        return input_ids, resp_index

    def to(self, device: torch.device | str) -> "RolloutBatch":
        return type(self)(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                             for f in dataclasses.fields(self)})

    def response_list(self, b: int) -> list[int]:
        """Response tokens of sequence ``b`` (no padding)."""
        return self.response_ids[b, : int(self.response_mask[b].sum())].tolist()
