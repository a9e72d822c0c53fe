"""The Ray cluster the workers run on: its nodes, which ranks go where, and lost nodes.

A multi-node job (``examples/slurm/train.sbatch``) labels every Ray node with its Slurm node
name (``ray start --labels slurm-node=NAME``); errors name nodes by that label (else by
hostname) and address, e.g. ``n2 (198.18.0.12)``.

Placement: ranks go to nodes in contiguous blocks, and every block is a whole number of
*node groups* — ``model.tensor_parallel_size`` consecutive ranks (and
``rollout.tensor_parallel_size`` ones: an engine group), which must share a node. Data and
pipeline parallelism cross nodes. :func:`plan_blocks` is the pure part: on GPU it packs
nodes up to their GPU count; on CPU it spreads the groups evenly over the nodes.

CLI (used by ``examples/slurm/ray_cluster.sh`` while the Ray cluster comes up)::

    python -m megatron_rpp.trainer.cluster wait --address HEAD:PORT --nodes n1,n2 --timeout 300
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

SLURM_LABEL = "slurm-node"


class PlacementError(RuntimeError):
    """The workers cannot be placed on this cluster (named: the layout and the nodes)."""


class NodesMissingError(RuntimeError):
    """Not every expected node joined the Ray cluster in time."""


@dataclass(frozen=True)
class Node:
    """One Ray node, as ``ray.nodes()`` reports it."""

    node_id: str
    address: str
    hostname: str
    name: str  # the Slurm node name when labelled, else the hostname
    alive: bool
    gpus: float
    cpus: float

    def __str__(self) -> str:
        return f"{self.name} ({self.address})"


def node_from_ray(entry: dict[str, Any]) -> Node:
    labels = entry.get("Labels") or {}
    res = entry.get("Resources") or {}
    hostname = entry.get("NodeManagerHostname", "?")
    return Node(node_id=entry["NodeID"], address=entry.get("NodeManagerAddress", "?"), hostname=hostname,
                name=labels.get(SLURM_LABEL) or hostname, alive=bool(entry.get("Alive")),
                gpus=float(res.get("GPU", 0.0)), cpus=float(res.get("CPU", 0.0)))


def ray_nodes() -> list[Node]:
    """Every node the cluster knows, alive or dead (needs ``ray.init`` first)."""
    import ray

    return [node_from_ray(e) for e in ray.nodes()]


def node_group_size(cfg) -> int:
    """Ranks that must share a node: lcm of Megatron's TP and the rollout engine's TP.

    Both group consecutive ranks (Megatron's rank order is tp-fastest; vLLM's external
    launcher groups consecutive ranks), so a block of ``node_group_size`` ranks holds whole
    groups of each.
    """
    if cfg is None:
        return 1
    engine_tp = getattr(cfg.rollout, "tensor_parallel_size", None) or 1
    return math.lcm(cfg.model.tensor_parallel_size, engine_tp)


def plan_blocks(capacities: Sequence[int | None], num_workers: int, group: int) -> list[int]:
    """Ranks per node block, in rank order (block i holds the next ``sizes[i]`` ranks).

    ``capacities[n]``: how many workers node n can hold (its GPUs), or ``None`` for CPU
    nodes (no limit: CPU workers are spread evenly). Each block is a multiple of ``group``
    and goes to a distinct node. GPU nodes are filled in the given order (fewest nodes);
    CPU groups are dealt round-robin over the nodes (the first ``num_workers % nodes``
    blocks get one group more).
    """
    if num_workers < 1 or group < 1 or num_workers % group:
        raise PlacementError(f"{num_workers} workers do not split into node groups of {group} ranks")
    groups = num_workers // group
    if not capacities:
        raise PlacementError("the Ray cluster has no alive node")
    if all(c is None for c in capacities):
        k = min(len(capacities), groups)
        return [group * (groups // k + (1 if i < groups % k else 0)) for i in range(k)]
    blocks, left = [], groups
    for cap in capacities:
        take = min((cap or 0) // group, left)
        if take:
            blocks.append(take * group)
            left -= take
    if left:
        raise PlacementError(
            f"{num_workers} workers in node groups of {group} ranks (tensor/engine parallel ranks share a node) "
            f"do not fit: the nodes hold {list(capacities)} workers")
    return blocks


def ranks_by_block(blocks: Sequence[int]) -> list[list[int]]:
    """``[[0..b0-1], [b0..b0+b1-1], ...]``: the ranks of every block."""
    out, start = [], 0
    for b in blocks:
        out.append(list(range(start, start + b)))
        start += b
    return out


def wait_for_nodes(expected: Sequence[str], timeout_s: float, *, poll_s: float = 1.0,
                   log=print) -> list[Node]:
    """Block until every name in ``expected`` is an alive Ray node (by Slurm label or
    hostname); :class:`NodesMissingError` naming the missing ones after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    reported: set[str] = set()
    while True:
        alive = {n.name: n for n in ray_nodes() if n.alive}
        for name in sorted(set(alive) - reported):
            log(f"[ray_cluster] node {alive[name]} joined")
            reported.add(name)
        missing = [e for e in expected if e not in alive]
        if not missing:
            return [alive[e] for e in expected]
        if time.monotonic() > deadline:
            raise NodesMissingError(
                f"Ray nodes missing after {timeout_s:.0f} s: {', '.join(missing)} "
                f"(joined: {', '.join(str(alive[n]) for n in sorted(alive)) or 'none'})")
        time.sleep(poll_s)


def _connect(address: str, deadline: float) -> bool:
    """``ray.init`` as a driver, retried until ``deadline``: the head's port opens before its
    own node has registered (a driver connecting then fails)."""
    import ray

    while True:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            return True
        except (ConnectionError, RuntimeError) as e:
            ray.shutdown()
            if time.monotonic() > deadline:
                print(f"[ray_cluster] last error: {e}", file=sys.stderr)
                return False
            time.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_rpp.trainer.cluster")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait", help="wait until the named nodes joined the Ray cluster")
    w.add_argument("--address", required=True, help="the Ray head, HOST:PORT")
    w.add_argument("--nodes", required=True, help="comma-separated Slurm node names")
    w.add_argument("--timeout", type=float, default=300.0, help="seconds")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    if not _connect(args.address, deadline):
        print(f"[ray_cluster] error: cannot connect to the Ray head at {args.address} within {args.timeout:.0f} s",
              file=sys.stderr)
        return 3
    import ray

    try:
        nodes = wait_for_nodes([n for n in args.nodes.split(",") if n], max(deadline - time.monotonic(), 0.0))
    except NodesMissingError as e:
        print(f"[ray_cluster] error: {e}", file=sys.stderr)
        return 3
    finally:
        ray.shutdown()
    print(f"[ray_cluster] all {len(nodes)} nodes joined: {', '.join(map(str, nodes))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
