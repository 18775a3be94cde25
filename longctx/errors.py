"""pydantic's ValidationError as the lines longctx shows the user: one "key: what is wrong" line per problem.

The config, the rope parameters and the sweep file each word an unknown key their own way (the valid keys of a
config section, the parameters of a rope type), so they pass that wording in; the walk over the errors, the key
names and the default wordings live here once. Its own module because rope.py is imported by config.py.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import ValidationError


def validation_messages(e: ValidationError, unknown: Callable[[tuple], str],
                        missing: Callable[[tuple], str] | None = None,
                        other: Callable[[dict[str, Any]], str] | None = None, prefix: str = "") -> list[str]:
    """`prefix + key: text` per error. The text is `unknown(loc)` for a key the model forbids, `missing(loc)` (default
    "required key is missing") for a required one left out, and `other(err)` (default "<pydantic's message>, got
    <the value>") for a bad value. A model validator's error (no key) is its own message, one line per line."""
    out = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            out.append(f"{prefix}{loc}: {unknown(err['loc'])}")
        elif err["type"] == "missing":
            out.append(f"{prefix}{loc}: {missing(err['loc']) if missing else 'required key is missing'}")
        elif err["type"] == "value_error" and not loc:
            out += str(err["ctx"]["error"]).splitlines()
        else:
            text = other(err) if other else f"{err['msg']}, got {err.get('input')!r}"
            out.append(f"{prefix}{loc}: {text}")
    return out
