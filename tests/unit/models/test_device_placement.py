"""Device placement at the worker / verify boundaries, checked on CPU.

A CUDA model must never be handed CPU token ids (``Worker.score`` / ``Worker.train`` /
``checkpoint/verify.py`` all go through ``scoring.to_micro_batches`` + ``pipeline.forward_backward``).
Without a GPU the wrong device is stood in for by ``meta``: ``to_micro_batches`` must move every
tensor of a micro-batch (ids and the rows the loss reads) to the device it is given,
``forward_backward`` must refuse a micro-batch on another device than the model before Megatron
runs, and ``model_device`` must see through DDP-style wrappers and virtual-pipeline chunks.
``run_ranks`` picks NCCL exactly when CUDA is available.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_rpp.data.rollout_batch import RolloutBatch
from megatron_rpp.models.pipeline import MicroBatch, ModelChunks, forward_backward, model_device
from megatron_rpp.models.scoring import to_micro_batches
from megatron_rpp.parallel.spawn import default_backend, run_ranks


def _batch() -> RolloutBatch:
    batch = RolloutBatch.from_sequences([[1, 2, 3], [4, 5], [6]], [[7, 8], [9], [10, 11, 12]])
    return batch.replace(advantages=torch.ones(batch.response_mask.shape))


def _tensors(obj, path=""):
    """Every tensor inside a micro-batch (dataclass fields, dicts), with where it sits."""
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}.{k}")
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), f"{path}.{f.name}")


def test_to_micro_batches_moves_every_tensor(monkeypatch):
    """Every micro-batch is moved with ``RolloutBatch.to(device)`` before anything is cut from it.

    ``meta`` cannot go all the way (trimming reads lengths), so the real ``to`` is wrapped: it
    records the device asked for and moves to CPU; every tensor a micro-batch carries must come
    out of that move (a view of a moved tensor; the originals are replaced by fresh copies)."""
    batch = _batch()
    asked, moved = [], []
    original = RolloutBatch.to

    def to(self, device):
        asked.append(torch.device(device))
        out = original(self, "cpu")
        out = dataclasses.replace(out, **{f.name: getattr(out, f.name).clone() for f in dataclasses.fields(out)
                                          if torch.is_tensor(getattr(out, f.name))})
        moved.extend(t for _, t in _tensors(out))
        return out

    monkeypatch.setattr(RolloutBatch, "to", to)
    mbs = to_micro_batches(batch, 2, "meta")
    assert len(mbs) == 2 and asked == [torch.device("meta")] * 2
    storages = {t.untyped_storage().data_ptr() for t in moved}
    found = [(p, t) for mb in mbs for p, t in _tensors(mb)]
    assert any(p == ".input_ids" for p, _ in found) and any("advantages" in p for p, _ in found)
    # input_ids / resp_index are computed from the moved rows; the rest are the moved tensors themselves
    originals = {t.untyped_storage().data_ptr() for _, t in _tensors(batch)}
    assert not originals & {t.untyped_storage().data_ptr() for _, t in found}
    assert {t.untyped_storage().data_ptr() for p, t in found if p.startswith(".extras.batch")} <= storages


class _Wrapper(torch.nn.Module):  # stands for DDP / Float16Module: the model is ``.module``
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_model_device_sees_through_wrappers_and_chunks():
    meta = torch.nn.Linear(2, 2, device="meta")
    cpu = torch.nn.Linear(2, 2)
    assert model_device(_Wrapper(meta)).type == "meta"
    assert model_device(ModelChunks([_Wrapper(cpu), _Wrapper(meta)])).type == "cpu"  # the first chunk's


@pytest.mark.parametrize("where", ["input_ids", "position_ids"])
def test_forward_backward_refuses_a_batch_on_another_device(where):
    model = torch.nn.Linear(2, 2)  # on CPU
    ids = torch.zeros(1, 4, dtype=torch.long)
    mb = MicroBatch(ids.to("meta") if where == "input_ids" else ids,
                    position_ids=torch.arange(4)[None].to("meta") if where == "position_ids" else None)
    with pytest.raises(ValueError, match=rf"micro-batch 0: {where} is on meta, the model on cpu"):
        forward_backward(model, [mb], lambda out, mb: (out.sum(), {}), groups=None, forward_only=True)


def test_run_ranks_backend():
    assert default_backend(cuda_available=True) == "nccl"
    assert default_backend(cuda_available=False) == "gloo"
    assert default_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    with pytest.raises(ValueError, match="backend 'mpi'; supported: gloo, nccl"):
        run_ranks(print, 1, backend="mpi")
