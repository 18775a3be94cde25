"""An export's config.json gives the same RoPE to every reader (issue 15): transformers 5 from `rope_parameters`,
transformers 5 from the file as written (it prefers `rope_scaling`), and transformers 4.x's reading rules; what
llama.cpp can express; the serving flags of the model card."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from transformers import AutoConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import longctx
from longctx import export, serving
from reference import tiny_model

ORIG = 64
LF = torch.linspace(1.0, 4.0, 4).tolist()  # head_dim 8: 4 rotary pairs
SCHEMES = {
    "none": {},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "ntk": {"rope_type": "ntk", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0},
    "yarn_options": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False,
                     "mscale": 0.707, "mscale_all_dim": 1.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "longrope": {"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0] * 4, "long_factor": LF},
}


def exported_config(tmp_path, rope: dict) -> tuple[dict, torch.nn.Module]:
    """config.json as `longctx export` writes it for a model scaled with `rope` (and that model)."""
    model = tiny_model(max_pos=ORIG)
    handle = longctx.apply(model, rope=rope or None)
    target = handle.rope.max_position_embeddings if handle.rope else ORIG
    export.finalize_config(model.config, target, ORIG)
    model.config.save_pretrained(tmp_path)
    export.clean_config_json(tmp_path / "config.json")
    return json.loads((tmp_path / "config.json").read_text()), model


def rope_numbers(config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """inv_freq and attention factor, by transformers 5's own functions, for a config as transformers 5 holds it."""
    rt = config.rope_parameters["rope_type"]
    if rt == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    kw = {} if seq_len is None else {"seq_len": seq_len}
    inv, att = ROPE_INIT_FUNCTIONS[rt](config, "cpu", **kw)
    return inv, float(att)


LEGACY_KEYS = ("rope_scaling", "rope_theta", "partial_rotary_factor", "original_max_position_embeddings")


def transformers5_native(cfg: dict) -> LlamaConfig:
    """transformers 5 reading only `rope_parameters` (the legacy spelling removed)."""
    return LlamaConfig(**{k: v for k, v in cfg.items() if k not in LEGACY_KEYS})


def transformers4_reader(cfg: dict) -> LlamaConfig:
    """What transformers 4.45-4.5x (and vLLM before rope_parameters) read: `rope_scaling` (absent: default) and a
    top-level `rope_theta`, never `rope_parameters`; and two values derived from other fields in 4.x's
    modeling_rope_utils.py: yarn's factor = max_position_embeddings / rope_scaling["original_max_position_embeddings"]
    when that key is present, and longrope's original length from a top-level original_max_position_embeddings
    (Phi-3's layout; else max_position_embeddings) with factor = max_position_embeddings / that. The numbers are then
    computed by transformers 5's functions, whose formulas are 4.x's."""
    rp = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
    rp["rope_theta"] = cfg["rope_theta"]
    mpe = cfg["max_position_embeddings"]
    if rp["rope_type"] == "yarn" and "original_max_position_embeddings" in rp:
        rp["factor"] = mpe / rp["original_max_position_embeddings"]
    if rp["rope_type"] == "longrope":
        rp["original_max_position_embeddings"] = cfg.get("original_max_position_embeddings", mpe)
        rp["factor"] = mpe / rp["original_max_position_embeddings"]
    rest = {k: v for k, v in cfg.items() if k not in LEGACY_KEYS + ("rope_parameters",)}
    return LlamaConfig(**rest, rope_parameters=rp)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_reader_gets_the_exported_numbers(tmp_path, name):
    cfg, model = exported_config(tmp_path, SCHEMES[name])
    rp = cfg["rope_parameters"]
    assert cfg["rope_theta"] == rp["rope_theta"]
    if rp["rope_type"] == "default":
        assert "rope_scaling" not in cfg  # nothing to scale: transformers 4.x reads the base alone
    else:
        assert cfg["rope_scaling"] == {k: v for k, v in rp.items() if k != "rope_theta"}
    readers = {"transformers 5, rope_parameters": transformers5_native(cfg),
               "transformers 5, the file as written": AutoConfig.from_pretrained(tmp_path),
               "transformers 4.x rules, rope_scaling + rope_theta": transformers4_reader(cfg)}
    rotary = model.model.rotary_emb  # what the longctx model computes, which the export's check compares with
    for seq_len in ([None, 4 * ORIG] if rp["rope_type"] in ("dynamic", "longrope") else [None]):
        ours = rope_numbers(model.config, seq_len)
        if seq_len is None:
            torch.testing.assert_close(ours[0].double(), rotary.inv_freq.double(), rtol=1e-6, atol=0)
            assert ours[1] == pytest.approx(rotary.attention_scaling)
        for reader, config in readers.items():
            inv, att = rope_numbers(config, seq_len)
            torch.testing.assert_close(inv, ours[0], rtol=0, atol=0, msg=f"{reader} @ {seq_len}")
            assert att == pytest.approx(ours[1], rel=1e-12), reader


def test_a_target_off_factor_x_original_is_flagged_and_really_differs_for_transformers4(tmp_path):
    # yarn x4 from 64 with a target of 512: transformers 4.x takes the factor from 512 / 64 = 8.
    cfg, _ = exported_config(tmp_path, {"rope_type": "yarn", "factor": 4.0, "max_position_embeddings": 512})
    warning = serving.legacy_factor_mismatch(cfg["rope_parameters"], cfg["max_position_embeddings"])
    assert warning and "= 8 differs from factor 4" in warning
    new, old = rope_numbers(transformers5_native(cfg)), rope_numbers(transformers4_reader(cfg))
    assert not torch.equal(new[0], old[0]) and new[1] != old[1]
    consistent, _ = exported_config(tmp_path, SCHEMES["yarn"])
    assert serving.legacy_factor_mismatch(consistent["rope_parameters"], consistent["max_position_embeddings"]) is None


@pytest.mark.parametrize("name,model_type,refused", [
    ("none", "llama", None), ("linear", "llama", None), ("ntk", "llama", None), ("yarn", "qwen2", None),
    ("llama3", "llama", None), ("llama3", "qwen2", "writes its factors only for llama, mistral"),
    ("dynamic", "llama", "no GGUF field"), ("longrope", "llama", "Phi-3 only"),
    ("yarn_options", "llama", "beta_fast=16"),
])
def test_llama_cpp_problems(tmp_path, name, model_type, refused):
    cfg, _ = exported_config(tmp_path, SCHEMES[name])
    problems = serving.llama_cpp_problems(cfg["rope_parameters"], model_type)
    if refused is None:
        assert problems == []
    else:
        assert problems and refused in " ".join(problems)
    if name == "yarn_options":  # every unsupported option is named, not only the first
        text = " ".join(problems)
        assert all(k in text for k in ("beta_slow=2", "mscale=0.707", "mscale_all_dim=1", "truncate=false"))


def test_serving_flags(tmp_path):
    cfg, _ = exported_config(tmp_path, SCHEMES["yarn"])
    rp, ctx = cfg["rope_parameters"], cfg["max_position_embeddings"]
    assert serving.llama_cpp_flags(rp, ctx) == "--ctx-size 256 --rope-scaling yarn --rope-scale 4 --yarn-orig-ctx 64"
    linear, _ = exported_config(tmp_path, SCHEMES["linear"])
    flags = serving.llama_cpp_flags(linear["rope_parameters"], 256)
    assert flags == "--ctx-size 256 --rope-scaling linear --rope-scale 4"
    cmd = shlex.split(serving.vllm_command("BASE", rp, ctx, overrides=True))
    assert cmd[:5] == ["vllm", "serve", "BASE", "--max-model-len", "256"] and cmd[5] == "--hf-overrides"
    assert json.loads(cmd[6]) == {"rope_parameters": rp, "max_position_embeddings": 256}
