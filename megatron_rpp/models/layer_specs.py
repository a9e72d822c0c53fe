"""The Megatron layer specs the provider builds from, one per parameter-naming scheme.

- ``"local"`` (CPU, and CUDA without Transformer Engine): megatron-core's
  ``get_gpt_layer_local_spec`` (pure torch modules) with its norms replaced by
  :class:`RMSNorm` / :class:`HeadRMSNorm`, and a block spec whose final norm is an
  :class:`RMSNorm` too. megatron-core's own torch norm (``WrappedTorchNorm``) refuses sequence
  parallelism outright and is always built in fp32; these norms are ``torch.nn.RMSNorm`` in the
  model's ``params_dtype`` and mark their weight ``sequence_parallel`` when the model is, which
  is how Megatron's ``finalize_model_grads`` knows to sum their gradients over the TP group
  (each TP rank then normalises only its slice of the sequence). Numerically they are the
  same ``torch.nn.RMSNorm`` megatron-core would build.
- ``"te"`` (CUDA with Transformer Engine): ``get_gpt_layer_with_transformer_engine_spec`` as
  it is; TE's fused LayerNorm+Linear modules and ``TENorm`` support sequence parallelism.

The names of the parameters each spec makes are the parameter table's ``MEGATRON_NAMES``.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from megatron_rpp.models.spec import ModelSpec


class RMSNorm:
    """A layer spec's norm over the hidden size (input, pre-MLP and final norm): ``torch.nn.RMSNorm``
    in ``config.params_dtype``, its weight marked ``sequence_parallel`` under sequence parallelism.

    Called by megatron-core's ``build_module`` like ``WrappedTorchNorm`` (same arguments)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise NotImplementedError(f"normalization {config.normalization!r} (zero-centred: "
                                      f"{config.layernorm_zero_centered_gamma}); supported: RMSNorm")
        norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        norm.weight.sequence_parallel = bool(config.sequence_parallel) and cls._sequence_sharded
        return norm

    _sequence_sharded = True


class HeadRMSNorm(RMSNorm):
    """QK-norm over one head's channels: its input (after the column-parallel QKV projection) is
    never sequence-sharded, so its weight is not marked (Megatron sums QK-norm gradients over TP anyway)."""

    _sequence_sharded = False


def local_layer_spec(spec: ModelSpec):
    """megatron-core's local GPT layer spec with :class:`RMSNorm` / :class:`HeadRMSNorm` norms."""
    from megatron.core.models.gpt import gpt_layer_specs

    layer = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")
    attention = layer.submodules.self_attention
    if spec.qk_layernorm:
        attention = replace(attention, submodules=replace(attention.submodules, q_layernorm=HeadRMSNorm,
                                                          k_layernorm=HeadRMSNorm))
    return replace(layer, submodules=replace(layer.submodules, input_layernorm=RMSNorm, self_attention=attention,
                                             pre_mlp_layernorm=RMSNorm))


def local_block_spec(spec: ModelSpec, config, vp_stage: int | None):
    """The decoder block of one model chunk: :func:`local_layer_spec` layers and an :class:`RMSNorm` final norm."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[local_layer_spec(spec)] * layers, layer_norm=RMSNorm)


def te_layer_spec(spec: ModelSpec):
    """megatron-core's Transformer-Engine GPT layer spec (needs TE)."""
    from megatron.core.models.gpt import gpt_layer_specs

    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_layernorm)


#: naming scheme -> what ``GPTModel(transformer_layer_spec=...)`` gets: ``f(spec, config, vp_stage)``.
DECODER_SPECS = {
    "local": local_block_spec,
    "te": lambda spec, config, vp_stage: te_layer_spec(spec),
}
