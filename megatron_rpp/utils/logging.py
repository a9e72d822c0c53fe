"""Metrics sinks: ``metrics.jsonl`` (one object per step), TensorBoard, a progress bar, a reward plot."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

from megatron_rpp.utils import console


class Timer:
    """``with timer("generate"): ...`` accumulates seconds under ``timing/generate``; with
    ``cpu=True`` also this process's CPU seconds (all its threads) under ``cpu_seconds/generate``
    (CPU utilisation = cpu_seconds / timing: 2.0 = two cores busy)."""

    def __init__(self, cpu: bool = False):
        self.times: dict[str, float] = {}
        self.cpu = cpu

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.times[f"timing/{name}"] = self.times.get(f"timing/{name}", 0.0) + time.perf_counter() - t0
            if self.cpu:
                key = f"cpu_seconds/{name}"
                self.times[key] = self.times.get(key, 0.0) + time.process_time() - c0

    def pop(self) -> dict[str, float]:
        out, self.times = self.times, {}
        return out


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None):
        """``resume_step`` None: a fresh run (an old metrics.jsonl is replaced); else the rows up to
        that step are kept (rewritten atomically) and later ones dropped — they are redone."""
        self.dir = Path(output_dir)
        self.path = self.dir / "metrics.jsonl"
        self.history: list[dict] = []
        if resume_step is not None and self.path.exists():
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut short by a kill: that step is redone
                    console.say(f"{console.PREFIX} {self.path}:{n}: dropping an incomplete row", err=True)
                    continue
                if row["step"] <= resume_step:
                    self.history.append(row)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        os.replace(tmp, self.path)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except Exception:  # tensorboard not installed: jsonl only
                self._tb = None

    def log(self, step: int, metrics: dict) -> None:
        """Append the row of ``step``; a row with an evaluation also prints its one-line summary."""
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        self.history.append(row)
        if "eval/reward_mean" in row:
            console.say(eval_summary(row))
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def eval_summary(row: dict) -> str:
    """``[megatron-rpp] eval at step 6: reward 0.266, response length 5.3 tokens``."""
    length = row.get("eval/response_length_mean")
    tail = f", response length {length:.1f} tokens" if length is not None else ""
    return f"{console.PREFIX} eval at step {row['step']}: reward {row['eval/reward_mean']:.3f}{tail}"


def plot_rewards(history: list[dict], path: str | Path) -> bool:
    """Training reward (and eval reward where present) against step, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    steps = [h["step"] for h in history if "reward/mean" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["reward/mean"] for h in history if "reward/mean" in h], label="train reward (mean)")
    ev = [(h["step"], h["eval/reward_mean"]) for h in history if "eval/reward_mean" in h]
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out eval reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


class Progress:
    """A tqdm bar on the terminal (never run.log) with ETA, the last reward, KL and eval reward;
    a no-op when disabled."""

    def __init__(self, total: int, enabled: bool = True, initial: int = 0):
        self._bar = None
        self._post: dict[str, str] = {}
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="REINFORCE++", unit="step", dynamic_ncols=True,
                             file=console.terminal())

    def update(self, metrics: dict) -> None:
        """Advance one step; the postfix keeps the last eval reward until the next one."""
        if self._bar is None:
            return
        self._post["reward"] = f"{metrics.get('reward/mean', float('nan')):.3f}"
        if "kl/mean" in metrics:
            self._post["kl"] = f"{metrics['kl/mean']:.2g}"
        if "eval/reward_mean" in metrics:
            self._post["eval"] = f"{metrics['eval/reward_mean']:.3f}"
        self._bar.set_postfix(self._post)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
