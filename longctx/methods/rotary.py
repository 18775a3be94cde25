"""What the methods that rotate inside attention share: an identity rotary module, positions, rotation, selection.

consistent_dynamic and (leaky) ReRoPE need q and k *unrotated* in the attention function, so that the KV cache
holds unrotated keys and every step can rotate them for the current length (docs/design.md §5, "consistent
dynamic NTK with no patching"). The model's rotary module is replaced on the instance by `IdentityRotary`
(cos = 1, sin = 0: `apply_rotary_pos_emb` then returns q and k exactly as they were); the registered attention
function rotates.

Positions: queries from `position_ids` (transformers passes them to the attention function; `generate` derives
them from the padding mask). Keys: the same `position_ids` in a forward without cache (prefill), else each key's
index among its row's real tokens, from the padding mask (left padding), as `generate` numbers them.
"""

from __future__ import annotations

from typing import Callable

import torch

from longctx.attention import S2Mask, s2_mask

Undo = Callable[[], None]


class IdentityRotary(torch.nn.Module):
    """Stands in for the model's rotary embedding: cos = 1, sin = 0, so q and k stay unrotated (bit for bit)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*position_ids.shape, self.dim)
        return x.new_ones(shape), x.new_zeros(shape)


def rotary_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute name, module) of every rotary embedding module (transformers names them *RotaryEmbedding)."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child).__name__.endswith("RotaryEmbedding") or isinstance(child, IdentityRotary)]


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "head_dim")]


def replace_rotary(model: torch.nn.Module, dim: int) -> Undo:
    """Put `IdentityRotary(dim)` in place of every rotary module; the undo puts the originals back."""
    found = rotary_modules(model)
    if not found:
        raise ValueError(f"model type {model.config.model_type!r}: no rotary embedding module found")
    if any(isinstance(m, IdentityRotary) for _, _, m in found):
        raise ValueError("another method already rotates inside attention (consistent_dynamic, rerope and "
                         "leaky_rerope exclude each other); remove its handle first")
    for parent, name, _ in found:
        setattr(parent, name, IdentityRotary(dim))

    def undo():
        for parent, name, old in found:
            setattr(parent, name, old)
    return undo


def set_on_modules(model: torch.nn.Module, attr: str, value) -> Undo:
    """Store a method's settings on every attention module (as S2 does with `s2_settings`)."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"model type {model.config.model_type!r}: no attention modules found")
    for m in modules:
        setattr(m, attr, value)

    def undo():
        for m in modules:
            delattr(m, attr)
    return undo


def select(model, name: str, attention: Callable, mask: Callable | None = s2_mask) -> Undo:
    """Register `attention` under `name` with transformers' AttentionInterface, and `mask` (default: the padding-aware
    one) with AttentionMaskInterface (without one transformers hands a custom attention no padding mask:
    docs/design.md §5), then select it on this model; the undo selects the previous implementation again."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention)
    if mask is not None:
        AttentionMaskInterface.register(name, mask)
    old = model.config._attn_implementation
    model.set_attn_implementation(name)
    return lambda: model.set_attn_implementation(old)


def positions(mask, kwargs: dict, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query positions [B, Tq], key positions [B, Tkv]), long."""
    B, Tq, Tkv, device = query.shape[0], query.shape[2], key.shape[2], query.device
    pos = kwargs.get("position_ids")
    q = (pos if pos is not None else torch.arange(Tkv - Tq, Tkv, device=device)[None]).to(device).long().expand(B, Tq)
    if Tq == Tkv:
        return q, q
    padding = mask.padding if isinstance(mask, S2Mask) else None
    if padding is not None:
        return q, (padding.long().cumsum(-1) - 1).clamp(min=0)
    return q, torch.arange(Tkv, device=device).expand(B, Tkv)


def rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated to positions pos [B, T] (any real numbers) with inv_freq [D/2] or per row [B, D/2];
    transformers' arithmetic (rotate_half layout, float32 angles; float64 for a float64 x)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv = inv_freq.to(x.device, dt)
    freqs = pos.to(dt)[..., None] * (inv[:, None, :] if inv.dim() == 2 else inv)  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


def allowed(mask, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """[B, 1, Tq, Tkv] bool: which keys each query may see (causal by index and padding)."""
    dense = mask.dense() if isinstance(mask, S2Mask) else mask
    if dense is not None:
        return dense.bool() if dense.dtype == torch.bool else dense == 0
    Tq, Tkv = query.shape[2], key.shape[2]
    i = torch.arange(Tq, device=query.device)[:, None] + (Tkv - Tq)
    return (torch.arange(Tkv, device=query.device)[None] <= i)[None, None]


def per_forward(mask, key, build: Callable):
    """`build()` once per forward: every layer gets the same mask object (its cache), so cos/sin tables and
    frequencies are computed once, not once per layer."""
    if not isinstance(mask, S2Mask):
        return build()
    if key not in mask._cache:
        mask._cache[key] = build()
    return mask._cache[key]
