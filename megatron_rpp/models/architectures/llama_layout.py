"""Weight layout mapping shared by the Llama family (Llama, Qwen2, Qwen3): HF ⇄ Megatron.

All tensors here are *full* (TP=1, PP=1 layout) and named with Megatron's local-spec
parameter names and global layer indices. Sharding across TP/PP is done elsewhere
(``megatron_rpp.parallel.gather``); this module is pure tensor math.

Layouts (n = heads, g = KV groups (``num_key_value_heads``), d = head dim, h = hidden):

- Megatron ``linear_qkv.weight`` [g * (n/g + 2) * d, h]: for each KV group, its n/g
  query heads, then its key head, then its value head. HF keeps q_proj [n*d, h],
  k_proj [g*d, h], v_proj [g*d, h]. The bias (Qwen2) follows the same grouping.
- Megatron ``linear_fc1.weight`` [2f, h] = [gate; up]; HF gate_proj [f, h], up_proj [f, h].
- Tied embeddings: HF has no ``lm_head.weight`` (or an identical one); Megatron has no
  ``output_layer.weight``.
- KV-group padding (``spec.padded_query_groups``, see ``ModelSpec.for_tp``): Megatron has
  g' > g groups; groups g..g'-1 are zero rows of ``linear_qkv`` and their heads zero
  columns (the last ones) of ``linear_proj``. HF tensors never contain the padding.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from megatron_rpp.models.spec import ModelSpec

HFGetter = Callable[[str], torch.Tensor]

_LAYER_SIMPLE = {
    # megatron suffix -> HF suffix (same tensor, same layout)
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}


def megatron_param_names(spec: ModelSpec) -> list[str]:
    """Every Megatron parameter of the full model, in the fixed order used everywhere."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight"]
        if spec.add_qkv_bias:
            names.append(p + "self_attention.linear_qkv.bias")
        if spec.qk_layernorm:
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        names += [
            p + "self_attention.linear_proj.weight",
            p + "pre_mlp_layernorm.weight",
            p + "mlp.linear_fc1.weight",
            p + "mlp.linear_fc2.weight",
        ]
    names.append("decoder.final_layernorm.weight")
    if not spec.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def _split_layer(name: str) -> tuple[int, str] | None:
    if not name.startswith("decoder.layers."):
        return None
    idx, rest = name[len("decoder.layers."):].split(".", 1)
    return int(idx), rest


def hf_names_for(spec: ModelSpec, name: str) -> list[str]:
    """The HF tensors that make up Megatron parameter ``name``."""
    if name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"]
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    if name == "output_layer.weight":
        return ["lm_head.weight"]
    layer = _split_layer(name)
    if layer is None:
        raise KeyError(f"unknown Megatron parameter {name!r}")
    i, rest = layer
    p = f"model.layers.{i}."
    if rest in _LAYER_SIMPLE:
        return [p + _LAYER_SIMPLE[rest]]
    if rest == "self_attention.linear_qkv.weight":
        return [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
    if rest == "self_attention.linear_qkv.bias":
        return [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    if rest == "mlp.linear_fc1.weight":
        return [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
    raise KeyError(f"unknown Megatron parameter {name!r}")


def fuse_qkv(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q/k/v -> Megatron grouped QKV (zero groups appended when ``spec`` is padded).

    Shape: q [n*d, ...], k [g*d, ...], v [g*d, ...] -> [g'*(n/g + 2)*d, ...]  (g' = megatron groups)
    """
    n, g, d = spec.num_attention_heads, spec.num_query_groups, spec.kv_channels
    gp = spec.megatron_query_groups
    rest = q.shape[1:]
    q = q.reshape(g, (n // g) * d, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    grouped = torch.cat([q, k, v], dim=1)
    if gp != g:
        grouped = torch.cat([grouped, grouped.new_zeros(gp - g, *grouped.shape[1:])], dim=0)
    return grouped.reshape(gp * (n // g + 2) * d, *rest)


def split_qkv(spec: ModelSpec, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def pad_proj(spec: ModelSpec, o_proj: torch.Tensor) -> torch.Tensor:
    """HF o_proj [h, n*d] -> Megatron linear_proj [h, n'*d] (zero columns for padded heads)."""
    extra = (spec.megatron_attention_heads - spec.num_attention_heads) * spec.kv_channels
    if not extra:
        return o_proj
    return torch.cat([o_proj, o_proj.new_zeros(o_proj.shape[0], extra)], dim=1)


def unpad_proj(spec: ModelSpec, proj: torch.Tensor) -> torch.Tensor:
    """Megatron linear_proj [h, n'*d] -> HF o_proj [h, n*d]."""
    want = spec.megatron_attention_heads * spec.kv_channels
    if proj.shape[1] != want:
        raise ValueError(
            f"linear_proj has {proj.shape[1]} columns, spec expects {want}; was the model built from spec.for_tp(tp)?"
        )
    return proj[:, : spec.num_attention_heads * spec.kv_channels]


def to_megatron(spec: ModelSpec, name: str, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
    """Build Megatron parameter ``name`` from its HF tensors (in :func:`hf_names_for` order)."""
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return fuse_qkv(spec, *hf_tensors)
    if name.endswith("mlp.linear_fc1.weight"):
        return torch.cat(hf_tensors, dim=0)
    (t,) = hf_tensors
    if name.endswith("self_attention.linear_proj.weight"):
        return pad_proj(spec, t)
    return t


def to_hf(spec: ModelSpec, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Megatron parameter ``name`` (full layout) -> its ``(hf_name, tensor)`` pieces."""
    hf = hf_names_for(spec, name)
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return list(zip(hf, split_qkv(spec, tensor)))
    if name.endswith("mlp.linear_fc1.weight"):
        return list(zip(hf, tensor.chunk(2, dim=0)))
    if name.endswith("self_attention.linear_proj.weight"):
        return [(hf[0], unpad_proj(spec, tensor))]
    return [(hf[0], tensor)]


def iter_hf_to_megatron(spec: ModelSpec, get: HFGetter) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the full Megatron state: each parameter built from the HF tensors ``get`` returns."""
    for name in megatron_param_names(spec):
        yield name, to_megatron(spec, name, [get(h) for h in hf_names_for(spec, name)])
