"""log-n attention scaling (Su, kexue.fm/archives/8823 and 9588; Qwen-1's `use_logn_attn`).

    longctx eval ppl --model data/tiny-base --method logn --lengths 256,1024 --out /tmp/logn
    method: {name: logn, train_length: 256}        # in a training config: fine-tune with it (any attention.type)

The query at position i is multiplied by max(1, log(i + 1) / log(L)), L = `train_length` (default: the model's
original length): attention keeps its entropy as the context grows past L, and nothing changes up to L. It only
scales queries, so it lives in the attention function (scaling cos/sin would scale keys too: docs/design.md §5),
and it wraps whatever attention the model uses: sdpa, S²-Attn while training, another method (rerope, ...). The
wrapper is registered as `longctx_logn+<inner>` with the inner implementation's own mask function. Positions are
`position_ids` (per document when packed, from the padding mask under `generate`).

Plain transformers cannot scale queries by position, so `longctx export` refuses a run trained with it.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

PREFIX = "longctx_logn+"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: Literal["logn"]
    train_length: int | None = Field(None, ge=2, description="L in log(i + 1) / log(L); default: the model's "
                                                             "original length.")


def scale(position_ids: torch.Tensor, train_length: int, dtype=torch.float64) -> torch.Tensor:
    """max(1, log(i + 1) / log(L)) for positions i, same shape."""
    return (torch.log(position_ids.to(torch.float64) + 1) / math.log(train_length)).clamp(min=1).to(dtype)


def apply(model, spec: Params, target, undo: list) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from longctx.methods import rotary

    inner = model.config._attn_implementation
    if inner not in AttentionInterface._global_mapping or inner.startswith(PREFIX):
        raise ValueError(f"method logn wraps a registered attention implementation (sdpa, flash_attention_2, "
                         f"longctx's); this model uses {inner!r}: load it with attn_implementation='sdpa'")
    L = spec.train_length or target.original_length
    if L is None:
        raise ValueError("method logn: the model config gives no original length; pass train_length=L")
    undo.append(rotary.set_on_modules(model, "longctx_logn", L))
    undo.append(rotary.select(model, PREFIX + inner, functools.partial(attention, inner=inner),
                              mask=ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(inner)))


def attention(module, query, key, value, attention_mask, inner: str, **kwargs):
    """Scale q by position, then the inner attention function (whose mask function built `attention_mask`)."""
    from transformers import AttentionInterface

    B, _, Tq, _ = query.shape
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.arange(key.shape[2] - Tq, key.shape[2], device=query.device)[None]
    q = query * scale(pos.expand(B, Tq), module.longctx_logn, query.dtype)[:, None, :, None].to(query.device)
    return AttentionInterface._global_mapping[inner](module, q, key, value, attention_mask, **kwargs)
