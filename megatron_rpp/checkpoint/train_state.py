"""Resumable training state of one rank: Megatron distributed checkpoint of model + optimizer.

    save_model_and_optimizer(model, optimizer, "ckpt/step_00000004.tmp/model_optim")
    load_model_and_optimizer(model, optimizer, "ckpt/step_00000004/model_optim")

The critic of a PPO run (and its optimizer) goes the same way into ``critic_optim/``
(:data:`CRITIC_OPTIM_DIR`), a second, independent dist checkpoint.

The weights and the optimizer state (Adam moments, fp32 main parameters under bf16,
the common step) go through ``megatron.core.dist_checkpointing`` (torch_dist backend):
every tensor is stored once with its global shape, keyed by its model-parallel
position and de-duplicated across data-parallel replicas, so a checkpoint saved at
one data-parallel size loads at another. The non-distributed Megatron optimizer is
used (its state is replicated across DP and sharded like the parameters); its
``sharded_state_dict(is_loading=True)`` gives a fresh optimizer zero moments first,
so loading writes into real tensors instead of into nothing.

Per-rank RNG states (torch, Python, NumPy, CUDA) are saved next to it, one small file
per global rank; they are restored when the world size is unchanged.

All functions are collective over the whole world.
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import torch
import torch.distributed as dist

RNG_DIR = "rng"
MODEL_OPTIM_DIR = "model_optim"
#: The critic's weights + optimizer state (runs whose estimator needs values), saved like the policy's.
CRITIC_OPTIM_DIR = "critic_optim"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model_and_optimizer(model, optimizer, path: str | Path) -> None:
    """Write ``model``'s and ``optimizer``'s sharded state to the empty/new directory ``path``."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=False)
    _barrier()
    sharded = {"model": model.sharded_state_dict()}
    sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"])
    dist_checkpointing.save(sharded, str(path))
    _barrier()


def load_model_and_optimizer(model, optimizer, path: str | Path) -> None:
    """Load what :func:`save_model_and_optimizer` wrote, at any data-parallel size."""
    from megatron.core import dist_checkpointing

    sharded = {"model": model.sharded_state_dict()}
    sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], is_loading=True)
    state = dist_checkpointing.load(sharded, str(path))
    with torch.no_grad():
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
    _barrier()


def rng_state() -> dict:
    """This process's RNG states (picklable)."""
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(path: str | Path, name: str) -> None:
    """This process's RNG states as ``<path>/rng/<name>.pkl`` (``rank_00003``, ``controller``)."""
    d = Path(path) / RNG_DIR
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name}.pkl", "wb") as f:
        pickle.dump(rng_state(), f)


def load_rng(path: str | Path, name: str, *, expect_ranks: int | None = None) -> bool:
    """Restore the RNG states saved under ``name``. With ``expect_ranks``, only when the
    checkpoint holds exactly that many ``rank_*`` files (the world size is unchanged)."""
    d = Path(path) / RNG_DIR
    if expect_ranks is not None and len(list(d.glob("rank_*.pkl"))) != expect_ranks:
        return False
    if not (d / f"{name}.pkl").is_file():
        return False
    with open(d / f"{name}.pkl", "rb") as f:
        set_rng_state(pickle.load(f))
    return True
