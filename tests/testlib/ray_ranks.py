"""A minimal rank class for worker-group failure tests: joins a real gloo world like
:class:`megatron_rpp.trainer.worker.Worker` does, and blocks in real collectives."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


class CollectiveRank:
    def __init__(self, rank: int, world_size: int, master_port: int, cfg, hf_dir: str):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), GLOO_SOCKET_IFNAME="lo")
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        self.rank = rank

    def info(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid()}

    def all_reduce(self, value: float) -> float:
        t = torch.tensor([value])
        dist.all_reduce(t)
        return float(t)

    def die_in_collective(self, dying_rank: int) -> float:
        """``dying_rank`` exits hard (as on an OOM kill); the others wait for it in an all-reduce."""
        if self.rank == dying_rank:
            os._exit(17)
        return self.all_reduce(1.0)

    def raise_in_collective(self, failing_rank: int) -> float:
        if self.rank == failing_rank:
            raise ValueError(f"bad shard on rank {self.rank}")
        return self.all_reduce(1.0)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
