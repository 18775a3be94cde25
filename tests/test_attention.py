"""S2-Attn against a dense float64 reference whose per-head masks come from the written rule (reference.py)."""

import pytest
import torch

import longctx
from longctx.attention import S2Settings, cu_seqlens, document_offsets, segment_starts
from reference import causal_doc_mask, logits_with_reference, real_positions, s2_rule_mask, tiny_model

HEADS = [(4, 4), (4, 2), (9, 3)]  # 9/3: SmolLM2-135M's split, H//2 = 4 falls inside kv group 1


def _compare(model, docs, T, group, heads, attention, shift=True, **inputs):
    handle = longctx.apply(model, attention={"type": "s2", **attention})
    model.train()
    ours = model(**inputs, use_cache=False).logits
    handle.remove()
    ref = logits_with_reference(model, s2_rule_mask(docs, T, group, heads, shift), **inputs)
    real = real_positions(docs, T)
    torch.testing.assert_close(ours[real], ref[real], rtol=0, atol=1e-10)
    return ours, ref


@pytest.mark.parametrize("heads,kv", HEADS)
def test_full_rows_match_rule(heads, kv):
    model = tiny_model(heads=heads, kv_heads=kv)
    T = 32
    ids = torch.randint(0, 97, (2, T))
    _compare(model, [[(0, T)]] * 2, T, 8, heads, {"group_size_ratio": 0.25}, input_ids=ids)


@pytest.mark.parametrize("heads,kv", HEADS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_groups_count_from_first_real_token(heads, kv, side):
    model = tiny_model(heads=heads, kv_heads=kv)
    T, n = 32, 21
    ids = torch.randint(0, 97, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    docs = [[(0, T)], [(0, n)] if side == "right" else [(T - n, n)]]
    if side == "right":
        mask[1, n:] = 0
    else:
        mask[1, :T - n] = 0
    _compare(model, docs, T, 8, heads, {"group_size_ratio": 0.25}, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("heads,kv", HEADS)
def test_packed_documents_by_position_ids(heads, kv):
    model = tiny_model(heads=heads, kv_heads=kv)
    T = 32
    ids = torch.randint(0, 97, (2, T))
    docs = [[(0, 10), (10, 3), (13, 19)], [(0, T)]]
    pos = torch.stack([torch.cat([torch.arange(10), torch.arange(3), torch.arange(19)]), torch.arange(T)])
    _compare(model, docs, T, 8, heads, {"group_size_ratio": 0.25}, input_ids=ids, position_ids=pos)


def test_packed_documents_by_cu_seq_lens():
    model = tiny_model(heads=4, kv_heads=2)
    T = 40
    ids = torch.randint(0, 97, (1, T))
    cu = torch.tensor([0, 13, 40], dtype=torch.int32)
    _compare(model, [[(0, 13), (13, 27)]], T, 10, 4, {"group_size_ratio": 0.25}, input_ids=ids,
             cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=27, max_length_k=27)


@pytest.mark.parametrize("heads,kv", HEADS)
def test_group_not_dividing_length(heads, kv):
    model = tiny_model(heads=heads, kv_heads=kv)
    T = 30
    ids = torch.randint(0, 97, (2, T))
    _compare(model, [[(0, T)]] * 2, T, 8, heads, {"group_size": 8}, input_ids=ids)


def test_ratio_one_without_shift_is_full_causal():
    model = tiny_model(heads=4, kv_heads=2)
    T = 24
    ids = torch.randint(0, 97, (2, T))
    ours, _ = _compare(model, [[(0, T)]] * 2, T, T, 4, {"group_size_ratio": 1.0, "shift": False}, shift=False,
                       input_ids=ids)
    model.train()
    plain = model(input_ids=ids, use_cache=False).logits  # transformers' own SDPA
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-10)


@pytest.mark.parametrize("heads,kv", HEADS)
def test_eval_mode_is_full_attention(heads, kv):
    model = tiny_model(heads=heads, kv_heads=kv).eval()
    T = 32
    ids = torch.randint(0, 97, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :9] = 0
    plain = model(input_ids=ids, attention_mask=mask).logits
    handle = longctx.apply(model, attention={"type": "s2"})
    ours = model(input_ids=ids, attention_mask=mask).logits
    dense = logits_with_reference(model, causal_doc_mask([[(0, T)], [(9, T - 9)]], T, heads), input_ids=ids)
    handle.remove()
    real = mask.bool()
    torch.testing.assert_close(ours[real], plain[real], rtol=0, atol=1e-12)
    torch.testing.assert_close(ours[real], dense[real], rtol=0, atol=1e-10)


def test_gradients_match_reference():
    model = tiny_model(heads=9, kv_heads=3)
    T = 32
    ids = torch.randint(0, 97, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 25:] = 0
    docs = [[(0, T)], [(0, 25)]]
    weights = torch.randn(2, T, 97, dtype=torch.float64) * mask[..., None]

    def grads(logits):
        model.zero_grad()
        (logits * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    handle = longctx.apply(model, attention={"type": "s2"})
    model.train()
    ours = grads(model(input_ids=ids, attention_mask=mask, use_cache=False).logits)
    handle.remove()
    ref = grads(logits_with_reference(model, s2_rule_mask(docs, T, 8, 9), input_ids=ids, attention_mask=mask))
    assert ours.keys() == ref.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-9, msg=name)


def test_no_wraparound_first_tokens_never_see_the_end():
    """LongLoRA's eager roll let the first G/2 tokens of the shifted heads attend to the last G/2 (#15, #90)."""
    model = tiny_model(heads=4, kv_heads=4, layers=1)
    T = 16
    ids = torch.randint(0, 97, (1, T))
    handle = longctx.apply(model, attention={"type": "s2", "group_size": 8})
    model.train()
    a = model(input_ids=ids, use_cache=False).logits
    ids2 = ids.clone()
    ids2[0, -4:] = (ids2[0, -4:] + 1) % 97  # change only the last G/2 tokens
    b = model(input_ids=ids2, use_cache=False).logits
    handle.remove()
    torch.testing.assert_close(a[0, :T - 4], b[0, :T - 4], rtol=0, atol=0)  # causal: earlier outputs unchanged


def test_remove_restores_bit_identical_outputs():
    model = tiny_model(heads=4, kv_heads=2)
    ids = torch.randint(0, 97, (2, 32))
    model.train()
    before = model(input_ids=ids, use_cache=False).logits
    handle = longctx.apply(model, rope={"rope_type": "yarn", "factor": 4.0}, attention={"type": "s2"})
    during = model(input_ids=ids, use_cache=False).logits
    handle.remove()
    after = model(input_ids=ids, use_cache=False).logits
    assert not torch.equal(before, during)
    assert torch.equal(before, after)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "s2_settings") for m in model.modules())


# ---- the pure segment arithmetic behind the flash-attn path, checked against the rule masks ----

@pytest.mark.parametrize("shifted", [False, True])
def test_cu_seqlens_reproduce_rule_masks(shifted):
    T, G = 40, 8
    docs = [[(0, 5), (5, 35)], [(3, 30)]]  # row 0: two packed docs; row 1: left pad 3, right pad 7
    real = real_positions(docs, T)
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(35)]), torch.arange(T)])
    offsets = document_offsets(real, pos)
    cu = cu_seqlens(real, segment_starts(real, offsets, G, shifted))
    # Rebuild a dense mask from the varlen boundaries: causal inside each [cu[s], cu[s+1]) of the real tokens.
    flat = torch.nonzero(real.flatten()).flatten()
    seg_of = torch.zeros(flat.numel(), dtype=torch.long)
    for s in range(len(cu) - 1):
        seg_of[cu[s]:cu[s + 1]] = s
    got = torch.zeros(2 * T, 2 * T, dtype=torch.bool)
    for a in range(flat.numel()):
        for b in range(a + 1):
            got[flat[a], flat[b]] = bool(seg_of[a] == seg_of[b])
    want_heads = s2_rule_mask(docs, T, G, heads=2, shift=True)
    want = torch.zeros(2 * T, 2 * T, dtype=torch.bool)
    for b in range(2):
        want[b * T:(b + 1) * T, b * T:(b + 1) * T] = want_heads[b, 1 if shifted else 0]
    assert torch.equal(got, want)
    assert int(cu[-1]) == int(real.sum())


def test_group_size_follows_length():
    s = S2Settings(group_size_ratio=0.25)
    assert [s.group_size_for(n) for n in (8192, 1024, 30)] == [2048, 256, 6]
    assert S2Settings(group_size=2048).group_size_for(100_000) == 2048


def test_gradient_checkpointing_with_s2_gives_the_same_gradients():
    model = tiny_model(heads=4, kv_heads=2)
    ids = torch.randint(0, 97, (2, 32))
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, :7] = 0  # the general (padded) path, whose segment plan is cached on the mask object
    handle = longctx.apply(model, attention={"type": "s2"})
    model.train()

    def grads():
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = grads()
    handle.remove()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-12, msg=name)
