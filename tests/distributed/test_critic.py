"""The PPO critic on Megatron (TP=2, PP=2, DP=2) against transformers and a plain-torch Adam step.

Two spawned gloo ranks build the critic, per layout (TP=2; PP=2; TP=1 at DP=2), the way the
worker does (``build_critic`` + ``wrap_for_training``), and:

1. from a causal LM's folder (tied embeddings, like SmolLM2): every value is exactly 0 (zero
   head) and every trunk weight equals the policy's, loaded from the same folder;
2. from a sequence-classification folder: ``critic_values``' path (``forward_score`` with
   ``value_head``) gives, for response token t of sequence b, transformers' score at position
   ``p_b + t - 1`` (the state before token t: the alignment models/critic.py documents);
3. one ``value_update`` (clipped value loss, Adam) equals the same step done in plain torch on
   the transformers model: the loss written out by hand (0.5·max((V − G)², (V_old + clip(V − V_old,
   ±ε) − G)²), token mean), ``torch.optim.Adam``, then the values of the updated model.

fp32 everywhere; differences come from reduction order across TP shards and micro-batches
(values ~1e-7 apart, gradients ~1e-6 relative), so 1e-5 on O(1) values is tight; after Adam's first
step the values agree to ~2e-5 (see the comment at that assert). The DP=2 layout checks that each rank's
half of the batch, divided by the global token count, adds up to the whole batch's step.
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.parallel.spawn import run_ranks
from testlib.tiny_checkpoints import reward_model_config, save_tiny_hf, save_tiny_reward_model
from testlib.tiny_models import tiny_config

pytestmark = pytest.mark.distributed

LAYOUTS = [(2, 1), (1, 2), (1, 1)]  # (tp, pp) on 2 ranks; (1, 1) is DP=2
PROMPTS = [3, 7, 5, 2]
RESPONSES = [6, 2, 9, 4]
CLIP, LR = 0.2, 1e-3
TOL = 1e-5


def _batch():
    """Ragged prompts/responses; rollout-time values off the current ones by ±0.3 (some clipped)
    and returns drawn at random (they are targets: any numbers do)."""
    from megatron_rpp.data.rollout_batch import RolloutBatch

    g = torch.Generator().manual_seed(3)
    batch = RolloutBatch.from_sequences([torch.randint(3, 512, (n,), generator=g).tolist() for n in PROMPTS],
                                        [torch.randint(3, 512, (n,), generator=g).tolist() for n in RESPONSES])
    mask = batch.response_mask
    returns = torch.randn(mask.shape, generator=g) * mask
    offsets = (torch.rand(mask.shape, generator=g) * 0.6 - 0.3) * mask
    return batch.replace(returns=returns), offsets


def _rank(policy_dir: str, rm_dir: str):
    from megatron.core import parallel_state

    from megatron_rpp.models.critic import build_critic, value_head
    from megatron_rpp.models.provider import build_gpt_model
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.scoring import forward_score
    from megatron_rpp.models.spec import load_hf_config
    from megatron_rpp.checkpoint.hf_loader import load_hf_weights
    from megatron_rpp.parallel.gather import gather_full_params
    from megatron_rpp.parallel.groups import initialize_parallel
    from megatron_rpp.trainer.optim import OptimConfig, wrap_for_training
    from megatron_rpp.trainer.update import StepSettings, value_update

    batch, offsets = _batch()
    settings = StepSettings(temperature=1.0, fused_output_layer=False, micro_batch_size=2)
    out = {}
    for tp, pp in LAYOUTS:
        groups = initialize_parallel(tp, pp)
        report = groups.tp_rank == 0 and groups.is_last_stage

        # 1. from the causal LM: zero values, the policy's trunk
        critic, _ = build_critic(policy_dir, groups)
        zero = forward_score(critic, groups, batch, value_head, micro_batch_size=2)
        hf = load_hf_config(policy_dir)
        arch = architecture_for_config(hf)
        spec = arch.model_spec(hf).for_tp(tp)
        policy = build_gpt_model(spec, groups)
        load_hf_weights(policy, groups, arch, spec, policy_dir)
        c_params, p_params = gather_full_params(critic, groups), gather_full_params(policy, groups)
        trunk = sorted(set(c_params) & set(p_params))
        out[("trunk", tp, pp)] = (len(trunk), len(c_params), max(float((c_params[k] - p_params[k]).abs().max())
                                                                 for k in trunk))
        out[("zero", tp, pp)] = zero if report else None

        # 2. + 3. from the reward model: values, then one value update
        critic, _ = build_critic(policy_dir, groups, model_dir=rm_dir)
        ddp, opt = wrap_for_training(critic, OptimConfig(lr=LR, clip_grad=1e9))
        before = forward_score(critic, groups, batch, value_head, micro_batch_size=2)
        values = torch.zeros_like(batch.returns)
        if groups.is_last_stage:
            values = before
        dist_src = groups.pp_ranks[-1]
        torch.distributed.broadcast(values, src=dist_src, group=groups.pp_group)
        train = batch.replace(values=values + offsets)
        part = torch.arange(len(batch)).tensor_split(groups.dp_size)[groups.dp_rank]
        counts = {"tokens": batch.num_response_tokens, "seqs": len(batch)}
        metrics = value_update(ddp, opt, groups, train.select(part), counts, CLIP, settings)
        grads = gather_full_params(critic, groups, grads=True)  # DP-reduced, every layout in TP=1 layout
        after = forward_score(critic, groups, batch, value_head, micro_batch_size=2)
        out[("values", tp, pp)] = (before, after, metrics, grads) if report else None
        parallel_state.destroy_model_parallel()
    return out


def _hf_values(model, batch) -> torch.Tensor:
    """transformers' score at the position before each response token, one unpadded sequence at a time."""
    values = torch.zeros(batch.response_mask.shape)
    for b in range(len(batch)):
        p, n = int(batch.prompt_lengths[b]), int(batch.response_lengths[b])
        ids = torch.cat([batch.prompt_ids[b, :p], batch.response_ids[b, :n]])[None]
        scores = model.score(model.model(input_ids=ids).last_hidden_state)[0, :, 0]  # [S]
        values[b, :n] = scores[p - 1: p - 1 + n]
    return values


def _reference_step(rm_dir, batch, offsets):
    """One clipped-value-loss Adam step in plain torch on transformers' model."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32,
                                                               attn_implementation="eager")
    mask = batch.response_mask
    with torch.no_grad():
        before = _hf_values(model, batch)
    old = before + offsets
    v = _hf_values(model, batch)
    v_clip = old + (v - old).clamp(-CLIP, CLIP)
    per_token = 0.5 * torch.maximum((v - batch.returns) ** 2, (v_clip - batch.returns) ** 2)
    loss = (per_token * mask).sum() / mask.sum()
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    loss.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None))
    clipped = float((((v_clip - batch.returns) ** 2 > (v - batch.returns) ** 2) & mask).sum() / mask.sum())
    grads = _megatron_layout({n: p.grad.clone() for n, p in model.named_parameters()}, rm_dir)
    opt.step()
    with torch.no_grad():
        after = _hf_values(model, batch)
    return before, after, float(loss.detach()), float(norm), clipped, grads


def _megatron_layout(hf_tensors: dict, hf_dir) -> dict:
    """HF-named tensors in Megatron names and layout, through the architecture's parameter table
    (the conversion is linear: fused QKV / gate-up concatenations, so gradients convert like weights)."""
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.spec import load_hf_config

    hf = load_hf_config(hf_dir)
    arch = architecture_for_config(hf)
    spec = arch.model_spec(hf).for_tp(1)
    return {e.name: arch.to_megatron(spec, e.name, [hf_tensors[h] for h in e.hf_names]) for e in arch.param_table(spec)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic")
    policy = save_tiny_hf(root / "policy", tiny_config("llama", tied=True), seed=0)
    rm = save_tiny_reward_model(root / "rm", reward_model_config("llama"), seed=1)
    return str(policy), str(rm)


def test_critic_values_and_update_match_transformers(folders):
    policy_dir, rm_dir = folders
    res = run_ranks(_rank, 2, policy_dir, rm_dir, timeout=900)
    batch, offsets = _batch()
    ref_before, ref_after, ref_loss, ref_norm, ref_clipped, ref_grads = _reference_step(rm_dir, batch, offsets)
    mask = batch.response_mask
    worst = 0.0
    assert 0 < ref_clipped < 1 and (ref_after - ref_before)[mask].abs().min() > 1e-4  # the step moves every value
    for tp, pp in LAYOUTS:
        for r in res:
            n_trunk, n_all, diff = r[("trunk", tp, pp)]
            assert n_trunk == n_all - 1 and diff == 0.0, (tp, pp, n_trunk, n_all, diff)  # all but the value head
        reports = [r for r in res if r[("values", tp, pp)] is not None]
        assert len(reports) == 2 // (tp * pp)
        for r in reports:
            assert torch.equal(r[("zero", tp, pp)], torch.zeros(mask.shape))
            before, after, metrics, grads = r[("values", tp, pp)]
            torch.testing.assert_close(before, ref_before, atol=TOL, rtol=0, msg=lambda m: f"{tp, pp} before: {m}")
            assert sorted(grads) == sorted(ref_grads)
            for k, g in ref_grads.items():  # relative to each tensor's largest entry (fp32 sums of ~40 tokens)
                gap = float((grads[k] - g).abs().max() / g.abs().max())
                worst = max(worst, gap)
                assert gap < 1e-5, (tp, pp, k, gap)
            # Adam's first step moves each weight by about ±lr whatever |grad| is, so a gradient of ~1e-9
            # takes its sign from rounding: values after the step agree to ~2e-5 (measured), not 1e-7.
            torch.testing.assert_close(after, ref_after, atol=1e-4, rtol=0, msg=lambda m: f"{tp, pp} after: {m}")
            assert metrics["update_ok"]
            assert metrics["value_loss"] == pytest.approx(ref_loss, rel=1e-5)
            assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
            assert metrics["value_clip_fraction"] == pytest.approx(ref_clipped, abs=1e-6)
            print(f"TP={tp} PP={pp}: |values - HF| {float((before - ref_before).abs().max()):.1e}, after the step "
                  f"{float((after - ref_after).abs().max()):.1e}")
    print(f"largest gradient gap / largest gradient entry: {worst:.1e}")
