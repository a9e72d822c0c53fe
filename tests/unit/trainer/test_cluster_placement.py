"""Where the ranks go on a multi-node Ray cluster, and how a failure is described.

Pure parts of :mod:`megatron_rpp.trainer.cluster` and :mod:`megatron_rpp.trainer.group`;
the real placement on a real 2-node cluster is tests/cluster/test_slurm_train.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_rpp.trainer.cluster import Node, PlacementError, node_from_ray, node_group_size, plan_blocks, ranks_by_block
from megatron_rpp.trainer.group import _ranges, describe_failure


@pytest.mark.parametrize("nodes,workers,group,want", [
    (2, 2, 1, [1, 1]),        # DP=2, one rank per node
    (2, 4, 2, [2, 2]),        # TP=2 x DP=2: one TP group per node
    (2, 2, 2, [2]),           # one TP=2 group: both ranks on one node, never split
    (3, 8, 2, [4, 2, 2]),     # 4 groups over 3 nodes: the first node gets the extra one
    (1, 4, 1, [4]),           # a single machine
    (4, 2, 1, [1, 1]),        # fewer ranks than nodes: one rank per used node
])
def test_cpu_nodes_spread_whole_groups(nodes, workers, group, want):
    blocks = plan_blocks([None] * nodes, workers, group)
    assert blocks == want
    assert sum(blocks) == workers and all(b % group == 0 for b in blocks)


@pytest.mark.parametrize("caps,workers,group,want", [
    ([8, 8], 16, 8, [8, 8]),  # 2 nodes x 8 GPUs, TP=8
    ([8, 8], 12, 4, [8, 4]),  # fills the first node, the rest on the second
    ([6, 6], 8, 4, [4, 4]),   # a 6-GPU node holds one TP=4 group, not 1.5
    ([8, 8, 8], 8, 1, [8]),   # fewest nodes
])
def test_gpu_nodes_pack_whole_groups(caps, workers, group, want):
    assert plan_blocks(caps, workers, group) == want


def test_what_cannot_be_placed_is_an_error():
    with pytest.raises(PlacementError, match=r"do not fit: the nodes hold \[8, 8\]"):
        plan_blocks([8, 8], 24, 8)
    with pytest.raises(PlacementError, match="do not fit"):
        plan_blocks([6, 6], 12, 4)  # 12 GPUs, but only one group of 4 fits per node
    with pytest.raises(PlacementError, match="node groups of 2"):
        plan_blocks([None], 3, 2)
    with pytest.raises(PlacementError, match="no alive node"):
        plan_blocks([], 2, 1)


def test_ranks_by_block_are_contiguous():
    assert ranks_by_block([4, 2, 2]) == [[0, 1, 2, 3], [4, 5], [6, 7]]


def test_node_group_size_is_lcm_of_megatron_and_engine_tp():
    cfg = SimpleNamespace(model=SimpleNamespace(tensor_parallel_size=2), rollout=SimpleNamespace())
    assert node_group_size(cfg) == 2  # no engine TP configured: Megatron's TP alone
    cfg.rollout.tensor_parallel_size = 4
    assert node_group_size(cfg) == 4
    cfg.model.tensor_parallel_size, cfg.rollout.tensor_parallel_size = 2, 3
    assert node_group_size(cfg) == 6
    assert node_group_size(None) == 1


def test_nodes_are_named_by_their_slurm_label():
    entry = {"NodeID": "abc", "NodeManagerAddress": "198.18.0.12", "NodeManagerHostname": "n2.cluster",
             "Alive": False, "Resources": {"CPU": 2.0}, "Labels": {"slurm-node": "n2"}}
    n = node_from_ray(entry)
    assert str(n) == "n2 (198.18.0.12)" and not n.alive and n.gpus == 0.0
    entry["Labels"] = {}
    assert str(node_from_ray(entry)) == "n2.cluster (198.18.0.12)"


def test_failure_names_the_lost_node_and_its_ranks():
    import ray.exceptions

    n1 = Node("id1", "198.18.0.11", "n1", "n1", True, 0, 2)
    n2 = Node("id2", "198.18.0.12", "n2", "n2", True, 0, 2)
    rank_nodes = [n1, n1, n2, n2]
    msg = describe_failure("train", {}, [n2], rank_nodes)
    assert msg.startswith("worker failed in train: node n2 (198.18.0.12) was lost (ranks 2-3 ran there)")
    died = ray.exceptions.ActorDiedError()
    gloo = RuntimeError("[gloo] Connection closed by peer [198.18.0.12]:1234")
    msg = describe_failure("generate", {3: died, 0: gloo}, [], rank_nodes)
    first = msg.splitlines()[0]
    # the dead rank is the cause; the gloo error of its peer only a consequence
    assert first == "worker failed in generate: ranks 3 on node n2 (198.18.0.12) died", msg
    assert "rank 0 on n1 (198.18.0.11) raised: [gloo] Connection closed" in msg
    assert describe_failure("info", {1: ValueError("bad shard")}, [], rank_nodes).startswith(
        "worker failed in info: rank 1 on node n1 (198.18.0.11) raised")


def test_rank_ranges():
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert _ranges([3]) == "3"
