"""Write a safetensors file one tensor at a time, and read safetensors one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once. A safetensors
file is an 8-byte little-endian header length, a JSON header with each tensor's dtype,
shape and byte range, then the raw bytes. When the names, dtypes and shapes are known
in advance (they are, for a checkpoint conversion), the header can be written first
and the tensors streamed after it, so peak memory is one tensor, not one file.

Files written here are ordinary safetensors files (``safe_open``, transformers and
vLLM read them).
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Sequence

import torch

ST_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

Entry = tuple[str, torch.dtype, Sequence[int]]


def tensor_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsStreamWriter:
    """Write ``entries`` (name, dtype, shape) to ``path``: header now, tensors by :meth:`write`.

    Tensors must be written in the order of ``entries``; each is checked against its
    declared dtype and shape. :meth:`close` fails unless every entry was written, so an
    interrupted writer never leaves a file that passes for complete without an error.

        with SafetensorsStreamWriter(path, [("a", torch.float32, (2, 3))]) as w:
            w.write("a", torch.zeros(2, 3))
    """

    def __init__(self, path: str | Path, entries: Sequence[Entry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._entries = [(n, d, tuple(int(s) for s in shape)) for n, d, shape in entries]
        names = [n for n, _, _ in self._entries]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.path.name}: duplicate tensor names")
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, dtype, shape in self._entries:
            if dtype not in ST_DTYPES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors here")
            n = tensor_nbytes(dtype, shape)
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.data_bytes = offset
        self.file_bytes = 8 + len(raw) + offset
        self._next = 0
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._entries):
            raise ValueError(f"{self.path.name}: unexpected extra tensor {name!r}")
        want_name, dtype, shape = self._entries[self._next]
        if name != want_name:
            raise ValueError(f"{self.path.name}: expected tensor {want_name!r} next, got {name!r}")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.path.name}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"declared {dtype} {shape}"
            )
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            # A uint8 view shares memory: no copy of the tensor's bytes is made.
            self._f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self._next != len(self._entries):
            missing = [n for n, _, _ in self._entries[self._next:]]
            raise ValueError(f"{self.path.name}: closed with {len(missing)} tensors unwritten (first: {missing[0]})")

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One tensor from a safetensors file, opening (and unmapping) the file around the read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def read_header(path: str | Path) -> dict[str, dict]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: truncated safetensors header")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end != size:
        raise ValueError(
            f"{path}: file is {size} bytes but its header describes {8 + n + end} (truncated or partial file)"
        )
    return header
