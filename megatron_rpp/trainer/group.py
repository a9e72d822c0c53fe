"""Worker groups: run the same method on every rank and collect the results.

``LocalWorkerGroup`` holds one :class:`Worker` in this process (world size 1).
``RayWorkerGroup`` places N workers as Ray actors (one per accelerator on GPU; on CPU,
actors with ``num_cpus=0`` share the machine's cores) that form one
torch.distributed world. A worker that dies or raises stops the controller with the
worker's error within seconds: calls wait with a timeout and poll for failures.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from megatron_rpp.config.schema import Config
from megatron_rpp.utils import console


class WorkerError(RuntimeError):
    """A worker raised or died."""


class LocalWorkerGroup:
    """One worker in this process."""

    def __init__(self, cfg: Config, hf_dir: str):
        from megatron_rpp.parallel.spawn import free_port
        from megatron_rpp.trainer.worker import Worker

        self.size = 1
        self.workers = [Worker(0, 1, free_port(), cfg, hf_dir)]

    def call(self, method: str, per_rank_args: Sequence[tuple] | None = None, **kwargs: Any) -> list[Any]:
        args = per_rank_args[0] if per_rank_args else ()
        return [getattr(self.workers[0], method)(*args, **kwargs)]

    def shutdown(self) -> None:
        for w in self.workers:
            w.shutdown()


class RayWorkerGroup:
    """N Ray actors forming one torch.distributed world (gloo on CPU, NCCL on GPU)."""

    def __init__(self, cfg: Config, hf_dir: str, num_workers: int, *, call_timeout_s: float = 3600.0,
                 worker_cls: type | None = None):
        """``worker_cls``: the rank class (default :class:`Worker`), constructed as
        ``worker_cls(rank, world_size, master_port, cfg, hf_dir)`` in each actor."""
        import ray
        import torch

        from megatron_rpp.parallel.spawn import free_port
        from megatron_rpp.trainer.worker import Worker

        quiet = console.is_quiet()  # workers then write to output_dir/logs/rank_XXXXX.log, not to the driver
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):  # a cluster started by examples/slurm/train.sbatch
                ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=not quiet,
                         runtime_env={"env_vars": _forwarded_env()})
            else:
                ray.init(num_cpus=max(os.cpu_count() or 1, 1), include_dashboard=False, log_to_driver=not quiet,
                         runtime_env={"env_vars": _forwarded_env()})
        on_gpu = torch.cuda.is_available()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"GPU": 1, "CPU": 1} if on_gpu else {"CPU": 0.001}
        self.pg = placement_group([bundle] * num_workers, strategy="PACK")
        ray.get(self.pg.ready(), timeout=300)
        worker_cls = worker_cls or Worker
        if quiet:
            worker_cls = _with_rank_log(worker_cls, os.path.abspath(cfg.trainer.output_dir))
        actor_cls = ray.remote(num_gpus=1 if on_gpu else 0, num_cpus=0.001)(worker_cls)
        port = free_port()
        self.size = num_workers
        self.timeout = call_timeout_s
        self.failed = False  # after a failure the survivors may be stuck in a collective
        self.workers = [
            actor_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r)
            ).remote(r, num_workers, port, cfg, hf_dir)
            for r in range(num_workers)
        ]
        self.call("info")  # surfaces construction errors now

    def call(self, method: str, per_rank_args: Sequence[tuple] | None = None, **kwargs: Any) -> list[Any]:
        """Run ``method`` on every worker (rank r gets ``per_rank_args[r]``); fail fast on any error."""
        import ray

        refs = [
            getattr(w, method).remote(*(per_rank_args[r] if per_rank_args else ()), **kwargs)
            for r, w in enumerate(self.workers)
        ]
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=self.timeout)
                if not done:
                    raise WorkerError(f"{method} did not finish within {self.timeout:.0f} s")
                ray.get(done)  # raises the worker's error at once, while others may still run
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            self.failed = True
            raise WorkerError(f"worker failed in {method}: {e}") from e
        except WorkerError:
            self.failed = True
            raise
        return ray.get(refs)

    def shutdown(self) -> None:
        import ray

        if not self.failed:  # survivors of a failure are killed at once, not asked to shut down
            try:
                ray.get([w.shutdown.remote() for w in self.workers], timeout=60)
            except Exception:
                pass
        for w in self.workers:
            ray.kill(w)
        ray.util.remove_placement_group(self.pg)


def _with_rank_log(cls: type, output_dir: str) -> type:
    """``cls`` whose actor first points its stdout/stderr at ``output_dir/logs/rank_XXXXX.log``."""

    class RankLogged(cls):
        def __init__(self, rank: int, *args: Any, **kwargs: Any):
            console.redirect_process_output(console.rank_log_path(output_dir, rank))
            super().__init__(rank, *args, **kwargs)

    RankLogged.__name__ = cls.__name__  # the actor keeps its name in Ray's logs (qualname: pickled by value)
    return RankLogged


def _forwarded_env() -> dict[str, str]:
    keys = ("TRITON_INTERPRET", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE", "GLOO_SOCKET_IFNAME", "MASTER_ADDR", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS",
            console.VERBOSE_ENV)
    return {k: os.environ[k] for k in keys if k in os.environ}


def make_worker_group(cfg: Config, hf_dir: str):
    if cfg.trainer.num_workers == 1:
        return LocalWorkerGroup(cfg, hf_dir)
    return RayWorkerGroup(cfg, hf_dir, cfg.trainer.num_workers)
