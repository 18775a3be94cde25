"""`longctx.apply(model, rope=..., attention=...)`: scaled RoPE and S²-Attn on one model instance, reversibly.

    handle = longctx.apply(model, rope={"rope_type": "yarn", "factor": 4.0}, attention={"type": "s2"})
    handle.remove()   # the model computes exactly what it computed before

Nothing here touches a transformers class. RoPE: `config.rope_parameters` and `max_position_embeddings` are set on
the model's config and the rotary embedding module is rebuilt from it with the model's own rotary class, so the
model computes what plain transformers computes from the exported config.json (a pure config change does nothing:
inv_freq is a buffer built at init, research/rope.md 1.5 pitfall 4). Per-layer-type RoPE (Gemma-3) is scaled on the
global layers only, and a base that ships its own scaling is extended by composing on it (rope.py, compose.py).
Attention: S2 is registered with transformers' registries and selected with `set_attn_implementation`; its settings
sit on each attention module. Which model types work, and how, is `longctx.families.FAMILIES`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from longctx import attention as s2
from longctx import families
from longctx import rope as rope_registry
from longctx.config import ConfigError


@dataclass
class Handle:
    """What `apply` changed, and how to undo it."""

    model: torch.nn.Module
    rope: rope_registry.RopeParams | None
    attention: dict[str, Any]
    _undo: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def __enter__(self) -> "Handle":  # `with longctx.apply(model, ...):` undoes the patch on leaving the block
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def longctx_json(self) -> dict[str, Any]:
        """What RUN/final/longctx.json records about the patch."""
        return {"rope": self.rope.model_dump() if self.rope else None,
                "rope_parameters": _base(self.model).config.rope_parameters,
                "attention": self.attention}


def _base(model: torch.nn.Module):
    """The transformers PreTrainedModel inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _rotary_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child).__name__.endswith("RotaryEmbedding")]


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "head_dim")]


def check_supported(config) -> None:
    """ConfigError naming the model type when longctx cannot patch this family (longctx.families); train, eval,
    export and plan call it on the model's config before anything else is checked or loaded."""
    families.of(config)


def apply(model: torch.nn.Module, rope: dict[str, Any] | None = None,
          attention: dict[str, Any] | None = None) -> Handle:
    """Scale RoPE and/or select S2 attention on `model` (a transformers or PEFT model). Raises ConfigError."""
    base = _base(model)
    check_supported(base.config)
    handle = Handle(model, None, dict(attention or {"type": "full"}))
    try:
        if rope and rope.get("rope_type", "none") != "none":
            _apply_rope(base, rope, handle)
        if attention and attention.get("type", "full") == "s2":
            _apply_s2(base, attention, handle)
    except BaseException:
        handle.remove()
        raise
    return handle


def _apply_rope(base, rope: dict[str, Any], handle: Handle) -> None:
    config = base.config
    rotaries = _rotary_modules(base)
    if not rotaries:
        raise ConfigError(f"model type {config.model_type!r}: no rotary embedding module found")
    try:
        params = rope_registry.resolve(rope, config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
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
    modules = _attention_modules(base)
    if not modules:
        raise ConfigError(f"model type {base.config.model_type!r}: no attention modules found")
    s2.register()
    old_impl = base.config._attn_implementation
    base.set_attn_implementation(s2.NAME)
    handle._undo.append(lambda: base.set_attn_implementation(old_impl))
    for m in modules:
        m.s2_settings = settings
        handle._undo.append(lambda m=m: delattr(m, "s2_settings"))
