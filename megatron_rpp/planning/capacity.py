"""The memory a plan is compared with: a GPU's, or (CPU) the host's.

Plumbing, not math: reads ``/proc/meminfo``, the cgroup limit and ``torch.cuda``.
"""
from __future__ import annotations

from pathlib import Path


def host_memory_bytes() -> int:
    """This machine's memory for all ranks together: ``MemTotal``, or the cgroup's limit when lower."""
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) << 10
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            total = int(raw)
    return total


def local_device() -> tuple[str, int]:
    """(``"gpu"``, memory of GPU 0) when CUDA is available here, else (``"cpu"``, host memory)."""
    import torch

    if torch.cuda.is_available():
        return "gpu", int(torch.cuda.get_device_properties(0).total_memory)
    return "cpu", host_memory_bytes()
