"""HF -> Megatron (TP=2, PP=2) -> HF is bit-exact; the shard files hold Megatron's TP layout."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_rpp.checkpoint.convert import MegatronCheckpointReader, hf_to_megatron, megatron_to_hf
from megatron_rpp.checkpoint.format import METADATA_FILE, merge_tp, shard_file_name, split_tp
from megatron_rpp.models.architectures import architecture_for_config
from testlib.tiny_checkpoints import case_config, save_tiny_hf

ROUND_TRIP_CASES = ["llama", "llama_tied", "qwen2", "qwen2_tied", "qwen3", "qwen3_tied", "llama_padded"]


@pytest.mark.parametrize("case", ROUND_TRIP_CASES)
def test_hf_megatron_hf_round_trip_is_bit_exact(tmp_path, case):
    cfg = case_config(case)
    hf = save_tiny_hf(tmp_path / "hf", cfg)
    mg = hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=2)
    assert sorted(p.name for p in mg.glob("model-*.safetensors")) == sorted(
        shard_file_name(r, s) for r in range(2) for s in range(2)
    )
    back = megatron_to_hf(mg, tmp_path / "back")
    src, out = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
    if cfg["tie_word_embeddings"]:
        src.pop("lm_head.weight", None)
    assert sorted(out) == sorted(src)
    for name, t in src.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name
    out_cfg = json.loads((back / "config.json").read_text())
    assert out_cfg["architectures"] == cfg["architectures"]
    assert out_cfg.get("rope_scaling") == cfg.get("rope_scaling")


def test_shards_are_megatrons_tp_layout(tmp_path):
    """Rank r's QKV shard is whole KV groups; fc1 is [gate_r; up_r]; norms live in the tp0 file only."""
    cfg = case_config("qwen2")
    hf = save_tiny_hf(tmp_path / "hf", cfg)
    mg = hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=2)
    src = load_file(hf / "model.safetensors")
    s0 = load_file(mg / shard_file_name(0, 0))
    s1 = load_file(mg / shard_file_name(1, 0))
    d, h = 64, 256
    # 4 heads, 2 KV groups: rank 0 holds group 0 = q heads 0,1, k head 0, v head 0.
    q, k, v = (src[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    want = torch.cat([q[: 2 * d], k[:d], v[:d]])
    assert torch.equal(s0["decoder.layers.0.self_attention.linear_qkv.weight"], want)
    gate, up = src["model.layers.1.mlp.gate_proj.weight"], src["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(s1["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gate[256:], up[256:]]))
    o = src["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(s1["decoder.layers.0.self_attention.linear_proj.weight"], o[:, 128:])
    assert "decoder.layers.0.input_layernorm.weight" in s0 and "decoder.layers.0.input_layernorm.weight" not in s1
    assert s0["embedding.word_embeddings.weight"].shape == (256, h)
    meta = json.loads((mg / METADATA_FILE).read_text())
    assert (meta["tp"], meta["pp"], meta["dtype"], meta["architecture"]) == (2, 2, "fp32", "Qwen2ForCausalLM")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_reader_reshards_to_any_tp(tmp_path, tp):
    """read_for(tp) equals splitting the full tensor built at that TP (incl. KV-group re-padding)."""
    cfg = case_config("llama_padded")  # 3 KV groups: padded to 4 at tp=2 and tp=4
    hf = save_tiny_hf(tmp_path / "hf", cfg)
    mg = hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=1)
    ckpt = MegatronCheckpointReader(mg)
    arch = architecture_for_config(cfg)
    spec = arch.model_spec(cfg).for_tp(tp)
    src = load_file(hf / "model.safetensors")
    for p in ckpt.meta.params:
        full = arch.to_megatron(spec, p.name, [src[h] for h in arch.hf_names_for(spec, p.name)])
        want = split_tp(full, tp, p.partition_dim, p.gated)
        for r in range(tp):
            assert torch.equal(ckpt.read_for(p.name, tp, r), want[r]), (p.name, tp, r)


def test_kv_group_padding_is_zero_and_dropped_on_export():
    cfg = case_config("llama_padded")
    arch = architecture_for_config(cfg)
    spec = arch.model_spec(cfg).for_tp(2)
    assert (spec.megatron_attention_heads, spec.megatron_query_groups) == (8, 4)
    assert arch.model_spec(cfg).for_tp(3).padded_query_groups is None  # 3 groups divide
    q, k, v = torch.randn(6 * 64, 384), torch.randn(3 * 64, 384), torch.randn(3 * 64, 384)
    qkv = arch.to_megatron(spec, "decoder.layers.0.self_attention.linear_qkv.weight", [q, k, v])
    assert qkv.shape == (4 * 4 * 64, 384) and not qkv[3 * 4 * 64:].any()  # group 3 is all zeros
    back = arch.to_hf(spec, "decoder.layers.0.self_attention.linear_qkv.weight", qkv)
    assert all(torch.equal(a, b) for (_, a), b in zip(back, [q, k, v]))
    o = torch.randn(384, 6 * 64)
    proj = arch.to_megatron(spec, "decoder.layers.0.self_attention.linear_proj.weight", [o])
    assert proj.shape == (384, 8 * 64) and not proj[:, 6 * 64:].any()
    with pytest.raises(ValueError, match="spec.for_tp"):
        arch.to_hf(arch.model_spec(cfg), "decoder.layers.0.self_attention.linear_qkv.weight", qkv)


def test_split_merge_tp_inverse():
    t = torch.arange(48.0).reshape(8, 6)
    for dim, gated in [(0, False), (1, False), (0, True), (None, False)]:
        assert torch.equal(merge_tp(split_tp(t, 2, dim, gated), dim, gated), t)
    gate_up = split_tp(t, 2, 0, True)  # [gate; up] = rows 0-3; 4-7
    assert torch.equal(gate_up[1], t[[2, 3, 6, 7]])
