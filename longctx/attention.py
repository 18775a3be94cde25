"""Shift-short attention (S²-Attn, LongLoRA arXiv 2309.12307) as a registered transformers attention.

Rule, for one document of tokens 0..L-1 (counted from its own first real token), group size G (even), H heads:
  heads [0, H//2):  token i sees token j <= i iff i // G == j // G
  heads [H//2, H):  token i sees token j <= i iff (i + G/2) // G == (j + G/2) // G   (no wrap-around)
Query head h reads kv head h // (H / H_kv), as transformers does, also when H//2 falls inside a kv group.
A sliding-window layer (window W: token i sees j iff i - j < W, transformers' rule) gets the intersection of its S²
group and its window, so training never lets a token see further back than the layer does at inference; where
W >= G the window never binds inside a group and this is plain S².

This only applies while the attention module is training; in eval mode the same function computes plain causal
attention (transformers' SDPA path), which is how LongLoRA models are evaluated and served.

Both halves reduce to "causal attention inside segments of at most G tokens". The CPU path runs SDPA with
is_causal on segments laid out as a batch, so no N x N mask ever exists and memory is linear in N for a fixed G.
The GPU path hands the same segments, as cu_seqlens, to flash-attn's varlen kernel when flash-attn is installed.

Registered with both `AttentionInterface` and `AttentionMaskInterface` under `NAME`: without a mask function of our
own, transformers passes no padding mask to a custom attention (docs/design.md §5). Our mask function
returns an `S2Mask`, the 2-D padding mask plus a lazily built dense mask for eval mode, instead of a [B,1,T,T]
tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

NAME = "longctx_s2"


@dataclass(frozen=True)
class S2Settings:
    """How the group size follows the sequence length; stored on each attention module by `longctx.apply`."""

    group_size_ratio: float = 0.25  # LongLoRA: G = N / 4
    group_size: int | None = None  # absolute G; overrides the ratio
    shift: bool = True  # shift half the heads by G/2 (False only for ablations)
    # Sequence parallelism (issue 12): after DeepSpeed Ulysses' all-to-all this process holds query heads
    # [sp_rank*H/P, (sp_rank+1)*H/P) of the whole sequence, and nothing passes that offset to the attention
    # function, so longctx.sequence_parallel stores it here when it sets the run up.
    sp_rank: int = 0
    sp_size: int = 1

    def shifted_from(self, local_heads: int) -> int:
        """The first of this process's `local_heads` query heads that is shifted: the rule shifts the *global*
        heads >= H//2, so under SP a rank holds none, all, or (odd P, e.g. H=6, P=3) a split of them
        (docs/design.md §7: splitting the local heads in half was silently wrong)."""
        if not self.shift:
            return local_heads
        return min(max(local_heads * self.sp_size // 2 - self.sp_rank * local_heads, 0), local_heads)

    def group_size_for(self, n: int) -> int:
        g = self.group_size if self.group_size is not None else int(n * self.group_size_ratio)
        g = min(g, n + n % 2)
        return max(2, g - g % 2)  # even, so that G/2 is a whole number of tokens


# ---------------------------------------------------------------------------------------------------------------
# Pure segment arithmetic (shared by the CPU and flash-attn paths, tested on the CPU against reference masks)

def document_offsets(real: torch.Tensor, position_ids: torch.Tensor | None = None,
                     cu_seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Index of each token inside its own document, [B, T] long (meaningless on padding).

    A document starts at the first real token after padding or the row start, where position_ids do not continue
    by +1 (packed documents whose positions restart), and at every `cu_seq_lens` boundary (flattened packing).
    """
    B, T = real.shape
    prev_real = F.pad(real[:, :-1], (1, 0), value=False)
    start = real & ~prev_real
    if position_ids is not None:
        pos = position_ids.expand(B, T)
        start |= real & F.pad(pos[:, 1:] != pos[:, :-1] + 1, (1, 0), value=True)
    if cu_seq_lens is not None:
        flat = torch.zeros(B * T, dtype=torch.bool, device=real.device)
        flat[cu_seq_lens[:-1].long()] = True
        start |= real & flat.view(B, T)
    t = torch.arange(T, device=real.device).expand(B, T)
    last_start = torch.cummax(torch.where(start, t, torch.zeros_like(t)), dim=1).values
    return t - last_start


def segment_starts(real: torch.Tensor, offsets: torch.Tensor, group: int, shifted: bool) -> torch.Tensor:
    """[B, T] bool: where an attention segment starts, for the unshifted or the shifted half of the heads."""
    if not shifted:
        return real & (offsets % group == 0)
    return real & ((offsets == 0) | ((offsets + group // 2) % group == 0))


def cu_seqlens(real: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """flash-attn varlen boundaries over the real tokens in row-major order: int32 [num_segments + 1]."""
    starts = starts[real]
    bounds = torch.nonzero(starts).flatten()
    total = torch.tensor([starts.numel()], device=starts.device)
    return torch.cat([bounds, total]).to(torch.int32)


# ---------------------------------------------------------------------------------------------------------------
# The mask function: hands the padding mask through, builds transformers' dense mask only when asked (eval).

@dataclass
class S2Mask:
    padding: torch.Tensor | None  # [B, T_kv] bool, None when every token is real
    dense_kwargs: dict[str, Any]
    _cache: dict = field(default_factory=dict, repr=False)

    def dense(self) -> torch.Tensor | None:
        """transformers' own SDPA mask for these inputs (None when is_causal suffices); built once per forward."""
        if "dense" not in self._cache:
            from transformers.masking_utils import sdpa_mask

            self._cache["dense"] = sdpa_mask(**self.dense_kwargs)
        return self._cache["dense"]


def s2_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
            attention_mask: torch.Tensor | None = None, **kwargs) -> S2Mask:
    from transformers.masking_utils import prepare_padding_mask

    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None and bool(padding.all()):
        padding = None
    kwargs.pop("dtype", None), kwargs.pop("config", None)
    dense_kwargs = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)
    return S2Mask(padding, dense_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The attention function

def s2_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: S2Mask | torch.Tensor | None, scaling: float | None = None,
                         dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """q [B, H, T, D], k/v [B, H_kv, T_kv, D] (already rotated) -> ([B, T, H, D], None)."""
    if not module.training:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        mask = attention_mask.dense() if isinstance(attention_mask, S2Mask) else attention_mask
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)

    settings: S2Settings | None = getattr(module, "s2_settings", None)
    if settings is None:
        raise RuntimeError(f"{type(module).__name__} has no s2_settings: select S2 attention with longctx.apply()")
    if attention_mask is not None and not isinstance(attention_mask, S2Mask):
        raise ValueError("S2 attention needs the 2-D padding mask (attention_mask of shape [B, T]); it got a "
                         f"prepared {tuple(attention_mask.shape)} mask")
    if kwargs.get("softcap") is not None:  # Gemma-2; longctx.families refuses it before a forward gets here
        raise ValueError(f"S2 attention cannot soft-cap attention logits (softcap={kwargs['softcap']}); use full "
                         "attention for this model")
    window = kwargs.get("sliding_window")  # this layer's window (Gemma-3 sliding layers, Mistral v0.1), or None
    B, H, T, D = query.shape
    if key.shape[2] != T:
        raise ValueError(f"S2 attention trains without a KV cache (use_cache=False): {T} queries, "
                         f"{key.shape[2]} keys")
    group = settings.group_size_for(T)
    split = settings.shifted_from(H)
    plan = _plan(attention_mask, kwargs, B, T, group, settings.shift, query.device)
    kernel = varlen_kernel(query) if plan is not None else None
    if plan is None:
        out = _uniform(query, key, value, group, split, scaling, dropout, window)
    elif kernel is not None:
        out = _flash(query, key, value, plan, split, scaling, dropout, kernel, window)
    else:
        out = _segments(query, key, value, plan, split, scaling, dropout, window)
    return out, None


@dataclass
class _Plan:
    """Where the segments of each head half lie, computed once per forward and shared by every layer."""

    real_idx: torch.Tensor  # [N_real] flat indices of real tokens into B*T
    halves: list[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]]  # [unshifted, shifted]: (seg, slot, width, cu)
    shape: tuple[int, int]


def _plan(mask: S2Mask | None, kwargs: dict, B: int, T: int, group: int, shift: bool, device) -> _Plan | None:
    """None for the common case (no padding, one document per row, T % G == 0): the uniform view-based path."""
    cache = mask._cache if isinstance(mask, S2Mask) else {}
    key = ("plan", group, shift, T)
    if key in cache:
        return cache[key]
    padding = mask.padding if isinstance(mask, S2Mask) else None
    pos, cu = kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q")
    restarts = pos is not None and bool((pos[:, 1:] != pos[:, :-1] + 1).any())
    if padding is None and cu is None and not restarts and T % group == 0:
        cache[key] = None
        return None
    real = padding if padding is not None else torch.ones(B, T, dtype=torch.bool, device=device)
    offsets = document_offsets(real, pos if restarts else None, cu)
    real_idx = torch.nonzero(real.flatten()).flatten()
    halves = []
    for shifted in ((False, True) if shift else (False,)):
        starts = segment_starts(real, offsets, group, shifted).flatten()[real_idx]
        seg = torch.cumsum(starts, 0) - 1
        first = torch.nonzero(starts).flatten()
        slot = torch.arange(starts.numel(), device=device) - first[seg]
        bounds = torch.cat([first, torch.tensor([starts.numel()], device=device)])
        width = int((bounds[1:] - bounds[:-1]).max()) if first.numel() else 1
        halves.append((seg, slot, width, bounds.to(torch.int32)))
    plan = _Plan(real_idx, halves, (B, T))
    cache[key] = plan
    return plan


def _head_halves(H: int, H_kv: int, split: int):
    """[(q head slice, kv head slice or None to expand, shifted)] for the unshifted heads [0, split) and the
    shifted heads [split, H), leaving out an empty one (under sequence parallelism a rank may hold only one kind)."""
    rep = H // H_kv
    kv_split = split // rep if split % rep == 0 else None
    halves = [(slice(0, split), None if kv_split is None else slice(0, kv_split), False),
              (slice(split, H), None if kv_split is None else slice(kv_split, H_kv), True)]
    return [h for h in halves if h[0].stop > h[0].start]


def _expand_kv(k: torch.Tensor, H: int, heads: slice) -> torch.Tensor:
    """The kv heads (dim 1) read by query heads `heads`: h -> h // (H / H_kv), one per query head."""
    index = torch.arange(heads.start, heads.stop, device=k.device) // (H // k.shape[1])
    return k.index_select(1, index)


def _sdpa_causal(q, k, v, scale, dropout, window=None):
    """Causal SDPA over rows of consecutive tokens; with a window shorter than the row, also i - j < window (a
    [L, L] band, the same for every row because a row's slots are its tokens' distances)."""
    gqa = q.shape[1] != k.shape[1]
    L = q.shape[2]
    if window is None or window >= L:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout,
                                              enable_gqa=gqa)
    i = torch.arange(L, device=q.device)
    band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scale, dropout_p=dropout, enable_gqa=gqa)


def _blocks(q, k, v, group, scale, dropout, window=None):
    """Causal attention inside consecutive blocks of `group` tokens: [B, h, L, D] (L % group == 0) -> [B, L, h, D]."""
    B, h, L, D = q.shape
    n = L // group

    def split(x):  # [B, h, L, D] -> [B*n, h, G, D]; a view when x came from a [B, T, H, D] projection
        return x.transpose(1, 2).reshape(B * n, group, x.shape[1], D).transpose(1, 2)

    o = _sdpa_causal(split(q), split(k), split(v), scale, dropout, window)
    return o.transpose(1, 2).reshape(B, L, h, D)


def _split_halves(q, k, v, split: int):
    """[(q, k, v, shifted)] per head half along dim 1. One `split` per tensor, so the backward is one concatenation
    (slicing each half separately costs a full-size zero gradient per slice: it dominated the CPU profile)."""
    H, H_kv = q.shape[1], k.shape[1]
    halves = _head_halves(H, H_kv, split)
    qs = q.split([s.stop - s.start for s, _, _ in halves], dim=1)
    if all(kv is not None for _, kv, _ in halves):
        ks, vs = (x.split([kv.stop - kv.start for _, kv, _ in halves], dim=1) for x in (k, v))
    else:
        ks, vs = ([_expand_kv(x, H, s) for s, _, _ in halves] for x in (k, v))
    return [(qh, kh, vh, shifted) for qh, kh, vh, (_, _, shifted) in zip(qs, ks, vs, halves)]


def _uniform(q, k, v, group, split, scale, dropout, window=None):
    """No padding, one document per row, T % G == 0: blocks are reshapes of the sequence axis."""
    B, H, T, D = q.shape
    outs = []
    for qh, kh, vh, shifted in _split_halves(q, k, v, split):
        if not shifted:
            outs.append(_blocks(qh, kh, vh, group, scale, dropout, window))
            continue
        # Shifted half: [0, G/2), whole groups over [G/2, T - G/2), then [T - G/2, T); the two half groups run
        # together as a batch of two. No wrap-around: LongLoRA's roll let the first G/2 tokens see the last ones.
        g2 = group // 2
        head, mid, tail = zip(*(x.split([g2, T - group, g2], dim=2) for x in (qh, kh, vh)))
        first, last = _sdpa_causal(*(torch.cat([a, b]) for a, b in zip(head, tail)), scale, dropout, window) \
            .transpose(1, 2).split([B, B])
        parts = [first, _blocks(*mid, group, scale, dropout, window), last] if T > group else [first, last]
        outs.append(torch.cat(parts, dim=1))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def _segments(q, k, v, plan: _Plan, split, scale, dropout, window=None):
    """General CPU path: gather each segment into a row of width <= G, SDPA is_causal, scatter back.

    Segments start at row slot 0 and their padding comes after the real tokens, so causal masking alone keeps
    every real query away from padding: no mask tensor is needed.
    """
    B, H, T, D = q.shape
    idx = plan.real_idx
    flat = [x.transpose(1, 2).reshape(B * T, x.shape[1], D)[idx] for x in (q, k, v)]  # [N_real, h, D]
    out = q.new_zeros(B * T, H, D)
    for (heads, _, _), (qh, kh, vh, shifted) in zip(_head_halves(H, k.shape[1], split), _split_halves(*flat, split)):
        seg, slot, width, _ = plan.halves[shifted]
        S = int(seg[-1]) + 1 if seg.numel() else 0

        def gather(x):  # [N_real, h, D] -> [S, h, width, D]
            rows = x.new_zeros(S, width, x.shape[1], D)
            rows[seg, slot] = x
            return rows.transpose(1, 2)

        o = _sdpa_causal(gather(qh), gather(kh), gather(vh), scale, dropout, window)
        o = o.transpose(1, 2)  # [S, width, h, D]
        out = out.index_put((idx[:, None], torch.arange(heads.start, heads.stop, device=q.device)[None]),
                            o[seg, slot])
    return out.view(B, T, H, D)


def varlen_kernel(query: torch.Tensor):
    """flash-attn's `flash_attn_varlen_func` where it can run (CUDA, 16-bit, flash-attn installed), else None.

    The optional GPU extra is imported here, never at module top level. tests/standins.py has a pure-PyTorch
    function with the same signature, so the plumbing of `_flash` runs on the CPU in CI."""
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)):
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _flash(q, k, v, plan: _Plan, split, scale, dropout, flash_attn_varlen_func, window=None):
    """GPU path: flash-attn varlen over the same segments (per-document cu_seqlens, so no batch-wide boundary
    arithmetic: LongLoRA issues #148, #199, #182)."""
    B, H, T, D = q.shape
    idx = plan.real_idx
    flat = [x.transpose(1, 2).reshape(B * T, x.shape[1], D)[idx] for x in (q, k, v)]
    out = q.new_zeros(B * T, H, D)
    for (heads, _, _), (qh, kh, vh, shifted) in zip(_head_halves(H, k.shape[1], split), _split_halves(*flat, split)):
        _, _, width, cu = plan.halves[shifted]
        o = flash_attn_varlen_func(qh.contiguous(), kh.contiguous(), vh.contiguous(), cu, cu,
                                   width, width, dropout_p=dropout, softmax_scale=scale, causal=True,
                                   window_size=(-1, -1) if window is None else (window - 1, 0))
        out = out.index_put((idx[:, None], torch.arange(heads.start, heads.stop, device=q.device)[None]), o)
    return out.view(B, T, H, D)


def register() -> None:
    """Register S2 with transformers' attention and mask registries (idempotent; called by `longctx.apply`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, s2_attention_forward)
    AttentionMaskInterface.register(NAME, s2_mask)
