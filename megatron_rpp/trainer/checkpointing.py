"""Periodic training checkpoints: atomic, self-validating, keep-last-K, resumable.

Layout under ``<output_dir>/checkpoints/``::

    step_00000004/                  one complete checkpoint (the name carries the step)
        model_optim/                Megatron dist checkpoint of policy + optimizer (all ranks write)
        rng/rank_00000.pkl ...      per-rank RNG states
        trainer_state.json          controller state + manifest (written last)
    step_00000006.tmp/              a save in progress (or killed mid-write): never read
    latest                          text file naming the newest complete checkpoint (updated last)

A save writes everything into ``step_N.tmp/``, writes ``trainer_state.json`` (which
lists every file with its size) last, fsyncs, renames the folder to ``step_N`` and
only then points ``latest`` at it (write-to-temp + ``os.replace``). Old checkpoints
beyond the newest ``keep`` are deleted after that. A checkpoint is *complete* when its
``trainer_state.json`` parses and every file of its manifest exists with the recorded
size, so a folder truncated by a crash or a full disk is skipped by ``resume=auto``
(with a warning) instead of being loaded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any
from megatron_rpp.utils import console

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d{8})$")


class ResumeError(RuntimeError):
    """A requested checkpoint cannot be resumed from."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _manifest(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _fsync_tree(folder: Path) -> None:
    for p in [*folder.rglob("*"), folder]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def begin_save(output_dir: str | Path, step: int) -> Path:
    """A fresh ``step_N.tmp`` folder for the workers to write into (a stale one is removed)."""
    tmp = checkpoint_root(output_dir) / (checkpoint_name(step) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    return tmp


def finish_save(tmp: Path, state: dict[str, Any], keep: int) -> Path:
    """Seal the folder the workers wrote: manifest + state, fsync, rename, ``latest``, prune."""
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    body = {"format_version": FORMAT_VERSION, **state, "manifest": _manifest(tmp)}
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(body, f, indent=1)
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again after a resume
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_text_atomic(final.parent / "latest", final.name + "\n")
    prune(final.parent, keep)
    return final


def validate(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json`` if the folder is complete; raises ResumeError if not."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ResumeError(f"{folder}: no readable {STATE_FILE} ({e})") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise ResumeError(f"{folder}: checkpoint format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
    for rel, size in state["manifest"].items():
        f = folder / rel
        if not f.is_file():
            raise ResumeError(f"{folder}: missing file {rel}")
        if f.stat().st_size != size:
            raise ResumeError(f"{folder}: {rel} has {f.stat().st_size} bytes, the manifest says {size}")
    return state


def complete_checkpoints(root: Path, *, warn: bool = True) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``root``, oldest first."""
    found = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        m = _NAME.match(p.name)
        if not (m and p.is_dir()):
            continue
        try:
            validate(p)
        except ResumeError as e:
            if warn:
                console.say(f"{console.PREFIX} ignoring incomplete checkpoint: {e}", err=True)
            continue
        found.append((int(m.group(1)), p))
    return found


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and stale ``.tmp`` folders."""
    complete = complete_checkpoints(root, warn=False)
    for _, p in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(p)
    newest = complete[-1][0] if complete else -1
    for p in root.glob("step_*.tmp"):
        m = _NAME.match(p.name[: -len(".tmp")])
        if m and int(m.group(1)) < newest:
            shutil.rmtree(p)


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from for ``trainer.resume`` (None: start fresh).

    ``none``: start fresh; an output directory that already holds checkpoints is an
    error (nothing of an earlier run is overwritten silently). ``auto``: the newest
    complete checkpoint, or a fresh start when there is none. Anything else: the path
    of one checkpoint folder, which must be complete.
    """
    root = checkpoint_root(output_dir)
    if resume == "none":
        if complete_checkpoints(root, warn=False):
            raise ResumeError(
                f"{root} holds checkpoints of an earlier run; set trainer.resume=auto to continue it, "
                "or use another trainer.output_dir")
        return None
    if resume == "auto":
        complete = complete_checkpoints(root)
        return complete[-1][1] if complete else None
    folder = Path(resume)
    validate(folder)
    return folder
