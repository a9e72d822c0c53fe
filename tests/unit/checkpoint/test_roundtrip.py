"""HF -> Megatron (TP=2, PP=2) -> HF is bit-exact; the shard files hold Megatron's TP layout,
incl. KV-group and vocabulary padding and Phi-3's fused projections."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from megatron_rpp.checkpoint.convert import MegatronCheckpointReader, hf_to_megatron, megatron_to_hf
from megatron_rpp.checkpoint.format import METADATA_FILE, shard_file_name
from megatron_rpp.models import spec as spec_module
from megatron_rpp.models.architectures import architecture_for_config
from megatron_rpp.parallel.gather import merge_tp, tp_shard
from testlib.tiny_checkpoints import case_config, save_tiny_hf

ROUND_TRIP_CASES = ["llama", "llama_tied", "qwen2", "qwen2_tied", "qwen3", "qwen3_tied", "llama_padded",
                    "llama_odd_vocab", "qwen2_odd_vocab", "qwen3_odd_vocab", "phi3", "phi3_padded"]


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


@pytest.mark.parametrize("case,tp", [("llama_padded", 1), ("llama_padded", 2), ("llama_padded", 4),
                                     ("llama_padded", 8), ("qwen3_odd_vocab", 1), ("phi3_padded", 4)])
def test_reader_reshards_to_any_tp(tmp_path, case, tp):
    """read_for(tp) equals splitting the full tensor built at that TP (incl. KV-group and vocabulary
    re-padding: llama_padded's 3 KV groups become 4 at tp=2, 4 and 8 at tp=8, its 512 vocabulary
    rows 1024 at tp=8; qwen3_odd_vocab's 383 rows are 512 at tp=2, 384 at tp=1)."""
    cfg = case_config(case)
    hf = save_tiny_hf(tmp_path / "hf", cfg)
    mg = hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=1)
    ckpt = MegatronCheckpointReader(mg)
    arch = architecture_for_config(cfg)
    spec = arch.model_spec(cfg).for_tp(tp)
    table = arch.param_table(spec)
    src = load_file(hf / "model.safetensors")
    for p in ckpt.meta.params:
        full = arch.to_megatron(spec, p.name, [src[h] for h in arch.hf_names_for(spec, p.name)])
        assert tuple(full.shape) == table[p.name].shape
        for r in range(tp):
            assert torch.equal(ckpt.read_for(p.name, tp, r), tp_shard(full, tp, r, p.partition_dim, p.gated)), (
                p.name, tp, r)


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
        shards = [tp_shard(t, 2, r, dim, gated) for r in range(2)]
        assert torch.equal(merge_tp(shards, dim, gated), t)
    assert torch.equal(tp_shard(t, 2, 1, 0, True), t[[2, 3, 6, 7]])  # [gate; up] = rows 0-3; 4-7


def test_vocabulary_padding_follows_megatron():
    """Padded to a multiple of 128 x tp (Megatron's make_vocab_size_divisible_by), at tp=1 too."""
    cfg = case_config("llama")
    spec = architecture_for_config(cfg).model_spec(cfg)
    want = {  # worked out by hand: ceil(v / (128 tp)) * 128 tp
        (50257, 1): 50304, (50257, 2): 50432, (50257, 8): 51200,  # GPT-2
        (49152, 8): 49152, (128256, 2): 128256, (128256, 4): 128512, (509, 2): 512, (383, 1): 384, (383, 2): 512,
    }
    for (v, tp), padded in want.items():
        s = replace(spec, vocab_size=v).for_tp(tp)
        assert s.megatron_vocab_size == padded and s.vocab_size == v
        assert s.padded_vocab_size == (padded if padded != v else None)


def test_odd_vocabulary_is_zero_padded_in_the_shards(tmp_path):
    """509 tokens at tp=2: 512 rows, rank 1 holds rows 256-511 of which 509-511 are zero."""
    cfg = case_config("llama_odd_vocab")
    hf = save_tiny_hf(tmp_path / "hf", cfg)
    mg = hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=2)
    src = load_file(hf / "model.safetensors")
    meta = json.loads((mg / METADATA_FILE).read_text())
    shapes = {p["name"]: p["full_shape"] for p in meta["params"]}
    assert shapes["embedding.word_embeddings.weight"] == shapes["output_layer.weight"] == [512, 256]
    emb1 = load_file(mg / shard_file_name(1, 0))["embedding.word_embeddings.weight"]
    out1 = load_file(mg / shard_file_name(1, 1))["output_layer.weight"]
    for t, hf_name in [(emb1, "model.embed_tokens.weight"), (out1, "lm_head.weight")]:
        assert t.shape == (256, 256)
        assert torch.equal(t[:253], src[hf_name][256:]) and not t[253:].any()


def test_phi3_fused_qkv_is_regrouped(tmp_path):
    """Phi-3's qkv_proj is [q; k; v]; Megatron rank 0 holds KV group 0: q heads 0-1, k head 0, v head 0."""
    cfg = case_config("phi3")
    hf = save_tiny_hf(tmp_path / "hf", cfg)
    mg = hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=1)
    src, s0 = load_file(hf / "model.safetensors"), load_file(mg / shard_file_name(0, 0))
    d = 64
    qkv = src["model.layers.2.self_attn.qkv_proj.weight"]  # 4 q heads, 2 k heads, 2 v heads
    q, k, v = qkv[: 4 * d], qkv[4 * d: 6 * d], qkv[6 * d:]
    assert torch.equal(s0["decoder.layers.2.self_attention.linear_qkv.weight"], torch.cat([q[: 2 * d], k[:d], v[:d]]))
    gate_up = src["model.layers.2.mlp.gate_up_proj.weight"]  # [gate; up], 512 rows each
    assert torch.equal(s0["decoder.layers.2.mlp.linear_fc1.weight"], torch.cat([gate_up[:256], gate_up[512:768]]))


def test_reader_takes_the_vocabulary_padding_from_the_checkpoint(tmp_path, monkeypatch):
    """A checkpoint stored with another padding (here none: divisor 1, 509 rows at tp=1) still loads,
    re-pads to the current rule at another TP, and exports bit-exactly."""
    cfg = case_config("llama_odd_vocab")
    hf = save_tiny_hf(tmp_path / "hf", cfg)
    with monkeypatch.context() as m:
        m.setattr(spec_module, "MAKE_VOCAB_SIZE_DIVISIBLE_BY", 1)
        mg = hf_to_megatron(hf, tmp_path / "mg", tp=1, pp=1)
    ckpt = MegatronCheckpointReader(mg)
    assert ckpt.spec.megatron_vocab_size == 509
    src = load_file(hf / "model.safetensors")
    shard = ckpt.read_for("output_layer.weight", 2, 1)  # 512 rows at tp=2: rows 256-511
    assert shard.shape == (256, 256) and torch.equal(shard[:253], src["lm_head.weight"][256:]) and not shard[253:].any()
    back = load_file(megatron_to_hf(mg, tmp_path / "back") / "model.safetensors")
    assert sorted(back) == sorted(src) and all(torch.equal(back[n], src[n]) for n in src)
