"""The fused output layer (hidden states → fused_linear_log_probs) equals Megatron's output
layer + vocab_parallel_log_probs: response log-probs, entropy and every parameter's gradient,
on the real GPTModel at TP=1 and TP=2×PP=2 (untied and tied output weights)."""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.parallel.spawn import run_ranks
from testlib.ranks import build
from testlib.tiny_models import tiny_config

pytestmark = pytest.mark.distributed

# (prompt length, response length): ragged, so padding and response offsets differ per row.
SHAPES = [(5, 9), (11, 3), (2, 14)]
TEMPERATURE = 0.8


def _both_paths(cfg, tp, pp):
    """Per path: response log-probs and entropy [B, T] (last stage) and full-layout grads of
    Σ w_lp·log π + w_ent·entropy."""
    from contextlib import nullcontext

    from megatron_rpp.kernels import vocab_parallel_log_probs
    from megatron_rpp.models.lm_head import hidden_states_output, output_weight, response_log_probs
    from megatron_rpp.models.pipeline import MicroBatch, forward_backward
    from megatron_rpp.parallel.gather import gather_full_params
    from megatron_rpp.data.rollout_batch import RolloutBatch

    model, groups = build(cfg, tp, pp)
    g = torch.Generator().manual_seed(3)
    batch = RolloutBatch.from_sequences([torch.randint(3, cfg["vocab_size"], (p,), generator=g).tolist() for p, _ in SHAPES],
                                        [torch.randint(3, cfg["vocab_size"], (r,), generator=g).tolist() for _, r in SHAPES])
    input_ids, resp_index = batch.model_inputs()
    w_lp, w_ent = torch.randn(batch.response_mask.shape, generator=g), torch.randn(batch.response_mask.shape, generator=g)
    tp_group = groups.tp_group if tp > 1 else None
    out = {}
    for fused in (False, True):

        def loss_fn(output, mb):
            if fused:  # output: hidden states [B, S, H]
                lp, ent = response_log_probs(output, output_weight(model), input_ids, resp_index,
                                             batch.response_mask, tp_group=tp_group, temperature=TEMPERATURE,
                                             with_entropy=True)
            else:  # output: logits [B, S, V/tp]; the response positions picked by hand
                lp, ent = vocab_parallel_log_probs(output[:, :-1], input_ids[:, 1:], tp_group=tp_group,
                                                   temperature=TEMPERATURE, with_entropy=True)
                lp, ent = (torch.nn.utils.rnn.pad_sequence([v[b, p - 1 : p - 1 + r] for b, (p, r) in enumerate(SHAPES)],
                                                           batch_first=True) for v in (lp, ent))
            return (w_lp * lp + w_ent * ent).sum(), {"lp": lp.detach(), "ent": ent.detach(), "width": output.shape[-1]}

        model.zero_grad()
        with hidden_states_output(model) if fused else nullcontext():
            aux = forward_backward(model, [MicroBatch(input_ids)], loss_fn, groups, forward_only=False)
        out[fused] = {"aux": aux[0] if aux else None, "grads": gather_full_params(model, groups, grads=True)}
    # Outside the context manager the model returns logits again.
    with torch.no_grad():
        logits = forward_backward(model, [MicroBatch(input_ids)], lambda o, mb: (o.sum() * 0, {"w": o.shape[-1]}),
                                  groups, forward_only=True)
    out["width_after"] = logits[0]["w"] if logits else None
    out["mask"] = batch.response_mask
    return out


@pytest.mark.parametrize("arch,tied,tp,pp", [("llama", False, 1, 1), ("llama", False, 2, 2), ("qwen2", True, 2, 2)],
                         ids=["llama-tp1", "llama-tp2pp2", "qwen2-tied-tp2pp2"])
def test_fused_output_layer_matches_logits_path(arch, tied, tp, pp):
    cfg = tiny_config(arch, tied=tied)
    results = run_ranks(_both_paths, tp * pp, cfg, tp, pp)
    last = [r for r in results if r[True]["aux"] is not None]
    assert len(last) == tp
    for r in last:
        ref, got = r[False]["aux"], r[True]["aux"]
        assert ref["width"] == cfg["vocab_size"] // tp and got["width"] == cfg["hidden_size"]
        assert r["width_after"] == cfg["vocab_size"] // tp
        mask = r["mask"]
        assert (got["lp"][~mask] == 0).all() and (got["lp"][mask] < 0).all()
        torch.testing.assert_close(got["lp"], ref["lp"], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["ent"], ref["ent"], atol=1e-5, rtol=0)
    for r in results:
        ref, got = r[False]["grads"], r[True]["grads"]
        assert ref.keys() == got.keys()
        for name, g_ref in ref.items():
            assert g_ref.abs().max() > 0, name
            torch.testing.assert_close(got[name], g_ref, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
