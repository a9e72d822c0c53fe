"""The parameter table's Transformer-Engine names, derived from megatron-core's own definitions without TE.

Transformer Engine cannot be installed here (no CUDA), so no TE model can be built. What
megatron-core itself says about the TE layer spec is enough to derive every parameter name:

1. The spec tree. ``get_gpt_layer_with_transformer_engine_spec`` asks a ``TESpecProvider`` for
   each module class. A stand-in provider (a subclass of megatron-core's own, with every method
   returning a marker class named after the method; the real methods import TE classes) is
   swapped into ``gpt_layer_specs`` for the call, so the real function builds the real
   ``ModuleSpec`` tree: which submodule slot holds which kind of module, and which slots are
   ``IdentityOp`` (no parameters).
2. Where the norms went. The local spec's ``sharded_state_dict_keys_map`` (megatron-core's
   statement that a local model's tensors are stored under the TE model's names) maps
   ``input_layernorm.`` -> ``self_attention.linear_qkv.layer_norm_`` and ``pre_mlp_layernorm.`` ->
   ``mlp.linear_fc1.layer_norm_``; ``TransformerLayer.get_qkv_layer_norm_weights`` /
   ``get_mlp_layer_norm_weights`` read exactly those attributes (``...layer_norm_weight``) from
   the fused TE modules (checked in their source).

The expected TE names are the local table's names with (2) applied where (1) puts an
``IdentityOp`` in place of a local norm and a fused LayerNorm+Linear module where the map
points; every other parameter's module sits in the same slot in both trees, so its name is
unchanged. The parameter table must list exactly these names, and HF -> Megatron -> HF must
round-trip through them (with TP sharding) for every architecture family.
"""
from __future__ import annotations

import inspect
import re

import pytest
import torch

from megatron_rpp.models.architectures import architecture_for_config
from megatron_rpp.models.architectures.table import MEGATRON_NAMES, build_table, canonical_names
from testlib.tiny_checkpoints import case_config, reward_model_config

PROVIDER_METHODS = ("linear", "column_parallel_linear", "row_parallel_linear", "column_parallel_layer_norm_linear",
                    "layer_norm", "core_attention", "activation_func")


@pytest.fixture(scope="module")
def te_layer_spec():
    """megatron-core's TE layer spec tree (QK-norm on), built with marker classes instead of TE's."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.gpt import gpt_layer_specs

    markers = {m: type(m, (), {}) for m in PROVIDER_METHODS}

    class StandIn(TESpecProvider):  # megatron-core's provider, every class replaced by a marker
        pass

    for m in PROVIDER_METHODS:
        setattr(StandIn, m, lambda self, *a, _m=m, **k: markers[_m])
    saved = gpt_layer_specs.__dict__.get("TESpecProvider")
    gpt_layer_specs.TESpecProvider = StandIn
    try:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    finally:
        if saved is None:
            del gpt_layer_specs.TESpecProvider
        else:
            gpt_layer_specs.TESpecProvider = saved
    return spec, markers


def _module_of(spec_or_cls):
    return getattr(spec_or_cls, "module", spec_or_cls)


def _slots(layer_spec) -> dict[str, type]:
    """``{layer-relative module path: module class}`` of a layer spec, two levels deep."""
    out = {}
    for name, sub in vars(layer_spec.submodules).items():
        out[name] = _module_of(sub)
        inner = getattr(sub, "submodules", None)
        if inner is not None and hasattr(inner, "__dataclass_fields__"):
            for child, spec in vars(inner).items():
                out[f"{name}.{child}"] = _module_of(spec)
    return out


def _norm_attribute(method) -> str:
    """The attribute megatron-core reads the fused norm weight from (``layer_norm_weight``)."""
    (attr,) = set(re.findall(r"\.(linear_qkv|linear_fc1)\.(\w+)\.data", inspect.getsource(method)))
    return attr[1]


def _expected_te_names(local_names: list[str], te_slots: dict, markers: dict) -> list[str]:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import TransformerLayer

    keys_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    fused_attr = {_norm_attribute(TransformerLayer.get_qkv_layer_norm_weights),
                  _norm_attribute(TransformerLayer.get_mlp_layer_norm_weights)}
    assert fused_attr == {"layer_norm_weight"}
    out = []
    for name in local_names:
        m = re.match(r"(decoder\.layers\.\d+\.)(.*)", name)
        if m is None:  # embedding, final norm, output layer: outside the layer spec
            out.append(name)
            continue
        prefix, rel = m.groups()
        module = rel.rsplit(".", 1)[0]
        moved = [(old, new) for old, new in keys_map.items() if rel.startswith(old)]
        if moved:  # a local norm: IdentityOp in the TE tree, fused into the module the map names
            (old, new), = moved
            assert te_slots[old.rstrip(".")] is IdentityOp, old
            assert te_slots[new.rsplit(".", 1)[0]] is markers["column_parallel_layer_norm_linear"], new
            renamed = new + rel[len(old):]
            assert renamed.rsplit(".", 1)[1] in fused_attr
            out.append(prefix + renamed)
        else:  # the same slot holds a real (non-identity) module in the TE tree: same name
            assert te_slots.get(module) not in (None, IdentityOp), (name, te_slots.get(module))
            out.append(name)
    return out


CASES = ["llama", "llama_tied", "qwen2", "qwen3", "phi3_padded", "qwen3_odd_vocab"]


def _spec(case: str, tp: int = 2):
    cfg = reward_model_config("qwen2") if case == "reward" else case_config(case)
    arch = architecture_for_config(cfg)
    return arch, arch.model_spec(cfg).for_tp(tp)


def test_te_spec_tree_fuses_both_norms(te_layer_spec):
    from megatron.core.transformer.identity_op import IdentityOp

    spec, markers = te_layer_spec
    slots = _slots(spec)
    assert slots["input_layernorm"] is IdentityOp and slots["pre_mlp_layernorm"] is IdentityOp
    assert slots["self_attention.linear_qkv"] is markers["column_parallel_layer_norm_linear"]
    assert slots["mlp.linear_fc1"] is markers["column_parallel_layer_norm_linear"]
    assert slots["self_attention.linear_proj"] is markers["row_parallel_linear"]
    assert slots["mlp.linear_fc2"] is markers["row_parallel_linear"]
    assert slots["self_attention.q_layernorm"] is markers["layer_norm"]  # QK-norm stays a module of its own


@pytest.mark.parametrize("case", CASES + ["reward"])
def test_table_te_names_are_megatron_cores(te_layer_spec, case):
    spec_tree, markers = te_layer_spec
    arch, spec = _spec(case)
    local = arch.param_table(spec, naming="local")
    te = arch.param_table(spec, naming="te")
    assert te.names() == _expected_te_names(local.names(), _slots(spec_tree), markers)
    assert te.names() != local.names()  # the two norms of every layer are renamed
    # Same tensors otherwise: shapes, TP splits, HF names, owning stages (also interleaved).
    rename = canonical_names("te")
    for e_te, e_local in zip(te, local):
        rel = e_te.name.split(".", 3)[-1] if e_te.layer is not None else e_te.name
        assert e_local.name == e_te.name.replace(rel, rename.get(rel, rel))
        assert (e_te.shape, e_te.partition_dim, e_te.gated, e_te.hf_names, e_te.aliases) == \
               (e_local.shape, e_local.partition_dim, e_local.gated, e_local.hf_names, e_local.aliases)
        for pp, vpp in ((1, 1), (2, 1), (2, 2)):
            assert te.stage(e_te, pp, vpp) == local.stage(e_local, pp, vpp)


def _hf_state(case: str) -> dict[str, torch.Tensor]:
    import transformers

    cfg = reward_model_config("qwen2") if case == "reward" else case_config(case)
    cfg = dict(cfg)
    hf_cfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    cls = getattr(transformers, cfg["architectures"][0])
    model = cls(hf_cfg).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # distinct values everywhere, norms and biases included
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}


@pytest.mark.parametrize("case", CASES + ["reward"])
@pytest.mark.parametrize("tp", [1, 2])
def test_hf_megatron_hf_round_trip_through_te_names(case, tp):
    arch, spec = _spec(case, tp)
    table = arch.param_table(spec, naming="te")
    hf = _hf_state(case)
    seen: dict[str, torch.Tensor] = {}
    for e in table:
        full = table.to_megatron(e.name, [hf[n] for n in e.hf_names])
        assert tuple(full.shape) == e.shape, e.name
        shards = [e.shard(full, tp, r) for r in range(tp)]
        assert all(tuple(s.shape) == e.shard_shape(tp) for s in shards)
        for hf_name, t in table.to_hf(e.name, e.merge(shards)):
            assert hf_name not in seen, hf_name
            seen[hf_name] = t
    assert set(seen) == set(hf) - table.hf_aliases()
    for name, t in seen.items():
        assert torch.equal(t, hf[name]), name


def test_names_go_canonical_at_the_model_boundary():
    """A TE-named model (module names as TE's spec makes them) is named canonically by
    ``iter_local_params``, with the global layer offset of its stage."""
    from megatron_rpp.parallel.gather import iter_local_params

    class Layer(torch.nn.Module):
        def __init__(self, number):
            super().__init__()
            self.layer_number = number
            self.self_attention = torch.nn.Module()
            self.self_attention.linear_qkv = torch.nn.Module()
            self.self_attention.linear_qkv.weight = torch.nn.Parameter(torch.zeros(2))
            self.self_attention.linear_qkv.layer_norm_weight = torch.nn.Parameter(torch.zeros(1))
            self.mlp = torch.nn.Module()
            self.mlp.linear_fc1 = torch.nn.Module()
            self.mlp.linear_fc1.layer_norm_weight = torch.nn.Parameter(torch.zeros(1))

    stage = torch.nn.Module()  # the second stage of a PP=2 model: layers 3 and 4 (global indices 2, 3)
    stage.decoder = torch.nn.Module()
    stage.decoder.layers = torch.nn.ModuleList([Layer(3), Layer(4)])
    stage.megatron_rpp_canonical = canonical_names("te")
    names = [n for n, _ in iter_local_params(stage)]
    assert names == [f"decoder.layers.{i}.{rel}" for i in (2, 3) for rel in
                     ("self_attention.linear_qkv.weight", "input_layernorm.weight", "pre_mlp_layernorm.weight")]
    assert canonical_names("local") == {}
    assert set(MEGATRON_NAMES) == {"local", "te"}
    with pytest.raises(NotImplementedError, match="have: local, te"):
        build_table(_spec("llama")[1], architecture_for_config(case_config("llama")).hf_layout, "apex")
