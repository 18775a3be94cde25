"""The GPU-only paths on the CPU (issue 16 item 6): S²'s flash-attn varlen path and the Liger loss path, run
through pure-PyTorch stand-ins with the real kernels' signatures (tests/standins.py), each stand-in first checked
against SDPA / torch's cross-entropy, then the longctx path around it against the CPU path and a reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import longctx
from longctx import attention
from longctx.loss import causal_lm_loss
from reference import logits_with_reference, real_positions, s2_rule_mask, tiny_model
import standins


def test_flash_standin_equals_sdpa_with_a_block_diagonal_mask():
    g = torch.Generator().manual_seed(0)
    lengths, H, H_kv, D = [5, 1, 12, 7], 4, 2, 8
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, D, generator=g) for h in (H, H_kv, H_kv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = standins.flash_attn_varlen_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, cu, max(lengths),
                                          max(lengths), softmax_scale=0.3, causal=True)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i = torch.arange(total)
    mask = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None].bfloat16().float(),
                                         k.bfloat16().float().repeat_interleave(2, 1).transpose(0, 1)[None],
                                         v.bfloat16().float().repeat_interleave(2, 1).transpose(0, 1)[None],
                                         attn_mask=mask, scale=0.3)[0].transpose(0, 1)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=1e-2)
    with pytest.raises(AssertionError, match="fp16/bf16"):  # it refuses what flash-attn refuses
        standins.flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, causal=True)


def test_liger_standin_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    h, w, t = torch.randn(9, 6, generator=g), torch.randn(11, 6, generator=g), torch.randint(0, 11, (9,), generator=g)
    t[3] = -100
    got = standins.LigerFusedLinearCrossEntropyLoss(reduction="sum")(w, h, t)
    assert torch.allclose(got, F.cross_entropy(h @ w.T, t, reduction="sum"), atol=1e-6)


def test_varlen_kernel_only_on_cuda_16bit(monkeypatch):
    standins.install(monkeypatch, flash=True)  # even when flash-attn imports, the CPU never takes that path
    assert attention.varlen_kernel(torch.zeros(1, dtype=torch.bfloat16)) is None


@pytest.mark.parametrize("family,heads,kv", [("llama", 4, 2), ("llama", 9, 3),  # 9/3: halves split a kv group
                                             ("gemma3_text", 4, 2)])  # a sliding layer, window 6 < G = 8
def test_s2_flash_path_equals_segments_path_and_the_rule(monkeypatch, family, heads, kv):
    """A padded, packed batch (so the segment plan is used) in bf16, forward and backward, with the flash-attn
    stand-in in place of the kernel, against the CPU segments path and the float64 rule reference."""
    T, G = 32, 8
    docs = [[(0, 11), (11, 21)], [(5, 27)]]  # row 0: two packed documents; row 1: left padding
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(1))
    mask = real_positions(docs, T).long()
    pos = torch.stack([torch.cat([torch.arange(11), torch.arange(21)]), torch.arange(T)])
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
    calls = []

    def counting_kernel(*args, **kwargs):
        calls.append(args[3])  # cu_seqlens_q
        return standins.flash_attn_varlen_func(*args, **kwargs)

    def run(kernel):
        model = tiny_model(family, heads=heads, kv_heads=kv, dtype=torch.bfloat16)
        monkeypatch.setattr(attention, "varlen_kernel", lambda query: kernel)
        handle = longctx.apply(model, attention={"type": "s2", "group_size": G})
        try:
            model.train()
            logits = model(**inputs, use_cache=False).logits
            logits.float()[mask.bool()].square().sum().backward()
        finally:
            handle.remove()
        return logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}

    flash_logits, flash_grads = run(counting_kernel)
    assert len(calls) == 2 * 2  # 2 layers x 2 head halves went through the kernel
    seg_logits, seg_grads = run(None)
    real = mask.bool()
    torch.testing.assert_close(flash_logits[real], seg_logits[real], rtol=0.02, atol=0.05)
    for n in seg_grads:
        scale = seg_grads[n].abs().max().item() + 1e-3
        assert (flash_grads[n] - seg_grads[n]).abs().max().item() <= 0.05 * scale, n
    if family == "llama":
        ref_model = tiny_model(heads=heads, kv_heads=kv, dtype=torch.float64)
        ref = logits_with_reference(ref_model, s2_rule_mask(docs, T, G, heads), **inputs).float()
        torch.testing.assert_close(flash_logits[real], ref[real], rtol=0.02, atol=0.05)


@pytest.mark.parametrize("bias", [False, True])
def test_liger_path_equals_the_chunked_loss(monkeypatch, bias):
    standins.install(monkeypatch, liger=True)
    calls = []
    forward = standins.LigerFusedLinearCrossEntropyLoss.forward
    monkeypatch.setattr(standins.LigerFusedLinearCrossEntropyLoss, "forward",
                        lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 13, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True) if bias else None
    labels = torch.randint(0, 50, (2, 13), generator=g)
    labels[0, :4] = -100

    def run(use_liger):
        loss = causal_lm_loss(hidden, weight, labels, bias=b, num_items_in_batch=17, chunk_size=5,
                              use_liger=use_liger)
        grads = torch.autograd.grad(loss, [hidden, weight] + ([b] if bias else []))
        return loss, grads

    liger, liger_grads = run(True)
    assert calls == [1]  # the Liger path ran, not the fallback
    chunked, chunked_grads = run(False)
    assert calls == [1]
    assert torch.allclose(liger, chunked, atol=1e-6)
    for a, c in zip(liger_grads, chunked_grads):
        assert torch.allclose(a, c, atol=1e-6)
