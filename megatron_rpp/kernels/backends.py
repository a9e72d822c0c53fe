"""Backends of the log-prob kernels: the two passes over a vocabulary shard, behind one interface.

A backend implements exactly two local operations on a [N, V/tp] block of logits
(see :mod:`megatron_rpp.kernels.shard_math` for the math):

- ``row_stats``: per-row log-sum-exp (and entropy) of logits / temperature — the forward pass;
- ``grad``: dL/dlogits from the saved per-row lse (and entropy) and the per-row gradient
  coefficients — the backward pass, written into a caller-given output.

Everything else (labels, communication, KL, autograd) is shared code above the backends.

- :class:`TorchBackend` — chunked torch: rows in chunks of at most ``chunk_elements`` fp32
  values through two reusable buffers, so the extra memory is O(chunk), not O(N·V).
  Used on CPU and as the fallback.
- :class:`~megatron_rpp.kernels.triton_kernels.TritonBackend` — streaming Triton kernels,
  used on CUDA (and on CPU under ``TRITON_INTERPRET=1`` in tests). Triton is imported only
  when this backend is first asked for.

Selection: :func:`resolve_backend` picks by device; the environment variable
``MEGATRON_RPP_KERNEL_BACKEND`` (``auto`` | ``torch`` | ``triton``) overrides it.

Shape letters: N rows, V/tp vocabulary shard (columns).
"""

from __future__ import annotations

import functools
import os
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["Backend", "TorchBackend", "BACKEND_ENV", "BACKENDS", "native_cpu_matmul", "resolve_backend"]

BACKEND_ENV = "MEGATRON_RPP_KERNEL_BACKEND"
BACKENDS = ("auto", "torch", "triton")


class Backend(Protocol):
    name: str

    def row_stats(self, logits: Tensor, temperature: float, with_entropy: bool,
                  scratch: bool = False) -> tuple[Tensor, Tensor | None]:
        """lse and entropy of softmax(logits / temperature) over this block's columns.

        ``scratch=True``: the caller no longer needs ``logits`` and the backend may overwrite them.

        Shape: logits [N, V/tp] (rows contiguous) -> lse [N] fp32, entropy [N] fp32 or None.
        """
        ...

    def grad(
        self,
        logits: Tensor,
        local_labels: Tensor,
        lse: Tensor,
        entropy: Tensor | None,
        coef_log_probs: Tensor,
        coef_entropy: Tensor | None,
        temperature: float,
        out: Tensor,
    ) -> Tensor:
        """Write dL/dlogits into ``out`` and return it (``shard_math`` module docstring).

        ``lse``/``entropy`` are the whole-vocabulary values; ``local_labels`` is −1 where the
        label is not in this block. ``out`` may be ``logits`` itself (computed in place).

        Shape: logits, out [N, V/tp]; every other tensor [N].
        """
        ...


class TorchBackend:
    """Chunked torch implementation; extra memory ≈ 2 × ``chunk_elements`` fp32 values.

    The two chunk buffers are kept per device between calls (a workspace of at most
    2 × ``chunk_elements`` fp32 values): the fused-linear path calls the backend once per
    tile, and fresh buffers would cost an allocation and its page faults every time.
    """

    name = "torch"

    def __init__(self, chunk_elements: int = 1 << 19) -> None:
        self.chunk_elements = chunk_elements
        self._workspace: dict[tuple[torch.device, int], Tensor] = {}

    def _buffer(self, logits: Tensor, rows: int, slot: int) -> Tensor:
        """A contiguous fp32 [min(rows, N), V/tp] view of workspace buffer ``slot`` (0 or 1)."""
        shape = (min(rows, logits.shape[0]), logits.shape[1])
        numel = shape[0] * shape[1]
        key = (logits.device, slot)
        buf = self._workspace.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._workspace[key] = torch.empty(numel, dtype=torch.float32, device=logits.device)
        return buf[:numel].view(shape)

    def release_workspace(self) -> None:
        """Free the kept chunk buffers (they are allocated again on the next call)."""
        self._workspace.clear()

    def _rows_per_chunk(self, n_cols: int) -> int:
        return max(1, self.chunk_elements // max(1, n_cols))

    def row_stats(self, logits: Tensor, temperature: float, with_entropy: bool,
                  scratch: bool = False) -> tuple[Tensor, Tensor | None]:
        n_rows, n_cols = logits.shape
        lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(lse) if with_entropy else None
        in_place = scratch and logits.dtype == torch.float32  # z lives in the logits themselves
        rows = n_rows if in_place and not with_entropy else self._rows_per_chunk(n_cols)
        buf_z = None if in_place else self._buffer(logits, rows, 0)
        buf_p = self._buffer(logits, rows, 1) if with_entropy else None
        for start in range(0, n_rows, rows):
            stop = min(start + rows, n_rows)
            z = _scaled_chunk(logits[start:stop], temperature, None if in_place else buf_z[: stop - start])
            m = z.amax(dim=-1, keepdim=True)  # [n, V/tp] -> [n, 1]
            m = torch.where(m > -torch.inf, m, torch.zeros_like(m))  # all −inf row: keep finite
            shifted = z.sub_(m)  # z − m ≤ 0, in place
            if entropy is None:
                s = shifted.exp_().sum(dim=-1)  # [n, V/tp] -> [n]; z is not needed any more
                lse[start:stop] = m.squeeze(-1) + s.log()
                continue
            p = torch.exp(shifted, out=buf_p[: stop - start])
            s = p.sum(dim=-1)  # [n, V/tp] -> [n]
            log_s = s.log()
            lse[start:stop] = m.squeeze(-1) + log_s
            # H = log s − Σ p (z − m) / s; clamping −inf to the lowest finite float
            # makes 0 · (z − m) = 0 where z = −inf.
            shifted.clamp_(min=_FLOAT32_MIN)
            t = torch.linalg.vecdot(p, shifted)  # [n, V/tp] -> [n]
            entropy[start:stop] = torch.where(s > 0, log_s - t / s, torch.zeros_like(s))
        return lse, entropy

    def grad(self, logits, local_labels, lse, entropy, coef_log_probs, coef_entropy, temperature, out):
        n_rows, n_cols = logits.shape
        # out is the logits themselves: work in place, chunk by chunk, no copy.
        in_place = out.dtype == torch.float32 and out.data_ptr() == logits.data_ptr() and out.stride() == logits.stride()
        rows = n_rows if in_place and coef_entropy is None else self._rows_per_chunk(n_cols)
        buf_z = None if in_place else self._buffer(logits, rows, 0)
        buf_p = self._buffer(logits, rows, 1) if coef_entropy is not None else None
        for start in range(0, n_rows, rows):
            stop = min(start + rows, n_rows)
            log_p = _scaled_chunk(logits[start:stop], temperature, None if in_place else buf_z[: stop - start])
            log_p.sub_(lse[start:stop, None])  # log p = z − lse
            a = coef_log_probs[start:stop, None]
            if coef_entropy is not None:
                # g = −a p − b p (log p + H)  (log p + H is finite wherever p > 0)
                p = torch.exp(log_p, out=buf_p[: stop - start])
                log_p.clamp_(min=_FLOAT32_MIN).add_(entropy[start:stop, None]).mul_(p)
                g = log_p.mul_(-coef_entropy[start:stop, None]).sub_(p.mul_(a))
            else:
                g = log_p.exp_().mul_(-a)  # −a p
            labels = local_labels[start:stop]
            hit = labels >= 0
            rows_hit = torch.nonzero(hit).squeeze(-1)
            g[rows_hit, labels[rows_hit]] += a.squeeze(-1)[rows_hit]  # + a · 1[v = y]
            if temperature != 1.0:
                g.div_(temperature)
            if not in_place:
                out[start:stop].copy_(g)
        return out


def _scaled_chunk(chunk: Tensor, temperature: float, buf: Tensor | None) -> Tensor:
    """chunk.float() / temperature, in ``buf`` (fp32, reused across chunks) or in place when buf is None."""
    if buf is None:
        return chunk.div_(temperature) if temperature != 1.0 else chunk
    buf.copy_(chunk)
    if temperature != 1.0:
        buf.div_(temperature)
    return buf


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


_NATIVE_CPU_MATMUL_FLAGS = {torch.bfloat16: {"amx_bf16", "avx512_bf16"}}


def native_cpu_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware (bf16: AMX or AVX512-BF16).

    Elsewhere torch emulates half precision at a small fraction of fp32 speed. (fp16 is
    not listed: torch's CPU fp16 matmul runs at fp32 speed even with AVX512-FP16.)
    """
    return bool(_cpu_flags() & _NATIVE_CPU_MATMUL_FLAGS.get(dtype, set()))


_FLOAT32_MIN = torch.finfo(torch.float32).min

_INSTANCES: dict[str, Backend] = {}


def resolve_backend(device: torch.device, name: str | None = None) -> Backend:
    """The backend for tensors on ``device``: ``name``, else ``$MEGATRON_RPP_KERNEL_BACKEND``, else auto.

    auto = Triton on CUDA, chunked torch elsewhere. Forcing ``triton`` on CPU needs
    ``TRITON_INTERPRET=1`` in the environment before Triton is first imported.
    """
    choice = (name or os.environ.get(BACKEND_ENV) or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "auto":
        choice = "triton" if device.type == "cuda" else "torch"
    if choice not in _INSTANCES:
        if choice == "triton":
            from megatron_rpp.kernels.triton_kernels import TritonBackend

            _INSTANCES[choice] = TritonBackend()
        else:
            _INSTANCES[choice] = TorchBackend()
    return _INSTANCES[choice]
