"""Checkpoint folders: atomic publish, manifest validation, keep-last-K, resume selection;
the non-finite step guard; metrics.jsonl on resume."""
from __future__ import annotations

import json

import pytest

from megatron_rpp.trainer import checkpointing as ck
from megatron_rpp.trainer.failures import NonFiniteGuard, NonFiniteStepsError
from megatron_rpp.utils.logging import MetricsLogger


def _save(out, step, keep=2, payload=b"w" * 1000):
    tmp = ck.begin_save(out, step)
    (tmp / "model_optim").mkdir()
    (tmp / "model_optim" / "__0_0.distcp").write_bytes(payload)
    return ck.finish_save(tmp, {"step": step}, keep=keep)


def test_save_publishes_atomically_and_keeps_last_k(tmp_path):
    for step in (2, 4, 6):
        final = _save(tmp_path, step)
        assert final.name == f"step_{step:08d}" and not final.with_name(final.name + ".tmp").exists()
        assert (final.parent / "latest").read_text().strip() == final.name
    root = ck.checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    state = ck.validate(root / "step_00000006")
    assert state["step"] == 6 and state["manifest"] == {"model_optim/__0_0.distcp": 1000}


@pytest.mark.parametrize("damage", ["truncate", "delete", "no_state", "bad_json", "tmp_only"])
def test_resume_auto_skips_incomplete_checkpoints(tmp_path, damage, capsys):
    _save(tmp_path, 2)
    newer = _save(tmp_path, 4)
    f = newer / "model_optim" / "__0_0.distcp"
    if damage == "truncate":
        f.write_bytes(b"w" * 10)
    elif damage == "delete":
        f.unlink()
    elif damage == "no_state":
        (newer / ck.STATE_FILE).unlink()
    elif damage == "bad_json":
        (newer / ck.STATE_FILE).write_text('{"format_version": 1, "manif')
    else:  # killed before the rename: only step_00000004.tmp exists
        newer.rename(newer.with_name(newer.name + ".tmp"))
    chosen = ck.resolve_resume("auto", tmp_path)
    assert chosen.name == "step_00000002"
    if damage != "tmp_only":
        assert "ignoring incomplete checkpoint" in capsys.readouterr().err
        with pytest.raises(ck.ResumeError):
            ck.resolve_resume(str(newer), tmp_path)  # an explicit path must be complete


def test_resume_modes(tmp_path):
    assert ck.resolve_resume("auto", tmp_path) is None  # nothing yet: fresh start
    assert ck.resolve_resume("none", tmp_path) is None
    _save(tmp_path, 3)
    with pytest.raises(ck.ResumeError, match="trainer.resume=auto"):
        ck.resolve_resume("none", tmp_path)  # never overwrite an earlier run silently
    assert ck.resolve_resume(str(ck.checkpoint_root(tmp_path) / "step_00000003"), tmp_path).name == "step_00000003"


def test_resaving_a_step_replaces_it_and_prunes_stale_tmp(tmp_path):
    _save(tmp_path, 2)
    stale = ck.begin_save(tmp_path, 1)  # a save killed long ago
    _save(tmp_path, 2, payload=b"x" * 7)  # the same step again after a resume
    root = ck.checkpoint_root(tmp_path)
    assert not stale.exists()
    assert ck.validate(root / "step_00000002")["manifest"] == {"model_optim/__0_0.distcp": 7}


def test_nonfinite_guard_counts_and_stops():
    g = NonFiniteGuard(3)
    assert g.update([True, False], step=1) == 1
    assert g.update([False], step=2) == 1 and g.in_a_row == 2
    assert g.update([True], step=3) == 0 and g.in_a_row == 0 and g.total == 2  # a good step resets the run
    g.update([False, False], step=4)
    with pytest.raises(NonFiniteStepsError, match="3 optimizer steps in a row"):
        g.update([False], step=5)
    resumed = NonFiniteGuard(3, **g.state_dict())
    assert (resumed.in_a_row, resumed.total) == (3, 5)


def test_metrics_logger_keeps_rows_up_to_resume_step(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(4):
        log.log(step, {"reward/mean": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')  # a row cut short by SIGKILL
    resumed = MetricsLogger(tmp_path, tensorboard=False, resume_step=2)
    assert [r["step"] for r in resumed.history] == [0, 1, 2]
    resumed.log(3, {"reward/mean": 30.0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[-1]["reward/mean"] == 30.0
    fresh = MetricsLogger(tmp_path, tensorboard=False)
    assert fresh.history == [] and (tmp_path / "metrics.jsonl").read_text() == ""
