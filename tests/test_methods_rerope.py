"""ReRoPE and leaky ReRoPE against a dense reference that builds the relative-position matrix explicitly (prefill,
padding, cached decoding), against the decoding form of the original code (bojone/rerope: keys rotated back by the
clipped distance, the query unrotated, and log-n on the query), and against plain RoPE inside the window."""

import math

import pytest
import torch
from transformers import AttentionInterface

import longctx
from reference import left_padded, select_attention, tiny_model

L = 16
BASE = 10000.0
METHODS = [{"name": "rerope", "window": 6}, {"name": "leaky_rerope", "window": 6, "leak": 4.0}]


def rectified(rel: torch.Tensor, w: int, leak: float | None) -> torch.Tensor:
    """The written rule: rel below w as it is; beyond it w (ReRoPE) or w + (rel - w) / leak (leaky)."""
    beyond = torch.full_like(rel, float(w)) if leak is None else w + (rel - w) / leak
    return torch.where(rel < w, rel, beyond)


def rotate_by(x: torch.Tensor, angle_pos: torch.Tensor, d: int) -> torch.Tensor:
    """x [..., d] rotated to (real) positions angle_pos [...] with RoPE frequencies base^(-2i/d), rotate_half."""
    inv = 1.0 / BASE ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = angle_pos[..., None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def dense_reference(w: int, leak: float | None, logn_length: int | None = None):
    """Attention on unrotated q/k from the rule: score(i, j) = <q_i rotated by rel'(i, j), k_j>, where rel' is the
    rectified distance of the positions (from the padding mask), and causal/padding masking, dense."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, H, Tq, D = query.shape
        Tkv = key.shape[2]
        real = attention_mask[:, 0, -1, :] if attention_mask is not None else torch.ones(B, Tkv, dtype=torch.bool)
        k_pos = (real.long().cumsum(-1) - 1).clamp(min=0).double()
        q_pos = k_pos[:, Tkv - Tq:]
        if logn_length:  # Su's log-n on the query, as the original patches do
            query = query * (torch.log(q_pos + 1) / math.log(logn_length)).clamp(min=1)[:, None, :, None]
        rel = rectified(q_pos[:, :, None] - k_pos[:, None, :], w, leak)  # [B, Tq, Tkv]
        k = key.repeat_interleave(H // key.shape[1], 1)
        v = value.repeat_interleave(H // value.shape[1], 1)
        q_rot = rotate_by(query[:, :, :, None, :], rel[:, None], D)  # [B, H, Tq, Tkv, D]
        scores = (q_rot * k[:, :, None]).sum(-1) * scaling
        allowed = attention_mask if attention_mask is not None else \
            torch.ones(Tq, Tkv, dtype=torch.bool).tril(Tkv - Tq)[None, None]
        probs = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)
        return (probs @ v).transpose(1, 2), None

    return attend


def original_decoding(w: int, leak: float | None, logn_length: int | None = None):
    """bojone/rerope's decoding step (q_len == 1), re-expressed: the query stays unrotated and each cached key is
    rotated by minus its rectified distance (ReRoPE: -min(d, w); leaky: the cos/sin table of positions below w,
    then the 1/leak-scaled table shifted by w (leak - 1), indexed by d); log-n on the query."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        assert query.shape[2] == 1, "the original's decoding form is for one new token"
        B, H, _, D = query.shape
        n = key.shape[2]
        d = (n - 1 - torch.arange(n)).double()  # distance of each key to the new token (no padding here)
        if logn_length:
            query = query * max(1.0, math.log(n) / math.log(logn_length))
        angle = d.clamp(max=w) if leak is None else torch.where(d < w, d, (d + w * (leak - 1)) / leak)
        k = rotate_by(key, -angle[None, None], D).repeat_interleave(H // key.shape[1], 1)
        v = value.repeat_interleave(H // value.shape[1], 1)
        probs = ((query @ k.transpose(-1, -2)) * scaling).softmax(-1)
        return (probs @ v).transpose(1, 2), None

    return attend


def with_attention(model, name, fn, **inputs):
    old = model.config._attn_implementation
    select_attention(model, name, fn)
    try:
        return model(**inputs)
    finally:
        model.set_attn_implementation(old)


def original_steps(model, prefill, step, ids, seq, n_steps):
    """Cached decoding of `seq` from `ids` with `prefill` attention for the prompt and the original's decoding form
    `step` after it: the logits of each step."""
    AttentionInterface.register("test_rerope_original", step)
    select_attention(model, "test_rerope_prefill", prefill)
    out = model(input_ids=ids, use_cache=True)
    model.set_attn_implementation("test_rerope_original")
    logits = []
    for k in range(1, n_steps):
        out = model(input_ids=seq[:, ids.shape[1] - 1 + k:ids.shape[1] + k], cache=out.cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m["name"])
def test_prefill_with_padding_matches_dense_reference(method):
    torch.manual_seed(0)
    model = tiny_model(layers=2, max_pos=L)
    ids, mask, pos = left_padded(30, 5)
    h = longctx.apply(model, method=method)
    ours = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    ref = with_attention(model, "test_rerope_dense", dense_reference(6, method.get("leak")), input_ids=ids,
                         attention_mask=mask, position_ids=pos).logits
    h.remove()
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=0, atol=1e-5)
    assert (ours - model(input_ids=ids, attention_mask=mask, position_ids=pos).logits)[real].abs().max() > 1e-5


def _decode(model, ids, steps):
    out = model(input_ids=ids, use_cache=True)
    logits = [out.logits[:, -1]]
    seq = ids
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        out = model(input_ids=nxt, cache=out.cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), seq


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m["name"])
def test_cached_decoding_matches_dense_reference_and_original_form(method):
    """Relative positions do not depend on the length, so cached decoding equals a full forward of the prefix at any
    depth: every step against the dense reference's full forward, and against the original's decoding form run
    with the cache."""
    torch.manual_seed(1)
    model = tiny_model(layers=2, max_pos=L)
    ids = torch.randint(0, 97, (1, 8))
    h = longctx.apply(model, method=method)
    steps, seq = _decode(model, ids, 30)
    dense = dense_reference(6, method.get("leak"))
    for k in range(steps.shape[1]):
        ref = with_attention(model, "test_rerope_dense", dense, input_ids=seq[:, :8 + k], use_cache=False).logits
        torch.testing.assert_close(steps[:, k], ref[:, -1], rtol=0, atol=1e-5)
    # the original's form for the steps; the prefill through the dense reference (its prefill form is ours)
    original = original_steps(model, dense, original_decoding(6, method.get("leak")), ids, seq, steps.shape[1])
    torch.testing.assert_close(steps[:, 1:], original, rtol=0, atol=1e-5)
    h.remove()


def test_with_logn_is_the_original_patch():
    """rerope, then logn on top (what bojone's rerope_patch.py computes: ReRoPE + log-n queries) equals the
    original's decoding form with log-n at every step, and the dense reference with log-n for the prefill."""
    torch.manual_seed(2)
    model = tiny_model(layers=2, max_pos=L)
    ids = torch.randint(0, 97, (1, 20))
    h1 = longctx.apply(model, method={"name": "rerope", "window": 6})
    h2 = longctx.apply(model, method={"name": "logn", "train_length": L})
    assert model.config._attn_implementation == "longctx_logn+longctx_rerope"
    steps, seq = _decode(model, ids, 20)
    h2.remove()
    dense = dense_reference(6, None, logn_length=L)
    ref = with_attention(model, "test_rerope_dense_logn", dense, input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(steps[:, 0], ref[:, -1], rtol=0, atol=1e-5)
    original = original_steps(model, dense, original_decoding(6, None, logn_length=L), ids, seq, steps.shape[1])
    torch.testing.assert_close(steps[:, 1:], original, rtol=0, atol=1e-5)
    h1.remove()


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m["name"])
def test_inside_the_window_it_is_rope_and_remove_is_exact(method):
    model = tiny_model(layers=2, max_pos=L)
    ids = torch.randint(0, 97, (2, 24))
    before = model(input_ids=ids).logits
    h = longctx.apply(model, method={**method, "window": 24})  # every distance < 24: plain RoPE
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-6)
    h.remove()
    h = longctx.apply(model, method=method)
    assert not torch.allclose(model(input_ids=ids).logits, before, atol=1e-4)
    h.remove()
    assert torch.equal(model(input_ids=ids).logits, before)


def test_refusals():
    model = tiny_model(layers=1, max_pos=L)
    with pytest.raises(longctx.ConfigError, match="rerope rotates with one set of frequencies; rope_type dynamic"):
        longctx.apply(model, rope={"rope_type": "dynamic", "factor": 2.0}, method=METHODS[0])
    h = longctx.apply(model, method=METHODS[0])
    with pytest.raises(longctx.ConfigError, match="another method already rotates inside attention"):
        longctx.apply(model, method={"name": "consistent_dynamic"})
    h.remove()
