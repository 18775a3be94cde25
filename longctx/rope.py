"""RoPE scaling registry: name -> (parameter model, pure function -> (inv_freq, attention_factor)).

Each scheme is one parameter model plus one entry in `SCHEMES`. For the types transformers 5 computes itself
(linear, dynamic, yarn, llama3, longrope) the function delegates to `transformers.modeling_rope_utils.
ROPE_INIT_FUNCTIONS`, so the numbers are transformers' own (research/rope.md 1.2, 1.4). `ntk` (static NTK-aware,
bloc97: base' = base * alpha^(d/(d-2))) is ours and exports as the default type with the new `rope_theta`.

`resolve()` turns a partial user dict plus the model config into complete parameters: `rope_theta` is always kept
(research/rope.md 1.5 pitfall 1), `original_max_position_embeddings` is always explicit (pitfall 2) and the factor
is a float, target / original, never a ceil (LongLoRA's integer factor turns 100k into 102,400). On a base that
already ships a scaling it composes on it (compose.py); with RoPE per layer type (Gemma-3) it reads and writes the
global layers' dict (`native_rope`, `with_scaled`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from longctx import compose
from longctx.errors import validation_messages


def _at_least_one(name: str, v: float | None, why: str = "") -> float | None:
    if v is not None and v < 1:
        raise ValueError(f"{name} must be >= 1{why}, got {v}")
    return v


class RopeParams(BaseModel):
    """What every scaled type has, resolved: the base, the original and target lengths, the factor."""

    model_config = ConfigDict(extra="forbid")
    rope_type: str
    rope_theta: float
    original_max_position_embeddings: int
    max_position_embeddings: int  # the target length written to the model config
    head_dim: int  # the attention head dim (the rotary dim is head_dim * partial_rotary_factor)
    factor: float = 1.0
    partial_rotary_factor: float | None = None

    @field_validator("factor")
    @classmethod
    def _factor_at_least_one(cls, v: float) -> float:
        return _at_least_one("factor", v, " (it compresses positions; < 1 would stretch them)")


class NoneParams(RopeParams):
    rope_type: Literal["none"] = "none"


class LinearParams(RopeParams):
    rope_type: Literal["linear"] = "linear"


class NtkParams(RopeParams):
    rope_type: Literal["ntk"] = "ntk"
    alpha: float | None = None  # default: factor

    @field_validator("alpha")
    @classmethod
    def _alpha_at_least_one(cls, v: float | None) -> float | None:
        return _at_least_one("alpha", v)


class DynamicParams(RopeParams):
    rope_type: Literal["dynamic"] = "dynamic"


class YarnParams(RopeParams):
    rope_type: Literal["yarn"] = "yarn"
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None


class Llama3Params(RopeParams):
    rope_type: Literal["llama3"] = "llama3"
    low_freq_factor: float  # Llama-3.1: 1.0
    high_freq_factor: float  # Llama-3.1: 4.0


class LongRopeParams(RopeParams):
    rope_type: Literal["longrope"] = "longrope"
    short_factor: list[float]
    long_factor: list[float]
    attention_factor: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# Pure functions: (params, seq_len) -> (inv_freq [rotary_dim/2], attention_factor)

def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _rotary_dim(p: RopeParams) -> int:
    return int(p.head_dim * (p.partial_rotary_factor or 1.0))


def ntk_theta(base: float, alpha: float, dim: int) -> float:
    """Static NTK-aware base (bloc97): keeps the highest frequency, divides the lowest by exactly alpha."""
    return base * alpha ** (dim / (dim - 2))


def _none(p: RopeParams, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    return _default_inv_freq(p.rope_theta, _rotary_dim(p)), 1.0


def _ntk(p: NtkParams, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    return _default_inv_freq(_theta(p), _rotary_dim(p)), 1.0


def _theta(p: RopeParams) -> float:
    """The base the exported config carries: ntk's new base, else the model's."""
    return ntk_theta(p.rope_theta, p.alpha or p.factor, _rotary_dim(p)) if isinstance(p, NtkParams) else p.rope_theta


def _transformers(p: RopeParams, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """transformers' own ROPE_INIT_FUNCTIONS on a minimal config carrying exactly these parameters."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=p.head_dim, num_attention_heads=1, num_key_value_heads=1, head_dim=p.head_dim,
                      num_hidden_layers=1, intermediate_size=1, vocab_size=1,
                      max_position_embeddings=model_max_positions(p), rope_parameters=to_rope_parameters(p))
    kw = {} if seq_len is None else {"seq_len": seq_len}
    inv_freq, att = ROPE_INIT_FUNCTIONS[p.rope_type](cfg, "cpu", **kw)
    return inv_freq, float(att)


@dataclass(frozen=True)
class Scheme:
    params: type[RopeParams]
    inv_freq: Callable[..., tuple[torch.Tensor, float]]
    doc: str


SCHEMES: dict[str, Scheme] = {
    "none": Scheme(NoneParams, _none, "the model's own RoPE, unscaled"),
    "linear": Scheme(LinearParams, _transformers, "position interpolation (Chen et al. 2306.15595)"),
    "ntk": Scheme(NtkParams, _ntk, "static NTK-aware base change, base * alpha^(d/(d-2)) (bloc97)"),
    "dynamic": Scheme(DynamicParams, _transformers, "dynamic NTK (emozilla); training-free evaluation only"),
    "yarn": Scheme(YarnParams, _transformers, "NTK-by-parts + attention temperature (Peng et al. 2309.00071)"),
    "llama3": Scheme(Llama3Params, _transformers, "Llama-3.1 wavelength-threshold by-parts"),
    "longrope": Scheme(LongRopeParams, _transformers, "LongRoPE per-pair factors (Ding et al. 2402.13753)"),
}
ROPE_TYPES = tuple(SCHEMES)
STATIC_TYPES = ("none", "linear", "ntk", "yarn", "llama3", "longrope")  # safe to train with (research/rope.md 4)


def inv_freq(params: RopeParams, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """inv_freq [rotary_dim/2] and attention_factor (multiplies cos and sin) for resolved params; `seq_len` only
    matters for the types that change with length (dynamic, longrope)."""
    return SCHEMES[params.rope_type].inv_freq(params, seq_len)


def to_rope_parameters(p: RopeParams) -> dict[str, Any]:
    """The exact transformers 5 `rope_parameters` dict for a config.json: theta and original length always set."""
    if p.rope_type in ("none", "ntk"):
        d = {"rope_type": "default", "rope_theta": _theta(p),
             "original_max_position_embeddings": p.original_max_position_embeddings}
        if p.partial_rotary_factor is not None:
            d["partial_rotary_factor"] = p.partial_rotary_factor
        return d
    return p.model_dump(exclude_none=True, exclude={"max_position_embeddings", "head_dim"})


def as_longrope(p: RopeParams) -> dict[str, Any]:
    """The same frequencies and attention factor as one `longrope` dict, for config classes that accept no other
    scaled type (Phi3Config: default and longrope; it rewrites yarn into longrope). LongRoPE divides each pair's
    frequency by its own factor, so any static scheme is one: factor_i = unscaled_i / scaled_i, the same list for
    short and long (no switch at the original length), and the attention factor written out (else transformers
    would recompute LongRoPE's own from `factor`)."""
    inv, att = inv_freq(p)
    factors = (_default_inv_freq(p.rope_theta, _rotary_dim(p)).double() / inv.double()).tolist()
    d = {"rope_type": "longrope", "rope_theta": p.rope_theta, "factor": p.factor,
         "original_max_position_embeddings": p.original_max_position_embeddings, "short_factor": factors,
         "long_factor": factors, "attention_factor": att}
    return d | ({"partial_rotary_factor": p.partial_rotary_factor} if p.partial_rotary_factor is not None else {})


def model_max_positions(p: RopeParams) -> int:
    """`max_position_embeddings` for the model config. transformers' dynamic type reads that field as the
    *original* length (research/rope.md 1.2), so for dynamic it stays the original length."""
    return p.original_max_position_embeddings if p.rope_type == "dynamic" else p.max_position_embeddings


# ---------------------------------------------------------------------------------------------------------------
# Resolution and validation

def problems(d: dict[str, Any] | None, prefix: str = "rope.") -> list[str]:
    """Config-time problems of a partial rope dict (no model known yet): each line names the key."""
    if not d:
        return []
    rt = d.get("rope_type", "none")
    if rt not in SCHEMES:
        return [f"{prefix}rope_type: unknown type {rt!r}; valid types: {', '.join(ROPE_TYPES)}"]
    # Fill what only the model can tell with placeholders so the type-specific checks can run now.
    # A base that ships llama3/longrope scaling supplies its by-parts parameters (compose.py), so those are checked
    # by resolve() once the model is known, not here.
    probe = {"rope_theta": 10000.0, "original_max_position_embeddings": 1, "max_position_embeddings": 1,
             "head_dim": 2, **{k: v for k, v in _FROM_NATIVE_BASE.items() if k in SCHEMES[rt].params.model_fields},
             **d}
    out = _validation_problems(rt, probe, prefix)
    target, orig = d.get("max_position_embeddings"), d.get("original_max_position_embeddings")
    if target is not None and orig is not None and rt != "none" and target <= orig:
        out.append(f"{prefix}max_position_embeddings: the target length {target} (default: train.seq_len) must be "
                   f"above the original length {orig} (original_max_position_embeddings)")
    return out


def _validation_problems(rt: str, d: dict[str, Any], prefix: str) -> list[str]:
    params = SCHEMES[rt].params
    try:
        params.model_validate(d)
    except ValidationError as e:
        valid = [k for k in params.model_fields if k not in _INTERNAL]
        return validation_messages(
            e, prefix=prefix,
            unknown=lambda loc: f"not a parameter of rope_type {rt!r}; its parameters: {', '.join(valid)}",
            missing=lambda loc: f"required for rope_type {rt!r}{_HINTS.get((rt, '.'.join(map(str, loc))), '')}",
            other=lambda err: err["msg"].removeprefix("Value error, "))
    return []


_INTERNAL = ("rope_type", "head_dim", "partial_rotary_factor")  # set by resolve() from the model, not by users
_FROM_NATIVE_BASE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "short_factor": [1.0]}  # placeholders
_HINTS = {
    ("llama3", "low_freq_factor"): " (Llama-3.1 uses 1.0; a base that ships llama3 scaling supplies it)",
    ("llama3", "high_freq_factor"): " (Llama-3.1 uses 4.0; a base that ships llama3 scaling supplies it)",
    ("longrope", "short_factor"): " (one factor per rotary pair; a base that ships longrope supplies it)",
    ("longrope", "long_factor"): " (one factor per rotary pair)",
}


# Per-layer-type RoPE (Gemma-3): `rope_parameters` holds one dict per layer type. Only the global layers' dict is
# scaled: sliding layers attend at most `sliding_window` tokens back, so they never meet a distance beyond their
# pretrained range (Gemma-3 itself scales only its global layers, with a local base on the sliding ones).
SCALED_LAYER_TYPE = "full_attention"


def scaled_key(config) -> str | None:
    """None when `rope_parameters` is one dict; SCALED_LAYER_TYPE when it is nested per layer type."""
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict):
        return None
    nested = [k for k in rp if k in (getattr(config, "layer_types", None) or ())]
    if not nested:
        return None
    if rp.get(SCALED_LAYER_TYPE) is None:
        raise ValueError(f"model type {getattr(config, 'model_type', '?')!r} has RoPE per layer type "
                         f"({', '.join(nested)}) but none for {SCALED_LAYER_TYPE!r} layers, the ones longctx scales")
    return SCALED_LAYER_TYPE


def native_rope(config) -> dict[str, Any]:
    """The rope_parameters dict longctx scales: the whole one, or the global layers' one when nested."""
    key = scaled_key(config)
    rp = getattr(config, "rope_parameters", None)
    return (rp if key is None else rp[key]) if isinstance(rp, dict) else {}


def with_scaled(config, params: dict[str, Any]) -> dict[str, Any]:
    """The model's whole `rope_parameters` with the scaled dict replaced by `params` (other layer types as they are)."""
    key = scaled_key(config)
    return dict(params) if key is None else {**copy.deepcopy(config.rope_parameters), key: dict(params)}


def model_rope_defaults(config) -> dict[str, Any]:
    """What a model config says about its RoPE today: theta, original length, partial rotary factor."""
    rp = native_rope(config)
    if "rope_theta" not in rp:
        raise ValueError(f"model type {getattr(config, 'model_type', '?')!r} has no RoPE parameters "
                         "(config.rope_parameters); longctx scales RoPE models only (ALiBi models such as bloom "
                         "or mpt are not supported)")
    # Phi-3 keeps its pretrained length outside rope_parameters, and transformers prefers it there.
    original = (rp.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
                or config.max_position_embeddings)
    return {"rope_theta": rp["rope_theta"], "original_max_position_embeddings": original,
            "partial_rotary_factor": rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))}


def resolve(d: dict[str, Any], model_config) -> RopeParams:
    """Complete, validated params from a partial dict and the model config; raises ValueError with every problem."""
    rt = d.get("rope_type", "none")
    if rt not in SCHEMES:
        raise ValueError(f"rope.rope_type: unknown type {rt!r}; valid types: {', '.join(ROPE_TYPES)}")
    full = {k: v for k, v in d.items() if v is not None}
    native = native_rope(model_config)
    if rt != "none" and compose.is_scaled(native):  # never silently replace a native scaling (compose.py)
        full = compose.on_native(full, native, model_config.max_position_embeddings)
    for k, v in model_rope_defaults(model_config).items():
        if v is not None:
            full.setdefault(k, v)
    orig = full["original_max_position_embeddings"]
    if "factor" not in full:  # a float ratio; ntk given only alpha extends by alpha
        default_target = orig * full["alpha"] if rt == "ntk" and "alpha" in full else orig
        full["factor"] = float(full.get("max_position_embeddings", default_target)) / orig
    full.setdefault("max_position_embeddings", int(round(orig * full["factor"])))
    full["head_dim"] = getattr(model_config, "head_dim", None) or (
        model_config.hidden_size // model_config.num_attention_heads)
    errs = _validation_problems(rt, full, "rope.")
    if rt != "none" and full["max_position_embeddings"] <= orig:
        errs.append(f"rope.max_position_embeddings: the target length {full['max_position_embeddings']} must be "
                    f"above the original length {orig}")
    if errs:
        raise ValueError("\n".join(errs))
    p = SCHEMES[rt].params.model_validate(full)
    if isinstance(p, LongRopeParams):
        n = _rotary_dim(p) // 2
        if len(p.short_factor) != n or len(p.long_factor) != n:
            raise ValueError(f"rope.short_factor/long_factor: need {n} values each (rotary dim / 2), got "
                             f"{len(p.short_factor)} and {len(p.long_factor)}")
    return p
