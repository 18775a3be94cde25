"""Bases that already ship scaled RoPE (compose.py): extending them composes on the native scheme, checked against
transformers' own ROPE_INIT_FUNCTIONS and the algebra of each composition; every other request is refused with the
reason; the written dict loads in plain transformers; remove() restores the native rotary."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import longctx
from reference import tiny_model

# Llama-3.1's scheme (x8, low/high 1/4) over a pretrained 64 tokens: pair 0 is kept (wavelength 6.3 < 64/4), pairs
# 1-2 lie in the blend band, pairs 3-7 are interpolated (wavelength > 64).
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64, "rope_theta": 1e4}
# Qwen2.5's documented long-context setting: yarn x4 over its pretrained length, max_position_embeddings left there.
QWEN25 = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4}
HD = 16


def model_with(native: dict, max_pos: int, family: str = "llama", **extra):
    return tiny_model(family, head_dim=HD, max_pos=max_pos, dtype=torch.float32, rope_parameters=dict(native),
                      **extra)


def transformers_inv_freq(rope_parameters: dict, max_pos: int, seq_len: int | None = None):
    """transformers' own function for a rope_parameters dict written out by hand."""
    cfg = LlamaConfig(hidden_size=4 * HD, num_attention_heads=4, head_dim=HD, max_position_embeddings=max_pos,
                      rope_parameters=dict(rope_parameters))
    kw = {} if seq_len is None else {"seq_len": seq_len}
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu", **kw)


def plain_reload(model):
    """The rotary plain transformers builds from the model's (written) config."""
    return AutoModelForCausalLM.from_config(type(model.config).from_dict(model.config.to_dict())).model.rotary_emb


def test_llama3_on_llama3_is_llama3_with_the_product_factor():
    model = model_with(LLAMA31, 512)
    native = model.model.rotary_emb.inv_freq.clone()
    handle = longctx.apply(model, rope={"rope_type": "llama3", "max_position_embeddings": 2048})
    want = {**LLAMA31, "factor": 32.0}  # 2048 / 64: the native x8 times 4, over the pretrained 64
    assert model.config.rope_parameters == want and model.config.max_position_embeddings == 2048
    inv = model.model.rotary_emb.inv_freq
    assert torch.equal(inv, transformers_inv_freq(want, 2048)[0])
    assert torch.equal(plain_reload(model).inv_freq, inv)
    # the algebra: kept pairs stay, interpolated pairs are the native ones divided by s = 4, the band blends
    assert inv[0] == native[0]
    torch.testing.assert_close(inv[3:], native[3:] / 4, rtol=1e-6, atol=0)
    assert all(native[i] / 4 < inv[i] < native[i] for i in (1, 2))
    handle.remove()
    assert torch.equal(model.model.rotary_emb.inv_freq, native) and model.config.rope_parameters == LLAMA31


def test_yarn_on_yarn_is_yarn_with_the_product_factor_over_the_original_length():
    model = model_with(QWEN25, 64, family="qwen2")  # native context 4 x 64 = 256
    native = model.model.rotary_emb.inv_freq.clone()
    handle = longctx.apply(model, rope={"rope_type": "yarn", "max_position_embeddings": 1024})
    want = {**QWEN25, "factor": 16.0}
    assert model.config.rope_parameters == want
    rotary = model.model.rotary_emb
    hf_inv, hf_att = transformers_inv_freq(want, 1024)
    assert torch.equal(rotary.inv_freq, hf_inv) and rotary.attention_scaling == hf_att == 0.1 * math.log(16) + 1
    # YaRN's ramp depends on the original length and betas, not on the factor: the same pairs extrapolate
    unscaled = 1.0 / 1e4 ** (torch.arange(0, HD, 2).float() / HD)
    extrapolated, interpolated = torch.isclose(native, unscaled), torch.isclose(native * 4, unscaled)
    assert extrapolated.any() and interpolated.any()
    assert torch.equal(rotary.inv_freq[extrapolated], native[extrapolated])
    torch.testing.assert_close(rotary.inv_freq[interpolated], native[interpolated] / 4, rtol=1e-6, atol=0)
    assert torch.equal(plain_reload(model).inv_freq, rotary.inv_freq)
    handle.remove()
    assert torch.equal(model.model.rotary_emb.inv_freq, native)


def test_native_yarn_parameters_are_kept_and_an_explicit_attention_factor_must_be_restated():
    model = model_with({**QWEN25, "beta_fast": 16.0, "attention_factor": 1.2}, 64)
    with pytest.raises(longctx.ConfigError, match="rope.attention_factor: the base's yarn sets attention_factor 1.2"):
        longctx.apply(model, rope={"rope_type": "yarn", "factor": 8.0})
    with pytest.raises(longctx.ConfigError, match="rope.beta_fast: 32.0 differs from the base's 16.0"):
        longctx.apply(model, rope={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "attention_factor": 1.3})
    handle = longctx.apply(model, rope={"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.3})
    assert model.config.rope_parameters == {**QWEN25, "factor": 8.0, "beta_fast": 16.0, "attention_factor": 1.3}
    handle.remove()


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "linear", "factor": 32.0}, "extending it with 'linear'.*divide every pair.*Use rope_type 'llama3'"),
    ({"rope_type": "ntk", "alpha": 4.0}, "'ntk'.*drops the native scaling"),
    ({"rope_type": "yarn", "factor": 32.0}, "'yarn' would replace or distort it"),
    ({"rope_type": "dynamic", "factor": 32.0}, "'dynamic'"),
    ({"rope_type": "llama3", "max_position_embeddings": 256}, r"factor 4 does not go beyond it.*above 8"),
    ({"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 512},
     "original_max_position_embeddings: 512 differs from the base's pretrained 64"),
    ({"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 2.0}, "high_freq_factor: 2.0 differs"),
])
def test_llama3_base_refuses_what_would_replace_it(rope, message):
    model = model_with(LLAMA31, 512)
    with pytest.raises(longctx.ConfigError, match=message):
        longctx.apply(model, rope=rope)
    assert model.config.rope_parameters == LLAMA31  # nothing replaced


def test_longrope_base_needs_new_long_factors_and_keeps_its_short_ones():
    n = int(HD * 0.75) // 2  # Phi-4-mini style partial rotary: 12 rotary dims, 6 pairs
    native = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75,
              "short_factor": [1.0, 1.0, 1.1, 1.2, 1.3, 1.4], "long_factor": [1.0, 1.0, 2.0, 3.0, 4.0, 4.0],
              "original_max_position_embeddings": 16}
    model = model_with(native, 64, family="phi3", original_max_position_embeddings=16)  # Phi-3: factor 64/16 = 4
    short = model.model.rotary_emb.inv_freq.clone()
    with pytest.raises(longctx.ConfigError, match="rope.long_factor: LongRoPE's per-pair factors come from a search"):
        longctx.apply(model, rope={"rope_type": "longrope", "max_position_embeddings": 256})
    long = [1.0, 1.0, 4.0, 8.0, 16.0, 16.0]
    handle = longctx.apply(model, rope={"rope_type": "longrope", "max_position_embeddings": 256, "long_factor": long})
    rp = model.config.rope_parameters
    assert rp == {**native, "long_factor": long, "factor": 16.0}
    rotary = model.model.rotary_emb
    assert torch.equal(rotary.inv_freq, short) and len(long) == n  # the short regime's frequencies are the native ones
    hf_long, att = transformers_inv_freq(rp, 256, seq_len=100)
    assert rotary.attention_scaling == att == math.sqrt(1 + math.log(16) / math.log(16))  # LongRoPE's, for x16
    cos, _ = rotary(torch.zeros(1), torch.arange(100)[None])  # beyond 16: the new long factors
    torch.testing.assert_close(cos[0, :, :n], (torch.arange(100)[:, None] * hf_long).cos() * att, rtol=0, atol=1e-5)
    handle.remove()
    assert model.config.rope_parameters == native


def test_gemma3_native_linear_on_global_layers_composes_and_sliding_layers_stay():
    native = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    model = tiny_model("gemma3_text", max_pos=512, dtype=torch.float32, rope_parameters=native)
    full = model.model.rotary_emb.full_attention_inv_freq.clone()
    sliding = model.model.rotary_emb.sliding_attention_inv_freq.clone()
    with pytest.raises(longctx.ConfigError, match="ships rope_type 'linear' x8 over its pretrained 64 tokens"):
        longctx.apply(model, rope={"rope_type": "yarn", "max_position_embeddings": 1024})
    handle = longctx.apply(model, rope={"rope_type": "linear", "max_position_embeddings": 1024})
    assert model.config.rope_parameters == {
        "full_attention": {"rope_type": "linear", "factor": 16.0, "rope_theta": 1e6,
                           "original_max_position_embeddings": 64}, "sliding_attention": native["sliding_attention"]}
    rotary = model.model.rotary_emb
    torch.testing.assert_close(rotary.full_attention_inv_freq, full / 2, rtol=1e-6, atol=0)  # linear o linear
    assert torch.equal(rotary.sliding_attention_inv_freq, sliding)
    assert torch.equal(plain_reload(model).full_attention_inv_freq, rotary.full_attention_inv_freq)
    handle.remove()


def test_reapplying_the_recorded_rope_on_a_fresh_base_gives_the_same_model():
    """evaluate.load_for_eval and export rebuild a run from longctx.json's resolved `rope` on the native base."""
    model = model_with(LLAMA31, 512)
    handle = longctx.apply(model, rope={"rope_type": "llama3", "max_position_embeddings": 2048})
    recorded = {k: v for k, v in handle.rope.model_dump().items() if k not in ("head_dim", "partial_rotary_factor")}
    fresh = model_with(LLAMA31, 512)
    longctx.apply(fresh, rope=recorded)
    assert fresh.config.rope_parameters == model.config.rope_parameters
    assert torch.equal(fresh.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_rope_none_keeps_the_native_scaling():
    model = model_with(LLAMA31, 512)
    inv = model.model.rotary_emb.inv_freq.clone()
    longctx.apply(model, rope={"rope_type": "none"}, attention={"type": "s2"})
    assert model.config.rope_parameters == LLAMA31 and torch.equal(model.model.rotary_emb.inv_freq, inv)
