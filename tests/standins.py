"""Pure-PyTorch stand-ins for the GPU-only kernels, with the real kernels' signatures, so that longctx's plumbing
around them (cu_seqlens, shapes, head slices, dtypes, reductions) runs on the CPU in CI (issue 16 item 6).

Each stand-in checks what the real kernel requires of its inputs and is itself tested against SDPA / torch's
cross-entropy (tests/test_gpu_paths.py). They are not kernels: one SDPA call per segment, plain logits.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn.flash_attn_varlen_func: q [total_q, H, D], k/v [total_k, H_kv, D] (H % H_kv == 0), sequences
    delimited by int32 cu_seqlens; returns [total_q, H, D] in q's dtype."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert x.dtype in (torch.float16, torch.bfloat16), f"flash-attn takes fp16/bf16 only, {name} is {x.dtype}"
        assert x.dim() == 3 and x.stride(-1) == 1, f"{name}: [total, heads, dim] with a contiguous last dim"
    assert q.shape[1] % k.shape[1] == 0 and k.shape == v.shape
    for cu, mx, x in ((cu_seqlens_q, max_seqlen_q, q), (cu_seqlens_k, max_seqlen_k, k)):
        assert cu.dtype == torch.int32 and cu.dim() == 1 and int(cu[0]) == 0 and int(cu[-1]) == x.shape[0]
        assert int((cu[1:] - cu[:-1]).max()) <= mx, "max_seqlen below the longest sequence"
    assert torch.equal(cu_seqlens_q, cu_seqlens_k), "the stand-in covers self-attention (q and k segments equal)"
    left, right = window_size  # flash-attn: query i sees keys [i - left, i + right]; -1 = unbounded
    assert right in (-1, 0) and (right == 0) == (left != -1) and causal, "the stand-in covers causal (+ left window)"
    assert softcap == 0.0 and alibi_slopes is None and block_table is None
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for s, e in zip(bounds, bounds[1:]):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None].float() for x in (q, k, v))  # [1, h, len, D]
        i = torch.arange(e - s)
        mask = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] <= left) if left >= 0 else True)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=softmax_scale, dropout_p=dropout_p,
                                           enable_gqa=qs.shape[1] != ks.shape[1])
        out[s:e] = o[0].transpose(0, 1).to(q.dtype)
    return out


class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    """liger_kernel.transformers.fused_linear_cross_entropy.LigerFusedLinearCrossEntropyLoss: forward(lin_weight,
    _input, target, bias=None) = cross_entropy(_input @ lin_weight.T + bias, target), float32 softmax."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", **kwargs):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, lin_weight, _input, target, bias=None):
        assert _input.dim() == 2 and target.dim() == 1 and _input.shape[0] == target.shape[0]
        assert _input.dtype == lin_weight.dtype, "Liger computes the matmul in one dtype"
        logits = F.linear(_input, lin_weight, bias).float()
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction=self.reduction)


def install(monkeypatch, flash: bool = False, liger: bool = False) -> None:
    """Make `import flash_attn` / `import liger_kernel...` find the stand-ins for the rest of a test."""
    if flash:
        monkeypatch.setitem(__import__("sys").modules, "flash_attn",
                            types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    if liger:
        names = ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.fused_linear_cross_entropy")
        for name in names:
            module = types.ModuleType(name)
            module.LigerFusedLinearCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss
            monkeypatch.setitem(__import__("sys").modules, name, module)
