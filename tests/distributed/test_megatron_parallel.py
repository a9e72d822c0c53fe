"""TP/PP layouts of the real megatron-core GPTModel on gloo ranks equal TP=1/PP=1."""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.parallel.spawn import run_ranks
from testlib.ranks import build, tp_gather_last_dim
from testlib.tiny_models import tiny_config

pytestmark = pytest.mark.distributed

B, S = 2, 24


def _fwd_bwd(cfg, tp, pp, full_weights):
    """Logits [B, S, V] and full-layout grads of loss = Σ logits ⊙ probe."""
    from megatron_rpp.models.pipeline import MicroBatch, forward_backward
    from megatron_rpp.parallel.gather import gather_full_params, load_full_params

    model, groups = build(cfg, tp, pp)
    if full_weights is None:
        full_weights = gather_full_params(model, groups)
    else:
        load_full_params(model, groups, full_weights)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg["vocab_size"], (B, S), generator=g)
    # Scaled so gradients are O(1): an absolute tolerance then means ~fp32 rounding.
    probe = torch.randn(B, S, cfg["vocab_size"], generator=g) / (B * S)
    shard = cfg["vocab_size"] // groups.tp_size

    def loss_fn(logits, mb):  # logits [B, S, V/tp]; Σ over shards = Σ over the vocabulary
        p = probe[..., groups.tp_rank * shard:(groups.tp_rank + 1) * shard]
        return (logits * p).sum(), {"logits": tp_gather_last_dim(logits.detach(), groups)}

    out = forward_backward(model, [MicroBatch(tokens)], loss_fn, groups, forward_only=False)
    grads = gather_full_params(model, groups, grads=True)
    logits = out[0]["logits"] if out else None
    return {"weights": full_weights, "logits": logits, "grads": grads, "stage": groups.pp_rank}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp_pp_match_single_rank(arch):
    cfg = tiny_config(arch)
    ref = run_ranks(_fwd_bwd, 1, cfg, 1, 1, None)[0]
    assert torch.isfinite(ref["logits"]).all()
    for tp, pp in [(2, 1), (1, 2), (2, 2)]:
        res = run_ranks(_fwd_bwd, tp * pp, cfg, tp, pp, ref["weights"])
        last = [r for r in res if r["logits"] is not None]
        assert len(last) == tp  # the last stage's TP ranks hold the logits
        for r in last:
            torch.testing.assert_close(r["logits"], ref["logits"], atol=1e-5, rtol=0)
        for r in res:
            assert r["grads"].keys() == ref["grads"].keys()
            for name, gref in ref["grads"].items():
                assert gref.abs().max() > 0, name  # every parameter gets a gradient
                torch.testing.assert_close(r["grads"][name], gref, atol=1e-5, rtol=0, msg=lambda m: f"{arch} tp={tp} pp={pp} {name}: {m}")
