"""ReRoPE and leaky ReRoPE (Su, kexue.fm/archives/9708, bojone/rerope): clip the relative position at a window.

    longctx eval ppl --model data/tiny-base --method rerope window=64 --lengths 256,1024 --out /tmp/rerope
    longctx eval ppl --model data/tiny-base --method leaky_rerope window=64 leak=16 --lengths 256,1024 --out /tmp/lr

The score of query i and key j uses the relative position rel = i - j while rel < w, and beyond it
  rerope:        w                     (every far key looks as far as the window)
  leaky_rerope:  w + (rel - w) / leak  (far keys keep their order, compressed by `leak`)
Computed as Su does: two score matrices, normal RoPE (q at i, k at j) and the rectified one (rerope: q at w against
unrotated k; leaky: q at (i + w (leak - 1)) / leak against k at j / leak), merged by rel < w. The same form serves
prefill and cached decoding: the cache holds unrotated keys (`IdentityRotary`) and every step rotates them again,
O(n d) per step, and the two score matrices cost about twice dense attention's FLOPs (no fused kernel: queries
are processed in chunks so at most ~16M scores exist at a time). Frequencies and attention factor come from the
rope registry for the model's (resolved) RoPE, so `--rope` scaling of a static type combines with it.

Unlike the reference patches this does not also scale queries by log-n: that is the separate `logn` method, which
composes (`longctx.apply(model, method=rerope)` then `longctx.apply(model, method=logn)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from longctx import rope
from longctx.methods import rotary

NAME = "longctx_rerope"
MAX_SCORES = 2 ** 24  # scores per chunk of queries (x2 matrices), bounds memory at long n


class _Window(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    window: int | None = Field(None, ge=1, description="Relative positions from w on are rectified; default: the "
                                                       "model's original length / 4 (Su's results: w = 1024 at 4096).")


class Params(_Window):
    name: Literal["rerope"]


class LeakyParams(_Window):
    name: Literal["leaky_rerope"]
    leak: float = Field(16.0, ge=1, description="Beyond the window relative positions grow 1/leak as fast (Su: 16).")


@dataclass(frozen=True)
class Settings:
    window: int
    leak: float | None  # None: ReRoPE (the rectified position is w itself)
    inv_freq: torch.Tensor
    attention_factor: float


def apply(model, spec: Params | LeakyParams, target, undo: list) -> None:
    p = target.rope or rope.resolve(None, model.config)
    if p.rope_type in rope.CHANGES_WITH_LENGTH:
        raise ValueError(f"method {spec.name} rotates with one set of frequencies; rope_type {p.rope_type} changes "
                         f"them with the length: use a static rope type ({', '.join(rope.STATIC_TYPES)})")
    head_dim = rotary.attention_modules(model)[0].head_dim
    if p.rotary_dim != head_dim:
        raise ValueError(f"method {spec.name} needs a rotary embedding over the whole head (rotary dim "
                         f"{p.rotary_dim}, head dim {head_dim})")
    inv_freq, att = rope.frequencies(p)
    window = spec.window or max(1, target.original_length // 4)
    settings = Settings(window, getattr(spec, "leak", None), inv_freq, att)
    undo.append(rotary.replace_rotary(model, p.rotary_dim))
    undo.append(rotary.set_on_modules(model, "longctx_rerope", settings))
    undo.append(rotary.select(model, NAME, attention))


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """q [B, H, Tq, D], k/v [B, H_kv, Tkv, D] unrotated -> ([B, Tq, H, D], None)."""
    s: Settings = module.longctx_rerope
    B, H, Tq, D = query.shape
    H_kv, Tkv = key.shape[1], key.shape[2]
    rep = H // H_kv
    q_pos, k_pos = rotary.positions(attention_mask, kwargs, query, key)
    w = s.window
    q1, k1 = rotary.rotate(query, q_pos, s.inv_freq), rotary.rotate(key, k_pos, s.inv_freq)
    if s.leak is None:
        q2, k2 = rotary.rotate(query, torch.full_like(q_pos, w), s.inv_freq), key
    else:
        q2 = rotary.rotate(query, (q_pos + w * (s.leak - 1)) / s.leak, s.inv_freq)
        k2 = rotary.rotate(key, k_pos / s.leak, s.inv_freq)
    allowed = rotary.allowed(attention_mask, query, key)  # [B, 1, Tq, Tkv]
    scale = (scaling if scaling is not None else D ** -0.5) * s.attention_factor ** 2  # att multiplies q and k
    k1t, k2t = k1.transpose(-1, -2), k2.transpose(-1, -2)
    v = value.repeat_interleave(rep, dim=1)
    chunk = max(1, MAX_SCORES // max(1, B * H * Tkv))
    out = []
    for a in range(0, Tq, chunk):
        b = min(Tq, a + chunk)

        def scores(q, kt):  # GQA without copying k: query head h reads kv head h // rep
            return (q[:, :, a:b].reshape(B, H_kv, rep * (b - a), D) @ kt).view(B, H, b - a, Tkv)

        rel = q_pos[:, a:b, None] - k_pos[:, None, :]  # [B, c, Tkv]
        s12 = torch.where((rel < w)[:, None], scores(q1, k1t), scores(q2, k2t)) * scale
        work = torch.float32 if s12.dtype in (torch.float16, torch.bfloat16) else s12.dtype  # softmax precision
        s12 = s12.to(work).masked_fill(~allowed[:, :, a:b], torch.finfo(work).min)  # finite: no NaN in padded rows
        probs = torch.softmax(s12, dim=-1).to(value.dtype)
        if dropout and module.training:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        out.append(probs @ v)
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None
