"""Score a batch of responses with a rule reward, in parallel, failing loudly.

A reward that raises stops the run with an error naming the sample (index, prompt,
response); a NaN or infinite reward is an error too — never swallowed or zeroed.
"""
from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

from megatron_rpp.algorithms.registry import load_object

RewardFn = Callable[[str, str, dict], float]


class RewardError(RuntimeError):
    """A reward function failed or returned a non-finite value."""


def resolve_reward(spec: str) -> RewardFn:
    """A registered reward name or ``path/to/file.py:fn`` / ``pkg.module:fn``."""
    from megatron_rpp.rewards.rules import REWARDS

    if ":" in spec:
        fn = load_object(spec)
        if not callable(fn):
            raise RewardError(f"reward.function {spec!r} is not callable")
        return fn
    return REWARDS.get(spec)


def _score_chunk(spec: str, items: list[tuple[int, str, str, dict]]) -> list[tuple[int, float | None, str | None]]:
    fn = resolve_reward(spec)
    out = []
    for idx, prompt, response, sample in items:
        try:
            out.append((idx, float(fn(prompt, response, sample)), None))
        except Exception as e:  # reported with the sample by the caller
            out.append((idx, None, f"{type(e).__name__}: {e}"))
    return out


def describe_sample(idx: int, prompt: str, response: str) -> str:
    """``sample 3: prompt='...' response='...'`` (each cut at 300 characters), for error messages."""

    def cut(s: str) -> str:
        return s if len(s) <= 300 else s[:300] + "..."

    return f"sample {idx}: prompt={cut(prompt)!r} response={cut(response)!r}"


class RewardScorer:
    """Scores (prompt, response, sample) triples with one reward function.

    ``num_workers > 0`` scores in a pool of that many processes (started once, with
    the spawn method so no threads or engines are inherited); 0 scores in-process.
    """

    def __init__(self, spec: str, num_workers: int = 0):
        self.spec = spec
        resolve_reward(spec)  # fail at start-up on a bad name or file, not mid-run
        self._pool = None
        if num_workers > 0:
            import multiprocessing as mp

            self._pool = ProcessPoolExecutor(num_workers, mp_context=mp.get_context("spawn"))
        self._num_workers = max(num_workers, 1)

    def __call__(self, prompts: list[str], responses: list[str], samples: list[dict]) -> list[float]:
        items = [(i, p, r, s) for i, (p, r, s) in enumerate(zip(prompts, responses, samples))]
        if self._pool is None:
            results = _score_chunk(self.spec, items)
        else:
            chunks = [items[k :: self._num_workers] for k in range(self._num_workers)]
            futures = [self._pool.submit(_score_chunk, self.spec, c) for c in chunks if c]
            results = [r for f in futures for r in f.result()]
        rewards = [0.0] * len(items)
        for idx, value, err in results:
            p, r = items[idx][1], items[idx][2]
            if err is not None:
                raise RewardError(f"reward {self.spec!r} raised on {describe_sample(idx, p, r)}: {err}")
            if value is None or not math.isfinite(value):
                raise RewardError(f"reward {self.spec!r} returned {value!r} (not finite) on "
                                  f"{describe_sample(idx, p, r)}")
            rewards[idx] = value
        return rewards

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
