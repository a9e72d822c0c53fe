"""``run_ranks``: gloo ranks forked from a preloading forkserver, with the caller's environment.

The forkserver is started once per process and keeps the environment it started with; a
rank must nevertheless see ``os.environ`` as the caller has it at each call (the test
suite's and users' scripts set variables between calls). Checked in a fresh interpreter so
that this test, not an earlier one, starts the server.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_rpp.parallel.spawn import RankError, default_start_method, run_ranks


def _state(*names: str) -> dict:
    """What a rank sees: the start method, which of ``names`` were imported before ``fn`` ran."""
    import multiprocessing as mp

    import torch.distributed as dist

    return {"method": mp.get_start_method(), "preloaded": [n for n in names if n in sys.modules],
            "rank": dist.get_rank(), "world": dist.get_world_size()}


def _fail_on_rank_1() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one says no")


def test_start_method_forks_only_without_cuda():
    assert default_start_method(cuda_available=False) == "forkserver"
    assert default_start_method(cuda_available=True) == "spawn"  # nothing that may touch CUDA is forked


@pytest.mark.skipif(torch.cuda.is_available(), reason="ranks are spawned where CUDA is available")
def test_gloo_ranks_are_forked_with_the_trainer_preloaded():
    # this module imports neither megatron nor the trainer: a spawned rank would not have them
    heavy = ("megatron.core", "megatron_rpp.trainer.loop")
    states = run_ranks(_state, 2, *heavy, backend="gloo")
    assert states == [{"method": "forkserver", "preloaded": list(heavy), "rank": r, "world": 2} for r in range(2)]
    spawned = run_ranks(_state, 1, *heavy, backend="gloo", start_method="spawn")
    assert spawned == [{"method": "spawn", "preloaded": [], "rank": 0, "world": 1}]


def test_a_failing_rank_is_reraised_with_its_traceback():
    with pytest.raises(RankError, match=r"(?s)rank 1 of _fail_on_rank_1 failed:.*ValueError: rank one says no"):
        run_ranks(_fail_on_rank_1, 2, backend="gloo")


SCRIPT = textwrap.dedent("""
    import functools
    import os
    from megatron_rpp.parallel import spawn

    spawn.PRELOAD = ()  # the server's imports do not matter here: keep it quick
    os.environ["RPP_PROBE_GONE"] = "server start"
    os.environ["RPP_PROBE_CHANGED"] = "server start"
    run = functools.partial(spawn.run_ranks, backend="gloo", start_method="forkserver")  # even where CUDA is
    first = run(os.getenv, 1, "RPP_PROBE_GONE")  # starts the forkserver
    del os.environ["RPP_PROBE_GONE"]
    os.environ["RPP_PROBE_CHANGED"] = "second call"
    os.environ["RPP_PROBE_NEW"] = "second call"
    names = ("RPP_PROBE_GONE", "RPP_PROBE_CHANGED", "RPP_PROBE_NEW", "RPP_PROBE_ENV")
    seen = [run(os.getenv, 1, n, env={"RPP_PROBE_ENV": "env="})[0] for n in names]
    print(first + [*seen])
""")


def test_each_call_gives_the_ranks_the_callers_environment_of_that_call():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1] == str(["server start", None, "second call", "second call", "env="])
