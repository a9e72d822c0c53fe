"""Cross-field and enumerated-value checks, run once by :func:`load_config`."""
from __future__ import annotations

from megatron_rpp.config.schema import Config



def _choice(path: str, value, allowed) -> None:
    from megatron_rpp.config.loader import ConfigError

    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{path}: invalid value {value!r}; allowed values: {', '.join(map(str, allowed))}")


def _positive(path: str, value, *, allow_zero: bool = False) -> None:
    from megatron_rpp.config.loader import ConfigError

    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: Config) -> None:
    from megatron_rpp.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from megatron_rpp.algorithms.aggregation import AGGREGATIONS
    from megatron_rpp.algorithms.kl import KL_ESTIMATORS
    from megatron_rpp.config.loader import ConfigError

    m, r, a, t, d = cfg.model, cfg.rollout, cfg.algorithm, cfg.trainer, cfg.data
    _choice("model.dtype", m.dtype, ["fp32", "bf16"])
    _choice("data.source", d.source, ["reasoning_gym", "jsonl", "parquet"])
    _choice("algorithm.estimator", a.estimator, [n for n in ADVANTAGE_ESTIMATORS.names() if n != "gae"])
    _choice("algorithm.kl_estimator", a.kl_estimator, KL_ESTIMATORS.names())
    _choice("algorithm.kl_loss_estimator", a.kl_loss_estimator, KL_ESTIMATORS.names())
    _choice("algorithm.loss_agg_mode", a.loss_agg_mode, AGGREGATIONS.names())
    _choice("algorithm.whiten", a.whiten, ["", "token", "mean", "none"])
    for path, v in [
        ("model.tensor_parallel_size", m.tensor_parallel_size),
        ("model.pipeline_parallel_size", m.pipeline_parallel_size),
        ("model.max_prompt_length", m.max_prompt_length),
        ("model.max_response_length", m.max_response_length),
        ("rollout.n_samples_per_prompt", r.n_samples_per_prompt),
        ("rollout.rollout_batch_size", r.rollout_batch_size),
        ("rollout.temperature", r.temperature),
        ("rollout.bucket_mb", r.bucket_mb),
        ("trainer.steps", t.steps),
        ("trainer.train_batch_size", t.train_batch_size),
        ("trainer.micro_batch_size", t.micro_batch_size),
        ("trainer.num_epochs", t.num_epochs),
        ("trainer.lr", t.lr),
        ("trainer.num_workers", t.num_workers),
        ("trainer.keep_checkpoints", t.keep_checkpoints),
        ("trainer.max_nonfinite_steps_in_a_row", t.max_nonfinite_steps_in_a_row),
        ("reward.clip", cfg.reward.clip),
        ("reward.model_std", cfg.reward.model_std),
        ("reward.remote_timeout_s", cfg.reward.remote_timeout_s),
        ("reward.remote_batch_size", cfg.reward.remote_batch_size),
    ]:
        _positive(path, v)
    for path, v in [
        ("algorithm.kl_coef", a.kl_coef),
        ("algorithm.entropy_coef", a.entropy_coef),
        ("algorithm.tis_cap", a.tis_cap),
        ("rollout.eval_temperature", r.eval_temperature),
        ("trainer.eval_interval", t.eval_interval),
        ("trainer.save_interval", t.save_interval),
        ("rollout.check_sync_interval", r.check_sync_interval),
        ("reward.num_workers", cfg.reward.num_workers),
        ("reward.remote_max_retries", cfg.reward.remote_max_retries),
        ("data.num_eval_prompts", d.num_eval_prompts),
    ]:
        _positive(path, v, allow_zero=True)
    if a.dual_clip and a.dual_clip <= 1.0:
        raise ConfigError(f"algorithm.dual_clip: must be > 1 (or 0 to disable), got {a.dual_clip}")
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
    if t.train_batch_size % (dp * t.micro_batch_size):
        raise ConfigError(
            f"trainer.train_batch_size ({t.train_batch_size}) must be a multiple of data-parallel size ({dp}) × "
            f"trainer.micro_batch_size ({t.micro_batch_size})"
        )
    if not t.resume:
        raise ConfigError("trainer.resume: must not be empty; allowed values: none, auto, or a checkpoint folder path")
    if d.source in ("jsonl", "parquet") and not d.path:
        raise ConfigError(f"data.path: required when data.source is {d.source!r}")
    if cfg.reward.model_dir and cfg.reward.remote_url:
        raise ConfigError("reward.model_dir: cannot be combined with reward.remote_url (set one reward source)")
    if cfg.reward.remote_url and not cfg.reward.remote_url.startswith(("http://", "https://")):
        raise ConfigError(f"reward.remote_url: must start with http:// or https://, got {cfg.reward.remote_url!r}")
