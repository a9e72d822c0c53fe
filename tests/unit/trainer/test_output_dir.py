"""An unwritable or full output directory fails before anything is built."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_rpp.trainer.setup import OutputDirError, check_output_dir


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputDirError, match="a_file/run.*not writable"):
        check_output_dir(blocker / "run")


def test_full_disk(tmp_path):
    with pytest.raises(OutputDirError, match="MiB free"):
        check_output_dir(tmp_path / "run", min_free_bytes=1 << 60)
    assert check_output_dir(tmp_path / "ok") == tmp_path / "ok"


def test_cli_fails_before_training_starts(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "megatron_rpp.cli", "train", f"trainer.output_dir={blocker}/run"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[3])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "OutputDirError" in proc.stderr and "trainer.output_dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60  # no model, engine or dataset was built first
