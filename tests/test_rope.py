"""RoPE scaling against transformers' own rotary embedding and functions, and values transformers 5.23.0 printed."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import longctx
from longctx import rope
from reference import tiny_model

ORIG, TARGET, FACTOR = 64, 256, 4.0

# Each case: what a user writes for longctx, and the rope_parameters dict written out by hand, as transformers
# documents it, that must give the same cos/sin. max_position_embeddings of that config is the last element.
LF = [1.0] * 2 + torch.linspace(1.0, 4.0, 2).tolist()
CASES = {
    "linear": ({"rope_type": "linear", "factor": FACTOR},
               {"rope_type": "linear", "rope_theta": 1e4, "factor": FACTOR}, TARGET),
    "dynamic": ({"rope_type": "dynamic", "factor": FACTOR},
                {"rope_type": "dynamic", "rope_theta": 1e4, "factor": FACTOR}, ORIG),
    "yarn": ({"rope_type": "yarn", "factor": FACTOR},
             {"rope_type": "yarn", "rope_theta": 1e4, "factor": FACTOR, "original_max_position_embeddings": ORIG},
             TARGET),
    "yarn_betas": ({"rope_type": "yarn", "factor": FACTOR, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
                   {"rope_type": "yarn", "rope_theta": 1e4, "factor": FACTOR, "beta_fast": 16.0, "beta_slow": 2.0,
                    "truncate": False, "original_max_position_embeddings": ORIG}, TARGET),
    "llama3": ({"rope_type": "llama3", "factor": FACTOR, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
               {"rope_type": "llama3", "rope_theta": 1e4, "factor": FACTOR, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": ORIG}, TARGET),
    "longrope": ({"rope_type": "longrope", "factor": FACTOR, "short_factor": [1.0] * 4, "long_factor": LF},
                 {"rope_type": "longrope", "rope_theta": 1e4, "factor": FACTOR, "short_factor": [1.0] * 4,
                  "long_factor": LF, "original_max_position_embeddings": ORIG}, TARGET),
}


def _cos_sin(rotary, T):
    x = torch.zeros(1, dtype=torch.float32)
    return rotary(x, torch.arange(T)[None])


@pytest.mark.parametrize("name", list(CASES))
def test_patched_model_matches_transformers_rotary(name):
    ours, hf_params, hf_max = CASES[name]
    model = tiny_model(max_pos=ORIG, dtype=torch.float32)
    handle = longctx.apply(model, rope=ours)
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=8,
                                          max_position_embeddings=hf_max, rope_parameters=hf_params))
    for T in (32, 200):  # inside and beyond the original length (longrope/dynamic switch there)
        for a, b in zip(_cos_sin(model.model.rotary_emb, T), _cos_sin(hf, T)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    handle.remove()


def test_ntk_equals_transformers_dynamic_ntk_at_the_same_scale_and_exports_as_default():
    """Fixed NTK-aware scaling by alpha is transformers' dynamic NTK at the length where its scale
    (factor x seq_len / original - (factor - 1)) equals alpha: factor = alpha = 8, seq_len = 64 x 15 / 8 = 120."""
    model = tiny_model(max_pos=ORIG, dtype=torch.float32, head_dim=8)
    native = model.model.rotary_emb.inv_freq.clone()
    handle = longctx.apply(model, rope={"rope_type": "ntk", "alpha": 8.0})
    hf_config = LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=8, max_position_embeddings=ORIG,
                            rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 8.0})
    want, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, "cpu", seq_len=ORIG * 15 // 8)
    inv = model.model.rotary_emb.inv_freq
    torch.testing.assert_close(inv, want.float(), rtol=1e-6, atol=0)
    # bloc97's property: the highest frequency kept, the lowest divided by exactly alpha
    assert inv[0] == native[0] == 1.0 and math.isclose(native[-1] / inv[-1], 8.0, rel_tol=1e-5)
    rp = model.config.rope_parameters  # plain transformers rebuilds the same frequencies from the exported theta
    assert rp["rope_type"] == "default" and rp["original_max_position_embeddings"] == ORIG
    exported = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=8,
                                                max_position_embeddings=ORIG, rope_parameters=rp))
    torch.testing.assert_close(exported.inv_freq, inv, rtol=1e-6, atol=0)
    handle.remove()


def test_ntk_reference_bases():
    """docs/design.md §4.1: alpha 8, d 128 -> 82684.6; alpha 4, d 64 -> 41829.4."""
    assert round(rope.ntk_theta(1e4, 8.0, 128), 1) == 82684.6
    assert round(rope.ntk_theta(1e4, 4.0, 64), 1) == 41829.4


# docs/design.md §4.2: head_dim 64, base 1e4, L 2048, factor 4 (values printed by transformers 5.23.0)
REF = {
    "linear": ([2.5e-01, 1.874736e-01, 1.405853e-01, 1.054241e-01],
               [7.905695e-05, 5.928435e-05, 4.445699e-05, 3.333804e-05], 1.0, {}),
    "yarn": ([1.0, 7.498942e-01, 5.623413e-01, 4.216965e-01],
             [7.905695e-05, 5.928435e-05, 4.445699e-05, 3.333804e-05], 1.13862943611, {}),
    "llama3": ([1.0, 7.498942e-01, 5.623413e-01, 4.216965e-01],
               [7.905695e-05, 5.928435e-05, 4.445699e-05, 3.333804e-05], 1.0,
               {"low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "longrope": ([1.0, 7.498942e-01, 5.623413e-01, 4.216965e-01],
                 [3.162278e-04, 2.371374e-04, 1.778279e-04, 1.333522e-04], 1.08711461301,
                 {"short_factor": [1.0] * 32, "long_factor": [1.0] * 8 + torch.linspace(1.0, 4.0, 24).tolist()}),
    "dynamic": ([1.0, 7.498942e-01, 5.623413e-01, 4.216965e-01],
                [3.162278e-04, 2.371374e-04, 1.778279e-04, 1.333522e-04], 1.0, {}),
}


@pytest.mark.parametrize("name", list(REF))
def test_research_reference_vectors(name):
    first4, last4, att, extra = REF[name]
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=2048)
    p = rope.resolve({"rope_type": name, "factor": 4.0, **extra}, cfg)
    inv, a = rope.frequencies(p)
    torch.testing.assert_close(inv[:4], torch.tensor(first4), rtol=2e-6, atol=0)
    torch.testing.assert_close(inv[-4:], torch.tensor(last4), rtol=2e-6, atol=0)
    assert math.isclose(a, att, rel_tol=1e-9)


def test_dynamic_at_8192_reference():
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=2048)
    inv, _ = rope.frequencies(rope.resolve({"rope_type": "dynamic", "factor": 4.0}, cfg), seq_len=8192)
    torch.testing.assert_close(inv[-4:], torch.tensor([3.117868e-05, 2.152405e-05, 1.485903e-05, 1.025786e-05]),
                               rtol=2e-6, atol=0)


def test_default_factor_is_float_ratio_not_ceil():
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=4096)
    p = rope.resolve({"rope_type": "linear", "max_position_embeddings": 100_000}, cfg)
    assert p.factor == 100_000 / 4096  # LongLoRA's ceil gave 25 -> 102,400 tokens
    assert p.original_max_position_embeddings == 4096


def test_theta_and_original_length_always_written():
    """docs/design.md §4.2: a dict without rope_theta loses theta; a missing original length turns silent."""
    model = tiny_model(max_pos=ORIG, dtype=torch.float32)
    model.config.rope_parameters["rope_theta"] = 5e5
    for rt, extra in [("linear", {}), ("yarn", {}), ("llama3", {"low_freq_factor": 1.0, "high_freq_factor": 4.0})]:
        handle = longctx.apply(model, rope={"rope_type": rt, "factor": 2.0, **extra})
        rp = model.config.rope_parameters
        assert rp["rope_theta"] == 5e5 and rp["original_max_position_embeddings"] == ORIG
        assert model.config.max_position_embeddings == 2 * ORIG
        handle.remove()


def test_target_not_above_original_is_refused():
    model = tiny_model(max_pos=ORIG, dtype=torch.float32)
    with pytest.raises(longctx.ConfigError, match="must be above the original length 64"):
        longctx.apply(model, rope={"rope_type": "yarn", "max_position_embeddings": 64})
    assert model.config.rope_parameters["rope_type"] == "default"  # nothing left half-applied
