"""pydantic's ValidationError as the lines longctx shows the user: one "key: what is wrong" line per problem.

The config, the rope parameters, the methods and the sweep file each word an unknown key their own way (the valid
keys of a config section, the parameters of a rope type or a method), so they pass that wording in; the walk over
the errors, the key names and the default wordings live here once. Its own module because rope.py is imported by
config.py.

Tagged unions (the `rope:` section keyed by `rope_type`, the `method:` section keyed by `name`) get their own
wording: pydantic puts the tag into the error location ('rope', 'yarn', 'alpha'); the user wrote `rope.alpha`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class TaggedUnion:
    """A discriminated union of parameter models: `tag` is the key that picks the member (rope_type, name)."""

    tag: str
    label: str  # how messages name the tag: "rope_type 'yarn'", "method 'rerope'"
    noun: str  # what a member is: "type", "method"
    members: dict[str, type[BaseModel]]
    hints: dict[tuple[str, str], str] = field(default_factory=dict)  # (member, key) -> hint for a missing key
    none: str | None = None  # the member that takes no keys ('none': no scaling)

    def keys(self, member: str) -> list[str]:
        return [k for k in self.members[member].model_fields if k != self.tag]

    def all_keys(self) -> list[str]:
        return sorted({k for m in self.members for k in self.keys(m)})

    def message(self, err: dict[str, Any], rest: tuple, where: str = "") -> tuple[tuple, str]:
        """(the key path the user wrote, the text) for one error inside the union; `rest` is the location below the
        union: (member, key, ...) or () for the union itself; `where` prefixes suggested keys ('rope.')."""
        kind = err["type"]
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            tag = err.get("ctx", {}).get("tag")
            valid = ", ".join(self.members)
            return (self.tag,), (f"unknown {self.noun} {tag!r}; valid {self.noun}s: {valid}" if tag is not None
                                 else f"required; one of {valid}")
        if not rest or rest[0] not in self.members:
            return rest, f"must be a mapping with {self.tag}: one of {', '.join(self.members)}"
        member, path = rest[0], rest[1:]
        key = str(path[0]) if path else ""
        if kind == "extra_forbidden":
            known = key in self.all_keys()
            pool = self.all_keys() if member == self.none else self.keys(member)
            unknown = "" if known else f"unknown key{_close(where + key, [where + k for k in pool])}; "
            if member == self.none:
                others = ", ".join(m for m in self.members if m != self.none)
                return path, f"{unknown}{self.label} {member!r} takes no keys; set {where}{self.tag} to one of {others}"
            what = "" if unknown else f"not a parameter of {self.label} {member!r}; "
            return path, f"{unknown}{what}{self.label} {member!r} takes: {', '.join(self.keys(member))}"
        if kind == "missing":
            return path, f"required for {self.label} {member!r}{self.hints.get((member, key), '')}"
        msg = err["msg"].removeprefix("Value error, ")
        return path, msg if kind == "value_error" else f"{msg}, got {err.get('input')!r}"


def _close(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def validation_messages(e: ValidationError, unknown: Callable[[tuple], str] | None = None,
                        missing: Callable[[tuple], str] | None = None,
                        other: Callable[[dict[str, Any]], str] | None = None, prefix: str = "",
                        unions: dict[str, TaggedUnion] | None = None) -> list[str]:
    """`prefix + key: text` per error. The text is `unknown(loc)` for a key the model forbids, `missing(loc)` (default
    "required key is missing") for a required one left out, and `other(err)` (default "<pydantic's message>, got
    <the value>") for a bad value. A model validator's error (no key) is its own message, one line per line.
    `unions`: section name ("" for the root) -> the tagged union validated there, worded by `TaggedUnion.message`."""
    out = []
    for err in e.errors():
        loc = tuple(err["loc"])
        section = next((s for s in (unions or {}) if (s == "" or (loc and loc[0] == s))), None)
        if section is not None:
            head = () if section == "" else (section,)
            where = prefix + "".join(f"{x}." for x in head)
            path, text = unions[section].message(err, loc[len(head):], where)
            out.append(f"{prefix}{'.'.join(str(x) for x in head + path)}: {text}")
            continue
        key = ".".join(str(x) for x in loc)
        if err["type"] == "extra_forbidden":
            out.append(f"{prefix}{key}: {unknown(loc) if unknown else 'unknown key'}")
        elif err["type"] == "missing":
            out.append(f"{prefix}{key}: {missing(loc) if missing else 'required key is missing'}")
        elif err["type"] == "value_error" and not key:
            out += str(err["ctx"]["error"]).splitlines()
        else:
            text = other(err) if other else f"{err['msg']}, got {err.get('input')!r}"
            out.append(f"{prefix}{key}: {text}")
    return out
