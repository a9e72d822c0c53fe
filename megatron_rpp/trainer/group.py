"""Worker groups: run the same method on every rank and collect the results.

``LocalWorkerGroup`` holds one :class:`Worker` in this process (world size 1).
``RayWorkerGroup`` places N workers as Ray actors that form one torch.distributed world,
on one machine or across the nodes of a Ray cluster (``examples/slurm/train.sbatch``):

- **Placement**: ranks go to nodes in contiguous blocks of whole node groups (TP and
  engine groups never span nodes; DP/PP do), one placement-group bundle per node
  (``STRICT_SPREAD``; see :mod:`megatron_rpp.trainer.cluster`). GPU workers take one GPU
  each; CPU workers (``num_cpus`` 0.001: they share the cores) are spread evenly.
- **Rendezvous**: ``MASTER_ADDR`` is rank 0's node address as Ray knows it, the port is
  free on that node; each rank picks the interface that routes there
  (:func:`megatron_rpp.parallel.network.configure_rendezvous`). Each rank then reports
  where it really runs (host, interface, address), printed once per node.
- **Failures**: every call waits with a timeout and polls for failures: a rank that
  raises or dies, or a node that leaves the Ray cluster, stops the controller within
  seconds with an error naming the nodes and their ranks (the surviving ranks may be
  stuck in a collective: they are killed, not waited for).
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

from megatron_rpp.config.schema import Config
from megatron_rpp.utils import console


class WorkerError(RuntimeError):
    """A worker raised or died, a node was lost, or the workers could not be placed."""


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
                 worker_cls: type | None = None, ready_timeout_s: float = 300.0, poll_s: float = 1.0):
        """``worker_cls``: the rank class (default :class:`Worker`), constructed as
        ``worker_cls(rank, world_size, master_port, cfg, hf_dir)`` in each actor.
        ``poll_s``: how often a waiting call checks for failures and lost nodes."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from megatron_rpp.trainer.cluster import node_group_size
        from megatron_rpp.trainer.worker import Worker

        quiet = console.is_quiet()  # workers then write to output_dir/logs/rank_XXXXX.log, not to the driver
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):  # a cluster started by examples/slurm/train.sbatch
                ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=not quiet,
                         runtime_env={"env_vars": _forwarded_env()})
            else:
                ray.init(num_cpus=max(os.cpu_count() or 1, 1), include_dashboard=False, log_to_driver=not quiet,
                         runtime_env={"env_vars": _forwarded_env()})
        self.size, self.timeout, self.poll_s = num_workers, call_timeout_s, poll_s
        self.failed = False  # after a failure the survivors may be stuck in a collective
        self.workers: list = []
        self.pg = None
        on_gpu = ray.cluster_resources().get("GPU", 0) > 0
        self._place(num_workers, node_group_size(cfg), on_gpu, ready_timeout_s)
        master = self.rank_nodes[0]
        port = self._free_port_on(master, ready_timeout_s)
        env = {**_forwarded_env(), "MASTER_ADDR": master.address}
        worker_cls = worker_cls or Worker
        if quiet:
            worker_cls = _with_rank_log(worker_cls, os.path.abspath(cfg.trainer.output_dir))
        actor_cls = ray.remote(num_gpus=1 if on_gpu else 0, num_cpus=0.001)(worker_cls)
        self.workers = [
            actor_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=b),
                runtime_env={"env_vars": env},
            ).remote(r, num_workers, port, cfg, hf_dir)
            for r, b in enumerate(self.bundle_of)
        ]
        try:
            self.call("info")  # surfaces construction errors now
            self.reports = self._gather([w.__ray_call__.remote(_rank_report) for w in self.workers],
                                        "placement report")
        except BaseException:
            self.shutdown()
            raise
        for line in placement_lines(self.rank_nodes, self.reports):
            console.say(f"{console.PREFIX} {line}")

    def _place(self, num_workers: int, group: int, on_gpu: bool, timeout_s: float) -> None:
        """Reserve one placement-group bundle per node block (``STRICT_SPREAD``: each on
        another node); sets ``pg``, ``bundle_of`` (rank -> bundle) and ``rank_nodes``."""
        import ray
        from ray.util.placement_group import placement_group

        from megatron_rpp.trainer.cluster import PlacementError, plan_blocks, ranks_by_block, ray_nodes

        here = ray.get_runtime_context().get_node_id()  # GPU nodes fill from the controller's node on
        nodes = sorted((n for n in ray_nodes() if n.alive), key=lambda n: (n.node_id != here, n.address))
        try:
            blocks = plan_blocks([int(n.gpus) for n in nodes] if on_gpu else [None] * len(nodes), num_workers, group)
        except PlacementError as e:
            raise WorkerError(f"cannot place trainer.num_workers={num_workers} on the Ray cluster "
                              f"({', '.join(f'{n}: {n.gpus:g} GPUs' for n in nodes)}): {e}") from None
        self.pg = placement_group([{"GPU": b, "CPU": 0.001 * b} if on_gpu else {"CPU": 0.001 * b} for b in blocks],
                                  strategy="STRICT_SPREAD")
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise WorkerError(f"the Ray cluster could not place {blocks} workers per node (one node each) within "
                              f"{timeout_s:.0f} s; alive nodes: {', '.join(map(str, nodes))}") from None
        by_id = {n.node_id: n for n in ray_nodes()}
        bundle_nodes = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
        self.bundle_of = [b for b, ranks in enumerate(ranks_by_block(blocks)) for _ in ranks]
        self.rank_nodes = [by_id[bundle_nodes[b]] for b in self.bundle_of]  # rank -> Node

    def _free_port_on(self, node, timeout_s: float) -> int:
        """A TCP port free on ``node`` (rank 0's: the rendezvous), asked by a task there."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from megatron_rpp.parallel.network import free_port_on

        task = ray.remote(num_cpus=0)(free_port_on).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False))
        try:
            return ray.get(task.remote(node.address), timeout=timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as e:
            self.shutdown()
            raise WorkerError(f"no Ray task ran on rank 0's node {node} within {timeout_s:.0f} s "
                              f"(can Ray workers start there? see its Ray logs): {type(e).__name__}: {e}") from None

    def call(self, method: str, per_rank_args: Sequence[tuple] | None = None, **kwargs: Any) -> list[Any]:
        """Run ``method`` on every worker (rank r gets ``per_rank_args[r]``); fail fast on any error."""
        refs = [
            getattr(w, method).remote(*(per_rank_args[r] if per_rank_args else ()), **kwargs)
            for r, w in enumerate(self.workers)
        ]
        return self._gather(refs, method)

    def _gather(self, refs: list, what: str) -> list[Any]:
        """Wait for every rank's result; on the first failure (a rank raised or died, a node
        left the cluster, or the call timed out) raise :class:`WorkerError`."""
        import ray

        deadline = time.monotonic() + self.timeout
        pending = {ref: r for r, ref in enumerate(refs)}
        errors: dict[int, BaseException] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=self.poll_s)
            errors.update(_errors_of(done, pending))
            lost = self._lost_nodes() if pending and not errors else []
            if errors or lost:
                self._fail(what, errors, pending, lost)
            if pending and time.monotonic() > deadline:
                self.failed = True
                raise WorkerError(f"{what} did not finish within {self.timeout:.0f} s "
                                  f"(waiting for ranks {_ranges(sorted(pending.values()))})")
        return ray.get(refs)

    def _fail(self, what: str, errors: dict, pending: dict, lost: list, *, grace_s: float = 3.0) -> None:
        """Raise the failure with its likely cause first. A rank's error is often a consequence
        (a gloo peer that vanished): wait up to ``grace_s`` for Ray to report dead ranks or a
        lost node, then name the nodes and ranks involved."""
        import ray

        self.failed = True
        end = time.monotonic() + grace_s
        while pending and time.monotonic() < end and not lost and not any(
                isinstance(e, ray.exceptions.RayActorError) for e in errors.values()):
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.5)
            errors.update(_errors_of(done, pending))
            lost = self._lost_nodes()
        lost = lost or self._lost_nodes()
        raise WorkerError(describe_failure(what, errors, lost, self.rank_nodes))

    def _lost_nodes(self) -> list:
        """The nodes holding ranks of this group that Ray no longer reports alive."""
        from megatron_rpp.trainer.cluster import ray_nodes

        alive = {n.node_id for n in ray_nodes() if n.alive}
        seen: dict[str, Any] = {}
        for n in self.rank_nodes:
            if n.node_id not in alive:
                seen.setdefault(n.node_id, n)
        return list(seen.values())

    def shutdown(self) -> None:
        import ray

        if not self.failed and self.workers:  # survivors of a failure are killed at once, not asked to shut down
            try:
                ray.get([w.shutdown.remote() for w in self.workers], timeout=60)
            except Exception:
                pass
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # an actor on a lost node
                pass
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)


def _errors_of(done: list, pending: dict) -> dict[int, BaseException]:
    """Pop the finished refs from ``pending``; the ranks whose call raised, with the error."""
    import ray

    out = {}
    for ref in done:
        rank = pending.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            out[rank] = e
    return out


def describe_failure(what: str, errors: dict[int, BaseException], lost: list, rank_nodes: list) -> str:
    """One message: lost nodes (and their ranks) first, then dead ranks, then raised errors."""
    import ray

    def ranks_on(node) -> list[int]:
        return [r for r, n in enumerate(rank_nodes) if n.node_id == node.node_id]

    dead = sorted(r for r, e in errors.items() if isinstance(e, ray.exceptions.RayActorError))
    raised = sorted(r for r in errors if r not in dead)
    head = []
    if lost:
        head.append("; ".join(f"node {n} was lost (ranks {_ranges(ranks_on(n))} ran there)" for n in lost))
    if dead:
        by_node: dict[str, list[int]] = {}
        for r in dead:
            by_node.setdefault(str(rank_nodes[r]), []).append(r)
        head.append("; ".join(f"ranks {_ranges(rs)} on node {n} died" for n, rs in by_node.items()))
    if raised and not head:
        head.append(f"rank {raised[0]} on node {rank_nodes[raised[0]]} raised")
    lines = [f"worker failed in {what}: {'; '.join(head) or 'unknown cause'}"]
    for r in (dead + raised)[:4]:
        kind = "died" if r in dead else "raised"
        lines.append(f"  rank {r} on {rank_nodes[r]} {kind}: {_clip(str(errors[r]).strip(), 3000)}")
    if len(dead) + len(raised) > 4:
        lines.append(f"  ... and {len(dead) + len(raised) - 4} more ranks failed")
    return "\n".join(lines)


def _clip(text: str, limit: int) -> str:
    """The head (what happened) and the tail (a traceback's exception) of a long message."""
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]} [... {len(text) - limit} characters ...] {text[-limit // 2:]}"


def _rank_report(worker: Any) -> dict:
    """Runs inside a rank's actor (via ``__ray_call__``): where this rank really is."""
    import socket

    from megatron_rpp.parallel.network import interface_addresses

    iface = os.environ.get("GLOO_SOCKET_IFNAME", "")
    try:
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        netns = "?"
    return {"hostname": socket.gethostname(), "pid": os.getpid(), "iface": iface,
            "ip": interface_addresses().get(iface, "?"), "netns": netns,
            "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"}


def placement_lines(rank_nodes: list, reports: list[dict]) -> list[str]:
    """One line per node: its ranks and what they reported (host, interface, address)."""
    by_node: dict[str, list[int]] = {}
    for r, n in enumerate(rank_nodes):
        by_node.setdefault(n.node_id, []).append(r)
    lines = [f"{len(rank_nodes)} ranks on {len(by_node)} nodes, rendezvous {reports[0]['master']}"]
    for ranks in by_node.values():
        seen = sorted({f"host {reports[r]['hostname']} {reports[r]['iface']} {reports[r]['ip']} {reports[r]['netns']}"
                       for r in ranks})
        lines.append(f"node {rank_nodes[ranks[0]]}: ranks {_ranges(ranks)}; ranks report {' | '.join(seen)}")
    return lines


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(out)


def _with_rank_log(cls: type, output_dir: str) -> type:
    """``cls`` whose actor first points its stdout/stderr at ``output_dir/logs/rank_XXXXX.log``
    (on a multi-node run each rank's log on the shared output directory starts with its host)."""

    class RankLogged(cls):
        def __init__(self, rank: int, *args: Any, **kwargs: Any):
            import socket

            console.redirect_process_output(console.rank_log_path(output_dir, rank))
            print(f"{console.PREFIX} rank {rank} on host {socket.gethostname()}", flush=True)  # which node's log
            super().__init__(rank, *args, **kwargs)

    RankLogged.__name__ = cls.__name__  # the actor keeps its name in Ray's logs (qualname: pickled by value)
    return RankLogged


def _forwarded_env() -> dict[str, str]:
    """The controller's settings every rank needs (on a Slurm cluster the Ray nodes also
    inherit the job's environment). Never MASTER_ADDR: that is rank 0's node, set per group."""
    keys = ("TRITON_INTERPRET", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TOKENIZERS_PARALLELISM",
            "OMP_NUM_THREADS", console.VERBOSE_ENV)
    return {k: os.environ[k] for k in keys if k in os.environ}


def make_worker_group(cfg: Config, hf_dir: str):
    if cfg.trainer.num_workers == 1:
        return LocalWorkerGroup(cfg, hf_dir)
    return RayWorkerGroup(cfg, hf_dir, cfg.trainer.num_workers)
