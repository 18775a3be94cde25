"""consistent_dynamic against references: transformers' own `dynamic` for a full forward, the full forward of the
same prefix for cached decoding (one layer, where it is exact), and a decoding loop whose attention rotates with
transformers' own dynamic rotary module (any depth, where a full forward is no reference: docs/design.md §5)."""

import copy

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import longctx
from reference import tiny_model

L, FACTOR = 16, 4.0
METHOD = {"name": "consistent_dynamic", "factor": FACTOR}


def greedy_steps(model, ids, steps, mask=None):
    """Cached greedy decoding: the last-position logits of the prefill and of every step, and the sequence."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=True,
                position_ids=None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0))
    logits, seq = [out.logits[:, -1]], ids
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = None if mask is None else mask.sum(-1, keepdim=True) - 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), seq


def full_forward_steps(model, seq, prefill):
    """The last-position logits of a full forward (no cache) of every prefix seq[:, :prefill + k]."""
    return torch.stack([model(input_ids=seq[:, :n], use_cache=False).logits[:, -1]
                        for n in range(prefill, seq.shape[1] + 1)], 1)


def test_full_forward_equals_transformers_dynamic():
    """Without a cache every key and query is rotated with the base for the whole length, as transformers'
    `dynamic` does for one forward: below, at and above the original length, two layers."""
    model = tiny_model(layers=2, max_pos=L)
    for n in (10, 16, 40):  # increasing: transformers' dynamic keeps the largest base it has seen
        ids = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(n))
        h = longctx.apply(model, rope={"rope_type": "dynamic", "factor": FACTOR})
        hf = model(input_ids=ids, use_cache=False).logits
        h.remove()
        h = longctx.apply(model, method=METHOD)
        ours = model(input_ids=ids, use_cache=False).logits
        h.remove()
        torch.testing.assert_close(ours, hf, rtol=0, atol=1e-5)


def test_one_layer_cached_decoding_is_the_full_forward_and_transformers_dynamic_is_not():
    """One layer: the logits of every decoding step (prefill 10 < L = 16, then 38 steps to 4.8 L) equal those of a
    full forward of the same prefix within 1e-5. transformers' dynamic is measurably off (the README's number)."""
    torch.manual_seed(1)
    model = tiny_model(layers=1, max_pos=L)
    ids = torch.randint(0, 97, (1, 10))
    h = longctx.apply(model, method=METHOD)
    steps, seq = greedy_steps(model, ids, 38)
    full = full_forward_steps(model, seq, 10)
    h.remove()
    assert (steps - full).abs().max().item() < 1e-5

    h = longctx.apply(model, rope={"rope_type": "dynamic", "factor": FACTOR})
    hf_steps, hf_seq = greedy_steps(model, ids, 38)
    hf_full = full_forward_steps(model, hf_seq, 10)
    h.remove()
    assert (hf_steps - hf_full).abs().max().item() > 1e-4  # rotated keys in the cache carry stale bases


def _transformers_dynamic_attention(rotary):
    """Reference attention for unrotated q/k: rotate with transformers' own dynamic rotary module at the current
    length n (a fresh module each call: no history), apply_rotary_pos_emb, then dense softmax attention."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        n, Tq = key.shape[2], query.shape[2]
        cos, sin = rotary()(value, torch.arange(n)[None])
        q, _ = apply_rotary_pos_emb(query, query, cos[:, n - Tq:], sin[:, n - Tq:])
        _, k = apply_rotary_pos_emb(key, key, cos, sin)
        k = k.repeat_interleave(query.shape[1] // k.shape[1], 1)
        v = value.repeat_interleave(query.shape[1] // value.shape[1], 1)
        scores = (q @ k.transpose(-1, -2)) * scaling
        causal = torch.arange(n)[None] <= torch.arange(n - Tq, n)[:, None]
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return (probs @ v).transpose(1, 2), None

    return attend


def test_two_layer_cached_decoding_rotates_as_transformers_dynamic_at_every_step():
    """Two layers: the same cached decoding, but with the attention replaced by the reference above, gives the same
    logits at every step (the rotation of every key and query at every layer and step is the rule's)."""
    torch.manual_seed(2)
    model = tiny_model(layers=2, max_pos=L)
    ids = torch.randint(0, 97, (1, 10))
    h = longctx.apply(model, method=METHOD)
    ours, seq = greedy_steps(model, ids, 30)
    hf_config = copy.deepcopy(model.config)
    hf_config.rope_parameters = {"rope_type": "dynamic", "factor": FACTOR, "rope_theta": 10000.0}
    AttentionInterface.register("test_dynamic_reference", _transformers_dynamic_attention(
        lambda: LlamaRotaryEmbedding(hf_config).double()))
    AttentionMaskInterface.register("test_dynamic_reference", sdpa_mask)
    model.set_attn_implementation("test_dynamic_reference")
    ref, ref_seq = greedy_steps(model, ids, 30)
    h.remove()
    assert torch.equal(seq, ref_seq)
    assert (ours - ref).abs().max().item() < 1e-5
    # and what a full forward of the prefix gives instead (deeper keys from other bases): measurably different
    assert (ours - full_forward_steps(model, seq, 10)).abs().max().item() > 1e-6


def test_left_padding_rows_decode_as_alone():
    """A left-padded batch: each row's base follows its own length (key positions from the mask), so every row
    decodes exactly as it does alone."""
    torch.manual_seed(3)
    model = tiny_model(layers=2, max_pos=L)
    rows = [torch.randint(0, 97, (1, n)) for n in (12, 7)]
    h = longctx.apply(model, method=METHOD)
    alone = [greedy_steps(model, r, 20)[0] for r in rows]
    batch = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for b, r in enumerate(rows):
        batch[b, 12 - r.shape[1]:], mask[b, 12 - r.shape[1]:] = r[0], 1
    together, _ = greedy_steps(model, batch, 20, mask=mask)
    h.remove()
    for b in range(2):
        torch.testing.assert_close(together[b], alone[b][0], rtol=0, atol=1e-8)


def test_generate_and_remove_are_exact():
    model = tiny_model(layers=2, max_pos=L)
    ids = torch.randint(0, 97, (1, 12))
    before = model(input_ids=torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(0))).logits
    h = longctx.apply(model, method=METHOD)
    out = model.generate(input_ids=ids, max_new_tokens=20, do_sample=False)
    _, seq = greedy_steps(model, ids, 20)
    h.remove()
    assert torch.equal(out, seq)
    after = model(input_ids=torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(0))).logits
    assert torch.equal(before, after)


def test_refuses_rope_scaling_on_top():
    model = tiny_model(layers=1, max_pos=L)
    with pytest.raises(longctx.ConfigError, match="consistent_dynamic computes the rotation itself"):
        longctx.apply(model, rope={"rope_type": "yarn", "factor": 2.0}, method=METHOD)
    assert model.config.rope_parameters["rope_type"] == "default"  # nothing left half-applied
