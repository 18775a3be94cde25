"""scripts/bench_quality.py: arm selection, every arm's training config, the claims' verdicts on made-up numbers,
and two arms end to end on the micro model (report files, resume, reuse of a finished run, refusal to mix)."""

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "scripts" / "bench_quality.py")
bq = sys.modules["bench_quality"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(bq)

LENGTHS = (256, 512, 1024, 2048)


def test_select_arms():
    assert [a.name for a in bq.select_arms("b")] == [f"b-{t}{f}" for t in ("linear", "ntk", "dynamic", "yarn")
                                                     for f in (4, 8)]
    assert [a.name for a in bq.select_arms("c-yarn,a")] == ["a", "c-yarn"]  # ARMS order
    assert bq.select_arms("all") == list(bq.ARMS)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown arm"):
        bq.select_arms("a,g-yarn")


def test_every_fine_tuning_arm_is_a_valid_quickstart_run(tmp_path):
    args = bq.parse_args(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--runs", str(tmp_path)])
    base = bq.load_config(args.config)
    for arm in (a for a in bq.ARMS if a.trains):
        cfg = bq.arm_config(arm, args, base)
        assert cfg.train.max_steps == 60 and cfg.train.seq_len == 1024 and cfg.eval.lengths == []
        assert (cfg.rope.rope_type, cfg.rope.factor, cfg.attention.type) == (arm.rope, 4.0, arm.attention)
        assert cfg.train.output_dir == str(tmp_path / arm.name)
        assert cfg.lora.enabled == arm.lora
        assert cfg.lora.trainable_params == (["embed", "norm"] if arm.embed_norm else [])
        assert cfg.train.learning_rate == (2e-4 if arm.lora else 5e-5)
        assert (cfg.train.seed, cfg.train.lr_scheduler_type, cfg.train.warmup_steps) == (42, "cosine", 10)
    assert bq.rope_dict(bq.ARM_BY_NAME["b-dynamic8"], base) == {
        "rope_type": "dynamic", "factor": 8.0, "original_max_position_embeddings": 256}


def _res(**ppl: tuple) -> dict:
    return {arm: {"ppl": [{"length": L, "ppl": p} for L, p in zip(LENGTHS, values)]} for arm, values in ppl.items()}


AS_THE_PAPERS_SAY = dict(
    a=(40, 60, 200, 900),
    **{"b-linear4": (50, 52, 55, 300), "b-linear8": (60, 62, 64, 66)},
    **{f"b-{t}{f}": (41, 42, 43, 44) for t in ("ntk", "yarn") for f in (4, 8)},
    **{"c-linear": (39, 38, 37, 60), "d-linear": (39, 38, 37.5, 58), "c-yarn": (38, 37, 36, 50),
       "d-yarn": (38, 37, 36.5, 49), "e-yarn": (45, 44, 44, 70), "f-yarn": (37, 36, 35, 50)},
    **{a.name: (40, 41, 42, 43) for a in bq.ARMS if a.name.startswith("g-")},
)
OTHERWISE = dict(
    a=(40, 41, 42, 45),
    **{f"b-linear{f}": (40, 40.5, 41, 42) for f in (4, 8)},
    **{f"b-{t}{f}": (41, 43, 45, 50) for t in ("ntk", "yarn") for f in (4, 8)},
    **{"c-linear": (39, 40, 45, 60), "d-linear": (39, 40, 40, 58), "c-yarn": (38, 39, 44, 50),
       "d-yarn": (38, 39, 39, 49), "e-yarn": (38, 39, 44, 50), "f-yarn": (37, 38, 40, 50)},
    **{a.name: (40, 60, 80, 90) for a in bq.ARMS if a.name.startswith("g-")},
)


def test_claims_follow_the_numbers():
    verdicts = lambda res: [c["verdict"] for c in bq.judge(res, 256, 1024)]  # noqa: E731
    assert verdicts(_res(**AS_THE_PAPERS_SAY)) == ["CONFIRMED"] * 7
    assert verdicts(_res(**OTHERWISE)) == ["REFUTED"] * 7
    mixed = _res(**{**AS_THE_PAPERS_SAY, "b-linear8": OTHERWISE["b-linear8"], "a": (40, 45, 55, 65),
                    "c-linear": OTHERWISE["c-linear"]})
    assert verdicts(mixed) == ["MIXED"] * 5 + ["CONFIRMED"] * 2
    assert verdicts(_res(a=AS_THE_PAPERS_SAY["a"])) == ["CONFIRMED"] + ["NOT MEASURED"] * 6
    claim = bq.judge(_res(**AS_THE_PAPERS_SAY), 256, 1024)[0]
    assert claim["checks"][0].startswith("(a) PPL@2048 / PPL@256 = 900.00 / 40.00 = 22.50")


def test_arms_measured_elsewhere_are_named_in_the_report():
    here = bq.machine()
    there = {**here, "cpu": "Some Other CPU", "transformers": "0.0"}
    res = {"a": {"machine": here}, "b-ntk4": {"machine": there}, "c-yarn": {"machine": there}, "d-yarn": {}}
    assert bq._other_machines(res, here) == [
        "Arms b-ntk4, c-yarn were measured on: " + bq._machine_text(there) + ".  ",
        "Arms d-yarn were measured on: not recorded.  "]
    assert "Some Other CPU" in bq._machine_text(there) and "transformers 0.0" in bq._machine_text(there)
    assert bq._other_machines({"a": {"machine": here}}, here) == []


def test_two_arms_end_to_end_then_resume(train_config, corpus, tmp_path, monkeypatch, capsys, caplog):
    config = tmp_path / "micro.yaml"  # the script sets train.output_dir, max_steps and save_steps per arm
    config.write_text(yaml.safe_dump(train_config(
        "unused", rope={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
        data={"train": str(corpus), "eval": str(corpus), "num_proc": 1},
        train={"per_device_train_batch_size": 1, "warmup_steps": 0})))
    out, runs = tmp_path / "out" / "quality", tmp_path / "runs"
    argv = ["--config", str(config), "--arms", "a,c-yarn", "--train-tokens", "256", "--eval-tokens", "200",
            "--lengths", "64,128", "--passkey-lengths", "256", "--passkey-depths", "0.5", "--passkey-trials", "1",
            "--out", str(out), "--runs", str(runs), "--threads", "1", "--tasks", "multikey,vartrack",
            "--task-lengths", "1024", "--task-trials", "1", "--position-length", "128", "--position-docs", "2"]
    assert bq.main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"a.json", "c-yarn.json", "extras"}
    x = json.loads((out / "extras" / "c-yarn.json").read_text())
    assert set(x["tasks"]) == {"multikey", "vartrack"} and x["tasks"]["vartrack"]["lengths"] == [1024]
    assert x["tasks"]["multikey"]["cells"][0]["trials"] == 1 and x["position_loss"]["documents"] == 2
    assert [b["start"] for b in x["position_loss"]["buckets"]] == list(range(1, 128, 4))
    c = json.loads((out / "c-yarn.json").read_text())
    assert c["train"]["steps"] == 2 and c["train"]["tokens"] == 256 and c["train"]["wall_s"] > 0
    assert 0 < c["trainable_params"] < c["total_params"] and c["machine"] == bq.machine()
    assert [r["length"] for r in c["ppl"]] == [64, 128] and c["passkey"]["accuracy_by_length"].keys() == {"256"}
    assert (runs / "c-yarn" / "final" / "longctx.json").is_file()

    doc = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert list(doc["arms"]) == ["a", "c-yarn"] and doc["machine"]["cores"] >= 1 and doc["command"] in \
        (tmp_path / "out" / "quality.md").read_text()
    verdicts = [c["verdict"] for c in doc["claims"]]
    assert verdicts[0] in ("CONFIRMED", "REFUTED", "MIXED") and verdicts[3] in ("CONFIRMED", "REFUTED", "MIXED")
    assert verdicts[1:3] == ["NOT MEASURED"] * 2 and verdicts[4:] == ["NOT MEASURED"] * 3
    md = (tmp_path / "out" / "quality.md").read_text()
    assert "## Claims" in md and f"Direct extrapolation collapses past the trained length: {verdicts[0]}" in md
    assert md.count("\n| a | ") == md.count("\n| c-yarn | ") == 2  # the PPL table and the extras table
    assert (tmp_path / "out" / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| arm | multikey@1024 | vartrack@1024 | loss < 64 | loss last 64 |" in md
    assert (tmp_path / "out" / "quality-position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def fail(*a, **k):
        raise AssertionError("a finished arm ran again")

    monkeypatch.setattr(bq, "load_arm", fail)  # a rerun skips both arms
    caplog.set_level(logging.INFO, logger="longctx")
    assert bq.main(argv) == 0
    assert "a: done before, skipped" in caplog.text and "c-yarn: done before, skipped" in caplog.text
    (out / "extras" / "a.json").unlink()  # extras measured later keep the arm's stored PPL and passkey
    monkeypatch.undo()
    monkeypatch.setattr(bq, "measure", fail)
    assert bq.main(argv) == 0 and (out / "extras" / "a.json").is_file()
    monkeypatch.setattr(bq, "load_arm", fail)
    assert bq.main(argv + ["--eval-tokens", "300"]) == 2  # other settings: refused
    assert "pass --force to redo it" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(bq, "train", fail)  # --force measures again but reuses the finished run
    assert bq.main(argv + ["--force"]) == 0
    assert json.loads((out / "c-yarn.json").read_text())["train"]["wall_s"] == c["train"]["wall_s"]


def test_method_arms_end_to_end(micro, corpus, tmp_path, caplog):
    """A training-free method arm (two methods composed) and an ALiBi arm on a micro MPT; without --alibi-model the
    ALiBi arms are skipped, named in the log."""
    from micro import make_micro_base

    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": str(micro)}, "attention": {"type": "full"},
                                      "data": {"train": str(corpus), "eval": str(corpus), "num_proc": 1},
                                      "train": {"seq_len": 128}}))
    out = tmp_path / "out" / "quality"
    argv = ["--config", str(config), "--arms", "g-rerope-logn,h-ntk-alibi2", "--eval-tokens", "200", "--lengths",
            "64,128", "--passkey-lengths", "256", "--passkey-depths", "0.5", "--passkey-trials", "1", "--out",
            str(out), "--runs", str(tmp_path / "runs"), "--threads", "1", "--no-extras"]
    caplog.set_level(logging.INFO, logger="longctx")
    assert bq.main(argv) == 0
    assert "h-ntk-alibi2: skipped (needs --alibi-model)" in caplog.text
    alibi = make_micro_base(tmp_path / "mpt", max_pos=64, family="mpt")
    assert bq.main(argv + ["--alibi-model", str(alibi)]) == 0
    g = json.loads((out / "g-rerope-logn.json").read_text())
    assert g["methods"] == [{"name": "rerope"}, {"name": "logn"}] and g["trainable_params"] == 0
    assert [r["length"] for r in g["ppl"]] == [64, 128] and all(r["ppl"] > 1 for r in g["ppl"])
    h = json.loads((out / "h-ntk-alibi2.json").read_text())
    assert h["settings"]["model"] == str(alibi) and h["ppl"][0]["ppl"] > 1
    md = (tmp_path / "out" / "quality.md").read_text()
    assert "| g-rerope-logn | ReRoPE + log-n (Su's patch) | rerope + logn |" in md
    assert "| h-ntk-alibi2 | NTK-ALiBi a = 2 | ntk_alibi alpha=2 |" in md
