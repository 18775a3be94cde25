"""Consistent dynamic NTK (NormXU/Consistent-DynamicNTKRoPE): dynamic NTK whose KV cache stays valid.

    longctx eval ppl --model data/tiny-base --method consistent_dynamic factor=4 --lengths 256,1024 --out /tmp/cd

transformers' `dynamic` rotates keys before they enter the cache, and beyond the original length L the base changes
with every decoded token, so cached keys carry stale bases (docs/design.md §5; 4.9e-4 off a full forward with
one layer). Here the cache holds unrotated keys (`IdentityRotary`) and the attention function rotates the query and
all keys with the base for the current length n of each row: base' = base * (factor * n / L - (factor - 1))^(d/(d-2))
for n > L, transformers' own dynamic formula, computed through the rope registry (`rope.frequencies`). Cost: every
key is rotated again at every step and layer, O(n d).

A row's length n is its largest key position + 1, so a padded row gets the base of its own length, not the
batch's. With one layer a cached decode step equals a full forward of the same prefix; with more layers the
deeper keys of earlier tokens were computed from hidden states of earlier bases, which no cache can avoid
(docs/design.md §5): the rotation is consistent, the hidden states are those of the steps that made them.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from longctx import rope
from longctx.attention import S2Mask
from longctx.methods import rotary

NAME = "longctx_consistent_dynamic"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: Literal["consistent_dynamic"]
    factor: float = Field(1.0, ge=1, description="transformers' dynamic factor: alpha = factor * n / L - factor + 1 "
                                                 "(1: alpha = n / L, the YaRN paper's dynamic scaling).")


def apply(model, spec: Params, target, undo: list) -> None:
    """Identity rotary + the rotating attention function on `model`; each step's undo goes onto `undo`."""
    if target.rope is not None and target.rope.rope_type != "none":
        raise ValueError(f"method consistent_dynamic computes the rotation itself (dynamic NTK, factor "
                         f"{spec.factor:g}); drop the rope scaling ({target.rope.rope_type})")
    params = rope.resolve({"rope_type": "dynamic", "factor": spec.factor}, model.config, check_target=False)
    head_dim = rotary.attention_modules(model)[0].head_dim
    if params.rotary_dim != head_dim:
        raise ValueError("method consistent_dynamic needs a rotary embedding over the whole head "
                         f"(rotary dim {params.rotary_dim}, head dim {head_dim})")
    undo.append(rotary.replace_rotary(model, params.rotary_dim))
    undo.append(rotary.set_on_modules(model, "longctx_dynamic", params))
    undo.append(rotary.select(model, NAME, attention))


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """q [B, H, Tq, D], k/v [B, H_kv, Tkv, D] unrotated -> SDPA on q and k rotated with each row's base."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    params = module.longctx_dynamic
    q_pos, k_pos = rotary.positions(attention_mask, kwargs, query, key)
    lengths = k_pos.max(dim=-1).values + 1

    def inv_freq():  # [B, D/2]: one registry call per distinct length, once per forward
        per_length = {n: rope.frequencies(params, seq_len=n)[0] for n in set(lengths.tolist())}
        return torch.stack([per_length[n] for n in lengths.tolist()]).to(query.device)

    inv = rotary.per_forward(attention_mask, ("dynamic_inv_freq", tuple(lengths.tolist())), inv_freq)
    q, k = rotary.rotate(query, q_pos, inv), rotary.rotate(key, k_pos, inv)
    mask = attention_mask.dense() if isinstance(attention_mask, S2Mask) else attention_mask
    return sdpa_attention_forward(module, q, k, value, mask, dropout=dropout, scaling=scaling, **kwargs)
