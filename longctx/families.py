"""The model families longctx supports: one entry per transformers `model_type`, the one place that says so.

    fam = families.of(model.config)             # ConfigError naming the model type when it is not supported
    targets = families.lora_targets("phi3", ["q_proj", "k_proj", "v_proj", "o_proj"])   # -> qkv_proj, o_proj

Every family here is tested the same way on a tiny random config (tests/test_families.py): `apply`/`remove` gives
bit-identical outputs afterwards, S² training equals the dense rule-mask reference, three LoRA + embed/norm training
steps run through `train.py`, and `longctx export` round-trips through plain transformers. A family enters this
table only with those tests. The README's supported-families table is checked against it (tests/test_families.py).

What differs between families, and what longctx does about it:
- RoPE nested per layer type (Gemma-3: a local base on sliding layers, the long-context base and scaling on global
  ones): only the global layer type (`full_attention`) is scaled; sliding layers attend at most `sliding_window`
  tokens back, so they never meet a distance beyond their pretrained range (rope.py `SCALED_LAYER_TYPE`).
- Sliding-window layers (Gemma-3, Mistral v0.1, Phi-3-mini-4k): S² runs inside the window, i.e. a token sees the
  intersection of its S² group and its window (attention.py), so training never lets a token see further back
  than the layer does at inference; where the window is at least the group (the usual case) that is plain S².
- Attention logit soft-capping (Gemma-2): SDPA has no soft-capping, so S² cannot run; `s2_refused` says so and
  `attention.type: full` trains it (eager attention, as transformers requires for it).
- Fused projections (Phi-3: qkv_proj, gate_up_proj): LongLoRA's default LoRA targets q/k/v/o_proj map onto them;
  naming only some of q/k/v is refused (one LoRA on the fused matrix adapts all three).
- `norms`, `qk_norm`, `qkv_bias`: the parameter layout of a decoder layer, read by the memory planner (plan.py).

ALiBi families (BLOOM, MPT: transformers' own classes, `ALIBI_FAMILIES`) load, fine-tune with LoRA + embed/norm and
full attention, export, and get the ALiBi methods (longctx/methods: ntk_alibi, dynamic_ntk_alibi) and NBCE. Their
bias is added inside their own attention modules, not through AttentionInterface, so RoPE scaling and S²-Attn are
refused for them (tests/test_alibi.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from longctx.config import ConfigError

log = logging.getLogger("longctx")

LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
SANDWICH_NORMS = LLAMA_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")  # Gemma-2/3


@dataclass(frozen=True)
class Family:
    models: str  # the checkpoints people fine-tune, for the README
    note: str = ""  # what is special, and what longctx does about it
    s2_refused: str | None = None  # why S² cannot train this family (attention.type: full still works)
    attn_implementation: str = "sdpa"  # how longctx loads it (Gemma-2's soft-capping needs eager)
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fused linear -> the LongLoRA names it holds
    norms: tuple[str, ...] = LLAMA_NORMS  # RMSNorm weights of one decoder layer
    qk_norm: str | None = None  # "head": q/k RMSNorm per head (weight [head_dim]); "full": over all heads
    qkv_bias: bool = False  # q/k/v biases whatever `attention_bias` says (Qwen2)
    # The rope types its config class accepts, None for all. Phi3Config accepts only default and longrope, so
    # longctx writes linear/yarn/llama3 there as the longrope dict with the same numbers (rope.as_longrope).
    rope_types: tuple[str, ...] | None = None


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama 2, Llama 3/3.1/3.2, SmolLM/SmolLM2, TinyLlama, CodeLlama",
                    "Llama-3.1/3.2 ship `llama3` scaling: extending composes on it"),
    "mistral": Family("Mistral 7B v0.1-v0.3", "v0.1's 4096-token sliding window: S² runs inside the window"),
    "qwen2": Family("Qwen2, Qwen2.5", "q/k/v biases; a `yarn` base composes", qkv_bias=True),
    "qwen3": Family("Qwen3 (dense)", "q/k norm per head; a `yarn` base composes", qk_norm="head"),
    "gemma": Family("Gemma 2B/7B"),
    "gemma2": Family("Gemma-2 2B/9B/27B", "RoPE scaling with full attention only; eager attention",
                     s2_refused="Gemma-2 soft-caps its attention logits (attn_logit_softcapping); S² runs on SDPA, "
                                "which cannot soft-cap, and dropping the cap would train another model",
                     attn_implementation="eager", norms=SANDWICH_NORMS),
    "gemma3_text": Family("Gemma-3 1B and the text model of Gemma-3 (Gemma3ForCausalLM)",
                          "5 sliding : 1 global layers; only global layers' RoPE is scaled (a `linear` base "
                          "composes); S² inside the sliding window", norms=SANDWICH_NORMS, qk_norm="head"),
    "phi3": Family("Phi-3/3.5-mini, Phi-4-mini",
                   "fused qkv_proj/gate_up_proj (LoRA q/k/v/o maps to qkv_proj, o_proj); partial rotary; its config "
                   "takes only longrope, so linear/yarn/llama3 are written as the equal longrope dict; a `longrope` "
                   "base (Phi-3.5) extends only with your own long_factor",
                   fused={"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
                   rope_types=("default", "longrope")),
    "olmo2": Family("OLMo-2 1B/7B/13B", "q/k norm over all heads; norms after attention and MLP",
                    norms=("post_attention_layernorm", "post_feedforward_layernorm"), qk_norm="full"),
    "granite": Family("Granite 3.x", "embedding/residual/attention/logit multipliers"),
    "smollm3": Family("SmolLM3", "every 4th layer has no RoPE (NoPE); the others are scaled"),
}


LONGLORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # LongLoRA adapts the attention projections


@dataclass(frozen=True)
class AlibiFamily:
    models: str
    lora_targets: tuple[str, ...]  # what LongLoRA's q/k/v/o_proj are called there (q, k, v fused into one linear)
    # `lora.trainable_params` substrings ("embed", "norm") that match nothing or too little in the family's names
    trainable_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)


ALIBI_FAMILIES: dict[str, AlibiFamily] = {
    "bloom": AlibiFamily("BLOOM, BLOOMZ", ("query_key_value", "dense"), {"norm": ("norm", "ln_f")}),
    "mpt": AlibiFamily("MPT-7B/30B", ("Wqkv", "out_proj"), {"embed": ("wte",)}),
}


def _model_type(config) -> str:
    return getattr(config, "model_type", None) or type(config).__name__


def family(config) -> str | None:
    """'rope', 'alibi', or None for a model type longctx does not run."""
    model_type = _model_type(config)
    return "rope" if model_type in FAMILIES else "alibi" if model_type in ALIBI_FAMILIES else None


def check(config) -> str:
    """'rope' or 'alibi'; ConfigError naming the model type and the supported ones. Train, eval, export and plan
    call it (patch.check_supported) on the model's config before anything else is checked or loaded."""
    kind = family(config)
    if kind is not None:
        return kind
    model_type = _model_type(config)
    hint = {"gemma3": "; this is the multimodal Gemma-3 (S² must not reach its vision tower): save its language "
                      "model as a Gemma3ForCausalLM (model type gemma3_text) directory and train that"}.get(model_type, "")
    raise ConfigError(f"model type {model_type!r} is not supported by longctx (RoPE families: {', '.join(FAMILIES)}; "
                      f"ALiBi families: {', '.join(ALIBI_FAMILIES)}){hint}")


def of(config) -> Family:
    """The RoPE family of a transformers config; ConfigError for an ALiBi or unsupported model type."""
    if check(config) == "alibi":
        raise ConfigError(f"model type {_model_type(config)!r} uses ALiBi, not RoPE: RoPE scaling and S²-Attn do not "
                          "apply to it (attention.type: full; the methods ntk_alibi, dynamic_ntk_alibi, nbce)")
    return FAMILIES[_model_type(config)]


def original_length(config) -> int | None:
    """The context length the model was trained at, as its config tells (None when it does not: BLOOM)."""
    if family(config) == "alibi":
        return getattr(config, "max_seq_len", None) or getattr(config, "seq_length", None)
    rp = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rp and isinstance(rp["full_attention"], dict):  # per layer type (Gemma-3)
        rp = rp["full_attention"]
    return rp.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None) \
        or getattr(config, "max_position_embeddings", None)


def trainable_aliases(model_type: str) -> dict[str, tuple[str, ...]]:
    """`lora.trainable_params` substrings as this family spells them (BLOOM's final norm is ln_f, MPT's
    embedding wte); {} for the RoPE families, whose names contain 'embed' and 'norm'."""
    return ALIBI_FAMILIES[model_type].trainable_aliases if model_type in ALIBI_FAMILIES else {}


def check_s2(config) -> None:
    """ConfigError when S² cannot train this model: a family that soft-caps its attention, or a bidirectional one."""
    fam = of(config)
    if fam.s2_refused:
        raise ConfigError(f"attention.type: s2 cannot train model type {_model_type(config)!r}: {fam.s2_refused}; "
                          "use attention.type: full")
    if getattr(config, "use_bidirectional_attention", False):
        raise ConfigError(f"attention.type: s2 needs causal attention; this {_model_type(config)!r} config has "
                          "use_bidirectional_attention: true")


def carry_as_longrope(config, rope_type: str) -> bool:
    """True when this model's config class cannot hold `rope_type` but holds `longrope` (Phi-3): write the longrope
    dict with the same numbers instead (rope.as_longrope). ConfigError when it can hold neither."""
    fam = of(config)
    if fam.rope_types is None or rope_type in fam.rope_types:
        return False
    if rope_type == "dynamic" or "longrope" not in fam.rope_types:
        raise ConfigError(f"rope.rope_type: {_model_type(config)!r} configs accept only rope types "
                          f"{', '.join(fam.rope_types)} (transformers), so a {rope_type} model could not be loaded "
                          "back; choose a static scheme (linear, ntk, yarn, llama3, longrope)")
    return True


def lora_targets(model_type: str, targets: Sequence[str] | str) -> list[str] | str:
    """LoRA target names for this model: LongLoRA's q/k/v/o_proj (and gate/up_proj) mapped onto fused projections.

    Phi-3 computes q, k and v with one `qkv_proj`; LoRA on it adapts all three, so q_proj/k_proj/v_proj map to it
    only together (naming some of them is refused: it would adapt the others too).
    """
    if model_type in ALIBI_FAMILIES and not isinstance(targets, str) and tuple(targets) == LONGLORA_TARGETS:
        return list(ALIBI_FAMILIES[model_type].lora_targets)  # BLOOM/MPT: fused q/k/v and the output projection
    if isinstance(targets, str) or model_type not in FAMILIES:  # `apply` refuses an unknown family by name
        return targets
    fam = FAMILIES[model_type]
    out = list(targets)
    for fused, parts in fam.fused.items():
        named = [t for t in out if t in parts]
        if not named:
            continue
        if len(named) < len(parts):
            raise ValueError(f"target_modules: {model_type} computes {', '.join(parts)} in one fused {fused}; LoRA on "
                             f"it adapts all of them, so name all of {', '.join(parts)} (or {fused}), not only "
                             f"{', '.join(named)}")
        at = out.index(named[0])
        out = [t for t in out if t not in parts]
        out.insert(at, fused)
        log.info("lora.target_modules: %s -> %s (%s fuses them)", ", ".join(named), fused, model_type)
    return out
