"""Chat templates: a conversation as text, and which characters of it are the assistant's (the trained part).

    render = Renderer.for_tokenizer(tokenizer, "auto")    # the tokenizer's own chat template, else "prompt"
    text, spans = assistant_spans(messages, render)       # spans: [start, end) character ranges to train on

Templates (`data.template`), each a pure function (messages, add_generation_prompt, Specials) -> text:
- ``tokenizer``: the tokenizer's own chat template (``tokenizer.apply_chat_template``); ``auto`` picks it when the
  tokenizer has one, else ``prompt``.
- ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message (Qwen, SmolLM2-Instruct, ...).
- ``llama2``: Llama-2-chat, ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s>``.
- ``prompt``: LongAlpaca's: BOS + ``data.prompt_template`` filled with ``{instruction}`` (the user turn; a system
  message before it, then a blank line) and ``{input}`` (an instruction row's input after a newline), then the
  answer + EOS, turn after turn.
- ``plain``: BOS + the messages' texts as they are, each answer followed by EOS (prompt/completion as text).

The assistant spans come from rendering incrementally, not from ``{% generation %}`` markers (few templates have
them; SmolLM2's has none): the answer to turn k is what rendering the first k+1 messages adds to rendering the
first k with the generation prompt. A template for which those are not prefixes of the whole conversation (one
that rewrites earlier turns) is reported as such: choose a named template or ``data.train_on: all``.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

from longctx.data.errors import DataError

DEFAULT_PROMPT = "[INST] {instruction}{input} [/INST]"


class BadRow(ValueError):
    """A row that cannot become a training example; str() is "<kind>: <detail>" (`longctx.data.errors`)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")


@dataclass(frozen=True)
class Specials:
    """What a named template writes besides the messages."""

    bos: str  # "" when the tokenizer adds no BOS to encoded text
    eos: str
    prompt_template: str = DEFAULT_PROMPT
    bos_token: str = ""  # the tokenizer's BOS text, whether or not encoding adds it (Llama-2-chat writes it)


def chatml(messages: list[dict], add_generation_prompt: bool, s: Specials) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def llama2(messages: list[dict], add_generation_prompt: bool, s: Specials) -> str:
    """Llama-2-chat, as transformers' former LlamaTokenizer default template: user and assistant alternate."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    text = ""
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise BadRow("template does not render", "llama2 needs user and assistant turns alternating, "
                         "starting with user (after an optional first system message)")
        if m["role"] == "user":
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{m['content']}" if i == 0 and system is not None else m["content"]
            text += f"{s.bos_token}[INST] {content.strip()} [/INST]"
        else:
            text += f" {m['content'].strip()} {s.eos}"
    return text


def prompt(messages: list[dict], add_generation_prompt: bool, s: Specials) -> str:
    text, system = s.bos, ""
    for m in messages:
        if m["role"] == "system":
            system += m["content"] + "\n\n"
        elif m["role"] == "user":
            instruction, extra = m.get("instruction", m["content"]), m.get("input") or ""
            text += s.prompt_template.format(instruction=system + instruction, input=f"\n{extra}" if extra else "")
            system = ""
        else:
            text += m["content"] + s.eos
    return text


def plain(messages: list[dict], add_generation_prompt: bool, s: Specials) -> str:
    return s.bos + "".join(m["content"] + (s.eos if m["role"] == "assistant" else "") for m in messages)


TEMPLATES: dict[str, Callable[[list[dict], bool, Specials], str]] = {
    "chatml": chatml, "llama2": llama2, "prompt": prompt, "plain": plain}
TEMPLATE_NAMES = ("auto", "tokenizer", *TEMPLATES)


def prompt_template_problem(template: str) -> str | None:
    """Why `template` is not a usable data.prompt_template, or None."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:  # an unbalanced brace
        return f"{e} in {template!r} (write a literal brace as {{{{ or }}}})"
    if "instruction" not in fields:
        return f"must contain {{instruction}}, got {template!r}"
    unknown = sorted(fields - {"instruction", "input"})
    if unknown:
        return (f"unknown placeholder {{{unknown[0]}}} in {template!r}; allowed: {{instruction}}, {{input}} (write "
                "a literal brace as {{ or }})")
    return None


class Renderer:
    """A template bound to a tokenizer: render(messages, add_generation_prompt) -> text. Picklable (datasets.map)."""

    def __init__(self, name: str, tokenizer, specials: Specials):
        self.name, self.tokenizer, self.specials = name, tokenizer, specials

    @classmethod
    def for_tokenizer(cls, tokenizer, template: str = "auto", prompt_template: str = DEFAULT_PROMPT) -> "Renderer":
        if template not in TEMPLATE_NAMES:
            raise DataError(f"data.template: unknown template {template!r}; allowed: {', '.join(TEMPLATE_NAMES)}")
        has_own = bool(getattr(tokenizer, "chat_template", None))
        if template == "tokenizer" and not has_own:
            raise DataError("data.template: tokenizer, but the tokenizer has no chat template; name one of "
                            f"{', '.join(TEMPLATES)}")
        name = ("tokenizer" if has_own else "prompt") if template == "auto" else template
        problem = prompt_template_problem(prompt_template) if name == "prompt" else None
        if problem:
            raise DataError(f"data.prompt_template: {problem}")
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has no eos_token; SFT answers end with it")
        return cls(name, tokenizer, Specials(_added_bos(tokenizer), tokenizer.eos_token, prompt_template,
                                             tokenizer.bos_token or ""))

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.name != "tokenizer":
            return TEMPLATES[self.name](messages, add_generation_prompt, self.specials)
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja2's TemplateError, raise_exception(...) in the template, a missing key
            raise BadRow("template does not render", f"{type(e).__name__}: {e}") from None


def _added_bos(tokenizer) -> str:
    """The BOS text when encoding adds BOS (Llama), else "" (chatml models): named templates write it themselves."""
    plain_ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos_id = tokenizer.bos_token_id
    added = bos_id is not None and len(with_special) > len(plain_ids) and with_special[0] == bos_id
    return tokenizer.bos_token if added else ""


def assistant_spans(messages: list[dict], render: Renderer) -> tuple[str, list[tuple[int, int]]]:
    """(the whole conversation as text, [start, end) of each assistant turn in it) by incremental rendering."""
    text = render(messages)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if k == 0 and render.name == "tokenizer":  # transformers refuses to render an empty conversation
            raise BadRow("template does not render", "the conversation starts with an assistant message, and the "
                         "tokenizer's template cannot render what comes before it")
        before, through = render(messages[:k], True), render(messages[:k + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise BadRow("template does not render", f"template {render.name!r} rewrites earlier turns (the "
                         f"conversation cut after message {k} is not a prefix of the whole); use a named "
                         "data.template or data.train_on: all")
        if m["content"].strip() not in through[len(before):]:
            raise BadRow("template does not render", f"template {render.name!r} does not write assistant message "
                         f"{k} as it is")
        spans.append((len(before), len(through)))
    return text, spans
