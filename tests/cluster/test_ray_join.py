"""The join wait of the Slurm launch (``python -m megatron_rpp.trainer.cluster wait``) on a
real local Ray: a node that never registers fails it at the timeout, naming the node.
(No Slurm needed; the full bring-up, and a node whose Ray exits, are in test_slurm_train.py.)"""
from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_missing_node_is_named_after_the_timeout(local_ray):
    from megatron_rpp.trainer.cluster import NodesMissingError, wait_for_nodes

    here = socket.gethostname()
    assert [n.name for n in wait_for_nodes([here], timeout_s=30)] == [here]  # no label: by hostname
    with pytest.raises(NodesMissingError, match=rf"missing after 2 s: n7, n9 \(joined: {here} \("):
        wait_for_nodes(["n7", here, "n9"], timeout_s=2, poll_s=0.5)
