"""The streaming safetensors writer produces files safetensors itself reads, and refuses misuse."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from megatron_rpp.checkpoint.safetensors_stream import SafetensorsStreamWriter, read_header


def test_stream_written_file_reads_back_exactly(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b.bf16": torch.randn(7).to(torch.bfloat16),
        "c": torch.randn(4, 2, 3).to(torch.float16),
        "d.view": torch.randn(6, 4)[:, 1:3],  # non-contiguous input
    }
    path = tmp_path / "x.safetensors"
    with SafetensorsStreamWriter(path, [(n, t.dtype, t.shape) for n, t in tensors.items()], {"format": "pt"}) as w:
        for n, t in tensors.items():
            w.write(n, t)
    assert path.stat().st_size == w.file_bytes
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata() == {"format": "pt"}
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n), t)
    assert read_header(path)["a"]["shape"] == [3, 5]


def test_writer_checks_order_shape_dtype_and_completeness(tmp_path):
    entries = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(ValueError, match="expected tensor 'a' next"):
        w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="declared"):
        w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="declared"):
        w.write("a", torch.zeros(2, dtype=torch.bfloat16))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 tensors unwritten"):
        w.close()


def test_read_header_detects_truncation(tmp_path):
    path = tmp_path / "x.safetensors"
    with SafetensorsStreamWriter(path, [("a", torch.float32, (100,))]) as w:
        w.write("a", torch.ones(100))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated or partial"):
        read_header(path)
