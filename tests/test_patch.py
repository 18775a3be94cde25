"""longctx.apply on several families, on PEFT-wrapped models, and its clear refusals."""

import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel

import longctx
from reference import logits_with_reference, s2_rule_mask, tiny_model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_families_scale_and_s2_then_restore(family):
    model = tiny_model(family, heads=4, kv_heads=2)
    ids = torch.randint(0, 97, (2, 32))
    model.train()
    before = model(input_ids=ids, use_cache=False).logits
    handle = longctx.apply(model, rope={"rope_type": "linear", "factor": 2.0},
                           attention={"type": "s2", "group_size_ratio": 0.25})
    assert model.config.rope_parameters["factor"] == 2.0 and model.config.max_position_embeddings == 128
    ours = model(input_ids=ids, use_cache=False).logits
    rot = model.model.rotary_emb
    handle.remove()
    # the reference runs with the scaled rotary put back, so only attention differs from ours
    keep = model.model.rotary_emb
    model.model.rotary_emb = rot
    ref = logits_with_reference(model, s2_rule_mask([[(0, 32)]] * 2, 32, 8, 4), input_ids=ids)
    model.model.rotary_emb = keep
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)


def test_peft_wrapped_model():
    model = tiny_model(heads=4, kv_heads=2)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    ids = torch.randint(0, 97, (1, 32))
    peft.train()
    before = peft(input_ids=ids, use_cache=False).logits
    handle = longctx.apply(peft, rope={"rope_type": "yarn", "factor": 4.0}, attention={"type": "s2"})
    assert peft.get_base_model().config._attn_implementation == "longctx_s2"
    during = peft(input_ids=ids, use_cache=False).logits
    handle.remove()
    assert not torch.equal(before, during)
    assert torch.equal(peft(input_ids=ids, use_cache=False).logits, before)


def test_alibi_model_refuses_rope_scaling_and_s2_by_name():
    model = BloomForCausalLM(BloomConfig(hidden_size=32, n_head=4, n_layer=1, vocab_size=50))
    with pytest.raises(longctx.ConfigError, match="model type 'bloom' uses ALiBi, not RoPE: RoPE scaling"):
        longctx.apply(model, rope={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(longctx.ConfigError, match=r"uses ALiBi, not RoPE: S²-Attn \(attention.type: s2\)"):
        longctx.apply(model, attention={"type": "s2"})
    longctx.apply(model, attention={"type": "full"}).remove()  # fine-tuning with full attention is allowed


def test_unknown_family_is_refused_by_name():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=50))
    with pytest.raises(longctx.ConfigError, match="model type 'gpt2' is not supported by longctx.*ALiBi families"):
        longctx.apply(model, attention={"type": "full"})


@pytest.mark.slow  # a fresh interpreter importing transformers: about 5 s, the end-to-end layer
def test_import_changes_nothing():
    """Importing longctx registers nothing and patches nothing (docs/design.md §1: nothing happens at import time)."""
    code = ("from transformers import AttentionInterface; import transformers.models.llama.modeling_llama as m; "
            "before = (dict(AttentionInterface._global_mapping), dict(vars(m.LlamaAttention))); import longctx; "
            "after = (dict(AttentionInterface._global_mapping), dict(vars(m.LlamaAttention))); "
            "assert before == after; assert not any(k.startswith('longctx') for k in after[0])")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_handle_is_a_context_manager_that_undoes_on_exit():
    model = tiny_model(heads=4, kv_heads=2).train()
    ids = torch.randint(0, 97, (1, 32))
    before = model(input_ids=ids, use_cache=False).logits
    with longctx.apply(model, rope={"rope_type": "linear", "factor": 2.0}, attention={"type": "s2"}) as handle:
        assert handle.rope.factor == 2.0 and model.config._attn_implementation == "longctx_s2"
        assert not torch.equal(model(input_ids=ids, use_cache=False).logits, before)
    assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)
    with pytest.raises(RuntimeError, match="inside"):  # undone on an exception too
        with longctx.apply(model, rope={"rope_type": "linear", "factor": 2.0}):
            raise RuntimeError("inside")
    assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)
