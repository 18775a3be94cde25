"""The config: strict keys, collected errors with readable messages, YAML round trip, every shipped config valid."""

from pathlib import Path

import pytest
import yaml

import longctx
from longctx.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": {"name_or_path": "data/tiny-base"}, "train": {"seq_len": 1024}}

# (overrides, substrings the one message must contain)
BAD = [
    (["trian.seq_len=3"], ["trian: unknown key (did you mean train?)"]),
    (["rope.factr=2"], ["rope.factr: unknown key (did you mean rope.factor?)"]),
    (["train.lerning_rate=1e-4"], ["did you mean train.learning_rate?"]),
    (["rope.rope_type=yarnn"], ["rope.rope_type: unknown type 'yarnn'", "valid types: none, linear, ntk, dynamic, yarn"]),
    (["rope.rope_type=yarn", "rope.factor=0.5"], ["rope.factor: factor must be >= 1", "got 0.5"]),
    (["rope.rope_type=llama3"], ["rope.low_freq_factor: required for rope_type 'llama3'",
                                 "rope.high_freq_factor: required"]),
    (["rope.rope_type=longrope"], ["rope.short_factor: required for rope_type 'longrope'", "rope.long_factor"]),
    (["rope.rope_type=yarn", "rope.alpha=3"], ["rope.alpha: not a parameter of rope_type 'yarn'", "beta_fast"]),
    (["rope.rope_type=yarn", "rope.original_max_position_embeddings=2048"],
     ["target length 1024", "must be above the original length 2048"]),
    (["rope.factor=2"], ["rope.factor: rope_type 'none' takes no keys; set rope.rope_type to one of linear"]),
    (["rope.rope_type=none", "rope.factr=2"], ["rope.factr: unknown key (did you mean rope.factor?)"]),
    (["rope=3"], ["rope: must be a mapping with rope_type"]),
    (["method.name=rerop"], ["method.name: unknown method 'rerop'; valid methods: consistent_dynamic, rerope, "
                             "leaky_rerope, logn, nbce, ntk_alibi, dynamic_ntk_alibi"]),
    (["method.window=3"], ["method.name: required; one of consistent_dynamic"]),
    (["method.name=rerope", "method.leak=16"], ["method.leak: not a parameter of method 'rerope'; method 'rerope' "
                                                "takes: window"]),
    (["method.name=leaky_rerope", "method.leek=16"], ["method.leek: unknown key (did you mean method.leak?)"]),
    (["method.name=ntk_alibi"], ["method.alpha: required for method 'ntk_alibi'"]),
    (["method.name=nbce", "method.pool=max"], ["method.pool: ", "'min_entropy' or 'mean'", "got 'max'"]),
    (["method.name=consistent_dynamic", "method.factor=0.5"],
     ["method.factor: Input should be greater than or equal to 1, got 0.5"]),
    (["method.name=consistent_dynamic", "rope.rope_type=yarn"],
     ["method: consistent_dynamic computes the rotation itself; rope.rope_type must be none"]),
    (["method.name=rerope", "rope.rope_type=dynamic"], ["method: rerope rotates with one set of frequencies"]),
    (["attention.group_size_ratio=1.5"], ["attention.group_size_ratio: must be in (0, 1], got 1.5"]),
    (["attention.group_size_ratio=0"], ["attention.group_size_ratio: must be in (0, 1], got 0"]),
    (["train.seq_len=1000", "attention.group_size_ratio=0.3"], ["S2 group size 300 does not divide train.seq_len=1000"]),
    (["attention.group_size=7"], ["group size must be an even number", "got 7"]),
    (["model.quantization=4bit", "lora.enabled=false"], ["model.quantization: 4bit (QLoRA) needs lora.enabled: true"]),
    (["model.quantization=8bit"], ["model.quantization: must be '4bit'"]),
    (["model.dtype=fp8"], ["model.dtype: must be 'float32', 'bfloat16' or 'float16', got 'fp8'"]),
    (["train.learning_rate=abc"], ["train.learning_rate", "got 'abc'"]),
    (["train.max_steps=0", "lora.r=0"], ["train.max_steps: must be >= 1, got 0", "lora.r: must be >= 1, got 0"]),
    (["train.bf16=true", "train.fp16=true"], ["train.bf16 and train.fp16: choose at most one"]),
    (["train.deepspeed=configs/deepspeed/nope.json"], ["train.deepspeed: file not found: configs/deepspeed/nope.json"]),
    (["attention.type=sparse"], ["attention.type: must be 's2' or 'full'"]),
    (["eval.lengths=[256, 0]"], ["eval.lengths: every length must be >= 2"]),
    (["model=3"], ["model"]),
    (["train.seq_len"], ["override 'train.seq_len': expected key.path=value"]),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_message(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(data=BASE, overrides=overrides)
    msg = str(info.value)
    for part in expected:
        assert part in msg, f"{part!r} not in:\n{msg}"
    assert "Traceback" not in msg


@pytest.mark.parametrize("overrides,expected", [
    (["rope.rope_type=dynamic", "rope.factor=2"], "rope.rope_type: dynamic changes with batch length"),
    (["method.name=rerope"], "method.name: rerope is training-free (evaluation only"),
])
def test_train_problems(overrides, expected):
    """Valid for evaluation, refused for training: config.train_problems, shared by `train` and `sweep`."""
    from longctx.config import train_problems

    problems = train_problems(load_config(data=BASE, overrides=overrides))
    assert len(problems) == 1 and expected in problems[0]
    assert train_problems(load_config(data=BASE, overrides=["method.name=logn", "rope.rope_type=yarn"])) == []


def test_missing_required_keys_are_named():
    with pytest.raises(ConfigError, match=r"model: required key is missing[\s\S]*train: required key is missing"):
        load_config(data={})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_overrides_parse_yaml_scalars_and_lists():
    cfg = load_config(data=BASE, overrides=["train.learning_rate=1e-4", "eval.lengths=[256, 512]",
                                            "train.deepspeed=null", "lora.target_modules=all-linear"])
    assert cfg.train.learning_rate == 1e-4 and cfg.eval.lengths == [256, 512]
    assert cfg.train.deepspeed is None and cfg.lora.target_modules == "all-linear"


def test_defaults_match_longlora():
    cfg = load_config(data=BASE)
    assert (cfg.lora.r, cfg.lora.alpha) == (8, 16)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.lora.trainable_params == ["embed", "norm"]
    assert cfg.attention.group_size_ratio == 0.25


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(data=BASE, overrides=["rope.rope_type=yarn", "rope.factor=4.0"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["lora"]["r"] == 8  # defaults are written out


def test_input_dict_not_mutated():
    data = {"model": {"name_or_path": "x"}, "train": {"seq_len": 64}}
    load_config(data=data, overrides=["train.seq_len=128"])
    assert data["train"]["seq_len"] == 64


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(path)
    assert cfg.train.seq_len >= 2


@pytest.mark.parametrize("value, expected", [("off", "off"), ("false", "off"), ("on", "auto"), ("null", None),
                                             ("auto", "auto"), ("runs/x/checkpoint-4", "runs/x/checkpoint-4")])
def test_resume_override_yaml_booleans(value, expected):
    # YAML turns `off` into False; the override the README documents must still mean "start fresh".
    cfg = load_config(None, overrides=["model.name_or_path=m", "train.seq_len=64", f"train.resume={value}"])
    assert cfg.train.resume == expected
