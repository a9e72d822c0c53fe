"""Make megatron-core (0.16.x) run on CPU with gloo.

megatron-core assumes CUDA in ~250 places: ``torch.cuda.current_device()``, literal
``device="cuda"``, ``.cuda()``, CUDA RNG state, CUDA events and streams,
``torch.cuda.synchronize()``. :func:`apply_cpu_backend` adapts a CPU-only process so
those paths run on CPU tensors. It is applied explicitly, once per rank, before any
model is built, and it refuses to do anything in a process that has CUDA.

What it changes (every entry was observed to break without it, see ENVIRONMENT.md):

=================================================  ===================================
megatron-core call                                   adaptation
=================================================  ===================================
``torch.cuda.current_device()``                       returns ``"cpu"``
``torch.cuda.synchronize()``                          no-op
``torch.cuda.Event`` / streams                        wall-clock event, dummy stream
CUDA RNG tracker (``tensor_parallel.random``)          backed by the CPU generator
literal ``device="cuda"`` / ``.cuda()`` / ``.to("cuda")``  a TorchFunctionMode maps them to CPU
``param.grad.type() == 'torch.cuda.FloatTensor'``      the mode reports float32 CPU tensors so
``communication_utils._is_cuda``                      accepts CPU tensors
activation recompute (``CheckpointFunction.backward``)  runs under a mode of its own
=================================================  ===================================

Wrong results without an error: with an interleaved pipeline at PP=2 on gloo, set
``batch_p2p_comm=False`` (the model provider does this on CPU).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


def _is_cuda_device(d: Any) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.split(":")[0] == "cuda"
    return False


def _to_cpu(d: Any) -> Any:
    return torch.device("cpu") if _is_cuda_device(d) else d


class CudaToCpuMode(TorchFunctionMode):
    """Route every CUDA device request of torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return "torch.cuda.FloatTensor" if name == "torch.FloatTensor" else name
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_to_cpu(kwargs["device"]))
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros) or func is torch.tensor:
            args = tuple(_to_cpu(a) for a in args)
        return func(*args, **kwargs)


class _WallClockEvent:
    """Stand-in for ``torch.cuda.Event`` (timing only)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: "_WallClockEvent") -> float:
        return (end._t - self._t) * 1000.0


class _DummyStream:
    def __init__(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or _WallClockEvent()
        event.record()
        return event


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda device=None: None
    cuda.Event = _WallClockEvent
    cuda.Stream = _DummyStream
    cuda.current_stream = lambda device=None: _DummyStream()
    cuda.default_stream = lambda device=None: _DummyStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_device = lambda device: None


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker.add = add


def _patch_megatron_recompute() -> None:
    """Activation recompute runs forward code inside the backward pass, where the mode is off
    (a mode is switched off while its handler runs, and ``torch.autograd.backward`` is such a
    call): the recompute entry point gets a mode of its own."""
    from megatron.core.tensor_parallel import random as mrandom

    original = mrandom.CheckpointFunction.backward

    def backward(ctx, *grads):
        with CudaToCpuMode():
            return original(ctx, *grads)

    mrandom.CheckpointFunction.backward = staticmethod(backward)


def _patch_megatron_inference() -> None:
    try:
        from megatron.core.inference import communication_utils
    except Exception:  # inference package absent in some builds
        return
    if hasattr(communication_utils, "_is_cuda"):
        communication_utils._is_cuda = lambda tensor: tensor is not None


def apply_cpu_backend() -> bool:
    """Adapt this CPU-only process for megatron-core. Idempotent.

    Returns:
        True when the adaptation is active, False in a process with CUDA (where
        nothing is changed).
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        return False
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_megatron_recompute()
    _patch_megatron_inference()
    CudaToCpuMode().__enter__()  # stays active for the life of the process
    _APPLIED = True
    return True


def cpu_backend_active() -> bool:
    return _APPLIED
