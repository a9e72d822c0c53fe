"""Build a Megatron-core ``GPTModel`` for a HF architecture.

``build_gpt_model(spec, groups)`` returns this rank's shard (its TP slice of its PP
stage). The Transformer-Engine layer spec is used when TE imports, the local (pure
torch) spec otherwise. On CPU the local spec is always used and the CPU backend must
be active (``initialize_parallel`` applies it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_rpp.models.spec import ModelSpec, UnsupportedConfigError
from megatron_rpp.parallel.groups import ParallelGroups


def te_available() -> bool:
    """True when Transformer Engine imports and CUDA is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def transformer_config(spec: ModelSpec, groups: ParallelGroups, *, dtype: torch.dtype = torch.float32):
    """The one adapter from a ModelSpec (+ parallel layout) to Megatron's TransformerConfig."""
    from megatron.core.transformer import TransformerConfig

    if spec.num_layers % groups.pp_size:
        raise UnsupportedConfigError(
            f"num_hidden_layers ({spec.num_layers}) must be divisible by pipeline_parallel_size ({groups.pp_size})"
        )
    if spec.megatron_attention_heads % groups.tp_size or spec.megatron_query_groups % groups.tp_size:
        raise UnsupportedConfigError(
            f"tensor_parallel_size ({groups.tp_size}) must divide num_attention_heads "
            f"({spec.megatron_attention_heads}) and num_key_value_heads ({spec.megatron_query_groups}); "
            f"build from spec.for_tp({groups.tp_size}) to pad KV groups"
        )
    if spec.megatron_vocab_size % groups.tp_size:
        raise UnsupportedConfigError(
            f"tensor_parallel_size ({groups.tp_size}) must divide the vocabulary ({spec.megatron_vocab_size} rows); "
            f"build from spec.for_tp({groups.tp_size}) to pad it"
        )
    if spec.ffn_hidden_size % groups.tp_size:
        raise UnsupportedConfigError(
            f"tensor_parallel_size ({groups.tp_size}) must divide intermediate_size ({spec.ffn_hidden_size})"
        )
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.megatron_attention_heads,
        num_query_groups=spec.megatron_query_groups,
        kv_channels=spec.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.add_qkv_bias,
        qk_layernorm=spec.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # Fused kernels are CUDA-only; the unfused paths are exact.
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=False,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # gloo: batched p2p swaps tensors when previous and next peer are the same rank.
        batch_p2p_comm=on_gpu,
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # unused (dense); allgather rejects variable_seq_lengths
    )


def _naming() -> str:
    """The parameter-name scheme of :func:`layer_spec`'s modules (the parameter table's ``naming``)."""
    return "te" if te_available() else "local"


def real_vocab_size(model) -> int:
    """The real (HF) vocabulary size of a model from :func:`build_gpt_model`; its logits may be wider (padding)."""
    from megatron_rpp.models.pipeline import unwrap

    spec = getattr(unwrap(model), "megatron_rpp_spec", None)
    if spec is None:
        raise ValueError("model was not built by megatron_rpp.models.provider.build_gpt_model (no megatron_rpp_spec)")
    return spec.vocab_size


def layer_spec(spec: ModelSpec):
    from megatron.core.models.gpt import gpt_layer_specs

    if te_available():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")


def build_gpt_model(spec: ModelSpec, groups: ParallelGroups, *, dtype: torch.dtype = torch.float32):
    """This rank's ``GPTModel`` shard for ``spec``.

    ``spec.head == "lm"``: logits come out vocab-parallel ([B, S, V'/tp], V' =
    ``spec.megatron_vocab_size``, incl. padding); the model returns them as they are
    (``parallel_output=True``) so scoring never gathers the vocabulary. Columns at and
    beyond ``spec.vocab_size`` are padding: pass ``vocab_size=spec.vocab_size`` (see
    :func:`real_vocab_size`) to the log-prob kernels, which mask them.
    ``spec.head == "score"`` (a reward model): the last stage's output layer is a
    :class:`~megatron_rpp.models.reward_model.ScalarHead` and the model returns scores
    [B, S, 1], the same on every TP rank. (GPTModel first builds its vocabulary head; it
    is dropped at once, so the peak briefly holds one vocabulary shard more.)

    The built model is checked against the architecture's parameter table (names, TP
    splits, shard shapes: :func:`~megatron_rpp.models.architectures.table.bind_params`),
    which also marks each parameter's ``tp_gated`` layout; ``spec`` is kept as
    ``model.megatron_rpp_spec``.
    """
    from megatron_rpp.models.architectures import get_architecture
    from megatron_rpp.models.architectures.table import bind_params
    from megatron.core.models.gpt import GPTModel

    if spec.head not in ("lm", "score"):
        raise UnsupportedConfigError(f"unknown model head {spec.head!r} (supported: 'lm', 'score')")
    if spec.head == "score" and spec.tie_word_embeddings:
        raise UnsupportedConfigError("a score head is never tied to the embedding (tie_word_embeddings must be false)")
    config = transformer_config(spec, groups, dtype=dtype)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec),
        vocab_size=spec.megatron_vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(spec.rotary_base),
    )
    if hasattr(model, "rotary_pos_emb"):
        # Exactly transformers' frequencies (rotary_base as float, llama3 scaling with
        # all four of the config's parameters, not only the factor).
        model.rotary_pos_emb.inv_freq = spec.rotary_inv_freq().to(model.rotary_pos_emb.inv_freq.device)
    if spec.head == "score" and groups.is_last_stage:
        from megatron_rpp.models.reward_model import ScalarHead

        model.output_layer = ScalarHead(spec.hidden_size, spec.num_labels, dtype)
    table = get_architecture(spec.architecture).param_table(spec, naming=_naming())
    bind_params(model, table, groups.tp_size)
    model.megatron_rpp_spec = spec
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
