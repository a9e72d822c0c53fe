"""Prompt datasets: JSONL / Parquet files or reasoning-gym tasks, chat-templated and tokenized.

Every row becomes a ``dict`` sample: ``sample[prompt_field]`` is the prompt text and
every other field is passed to the reward function unchanged. A malformed row is an
error naming the file and line; prompts longer than ``max_prompt_length`` tokens are
skipped and counted (never silently truncated).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_rpp.config.schema import DataConfig


class DatasetError(ValueError):
    """A prompt file or row is malformed."""


def read_jsonl(path: str | Path, prompt_field: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if not isinstance(row.get(prompt_field), str) or not row[prompt_field].strip():
                raise DatasetError(f"{path}:{lineno}: field {prompt_field!r} missing or not a non-empty string")
            rows.append(row)
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def read_parquet(path: str | Path, prompt_field: str) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    for i, row in enumerate(rows):
        if not isinstance(row.get(prompt_field), str) or not row[prompt_field].strip():
            raise DatasetError(f"{path}: row {i}: field {prompt_field!r} missing or not a non-empty string")
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def reasoning_gym_rows(task: str, size: int, seed: int, task_config: dict) -> list[dict]:
    """reasoning-gym entries as samples: ``prompt`` = the question; the entry kept for scoring."""
    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **task_config)
    except Exception as e:
        raise DatasetError(f"reasoning-gym task {task!r} with {task_config}: {e}") from e
    return [{"prompt": e["question"], "answer": e["answer"], "entry": _jsonable(e)} for e in ds]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def load_rows(cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) for a data config."""
    if cfg.source == "reasoning_gym":
        train = reasoning_gym_rows(cfg.task, cfg.num_train_prompts, cfg.seed, cfg.task_config)
        evals = reasoning_gym_rows(cfg.task, cfg.num_eval_prompts, cfg.seed + 10_000, cfg.task_config) if cfg.num_eval_prompts else []
        return train, evals
    reader = read_jsonl if cfg.source == "jsonl" else read_parquet
    rows = reader(cfg.path, cfg.prompt_field)
    if cfg.eval_path:
        return rows, reader(cfg.eval_path, cfg.prompt_field)
    n = min(cfg.num_eval_prompts, len(rows) // 5)
    return rows[n:], rows[:n]


@dataclass
class Prompt:
    """A tokenized prompt. ``text`` is the raw prompt; ``sample`` is the whole row."""

    text: str
    token_ids: list[int]
    sample: dict


def apply_chat_template(tokenizer, text: str, system_prompt: str = "") -> list[int]:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": text}
    ]
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    return tokenizer(text)["input_ids"]


def tokenize_prompts(rows: list[dict], tokenizer, cfg: DataConfig, max_prompt_length: int) -> tuple[list[Prompt], int]:
    """Chat-template and tokenize rows; returns (prompts, number skipped as too long)."""
    prompts, skipped = [], 0
    for row in rows:
        text = row[cfg.prompt_field] + cfg.prompt_suffix
        ids = apply_chat_template(tokenizer, text, cfg.system_prompt)
        if len(ids) > max_prompt_length:
            skipped += 1
            continue
        prompts.append(Prompt(text=text, token_ids=ids, sample=row))
    return prompts, skipped


@dataclass
class PromptStream:
    """Shuffled, endless batches of prompts with a resumable position.

    The order of epoch e is a permutation seeded by (seed, e); ``state_dict`` holds
    (epoch, position) so a resumed run continues with exactly the next prompts.
    """

    prompts: list[Prompt]
    seed: int
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise DatasetError("no prompts left after filtering (are they longer than model.max_prompt_length?)")
        self._reshuffle()

    def _reshuffle(self) -> None:
        self._order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(self._order)

    def next_batch(self, n: int) -> list[Prompt]:
        out = []
        while len(out) < n:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._reshuffle()
            out.append(self.prompts[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._reshuffle()
