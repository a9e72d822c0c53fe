"""The memory terms of one rank, in bytes: pure arithmetic on counts and shapes.

Letters (per rank): P parameter elements, s tokens per sequence, b sequences per
micro-batch, h hidden, f FFN size, n query heads, g KV groups, d head dim, t = TP, e bytes per
element of the training dtype (4 fp32, 2 bf16); n_t = n/t, g_t = g/t, f_t = f/t (Megatron's
padded heads/groups). sbh = s*b*h.

Where each formula comes from is written under it. The activation formulas of the local
layer spec are what each module of Megatron-core 0.16.1's local-spec forward saves for
backward (read from the code, and checked tensor by tensor with
``torch.autograd.graph.saved_tensors_hooks`` on a real model:
``tests/distributed/test_plan_activations.py``). The Transformer-Engine spec (GPU) is
written from TE's forward, not measured here (no GPU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
FP32 = 4
GRAD_BYTES = 4
"""Megatron DDP's gradient buffer: ``grad_reduce_in_fp32=True`` (trainer/optim.py), any dtype."""


# ----------------------------------------------------------------------------- model state


def weight_bytes(elements: int, dtype: str) -> int:
    """Parameters in the training dtype: ``P * e``."""
    return elements * DTYPE_BYTES[dtype]


def grad_buffer_bytes(elements: int) -> int:
    """Megatron DDP's contiguous gradient buffer, fp32: ``4 * P``.

    Not sharded by the distributed optimizer (it reduce-scatters into this full-size buffer).
    """
    return elements * GRAD_BYTES


def optimizer_bytes(elements: int, dtype: str, *, dp: int, distributed: bool) -> int:
    """Megatron's Adam: fp32 ``exp_avg`` + ``exp_avg_sq`` (8 bytes/param), plus fp32 master
    weights when the parameters are bf16 (``Float16OptimizerWithFloat16Params``: 4 more), so
    12 bytes/param in bf16 training and 8 in fp32 (where the master weights are the
    parameters). The distributed optimizer shards all of it over the DP ranks: ``/ dp``.
    (The main gradients are the fp32 DDP buffer itself, no copy.)
    """
    per_param = 8 + (4 if dtype != "fp32" else 0)
    return math.ceil(elements * per_param / (dp if distributed else 1))


def optimizer_step_bytes(largest: int, device: str) -> int:
    """Transient of ``optimizer.step()``: torch's single-tensor Adam on CPU makes two fp32
    temporaries of a parameter's size (denominator, update); the fused multi-tensor Adam
    on GPU works in place (0)."""
    return 2 * FP32 * largest if device == "cpu" else 0


def grad_check_term_bytes(activations: int, logprob: int, step: int, device: str) -> int:
    """The training phase's bytes after the backward, beyond its ``activations`` and
    ``logprob_workspace`` terms: ``optimizer.step``'s temporaries (:func:`optimizer_step_bytes`).
    The gradient check before it (``trainer.optim.all_finite``, one ``aminmax`` reduction per
    gradient buffer) makes no element-sized temporary; it used to be ``torch.isfinite(g).all()``,
    7 bytes/param alive together (``abs`` fp32 + three bool tensors; measured with
    ``benchmarks/probe_train_memory.py``), the largest transient of the step.

    CPU: all of it, on top of the activations: glibc keeps the freed activations resident
    (their tensors are below its mmap threshold, at most 32 MiB, and free chunks inside the
    heap go back to the OS only through ``malloc_trim``), while the step's large temporaries
    are new mappings. GPU: only what exceeds the backward's peak (PyTorch's caching allocator
    frees its cached activation blocks and retries before it reports an out-of-memory).
    """
    if device == "cpu":
        return step
    return max(0, step - activations - logprob)


# ----------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class LayerShape:
    """One transformer layer as built on one TP rank (padded heads/groups, Megatron's)."""

    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    tp: int
    vocab_shard: int
    """Output-layer rows on this rank (V'/tp, padding included)."""

    @property
    def n_t(self) -> int:
        return self.heads // self.tp

    @property
    def g_t(self) -> int:
        return self.groups // self.tp

    @property
    def f_t(self) -> int:
        return self.ffn // self.tp

    @property
    def gqa(self) -> bool:
        """Megatron's local attention repeats K/V to every query head when heads > groups."""
        return self.heads > self.groups


def _sbh(shape: LayerShape, tokens: int, e: int, sequence_parallel: bool) -> int:
    """Bytes of one [s, b, h] tensor of the residual stream (split over TP with SP)."""
    return tokens * shape.hidden * e // (shape.tp if sequence_parallel else 1)


def local_attention_core_bytes(shape: LayerShape, s: int, b: int, e: int) -> int:
    """What Megatron's local ``DotProductAttention`` saves for backward (no recompute).

    q for ``baddbmm`` [b n_t, s, d]; K and V repeated to every head (GQA; ``repeat_interleave``
    makes new tensors; without GQA K is the RoPE output and V a view of the QKV output, whose
    whole storage [s, b, (n_t + 2 g_t) d] is kept); the softmax output [b, n_t, s, s] (fp32
    with ``attention_softmax_in_fp32``; in bf16 the bf16 copy ``bmm`` saves too: 4 + 2 bytes);
    the causal mask [s, s] (bool).
    """
    sb, d = s * b, shape.head_dim
    q = sb * shape.n_t * d * e
    if shape.gqa:
        kv = 2 * sb * shape.n_t * d * e
    else:
        kv = sb * shape.n_t * d * e + sb * (shape.n_t + 2 * shape.g_t) * d * e
    probs = b * shape.n_t * s * s * (FP32 + (e if e != FP32 else 0))
    return q + kv + probs + s * s


def local_layer_saved_bytes(shape: LayerShape, s: int, b: int, e: int, *, recompute: str,
                            sequence_parallel: bool = False) -> int:
    """Bytes one local-spec transformer layer keeps for backward for one micro-batch [s, b].

    Per module (Megatron-core 0.16.1, ``get_gpt_layer_local_spec``):

    - each RMSNorm (``torch.nn.RMSNorm``, twice): its input and the normalised x*rstd
      (2 sbh e) and rstd [s, b, 1] fp32;
    - ``linear_qkv`` and ``linear_fc1``: their input (sbh e each; with SP the TP-split input,
      re-gathered in backward);
    - RoPE: cos and sin for q and for k, [s, 1, 1, d] each (4 s d e);
    - core attention: :func:`local_attention_core_bytes`; ``linear_proj``: its input, the
      context [s, b, n_t d];
    - the gated MLP: ``linear_fc1``'s output [s, b, 2 f_t] (kept by ``silu`` through the
      gate view), ``silu(gate)`` and ``up + glu_linear_offset`` (kept by the product,
      [s, b, f_t] each), and ``linear_fc2``'s input, the product [s, b, f_t].

    ``recompute``: ``selective`` checkpoints the core attention, which then keeps only its
    inputs q [s, b, n_t d], k [s, b, g_t d] and v (a view of the QKV output: its whole
    storage, [s, b, (n_t + 2 g_t) d]), and the mask type as an int32 [1] tensor; ``full`` is
    handled by the caller (a layer block keeps only its input).

    Example (hand-worked, the test's model): s=64, b=2, h=256, f=768, n=8, g=2, d=32, t=1,
    fp32: norms 2 x (2 x 131072 + 512) = 525312; linear inputs 2 x 131072; RoPE 32768; q, K, V
    3 x 131072; softmax 262144 + mask 4096; context 131072; MLP 786432 + 3 x 393216 -> 3576832.
    """
    sb, d = s * b, shape.head_dim
    x = _sbh(shape, sb, e, sequence_parallel)
    norms = 2 * (2 * x + sb * FP32 // (shape.tp if sequence_parallel else 1))
    linear_inputs = 2 * x
    rope = 4 * s * d * e
    if recompute == "selective":
        core = sb * d * e * (shape.n_t + shape.g_t + shape.n_t + 2 * shape.g_t) + 4
    else:
        core = local_attention_core_bytes(shape, s, b, e)
    context = sb * shape.n_t * d * e
    mlp = sb * shape.f_t * e * (2 + 1 + 1 + 1)
    return norms + linear_inputs + rope + core + context + mlp


def te_layer_saved_bytes(shape: LayerShape, s: int, b: int, e: int, *, recompute: str,
                         sequence_parallel: bool = False) -> int:
    """Bytes one Transformer-Engine-spec layer keeps for backward (GPU; written from TE's
    forward, not measured here).

    ``TELayerNormColumnParallelLinear`` (qkv, fc1) keeps its input and the normalised output
    (2 sbh e each, plus rsigma fp32); flash/fused attention keeps q, k, v (no GQA repeat:
    [s, b, (n_t + 2 g_t) d]), its output [s, b, n_t d] (also ``linear_proj``'s input, one
    tensor) and the softmax statistics [b, n_t, s] fp32 — no [s, s] term; the fused SwiGLU
    keeps ``linear_fc1``'s output [s, b, 2 f_t]; ``linear_fc2`` its input [s, b, f_t].
    ``selective`` recompute of the core attention keeps q, k, v and recomputes the rest (for
    flash attention it saves only the statistics: the same bytes minus output and stats).
    """
    sb, d = s * b, shape.head_dim
    x = _sbh(shape, sb, e, sequence_parallel)
    norms = 2 * (2 * x + sb * FP32 // (shape.tp if sequence_parallel else 1))
    qkv = sb * (shape.n_t + 2 * shape.g_t) * d * e
    out_and_stats = sb * shape.n_t * d * e + b * shape.n_t * s * FP32
    core = qkv + (out_and_stats if recompute != "selective" else sb * shape.n_t * d * e)
    mlp = sb * shape.f_t * e * 3
    return norms + core + mlp


LAYER_SAVED = {"local": local_layer_saved_bytes, "te": te_layer_saved_bytes}


def layer_forward_peak_bytes(shape: LayerShape, s: int, b: int, e: int, *, layer_spec: str) -> int:
    """Peak working set of one layer's forward without autograd (scoring), above its input.

    Local spec, attention: QKV output, RoPE'd q and k, repeated K and V, the scores and the
    softmax output [b, n_t, s, s] (fp32, plus the bf16 copy in bf16); MLP: ``linear_fc1``'s
    output [s, b, 2 f_t] and three [s, b, f_t] (``silu(gate)``, ``up + 0``, their product).
    Plus the normalised input sbh. TE: no [s, s] scores (flash attention).
    """
    sb, d = s * b, shape.head_dim
    qkv = sb * (shape.n_t + 2 * shape.g_t) * d * e
    heads = sb * shape.n_t * d * e
    if layer_spec == "local":
        scores = b * shape.n_t * s * s * (FP32 * 2 + (e if e != FP32 else 0))
        attention = qkv + 4 * heads + scores
    else:
        attention = qkv + 2 * heads + b * shape.n_t * s * FP32
    mlp = sb * shape.f_t * e * 5
    return sb * shape.hidden * e + max(attention, mlp)


@dataclass(frozen=True)
class PipelineSchedule:
    """How many micro-batch passes a pipeline rank keeps activations for, and of how many layers."""

    in_flight: int
    """Micro-batch x chunk passes whose activations are alive at the peak."""
    layers_per_pass: int


def in_flight_passes(pp_rank: int, pp: int, vpp: int, micro_batches: int, num_layers: int) -> PipelineSchedule:
    """Megatron's 1F1B schedule: rank r runs ``pp - r - 1`` warm-up forwards, then one
    forward-backward at a time, so it holds ``min(pp - r, M)`` micro-batches' activations of
    its L/pp layers. Interleaved (``vpp`` > 1): ``(pp - r - 1) * 2 + (vpp - 1) * pp`` warm-up
    passes + 1, each of one chunk (L / (pp vpp) layers), at most M x vpp
    (``get_pipeline_parallel_schedule`` / ``forward_backward_pipelining_with_interleaving``).
    """
    if vpp == 1:
        return PipelineSchedule(min(pp - pp_rank, micro_batches), num_layers // pp)
    warmup = (pp - pp_rank - 1) * 2 + (vpp - 1) * pp
    return PipelineSchedule(min(warmup + 1, micro_batches * vpp), num_layers // (pp * vpp))


def train_activation_bytes(shape: LayerShape, s: int, b: int, e: int, *, layer_spec: str, recompute: str,
                           recompute_num_layers: int, sequence_parallel: bool, schedule: PipelineSchedule,
                           layers_on_rank: int) -> int:
    """Peak saved activations of a pipeline rank in the training forward/backward.

    Each in-flight pass keeps its layers' saved tensors (``full`` recompute: only the input
    [s, b, h] of each block of ``recompute_num_layers`` layers); on top, the pass being
    back-propagated holds one layer's activation gradients (about one layer's saved bytes)
    and, recomputing, what it rematerialises (``selective``: one layer's core attention;
    ``full``: a whole block's saved tensors).
    """
    saved = LAYER_SAVED[layer_spec]
    per_layer = saved(shape, s, b, e, recompute=recompute if recompute != "full" else "none",
                      sequence_parallel=sequence_parallel)
    x = _sbh(shape, s * b, e, sequence_parallel)
    if recompute == "full":
        k = max(1, min(recompute_num_layers, schedule.layers_per_pass))
        per_pass = -(-schedule.layers_per_pass // k) * x
        working = k * per_layer + per_layer
    else:
        per_pass = schedule.layers_per_pass * per_layer
        full_layer = saved(shape, s, b, e, recompute="none", sequence_parallel=sequence_parallel)
        working = per_layer + (full_layer - per_layer if recompute == "selective" else 0)
    return schedule.in_flight * per_pass + working


# ----------------------------------------------------------------------------- output layer


def logprob_workspace_bytes(shape: LayerShape, s: int, b: int, response_tokens: int, e: int, *, fused: bool,
                            device: str, backward: bool) -> int:
    """The last stage's output-layer workspace for one micro-batch: [s, b] tokens, of which
    ``response_tokens`` predict response tokens.

    Fused (``fused_linear_log_probs``): the gathered hidden rows [n, h] (kept for backward),
    3 fp32 statistics per row, one logits tile (CPU 4096 x 1024, GPU 4096 x 8192; plus a
    product buffer in half precision); backward: dL/dhidden [n, h] fp32.
    Naive (Megatron's output layer + ``vocab_parallel_log_probs``): the logits [s, b, V/t]
    (kept for backward) and, in backward, dL/dlogits of the same size.
    The output weight's gradient [V/t, h] is the caller's (the largest weight gradient of the
    rank, :func:`train_activation_bytes`'s caller adds it once).
    """
    n, h, v = response_tokens, shape.hidden, shape.vocab_shard
    rows, cols = (4096, 1024) if device == "cpu" else (4096, 8192)
    rows, cols = min(rows, max(n, 1)), min(cols, v)
    if fused:
        tile = rows * cols * e + (max(rows, cols) * h * e if e != FP32 else 0)
        kept = n * h * e + 3 * n * FP32
        grads = n * h * FP32 if backward else 0
        return kept + tile + grads
    logits = s * b * v * e
    return logits + (logits if backward else 0) + 3 * s * b * FP32


def final_norm_bytes(shape: LayerShape, s: int, b: int, e: int, sequence_parallel: bool) -> int:
    """The last stage's final RMSNorm keeps its input and x*rstd (2 sbh e) and rstd."""
    return 2 * _sbh(shape, s * b, e, sequence_parallel) + s * b * FP32


# ----------------------------------------------------------------------------- rollout engine


def kv_bytes_per_token(num_layers: int, kv_heads_per_rank: int, head_dim: int, e: int) -> int:
    """vLLM's paged KV cache: K and V of every layer, ``2 L kv_heads d e`` per token."""
    return 2 * num_layers * kv_heads_per_rank * head_dim * e


def engine_activation_bytes(hidden: int, ffn_t: int, qkv_t: int, vocab_t: int, e: int, *,
                            batched_tokens: int, max_num_seqs: int) -> int:
    """vLLM's forward working set for one scheduler step of ``batched_tokens`` tokens (its
    profile run sizes the same): residual + normalised input and QKV / attention output,
    the MLP's [tokens, 2 f_t] + [tokens, f_t], and fp32 logits of the sampled rows
    [max_num_seqs, V/t] with the sampler's copy (an estimate; measured on CPU, see plan.md)."""
    per_token = (3 * hidden + qkv_t + 3 * ffn_t) * e
    return batched_tokens * per_token + 2 * max_num_seqs * vocab_t * FP32
