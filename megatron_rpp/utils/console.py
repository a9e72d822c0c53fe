"""The console: the project's own lines on the terminal, everything else in ``run.log``.

    console.setup(output_dir / "run.log", verbose=False)  # by the CLI, before anything heavy is imported
    console.say("[megatron-rpp] starting 2 workers ...")  # the one way the project prints
    console.say("[megatron-rpp] WARNING ...", err=True)
    tqdm(file=console.terminal())                         # a progress bar on the terminal

Quiet (the default): file descriptors 1 and 2 of the process are pointed at ``run.log``, so
every third-party write lands there — Python warnings and logging, vLLM's and Ray's loggers,
library progress bars, raw writes of C++ code, child processes. The terminal is kept as
duplicates of the old descriptors; only :func:`say` and what is given :func:`terminal` write
to it. Every line said is copied into ``run.log`` too, so the log reads as the whole story.
Ray workers send their output to ``<output_dir>/logs/rank_XXXXX.log``
(:func:`redirect_process_output`, used by ``trainer/group.py``) instead of the driver.

Verbose (``megatron-rpp train --verbose`` or ``MEGATRON_RPP_VERBOSE=1``): nothing is
redirected; third-party output reaches the terminal as it would without this module, and
:func:`say` still copies its lines into ``run.log``.

Without :func:`setup` (library use, tests) :func:`say` prints to ``sys.stdout`` /
``sys.stderr``.
"""
from __future__ import annotations

import faulthandler
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

VERBOSE_ENV = "MEGATRON_RPP_VERBOSE"
PREFIX = "[megatron-rpp]"


@dataclass
class _State:
    out: TextIO  # the terminal's stdout (a duplicate of fd 1 when quiet)
    err: TextIO  # the terminal's stderr
    log: TextIO  # run.log, our own handle (appends, like fds 1 and 2 when quiet)
    log_path: Path
    verbose: bool


_state: _State | None = None


def verbose_requested(flag: bool = False) -> bool:
    """``--verbose`` given, or ``MEGATRON_RPP_VERBOSE`` set to 1/true/yes."""
    return flag or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def is_quiet() -> bool:
    """Third-party output goes to a log file (set up and not verbose)."""
    return _state is not None and not _state.verbose


def log_path() -> Path | None:
    """The run.log of this process, when set up."""
    return _state.log_path if _state else None


def _open_append(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def _point_fds_at(path: Path) -> None:
    """Point fds 1 and 2 (and so sys.stdout / sys.stderr and every child) at ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = _open_append(path)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    for stream in (sys.stdout, sys.stderr):  # a file now: flush per line, keep the order of writes
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)


def _dup_stream(fd: int, like: TextIO) -> TextIO:
    encoding = getattr(like, "encoding", None) or "utf-8"
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=encoding, errors="backslashreplace")


def setup(run_log: str | Path, *, verbose: bool = False) -> None:
    """Start the console for a run: ``run_log`` gets a header, then (quiet) all third-party output.

    Idempotent per process: a second call only switches to the new log file.
    """
    global _state
    run_log = Path(run_log)
    if _state is not None:
        close()
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # Ray workers and child processes see the same choice
        out, err = sys.stdout, sys.stderr
    else:
        out, err = _dup_stream(1, sys.stdout), _dup_stream(2, sys.stderr)
    log = os.fdopen(_open_append(run_log), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    log.write(f"\n===== megatron-rpp {' '.join(sys.argv[1:])} | {time.strftime('%Y-%m-%d %H:%M:%S')} "
              f"| pid {os.getpid()} =====\n")
    if not verbose:
        _point_fds_at(run_log)
        faulthandler.enable(file=err)  # a crash in native code still shows its Python stack here
    _state = _State(out=out, err=err, log=log, log_path=run_log, verbose=verbose)


def close() -> None:
    """Stop writing to run.log through our handle (fds 1 and 2 stay where they are)."""
    global _state
    if _state is not None:
        _state.log.close()
        _state = None


def terminal(err: bool = False) -> TextIO:
    """The terminal's stdout (or stderr), for a progress bar: never run.log."""
    if _state is None:
        return sys.stderr if err else sys.stdout
    return _state.err if err else _state.out


def say(message: str, *, err: bool = False) -> None:
    """Print one of the project's lines: to the terminal (stdout, or stderr with ``err``) and run.log.

    A progress bar on the terminal is cleared first and redrawn after.
    """
    stream = terminal(err)
    _write_around_bars(stream, message)
    if _state is not None:
        _state.log.write(message + "\n")


def log_only(text: str) -> None:
    """Write to run.log only (e.g. the traceback behind a one-line error)."""
    if _state is not None:
        _state.log.write(text if text.endswith("\n") else text + "\n")


def _write_around_bars(stream: TextIO, message: str) -> None:
    tqdm_mod = sys.modules.get("tqdm")  # only if a bar can exist (tqdm imported by Progress)
    if tqdm_mod is None:
        stream.write(message + "\n")
        stream.flush()
        return
    with tqdm_mod.tqdm.external_write_mode(file=terminal()):
        stream.write(message + "\n")
        stream.flush()


def rank_log_path(output_dir: str | Path, rank: int) -> Path:
    """``<output_dir>/logs/rank_00003.log``: where worker rank 3 writes its output when quiet."""
    return Path(output_dir) / "logs" / f"rank_{rank:05d}.log"


def redirect_process_output(path: str | Path) -> None:
    """Point this process's fds 1 and 2 at ``path`` (appending), e.g. inside a Ray worker actor."""
    path = Path(path)
    _point_fds_at(path)
    os.write(1, f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} =====\n".encode())
    faulthandler.enable(file=sys.stderr)


def describe(exc: BaseException) -> str:
    """``"TypeName: message"`` of an exception, for one-line errors."""
    return f"{type(exc).__name__}: {exc}"
