"""`longctx.apply(model, rope=..., attention=..., method=...)`: one model instance, changed reversibly.

    handle = longctx.apply(model, rope={"rope_type": "yarn", "factor": 4.0}, attention={"type": "s2"})
    handle = longctx.apply(model, method={"name": "rerope", "window": 64})   # a training-free method
    handle.remove()   # the model computes exactly what it computed before

Nothing here touches a transformers class. RoPE: `config.rope_parameters` and `max_position_embeddings` are set on
the model's config and the rotary embedding module is rebuilt from it with the model's own rotary class, so the
model computes what plain transformers computes from the exported config.json (a pure config change does nothing:
inv_freq is a buffer built at init, docs/design.md §4.2 pitfall 3). Per-layer-type RoPE (Gemma-3) is scaled on the
global layers only, and a base that ships its own scaling is extended by composing on it (rope.py, compose.py).
Attention: S2 is registered with transformers' registries and selected with `set_attn_implementation`; its settings
sit on each attention module. Which model types work, and how, is `longctx.families`. Methods (longctx/methods):
each pushes its own undo steps. Order: rope, then S2, then the method (log-n wraps whatever attention is selected by
then).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel

from longctx import attention as s2
from longctx import families
from longctx import methods as method_registry
from longctx import rope as rope_registry
from longctx.config import ConfigError
from longctx.methods import ntk_alibi
from longctx.methods.rotary import attention_modules, rotary_modules


@dataclass
class Handle:
    """What `apply` changed, and how to undo it."""

    model: torch.nn.Module
    rope: rope_registry.Resolved | None
    attention: dict[str, Any]
    method: BaseModel | None = None
    target: method_registry.Target | None = None
    _undo: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def __enter__(self) -> "Handle":  # `with longctx.apply(model, ...):` undoes the patch on leaving the block
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def runner(self, tokenizer=None):
        """What to evaluate or generate with: the model, or the method's way of running it (NBCE)."""
        if self.method is None:
            return self.model
        return method_registry.runner(self.model, self.method, self.target, tokenizer)

    def longctx_json(self) -> dict[str, Any]:
        """What RUN/final/longctx.json records about the patch."""
        config = _base(self.model).config
        return {"rope": rope_registry.as_dict(self.rope.spec) if self.rope else None,
                "rope_parameters": getattr(config, "rope_parameters", None),
                "attention": self.attention,
                "method": self.method.model_dump(exclude_none=True) if self.method else None}


def _base(model: torch.nn.Module):
    """The transformers PreTrainedModel inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_supported(config) -> str:
    """'rope' or 'alibi'; ConfigError naming the model type when longctx cannot run this family (longctx.families).
    Train, eval, export and plan call it on the model's config before anything else is checked or loaded."""
    return families.check(config)


def apply(model: torch.nn.Module, rope: dict[str, Any] | BaseModel | None = None,
          attention: dict[str, Any] | None = None, method: dict[str, Any] | BaseModel | None = None) -> Handle:
    """Scale RoPE, select S2 attention and/or apply a method on `model` (a transformers or PEFT model).
    Raises ConfigError (the CLI exits 2) naming what does not fit."""
    base = _base(model)
    config = base.config
    family = check_supported(config)
    handle = Handle(model, None, dict(attention or {"type": "full"}))
    try:
        scaled = rope is not None and rope_registry.parse(rope).rope_type != "none"
        s2_on = bool(attention) and attention.get("type", "full") == "s2"
        if family == "alibi" and (scaled or s2_on):
            what = "RoPE scaling" if scaled else "S²-Attn (attention.type: s2)"
            raise ConfigError(f"model type {config.model_type!r} uses ALiBi, not RoPE: {what} does not apply to "
                              "it; use attention.type: full for fine-tuning and the methods ntk_alibi, "
                              "dynamic_ntk_alibi or nbce for longer contexts")
        if config.model_type == "mpt" and not (method and method_registry.parse(method).name.endswith("ntk_alibi")):
            ntk_alibi.extend_mpt(base, handle._undo)  # its bias for the current length, not only max_seq_len
        if scaled:
            _apply_rope(base, rope, handle)
        if s2_on:
            _apply_s2(base, attention, handle)
        if method is not None:
            handle.method = method_registry.parse(method)
            handle.target = method_registry.Target(family, families.original_length(config), handle.rope)
            method_registry.apply(base, handle.method, handle.target, handle._undo)
    except ValueError as e:
        handle.remove()
        raise ConfigError(str(e)) from None
    except BaseException:
        handle.remove()
        raise
    return handle


def _apply_rope(base, rope: dict[str, Any] | BaseModel, handle: Handle) -> None:
    config = base.config
    rotaries = rotary_modules(base)
    if not rotaries:
        raise ConfigError(f"model type {config.model_type!r}: no rotary embedding module found")
    params = rope_registry.resolve(rope, config)
    old_rp, old_max = copy.deepcopy(config.rope_parameters), config.max_position_embeddings
    # Phi-3 keeps its pretrained length at the top level too, and transformers prefers that one when it loads.
    old_orig = getattr(config, "original_max_position_embeddings", None)

    def restore_config():
        config.rope_parameters, config.max_position_embeddings = old_rp, old_max
        if old_orig is not None:
            config.original_max_position_embeddings = old_orig

    handle._undo.append(restore_config)
    written = rope_registry.to_rope_parameters(params)
    if families.carry_as_longrope(config, written["rope_type"]):  # Phi3Config takes default and longrope only
        written = rope_registry.as_longrope(params)
    config.rope_parameters = rope_registry.with_scaled(config, written)
    config.max_position_embeddings = rope_registry.model_max_positions(params)
    if old_orig is not None:
        config.original_max_position_embeddings = params.original_max_position_embeddings
    for parent, name, old in rotaries:
        new = type(old)(config=config)
        new.to(next(old.buffers()).device)  # inv_freq, or one per layer type (Gemma-3)
        setattr(parent, name, new)
        handle._undo.append(lambda parent=parent, name=name, old=old: setattr(parent, name, old))
    handle.rope = params


def _apply_s2(base, attention: dict[str, Any], handle: Handle) -> None:
    families.check_s2(base.config)
    settings = s2.S2Settings(**{k: v for k, v in attention.items() if k != "type"})
    modules = attention_modules(base)
    if not modules:
        raise ConfigError(f"model type {base.config.model_type!r}: no attention modules found")
    s2.register()
    old_impl = base.config._attn_implementation
    base.set_attn_implementation(s2.NAME)
    handle._undo.append(lambda: base.set_attn_implementation(old_impl))
    for m in modules:
        m.s2_settings = settings
        handle._undo.append(lambda m=m: delattr(m, "s2_settings"))
