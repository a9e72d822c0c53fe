"""HF layout ⇄ Megatron layout of one parameter: the conversions a parameter-table entry names.

All tensors are *full* (TP=1 layout); sharding is the table's (``ParamEntry.shard``).
Pure tensor math, no names. Letters: n query heads, g KV groups (``num_key_value_heads``),
d head dim, h hidden, f ffn hidden, V vocabulary; primes are the Megatron model's sizes
after padding (``ModelSpec.for_tp``).

- Megatron ``linear_qkv`` [g' * (n/g + 2) * d, h]: per KV group, its n/g query heads, then
  its key head, then its value head (:func:`fuse_qkv`). HF keeps separate q/k/v
  (Llama: :data:`GROUPED_QKV`) or one [q; k; v] tensor (Phi-3's ``qkv_proj``: :data:`FUSED_QKV`).
  A bias follows the same grouping.
- Megatron ``linear_fc1`` [2f, h] = [gate; up]: HF gate_proj + up_proj (:data:`GATE_UP`),
  or one ``gate_up_proj`` already in that order (:data:`SAME`).
- KV-group padding: groups g..g'-1 are zero rows of ``linear_qkv`` and their heads zero
  columns (the last ones) of ``linear_proj`` (:data:`HEAD_COLUMNS`).
- Vocabulary padding: rows V..V'-1 of the embedding and output layer are zero (:data:`VOCAB_ROWS`).

HF tensors never contain padding; ``to_hf`` drops it.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from megatron_rpp.models.spec import ModelSpec


class Conversion(NamedTuple):
    """How one Megatron parameter is built from its HF tensors and split back into them."""

    to_megatron: Callable[[ModelSpec, list[Tensor]], Tensor]
    """(spec, HF tensors in the entry's ``hf_names`` order) -> the full Megatron tensor."""
    to_hf: Callable[[ModelSpec, Tensor], list[Tensor]]
    """(spec, full Megatron tensor) -> the HF tensors, in ``hf_names`` order."""


def _single(tensors: list[Tensor]) -> Tensor:
    (t,) = tensors
    return t


def fuse_qkv(spec: ModelSpec, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """HF q/k/v -> Megatron grouped QKV (zero groups appended when ``spec`` is padded).

    Shape: q [n*d, ...], k [g*d, ...], v [g*d, ...] -> [g'*(n/g + 2)*d, ...]
    """
    n, g, d = spec.num_attention_heads, spec.num_query_groups, spec.kv_channels
    gp = spec.megatron_query_groups
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(g, (n // g) * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
    if gp != g:
        grouped = torch.cat([grouped, grouped.new_zeros(gp - g, *grouped.shape[1:])], dim=0)
    return grouped.reshape(gp * (n // g + 2) * d, *rest)


def split_qkv(spec: ModelSpec, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Megatron grouped QKV -> HF q, k, v (the inverse of :func:`fuse_qkv`; padding dropped)."""
    n, g, d = spec.num_attention_heads, spec.num_query_groups, spec.kv_channels
    gp = spec.megatron_query_groups
    if qkv.shape[0] != gp * (n // g + 2) * d:
        raise ValueError(
            f"linear_qkv has {qkv.shape[0]} rows, spec expects {gp * (n // g + 2) * d} "
            f"({gp} KV groups); was the model built from spec.for_tp(tp)?"
        )
    rest = qkv.shape[1:]
    grouped = qkv.reshape(gp, (n // g + 2) * d, *rest)[:g]
    q, k, v = torch.split(grouped, [(n // g) * d, d, d], dim=1)
    return q.reshape(n * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest)


def _qkv_rows(spec: ModelSpec) -> list[int]:
    d = spec.kv_channels
    return [spec.num_attention_heads * d, spec.num_query_groups * d, spec.num_query_groups * d]


def _fused_to_megatron(spec: ModelSpec, tensors: list[Tensor]) -> Tensor:
    """HF [q; k; v] (rows [(n + 2g)·d]) -> Megatron grouped QKV."""
    qkv = _single(tensors)
    if qkv.shape[0] != sum(_qkv_rows(spec)):
        raise ValueError(f"fused qkv has {qkv.shape[0]} rows, the config implies {sum(_qkv_rows(spec))}")
    return fuse_qkv(spec, *torch.split(qkv, _qkv_rows(spec), dim=0))


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def _vocab_to_megatron(spec: ModelSpec, tensors: list[Tensor]) -> Tensor:
    """HF [V, h] -> Megatron [V', h] (zero rows appended)."""
    t = _single(tensors)
    if t.shape[0] != spec.vocab_size:
        raise ValueError(f"vocabulary tensor has {t.shape[0]} rows, config vocab_size is {spec.vocab_size}")
    return _pad_rows(t, spec.megatron_vocab_size)


def _vocab_to_hf(spec: ModelSpec, t: Tensor) -> list[Tensor]:
    """Megatron [V', h] -> HF [V, h]."""
    if t.shape[0] != spec.megatron_vocab_size:
        raise ValueError(
            f"vocabulary tensor has {t.shape[0]} rows, spec expects {spec.megatron_vocab_size}; "
            "was the model built from spec.for_tp(tp)?"
        )
    return [t[: spec.vocab_size]]


def _proj_to_megatron(spec: ModelSpec, tensors: list[Tensor]) -> Tensor:
    """HF o_proj [h, n*d] -> Megatron linear_proj [h, n'*d] (zero columns for padded heads)."""
    o_proj = _single(tensors)
    extra = (spec.megatron_attention_heads - spec.num_attention_heads) * spec.kv_channels
    return torch.cat([o_proj, o_proj.new_zeros(o_proj.shape[0], extra)], dim=1) if extra else o_proj


def _proj_to_hf(spec: ModelSpec, proj: Tensor) -> list[Tensor]:
    """Megatron linear_proj [h, n'*d] -> HF o_proj [h, n*d]."""
    want = spec.megatron_attention_heads * spec.kv_channels
    if proj.shape[1] != want:
        raise ValueError(
            f"linear_proj has {proj.shape[1]} columns, spec expects {want}; was the model built from spec.for_tp(tp)?"
        )
    return [proj[:, : spec.num_attention_heads * spec.kv_channels]]


#: The same tensor on both sides (norms, ``linear_fc2``, a score head, Phi-3's ``gate_up_proj``).
SAME = Conversion(lambda spec, tensors: _single(tensors), lambda spec, t: [t])
#: Embedding / output layer rows: vocabulary padding appended, dropped on the way back.
VOCAB_ROWS = Conversion(_vocab_to_megatron, _vocab_to_hf)
#: Separate HF q_proj, k_proj, v_proj (weights or biases) <-> Megatron's grouped ``linear_qkv``.
GROUPED_QKV = Conversion(lambda spec, tensors: fuse_qkv(spec, *tensors), lambda spec, t: list(split_qkv(spec, t)))
#: One HF [q; k; v] tensor (Phi-3 ``qkv_proj``) <-> Megatron's grouped ``linear_qkv``.
FUSED_QKV = Conversion(_fused_to_megatron, lambda spec, t: [torch.cat(split_qkv(spec, t), dim=0)])
#: HF o_proj <-> Megatron ``linear_proj`` (padded heads' columns).
HEAD_COLUMNS = Conversion(_proj_to_megatron, _proj_to_hf)
#: HF gate_proj, up_proj <-> Megatron ``linear_fc1`` [gate; up].
GATE_UP = Conversion(lambda spec, tensors: torch.cat(tensors, dim=0), lambda spec, t: list(t.chunk(2, dim=0)))
