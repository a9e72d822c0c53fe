"""Every check of a loaded config, run once by :func:`load_config`, before anything is built.

What is checked (each failure is a :class:`ConfigError` naming the key and what is allowed):

- enumerated values (``model.dtype``, ``data.source``, KL estimators, loss aggregation, ...);
- the range of every numeric field (``RANGES``, ``AT_LEAST``, ``SEEDS`` and ``SPECIAL``; a unit test
  proves that every numeric field of the schema is in one of them);
- plug-ins: ``algorithm.estimator`` and ``reward.function`` are resolved through their
  registries (``file.py:fn`` files are imported) and type-checked (callable, number of
  arguments); an estimator whose registry entry says ``needs_values`` is refused until the
  trainer builds a critic;
- the algorithm, loss and sampling hyperparameter dataclasses are built from the config
  (:mod:`megatron_rpp.config.hyper`, the same builders the trainer uses), so their own checks
  run now; their errors are reported under the config key;
- layouts: ``trainer.num_workers`` against TP × PP, batch divisibility, and, when
  ``model.hf_dir`` (or ``reward.model_dir``) is a local folder with ``config.json``, layers,
  heads and FFN size against the TP/PP sizes and the context length against
  ``max_position_embeddings``.

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
    "model.tensor_parallel_size": 1, "model.pipeline_parallel_size": 1, "model.max_prompt_length": 1,
    "model.max_response_length": 1, "data.num_train_prompts": 1, "data.num_eval_prompts": 0,
    "reward.num_workers": 0, "reward.remote_max_retries": 0, "reward.remote_batch_size": 1,
    "rollout.n_samples_per_prompt": 1, "rollout.rollout_batch_size": 1, "rollout.bucket_mb": 1,
    "rollout.check_sync_interval": 0, "trainer.steps": 1, "trainer.train_batch_size": 1,
    "trainer.micro_batch_size": 1, "trainer.num_epochs": 1, "trainer.num_workers": 1,
    "trainer.eval_interval": 0, "trainer.save_interval": 0, "trainer.keep_checkpoints": 1,
    "trainer.max_nonfinite_steps_in_a_row": 1, "trainer.max_tokens_per_micro_batch": 0,
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
    "algorithm.gamma": UNIT, "algorithm.kl_coef": NON_NEGATIVE, "algorithm.clip_low": (0, 1, False, True),
    "algorithm.clip_high": NON_NEGATIVE, "algorithm.tis_cap": NON_NEGATIVE, "algorithm.entropy_coef": NON_NEGATIVE,
    "rollout.temperature": POSITIVE, "rollout.top_p": UNIT, "rollout.eval_temperature": NON_NEGATIVE,
    "rollout.kv_cache_gib": POSITIVE, "rollout.gpu_memory_utilization": UNIT, "rollout.check_sync_tolerance": POSITIVE,
    "trainer.lr": POSITIVE, "trainer.weight_decay": NON_NEGATIVE, "trainer.clip_grad": POSITIVE,
}
#: Fields with an "off" value outside their range: key -> (test, words).
SPECIAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "algorithm.dual_clip": (lambda v: v == 0 or 1 < v < INF, "0 (off) or a finite number > 1"),
    "rollout.top_k": (lambda v: v == -1 or v >= 1, "-1 (off) or an integer >= 1"),
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
    _check_reward(cfg)
    _check_hyperparameters(cfg)
    _check_batches(cfg)
    _check_model_folders(cfg)


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

    a = cfg.algorithm
    _choice("model.dtype", cfg.model.dtype, ["fp32", "bf16"])
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
    """Registered or plug-in; refused when its entry needs critic values (no critic is built yet)."""
    from megatron_rpp.algorithms.advantages import ADVANTAGE_ESTIMATORS as REG

    name = cfg.algorithm.estimator
    usable = [n for n in REG.names() if not REG.get(n).needs_values]
    plugin = "or a plug-in 'file.py:fn' / 'pkg.module:fn'"
    if ":" not in name and name not in REG:
        raise ConfigError(f"algorithm.estimator: invalid value {name!r}; allowed values: {', '.join(usable)}, {plugin}")
    entry = _resolve("algorithm.estimator", REG, name)
    if entry.needs_values:
        raise ConfigError(
            f"algorithm.estimator: {name!r} needs a critic/value model (its registry entry has needs_values=True), "
            f"which this trainer does not build yet; allowed values: {', '.join(usable)}, or a plug-in estimator "
            "without needs_values"
        )
    if entry.uses_groups and cfg.rollout.n_samples_per_prompt < 2:
        raise ConfigError(
            f"rollout.n_samples_per_prompt: must be >= 2 for the group estimator {name!r} (its baseline is computed "
            f"over the samples of one prompt), got {cfg.rollout.n_samples_per_prompt}"
        )


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
    m = cfg.model
    folders = [("model.hf_dir", m.hf_dir)]
    if cfg.reward.model_dir:
        folders.append(("reward.model_dir", cfg.reward.model_dir))
    for key, hf_dir in folders:
        folder = _local_model_folder(hf_dir)
        if folder is None:
            continue
        config_json = folder / "config.json"
        spec = _model_spec(key, config_json, m.tensor_parallel_size)
        problems = layout_problems(spec, m.tensor_parallel_size, m.pipeline_parallel_size)
        if problems:
            raise ConfigError("; ".join(f"{k}: {v} of {config_json} ({key})" for k, v in problems.items()))
        context = m.max_prompt_length + m.max_response_length
        if key == "model.hf_dir" and context > spec.max_position_embeddings:
            raise ConfigError(
                f"model.max_response_length: model.max_prompt_length + model.max_response_length ({context}) must be "
                f"<= max_position_embeddings ({spec.max_position_embeddings}) of {config_json}"
            )


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


def layout_problems(spec: Any, tp: int, pp: int) -> dict[str, str]:
    """What of ``spec`` cannot be split at TP=``tp`` × PP=``pp``: ``{config key: problem}``.

    KV heads are padded to a multiple of ``tp`` by ``ModelSpec.for_tp`` and the vocabulary is
    padded too, so neither blocks a layout; layers must split evenly over the PP stages and the
    FFN over the TP ranks.
    """
    out = {}
    heads = (("num_attention_heads after KV-group padding", spec.megatron_attention_heads),
             ("intermediate_size", spec.ffn_hidden_size))
    bad_tp = [f"{what} ({n})" for what, n in heads if n % tp]
    if bad_tp:
        out["model.tensor_parallel_size"] = f"{tp} must divide {' and '.join(bad_tp)}"
    if spec.num_layers % pp:
        out["model.pipeline_parallel_size"] = f"{pp} must divide num_hidden_layers ({spec.num_layers})"
    return out
