"""Every family in longctx.families.FAMILIES on a tiny random config: apply/remove restores the model bit for bit,
S² training equals the dense rule-mask reference (window layers: the rule within the window), the refusals name
what they refuse, LoRA targets map onto fused projections, and the README's table lists exactly these families.
The training + export round trip of every family is in test_families_train.py."""

import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import longctx
from longctx import families
from longctx.families import FAMILIES
from longctx.model import LONGLORA_TARGETS
from reference import causal_doc_mask, logits_with_reference, real_positions, s2_rule_mask, tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]
S2_FAMILIES = [f for f, fam in FAMILIES.items() if fam.s2_refused is None]
T, G = 32, 8  # group 8 > the window of 6 that Gemma-2/3 tiny configs give their sliding layers


def rope_for(family):
    return {"rope_type": "yarn", "factor": 2.0}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_apply_then_remove_restores_every_output_bit_for_bit(family):
    model = tiny_model(family)
    ids = torch.randint(3, 97, (2, T))
    attention = {"type": "s2", "group_size_ratio": 0.25} if family in S2_FAMILIES else {"type": "full"}
    outputs = {}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        outputs[mode] = model(input_ids=ids, use_cache=False).logits
    handle = longctx.apply(model, rope=rope_for(family), attention=attention)
    model.train()
    changed = model(input_ids=ids, use_cache=False).logits
    assert not torch.equal(changed, outputs["train"])
    handle.remove()
    for mode in ("train", "eval"):
        getattr(model, mode)()
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, outputs[mode]), mode


def _s2_against_reference(model, docs, **inputs):
    heads = model.config.num_attention_heads
    handle = longctx.apply(model, attention={"type": "s2", "group_size_ratio": 0.25})
    model.train()
    ours = model(**inputs, use_cache=False).logits
    handle.remove()
    ref = logits_with_reference(model, s2_rule_mask(docs, T, G, heads), **inputs)
    real = real_positions(docs, T)
    torch.testing.assert_close(ours[real], ref[real], rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", S2_FAMILIES)
def test_s2_equals_dense_reference_full_rows(family):
    model = tiny_model(family)
    _s2_against_reference(model, [[(0, T)]] * 2, input_ids=torch.randint(3, 97, (2, T)))


@pytest.mark.parametrize("family", S2_FAMILIES)
def test_s2_equals_dense_reference_padded_and_packed(family):
    model = tiny_model(family)
    n = 21
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :T - n] = 0  # left padding: groups count from the first real token
    docs = [[(0, T)], [(T - n, n)]]
    _s2_against_reference(model, docs, input_ids=torch.randint(3, 97, (2, T)), attention_mask=mask)
    pos = torch.cat([torch.arange(10), torch.arange(22)])[None].expand(2, T)  # two packed documents per row
    _s2_against_reference(model, [[(0, 10), (10, 22)]] * 2, input_ids=torch.randint(3, 97, (2, T)),
                          position_ids=pos)


@pytest.mark.parametrize("family,extra", [("gemma3_text", {}), ("mistral", {"sliding_window": 6}),
                                          ("phi3", {"sliding_window": 6})])
def test_window_rule_of_the_reference_is_transformers_own(family, extra):
    """Plain transformers in eval mode (its own sliding masks) equals the reference's causal & window rule, so the
    S² tests above compare with the window exactly as the model applies it at inference."""
    model = tiny_model(family, **extra).eval()
    ids = torch.randint(3, 97, (2, T))
    plain = model(input_ids=ids, use_cache=False).logits
    ref = logits_with_reference(model, causal_doc_mask([[(0, T)]] * 2, T, model.config.num_attention_heads),
                                input_ids=ids)
    torch.testing.assert_close(plain, ref, rtol=0, atol=1e-10)
    unwindowed = tiny_model(family, **{**extra, "sliding_window": 4 * T}).eval()  # the same weights (same seed)
    assert (unwindowed(input_ids=ids, use_cache=False).logits - plain).abs().max() > 1e-6  # the window did bind


def test_soft_capping_family_refuses_s2_by_name_and_scales_rope():
    model = tiny_model("gemma2")
    with pytest.raises(longctx.ConfigError, match="model type 'gemma2'.*soft-caps.*attention.type: full"):
        longctx.apply(model, attention={"type": "s2"})
    assert model.config._attn_implementation == "eager"  # nothing left half-applied
    handle = longctx.apply(model, rope={"rope_type": "linear", "factor": 2.0}, attention={"type": "full"})
    assert model.config.rope_parameters["factor"] == 2.0
    handle.remove()


def test_bidirectional_gemma3_refuses_s2():
    model = tiny_model("gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(longctx.ConfigError, match="use_bidirectional_attention"):
        longctx.apply(model, attention={"type": "s2"})


def test_gemma3_scales_only_the_global_layers_rope():
    model = tiny_model("gemma3_text", dtype=torch.float32)
    rotary = model.model.rotary_emb
    sliding, full = rotary.sliding_attention_inv_freq.clone(), rotary.full_attention_inv_freq.clone()
    handle = longctx.apply(model, rope={"rope_type": "linear", "factor": 4.0})
    rp = model.config.rope_parameters
    assert rp["sliding_attention"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert rp["full_attention"]["rope_type"] == "linear" and rp["full_attention"]["rope_theta"] == 1e6
    new = model.model.rotary_emb
    assert torch.equal(new.sliding_attention_inv_freq, sliding)
    torch.testing.assert_close(new.full_attention_inv_freq, full / 4, rtol=1e-6, atol=0)
    # plain transformers builds the same rotary from the written config
    plain = AutoModelForCausalLM.from_config(model.config).model.rotary_emb
    assert torch.equal(plain.full_attention_inv_freq, new.full_attention_inv_freq)
    handle.remove()
    assert torch.equal(model.model.rotary_emb.full_attention_inv_freq, full)


def test_phi3_partial_rotary_and_top_level_original_length():
    model = tiny_model("phi3", dtype=torch.float32, original_max_position_embeddings=32)
    handle = longctx.apply(model, rope={"rope_type": "yarn", "max_position_embeddings": 128})
    rp = model.config.rope_parameters
    assert rp["partial_rotary_factor"] == 0.75 and rp["factor"] == 4.0  # 128 over the top-level original 32
    assert rp["original_max_position_embeddings"] == model.config.original_max_position_embeddings == 32
    assert model.model.rotary_emb.inv_freq.shape == (3,)  # 0.75 x head_dim 8 / 2 pairs
    handle.remove()
    assert model.config.original_max_position_embeddings == 32 and model.config.rope_parameters["rope_type"] == \
        "default"


def test_phi3_lora_targets_map_onto_fused_projections():
    assert families.lora_targets("phi3", ["q_proj", "k_proj", "v_proj", "o_proj"]) == ["qkv_proj", "o_proj"]
    assert families.lora_targets("phi3", ["gate_proj", "up_proj", "down_proj"]) == ["gate_up_proj", "down_proj"]
    assert families.lora_targets("phi3", "all-linear") == "all-linear"
    with pytest.raises(ValueError, match="q_proj, k_proj, v_proj in one fused qkv_proj.*not only q_proj, v_proj"):
        families.lora_targets("phi3", ["q_proj", "v_proj"])
    assert families.lora_targets("llama", ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    # what PEFT then adapts: the fused linears, every q/k/v/o weight of the layer
    config = tiny_config("phi3")
    targets = families.lora_targets("phi3", list(LONGLORA_TARGETS))
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=2, target_modules=targets))
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"qkv_proj", "o_proj"}


def test_unsupported_types_are_refused_with_a_hint():
    with pytest.raises(longctx.ConfigError, match="'gemma3' is not supported.*Gemma3ForCausalLM"):
        families.of(type("C", (), {"model_type": "gemma3"})())
    with pytest.raises(longctx.ConfigError, match="'cohere2' is not supported.*RoPE families: llama, mistral"):
        longctx.apply(AutoModelForCausalLM.from_config(tiny_config("cohere2")), rope={"rope_type": "linear"})


def test_readme_table_lists_exactly_the_supported_families():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Supported model families", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.M)
    assert rows == list(FAMILIES)


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0}, {"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0}])
def test_phi3_writes_other_schemes_as_the_equal_longrope_dict(rope):
    """Phi3Config accepts only default and longrope (it turns yarn into longrope). The longrope dict longctx writes
    gives transformers' own numbers for the asked scheme: cos/sin of a Llama rotary built from the asked dict."""
    model = tiny_model("phi3", dtype=torch.float32)
    handle = longctx.apply(model, rope=rope)
    rp = model.config.rope_parameters
    assert rp["rope_type"] == "longrope" and rp["short_factor"] == rp["long_factor"]
    want = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=8,
                                            max_position_embeddings=256, rope_parameters={
                                                **rope, "rope_theta": 1e4, "partial_rotary_factor": 0.75,
                                                "original_max_position_embeddings": 64}))
    x = torch.zeros(1)
    for n in (16, 200):  # within and beyond the original length: no short/long switch
        pos = torch.arange(n)[None]
        for a, b in zip(model.model.rotary_emb(x, pos), want(x, pos)):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    plain = AutoModelForCausalLM.from_config(Phi3Config.from_dict(model.config.to_dict()))  # validates, loads
    for a, b in zip(plain.model.rotary_emb(x, pos), want(x, pos)):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    handle.remove()
    with pytest.raises(longctx.ConfigError, match="'phi3' configs accept only rope types default, longrope"):
        longctx.apply(model, rope={"rope_type": "dynamic", "factor": 2.0})
