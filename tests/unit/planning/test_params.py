"""Parameter counts from the parameter table: exact HF totals, per-rank counts that sum back."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_rpp.models.architectures import architecture_for_config
from megatron_rpp.models.spec import load_hf_config
from megatron_rpp.planning.params import (
    engine_rank_params,
    hf_param_count,
    megatron_rank_params,
    owning_rank,
    stage_chunks,
)
from testlib.tiny_models import tiny_config

CONFIGS = Path(__file__).resolve().parents[3] / "examples" / "model_configs"


def _model(name: str):
    cfg = load_hf_config(CONFIGS / name)
    arch = architecture_for_config(cfg)
    return arch, arch.model_spec(cfg)


# Hand-worked from each config.json (h hidden, f FFN, n/g heads/KV heads, d head dim, V vocab, L layers):
#   layer = q h*n*d + k,v 2*h*g*d + o n*d*h + MLP 3*h*f + 2 norms h  (+ Qwen2's q/k/v bias n*d + 2*g*d)
#   total = L*layer + embedding V*h + (untied) lm_head V*h + final norm h
# Llama-3(.3)-70B: h 8192, f 28672, n 64, g 8, d 128, V 128256, L 80:
#   layer = 67108864 + 16777216 + 67108864 + 704643072 + 16384 = 855654400
#   total = 80*855654400 + 2*1050673152 + 8192 = 70553706496
# Qwen2.5-72B: f 29568, V 152064, biases 8192 + 2048:
#   layer = 67108864 + 16777216 + 67108864 + 726663168 + 16384 + 10240 = 877684736
#   total = 80*877684736 + 2*1245708288 + 8192 = 72706203648
# Llama-3-8B: h 4096, f 14336, n 32, g 8, d 128, V 128256, L 32:
#   layer = 16777216 + 8388608 + 16777216 + 176160768 + 8192 = 218112000
#   total = 32*218112000 + 2*525336576 + 4096 = 8030261248
# Qwen2.5-72B reward model: the trunk + a score head [1, h] instead of the lm_head:
#   72706203648 - 1245708288 + 8192 = 71460503552
# Qwen2.5-7B: h 3584, f 18944, n 28, g 4, d 128, V 152064, L 28, biases 3584 + 2*512:
#   layer = 12845056 + 3670016 + 12845056 + 203685888 + 7168 + 4608 = 233057792
#   total = 28*233057792 + 2*544997376 + 3584 = 7615616512
# Llama-3-8B reward model: 8030261248 - 525336576 + 4096 = 7504928768
EXPECTED = {
    "llama3.3_70b_instruct": 70_553_706_496,
    "qwen2.5_72b": 72_706_203_648,
    "llama3_8b": 8_030_261_248,
    "qwen2.5_72b_rm": 71_460_503_552,
    "qwen2.5_7b_instruct": 7_615_616_512,
    "llama3_8b_rm": 7_504_928_768,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hf_totals_are_exact(name):
    arch, spec = _model(name)
    assert hf_param_count(arch, spec) == EXPECTED[name]
    assert hf_param_count(arch, spec.for_tp(8)) == EXPECTED[name]  # padding never counts


def _sum_back(arch, spec, tp, pp, vpp=1):
    """sum over pipeline ranks of (sharded part x tp + replicated part) - tied copies - padding."""
    ranks = megatron_rank_params(arch, spec, tp=tp, pp=pp, vpp=vpp)
    owned = sum((r.elements - r.replicated - r.tied_copy) * tp + r.replicated for r in ranks)
    return owned - sum(r.padding for r in ranks), ranks


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rank_counts_at_tp8_pp4_sum_back_to_the_total(name):
    arch, spec = _model(name)
    total, ranks = _sum_back(arch, spec, 8, 4)
    assert total == EXPECTED[name]
    assert [r.num_layers for r in ranks] == [spec.num_layers // 4] * 4
    # Llama-3's vocabulary 128256 pads to a multiple of 128 x 8 = 1024: 129024 rows, 768 of padding
    # in the embedding (first rank) and in the lm_head (last rank); Qwen2.5's 152064 to 152576.
    if name.startswith("llama"):
        h = spec.hidden_size
        assert ranks[0].padding == 768 * h and ranks[-1].padding == (0 if name.endswith("_rm") else 768 * h)
        assert ranks[0].elements - ranks[1].elements == 129024 * h // 8  # the embedding shard
    if name.endswith("_rm"):
        assert ranks[-1].padding == 0 and ranks[-1].has_output  # a score head, no vocabulary


def test_tied_embedding_copy_and_kv_padding():
    cfg = dict(tiny_config("llama", tied=True), num_attention_heads=6, num_key_value_heads=3)  # 3 KV groups
    arch = architecture_for_config(cfg)
    spec = arch.model_spec(cfg)
    for tp, pp in [(1, 1), (2, 1), (2, 2), (4, 4)]:
        total, ranks = _sum_back(arch, spec, tp, pp)
        assert total == hf_param_count(arch, spec), (tp, pp)
        copy = ranks[-1].tied_copy
        # vocabulary 512 -> multiple of 128 x tp; the last stage's copy of the embedding with PP > 1
        assert copy == (max(512, 128 * tp) * 256 // tp if pp > 1 else 0)
    # TP=2: 3 KV groups padded to 4 (2 x 2 query heads each), qkv rows (8 + 2 * 4) * 64
    r = megatron_rank_params(arch, spec, tp=2, pp=1)[0]
    h, d = 256, 64
    per_layer_pad = ((8 + 8) - (6 + 6)) * d * h + (8 - 6) * d * h  # qkv rows + linear_proj columns
    assert r.padding == 4 * per_layer_pad


def test_virtual_pipeline_chunks_and_owner():
    assert stage_chunks(8, 2, 2) == [((0, 2), (4, 6)), ((2, 4), (6, 8))]
    assert stage_chunks(80, 4) == [((0, 20),), ((20, 40),), ((40, 60),), ((60, 80),)]
    with pytest.raises(ValueError, match="equal chunks"):
        stage_chunks(10, 4)
    arch, spec = _model("llama3_8b")
    table = arch.param_table(spec.for_tp(2))
    assert all(owning_rank(table, e, 4) == table.stage(e, 4) for e in table)  # without VPP: the table's own split
    ranks = megatron_rank_params(arch, spec, tp=2, pp=4, vpp=2)
    assert ranks[0].chunks == ((0, 4), (16, 20)) and ranks[3].chunks == ((12, 16), (28, 32))
    assert ranks[0].has_embedding and ranks[3].has_output
    assert _sum_back(arch, spec, 2, 4, 2)[0] == EXPECTED["llama3_8b"]


def test_engine_rank_params_llama70b_engine_tp8():
    arch, spec = _model("llama3.3_70b_instruct")
    eng = engine_rank_params(arch, spec, engine_tp=8)
    # vLLM: vocab 128256 (a multiple of 64) / 8 = 16032 rows x 8192 for embed_tokens and lm_head;
    # per layer q 8192*8192/8 + k,v 1 KV head each 2*128*8192 + o 8192*8192/8 + MLP 3*8192*28672/8 + norms
    layer = 8388608 + 2097152 + 8388608 + 88080384 + 16384
    assert eng.layer == layer == 106_971_136
    assert eng.embedding == 16032 * 8192
    assert eng.elements == 80 * layer + 2 * 16032 * 8192 + 8192
    # engine TP 16 > 8 KV heads: vLLM replicates one KV head per rank (not half a head):
    # q and o 4 heads x 128 x 8192 each, k and v 1 head each, MLP 3 x 8192 x 28672/16, norms
    assert engine_rank_params(arch, spec, engine_tp=16).layer == 2 * 512 * 8192 + 2 * 128 * 8192 + 3 * 8192 * 1792 + 16384
