"""Each memory term against hand-worked values."""
from __future__ import annotations

import pytest

from megatron_rpp.planning import terms as T

# The layer of tests/distributed/test_plan_activations.py: h 256, f 768, 8 heads, 2 KV groups, d 32.
SHAPE = T.LayerShape(hidden=256, ffn=768, heads=8, groups=2, head_dim=32, tp=1, vocab_shard=512)


def test_model_state_bytes():
    p = 1_000_000_000
    assert T.weight_bytes(p, "bf16") == 2 * p and T.weight_bytes(p, "fp32") == 4 * p
    assert T.grad_buffer_bytes(p) == 4 * p  # fp32 DDP buffer, also in bf16 training
    # bf16: fp32 master weights + exp_avg + exp_avg_sq = 12 bytes/param; fp32: 8 (params are the masters)
    assert T.optimizer_bytes(p, "bf16", dp=1, distributed=False) == 12 * p
    assert T.optimizer_bytes(p, "bf16", dp=4, distributed=False) == 12 * p  # not sharded without it
    assert T.optimizer_bytes(p, "bf16", dp=4, distributed=True) == 3 * p  # 12 bytes/param / DP
    assert T.optimizer_bytes(p, "fp32", dp=2, distributed=True) == 4 * p  # 8 / 2
    assert T.optimizer_step_bytes(1000, "cpu") == 8000 and T.optimizer_step_bytes(1000, "gpu") == 0


def test_local_layer_saved_bytes_hand_worked():
    # s=64, b=2 (sb=128), fp32, t=1:
    #   norms 2 x (input + x*rstd: 2 x 128*256*4 = 262144, rstd 128*4 = 512)   = 525312
    #   linear_qkv / linear_fc1 inputs 2 x 131072                                = 262144
    #   RoPE cos/sin for q and k: 4 x 64*32*4                                    =  32768
    #   q, repeated K, repeated V: 3 x 128*8*32*4                               = 393216
    #   softmax output 2*8*64*64*4 + causal mask 64*64 (bool)                    = 266240
    #   linear_proj input (context) 128*256*4                                    = 131072
    #   MLP: fc1 output 128*1536*4 + silu(gate), up+0, product 3 x 128*768*4     = 1966080
    assert T.local_layer_saved_bytes(SHAPE, 64, 2, 4, recompute="none") == 3_576_832
    # selective: the checkpointed core attention keeps q (8 heads), k (2 groups), the QKV storage
    # (8 + 4) and the mask type (int32 [1]): 128*32*4 x (8 + 2 + 12) + 4 = 360452 instead of 393216 + 266240
    assert T.local_layer_saved_bytes(SHAPE, 64, 2, 4, recompute="selective") == 3_576_832 - 659_456 + 360_452
    # bf16: every tensor half, except the fp32 softmax output (its bf16 copy is kept too) and rstd
    bf16 = T.local_layer_saved_bytes(SHAPE, 64, 2, 2, recompute="none")
    assert bf16 == (3_576_832 - 262_144 - 4096 - 2 * 512) // 2 + 2 * 8 * 64 * 64 * (4 + 2) + 4096 + 2 * 512


def test_mha_keeps_the_whole_qkv_storage_and_tp_splits_heads():
    mha = T.LayerShape(hidden=256, ffn=768, heads=8, groups=8, head_dim=32, tp=1, vocab_shard=512)
    # no repeat: K is the RoPE output [sb, 8, 32], V a view of the QKV output [sb, 24, 32]
    assert T.local_attention_core_bytes(mha, 64, 2, 4) == 128 * 32 * 4 * (8 + 8 + 24) + 2 * 8 * 64 * 64 * 4 + 64 * 64
    tp2 = T.LayerShape(hidden=256, ffn=768, heads=8, groups=2, head_dim=32, tp=2, vocab_shard=256)
    # TP=2: heads, groups and FFN halve; the residual-stream tensors (sbh) do not, unless SP
    full, half = T.local_layer_saved_bytes(SHAPE, 64, 2, 4, recompute="none"), \
        T.local_layer_saved_bytes(tp2, 64, 2, 4, recompute="none")
    sbh_terms = 525_312 + 262_144 + 32_768 + 4096
    assert half == sbh_terms + (full - sbh_terms) // 2
    sp = T.local_layer_saved_bytes(tp2, 64, 2, 4, recompute="none", sequence_parallel=True)
    assert half - sp == (4 * 131_072 + 2 * 512) // 2 + 2 * 131_072 // 2


def test_te_layer_has_no_seq_squared_term():
    # q,k,v 128*(8+4)*32*2, attention output 128*256*2 + stats 2*8*64*4, norms 2 x (2 x 128*256*2 + 512),
    # MLP fc1 output + fc2 input 3 x 128*768*2
    expected = 128 * 12 * 32 * 2 + 128 * 256 * 2 + 2 * 8 * 64 * 4 + 2 * (2 * 65536 + 512) + 3 * 128 * 768 * 2
    assert T.te_layer_saved_bytes(SHAPE, 64, 2, 2, recompute="none") == expected
    long = T.te_layer_saved_bytes(SHAPE, 4096, 1, 2, recompute="none") / T.te_layer_saved_bytes(SHAPE, 2048, 1, 2,
                                                                                                recompute="none")
    assert long == pytest.approx(2.0)  # linear in s (flash attention)


def test_pipeline_in_flight_passes():
    # 1F1B: rank r holds min(pp - r, M) micro-batches of L/pp layers
    assert [T.in_flight_passes(r, 4, 1, 8, 80).in_flight for r in range(4)] == [4, 3, 2, 1]
    assert [T.in_flight_passes(r, 4, 1, 2, 80).in_flight for r in range(4)] == [2, 2, 2, 1]
    assert T.in_flight_passes(0, 4, 1, 8, 80).layers_per_pass == 20
    # interleaved, vpp 2: warm-up (pp - r - 1) * 2 + (vpp - 1) * pp, + 1; chunks of L / 8 layers
    s = T.in_flight_passes(0, 4, 2, 8, 80)
    assert (s.in_flight, s.layers_per_pass) == (3 * 2 + 4 + 1, 10)
    assert T.in_flight_passes(3, 4, 2, 8, 80).in_flight == 5
    assert T.in_flight_passes(0, 4, 2, 2, 80).in_flight == 4  # at most M x vpp


def test_train_activations_by_recompute_mode():
    sched = T.PipelineSchedule(in_flight=2, layers_per_pass=4)
    kw = dict(layer_spec="local", recompute_num_layers=2, sequence_parallel=False, schedule=sched, layers_on_rank=4)
    layer = T.local_layer_saved_bytes(SHAPE, 64, 2, 4, recompute="none")
    sel = T.local_layer_saved_bytes(SHAPE, 64, 2, 4, recompute="selective")
    # none: 2 passes x 4 layers + one layer's gradients in backward
    assert T.train_activation_bytes(SHAPE, 64, 2, 4, recompute="none", **kw) == 8 * layer + layer
    # selective: 8 x selective + the layer in backward + its recomputed core attention
    assert T.train_activation_bytes(SHAPE, 64, 2, 4, recompute="selective", **kw) == 8 * sel + sel + (layer - sel)
    # full, blocks of 2: 2 passes x 2 block inputs [s, b, h] + a recomputed block + its gradients
    assert T.train_activation_bytes(SHAPE, 64, 2, 4, recompute="full", **kw) == 2 * 2 * 131_072 + 3 * layer


def test_logprob_workspace_fused_vs_naive():
    # 100 response tokens of a [64, 2] micro-batch, CPU fp32, V/t = 512, h = 256:
    # fused: kept rows 100*256*4 + stats 3*100*4 + tile 100*512*4; backward dL/dhidden 100*256*4
    fused = T.logprob_workspace_bytes(SHAPE, 64, 2, 100, 4, fused=True, device="cpu", backward=True)
    assert fused == 102_400 + 1200 + 204_800 + 102_400
    # naive: logits [128, 512] kept, dL/dlogits of the same size, 3 fp32 statistics per position
    naive = T.logprob_workspace_bytes(SHAPE, 64, 2, 100, 4, fused=False, device="cpu", backward=True)
    assert naive == 2 * 128 * 512 * 4 + 3 * 128 * 4
    # forward only (scoring): nothing of the backward
    assert T.logprob_workspace_bytes(SHAPE, 64, 2, 100, 4, fused=True, device="cpu", backward=False) == \
        102_400 + 1200 + 204_800


def test_kv_bytes_per_token():
    # Llama-70B at engine TP 8: 80 layers x K and V x 1 KV head x 128 x bf16
    assert T.kv_bytes_per_token(80, 1, 128, 2) == 40_960


def test_grad_check_and_what_follows_the_backward():
    # CPU: optimizer.step's two fp32 temporaries of the largest parameter (2 x 4 x 500), on top of
    # the activations (glibc keeps them); the aminmax gradient check adds nothing
    step = T.optimizer_step_bytes(500, "cpu")
    assert step == 4000
    assert T.grad_check_term_bytes(3000, 100, step, "cpu") == 4000
    # GPU: only the excess over the backward's peak (activations + log-prob workspace), never negative
    assert T.grad_check_term_bytes(3000, 100, 7000, "gpu") == 3900
    assert T.grad_check_term_bytes(9000, 100, 7000, "gpu") == 0
    assert T.optimizer_step_bytes(500, "gpu") == 0