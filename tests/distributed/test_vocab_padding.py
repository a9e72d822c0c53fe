"""A model with an odd vocabulary trains at TP=2 exactly as at TP=1, and its padding stays inert.

509 tokens: the Megatron model has 512 vocabulary rows at TP 1 and 2 (``ModelSpec.for_tp``;
rank 1 of TP=2 holds 253 real rows of 256). Real megatron-core on gloo ranks, weights loaded
from a transformers checkpoint (untied Llama, tied Qwen2). Per layout and per output path
(Megatron's output layer + ``vocab_parallel_log_probs``, and the fused output layer
``lm_head.response_log_probs``), one forward/backward of loss = Σ w·log π + Σ u·entropy:

- log-probs and entropy equal transformers' own model on the 509-token vocabulary;
- every parameter's gradient at TP=2 equals TP=1, and the two output paths agree;
- the padding rows of the embedding and of the output layer get exactly zero gradient, and
  stay exactly zero through an AdamW step with weight decay.
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.checkpoint.verify import hf_logits, sample_tokens
from megatron_rpp.parallel.spawn import run_ranks
from testlib.tiny_checkpoints import case_config, save_tiny_hf

pytestmark = pytest.mark.distributed

CASES = ["llama_odd_vocab", "qwen2_odd_vocab"]  # untied; tied
B, S, V, V_PADDED = 2, 24, 509, 512
# fp32 on both sides; TP changes only the reduction order (~1e-6 observed for logits).
TOL_VALUES, TOL_GRADS = 1e-5, 1e-5


def _loss_weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, S - 1, generator=g), torch.randn(B, S - 1, generator=g)


def _rank(hf_dirs: dict, tokens: torch.Tensor) -> dict:
    from megatron_rpp.checkpoint.hf_loader import load_hf_weights
    from megatron_rpp.kernels import vocab_parallel_log_probs
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.lm_head import hidden_states_output, output_weight, response_log_probs
    from megatron_rpp.models.pipeline import MicroBatch, forward_backward
    from megatron_rpp.models.provider import build_gpt_model
    from megatron_rpp.models.spec import load_hf_config
    from megatron_rpp.parallel.gather import gather_full_params
    from megatron_rpp.parallel.groups import initialize_parallel

    w_lp, w_ent = _loss_weights()
    resp_index = torch.arange(S - 1).expand(B, S - 1)  # position t predicts token t + 1
    mask = torch.ones(B, S - 1, dtype=torch.bool)
    out = {}
    for case, hf_dir in hf_dirs.items():
        for tp in (1, 2):
            groups = initialize_parallel(tp, 1)
            tp_group = groups.tp_group if tp > 1 else None
            cfg = load_hf_config(hf_dir)
            arch = architecture_for_config(cfg)
            spec = arch.model_spec(cfg).for_tp(tp)
            model = build_gpt_model(spec, groups)
            load_hf_weights(model, groups, arch, spec, hf_dir)
            for fused in (False, True):
                def loss_fn(output, mb):
                    if fused:  # hidden states [B, S, H]
                        lp, ent = response_log_probs(output, output_weight(model), mb.input_ids, resp_index, mask,
                                                     tp_group=tp_group, with_entropy=True, vocab_size=spec.vocab_size)
                    else:  # vocab-parallel logits [B, S, 512/tp]
                        lp, ent = vocab_parallel_log_probs(output[:, :-1], mb.input_ids[:, 1:], tp_group=tp_group,
                                                           with_entropy=True, vocab_size=spec.vocab_size)
                    return (w_lp * lp + w_ent * ent).sum(), {"lp": lp.detach(), "ent": ent.detach()}

                model.zero_grad(set_to_none=True)
                if fused:
                    with hidden_states_output(model):
                        aux = forward_backward(model, [MicroBatch(tokens)], loss_fn, groups, forward_only=False)
                else:
                    aux = forward_backward(model, [MicroBatch(tokens)], loss_fn, groups, forward_only=False)
                out[(case, tp, fused)] = {"lp": aux[0]["lp"], "ent": aux[0]["ent"],
                                          "grads": gather_full_params(model, groups, grads=True)}
            # One AdamW step (weight decay on): the padding rows must stay exactly zero.
            torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1).step()
            out[(case, tp, "after_step")] = gather_full_params(model, groups)
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return {c: save_tiny_hf(root / c, case_config(c)) for c in CASES}


def test_odd_vocabulary_trains_at_tp2_like_tp1(hf_dirs):
    tokens = sample_tokens(V, B, S, seed=1)
    res = run_ranks(_rank, 2, {c: str(d) for c, d in hf_dirs.items()}, tokens, timeout=900)[0]
    for case in CASES:
        ref_logits = hf_logits(hf_dirs[case], tokens)[:, :-1]  # [B, S-1, 509]: transformers, real vocabulary
        assert ref_logits.shape[-1] == V
        ref_lsm = torch.log_softmax(ref_logits.double(), dim=-1)
        ref_lp = ref_lsm.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        ref_ent = -(ref_lsm.exp() * ref_lsm).sum(-1)
        base = res[(case, 1, False)]
        for key in [(case, tp, fused) for tp in (1, 2) for fused in (False, True)]:
            got = res[key]
            torch.testing.assert_close(got["lp"].double(), ref_lp, atol=1e-4, rtol=0, msg=lambda m: f"{key} lp: {m}")
            torch.testing.assert_close(got["ent"].double(), ref_ent, atol=1e-4, rtol=0, msg=lambda m: f"{key} ent: {m}")
            torch.testing.assert_close(got["lp"], base["lp"], atol=TOL_VALUES, rtol=0)
            assert sorted(got["grads"]) == sorted(base["grads"])
            for name, g in got["grads"].items():
                torch.testing.assert_close(g, base["grads"][name], atol=TOL_GRADS, rtol=1e-5,
                                           msg=lambda m: f"{key} grad {name}: {m}")
            vocab_params = [n for n in got["grads"] if n in ("embedding.word_embeddings.weight", "output_layer.weight")]
            assert len(vocab_params) == (1 if case_config(case)["tie_word_embeddings"] else 2)
            for name in vocab_params:
                g = got["grads"][name]
                assert g.shape[0] == V_PADDED and g[:V].abs().max() > 0
                assert (g[V:] == 0).all(), f"{key}: padding rows of {name} got a gradient"
        for tp in (1, 2):
            weights = res[(case, tp, "after_step")]
            for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                if name in weights:
                    assert (weights[name][V:] == 0).all(), f"{case} tp={tp}: padding rows of {name} moved"
