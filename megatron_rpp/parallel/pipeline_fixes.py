"""One fix to megatron-core 0.16's pipeline p2p, needed on every backend: shape exchange at PP = 2.

With ``variable_seq_lengths`` (micro-batches of different lengths, which the trainer's
length-sorted micro-batches are) each p2p call first exchanges the tensor shapes
(``P2PCommunicator._communicate_shapes``), always as one ``batch_isend_irecv`` of
[send_prev, recv_prev, send_next, recv_next]. At PP = 2 the previous and the next stage are
the same rank, and when one call moves both directions — the interleaved schedule's
``send_forward_backward_recv_forward_backward`` — messages between the two ranks are matched
in posting order: the shape meant for ``recv_next`` lands in ``recv_prev`` and vice versa. The
tensors are then received into wrongly shaped buffers (gloo: "Received data size doesn't match
expected size"; with equal numels it would be silently wrong).

:func:`apply_pipeline_fixes` makes the shape exchange use megatron-core's own unbatched
``_p2p_ops``, which orders the four operations by rank parity over two process groups exactly
so that this cannot happen (it is what the tensors themselves use with ``batch_p2p_comm=False``,
which the provider sets with a virtual pipeline). Idempotent; applied by ``initialize_parallel``.
"""
from __future__ import annotations

import torch

_ORIGINAL = None  # megatron-core's method, once replaced


def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
    """``P2PCommunicator._communicate_shapes`` with unbatched, parity-ordered p2p (module doc).

    Returns:
        ``(recv_prev_shape, recv_next_shape)``: [S, B, H] lists, [0, 0, 0] where nothing is received.
    """
    from megatron.core.pipeline_parallel.p2p_communication import _p2p_ops

    if self.config.use_ring_exchange_p2p:  # not batched: megatron-core's own path
        return _ORIGINAL(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next)
    device = torch.cuda.current_device()

    def shape_of(t):
        return None if t is None else torch.tensor(t.size(), device=device, dtype=torch.int64)

    recv_prev_shape = torch.empty((3,), device=device, dtype=torch.int64) if recv_prev else None
    recv_next_shape = torch.empty((3,), device=device, dtype=torch.int64) if recv_next else None
    reqs = _p2p_ops(tensor_send_prev=shape_of(tensor_send_prev), tensor_recv_prev=recv_prev_shape,
                    tensor_send_next=shape_of(tensor_send_next), tensor_recv_next=recv_next_shape,
                    group=self.pp_group, prev_pipeline_rank=self.prev_rank, next_pipeline_rank=self.next_rank)
    for req in reqs.values():
        req.wait()
    return ([0, 0, 0] if recv_prev_shape is None else recv_prev_shape.tolist(),
            [0, 0, 0] if recv_next_shape is None else recv_next_shape.tolist())


def apply_pipeline_fixes() -> None:
    """Install the fix (module doc) into megatron-core's ``P2PCommunicator``. Idempotent."""
    global _ORIGINAL
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    if _ORIGINAL is None:
        _ORIGINAL = P2PCommunicator._communicate_shapes
        P2PCommunicator._communicate_shapes = _communicate_shapes
