"""Every check of a loaded config, run once by :func:`load_config`, before anything is built.

What is checked (each failure is a :class:`ConfigError` naming the key and what is allowed):

- enumerated values (``model.dtype``, ``data.source``, KL estimators, loss aggregation, ...);
- the range of every numeric field (``RANGES``, ``AT_LEAST``, ``SEEDS`` and ``SPECIAL``; a unit test
  proves that every numeric field of the schema is in one of them);
- plug-ins: ``algorithm.estimator`` and ``reward.function`` are resolved through their
  registries (``file.py:fn`` files are imported) and type-checked (callable, number of
  arguments);
- the critic, when the estimator's registry entry says ``needs_values``
  (:func:`~megatron_rpp.config.hyper.needs_critic`): ``critic.warmup_steps`` below
  ``trainer.steps``, and a ``critic.model_dir`` (or, without one, the policy's architecture)
  that a scalar value head can be built on;
- the algorithm, loss and sampling hyperparameter dataclasses are built from the config
  (:mod:`megatron_rpp.config.hyper`, the same builders the trainer uses), so their own checks
  run now; their errors are reported under the config key;
- layouts: ``trainer.num_workers`` against TP × PP, batch divisibility, the parallelism and
  memory switches (virtual pipeline, sequence parallel, recompute, context parallel) against
  each other, and, when ``model.hf_dir`` (or ``reward.model_dir``, ``critic.model_dir``) is a local folder with
  ``config.json``, layers, heads and FFN size against the TP/PP/VPP sizes (and the recompute
  unit) and the context length against ``max_position_embeddings``;
- the rollout engine layout (issue 14): ``rollout.tensor_parallel_size`` against
  ``trainer.num_workers`` and ``model.tensor_parallel_size`` (both named in the error), the
  engine's FFN and vocabulary split against a local ``config.json``, and
  ``trainer.offload_optimizer_during_rollout`` (GPU only).

Only the standard library, torch and megatron_rpp's light modules are imported (no Megatron,
vLLM, Ray or transformers): ``load_config`` stays fast.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from megatron_rpp.algorithms._checks import HyperparameterError, accepts_positional, check_range
from megatron_rpp.config.loader import ConfigError
from megatron_rpp.config.schema import Config

INF = math.inf
SEED_MAX = 2**31 - 1

#: Integer fields: the smallest allowed value.
AT_LEAST = {
    "model.tensor_parallel_size": 1, "model.pipeline_parallel_size": 1, "model.virtual_pipeline_size": 1,
    "model.context_parallel_size": 1, "model.recompute_num_layers": 1, "model.max_prompt_length": 1,
    "model.max_response_length": 1, "data.num_train_prompts": 1, "data.num_eval_prompts": 0,
    "reward.num_workers": 0, "reward.remote_max_retries": 0, "reward.remote_batch_size": 1,
    "rollout.n_samples_per_prompt": 1, "rollout.rollout_batch_size": 1, "rollout.bucket_mb": 1,
    "rollout.check_sync_interval": 0, "trainer.steps": 1, "trainer.train_batch_size": 1,
    "trainer.micro_batch_size": 1, "trainer.num_epochs": 1, "trainer.num_workers": 1,
    "trainer.eval_interval": 0, "trainer.save_interval": 0, "trainer.keep_checkpoints": 1,
    "trainer.max_nonfinite_steps_in_a_row": 1, "trainer.max_tokens_per_micro_batch": 0,
    "rollout.tensor_parallel_size": 0,  # 0 = model.tensor_parallel_size (issue 14)
    "critic.warmup_steps": 0,
}
#: Seeds: integers in [0, SEED_MAX].
SEEDS = ("data.seed", "trainer.seed")
#: Float fields: (low, high, low_open, high_open). NaN never passes; inf only where high is inf and closed.
POSITIVE = (0, INF, True, True)  # a finite number > 0
NON_NEGATIVE = (0, INF, False, True)  # a finite number >= 0
UNIT = (0, 1, True, False)  # (0, 1]
RANGES = {
    "reward.remote_timeout_s": POSITIVE, "reward.clip": (0, INF, True, False),
    "reward.model_mean": (-INF, INF, True, True), "reward.model_std": POSITIVE,
    "algorithm.gamma": UNIT, "algorithm.lam": (0, 1, False, False), "algorithm.kl_coef": NON_NEGATIVE, "algorithm.clip_low": (0, 1, False, True),
    "algorithm.clip_high": NON_NEGATIVE, "algorithm.tis_cap": NON_NEGATIVE, "algorithm.entropy_coef": NON_NEGATIVE,
    "rollout.temperature": POSITIVE, "rollout.top_p": UNIT, "rollout.eval_temperature": NON_NEGATIVE,
    "rollout.kv_cache_gib": POSITIVE, "rollout.gpu_memory_utilization": UNIT, "rollout.check_sync_tolerance": POSITIVE,
    "trainer.lr": POSITIVE, "trainer.weight_decay": NON_NEGATIVE, "trainer.clip_grad": POSITIVE,
    "critic.lr": POSITIVE, "critic.clip_value": NON_NEGATIVE,
}
#: Fields with an "off" value outside their range: key -> (test, words).
SPECIAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "algorithm.dual_clip": (lambda v: v == 0 or 1 < v < INF, "0 (off) or a finite number > 1"),
    "rollout.top_k": (lambda v: v == -1 or v >= 1, "-1 (off) or an integer >= 1"),
    "rollout.sleep_level": (lambda v: v in (0, 1, 2), "0 (never sleep), 1 or 2"),  # issue 14
}


def allowed_range(key: str) -> str | None:
    """Words for the values ``key`` allows (for ``config-help``), or None for a non-numeric field."""
    from megatron_rpp.algorithms._checks import describe_range

    if key in AT_LEAST:
        return f"an integer >= {AT_LEAST[key]}"
    if key in SEEDS:
        return f"an integer in [0, {SEED_MAX}]"
    if key in RANGES:
        return describe_range(*RANGES[key])
    if key in SPECIAL:
        return SPECIAL[key][1]
    return None


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` (key + what is allowed) for the first problem found (module docstring)."""
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_estimator(cfg)
    _check_critic(cfg)
    _check_reward(cfg)
    _check_hyperparameters(cfg)
    _check_parallelism(cfg)
    _check_batches(cfg)
    _check_model_folders(cfg)
    _check_engine_layout(cfg)


# ----------------------------------------------------------------------------- single fields


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _choice(key: str, value: Any, allowed: list) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: invalid value {value!r}; allowed values: {', '.join(map(str, allowed))}")


def _check_choices(cfg: Config) -> None:
    from megatron_rpp.algorithms.aggregation import AGGREGATIONS
    from megatron_rpp.algorithms.kl import KL_ESTIMATORS
    from megatron_rpp.models.provider import RECOMPUTE

    a = cfg.algorithm
    _choice("model.dtype", cfg.model.dtype, ["fp32", "bf16"])
    _choice("model.recompute", cfg.model.recompute, list(RECOMPUTE))
    _choice("data.source", cfg.data.source, ["reasoning_gym", "jsonl", "parquet"])
    _choice("algorithm.kl_estimator", a.kl_estimator, KL_ESTIMATORS.names())
    _choice("algorithm.kl_loss_estimator", a.kl_loss_estimator, KL_ESTIMATORS.names())
    _choice("algorithm.loss_agg_mode", a.loss_agg_mode, AGGREGATIONS.names())
    _choice("algorithm.whiten", a.whiten, ["", "token", "mean", "none"])
    for key in ("trainer.output_dir", "trainer.resume", "data.prompt_field"):
        if not _get(cfg, key):
            raise ConfigError(f"{key}: must not be empty")
    if cfg.data.source in ("jsonl", "parquet") and not cfg.data.path:
        raise ConfigError(f"data.path: required when data.source is {cfg.data.source!r}")
    r = cfg.reward
    if r.model_dir and r.remote_url:
        raise ConfigError("reward.model_dir: cannot be combined with reward.remote_url (set one reward source)")
    if r.remote_url and not r.remote_url.startswith(("http://", "https://")):
        raise ConfigError(f"reward.remote_url: must start with http:// or https://, got {r.remote_url!r}")


def _check_ranges(cfg: Config) -> None:
    for key, low in AT_LEAST.items():
        if _get(cfg, key) < low:
            raise ConfigError(f"{key}: must be an integer >= {low}, got {_get(cfg, key)!r}")
    for key in SEEDS:
        if not 0 <= _get(cfg, key) <= SEED_MAX:
            raise ConfigError(f"{key}: must be an integer in [0, {SEED_MAX}], got {_get(cfg, key)!r}")
    for key, (low, high, low_open, high_open) in RANGES.items():
        try:
            check_range("config", key, _get(cfg, key), low, high, low_open=low_open, high_open=high_open)
        except HyperparameterError as e:
            raise ConfigError(f"{key}: {e.problem}") from None
    for key, (ok, words) in SPECIAL.items():
        value = _get(cfg, key)
        if math.isnan(value) or not ok(value):
            raise ConfigError(f"{key}: must be {words}, got {value!r}")


# ----------------------------------------------------------------------------- plug-ins


def _resolve(key: str, registry: Any, spec: str) -> Any:
    """``registry.get(spec)``; a plug-in that cannot be imported or is rejected is a ConfigError."""
    from megatron_rpp.algorithms.registry import RegistryError

    try:
        return registry.get(spec)
    except RegistryError as e:  # bad spec, missing file or attribute, wrong type (the message names the spec)
        raise ConfigError(f"{key}: {e}") from None
    except Exception as e:  # a user's file may raise anything on import
        raise ConfigError(f"{key}: plug-in {spec!r} failed to import: {type(e).__name__}: {e}") from None


def _check_estimator(cfg: Config) -> None:
    """Registered or plug-in; a group estimator needs >= 2 samples per prompt."""
    from megatron_rpp.algorithms.advantages import ADVANTAGE_ESTIMATORS as REG

    name = cfg.algorithm.estimator
    if ":" not in name and name not in REG:
        raise ConfigError(f"algorithm.estimator: invalid value {name!r}; allowed values: {', '.join(REG.names())}, "
                          "or a plug-in 'file.py:fn' / 'pkg.module:fn'")
    entry = _resolve("algorithm.estimator", REG, name)
    if entry.uses_groups and cfg.rollout.n_samples_per_prompt < 2:
        raise ConfigError(
            f"rollout.n_samples_per_prompt: must be >= 2 for the group estimator {name!r} (its baseline is computed "
            f"over the samples of one prompt), got {cfg.rollout.n_samples_per_prompt}"
        )


def _check_critic(cfg: Config) -> None:
    """Only when the estimator's registry entry needs values: the critic must be buildable."""
    from megatron_rpp.config.hyper import needs_critic

    if not needs_critic(cfg):
        return
    c, t = cfg.critic, cfg.trainer
    if c.warmup_steps >= t.steps:
        raise ConfigError(f"critic.warmup_steps: must be < trainer.steps ({t.steps}) or the policy never trains, "
                          f"got {c.warmup_steps}")
    if c.model_dir:
        if not (Path(c.model_dir).expanduser() / "config.json").is_file():
            raise ConfigError(f"critic.model_dir: {c.model_dir!r} has no config.json (a HF sequence-classification "
                              "folder; empty = start from the policy's trunk)")
        return
    policy = _local_model_folder(cfg.model.hf_dir)
    if policy is not None:  # the policy's architecture must have a score-head counterpart
        from megatron_rpp.models.critic import CriticError, value_architecture

        try:
            value_architecture(json.loads((policy / "config.json").read_text()))
        except (CriticError, OSError, ValueError, KeyError) as e:
            raise ConfigError(f"critic.model_dir: empty, so the critic starts from model.hf_dir, but {e}") from None


def _check_reward(cfg: Config) -> None:
    """``reward.function`` (used unless a remote endpoint or a reward model is set): a callable
    ``fn(prompt, response, sample) -> float``."""
    r = cfg.reward
    if r.remote_url or r.model_dir:
        return
    from megatron_rpp.rewards.rules import REWARDS

    signature = "fn(prompt: str, response: str, sample: dict) -> float"
    if ":" not in r.function and r.function not in REWARDS:
        raise ConfigError(f"reward.function: invalid value {r.function!r}; allowed values: "
                          f"{', '.join(REWARDS.names())}, or a plug-in 'file.py:fn' / 'pkg.module:fn' with {signature}")
    fn = _resolve("reward.function", REWARDS, r.function)
    if not callable(fn):
        raise ConfigError(f"reward.function: {r.function!r} is a {type(fn).__name__}, not a function; "
                          f"allowed: {signature}")
    if not accepts_positional(fn, 3):
        import inspect

        raise ConfigError(f"reward.function: {r.function!r} has the signature {inspect.signature(fn)}; "
                          f"it must accept 3 positional arguments: {signature}")


# ----------------------------------------------------------------------------- hyperparameter dataclasses


def _build(keys: dict[str, str], make: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``make(*args, **kwargs)``; its HyperparameterError becomes a ConfigError under the config key."""
    try:
        return make(*args, **kwargs)
    except HyperparameterError as e:
        raise ConfigError(f"{keys.get(e.field, f'{e.owner}.{e.field}')}: {e.problem}") from None


def _check_hyperparameters(cfg: Config) -> None:
    from megatron_rpp.config import hyper

    _build(hyper.ADVANTAGE_KEYS, hyper.advantage_config, cfg)
    _build(hyper.POLICY_LOSS_KEYS, hyper.policy_loss_config, cfg)
    r = cfg.rollout
    _build(hyper.SAMPLING_KEYS, hyper.sampling_config, cfg, n=r.n_samples_per_prompt, temperature=r.temperature)
    _build(hyper.EVAL_SAMPLING_KEYS, hyper.sampling_config, cfg, n=1, temperature=r.eval_temperature)


# ----------------------------------------------------------------------------- layouts


def _check_parallelism(cfg: Config) -> None:
    """The parallelism and memory switches against each other (model folders: ``layout_problems``)."""
    m = cfg.model
    if m.context_parallel_size != 1:
        raise ConfigError(
            f"model.context_parallel_size: only 1 is supported, got {m.context_parallel_size}: megatron-core 0.16.1 "
            "implements context parallelism only in Transformer Engine's attention (its local DotProductAttention "
            "asserts 1) and this trainer does not split sequences per CP rank (docs/parallelism.md)"
        )
    if m.virtual_pipeline_size > 1 and m.pipeline_parallel_size < 2:
        raise ConfigError(f"model.virtual_pipeline_size: {m.virtual_pipeline_size} needs "
                          f"model.pipeline_parallel_size > 1 (got {m.pipeline_parallel_size}); allowed here: 1")
    if m.sequence_parallel and m.tensor_parallel_size < 2:
        raise ConfigError("model.sequence_parallel: needs model.tensor_parallel_size > 1 (the sequence is split "
                          f"over the TP ranks; got {m.tensor_parallel_size}); allowed here: false")
    if m.recompute != "full" and m.recompute_num_layers != 1:
        raise ConfigError(f"model.recompute_num_layers: only used with model.recompute=full (got recompute="
                          f"{m.recompute!r}); must be 1 here, got {m.recompute_num_layers}")


def _check_batches(cfg: Config) -> None:
    m, r, t = cfg.model, cfg.rollout, cfg.trainer
    mp = m.tensor_parallel_size * m.pipeline_parallel_size
    if t.num_workers % mp:
        raise ConfigError(
            f"trainer.num_workers ({t.num_workers}) must be a multiple of model.tensor_parallel_size × "
            f"model.pipeline_parallel_size ({mp})"
        )
    dp = t.num_workers // mp
    total = r.rollout_batch_size * r.n_samples_per_prompt
    if total % t.train_batch_size:
        raise ConfigError(
            f"trainer.train_batch_size ({t.train_batch_size}) must divide rollout.rollout_batch_size × "
            f"rollout.n_samples_per_prompt ({total})"
        )
    if not t.max_tokens_per_micro_batch and t.train_batch_size % (dp * t.micro_batch_size):
        raise ConfigError(
            f"trainer.train_batch_size ({t.train_batch_size}) must be a multiple of data-parallel size ({dp}) × "
            f"trainer.micro_batch_size ({t.micro_batch_size})"
        )
    if t.train_batch_size < dp:
        raise ConfigError(f"trainer.train_batch_size ({t.train_batch_size}) must be >= the data-parallel size ({dp})")


# ----------------------------------------------------------------------------- rollout engine layout (issue 14)


def _check_engine_layout(cfg: Config) -> None:
    """Engine groups against the world and Megatron's TP; the engine model against ``config.json``
    (when local); ``trainer.offload_optimizer_during_rollout`` only where there is device memory."""
    import torch

    from megatron_rpp.config.hyper import engine_tensor_parallel_size
    from megatron_rpp.rollout.engine_layout import engine_tp_problem

    k, tp = engine_tensor_parallel_size(cfg), cfg.model.tensor_parallel_size
    problem = engine_tp_problem(cfg.trainer.num_workers, k, tp)
    if problem:
        raise ConfigError(problem)
    if cfg.trainer.offload_optimizer_during_rollout and not torch.cuda.is_available():
        raise ConfigError("trainer.offload_optimizer_during_rollout: GPU only (no CUDA device here: host memory is "
                          "all the memory there is); allowed on CPU: false")
    folder = _local_model_folder(cfg.model.hf_dir)
    if folder is None or k == 1:
        return
    from megatron_rpp.rollout.engine_layout import engine_spec
    from megatron_rpp.rollout.vllm_shards import VLLM_VOCAB_PADDING

    spec = _model_spec("model.hf_dir", folder / "config.json", tp)
    try:
        engine_spec(spec, k, tp)
    except ValueError as e:
        raise ConfigError(f"{e} ({folder / 'config.json'}, {spec.architecture})") from None
    padded_vocab = -(-spec.vocab_size // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
    for what, n in (("intermediate_size", spec.ffn_hidden_size), ("vocab_size padded to 64 by vLLM", padded_vocab)):
        if n % k:
            raise ConfigError(f"rollout.tensor_parallel_size ({k}) must divide {what} ({n}) of "
                              f"{folder / 'config.json'} (model.hf_dir)")


def _local_model_folder(hf_dir: str) -> Path | None:
    """The folder whose config.json describes ``hf_dir``, when it is on this machine already
    (``smollm2``: its materialised copy, if built); None otherwise (checked when the run starts)."""
    if hf_dir == "smollm2":
        from megatron_rpp.checkpoint.smollm2 import COMPLETE_MARKER, MODEL_DIRNAME, default_cache_root

        folder = default_cache_root() / MODEL_DIRNAME
        return folder if (folder / COMPLETE_MARKER).is_file() else None
    folder = Path(hf_dir).expanduser()
    return folder if (folder / "config.json").is_file() else None


def _check_model_folders(cfg: Config) -> None:
    from megatron_rpp.config.hyper import needs_critic

    m = cfg.model
    folders = [("model.hf_dir", m.hf_dir)]
    if cfg.reward.model_dir:
        folders.append(("reward.model_dir", cfg.reward.model_dir))
    if cfg.critic.model_dir and needs_critic(cfg):
        folders.append(("critic.model_dir", cfg.critic.model_dir))
    specs = {}
    for key, hf_dir in folders:
        folder = _local_model_folder(hf_dir)
        if folder is None:
            continue
        config_json = folder / "config.json"
        spec = specs[key] = _model_spec(key, config_json, m.tensor_parallel_size)
        problems = layout_problems(spec, m.tensor_parallel_size, m.pipeline_parallel_size, m.virtual_pipeline_size,
                                   recompute_num_layers=m.recompute_num_layers if m.recompute == "full" else 1)
        if problems:
            raise ConfigError("; ".join(f"{k}: {v} of {config_json} ({key})" for k, v in problems.items()))
        context = m.max_prompt_length + m.max_response_length
        if key == "model.hf_dir" and context > spec.max_position_embeddings:
            raise ConfigError(
                f"model.max_response_length: model.max_prompt_length + model.max_response_length ({context}) must be "
                f"<= max_position_embeddings ({spec.max_position_embeddings}) of {config_json}"
            )
    critic = specs.get("critic.model_dir")
    if critic is not None and critic.head != "score":
        raise ConfigError(f"critic.model_dir: {cfg.critic.model_dir!r} is a {critic.architecture}, not a "
                          "sequence-classification model with one score (e.g. LlamaForSequenceClassification)")
    if critic is not None and "model.hf_dir" in specs and critic.vocab_size != specs["model.hf_dir"].vocab_size:
        raise ConfigError(f"critic.model_dir: vocab_size {critic.vocab_size} differs from the policy's "
                          f"{specs['model.hf_dir'].vocab_size}: the critic reads the policy's token ids and must share "
                          "its tokenizer")


def _model_spec(key: str, config_json: Path, tp: int) -> Any:
    """The ModelSpec of a HF ``config.json`` as built at TP=``tp`` (KV groups padded, ``ModelSpec.for_tp``)."""
    from megatron_rpp.algorithms.registry import RegistryError
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.spec import UnsupportedConfigError

    try:
        hf = json.loads(config_json.read_text())
        return architecture_for_config(hf).model_spec(hf).for_tp(tp)
    except (OSError, ValueError, KeyError, TypeError, RegistryError, UnsupportedConfigError) as e:
        raise ConfigError(f"{key}: {config_json}: {type(e).__name__}: {e}") from None


def layout_problems(spec: Any, tp: int, pp: int, vpp: int = 1, *, recompute_num_layers: int = 1) -> dict[str, str]:
    """What of ``spec`` cannot be split at TP=``tp`` × PP=``pp`` (× ``vpp`` chunks per stage):
    ``{config key: problem}``.

    KV heads are padded to a multiple of ``tp`` by ``ModelSpec.for_tp`` and the vocabulary is
    padded too, so neither blocks a layout; layers must split evenly over the PP × VPP virtual
    stages (and a chunk's layers into recompute units) and the FFN over the TP ranks.
    """
    out = {}
    heads = (("num_attention_heads after KV-group padding", spec.megatron_attention_heads),
             ("intermediate_size", spec.ffn_hidden_size))
    bad_tp = [f"{what} ({n})" for what, n in heads if n % tp]
    if bad_tp:
        out["model.tensor_parallel_size"] = f"{tp} must divide {' and '.join(bad_tp)}"
    if spec.num_layers % pp:
        out["model.pipeline_parallel_size"] = f"{pp} must divide num_hidden_layers ({spec.num_layers})"
    elif spec.num_layers % (pp * vpp):
        out["model.virtual_pipeline_size"] = (f"model.pipeline_parallel_size × model.virtual_pipeline_size "
                                              f"({pp} × {vpp}) must divide num_hidden_layers ({spec.num_layers})")
    elif (spec.num_layers // (pp * vpp)) % recompute_num_layers:
        out["model.recompute_num_layers"] = (f"{recompute_num_layers} must divide the layers of one pipeline chunk, "
                                             f"num_hidden_layers / (PP × VPP) = {spec.num_layers // (pp * vpp)}")
    return out
