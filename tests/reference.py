"""Test references built from the written rules (DESIGN.md), never from longctx's implementation."""

from __future__ import annotations

import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers import Qwen2Config, Qwen2ForCausalLM


def tiny_model(family: str = "llama", heads: int = 4, kv_heads: int = 2, head_dim: int = 8, layers: int = 2,
               max_pos: int = 64, dtype=torch.float64, seed: int = 0, **extra):
    """A random tiny causal LM of the given family (float64 by default, for reference comparisons)."""
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    cfg = cls[0](hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                 head_dim=head_dim, num_hidden_layers=layers, intermediate_size=4 * heads * head_dim, vocab_size=97,
                 max_position_embeddings=max_pos, attention_dropout=0.0, **extra)
    torch.manual_seed(seed)
    model = cls[1](cfg).to(dtype)
    model.set_attn_implementation("sdpa")
    return model


def s2_rule_mask(docs: list[list[tuple[int, int]]], T: int, group: int, heads: int, shift: bool = True):
    """[B, H, T, T] bool: may query i see key j, by the S2 rule, for rows made of documents (start, length).

    Tokens outside every document are padding and see nothing. Offsets count from each document's first token.
    """
    mask = torch.zeros(len(docs), heads, T, T, dtype=torch.bool)
    g2 = group // 2
    for b, row in enumerate(docs):
        for start, length in row:
            i = torch.arange(length)[:, None]
            j = torch.arange(length)[None, :]
            causal = j <= i
            plain = (i // group) == (j // group)
            shifted = ((i + g2) // group) == ((j + g2) // group)
            for h in range(heads):
                rule = shifted if (shift and h >= heads // 2) else plain
                mask[b, h, start:start + length, start:start + length] = causal & rule
    return mask


def causal_doc_mask(docs: list[list[tuple[int, int]]], T: int, heads: int):
    """Plain causal attention within documents: the S2 rule with one group as long as the sequence."""
    return s2_rule_mask(docs, T, group=10 ** 9, heads=heads, shift=False)


def dense_reference_attention(mask: torch.Tensor):
    """An attention function computing softmax(QK^T) V densely under a given per-head boolean mask [B, H, T, T].

    Query head h reads kv head h // (H / H_kv). Rows with no visible key (padding) attend to themselves only, so
    they stay finite; their outputs are never compared.
    """

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rep = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(rep, dim=1)
        v = value.repeat_interleave(rep, dim=1)
        T = query.shape[2]
        m = mask.to(query.device) | torch.eye(T, dtype=torch.bool, device=query.device)
        scores = (query @ k.transpose(-1, -2)) * scaling
        probs = scores.masked_fill(~m, float("-inf")).softmax(-1)
        return (probs @ v).transpose(1, 2), None

    return attend


def logits_with_reference(model, mask, **inputs):
    """Logits of `model` with `dense_reference_attention(mask)` selected, restoring the old implementation."""
    name = "longctx_test_reference"
    AttentionInterface.register(name, dense_reference_attention(mask))
    old = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        return model(**inputs, use_cache=False).logits
    finally:
        model.set_attn_implementation(old)


def left_padded(T: int, pad: int, vocab: int = 97):
    """(ids, attention_mask, position_ids) of two random rows of T tokens, the second with `pad` left padding;
    positions from the mask, as `generate` gives them."""
    ids = torch.randint(0, vocab, (2, T))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def select_attention(model, name: str, attend) -> None:
    """Register `attend` (with transformers' SDPA mask, always materialized: [B, 1, Tq, Tkv] bool, padding and
    causality) and select it on `model`; select "sdpa" again to go back."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attend)
    AttentionMaskInterface.register(name, lambda *a, **kw: sdpa_mask(*a, **{**kw, "allow_is_causal_skip": False}))
    model.set_attn_implementation(name)


def real_positions(docs: list[list[tuple[int, int]]], T: int) -> torch.Tensor:
    real = torch.zeros(len(docs), T, dtype=torch.bool)
    for b, row in enumerate(docs):
        for start, length in row:
            real[b, start:start + length] = True
    return real
