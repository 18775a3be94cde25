"""log-n against the original code's table (Qwen-1's logn_list, per-query temperature), unchanged up to the
training length, composed with S²-Attn in training, trained through the config, and refused by export."""

import json
import math

import pytest
import torch
import yaml
from transformers import AttentionInterface

import longctx
from longctx.cli import main
from longctx.methods import logn
from reference import dense_reference_attention, left_padded, s2_rule_mask, select_attention, tiny_model

L = 16


def qwen_logn(position: int, train_length: int) -> float:
    """Qwen-1's table (modeling_qwen.py, `use_logn_attn`): the entry of the 1-based position i is log base
    seq_length of i past seq_length, else 1; the query at 0-based position p reads entry p (i = p + 1)."""
    i = position + 1
    return math.log(i, train_length) if i > train_length else 1.0


def test_scale_is_qwens_table():
    pos = torch.arange(100)
    want = torch.tensor([qwen_logn(p, L) for p in range(100)], dtype=torch.float64)
    torch.testing.assert_close(logn.scale(pos, L), want, rtol=1e-14, atol=0)
    assert logn.scale(torch.tensor([L - 1]), L).item() == 1.0 and logn.scale(torch.tensor([L]), L).item() > 1


def logn_reference(train_length: int):
    """Dense causal attention where query row i's scores are multiplied by Qwen-1's table at p_i, its position from
    `position_ids`, written out per row."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        pos = kwargs["position_ids"].expand(query.shape[0], -1)
        t = torch.tensor([[qwen_logn(p, train_length) for p in row] for row in pos.tolist()], dtype=query.dtype)
        k = key.repeat_interleave(query.shape[1] // key.shape[1], 1)
        v = value.repeat_interleave(query.shape[1] // value.shape[1], 1)
        scores = (query @ k.transpose(-1, -2)) * scaling * t[:, None, :, None]
        probs = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min).softmax(-1)
        return (probs @ v).transpose(1, 2), None

    return attend


def test_matches_reference_with_padding_and_is_exact_below_the_length():
    torch.manual_seed(0)
    model = tiny_model(layers=2, max_pos=L)
    ids, mask, pos = left_padded(40, 6)
    plain = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    h = longctx.apply(model, method={"name": "logn", "train_length": L})
    assert model.config._attn_implementation == "longctx_logn+sdpa"
    ours = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    short = model(input_ids=ids[:, :L]).logits
    h.remove()
    select_attention(model, "test_logn_reference", logn_reference(L))
    ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    model.set_attn_implementation("sdpa")
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=0, atol=1e-6)
    assert (ours - plain)[real].abs().max() > 1e-4
    assert torch.equal(short, model(input_ids=ids[:, :L]).logits)  # positions < L: scale exactly 1
    assert torch.equal(plain, model(input_ids=ids, attention_mask=mask, position_ids=pos).logits)


def test_wraps_s2_in_training():
    """logn on S²-Attn (training mode): the S² rule's dense reference on queries scaled by Qwen-1's table."""
    torch.manual_seed(1)
    model = tiny_model(layers=2, heads=4, kv_heads=2, max_pos=L)
    model.train()
    ids = torch.randint(0, 97, (2, 32))
    h = longctx.apply(model, attention={"type": "s2", "group_size_ratio": 0.25},
                      method={"name": "logn", "train_length": L})
    assert model.config._attn_implementation == "longctx_logn+longctx_s2"
    ours = model(input_ids=ids, use_cache=False).logits
    h.remove()
    dense = dense_reference_attention(s2_rule_mask([[(0, 32)]] * 2, 32, 8, 4))
    t = torch.tensor([qwen_logn(p, L) for p in range(32)], dtype=torch.float64)
    AttentionInterface.register("test_logn_s2", lambda m, q, k, v, mask, **kw: dense(m, q * t[:, None], k, v, mask,
                                                                                       **kw))
    model.set_attn_implementation("test_logn_s2")
    ref = model(input_ids=ids, use_cache=False).logits
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


def test_refuses_eager():
    model = tiny_model(layers=1, max_pos=L)
    model.set_attn_implementation("eager")
    with pytest.raises(longctx.ConfigError, match="method logn wraps a registered attention implementation"):
        longctx.apply(model, method={"name": "logn"})


def test_trains_through_the_config_and_export_refuses(train_config, tmp_path, capsys):
    """`method: {name: logn}` in a training config: trained with it (recorded in longctx.json), rebuilt with it by
    evaluation, and `longctx export` exits 2 naming the reason."""
    from longctx.config import load_config
    from longctx.evaluate import load_for_eval
    from longctx.trainer import train

    cfg = load_config(data=train_config(
        tmp_path / "run", rope=None, method={"name": "logn", "train_length": 32},
        train={"seq_len": 64, "max_steps": 2, "warmup_steps": 0, "per_device_train_batch_size": 1,
               "save_steps": 100}))
    final = train(cfg)
    info = json.loads((final / "longctx.json").read_text())
    assert info["method"] == {"name": "logn", "train_length": 32}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"]["name"] == "logn"
    model, _, _ = load_for_eval(str(final))
    assert model.get_base_model().config._attn_implementation == "longctx_logn+sdpa"
    capsys.readouterr()
    assert main(["export", str(final), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "error: export: " in err and "was trained with method logn" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()
