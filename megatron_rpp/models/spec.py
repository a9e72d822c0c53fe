"""ModelSpec: the architecture of a decoder-only LM, read from a HF ``config.json``.

A ModelSpec is what the model provider needs to build a Megatron ``GPTModel``; it is
produced by the architecture registered under the config's ``architectures[0]``.
Any config field this project does not implement is an error that names it: a
silently different model is the worst outcome of a converter.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch


class UnsupportedConfigError(ValueError):
    """A HF config asks for something megatron_rpp does not implement."""


#: Megatron's ``make_vocab_size_divisible_by`` (its default, 128): :meth:`ModelSpec.for_tp`
#: pads the vocabulary to a multiple of this times the TP size, at TP=1 too, as Megatron does
#: (matmul-friendly shard widths). A constant for now; checkpoints record their padded shapes
#: (and readers take the padding from there), so a configurable divisor can come later.
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyperparameters shared by the Llama family (Llama, Qwen2, Qwen3)."""

    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    rotary_base: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    #: ``"lm"`` (a language-model head over the vocabulary) or ``"score"`` (a scalar
    #: head, e.g. a Bradley-Terry reward model).
    head: str = "lm"
    num_labels: int = 1
    #: KV groups the Megatron model is built with, when more than ``num_query_groups``
    #: (see :meth:`for_tp`); None means no padding. Padded groups are appended after the
    #: real ones with all-zero Q/K/V (and bias) rows and all-zero ``linear_proj`` columns.
    padded_query_groups: int | None = None
    #: Vocabulary rows of the Megatron model's embedding and output layer, when more than
    #: ``vocab_size`` (see :meth:`for_tp`); None means no padding. Padded rows are appended
    #: after the real ones, all zero; no token id reaches them and the log-prob kernels mask
    #: their logits (``vocab_size=``), so they get no probability mass and no gradient.
    padded_vocab_size: int | None = None

    @property
    def megatron_vocab_size(self) -> int:
        """Vocabulary rows of the Megatron model (real + padding); ``vocab_size`` is the real (HF) one."""
        return self.padded_vocab_size or self.vocab_size

    @property
    def megatron_query_groups(self) -> int:
        """KV groups of the Megatron model (real + padding)."""
        return self.padded_query_groups or self.num_query_groups

    @property
    def megatron_attention_heads(self) -> int:
        """Query heads of the Megatron model (real + padding); heads per group is unchanged."""
        return self.megatron_query_groups * (self.num_attention_heads // self.num_query_groups)

    def for_tp(self, tp: int) -> "ModelSpec":
        """This spec as built at tensor-parallel size ``tp``.

        When ``tp`` does not divide the KV groups, zero groups (each with its
        ``num_attention_heads / num_key_value_heads`` query heads) are added up to the next
        multiple of ``tp``. The padded heads contribute exactly nothing: with zero Q, K and V
        their attention output is zero, their ``linear_proj`` columns are zero, and every
        gradient reaching those weights is zero, so they stay zero in training. The HF
        mapping (``Architecture.to_hf``) drops them. Example: SmolLM2-135M (9 heads, 3 KV
        groups) at tp=2 is built with 12 heads in 4 groups.

        The vocabulary is padded like Megatron's (``_vocab_size_with_padding``): to the next
        multiple of :data:`MAKE_VOCAB_SIZE_DIVISIBLE_BY` x ``tp``, at tp=1 too. Example:
        GPT-2's 50257 becomes 50304 at tp=1, 50432 at tp=2, 51200 at tp=8; SmolLM2's 49152
        needs none up to tp=128, Llama-3's 128256 none at tp <= 2 (128512 at tp=4). The padded rows are zero (embedding and an
        untied output layer); HF exports and the weight sync drop them.
        """
        g = self.num_query_groups
        padded = -(-g // tp) * tp
        multiple = MAKE_VOCAB_SIZE_DIVISIBLE_BY * tp
        vocab = -(-self.vocab_size // multiple) * multiple
        return replace(
            self,
            padded_query_groups=padded if padded != g else None,
            padded_vocab_size=vocab if vocab != self.vocab_size else None,
        )

    def rotary_inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies exactly as transformers computes them.

        Shape: [kv_channels / 2] fp32.
        """
        dim = self.kv_channels
        inv_freq = 1.0 / (
            self.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim)
        )
        rs = self.rope_scaling
        if rs is None:
            return inv_freq
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)


def load_hf_config(path_or_dict: str | Path | Mapping[str, Any]) -> dict:
    """A HF config as a dict, from a model folder, a ``config.json`` path or a dict."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    p = Path(path_or_dict)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"no HF config at {p}")
    with open(p) as f:
        return json.load(f)


def _rope_scaling(cfg: Mapping[str, Any]) -> RopeScaling | None:
    rs = cfg.get("rope_scaling")
    if rs is None:
        # transformers 5 moves rope settings under rope_parameters.
        rp = cfg.get("rope_parameters") or {}
        if rp.get("rope_type", "default") in ("default", None):
            return None
        rs = rp
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        arch = (cfg.get("architectures") or ["?"])[0]
        raise UnsupportedConfigError(
            f"{arch}: rope_scaling type {kind!r} is not supported (supported: 'default', 'llama3')"
        )
    return RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    rp = cfg.get("rope_parameters") or {}
    return float(rp.get("rope_theta", 10000.0))


def llama_family_spec(
    cfg: Mapping[str, Any], *, add_qkv_bias: bool, qk_layernorm: bool, head: str = "lm"
) -> ModelSpec:
    """Read the fields shared by Llama/Qwen2/Qwen3 configs, rejecting what we do not build."""
    arch = (cfg.get("architectures") or ["?"])[0]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfigError(f"{arch}: hidden_act {act!r} is not supported (supported: 'silu')")
    if cfg.get("attention_bias", False) and not add_qkv_bias:
        raise UnsupportedConfigError(f"{arch}: attention_bias=true is not supported")
    if cfg.get("mlp_bias", False):
        raise UnsupportedConfigError(f"{arch}: mlp_bias=true is not supported")
    if cfg.get("use_sliding_window", False):
        raise UnsupportedConfigError(f"{arch}: use_sliding_window=true is not supported")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise UnsupportedConfigError(f"{arch}: pretraining_tp={cfg['pretraining_tp']} is not supported")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    spec = ModelSpec(
        architecture=arch,
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        kv_channels=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        rotary_base=_rope_theta(cfg),
        rope_scaling=_rope_scaling(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        add_qkv_bias=add_qkv_bias,
        qk_layernorm=qk_layernorm,
    )
    return with_score_head(spec, cfg) if head == "score" else spec


def with_score_head(spec: ModelSpec, cfg: Mapping[str, Any]) -> ModelSpec:
    """``spec`` with a scalar score head instead of the LM head (HF ``*ForSequenceClassification``).

    The score head is never tied to the embedding (sequence classifiers have no lm_head),
    and only one output is supported: a Bradley-Terry reward model's score.
    """
    num_labels = _num_labels(cfg)
    if num_labels != 1:
        raise UnsupportedConfigError(
            f"{spec.architecture}: num_labels={num_labels} is not supported "
            "(a reward model has one score; supported: 1)"
        )
    return replace(spec, head="score", num_labels=1, tie_word_embeddings=False)


def _num_labels(cfg: Mapping[str, Any]) -> int:
    """Outputs of a HF sequence-classification head: ``num_labels``, else ``len(id2label)``,
    else transformers' default of 2."""
    if cfg.get("num_labels") is not None:
        return int(cfg["num_labels"])
    return len(cfg["id2label"]) if cfg.get("id2label") else 2
