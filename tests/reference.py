"""Test references built from the written rules (docs/design.md §3), never from longctx's implementation."""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

# What a tiny random config of each family needs beyond the shared shape, to exercise what makes the family
# different: Gemma-2/3 alternate sliding and global layers (a window of 6 tokens, shorter than the tests' S² groups
# of 8); Granite's multipliers away from 1; SmolLM3's second layer without RoPE; Phi-3's partial rotary and its
# top-level original length.
FAMILY_EXTRA = {
    "gemma2": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=6, query_pre_attn_scalar=8),
    "gemma3_text": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=6,
                        query_pre_attn_scalar=8),
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0),
    "smollm3": dict(no_rope_layers=[1, 0]),
    "phi3": dict(partial_rotary_factor=0.75),  # Phi-4-mini rotates 3/4 of each head
}


def tiny_config(family: str = "llama", heads: int = 4, kv_heads: int = 2, head_dim: int = 8, layers: int = 2,
                max_pos: int = 64, vocab: int = 97, **extra):
    """A tiny config of a transformers model type (longctx.families.FAMILIES keys), token ids inside the vocab."""
    kw = dict(FAMILY_EXTRA.get(family, {}))
    if family == "phi3":
        kw["original_max_position_embeddings"] = max_pos
    if "layer_types" in kw and layers != 2:
        kw["layer_types"] = (["sliding_attention"] * (layers - 1) + ["full_attention"])
    kw.update(extra)
    return AutoConfig.for_model(family, hidden_size=heads * head_dim, num_attention_heads=heads,
                                num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=layers,
                                intermediate_size=4 * heads * head_dim, vocab_size=vocab,
                                max_position_embeddings=max_pos, attention_dropout=0.0, pad_token_id=0,
                                bos_token_id=1, eos_token_id=2, **kw)


def tiny_model(family: str = "llama", heads: int = 4, kv_heads: int = 2, head_dim: int = 8, layers: int = 2,
               max_pos: int = 64, dtype=torch.float64, seed: int = 0, **extra):
    """A random tiny causal LM of the given family (float64 by default, for reference comparisons)."""
    cfg = tiny_config(family, heads, kv_heads, head_dim, layers, max_pos, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    if model.config._attn_implementation != "eager":  # Gemma-2 soft-caps its logits: eager only
        model.set_attn_implementation("sdpa")
    return model


def window_mask(T: int, window: int) -> torch.Tensor:
    """[T, T] bool: a sliding-window layer lets query i see key j iff i - j < window (transformers' rule)."""
    i = torch.arange(T)
    return (i[:, None] - i[None, :]) < window


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

    Query head h reads kv head h // (H / H_kv). A layer called with a sliding window also applies `window_mask`.
    Rows with no visible key (padding) attend to themselves only, so they stay finite; they are never compared.
    """

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rep = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(rep, dim=1)
        v = value.repeat_interleave(rep, dim=1)
        T = query.shape[2]
        m = mask.to(query.device)
        if kwargs.get("sliding_window") is not None:
            m = m & window_mask(T, kwargs["sliding_window"]).to(query.device)
        m = m | torch.eye(T, dtype=torch.bool, device=query.device)
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
