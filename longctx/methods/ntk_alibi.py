"""NTK-ALiBi (keezen/ntk_alibi) and its dynamic variant (Baichuan-13B style): rescale ALiBi slopes per head.

    longctx eval ppl --model BLOOM_OR_MPT_DIR --method ntk_alibi alpha=2 --lengths 2048,4096 --out /tmp/ntk_alibi
    longctx eval ppl --model BLOOM_OR_MPT_DIR --method dynamic_ntk_alibi --lengths 2048,4096 --out /tmp/dyn

ALiBi adds -m_h |i - j| to the scores of head h. NTK-ALiBi keeps the steepest slope (local heads extrapolate) and
divides the flattest one by a (long-range heads interpolate), geometrically in between, as NTK-aware RoPE treats
frequencies: for H heads, a power of two, m_h = 1 / (2^(8h/H) * a^((h-1)/(H-1))), h = 1..H. Dynamic: a = max(1,
n / L) with n the number of keys of the current forward (cache + new tokens, like transformers' dynamic RoPE takes
the batch's length) and L the training length.

Head counts that are not a power of two: ALiBi draws the extra slopes from the geometric sequence of twice as many
heads (every other one; BLOOM: the first 2^floor(log2 H) heads from the H' = 2^floor(log2 H) sequence, then odd
members of the 2H' one; MPT: members of the 2^ceil(log2 H) sequence in its own interleaved order). Each head's
slope is scaled here by a^-((k-1)/(N-1)) for its own place k in its own sequence of N slopes, i.e. the formula
above applied to each sequence ALiBi draws from. keezen's code instead uses (h-1)/(H-1) for the first block and
leaves the extra heads unscaled (marked todo there); for a power of two both are the formula.

Where the hook sits (the least invasive place transformers 5 offers): both families build the bias once per
forward in the model (`build_alibi_tensor` / `build_mpt_alibi_tensor`, module functions, and BLOOM builds it
inline when there is no padding mask) and pass it to every block as a keyword argument (`alibi=` /
`position_bias=`). A forward pre-hook with kwargs on each block (torch's public hook API) rescales that argument
per head; no transformers function, class or attribute is replaced, and removing the hook handles restores the
model exactly. The rescaling factor is exactly 1.0 at a = 1, so a = 1 is bit-identical to the model. BLOOM's bias
is multiplied per head. MPT's is rebuilt with transformers' own `build_mpt_alibi_tensor` for the current key
length (MPT builds it for `max_seq_len` only and cannot run past it; the rebuilt bias has the same values where
both exist, and lets it).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: Literal["ntk_alibi"]
    alpha: float = Field(ge=1, description="a: the flattest slope is divided by a (about target length / training "
                                           "length; keezen: 2-4).")


class DynamicParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: Literal["dynamic_ntk_alibi"]
    train_length: int | None = Field(None, ge=1, description="L in a = max(1, n / L); default: the model's training "
                                                             "length (MPT: max_seq_len; BLOOM configs have none).")


def slope_places(family: str, heads: int) -> list[tuple[int, int]]:
    """(k, N) per head: its slope is member k (1-based) of the geometric sequence of N slopes it is drawn from."""
    if family == "bloom":
        n = 2 ** math.floor(math.log2(heads))
        return [(h, n) for h in range(1, n + 1)] + [(2 * i + 1, 2 * n) for i in range(heads - n)]
    n = 2 ** math.ceil(math.log2(heads))  # mpt
    order = list(range(1, n + 1))
    if n != heads:
        order = order[1::2] + order[::2]
    return [(k, n) for k in order[:heads]]


def exponents(family: str, heads: int) -> torch.Tensor:
    """(k - 1) / (N - 1) per head: the slope is divided by a to this power."""
    return torch.tensor([(k - 1) / (n - 1) if n > 1 else 0.0 for k, n in slope_places(family, heads)],
                        dtype=torch.float64)


def apply(model, spec: Params | DynamicParams, target, undo: list) -> None:
    config, family = model.config, model.config.model_type
    if family == "mpt" and not config.attn_config.alibi:
        raise ValueError(f"method {spec.name}: this MPT model has no ALiBi (attn_config.alibi is false)")
    heads = config.n_head if family == "bloom" else config.n_heads
    power = exponents(family, heads)
    L = (spec.train_length or target.original_length) if isinstance(spec, DynamicParams) else None
    if isinstance(spec, DynamicParams) and L is None:
        raise ValueError(f"method dynamic_ntk_alibi: the {family} config gives no training length; pass "
                         "train_length=L")

    def ratios(n: int) -> torch.Tensor:  # a^-(k-1)/(N-1) per head, for n keys; exactly 1.0 when a = 1
        a = max(1.0, n / L) if L is not None else spec.alpha
        return float(a) ** -power

    hook = _bloom_hook(heads, ratios) if family == "bloom" else _mpt_hook(heads, config, ratios)
    _hook_blocks(model.transformer.h if family == "bloom" else model.transformer.blocks, hook, undo)


def extend_mpt(model, undo: list) -> None:
    """MPT at any length: its bias rebuilt for the current key length, unscaled (the same values wherever
    transformers' own bias exists). `longctx.apply` installs it on every MPT model it touches: fine-tuning and
    evaluating past max_seq_len need it."""
    heads = model.config.n_heads
    _hook_blocks(model.transformer.blocks, _mpt_hook(heads, model.config, lambda n: torch.ones(heads,
                                                                                                dtype=torch.float64)),
                 undo)


def _hook_blocks(blocks, hook, undo: list) -> None:
    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]

    def remove():
        for h in handles:
            h.remove()
    undo.append(remove)


def _bloom_hook(heads: int, ratios):
    def hook(module, args, kwargs):
        alibi = kwargs["alibi"]  # [B * H, 1, n]: slope_h * key position
        n = alibi.shape[-1]
        work = alibi if alibi.dtype == torch.float64 else alibi.float()
        r = ratios(n).to(alibi.device, work.dtype).view(1, heads, 1, 1)
        kwargs["alibi"] = (work.view(-1, heads, 1, n) * r).view_as(alibi).to(alibi.dtype)
        return args, kwargs
    return hook


def _mpt_hook(heads: int, config, ratios):
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    def hook(module, args, kwargs):
        bias = kwargs["position_bias"]  # [H, 1, max_seq_len]: slope_h * (j - (max_seq_len - 1))
        n = kwargs["attention_mask"].shape[-1]  # keys of this forward: the [B, 1, q, n] causal mask
        alibi = build_mpt_alibi_tensor(heads, n, config.attn_config.alibi_bias_max, bias.device)
        kwargs["position_bias"] = (alibi * ratios(n).to(alibi.device).view(heads, 1, 1).float()).to(bias.dtype)
        return args, kwargs
    return hook
