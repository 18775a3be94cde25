"""Run names from a run's own overrides, and how override values are written: in names, on command lines, in the
printed run list."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import yaml

from longctx.config import ConfigError


def override_text(v: Any) -> str:
    """A value as the YAML text of a dotted override: plain when YAML reads it back as the same string, else JSON
    (which is YAML)."""
    if isinstance(v, str) and v.strip() == v and v:
        try:
            if yaml.safe_load(v) == v:
                return v
        except yaml.YAMLError:
            pass
    return json.dumps(v)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return "-".join(f"{k}-{_fmt(x)}" for k, x in v.items())
    return str(v)


def show_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else _fmt(v)


def _safe(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+=-]+", "_", name).strip("_") or "run"
    name = "_" + name[1:] if name.startswith(".") else name
    return name if len(name) <= 120 else name[:110] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def run_name(own: dict[str, Any], full_keys: bool = False) -> str:
    """rope.rope_type=yarn, rope.factor=4 -> 'rope_type-yarn__factor-4' (filesystem-safe)."""
    if not own:
        return "base"
    return _safe("__".join(f"{k if full_keys else k.split('.')[-1]}-{_fmt(v)}" for k, v in own.items()))


def run_names(owns: list[dict[str, Any]]) -> list[str]:
    """Unique directory names: short keys, full dotted keys where short ones collide, then -2, -3, ..."""
    for i, own in enumerate(owns):
        if own in owns[:i]:
            raise ConfigError(f"sweep: the run {own} appears twice (the grid and runs give the same overrides)")
    short = [run_name(o) for o in owns]
    names = [run_name(o, full_keys=True) if short.count(n) > 1 else n for o, n in zip(owns, short)]
    out: list[str] = []
    for name in names:
        unique, k = name, 1
        while unique in out:
            k += 1
            unique = f"{name}-{k}"
        out.append(unique)
    return out
