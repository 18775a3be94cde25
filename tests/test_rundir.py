"""The run directory layout: checkpoint names, completeness, the newest complete checkpoint."""

from longctx import rundir
from longctx.sweep.state import last_checkpoint


def test_checkpoints_sorted_by_step_and_only_complete_ones_count(tmp_path):
    for step in (10, 9, 100):
        rundir.checkpoint_dir(tmp_path, step).mkdir()
    for step in (9, 100):
        (rundir.checkpoint_dir(tmp_path, step) / rundir.COMPLETE).write_text("{}")
    (tmp_path / "checkpoint-7.tmp").mkdir()  # not a checkpoint name
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-8").write_text("a file, not a directory")
    assert [p.name for p in rundir.checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert [p.name for p in rundir.complete_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-100"]
    assert last_checkpoint(tmp_path).name == "checkpoint-100"  # numeric order, not "checkpoint-9" > "checkpoint-100"
    assert rundir.checkpoint_step(tmp_path / "checkpoint-100") == 100
    assert rundir.checkpoint_step(tmp_path / "checkpoint-7.tmp") is None


def test_empty_or_missing_run_directory(tmp_path):
    assert rundir.checkpoints(tmp_path / "missing") == [] and last_checkpoint(tmp_path) is None
