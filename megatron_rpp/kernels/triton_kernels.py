"""Triton backend: streaming forward (online log-sum-exp + entropy) and backward kernels.

Imported only when the Triton backend is selected (``import megatron_rpp`` never imports
Triton). On CPU the kernels run under ``TRITON_INTERPRET=1`` (tests), which must be set
before Triton is first imported. Math: :mod:`megatron_rpp.kernels.shard_math`.

- ``_row_stats_kernel``: one program per BLOCK_N rows; loops over the columns in blocks
  of BLOCK_V keeping a running max m, s = Σ exp(z − m) and t = Σ exp(z − m)(z − m);
  reads the logits once, writes two fp32 numbers per row.
- ``_grad_kernel``: one program per (BLOCK_N rows × BLOCK_V columns) tile; recomputes
  p = exp(z − lse) and writes dL/dlogits in the output's dtype.

Shape letters: N rows, V/tp vocabulary shard (columns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["TritonBackend"]

# Finite stand-in for −inf as the initial running max: keeps exp(m_old − m_new) and
# (m_old − m_new) · s finite (no inf − inf, no 0 · inf).
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _row_stats_kernel(
    x_ptr, stride_x, lse_ptr, ent_ptr, n_rows, n_cols, temperature,
    WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    row_ptr = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    m = tl.full([BLOCK_N], _NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        z = tl.load(row_ptr + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        shifted = z - m_new[:, None]
        e = tl.exp(shifted)  # 0 on masked / −inf entries
        if WITH_ENTROPY:
            t = alpha * (t + (m - m_new) * s) + tl.sum(e * tl.where(e > 0, shifted, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    has_mass = s > 0
    safe_s = tl.where(has_mass, s, 1.0)
    lse = tl.where(has_mass, m + tl.log(safe_s), float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if WITH_ENTROPY:
        ent = tl.where(has_mass, tl.log(safe_s) - t / safe_s, 0.0)
        tl.store(ent_ptr + rows, ent, mask=row_ok)


@triton.jit
def _grad_kernel(
    x_ptr, stride_x, out_ptr, stride_out, labels_ptr, lse_ptr, ent_ptr, coef_ptr, coef_ent_ptr,
    n_rows, n_cols, temperature,
    WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    z = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32) / temperature
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    a = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    g = tl.where(cols[None, :] == label[:, None], a[:, None], 0.0) - a[:, None] * p
    if WITH_ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        b = tl.load(coef_ent_ptr + rows, mask=row_ok, other=0.0)
        g -= b[:, None] * p * (tl.where(p > 0, log_p, 0.0) + ent[:, None])
    g = g / temperature
    tl.store(out_ptr + rows64 * stride_out + cols[None, :], g.to(out_ptr.dtype.element_ty), mask=mask)


def _interpreting(t: Tensor) -> bool:
    return t.device.type != "cuda"


class TritonBackend:
    """Streaming Triton kernels; block sizes default by device (small under the interpreter)."""

    name = "triton"

    def __init__(self, block_n: int | None = None, block_v: int | None = None, num_warps: int = 8) -> None:
        self.block_n = block_n
        self.block_v = block_v
        self.num_warps = num_warps

    def _blocks(self, logits: Tensor) -> tuple[int, int]:
        n_cols = logits.shape[1]
        if _interpreting(logits):  # numpy interpreter: few, wide programs are fastest
            block_n, block_v = 16, 1024
        else:  # one row per program streams the row at full bandwidth
            block_n, block_v = 1, 4096
        block_n = self.block_n or block_n
        block_v = min(self.block_v or block_v, triton.next_power_of_2(max(n_cols, 16)))
        return block_n, block_v

    def row_stats(self, logits: Tensor, temperature: float, with_entropy: bool,
                  scratch: bool = False) -> tuple[Tensor, Tensor | None]:
        n_rows, n_cols = logits.shape  # one streaming read: nothing to gain from scratch
        assert logits.stride(1) == 1, "logits rows must be contiguous"
        lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(lse) if with_entropy else None
        if n_rows == 0:
            return lse, entropy
        block_n, block_v = self._blocks(logits)
        _row_stats_kernel[(triton.cdiv(n_rows, block_n),)](
            logits, logits.stride(0), lse, entropy if with_entropy else lse, n_rows, n_cols, float(temperature),
            WITH_ENTROPY=with_entropy, BLOCK_N=block_n, BLOCK_V=block_v, num_warps=self.num_warps,
        )
        return lse, entropy

    def grad(self, logits, local_labels, lse, entropy, coef_log_probs, coef_entropy, temperature, out):
        n_rows, n_cols = logits.shape
        assert logits.stride(1) == 1 and out.stride(1) == 1, "rows must be contiguous"
        if n_rows == 0:
            return out
        with_entropy = coef_entropy is not None
        block_n, block_v = self._blocks(logits)
        if not _interpreting(logits):
            block_v = min(block_v, 2048)
        grid = (triton.cdiv(n_rows, block_n), triton.cdiv(n_cols, block_v))
        _grad_kernel[grid](
            logits, logits.stride(0), out, out.stride(0), local_labels.contiguous(), lse.contiguous(),
            entropy.contiguous() if with_entropy else lse, coef_log_probs.contiguous(),
            coef_entropy.contiguous() if with_entropy else lse,
            n_rows, n_cols, float(temperature),
            WITH_ENTROPY=with_entropy, BLOCK_N=block_n, BLOCK_V=block_v, num_warps=self.num_warps,
        )
        return out
