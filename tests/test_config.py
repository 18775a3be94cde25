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
    (["rope.rope_type=longrope"], ["rope.long_factor: required for rope_type 'longrope'"]),
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
    (["eval.lengths=[256, 0]"], ["eval.lengths: every value must be in [2, 16777216], got [256, 0]"]),
    # issue 18 item 10: values that used to pass validation and crash later
    (["rope.rope_type=yarn", "rope.factor=.inf"], ["rope.factor: Input should be a finite number"]),
    (["rope.rope_type=yarn", "rope.factor=.nan"], ["rope.factor: Input should be a finite number"]),
    (["train.learning_rate=.nan"], ["train.learning_rate: Input should be a finite number"]),
    (["lora.alpha=.nan"], ["lora.alpha: Input should be a finite number"]),
    (["lora.alpha=0"], ["lora.alpha: must be > 0, got 0"]),
    (["train.warmup_steps=-1"], ["train.warmup_steps: must be >= 0, got -1"]),
    (["rope.rope_type=yarn", "rope.original_max_position_embeddings=0"],
     ["rope.original_max_position_embeddings: must be in [1, 16777216], got 0"]),
    (["train.max_grad_norm=.nan"], ["train.max_grad_norm: Input should be a finite number"]),
    (["train.max_grad_norm=-1"], ["train.max_grad_norm: must be >= 0, got -1"]),
    (["eval.lengths=[1000000000000]"], ["eval.lengths: every value must be in [2, 16777216]"]),
    (["train.seq_len=99999999999"], ["train.seq_len: must be in [2, 16777216], got 99999999999"]),
    (["train.adam_beta2=1"], ["train.adam_beta2: must be in [0, 1), got 1"]),
    (["train.save_total_limit=0"], ["train.save_total_limit: must be >= 1, got 0"]),
    (["train.seed=-1"], ["train.seed: must be in [0, 4294967295], got -1"]),
    (["eval.stride=0", "eval.max_tokens=-5"], ["eval.stride: must be >= 1, got 0", "eval.max_tokens: must be >= 1"]),
    (["rope.rope_type=yarn", "rope.beta_fast=-1"], ["rope.beta_fast: must be > 0, got -1"]),
    (["rope.rope_type=longrope", "rope.short_factor=[1, .nan]", "rope.long_factor=[1, 2]"],
     ["rope.short_factor.1: Input should be a finite number"]),
    # issue 18 item 13: an SFT prompt template with a placeholder nothing fills in
    (["data.prompt_template='### {instruction}{context}'"],
     ["data.prompt_template: unknown placeholder {context}", "allowed: {instruction}, {input}"]),
    (["data.prompt_template='[INST] {instruction {input}'"], ["data.prompt_template:", "literal brace"]),
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


def test_by_parts_parameters_a_native_base_supplies_are_checked_once_the_model_is_known():
    """llama3's low/high_freq_factor and longrope's short_factor come from a base that ships that scaling
    (compose.py); on any other base `apply` names them (train exits 2 with the message)."""
    from reference import tiny_model

    cfg = load_config(data=BASE, overrides=["rope.rope_type=llama3"])  # fine for Llama-3.1
    with pytest.raises(ConfigError, match="rope.low_freq_factor: required for rope_type 'llama3' "
                                          r"\(Llama-3.1 uses 1.0; a base that ships llama3 scaling supplies it\)"):
        longctx.apply(tiny_model(), rope=cfg.rope_dict())


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


def test_every_numeric_field_has_a_range():
    """Issue 18 item 10: a numeric field added without a range in config.RANGES fails here."""
    import typing

    from longctx.config import RANGES, RANGES_ELSEWHERE, Config

    def numeric(annotation) -> bool:
        args = typing.get_args(annotation)
        return annotation in (int, float) or any(numeric(a) for a in args)

    from longctx import rope

    def models(section, annotation):  # a section model, or every member of a union section (rope)
        if section == "rope":
            return [scheme.params for scheme in rope.SCHEMES.values()]
        if section == "method":  # method models bound their own numbers (Field ge=...): tests/test_methods*.py
            return []
        return [annotation]

    fields = sorted({f"{section}.{name}" for section, sf in Config.model_fields.items()
                     for model in models(section, sf.annotation) for name, f in model.model_fields.items()
                     if numeric(f.annotation) and f.annotation is not bool})
    assert fields and "train.learning_rate" in fields and "eval.lengths" in fields
    assert sorted(set(fields) - set(RANGES) - set(RANGES_ELSEWHERE)) == []
    assert sorted(set(RANGES) - set(fields)) == []  # no stale entries


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_a_duplicate_key_is_refused_naming_it(tmp_path):
    """Issue 18 item 6: a second `train:` section used to replace the first silently."""
    dup = write(tmp_path, "model: {name_or_path: data/tiny-base}\ntrain:\n  seq_len: 1024\n  max_steps: 5\n"
                          "rope: {rope_type: linear}\ntrain:\n  seq_len: 1024\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'train' at line 6 \(first at line 2\)"):
        load_config(dup)
    nested = write(tmp_path, "model: {name_or_path: data/tiny-base}\ntrain: {seq_len: 1024, seq_len: 2048}\n")
    with pytest.raises(ConfigError, match="duplicate key 'seq_len' at line 2"):
        load_config(nested)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):  # in an override's value too
        load_config(data=BASE, overrides=["train.report_to={a: 1, a: 2}"])


def test_yaml_merge_keys_still_override_key_by_key(tmp_path):
    from longctx.config import load_yaml

    assert load_yaml("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n") == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}


def billion_laughs(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_gives_a_short_message_without_expanding(tmp_path):
    """Issue 18 item 13: 10^10 strings if expanded; the loader counts the node graph instead."""
    import time

    from longctx.sweep import load_sweep

    path = write(tmp_path, "model: {name_or_path: data/tiny-base}\ntrain: {seq_len: 1024}\n" + billion_laughs())
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.perf_counter() - t0 < 5
    msg = str(info.value)
    assert "aliases (*name) expand to more than 100,000 values" in msg and len(msg) < 400 and "lol" not in msg
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"base: {path}\noutput_dir: {tmp_path}/out\n" + billion_laughs())
    with pytest.raises(ConfigError, match="alias bomb"):
        load_sweep(sweep)


def test_small_aliases_are_fine(tmp_path):
    path = write(tmp_path, "model: {name_or_path: data/tiny-base}\ntrain: &t {seq_len: 1024}\n")
    assert load_config(path).train.seq_len == 1024


def test_cli_exits_2_on_a_duplicate_key_before_anything_runs(tmp_path, capsys):
    from longctx.cli import main

    path = write(tmp_path, "model: {name_or_path: data/tiny-base}\ntrain: {seq_len: 1024}\ntrain: {seq_len: 64}\n")
    for command in (["train", str(path)], ["plan", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "duplicate key 'train'" in err and "Traceback" not in err
