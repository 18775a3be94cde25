"""Row formats of `data.format: sft`, told apart by their fields, each turned into a conversation or a document.

- ``messages``: a list of {role, content} (HF chat datasets); roles system, user, assistant.
- ``instruction``, optional ``input``, ``output`` (Alpaca, LongAlpaca): a user turn and the answer.
- ``prompt``, ``completion``: a user turn and the answer.
- ``text`` (``data.text_field``): a plain document, every token trained (long documents mixed with instructions).

Fields are looked for in that order, row by row, so one file may hold several formats. A row that has none, or
a broken one (a field missing or null, an unknown role, an empty conversation, a non-string content), raises
`BadRow` naming what is wrong.
"""

from __future__ import annotations

from longctx.data.templates import BadRow

ROLES = ("system", "user", "assistant")
FORMATS = {"messages": ("messages",), "instruction": ("instruction", "output"),
           "prompt": ("prompt", "completion")}


def _string(row: dict, field: str, fmt: str) -> str:
    value = row.get(field)
    if value is None:
        raise BadRow("missing field", f"{fmt} row without {field!r}")
    if not isinstance(value, str):
        raise BadRow("wrong type", f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value) -> list[dict]:
    if not isinstance(value, list):
        raise BadRow("wrong type", f"'messages' must be a list of {{role, content}}, got {type(value).__name__}")
    if not value:
        raise BadRow("empty conversation", "'messages' is an empty list")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") is None or m.get("content") is None:
            raise BadRow("missing field", f"message {k} needs 'role' and 'content', got {m!r}"[:300])
        if m["role"] not in ROLES:
            raise BadRow("unknown role", f"message {k} has role {m['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise BadRow("wrong type", f"message {k}: 'content' must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def conversation(row: dict, text_field: str = "text") -> tuple[str, list[dict] | str]:
    """("chat", messages) or ("text", document) for one row."""
    if row.get("messages") is not None:
        return "chat", _messages(row["messages"])
    if row.get("instruction") is not None or row.get("output") is not None:
        instruction, output = _string(row, "instruction", "instruction"), _string(row, "output", "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise BadRow("wrong type", f"field 'input' must be a string, got {type(extra).__name__}")
        user = {"role": "user", "content": instruction + (f"\n{extra}" if extra else ""),
                "instruction": instruction, "input": extra}
        return "chat", [user, {"role": "assistant", "content": output}]
    if row.get("prompt") is not None or row.get("completion") is not None:
        user = _string(row, "prompt", "prompt/completion")
        return "chat", [{"role": "user", "content": user},
                        {"role": "assistant", "content": _string(row, "completion", "prompt/completion")}]
    if row.get(text_field) is not None:
        return "text", _string(row, text_field, "text")
    present = sorted(k for k, v in row.items() if v is not None)
    raise BadRow("missing field", "no fields of a known format: messages | instruction, output | prompt, completion"
                 f" | {text_field} (the row has: {', '.join(present) or 'nothing'})")
