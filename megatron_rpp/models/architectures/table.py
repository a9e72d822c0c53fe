"""The parameter table of an architecture: one typed entry per Megatron parameter.

    table = arch.param_table(spec)          # spec as the model is built: ModelSpec.for_tp(tp)
    for entry in table:                     # the fixed order used everywhere
        entry.name, entry.hf_names, entry.shape, entry.partition_dim, entry.gated, table.stage(entry, pp)
    full = table.to_megatron(name, hf_tensors);  table.to_hf(name, full) -> [(hf_name, tensor), ...]
    shard = entry.shard(full, tp, rank);  full = entry.merge(shards)

Everything that moves weights derives from it: offline conversion and the checkpoint
layout (``checkpoint/convert.py``, ``format.py``), live HF loading (``hf_loader.py``), live
Megatron load/save (``live.py``), the weight-sync plan (``rollout/weight_sync.py``) and the
model provider's check of a freshly built model (:func:`bind_params`).

An entry is the product of two small tables:

- **Megatron side** (:data:`ROLES`, shared by every architecture): a *role* (embedding,
  qkv, fc1, ...) has a full shape computed from the spec (incl. KV-group and vocabulary
  padding), a TP partition dim, the gated [gate; up] layout, and an owning pipeline stage
  (first, its layer's, last; with a virtual pipeline a stage owns every PP-th chunk of
  layers, :meth:`ParamTable.stage`). Its name comes from the naming scheme of the layer
  spec the model is built with (:data:`MEGATRON_NAMES`): ``"local"`` (megatron-core's
  ``get_gpt_layer_local_spec``, pure torch) or ``"te"`` (``get_gpt_layer_with_transformer_engine_spec``:
  the two layer norms are fused into the following linear layers, so ``input_layernorm.weight``
  is ``self_attention.linear_qkv.layer_norm_weight`` and ``pre_mlp_layernorm.weight`` is
  ``mlp.linear_fc1.layer_norm_weight``; every other name is the same).
  ``"local"`` is the *canonical* scheme: checkpoints, the weight sync and HF export use its
  names whatever spec the model was built with (:func:`canonical_names` maps a scheme onto
  it; ``parallel.gather.iter_local_params`` applies the map), so a checkpoint written on a
  TE machine loads on CPU and back.
- **HF side** (:class:`HFLayout`, one per architecture family): the HF tensor names of
  each role and the :class:`~megatron_rpp.models.architectures.conversions.Conversion`
  between them and Megatron's layout.

Which roles a model has follows from its spec: QKV bias, QK-norm, a tied or untied output
layer, or a scalar score head. A tied output layer is an *alias* of the embedding (the last
stage's copy, Megatron's ``shared_embedding``), and a HF ``lm_head.weight`` beside tied
embeddings an *HF alias* (may be present, never needed).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping

from torch import Tensor

from megatron_rpp.models.architectures.conversions import SAME, Conversion
from megatron_rpp.models.spec import ModelSpec
from megatron_rpp.parallel.gather import EMBEDDING_WEIGHT, global_name, layer_offset, merge_tp, tp_shard, tp_shard_shape


@dataclass(frozen=True)
class Role:
    """What a parameter is on the Megatron side, independent of its name."""

    partition_dim: int | None
    """TP split: 0 column-/vocab-parallel, 1 row-parallel, None replicated."""
    place: str
    """Owning pipeline stage: ``"first"``, ``"layer"`` (its layer's stage) or ``"last"``."""
    gated: bool = False
    """[gate; up] stored as [gate_r; up_r] per TP rank."""


ROLES: dict[str, Role] = {
    "embedding": Role(0, "first"),  # vocab-parallel
    "attn_norm": Role(None, "layer"),
    "qkv": Role(0, "layer"),  # column-parallel, whole KV groups per rank
    "qkv_bias": Role(0, "layer"),
    "q_norm": Role(None, "layer"),
    "k_norm": Role(None, "layer"),
    "proj": Role(1, "layer"),  # row-parallel
    "mlp_norm": Role(None, "layer"),
    "fc1": Role(0, "layer", gated=True),  # column-parallel
    "fc2": Role(1, "layer"),  # row-parallel
    "final_norm": Role(None, "last"),
    "output": Role(0, "last"),  # vocab-parallel
    "score": Role(None, "last"),  # a reward model's scalar head [1, h]: replicated
}

#: Megatron names per layer-spec kind. Layer roles are relative to ``decoder.layers.{i}.``.
MEGATRON_NAMES: dict[str, dict[str, str]] = {
    "local": {
        "embedding": EMBEDDING_WEIGHT,
        "attn_norm": "input_layernorm.weight",
        "qkv": "self_attention.linear_qkv.weight",
        "qkv_bias": "self_attention.linear_qkv.bias",
        "q_norm": "self_attention.q_layernorm.weight",
        "k_norm": "self_attention.k_layernorm.weight",
        "proj": "self_attention.linear_proj.weight",
        "mlp_norm": "pre_mlp_layernorm.weight",
        "fc1": "mlp.linear_fc1.weight",
        "fc2": "mlp.linear_fc2.weight",
        "final_norm": "decoder.final_layernorm.weight",
        "output": "output_layer.weight",
        "score": "output_layer.score.weight",
    },
}
#: Transformer Engine's spec: the norms live inside the fused LayerNorm+Linear modules
#: (``TELayerNormColumnParallelLinear.layer_norm_weight``); tests/unit/models/test_te_naming.py
#: derives these names from megatron-core's own spec definitions.
MEGATRON_NAMES["te"] = {
    **MEGATRON_NAMES["local"],
    "attn_norm": "self_attention.linear_qkv.layer_norm_weight",
    "mlp_norm": "mlp.linear_fc1.layer_norm_weight",
}
DEFAULT_NAMING = "local"


def canonical_names(naming: str) -> dict[str, str]:
    """``{name in naming: canonical (local) name}`` for the names that differ (layer-relative
    for layer roles, as in :data:`MEGATRON_NAMES`); empty for the canonical scheme itself."""
    if naming not in MEGATRON_NAMES:
        raise NotImplementedError(
            f"Megatron naming scheme {naming!r} is not in the parameter table (have: {', '.join(MEGATRON_NAMES)})"
        )
    names, local = MEGATRON_NAMES[naming], MEGATRON_NAMES[DEFAULT_NAMING]
    return {names[r]: local[r] for r in names if names[r] != local[r]}
_LAYER_PREFIX = "decoder.layers.{i}."


def _shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Full (TP=1) Megatron shape of every role, incl. KV-group and vocabulary padding."""
    h, f, d, v = spec.hidden_size, spec.ffn_hidden_size, spec.kv_channels, spec.megatron_vocab_size
    n, g = spec.megatron_attention_heads, spec.megatron_query_groups
    return {
        "embedding": (v, h), "output": (v, h), "score": (spec.num_labels, h),
        "attn_norm": (h,), "mlp_norm": (h,), "final_norm": (h,), "q_norm": (d,), "k_norm": (d,),
        "qkv": ((n + 2 * g) * d, h), "qkv_bias": ((n + 2 * g) * d,),
        "proj": (h, n * d), "fc1": (2 * f, h), "fc2": (h, f),
    }


def _roles_of(spec: ModelSpec) -> tuple[list[str], list[str], list[str]]:
    """(first-stage roles, roles of every layer, last-stage roles) of ``spec``, in table order."""
    layer = ["attn_norm", "qkv"] + (["qkv_bias"] if spec.add_qkv_bias else [])
    layer += (["q_norm", "k_norm"] if spec.qk_layernorm else []) + ["proj", "mlp_norm", "fc1", "fc2"]
    head = {"score": ["score"], "lm": [] if spec.tie_word_embeddings else ["output"]}[spec.head]
    return ["embedding"], layer, ["final_norm"] + head


@dataclass(frozen=True)
class HF:
    """The HF side of one role: tensor names (layer roles: relative to the layout's layer prefix)."""

    names: tuple[str, ...]
    conversion: Conversion = SAME

    def __init__(self, *names: str, conversion: Conversion = SAME):
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "conversion", conversion)


@dataclass(frozen=True)
class HFLayout:
    """An architecture family's HF names and conversions, per role."""

    roles: Mapping[str, HF]
    layer_prefix: str = "model.layers.{i}."
    #: HF tensors that may duplicate a role's when embeddings are tied (they are never read).
    tied_hf_names: tuple[str, ...] = ("lm_head.weight",)

    def with_roles(self, **roles: HF) -> "HFLayout":
        """This layout with more (or replaced) roles, e.g. a score head or QK-norm."""
        return replace(self, roles={**self.roles, **roles})


@dataclass(frozen=True)
class ParamEntry:
    """One Megatron parameter of the full model (global layer index), and its HF counterpart."""

    name: str
    role: str
    layer: int | None
    hf_names: tuple[str, ...]
    shape: tuple[int, ...]
    """Full (TP=1) shape, incl. padding."""
    partition_dim: int | None
    gated: bool
    aliases: tuple[str, ...] = ()
    """Other Megatron names of this tensor (the last stage's copy of a tied embedding)."""
    hf_aliases: tuple[str, ...] = ()
    """HF tensors that duplicate this one and may be absent (a tied ``lm_head.weight``)."""
    conversion: Conversion = field(default=SAME, repr=False, compare=False)

    def shard_shape(self, tp: int) -> tuple[int, ...]:
        return tp_shard_shape(self.shape, self.partition_dim, tp)

    def shard(self, full: Tensor, tp: int, rank: int) -> Tensor:
        """TP rank ``rank``'s shard of the full tensor (the full tensor itself when replicated)."""
        return tp_shard(full, tp, rank, self.partition_dim, self.gated)

    def merge(self, shards: list[Tensor]) -> Tensor:
        """The full tensor from every TP rank's shard (in rank order)."""
        return merge_tp(shards, self.partition_dim, self.gated)


class ParamTable:
    """Every Megatron parameter of ``spec``'s model, in the fixed order, with its HF mapping."""

    def __init__(self, spec: ModelSpec, entries: list[ParamEntry]):
        self.spec = spec
        self.entries = tuple(entries)
        self._by_name = {e.name: e for e in self.entries}
        self._by_name.update({a: e for e in self.entries for a in e.aliases})

    def __iter__(self) -> Iterator[ParamEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> ParamEntry:
        """The entry of a Megatron name (global layer index) or of one of its aliases."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.spec.architecture}: unknown Megatron parameter {name!r}") from None

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def hf_aliases(self) -> set[str]:
        return {a for e in self.entries for a in e.hf_aliases}

    def stage(self, entry: ParamEntry | str, pp: int, vpp: int = 1) -> int:
        """The pipeline stage owning a parameter: Megatron's even split of the layers into
        ``pp * vpp`` virtual stages of ``L / (pp * vpp)`` layers, virtual stage k on stage
        ``k % pp`` (its model chunk ``k // pp``). With ``vpp`` = 1 stage p holds layers
        ``[p L/pp, (p+1) L/pp)``; with ``vpp`` = 2 and pp = 2, 8 layers: stage 0 holds 0, 1, 4, 5."""
        e = self[entry] if isinstance(entry, str) else entry
        place = ROLES[e.role].place
        if place == "first":
            return 0
        if place == "last":
            return pp - 1
        return (e.layer // (self.spec.num_layers // (pp * vpp))) % pp

    def to_megatron(self, name: str, hf_tensors: list[Tensor]) -> Tensor:
        """The full Megatron tensor of ``name`` from its HF tensors (in ``hf_names`` order)."""
        e = self[name]
        return e.conversion.to_megatron(self.spec, list(hf_tensors))

    def to_hf(self, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """``(hf_name, tensor)`` pieces of the full Megatron tensor of ``name`` (padding dropped)."""
        e = self[name]
        return list(zip(e.hf_names, e.conversion.to_hf(self.spec, tensor)))


def build_table(spec: ModelSpec, layout: HFLayout, naming: str = DEFAULT_NAMING) -> ParamTable:
    """The parameter table of ``spec`` with the HF names of ``layout`` and the Megatron ``naming`` scheme."""
    if naming not in MEGATRON_NAMES:
        raise NotImplementedError(
            f"Megatron naming scheme {naming!r} is not in the parameter table (have: {', '.join(MEGATRON_NAMES)})"
        )
    names, shapes = MEGATRON_NAMES[naming], _shapes(spec)
    first, per_layer, last = _roles_of(spec)
    missing = sorted({*first, *per_layer, *last} - set(layout.roles))
    if missing:
        raise NotImplementedError(f"{spec.architecture}: the HF layout has no mapping for {missing}")

    def entry(role: str, layer: int | None) -> ParamEntry:
        hf, r = layout.roles[role], ROLES[role]
        prefix, hf_prefix = ("", "") if layer is None else (
            _LAYER_PREFIX.format(i=layer), layout.layer_prefix.format(i=layer))
        tied = role == "embedding" and spec.head == "lm" and spec.tie_word_embeddings
        return ParamEntry(
            name=prefix + names[role], role=role, layer=layer, hf_names=tuple(hf_prefix + n for n in hf.names),
            shape=shapes[role], partition_dim=r.partition_dim, gated=r.gated,
            aliases=(names["output"],) if tied else (), hf_aliases=layout.tied_hf_names if tied else (),
            conversion=hf.conversion,
        )

    entries = [entry(r, None) for r in first]
    entries += [entry(r, i) for i in range(spec.num_layers) for r in per_layer]
    entries += [entry(r, None) for r in last]
    return ParamTable(spec, entries)


def bind_params(model, table: ParamTable, tp: int) -> None:
    """Check a freshly built Megatron model against ``table`` and mark each parameter's TP layout.

    Every parameter must be an entry (or the alias of one: a tied output layer, which Megatron
    marks ``shared_embedding``), split as the entry says (Megatron's
    ``tensor_model_parallel`` / ``partition_dim``) and shaped ``entry.shard_shape(tp)``.
    Sets ``tp_gated`` on every parameter (Megatron has no mark for the [gate_r; up_r] layout).

    Raises:
        ValueError: naming the first parameter that disagrees.
    """
    offset = layer_offset(model)
    for local, p in model.named_parameters():
        name = global_name(local, offset)
        if name not in table:
            raise ValueError(f"{table.spec.architecture}: model parameter {name} is not in the parameter table")
        e = table[name]
        if e.name != name and not getattr(p, "shared_embedding", False):
            raise ValueError(f"{name}: the table says it is tied to {e.name}, the model does not share it")
        sharded = bool(getattr(p, "tensor_model_parallel", False))
        if sharded != (e.partition_dim is not None) or (sharded and p.partition_dim != e.partition_dim):
            raise ValueError(
                f"{name}: the model splits it as (tensor_model_parallel={sharded}, partition_dim="
                f"{getattr(p, 'partition_dim', None)}), the parameter table says partition_dim={e.partition_dim}"
            )
        if tuple(p.shape) != e.shard_shape(tp):
            raise ValueError(f"{name}: model shape {tuple(p.shape)} != table shard shape {e.shard_shape(tp)} (tp={tp})")
        p.tp_gated = e.gated
