"""A worker that dies or raises stops the controller within seconds with the worker's error.

Real Ray actors forming a real gloo world: the surviving rank is blocked in an
all-reduce that will never complete (as a Megatron rank would be), so only the
group's fail-fast wait can stop the controller.
"""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ray_group():
    import ray
    import ray.cloudpickle

    import testlib.ray_ranks
    from megatron_rpp.trainer.group import RayWorkerGroup

    ray.cloudpickle.register_pickle_by_value(testlib.ray_ranks)  # actors need not import tests/
    groups = []

    def make():
        g = RayWorkerGroup(None, "", 2, worker_cls=testlib.ray_ranks.CollectiveRank)
        groups.append(g)
        return g

    yield make
    for g in groups:
        g.shutdown()
    ray.shutdown()


def test_dead_worker_stops_controller_within_seconds(ray_group):
    from megatron_rpp.trainer.group import WorkerError

    group = ray_group()
    assert group.call("all_reduce", value=2.0) == [4.0, 4.0]  # a healthy world first
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="die_in_collective") as err:
        group.call("die_in_collective", dying_rank=1)
    elapsed = time.monotonic() - t0
    print(f"dead worker -> WorkerError in {elapsed:.2f} s")
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert "died" in str(err.value).lower() or "exit" in str(err.value).lower()
    t0 = time.monotonic()
    group.shutdown()  # the survivor is stuck in the all-reduce: killed, not waited for
    assert time.monotonic() - t0 < 15


def test_raising_worker_reports_its_error(ray_group):
    from megatron_rpp.trainer.group import WorkerError

    group = ray_group()
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="bad shard on rank 0"):
        group.call("raise_in_collective", failing_rank=0)
    assert time.monotonic() - t0 < 15
