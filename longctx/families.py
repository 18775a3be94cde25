"""The model families longctx runs, by `config.model_type`, and what differs between them.

RoPE families get RoPE scaling, S²-Attn and the RoPE methods; ALiBi families (BLOOM, MPT: transformers' own
classes) load, fine-tune with LoRA + embed/norm and full attention, and get the ALiBi methods. Their attention does
not go through transformers' AttentionInterface (the bias is added inside their own attention modules), so S²-Attn
is refused for them. Names of their modules differ from Llama's; LongLoRA's defaults are translated here.
"""

from __future__ import annotations

ROPE = ("llama", "mistral", "qwen2", "qwen3")  # tested: tests/test_patch.py
ALIBI = ("bloom", "mpt")  # tested: tests/test_alibi.py

# LongLoRA adapts the attention projections q/k/v/o; these families fuse q, k and v into one linear layer.
LORA_TARGETS = {"bloom": ("query_key_value", "dense"), "mpt": ("Wqkv", "out_proj")}
# `lora.trainable_params` substrings ("embed", "norm") that match nothing or too little in these families' names:
# BLOOM's final norm is `ln_f`, MPT's embedding is `wte`.
TRAINABLE_ALIASES = {"bloom": {"norm": ("norm", "ln_f")}, "mpt": {"embed": ("wte",)}}


def family(config) -> str | None:
    """'rope', 'alibi', or None for a model type longctx does not run."""
    model_type = getattr(config, "model_type", None)
    return "rope" if model_type in ROPE else "alibi" if model_type in ALIBI else None


def original_length(config) -> int | None:
    """The context length the model was trained at, as its config tells (None when it does not: BLOOM)."""
    if family(config) == "alibi":
        return getattr(config, "max_seq_len", None) or getattr(config, "seq_length", None)
    rp = getattr(config, "rope_parameters", None) or {}
    return rp.get("original_max_position_embeddings") or getattr(config, "max_position_embeddings", None)


def unsupported(config) -> str:
    return (f"model type {getattr(config, 'model_type', '?')!r} is not supported by longctx (RoPE families: "
            f"{', '.join(ROPE)}; ALiBi families: {', '.join(ALIBI)})")
