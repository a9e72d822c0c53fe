"""Build a Megatron-core ``GPTModel`` for a HF architecture.

``build_model(spec, groups, options=...)`` returns this rank's shard (its TP slice of its PP
stage) as :class:`~megatron_rpp.models.pipeline.ModelChunks`: one GPTModel, or with a virtual
pipeline (``groups.vpp_size`` > 1) one per model chunk, all sharing one TransformerConfig.
``build_gpt_model`` builds one chunk. The Transformer-Engine layer spec is used when TE
imports (CUDA), the local (pure torch) spec otherwise (:mod:`~megatron_rpp.models.layer_specs`).
On CPU the CPU backend must be active (``initialize_parallel`` applies it).

:class:`ModelOptions` holds the memory/parallelism switches of ``model.*`` that change how
Megatron runs the model but not its function: sequence parallelism and activation recompute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_rpp.models.spec import ModelSpec, UnsupportedConfigError
from megatron_rpp.parallel.groups import ParallelGroups

#: ``model.recompute`` -> TransformerConfig arguments. ``full`` uses Megatron's uniform method:
#: the input of every ``recompute_num_layers`` consecutive layers is kept, the rest recomputed.
RECOMPUTE: dict[str, dict] = {
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform"},
}


@dataclass(frozen=True)
class ModelOptions:
    """How Megatron runs the model (``model.sequence_parallel``, ``model.recompute``,
    ``model.recompute_num_layers``; ``config.hyper.model_options`` builds it from a config)."""

    sequence_parallel: bool = False
    recompute: str = "none"
    recompute_num_layers: int = 1

    def __post_init__(self):
        if self.recompute not in RECOMPUTE:
            raise UnsupportedConfigError(f"recompute {self.recompute!r}; supported: {', '.join(RECOMPUTE)}")
        if self.recompute_num_layers < 1:
            raise UnsupportedConfigError(f"recompute_num_layers must be >= 1, got {self.recompute_num_layers}")

    def transformer_config_args(self) -> dict:
        args = dict(RECOMPUTE[self.recompute], sequence_parallel=self.sequence_parallel)
        if self.recompute == "full":
            args["recompute_num_layers"] = self.recompute_num_layers
        return args


def te_available() -> bool:
    """True when Transformer Engine imports and CUDA is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def transformer_config(spec: ModelSpec, groups: ParallelGroups, *, dtype: torch.dtype = torch.float32,
                       options: ModelOptions = ModelOptions()):
    """The one adapter from a ModelSpec (+ parallel layout and options) to Megatron's TransformerConfig."""
    from megatron.core.transformer import TransformerConfig

    stages = groups.pp_size * groups.vpp_size
    if spec.num_layers % stages:
        raise UnsupportedConfigError(
            f"num_hidden_layers ({spec.num_layers}) must be divisible by pipeline_parallel_size ({groups.pp_size}) "
            f"x virtual_pipeline_size ({groups.vpp_size})"
        )
    if options.sequence_parallel and groups.tp_size == 1:
        raise UnsupportedConfigError("sequence_parallel needs tensor_parallel_size > 1")
    chunk_layers = spec.num_layers // stages
    if options.recompute == "full" and chunk_layers % options.recompute_num_layers:
        raise UnsupportedConfigError(
            f"recompute_num_layers ({options.recompute_num_layers}) must divide the layers of one pipeline chunk "
            f"(num_hidden_layers / (pipeline_parallel_size x virtual_pipeline_size) = {chunk_layers})"
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
        virtual_pipeline_model_parallel_size=groups.vpp_size if groups.vpp_size > 1 else None,
        **options.transformer_config_args(),
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
        # Batched p2p posts both directions to one peer at once: at PP=2 (previous = next
        # stage) the interleaved schedule's tensors then swap (seen on gloo, ENVIRONMENT.md;
        # NCCL matches p2p in posting order too). Megatron-LM also runs interleaving unbatched.
        batch_p2p_comm=on_gpu and groups.vpp_size == 1,
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # unused (dense); allgather rejects variable_seq_lengths
    )


#: ``auto`` (default): the TE spec when Transformer Engine is usable, else the local one;
#: ``local`` / ``te``: force one (``te`` without TE is an error). The GPU check builds both.
LAYER_SPEC_ENV = "MEGATRON_RPP_LAYER_SPEC"


def naming() -> str:
    """The parameter-name scheme of the layer spec :func:`build_gpt_model` uses here (the
    parameter table's ``naming``): ``"te"`` when Transformer Engine is usable, else ``"local"``
    (``$MEGATRON_RPP_LAYER_SPEC`` overrides)."""
    import os

    choice = os.environ.get(LAYER_SPEC_ENV, "auto")
    if choice not in ("auto", "local", "te"):
        raise UnsupportedConfigError(f"{LAYER_SPEC_ENV}={choice!r}; allowed: auto, local, te")
    if choice == "te" and not te_available():
        raise UnsupportedConfigError(f"{LAYER_SPEC_ENV}=te but Transformer Engine (with CUDA) is not usable here")
    if choice == "auto":
        return "te" if te_available() else "local"
    return choice


def real_vocab_size(model) -> int:
    """The real (HF) vocabulary size of a model from :func:`build_model`; its logits may be wider (padding)."""
    from megatron_rpp.parallel.gather import model_chunks

    spec = getattr(model_chunks(model)[-1], "megatron_rpp_spec", None)
    if spec is None:
        raise ValueError("model was not built by megatron_rpp.models.provider.build_model (no megatron_rpp_spec)")
    return spec.vocab_size


def build_model(spec: ModelSpec, groups: ParallelGroups, *, dtype: torch.dtype = torch.float32,
                options: ModelOptions = ModelOptions()):
    """This rank's shard of ``spec``: its ``groups.vpp_size`` model chunks (one without a virtual
    pipeline) as :class:`~megatron_rpp.models.pipeline.ModelChunks`, sharing one TransformerConfig
    (Megatron's schedules read it from the first chunk). See :func:`build_gpt_model`."""
    from megatron_rpp.models.pipeline import ModelChunks

    config = transformer_config(spec, groups, dtype=dtype, options=options)
    vp = range(groups.vpp_size) if groups.vpp_size > 1 else [None]
    return ModelChunks(build_gpt_model(spec, groups, dtype=dtype, vp_stage=v, config=config) for v in vp)


def build_gpt_model(spec: ModelSpec, groups: ParallelGroups, *, dtype: torch.dtype = torch.float32,
                    options: ModelOptions = ModelOptions(), vp_stage: int | None = None, config=None):
    """One ``GPTModel`` shard for ``spec``: the whole stage, or its model chunk ``vp_stage`` with a
    virtual pipeline (``config``: share one TransformerConfig between chunks; default: a new one
    from ``options``).

    ``spec.head == "lm"``: logits come out vocab-parallel ([B, S, V'/tp], V' =
    ``spec.megatron_vocab_size``, incl. padding); the model returns them as they are
    (``parallel_output=True``) so scoring never gathers the vocabulary. Columns at and
    beyond ``spec.vocab_size`` are padding: pass ``vocab_size=spec.vocab_size`` (see
    :func:`real_vocab_size`) to the log-prob kernels, which mask them.
    ``spec.head == "score"`` (a reward model): the last stage's output layer is a
    :class:`~megatron_rpp.models.reward_model.ScalarHead` and the model returns scores
    [B, S, 1], the same on every TP rank. (GPTModel first builds its vocabulary head; it
    is dropped at once, so the peak briefly holds one vocabulary shard more.)

    The built model is checked against the architecture's parameter table in the layer spec's
    naming scheme (names, TP splits, shard shapes:
    :func:`~megatron_rpp.models.architectures.table.bind_params`), which also marks each
    parameter's ``tp_gated`` layout; ``spec`` is kept as ``model.megatron_rpp_spec``, the map of
    its parameter names onto the canonical scheme as ``model.megatron_rpp_canonical``. On CUDA
    the model is moved to the current device.
    """
    from megatron_rpp.models.architectures import get_architecture
    from megatron_rpp.models.architectures.table import bind_params, canonical_names
    from megatron_rpp.models.layer_specs import DECODER_SPECS
    from megatron.core.models.gpt import GPTModel

    if spec.head not in ("lm", "score"):
        raise UnsupportedConfigError(f"unknown model head {spec.head!r} (supported: 'lm', 'score')")
    if spec.head == "score" and spec.tie_word_embeddings:
        raise UnsupportedConfigError("a score head is never tied to the embedding (tie_word_embeddings must be false)")
    if (vp_stage is None) != (groups.vpp_size == 1) or (vp_stage is not None and not 0 <= vp_stage < groups.vpp_size):
        raise ValueError(f"vp_stage {vp_stage} with virtual_pipeline_size {groups.vpp_size} "
                         "(build every chunk with build_model)")
    config = config or transformer_config(spec, groups, dtype=dtype, options=options)
    scheme = naming()
    chunk = vp_stage or 0
    model = GPTModel(
        config=config,
        transformer_layer_spec=DECODER_SPECS[scheme](spec, config, vp_stage),
        vocab_size=spec.megatron_vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=groups.is_first_stage and chunk == 0,
        post_process=groups.is_last_stage and chunk == groups.vpp_size - 1,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(spec.rotary_base),
        vp_stage=vp_stage,
    )
    if hasattr(model, "rotary_pos_emb"):
        # Exactly transformers' frequencies (rotary_base as float, llama3 scaling with
        # all four of the config's parameters, not only the factor).
        model.rotary_pos_emb.inv_freq = spec.rotary_inv_freq().to(model.rotary_pos_emb.inv_freq.device)
    if spec.head == "score" and model.post_process:
        from megatron_rpp.models.reward_model import ScalarHead

        model.output_layer = ScalarHead(spec.hidden_size, spec.num_labels, dtype,
                                        tp_group=groups.tp_group if config.sequence_parallel else None)
    table = get_architecture(spec.architecture).param_table(spec, naming=scheme)
    bind_params(model, table, groups.tp_size)
    model.megatron_rpp_spec = spec
    model.megatron_rpp_canonical = canonical_names(scheme)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
