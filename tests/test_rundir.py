"""The run directory layout: checkpoint names, completeness, the newest complete checkpoint."""

from pathlib import Path

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


def fake_checkpoint(run, step: int, files: dict[str, bytes], run_id: str = "r1"):
    ckpt = rundir.checkpoint_dir(run, step)
    for name, data in files.items():
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / name).write_bytes(data)
    rundir.write_complete(ckpt, step, run_id)
    return ckpt


DEEPSPEED_LAYOUT = {"adapter_model.safetensors": b"a" * 100, "latest": b"global_step4",
                    "global_step4/mp_rank_00_model_states.pt": b"m" * 300,
                    "global_step4/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": b"o" * 500}


def test_the_manifest_covers_subdirectories_and_names_what_is_wrong(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 4, DEEPSPEED_LAYOUT)
    marker = rundir.read_complete(ckpt)
    assert marker["step"] == 4 and marker["run_id"] == "r1" and set(marker["files"]) == set(DEEPSPEED_LAYOUT)
    assert rundir.verify(ckpt) is None
    shard = ckpt / "global_step4/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"o" * 499 + b"x")  # same size, other bytes
    assert rundir.verify(ckpt) == ("global_step4/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt does not match "
                                   "its checksum (corrupted or rewritten)")
    shard.write_bytes(b"o" * 500)
    (ckpt / "global_step4" / "stray.pt").write_bytes(b"from another save")
    assert rundir.verify(ckpt) == "global_step4/stray.pt is not in the manifest (a file of another save)"
    (ckpt / "global_step4" / "stray.pt").unlink()
    (ckpt / "latest").unlink()
    assert rundir.verify(ckpt) == "latest is missing"


def test_rotation_keeps_the_newest_complete_checkpoints_and_deletes_by_rename(tmp_path, monkeypatch):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step, {"w": b"x"})
    rundir.checkpoint_dir(tmp_path, 8).mkdir()  # a save in progress: not complete, not rotated away
    renamed = []
    real_rmtree = rundir.shutil.rmtree
    monkeypatch.setattr(rundir.shutil, "rmtree", lambda p, **k: renamed.append(Path(p).name) or real_rmtree(p, **k))
    assert rundir.rotate(tmp_path, keep=2) == ["checkpoint-2"]
    assert renamed == ["checkpoint-2.deleting"]  # out of the checkpoint namespace before deletion
    assert [p.name for p in rundir.checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert rundir.rotate(tmp_path, keep=1) == ["checkpoint-4"]
    assert [p.name for p in rundir.complete_checkpoints(tmp_path)] == ["checkpoint-6"]


def test_leftovers_are_removed_and_earlier_runs_set_aside(tmp_path):
    fake_checkpoint(tmp_path, 2, {"w": b"x"})
    rundir.checkpoint_dir(tmp_path, 4).mkdir()  # killed save
    (tmp_path / "checkpoint-1.deleting").mkdir()  # killed deletion
    assert sorted(rundir.remove_leftovers(tmp_path)) == ["checkpoint-1.deleting", "checkpoint-4"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]
    rundir.write_run_id(tmp_path, "abc")
    dest = rundir.set_aside(tmp_path, [tmp_path / "checkpoint-2", rundir.run_info_path(tmp_path)], "abc")
    assert dest.parent == tmp_path / rundir.SUPERSEDED and dest.name.endswith("-abc")
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint-2", "run.json"] and rundir.read_run_id(tmp_path) is None
    assert rundir.set_aside(tmp_path, [], "abc") != dest  # the same second: a second directory, nothing overwritten
