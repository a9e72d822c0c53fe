"""Two fixes to megatron-core 0.16's pipeline p2p shape exchange, needed on every backend.

With ``variable_seq_lengths`` (micro-batches of different lengths, which the trainer's
length-sorted micro-batches are) each p2p call first exchanges the tensor shapes
(``P2PCommunicator._communicate_shapes``), always as one ``batch_isend_irecv`` of
[send_prev, recv_prev, send_next, recv_next]. At PP = 2 the previous and the next stage are
the same rank, and when one call moves both directions — the interleaved schedule's
``send_forward_backward_recv_forward_backward`` — messages between the two ranks are matched
in posting order: the shape meant for ``recv_next`` lands in ``recv_prev`` and vice versa. The
tensors are then received into wrongly shaped buffers (gloo: "Received data size doesn't match
expected size"; with equal numels it would be silently wrong).

Second, megatron-core waits for the *sends* of the shape exchange to complete before it posts
the tensors. A send completes only once the peer posts the matching receive (gloo's send is a
rendezvous; NCCL's kernels pair up too), and the schedules post a tensor's send and its receive
in different calls on the two ranks. Without the shape round that is fine, as each call posts
all its tensors before it waits; with it, a cycle appears whenever a rank sends in a direction
the peer receives only later. The interleaved schedule at PP2 x VPP2 with 2 micro-batches
(issue 15): stage 0 runs all 4 forwards as warm-up and posts its first gradient receive only
in the cool-down, while stage 1's steady state sends a gradient (shape) and receives the last
activation in one call: stage 1 waits in the shape round for stage 0 to take the gradient's
shape, stage 0 waits for stage 1 to take the activation, which stage 1 posts only after its
shape round - a hang. Megatron-LM trains with fixed shapes, where this cannot happen.

:func:`apply_pipeline_fixes` makes the shape exchange use megatron-core's own unbatched
``_p2p_ops``, which orders the four operations by rank parity over two process groups exactly
so that the first cannot happen (it is what the tensors themselves use with
``batch_p2p_comm=False``, which the provider sets with a virtual pipeline), and waits only for
the shapes it *receives* (it needs them to size the buffers): the shape sends are left in
flight, each messages before its tensor on the same ordered channel, so the peer takes them
whenever it reaches that call. Their requests (and tensors) are kept until they complete.
Idempotent; applied by ``initialize_parallel``.
"""
from __future__ import annotations

import torch

_ORIGINAL = None  # megatron-core's method, once replaced
_PENDING = "_rpp_pending_shape_sends"  # P2PCommunicator attribute: [(request, shape tensor)] in flight


def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
    """``P2PCommunicator._communicate_shapes`` with unbatched, parity-ordered p2p that waits for the
    received shapes only (module doc).

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
    sent = {"send_prev": shape_of(tensor_send_prev), "send_next": shape_of(tensor_send_next)}
    reqs = _p2p_ops(tensor_send_prev=sent["send_prev"], tensor_recv_prev=recv_prev_shape,
                    tensor_send_next=sent["send_next"], tensor_recv_next=recv_next_shape,
                    group=self.pp_group, prev_pipeline_rank=self.prev_rank, next_pipeline_rank=self.next_rank)
    pending = [(req, t) for req, t in getattr(self, _PENDING, []) if not req.is_completed()]
    pending += [(reqs[name], sent[name]) for name in ("send_prev", "send_next") if name in reqs]
    setattr(self, _PENDING, pending)
    for name in ("recv_prev", "recv_next"):
        if name in reqs:
            reqs[name].wait()
    return ([0, 0, 0] if recv_prev_shape is None else recv_prev_shape.tolist(),
            [0, 0, 0] if recv_next_shape is None else recv_next_shape.tolist())


def apply_pipeline_fixes() -> None:
    """Install the fix (module doc) into megatron-core's ``P2PCommunicator``. Idempotent."""
    global _ORIGINAL
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    if _ORIGINAL is None:
        _ORIGINAL = P2PCommunicator._communicate_shapes
        P2PCommunicator._communicate_shapes = _communicate_shapes
