"""Run a function on N real ranks (spawned processes) and collect per-rank results.

Used by the distributed tests and by tools that need a short-lived Megatron world
(e.g. ``tools/convert_checkpoints/verify.py``). Failures never hang: the first rank
that raises is re-raised in the caller with its traceback, and a world that does
not finish within ``timeout`` seconds is torn down.

The process group is NCCL when CUDA is available (rank r on device r mod #GPUs), gloo
otherwise (:func:`default_backend`).

Start method (:func:`default_start_method`): without CUDA, ranks are forked from a
``forkserver`` that has imported torch, megatron-core and the trainer once (:data:`PRELOAD`):
a 2-rank world that builds SmolLM2-135M starts in ~2 s instead of ~10 on a 2-core VM (a
spawned rank re-imports them, ~6 s of CPU; benchmarks/bench_rank_start.py). Each rank still
gets the caller's environment as it is at the call, not the server's. With CUDA, ranks are
spawned (whatever the backend): nothing that may have touched CUDA is forked.
"""
from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable


class RankError(RuntimeError):
    """A spawned rank raised (the message holds the rank's traceback) or died."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(cuda_available: bool | None = None) -> str:
    """``"nccl"`` with CUDA, ``"gloo"`` without (``cuda_available``: default ``torch.cuda.is_available()``)."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "nccl" if cuda_available else "gloo"


def default_start_method(cuda_available: bool | None = None) -> str:
    """``"spawn"`` with CUDA, ``"forkserver"`` (with :data:`PRELOAD`) without (``cuda_available``:
    default ``torch.cuda.is_available()``)."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "spawn" if cuda_available else "forkserver"


#: What the forkserver imports once, before it forks any rank.
PRELOAD = ("torch", "torch.distributed", "megatron.core", "megatron_rpp.trainer.loop")


def _rank_main(rank, world_size, port, fn, args, kwargs, env, results, backend) -> None:
    os.environ.clear()  # a forked rank starts with the server's environment: the caller's replaces it
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        try:
            out = fn(*args, **kwargs)
        finally:
            _teardown()
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - reported to the parent, never swallowed
        results.put((rank, False, traceback.format_exc()))


def _teardown() -> None:
    import sys

    import torch.distributed as dist

    parallel_state = sys.modules.get("megatron.core.parallel_state")  # never import megatron just to tear down
    if parallel_state is not None:
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    backend: str | None = None,
    start_method: str | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks.

    ``fn`` must be importable by name (a module-level function). Each rank has
    ``torch.distributed`` initialised (``backend``, default :func:`default_backend`; ranks
    0..N-1 on 127.0.0.1) before ``fn`` runs, and torn down (Megatron's model parallel state
    included) after. Ranks start by ``start_method`` (default :func:`default_start_method`:
    ``"forkserver"`` without CUDA, ``"spawn"`` with it); either way a rank's environment is
    the caller's ``os.environ`` at this call, updated by ``env``.

    Returns:
        ``[result of rank 0, ..., result of rank N-1]`` (results are pickled).
    Raises:
        RankError: with the first failing rank's traceback, when a rank raises, dies
        without reporting, or the world runs past ``timeout`` seconds.
    """
    import multiprocessing as mp

    backend = backend or default_backend()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend {backend!r}; supported: gloo, nccl")
    ctx = mp.get_context(start_method or default_start_method())
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD))  # takes effect when this process first starts the server
    results = ctx.Queue()
    port = free_port()
    child_env = {**os.environ, **(env or {})}
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, world_size, port, fn, args, kwargs, child_env, results, backend),
            daemon=False,  # a rank may start children (dist_checkpointing's writer Manager); killed in finally
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.5)
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    raise RankError(
                        f"{world_size}-rank run of {fn.__name__} timed out after {timeout:.0f} s "
                        f"(ranks finished: {sorted(out)})"
                    ) from None
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    # Give a dying rank's report a moment to arrive before blaming the exit code.
                    try:
                        rank, ok, payload = results.get(timeout=2.0)
                    except queue_mod.Empty:
                        raise RankError(
                            f"rank {dead[0]} of {fn.__name__} died with exit code "
                            f"{procs[dead[0]].exitcode} without reporting"
                        ) from None
                else:
                    continue
            if not ok:
                raise RankError(f"rank {rank} of {fn.__name__} failed:\n{payload}")
            out[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5.0)
        for p in procs:  # only processes this call started
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
    return [out[r] for r in range(world_size)]

