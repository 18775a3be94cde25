"""RoPE scaling: one schema (a discriminated union on `rope_type`) and one registry of pure functions.

    spec = parse({"rope_type": "yarn", "factor": 4.0})        # the config's `rope:` section, validated
    p = resolve(spec, model.config)                             # every default filled from the model
    inv_freq, attention_factor = frequencies(p)                 # what the rotary embedding computes
    config.rope_parameters = to_rope_parameters(p)              # what config.json carries

Each scheme is one parameter model (the keys a user may write for that `rope_type`, nothing else) plus one entry
in `SCHEMES`. For the types transformers 5 computes itself (linear, dynamic, yarn, llama3, longrope) the function
delegates to `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`, so the numbers are transformers' own
(docs/design.md §4.1). `ntk` (static NTK-aware, bloc97: base' = base * alpha^(d/(d-2))) is ours and exports
as the default type with the new `rope_theta`. Production users of `frequencies`: the methods that rotate inside
the attention function (longctx/methods: consistent_dynamic, rerope), and `as_longrope` (Phi-3's config).

`resolve()` keeps `rope_theta` (docs/design.md §4.2 pitfall 1), makes `original_max_position_embeddings` explicit
(pitfall 2) and the factor a float, target / original, never a ceil (LongLoRA's integer factor turns 100k into
102,400). On a base that already ships a scaling it composes on it (compose.py); with RoPE per layer type (Gemma-3)
it reads and writes the global layers' dict (`native_rope`, `with_scaled`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Union

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from longctx import compose
from longctx.errors import TaggedUnion, validation_messages


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _Scaled(_Params):
    """Keys every scaled type shares; None = from the model (theta, original length) or train.seq_len (target)."""

    rope_theta: float | None = Field(None, description="Base; default: the model's own.")
    original_max_position_embeddings: int | None = Field(
        None, description="Pretrained context length; default: the model config's max_position_embeddings.")
    max_position_embeddings: int | None = Field(
        None, description="Target context length written to the config; default train.seq_len.")
    factor: float | None = Field(None, description="Scale factor; default target / original (a float, never a ceil).")

    @field_validator("factor")
    @classmethod
    def _factor_at_least_one(cls, v: float | None) -> float | None:
        if v is not None and v < 1:
            raise ValueError(f"factor must be >= 1 (it compresses positions; < 1 would stretch them), got {v}")
        return v


class NoneRope(_Params):
    rope_type: Literal["none"] = "none"


class LinearRope(_Scaled):
    rope_type: Literal["linear"]


class NtkRope(_Scaled):
    rope_type: Literal["ntk"]
    alpha: float | None = Field(None, description="base' = base * alpha^(d/(d-2)); default: factor.")

    @field_validator("alpha")
    @classmethod
    def _alpha_at_least_one(cls, v: float | None) -> float | None:
        if v is not None and v < 1:
            raise ValueError(f"alpha must be >= 1, got {v}")
        return v


class DynamicRope(_Scaled):
    rope_type: Literal["dynamic"]


class YarnRope(_Scaled):
    rope_type: Literal["yarn"]
    attention_factor: float | None = Field(None, description="cos/sin multiplier; default 0.1 ln(factor) + 1.")
    beta_fast: float | None = Field(None, description="Rotations above which pairs extrapolate (default 32).")
    beta_slow: float | None = Field(None, description="Rotations below which pairs interpolate (default 1).")
    mscale: float | None = Field(None, description="DeepSeek's mscale.")
    mscale_all_dim: float | None = Field(None, description="DeepSeek's mscale_all_dim.")
    truncate: bool | None = Field(None, description="Round the correction range (default true).")


class Llama3Rope(_Scaled):
    rope_type: Literal["llama3"]
    # Required, but a base that ships llama3 scaling supplies them (resolve checks once the model is known).
    low_freq_factor: float | None = Field(None, description="Wavelength threshold L / low_freq_factor (Llama-3.1: 1).")
    high_freq_factor: float | None = Field(None, description="Wavelength threshold L / high_freq_factor (Llama-3.1: 4).")


class LongRope(_Scaled):
    rope_type: Literal["longrope"]
    # Required (config.py checks long_factor at load; resolve both once the model is known), but a longrope base
    # supplies short_factor, and compose.py explains why extending it needs a new long_factor.
    short_factor: list[float] | None = Field(None, description="Per-pair factors up to the original length.")
    long_factor: list[float] | None = Field(None, description="Per-pair factors beyond the original length.")
    attention_factor: float | None = Field(None, description="cos/sin multiplier; default sqrt(1 + ln s / ln L).")


def _default_type(v: Any) -> Any:
    """A rope section without `rope_type` means no scaling ('none')."""
    return {"rope_type": "none", **v} if isinstance(v, dict) and "rope_type" not in v else v


RopeSpec = Annotated[Union[NoneRope, LinearRope, NtkRope, DynamicRope, YarnRope, Llama3Rope, LongRope],
                     Field(discriminator="rope_type"), BeforeValidator(_default_type)]


# ---------------------------------------------------------------------------------------------------------------
# Resolved parameters and the pure functions: (params, seq_len) -> (inv_freq [rotary_dim/2], attention_factor)

@dataclass(frozen=True)
class Resolved:
    """A spec with every shared key filled in, plus what only the model knows (its rotary dim)."""

    spec: Any  # one of the RopeSpec models; for scaled types rope_theta, original, target, factor are all set
    rotary_dim: int
    rope_theta: float  # also for 'none' (the model's own)
    original_max_position_embeddings: int
    partial_rotary_factor: float | None = None

    @property
    def rope_type(self) -> str:
        return self.spec.rope_type

    def __getattr__(self, name: str):  # p.factor, p.rope_theta, ... read through to the spec
        spec = self.__dict__.get("spec")
        if spec is None:
            raise AttributeError(name)
        return getattr(spec, name)


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def ntk_theta(base: float, alpha: float, dim: int) -> float:
    """Static NTK-aware base (bloc97): keeps the highest frequency, divides the lowest by exactly alpha."""
    return base * alpha ** (dim / (dim - 2))


def _theta(p: Resolved) -> float:
    """The base the exported config carries: ntk's new base, else the model's."""
    return ntk_theta(p.rope_theta, p.alpha or p.factor, p.rotary_dim) if p.rope_type == "ntk" else p.rope_theta


def _default(p: Resolved, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    return _default_inv_freq(_theta(p), p.rotary_dim), 1.0


def _transformers(p: Resolved, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """transformers' own ROPE_INIT_FUNCTIONS on a minimal config carrying exactly these parameters."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kw = {} if seq_len is None else {"seq_len": seq_len}
    inv_freq, att = ROPE_INIT_FUNCTIONS[p.rope_type](_minimal_config(p), "cpu", **kw)
    return inv_freq, float(att)


_CONFIGS: dict[str, Any] = {}


def _minimal_config(p: Resolved):
    """A one-head LlamaConfig whose head_dim is the rotary dim, built once per parameter set: consistent_dynamic
    asks for new lengths at every decoding step, and building (and validating) a config each time is slow."""
    from transformers import LlamaConfig

    rp = {**to_rope_parameters(p), "partial_rotary_factor": 1.0}
    key = repr((sorted(rp.items()), p.rotary_dim, model_max_positions(p)))
    if key not in _CONFIGS:
        _CONFIGS[key] = LlamaConfig(hidden_size=p.rotary_dim, num_attention_heads=1, num_key_value_heads=1,
                                    head_dim=p.rotary_dim, num_hidden_layers=1, intermediate_size=1, vocab_size=1,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                    max_position_embeddings=model_max_positions(p), rope_parameters=rp)
    return _CONFIGS[key]


@dataclass(frozen=True)
class Scheme:
    params: type[BaseModel]
    frequencies: Callable[..., tuple[torch.Tensor, float]]
    doc: str


SCHEMES: dict[str, Scheme] = {
    "none": Scheme(NoneRope, _default, "the model's own RoPE, unscaled"),
    "linear": Scheme(LinearRope, _transformers, "position interpolation (Chen et al. 2306.15595)"),
    "ntk": Scheme(NtkRope, _default, "static NTK-aware base change, base * alpha^(d/(d-2)) (bloc97)"),
    "dynamic": Scheme(DynamicRope, _transformers, "dynamic NTK (emozilla); training-free evaluation only"),
    "yarn": Scheme(YarnRope, _transformers, "NTK-by-parts + attention temperature (Peng et al. 2309.00071)"),
    "llama3": Scheme(Llama3Rope, _transformers, "Llama-3.1 wavelength-threshold by-parts"),
    "longrope": Scheme(LongRope, _transformers, "LongRoPE per-pair factors (Ding et al. 2402.13753)"),
}
ROPE_TYPES = tuple(SCHEMES)
STATIC_TYPES = ("none", "linear", "ntk", "yarn", "llama3", "longrope")  # safe to train with (docs/design.md §4.1)
CHANGES_WITH_LENGTH = ("dynamic", "longrope")  # inv_freq depends on the sequence length


def frequencies(p: Resolved, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """inv_freq [rotary_dim/2] and attention_factor (multiplies cos and sin) for resolved params; `seq_len` only
    matters for the types that change with length (dynamic, longrope)."""
    return SCHEMES[p.rope_type].frequencies(p, seq_len)


def to_rope_parameters(p: Resolved) -> dict[str, Any]:
    """The exact transformers 5 `rope_parameters` dict for a config.json: theta and original length always set."""
    if p.rope_type in ("none", "ntk"):
        d = {"rope_type": "default", "rope_theta": _theta(p),
             "original_max_position_embeddings": p.original_max_position_embeddings}
    else:
        d = p.spec.model_dump(exclude_none=True, exclude={"max_position_embeddings"})
    if p.partial_rotary_factor is not None:
        d["partial_rotary_factor"] = p.partial_rotary_factor
    return d


def as_longrope(p: Resolved) -> dict[str, Any]:
    """The same frequencies and attention factor as one `longrope` dict, for config classes that accept no other
    scaled type (Phi3Config: default and longrope; it rewrites yarn into longrope). LongRoPE divides each pair's
    frequency by its own factor, so any static scheme is one: factor_i = unscaled_i / scaled_i, the same list for
    short and long (no switch at the original length), and the attention factor written out (else transformers
    would recompute LongRoPE's own from `factor`)."""
    inv, att = frequencies(p)
    factors = (_default_inv_freq(p.rope_theta, p.rotary_dim).double() / inv.double()).tolist()
    d = {"rope_type": "longrope", "rope_theta": p.rope_theta, "factor": p.factor,
         "original_max_position_embeddings": p.original_max_position_embeddings, "short_factor": factors,
         "long_factor": factors, "attention_factor": att}
    return d | ({"partial_rotary_factor": p.partial_rotary_factor} if p.partial_rotary_factor is not None else {})


def model_max_positions(p: Resolved) -> int:
    """`max_position_embeddings` for the model config. transformers' dynamic type reads that field as the
    *original* length (docs/design.md §4.1), so for dynamic it stays the original length."""
    return p.original_max_position_embeddings if p.rope_type == "dynamic" else p.max_position_embeddings


# ---------------------------------------------------------------------------------------------------------------
# Validation and resolution

# Keys a base that ships llama3/longrope scaling supplies (compose.py): optional in the config, required once the
# model is known (resolve), with these hints.
_FROM_NATIVE_BASE = {"llama3": ("low_freq_factor", "high_freq_factor"), "longrope": ("short_factor", "long_factor")}
_HINTS = {
    ("llama3", "low_freq_factor"): " (Llama-3.1 uses 1.0; a base that ships llama3 scaling supplies it)",
    ("llama3", "high_freq_factor"): " (Llama-3.1 uses 4.0; a base that ships llama3 scaling supplies it)",
    ("longrope", "short_factor"): " (one factor per rotary pair; a base that ships longrope supplies it)",
    ("longrope", "long_factor"): " (one factor per rotary pair)",
}
UNION = TaggedUnion(tag="rope_type", label="rope_type", noun="type", members={k: s.params for k, s in SCHEMES.items()},
                    hints=_HINTS, none="none")
_ADAPTER = TypeAdapter(RopeSpec)


def parse(d: dict[str, Any] | BaseModel | None, prefix: str = "rope.") -> BaseModel:
    """A validated spec from a dict (the config's rope section, `--rope` pairs, longctx.json); ValueError listing
    every problem, each line naming the key."""
    if isinstance(d, BaseModel):
        return d
    try:
        return _ADAPTER.validate_python(d or {})
    except ValidationError as e:
        raise ValueError("\n".join(validation_messages(e, prefix=prefix, unions={"": UNION}))) from None


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
                         "(config.rope_parameters); RoPE scaling needs a RoPE model")
    # Phi-3 keeps its pretrained length outside rope_parameters, and transformers prefers it there.
    original = (rp.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
                or config.max_position_embeddings)
    return {"rope_theta": rp["rope_theta"], "original_max_position_embeddings": original,
            "partial_rotary_factor": rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))}


def resolve(d: dict[str, Any] | BaseModel | None, model_config, check_target: bool = True) -> Resolved:
    """Complete params from a (partial) spec and the model config; ValueError with every problem.

    On a base that ships its own scaling the spec composes on it (compose.py: never silently replaced).
    `check_target`: the target length must exceed the original one (a scaled type that extends nothing is a
    config mistake); consistent_dynamic builds dynamic params at factor 1 (alpha = n / L) and turns it off."""
    spec = parse(d)
    defaults = model_rope_defaults(model_config)
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    partial = defaults["partial_rotary_factor"]
    rotary_dim = int(head_dim * (partial or 1.0))
    if spec.rope_type == "none":
        return Resolved(spec, rotary_dim, defaults["rope_theta"], defaults["original_max_position_embeddings"],
                        partial)
    full = spec.model_dump(exclude_none=True)
    native = native_rope(model_config)
    if compose.is_scaled(native):  # never silently replace a native scaling (compose.py)
        full = compose.on_native(full, native, model_config.max_position_embeddings)
    missing = [k for k in _FROM_NATIVE_BASE.get(spec.rope_type, ()) if full.get(k) is None]
    if missing:
        raise ValueError("\n".join(f"rope.{k}: required for rope_type {spec.rope_type!r}"
                                    f"{_HINTS.get((spec.rope_type, k), '')}" for k in missing))
    full.setdefault("rope_theta", defaults["rope_theta"])
    orig = full.setdefault("original_max_position_embeddings", defaults["original_max_position_embeddings"])
    if "factor" not in full:  # a float ratio; ntk given only alpha extends by alpha
        default_target = orig * full["alpha"] if spec.rope_type == "ntk" and "alpha" in full else orig
        full["factor"] = float(full.get("max_position_embeddings", default_target)) / orig
    full.setdefault("max_position_embeddings", int(round(orig * full["factor"])))
    p = Resolved(parse(full), rotary_dim, full["rope_theta"], orig, partial)
    if check_target and p.max_position_embeddings <= orig:
        raise ValueError(f"rope.max_position_embeddings: the target length {p.max_position_embeddings} must be "
                         f"above the original length {orig}")
    if spec.rope_type == "longrope":
        n = rotary_dim // 2
        if len(p.short_factor) != n or len(p.long_factor) != n:
            raise ValueError(f"rope.short_factor/long_factor: need {n} values each (rotary dim / 2), got "
                             f"{len(p.short_factor)} and {len(p.long_factor)}")
    return p


def as_dict(spec: BaseModel | None) -> dict[str, Any] | None:
    """A spec as `longctx.apply(rope=...)` and longctx.json take it, rope_type first; None for 'none'."""
    if spec is None or spec.rope_type == "none":
        return None
    return {"rope_type": spec.rope_type, **spec.model_dump(exclude_none=True, exclude={"rope_type"})}
