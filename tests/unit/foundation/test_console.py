"""The quiet console: third-party output of every kind goes to run.log, the project's lines to the terminal.

Each case runs in a fresh Python process whose stdout/stderr are pipes (standing in for the
terminal), because the console rewires file descriptors 1 and 2 of the process.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_rpp.utils import console

ROOT = Path(__file__).parents[3]

# Every route third-party output takes: print, raw fd writes (C++), warnings, logging, a child process.
NOISE = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    print("NOISE print stdout")
    print("NOISE print stderr", file=sys.stderr)
    os.write(1, b"NOISE raw fd 1\\n")
    os.write(2, b"NOISE raw fd 2\\n")
    warnings.warn("NOISE warnings.warn")
    logging.getLogger("vllm").warning("NOISE logging")
    subprocess.run([sys.executable, "-c", "print('NOISE child process')"], check=True)
""")
NOISE_LINES = ["NOISE print stdout", "NOISE print stderr", "NOISE raw fd 1", "NOISE raw fd 2",
               "NOISE warnings.warn", "NOISE logging", "NOISE child process"]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, **env})


def _script(run_log: Path, verbose: bool) -> str:
    return textwrap.dedent(f"""
        import sys
        from megatron_rpp.utils import console
        console.setup({str(run_log)!r}, verbose={verbose})
        console.say("[megatron-rpp] MINE out")
        """) + NOISE + textwrap.dedent("""
        console.say("[megatron-rpp] MINE err", err=True)
        """)


def test_quiet_console_sends_all_third_party_output_to_run_log(tmp_path):
    log = tmp_path / "out" / "run.log"
    proc = _python(_script(log, verbose=False))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[megatron-rpp] MINE out\n"
    assert proc.stderr == "[megatron-rpp] MINE err\n"
    text = log.read_text()
    for line in NOISE_LINES + ["[megatron-rpp] MINE out", "[megatron-rpp] MINE err"]:
        assert line in text, line
    # the project's lines and the third-party ones keep their order in run.log
    assert text.index("MINE out") < text.index("NOISE print stdout") < text.index("NOISE child process") \
        < text.index("MINE err")


def test_verbose_console_shows_everything(tmp_path):
    log = tmp_path / "run.log"
    proc = _python(_script(log, verbose=True))
    both = proc.stdout + proc.stderr
    assert all(line in both for line in NOISE_LINES + ["MINE out", "MINE err"]), both
    text = log.read_text()
    assert "MINE out" in text and "MINE err" in text and "NOISE" not in text  # run.log: the project's lines


def test_without_setup_say_prints_to_sys_streams(capsys):
    console.say("hello")
    console.say("oops", err=True)
    assert capsys.readouterr() == ("hello\n", "oops\n")


def test_verbose_flag_and_env():
    assert console.verbose_requested(True)
    proc = _python("from megatron_rpp.utils import console; print(console.verbose_requested())",
                   MEGATRON_RPP_VERBOSE="1")
    assert proc.stdout.strip() == "True"


def test_worker_output_goes_to_its_rank_log(tmp_path):
    path = console.rank_log_path(tmp_path, 3)
    assert path == tmp_path / "logs" / "rank_00003.log"
    proc = _python(f"from megatron_rpp.utils import console; console.redirect_process_output({str(path)!r})\n"
                   + NOISE)
    assert proc.returncode == 0 and proc.stdout == proc.stderr == ""
    assert all(line in path.read_text() for line in NOISE_LINES)


@pytest.mark.parametrize("user_error", [True, False], ids=["user-error", "unexpected-error"])
def test_cli_errors_reach_the_console_with_their_cause(tmp_path, user_error):
    # train() fails after the console is set up (third-party output already goes to run.log).
    exc = ("__import__('megatron_rpp.rewards.scorer', fromlist=['x']).RewardError('endpoint said no')"
           if user_error else "RuntimeError('boom inside a library')")
    code = textwrap.dedent(f"""
        import sys, warnings
        import megatron_rpp.trainer.loop as loop
        def train(cfg):
            warnings.warn("NOISE before the failure")
            raise {exc}
        loop.train = train
        from megatron_rpp.cli import main
        sys.exit(main(["train", "trainer.output_dir={tmp_path / 'run'}"]))
    """)
    proc = _python(code)
    assert proc.returncode == 1
    assert "NOISE" not in proc.stdout + proc.stderr
    log = (tmp_path / "run" / "run.log").read_text()
    assert "NOISE before the failure" in log and "Traceback" in log  # the whole story in run.log
    if user_error:
        assert proc.stderr == "megatron-rpp: RewardError: endpoint said no\n"
    else:
        assert "megatron-rpp: unexpected error (full log: " in proc.stderr
        assert "Traceback" in proc.stderr and "RuntimeError: boom inside a library" in proc.stderr
