"""Virtual pipeline, sequence parallelism and activation recompute change nothing but memory and speed.

The real training path on gloo ranks — ``provider.build_model``, Megatron DDP (whose
``finalize_model_grads`` sums sequence-parallel norm gradients over TP and tied-embedding
gradients over PP), ``forward_backward`` over length-sorted micro-batches of different
lengths, the trainer's ``token_log_probs`` head (fused output layer and logits path) — gives
the same loss, log-probs and gradients of every parameter as TP=1/PP=1 with no switch on.

The loss is the REINFORCE-shaped ``-Σ A·log π / N`` over response tokens, with random
advantages A so every logit gets an O(1/N) gradient; fp32 sums reassociated across TP ranks,
stages and micro-batches agree to ~1e-7, so 1e-5 (absolute; log-probs are O(5), gradients
O(1e-2..1)) is tight and a wrong layout (a swapped chunk, a missing SP all-reduce, a padded
position leaking into attention) misses it by orders of magnitude.
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.parallel.spawn import run_ranks
from testlib.tiny_models import tiny_config

pytestmark = pytest.mark.distributed

MICRO_BATCH, TEMPERATURE = 2, 0.9


def _batch(vocab: int):
    """8 sequences of different prompt/response lengths (4 micro-batches of 2, each of its own
    length; odd lengths get padded under sequence parallelism), random advantages."""
    from megatron_rpp.data.rollout_batch import RolloutBatch

    g = torch.Generator().manual_seed(7)
    lengths = [(3, 5), (9, 2), (4, 11), (6, 6), (2, 3), (12, 7), (5, 9), (7, 1)]
    prompts = [torch.randint(0, vocab, (p,), generator=g).tolist() for p, _ in lengths]
    responses = [torch.randint(0, vocab, (r,), generator=g).tolist() for _, r in lengths]
    batch = RolloutBatch.from_sequences(prompts, responses)
    return batch.replace(advantages=torch.randn(batch.response_mask.shape, generator=g) * batch.response_mask)


def _layout_run(cfg, tp, pp, vpp, options, full_weights, micro_batch=MICRO_BATCH):
    """Loss, log-probs [B, T] and full gradients, for the fused and the logits output layer."""
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.pipeline import forward_backward, model_device
    from megatron_rpp.models.provider import ModelOptions, build_model
    from megatron_rpp.models.scoring import output_context, to_micro_batches, token_log_probs
    from megatron_rpp.parallel.gather import gather_full_params, load_full_params
    from megatron_rpp.parallel.groups import initialize_parallel
    from megatron_rpp.trainer.optim import OptimConfig, wrap_for_training, zero_grad

    groups = initialize_parallel(tp, pp, vpp=vpp)
    spec = architecture_for_config(cfg).model_spec(cfg).for_tp(tp)
    model = build_model(spec, groups, options=ModelOptions(**options))
    if full_weights is None:
        full_weights = gather_full_params(model, groups)
    else:
        load_full_params(model, groups, full_weights)
    ddp, opt = wrap_for_training(model, OptimConfig(lr=1e-3))
    batch = _batch(cfg["vocab_size"])
    n_tokens = batch.num_response_tokens
    tp_group = groups.tp_group if tp > 1 else None
    out = {"weights": full_weights, "chunks": len(model)}
    for fused in (True, False):
        def loss_fn(output, mb):
            b = mb.extras["batch"]
            lp, _ = token_log_probs(output, ddp, b, mb.input_ids, mb.extras["resp_index"], tp_group=tp_group,
                                    temperature=TEMPERATURE, fused=fused, with_entropy=False)
            loss = -(lp * b.advantages).sum() / n_tokens
            return loss, {"loss": loss.detach(), "lp": lp.detach(), "rows": mb.extras["rows"]}

        zero_grad(ddp, opt)
        mbs = to_micro_batches(batch, micro_batch, model_device(model))
        with output_context(ddp, fused):
            aux = forward_backward(ddp, mbs, loss_fn, groups, forward_only=False)
        result = {"grads": gather_full_params(model, groups, grads=True), "micro_batches": len(aux)}
        if aux:
            lp = torch.zeros(batch.response_mask.shape)
            for a in aux:
                lp[a["rows"], : a["lp"].shape[1]] = a["lp"]
            result.update(loss=float(sum(a["loss"] for a in aux)), log_probs=lp)
        out["fused" if fused else "logits"] = result
    return out


def _reference(cfg):
    """TP=1, PP=1, no switch; plus recompute selective and full (uniform, 1 and 2 layers) in the same process."""
    ref = _layout_run(cfg, 1, 1, 1, {}, None)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    ref["recompute"] = {
        name: _layout_run(cfg, 1, 1, 1, opts, ref["weights"])
        for name, opts in {"selective": dict(recompute="selective"),
                           "full-1": dict(recompute="full", recompute_num_layers=1),
                           "full-2": dict(recompute="full", recompute_num_layers=2)}.items()
    }
    return ref


def _assert_same(got: dict, ref: dict, what: str) -> None:
    for head in ("fused", "logits"):
        g, r = got[head], ref[head]
        assert abs(g["loss"] - r["loss"]) <= 1e-5, (what, head, g["loss"], r["loss"])
        torch.testing.assert_close(g["log_probs"], r["log_probs"], atol=1e-5, rtol=0, msg=lambda m: f"{what} {head}: {m}")
        assert g["grads"].keys() == r["grads"].keys()
        for name, gr in r["grads"].items():
            assert gr.abs().max() > 0, (head, name)  # every parameter gets a gradient
            torch.testing.assert_close(g["grads"][name], gr, atol=1e-5, rtol=0,
                                       msg=lambda m: f"{what} {head} {name}: {m}")


@pytest.fixture(scope="module")
def references():
    cfgs = {"llama_tied": tiny_config("llama", tied=True), "qwen3": tiny_config("qwen3")}
    return cfgs, {k: run_ranks(_reference, 1, c, timeout=900)[0] for k, c in cfgs.items()}


def test_recompute_modes_equal_no_recompute(references):
    _, refs = references
    for arch, ref in refs.items():
        for name, got in ref["recompute"].items():
            _assert_same(got, ref, f"{arch} recompute={name}")


@pytest.mark.parametrize("arch,tp,pp,vpp,options,micro_batch", [
    ("llama_tied", 1, 2, 2, {}, MICRO_BATCH),                        # interleaved 1F1B, tied embedding over PP
    # 2 micro-batches of different lengths = PP: stage 0 runs every forward as warm-up (the issue-15
    # hang in the shape exchange, parallel/pipeline_fixes.py; run_ranks' timeout fails a hang)
    ("llama_tied", 1, 2, 2, {}, 4),
    ("qwen3", 2, 1, 1, dict(sequence_parallel=True), MICRO_BATCH),  # SP with QK-norm, fused head gathers rows
    ("llama_tied", 2, 2, 2, dict(sequence_parallel=True, recompute="full"), MICRO_BATCH),  # all at once, 4 ranks
], ids=["pp2-vpp2", "pp2-vpp2-m2", "tp2-sp", "tp2-pp2-vpp2-sp-full"])
def test_layout_equals_single_rank(references, arch, tp, pp, vpp, options, micro_batch):
    cfgs, refs = references
    ref = refs[arch]
    res = run_ranks(_layout_run, tp * pp, cfgs[arch], tp, pp, vpp, options, ref["weights"], micro_batch,
                    timeout=900)
    assert all(r["chunks"] == vpp for r in res)
    last = [r for r in res if "loss" in r["fused"]]
    assert len(last) == tp  # the last stage's TP ranks report
    for r in last:
        assert r["fused"]["micro_batches"] == 8 // micro_batch  # the real ones (no filler: a multiple of PP)
    for r in res:
        for head in ("fused", "logits"):
            r[head].setdefault("loss", last[0][head]["loss"])
            r[head].setdefault("log_probs", last[0][head]["log_probs"])
        _assert_same(r, ref, f"{arch} tp={tp} pp={pp} vpp={vpp} {options}")
