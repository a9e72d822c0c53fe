"""Resumable training state of one rank: Megatron distributed checkpoint of model + optimizer.

    save_model_and_optimizer(model, optimizer, "ckpt/step_00000004.tmp/model_optim")
    load_model_and_optimizer(model, optimizer, "ckpt/step_00000004/model_optim")

The critic of a PPO run (and its optimizer) goes the same way into ``critic_optim/``
(:data:`CRITIC_OPTIM_DIR`), a second, independent dist checkpoint.

The weights and the optimizer state (Adam moments, fp32 main parameters under bf16,
the common step) go through ``megatron.core.dist_checkpointing`` (torch_dist backend):
every tensor is stored once with its global shape, keyed by its model-parallel
position and de-duplicated across data-parallel replicas, so a checkpoint saved at
one data-parallel size loads at another. The plain Megatron optimizer's state is
replicated across DP and sharded like the parameters; its
``sharded_state_dict(is_loading=True)`` gives a fresh optimizer zero moments first,
so loading writes into real tensors instead of into nothing. The distributed optimizer
(``trainer.distributed_optimizer``) is saved in its ``fully_reshardable`` format (state in
model space, like the plain one; its default format cannot save on CPU), which loads at
another DP, TP or PP size. Virtual-pipeline chunks are saved as ``model0``, ``model1``, ...
(Megatron's convention); tensors are keyed by global names, so a checkpoint loads at another
virtual-pipeline size too. Which optimizer wrote the state is recorded (``optimizer.json``):
loading it into the other kind is an error naming ``trainer.distributed_optimizer``.

Per-rank RNG states (torch, Python, NumPy, CUDA) are saved next to it, one small file
per global rank; they are restored when the world size is unchanged.

All functions are collective over the whole world.
"""
from __future__ import annotations

import contextlib
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


#: The distributed optimizer's checkpoint format (ENVIRONMENT.md: the default cannot save on CPU).
DIST_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
OPTIMIZER_FILE = "optimizer.json"


def _distributed_parts(optimizer) -> list:
    """The ``DistributedOptimizer`` instances inside a Megatron optimizer (chained or not)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


def _is_distributed(optimizer) -> bool:
    return bool(_distributed_parts(optimizer))


def _give_fresh_state(optimizer) -> None:
    """A distributed optimizer that never stepped has no Adam state, and megatron-core's loader
    asserts on it: one inner step with zero gradients at lr 0 creates zero moments without
    changing any parameter (the loaded state then replaces them)."""
    for part in _distributed_parts(optimizer):
        inner = part.optimizer
        if inner.state:
            continue
        saved = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        for group, lr in zip(inner.param_groups, saved):
            group["lr"] = lr
        inner.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _keeping_step_on_load(optimizer):
    """megatron-core 0.16's ``fully_reshardable`` loader skips the saved ``step`` (it restores
    torch Adam's step from the param groups just before), then copies every key of a
    parameter's current state from the loaded tensors, ``step`` included: KeyError 'step'
    without apex/TE. While loading, each part keeps its current ``step`` for that copy (a
    per-instance override: the class is not patched)."""
    parts = _distributed_parts(optimizer)
    for part in parts:
        inner_set = part._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, part=part, inner_set=inner_set):
            group, order = part.model_param_group_index_map[model_param]
            state = part.optimizer.state.get(part.optimizer.param_groups[group]["params"][order], {})
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            inner_set(model_param, tensors)

        part._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        for part in parts:
            del part._set_main_param_and_optimizer_states


@contextlib.contextmanager
def _keeping_kernel_choice(optimizer):
    """torch's ``load_state_dict`` takes every parameter-group entry from the checkpoint, ``fused``
    (which Adam kernel runs, ``trainer/optim.py``'s ``use_fused_cpu_adam``) too; that is this
    process's choice, not state: keep it."""
    from megatron_rpp.trainer.optim import torch_optimizers

    inner = torch_optimizers(optimizer)
    chosen = [[g.get("fused") for g in o.param_groups] for o in inner]
    yield
    for o, kernels in zip(inner, chosen):
        for g, fused in zip(o.param_groups, kernels):
            g["fused"] = fused


def _own_step_tensors(optimizer) -> None:
    """megatron-core's distributed-optimizer loader puts one shared ``step`` tensor on every
    parameter's state; torch's Adam bumps it in place once per parameter per step (a silently
    wrong bias correction). Give every parameter its own copy."""
    for part in _distributed_parts(optimizer):
        for state in part.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].detach().clone()


def _sharded(model, optimizer, *, is_loading: bool) -> dict:
    """The sharded state dict of ``model`` (one GPTModel or its chunks) and ``optimizer``."""
    from megatron_rpp.parallel.gather import model_chunks

    chunks = model_chunks(model)
    if len(chunks) == 1:
        models = {"model": chunks[0].sharded_state_dict()}
    else:
        models = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    metadata = DIST_OPT_METADATA if _is_distributed(optimizer) else None
    return {**models, "optimizer": optimizer.sharded_state_dict(models, is_loading=is_loading, metadata=metadata)}


def save_model_and_optimizer(model, optimizer, path: str | Path) -> None:
    """Write ``model``'s and ``optimizer``'s sharded state to the empty/new directory ``path``."""
    import json

    from megatron.core import dist_checkpointing

    path = Path(path)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=False)
    _barrier()
    dist_checkpointing.save(_sharded(model, optimizer, is_loading=False), str(path))
    if dist.get_rank() == 0:
        (path / OPTIMIZER_FILE).write_text(json.dumps({"distributed": _is_distributed(optimizer)}))
    _barrier()


def load_model_and_optimizer(model, optimizer, path: str | Path) -> None:
    """Load what :func:`save_model_and_optimizer` wrote, at any data-parallel size (and TP, PP, VPP)."""
    import json

    from megatron.core import dist_checkpointing

    from megatron_rpp.parallel.gather import model_chunks

    record = Path(path) / OPTIMIZER_FILE
    saved = json.loads(record.read_text())["distributed"] if record.is_file() else False
    if saved != _is_distributed(optimizer):
        kinds = {True: "the distributed optimizer", False: "the plain (replicated) optimizer"}
        raise ValueError(f"{path}: the optimizer state was written by {kinds[saved]}, this run uses "
                         f"{kinds[not saved]}; set trainer.distributed_optimizer={str(saved).lower()} to resume it")
    _give_fresh_state(optimizer)
    sharded = _sharded(model, optimizer, is_loading=True)
    state = dist_checkpointing.load(sharded, str(path))
    chunks = model_chunks(model)
    with torch.no_grad():
        for i, c in enumerate(chunks):
            c.load_state_dict(state["model" if len(chunks) == 1 else f"model{i}"], strict=True)
        with _keeping_step_on_load(optimizer), _keeping_kernel_choice(optimizer):
            optimizer.load_state_dict(state["optimizer"])
    _own_step_tensors(optimizer)
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
