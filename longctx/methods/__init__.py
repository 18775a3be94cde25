"""Training-free context extension methods: one registry, applied to a model instance, reversible.

    handle = longctx.apply(model, method={"name": "leaky_rerope", "window": 64, "leak": 16})
    longctx eval ppl --model M --method leaky_rerope window=64 leak=16 ...        # the same names and keys
    method: {name: leaky_rerope, window: 64, leak: 16}                           # config / sweep

Each method is one file with its parameter model (strict pydantic, keyed by `name`) and `apply(model, spec,
target, undo)`, which changes the model instance through transformers' registries (a registered attention
function, the rotary module replaced on the instance) or torch's module hooks, pushing one undo step per change;
`longctx.apply` runs them and `handle.remove()` undoes them. NBCE changes nothing on the model: it is a way of
running it (`runner`). Nothing happens at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Union

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from longctx.errors import TaggedUnion, validation_messages
from longctx.methods import consistent_dynamic, logn, nbce, ntk_alibi, rerope


@dataclass(frozen=True)
class Method:
    params: type[BaseModel]
    families: tuple[str, ...]  # "rope", "alibi" (longctx.families)
    apply: Callable[..., None]
    doc: str
    trains: bool = False  # may also be used while fine-tuning (a training config's `method:`)
    runner: Callable | None = None  # (model, spec, target, tokenizer) -> what to evaluate / generate with


METHODS: dict[str, Method] = {
    "consistent_dynamic": Method(consistent_dynamic.Params, ("rope",), consistent_dynamic.apply,
                                 "dynamic NTK with unrotated keys in the cache, rotated per step for the current "
                                 "length (NormXU)"),
    "rerope": Method(rerope.Params, ("rope",), rerope.apply, "relative positions clipped at a window (Su)"),
    "leaky_rerope": Method(rerope.LeakyParams, ("rope",), rerope.apply,
                           "relative positions beyond the window grow 1/leak as fast (Su)"),
    "logn": Method(logn.Params, ("rope",), logn.apply, "queries scaled by max(1, log(i+1)/log(L)) (Su, Qwen-1)",
                   trains=True),
    "nbce": Method(nbce.Params, ("rope", "alibi"), nbce.apply,
                   "naive Bayes context extension: context chunks decoded as a batch, pooled (Su et al.)",
                   runner=nbce.runner),
    "ntk_alibi": Method(ntk_alibi.Params, ("alibi",), ntk_alibi.apply, "ALiBi slopes rescaled NTK-style (keezen)"),
    "dynamic_ntk_alibi": Method(ntk_alibi.DynamicParams, ("alibi",), ntk_alibi.apply,
                                "NTK-ALiBi with a = max(1, n / L) for the current length"),
}

MethodSpec = Annotated[Union[tuple(m.params for m in METHODS.values())], Field(discriminator="name")]
UNION = TaggedUnion(tag="name", label="method", noun="method", members={k: m.params for k, m in METHODS.items()})
_ADAPTER = TypeAdapter(MethodSpec)


@dataclass(frozen=True)
class Target:
    """What a method is applied to, besides the model: its family, its original (training) length, and its RoPE
    as resolved by the `rope` part of `longctx.apply` (None: unscaled, or no RoPE)."""

    family: str
    original_length: int | None
    rope: Any = None


def parse(d: dict[str, Any] | BaseModel, prefix: str = "method.") -> BaseModel:
    """A validated method spec; ValueError with one line per problem, naming the key and what is allowed."""
    if isinstance(d, BaseModel):
        return d
    try:
        return _ADAPTER.validate_python(d)
    except ValidationError as e:
        raise ValueError("\n".join(validation_messages(e, prefix=prefix, unions={"": UNION}))) from None


def parse_cli(tokens: list[str]) -> BaseModel:
    """`--method NAME key=value ...` -> a spec (the values read as YAML scalars, as config overrides are)."""
    import yaml

    name, pairs = tokens[0], tokens[1:]
    d: dict[str, Any] = {"name": name}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--method {name}: expected key=value after the method name, got {pair!r}")
        d[key] = yaml.safe_load(value) if value.strip() else None
    return parse(d, prefix=f"--method {name}: ")


def rope_conflicts(spec: BaseModel, rope_spec: BaseModel) -> list[str]:
    """Config-time conflicts between a method and the rope section."""
    if spec.name == "consistent_dynamic" and rope_spec.rope_type != "none":
        return [f"method: consistent_dynamic computes the rotation itself; rope.rope_type must be none, got "
                f"{rope_spec.rope_type}"]
    if spec.name in ("rerope", "leaky_rerope") and rope_spec.rope_type in ("dynamic", "longrope"):
        return [f"method: {spec.name} rotates with one set of frequencies; rope.rope_type {rope_spec.rope_type} "
                "changes them with the length"]
    return []


def check_fits(spec: BaseModel, family: str, model_type: str) -> None:
    """ValueError naming the method, the model family and the methods that fit it."""
    if family not in METHODS[spec.name].families:
        fitting = [k for k, m in METHODS.items() if family in m.families]
        kind = "ALiBi" if family == "alibi" else "RoPE"
        raise ValueError(f"method {spec.name!r} does not fit model type {model_type!r} ({kind}); methods for {kind} "
                         f"models: {', '.join(fitting)}")


def apply(model, spec: BaseModel, target: Target, undo: list) -> None:
    """Apply `spec` to `model` (the transformers model, not a PEFT wrapper); undo steps go onto `undo`."""
    check_fits(spec, target.family, model.config.model_type)
    METHODS[spec.name].apply(model, spec, target, undo)


def runner(model, spec: BaseModel, target: Target, tokenizer=None):
    """What evaluation and generation call: the model itself, or the method's way of running it (NBCE)."""
    make = METHODS[spec.name].runner
    return model if make is None else make(model, spec, target, tokenizer)
