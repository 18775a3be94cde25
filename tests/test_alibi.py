"""ALiBi families (transformers' BLOOM and MPT, tiny random configs): NTK-ALiBi's slopes against the formula, a = 1
bit-identical to the model, the dynamic variant, MPT past its max_seq_len, refusals, and fine-tuning with LoRA +
embed/norm and full attention (3 steps)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import BloomConfig, BloomForCausalLM, MptConfig, MptForCausalLM

import longctx
from micro import make_micro_base, trained_extras
from reference import tiny_model


def bloom(heads: int) -> BloomForCausalLM:
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(hidden_size=8 * heads, n_head=heads, n_layer=2, vocab_size=97)).eval()


def mpt(heads: int, max_seq_len: int = 32, seed: int = 0) -> MptForCausalLM:
    torch.manual_seed(seed)
    return MptForCausalLM(MptConfig(d_model=8 * heads, n_heads=heads, n_layers=2, expansion_ratio=2, vocab_size=97,
                                    max_seq_len=max_seq_len)).eval()


def formula(heads: int, a: float) -> list[float]:
    """keezen/ntk_alibi for H a power of two: m_h = 1 / (2^(8h/H) a^((h-1)/(H-1)))."""
    return [1 / (2 ** (8 * h / heads) * a ** ((h - 1) / (heads - 1))) for h in range(1, heads + 1)]


def alibi_paper(heads: int, a: float) -> list[float]:
    """ALiBi's slopes for any H (Press et al.'s code, as BLOOM has them): the H' = 2^floor(log2 H) sequence, then
    every other member of the 2H' one; NTK-ALiBi applied to each sequence they come from."""
    n = 2 ** math.floor(math.log2(heads))
    extra = formula(2 * n, a)[0::2][:heads - n]
    return formula(n, a) + extra


def mpt_slopes(heads: int, a: float) -> list[float]:
    """MPT's own choice for any H: the 2^ceil(log2 H) sequence, odd members first, then even, cut at H."""
    n = 2 ** math.ceil(math.log2(heads))
    seq = formula(n, a)
    return (seq[1::2] + seq[::2])[:heads] if n != heads else seq


def applied_slopes(model, n: int = 6) -> torch.Tensor:
    """The slopes the blocks receive, read off the bias of the first block after the method's hook."""
    seen = {}
    block = model.transformer.h[0] if model.config.model_type == "bloom" else model.transformer.blocks[0]

    def spy(module, args, kwargs):
        seen.update(kwargs)

    handle = block.register_forward_pre_hook(spy, with_kwargs=True)
    model(input_ids=torch.zeros(1, n, dtype=torch.long))
    handle.remove()
    if "alibi" in seen:  # BLOOM: [B*H, 1, n] = slope * key position
        return seen["alibi"][:, 0, 1].double()
    return -seen["position_bias"][:, 0, -2].double()  # MPT: slope * (j - (n - 1))


@pytest.mark.parametrize("heads", [4, 8, 6, 12])
@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_slopes_follow_the_formula(family, heads):
    model = bloom(heads) if family == "bloom" else mpt(heads)
    want = (alibi_paper if family == "bloom" else mpt_slopes)
    for a in (1.0, 2.0, 4.0):
        h = longctx.apply(model, method={"name": "ntk_alibi", "alpha": a})
        torch.testing.assert_close(applied_slopes(model), torch.tensor(want(heads, a), dtype=torch.float64),
                                   rtol=1e-6, atol=0)
        h.remove()
    if heads in (4, 8):  # a power of two: the formula itself
        torch.testing.assert_close(torch.tensor(want(heads, 3.0)), torch.tensor(formula(heads, 3.0)))


def _runs(model, ids, mask):
    return (model(input_ids=ids, attention_mask=mask).logits,
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0))


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_alpha_one_is_bit_identical_and_remove_restores(family):
    """float32 (in float64 transformers' own padded BLOOM/MPT rows turn NaN: finfo.min plus the bias overflows)."""
    model = bloom(6) if family == "bloom" else mpt(6)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    logits, gen = _runs(model, ids, mask)
    h = longctx.apply(model, method={"name": "ntk_alibi", "alpha": 1.0})
    same_logits, same_gen = _runs(model, ids, mask)
    h.remove()
    assert torch.equal(same_logits, logits) and torch.equal(same_gen, gen)
    h = longctx.apply(model, method={"name": "ntk_alibi", "alpha": 2.0})
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, logits, atol=1e-4)
    h.remove()
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_dynamic_alpha_follows_the_length(family):
    """a = max(1, n / L): unchanged up to L keys, then the slopes of a = n / L."""
    model = bloom(8) if family == "bloom" else mpt(8)
    h = longctx.apply(model, method={"name": "dynamic_ntk_alibi", "train_length": 8})
    for n in (4, 8, 12, 24):
        torch.testing.assert_close(applied_slopes(model, n), torch.tensor(formula(8, max(1.0, n / 8)),
                                                                          dtype=torch.float64), rtol=1e-6, atol=0)
    ids = torch.randint(0, 97, (1, 8))
    inside = model(input_ids=ids).logits
    h.remove()
    assert torch.equal(inside, model(input_ids=ids).logits)


def test_mpt_runs_past_max_seq_len():
    """transformers' MPT builds its bias for max_seq_len and fails beyond it; with the hook (a = 1) it runs and equals
    the same weights with a larger max_seq_len."""
    short, long = mpt(4, max_seq_len=16, seed=3), mpt(4, max_seq_len=64, seed=3)
    long.load_state_dict(short.state_dict())
    ids = torch.randint(0, 97, (1, 40))
    with pytest.raises(RuntimeError):
        short(input_ids=ids)
    h = longctx.apply(short, method={"name": "ntk_alibi", "alpha": 1.0})
    assert torch.equal(short(input_ids=ids).logits, long(input_ids=ids).logits)
    h.remove()


def test_methods_that_do_not_fit_are_refused():
    with pytest.raises(longctx.ConfigError, match=r"method 'rerope' does not fit model type 'bloom' \(ALiBi\); "
                                                  "methods for ALiBi models: nbce, ntk_alibi, dynamic_ntk_alibi"):
        longctx.apply(bloom(4), method={"name": "rerope"})
    with pytest.raises(longctx.ConfigError, match=r"method 'ntk_alibi' does not fit model type 'llama' \(RoPE\); "
                                                  "methods for RoPE models: consistent_dynamic, rerope"):
        longctx.apply(tiny_model(), method={"name": "ntk_alibi", "alpha": 2})
    with pytest.raises(longctx.ConfigError, match="the bloom config gives no training length; pass train_length"):
        longctx.apply(bloom(4), method={"name": "dynamic_ntk_alibi"})


def test_nbce_runs_on_alibi():
    model = mpt(4)
    h = longctx.apply(model, method={"name": "nbce", "chunk": 8})
    logits = h.runner()(input_ids=torch.randint(0, 97, (1, 20))).logits
    assert logits.shape == (1, 20, 97) and torch.isfinite(logits).all()
    h.remove()


@pytest.mark.slow  # training, then export's verification in a fresh process: about 25 s each on 2 CPU cores
@pytest.mark.parametrize("family, names", [("bloom", ("word_embeddings", "ln_f", "input_layernorm")),
                                           ("mpt", ("wte", "norm_f", "norm_1"))])
def test_fine_tune_with_lora_embed_norm_and_full_attention(family, names, train_config, tmp_path):
    """3 steps of LongLoRA+ (LoRA on the fused attention projections, embed/norm trained) with full attention at 64
    tokens (MPT's max_seq_len is 32: it trains past it); the run's final/ loads for evaluation and takes the ALiBi
    methods; export reproduces it in plain transformers; S² is refused by name."""
    from longctx.export import export

    from longctx.config import ConfigError, load_config
    from longctx.evaluate import load_for_eval
    from longctx.trainer import train

    base = make_micro_base(tmp_path / family, max_pos=32, family=family)
    data = train_config(tmp_path / "run", model={"name_or_path": str(base)}, rope=None, attention={"type": "full"},
                        train={"seq_len": 64, "warmup_steps": 0, "save_steps": 100, "learning_rate": 1e-3})
    final = train(load_config(data=data))
    info = json.loads((final / "longctx.json").read_text())
    assert info["steps"] == 3 and info["attention"]["type"] == "full" and info["rope"] is None
    extras = trained_extras(final)
    before = load_file(str(base / "model.safetensors"))
    for name in names:
        trained = [k for k in extras if name in k]
        assert trained, (name, sorted(extras))
        assert all(torch.isfinite(extras[k]).all() for k in trained)
        assert any(not torch.equal(extras[k], before[k]) for k in trained if k in before)  # it moved
    adapter = load_file(str(final / "adapter_model.safetensors"))
    targets = {"bloom": ("query_key_value", "dense"), "mpt": ("Wqkv", "out_proj")}[family]
    assert all(any(t in k for k in adapter) for t in targets)
    method = {"name": "ntk_alibi", "alpha": 2.0}
    model, tok, label = load_for_eval(str(final), method=method)
    assert torch.isfinite(model(input_ids=torch.tensor([tok("def f(x):").input_ids])).logits).all()
    report = export(final, tmp_path / "hf")  # verified in a fresh process without longctx (else it raises)
    assert report["max_abs_diff"] <= 1e-4 and report["tokens"] == 64
    if family == "mpt":
        assert json.loads((tmp_path / "hf" / "config.json").read_text())["max_seq_len"] == 64
    with pytest.raises(ConfigError, match="uses ALiBi, not RoPE: S²-Attn"):
        train(load_config(data={**data, "attention": {"type": "s2"},
                                "train": {**data["train"], "output_dir": str(tmp_path / "s2")}}))
