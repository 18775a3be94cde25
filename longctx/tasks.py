"""Long-context retrieval tasks beyond one passkey, as RULER defines them (Hsieh et al. 2024, "RULER: What's the
Real Context Size of Your Long-Context Language Models?", NVIDIA/RULER scripts/data/synthetic/), generated locally.

    longctx eval multikey --model runs/x/final --lengths 256,512,1024 --depths 0,0.5,1 --trials 5 --out runs/x/eval
    longctx eval multivalue ...   longctx eval vartrack ...   (the same flags as `longctx eval passkey`)

One registry, TASKS: name -> Task(build, score, tokens_to_generate, help). `build(n, depth, rng)` is a pure prompt
builder: n filler sentences (the passkey's, which are RULER's "noise" haystack), the depth in [0, 1] and a seeded
random.Random -> Prompt(text, answers). It draws every key and value first and only then the positions, so the
keys stay the same while the length search (evaluate.longest_filler) tries different n. The needle the depth
places sits on its own line after round(depth * n) filler sentences, as the passkey's key line does:
- passkey: evaluate's passkey prompt, built here from the same parts (the same text, tested);
- multikey (RULER niah_multikey_1): 4 needles "One of the special magic numbers for KEY is: VALUE." with distinct
  adjective-noun keys and 7-digit values; the queried one at the depth, the 3 distractors at random positions;
  expected: its one value;
- multivalue (RULER niah_multivalue): one key with 4 distinct values, the first at the depth, the others at
  random positions; expected: all 4 values;
- vartrack (RULER vt, 1 chain of 4 hops): "VAR ABCDE = 12345", then "VAR FGHIJ = VAR ABCDE", ... in order, the
  first at the depth and the hops at random later positions; expected: the 5 variable names.
The templates are RULER's (its `template` + `answer_prefix`, singular wording when one value is asked for).

Scoring is RULER's string_match_all: the fraction of the expected strings found in the generated text (case-
insensitive); a cell's accuracy is the mean over its trials (passkey keeps its own: the first number is the key).
Greedy decoding of RULER's tokens_to_generate (128 for NIAH, 30 for vartrack; a model may answer verbosely, as
SmolLM2 writes "A) VAR ABCDE\nB) VAR ..."), or more when the expected answers written out (" A, B, C.") plus 2 per
answer take more (a small tokenizer); passkey keeps evaluate.passkey's budget (the answer's tokens + 2).

Differences from RULER, all for a local, tokenizer-independent, CPU-sized evaluation: the haystack is always the
noise filler (no Paul Graham essays to download); keys come from the small word lists below (RULER draws from the
wonderwords package's lists); the prompt is at most L tokens (RULER: prompt + tokens to generate); the depth of the
target needle is set by --depths (RULER draws every needle's depth); vartrack has no one-shot example (at 256
tokens it would take most of the prompt), no trailing spaces, and the prompt ends without RULER's trailing space.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable

from tqdm import tqdm

from longctx import evaluate as ev
from longctx.config import ConfigError


@dataclass(frozen=True)
class Prompt:
    text: str
    answers: list[str]  # the expected strings


@dataclass(frozen=True)
class Task:
    build: Callable[[int, float, random.Random], Prompt]
    score: Callable[[str, list[str]], float]
    tokens_to_generate: int  # RULER's generation budget (constants.py), a floor here
    help: str


# ---------------------------------------------------------------------------------------------------------------
# The haystack and the scoring

def needle_position(n: int, depth: float) -> int:
    """After how many of the n filler sentences the depth's needle goes (as the passkey's key line)."""
    return round(depth * n)


def haystack(n: int, needles: list[tuple[int, str]]) -> str:
    """n filler sentences, each needle line after `position` of them, on its own line; needles at the same position
    keep their order in `needles`."""
    filler = [ev.PASSKEY_FILLER[i % len(ev.PASSKEY_FILLER)] for i in range(n)]
    lines, done = [], 0
    for position, line in sorted(needles, key=lambda x: x[0]):  # stable: ties keep their order
        if position > done:
            lines.append(" ".join(filler[done:position]))
        lines.append(line)
        done = max(done, position)
    if done < n:
        lines.append(" ".join(filler[done:]))
    return "\n".join(lines)


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all for one sample: the fraction of the answers that occur in the prediction, ignoring
    case (after its postprocess_pred: strip, control characters -> newline)."""
    prediction = re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip().lower()
    return sum(a.lower() in prediction for a in answers) / len(answers)


def passkey_score(prediction: str, answers: list[str]) -> float:
    return float(ev.passkey_correct(prediction, answers[0]))


# ---------------------------------------------------------------------------------------------------------------
# The prompt builders: (n filler sentences, depth, rng) -> Prompt

# Keys are adjective-noun pairs as in RULER (which takes them from the wonderwords package); a short list is enough
# for 4 distinct keys per prompt and keeps the evaluation free of a dependency.
ADJECTIVES = ("ancient", "brave", "calm", "clever", "crimson", "curious", "eager", "fancy", "gentle", "golden",
              "hollow", "humble", "icy", "jolly", "lively", "lucky", "mellow", "noisy", "polite", "quiet", "rapid",
              "silent", "sturdy", "tender", "vivid", "wise")
NOUNS = ("anchor", "badger", "basket", "candle", "castle", "comet", "desert", "falcon", "forest", "garden",
         "harbor", "island", "jacket", "kettle", "lantern", "meadow", "mirror", "orchard", "pebble", "pillow",
         "river", "saddle", "tunnel", "violin", "walnut", "window")

NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_TEMPLATE = ("Some special magic {type} are hidden within the following text. Make sure to memorize it. I will "
                 "quiz you about the {type} afterwards.\n{context}\nWhat are all the special magic {type} for {query} "
                 "mentioned in the provided text? The special magic {type} for {query} mentioned in the provided "
                 "text are")
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above. Answer: According "
               "to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value "
               "{query}, they are:")


def niah_prompt(context: str, query: str, values: int) -> str:
    """RULER's NIAH template; with one value asked for, its singular wording (RULER niah.py: Some -> A, are all ->
    is, are -> is, numbers -> number)."""
    template, kind = NIAH_TEMPLATE, "numbers"
    if values == 1:
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        kind = "number"
    return template.format(type=kind, context=context, query=query)


def distinct(draw: Callable[[], str], k: int) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        x = draw()
        if x not in out:
            out.append(x)
    return out


def word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def magic_number(rng: random.Random) -> str:
    return str(rng.randint(10 ** 6, 10 ** 7 - 1))  # RULER: 7 digits


def build_passkey(n: int, depth: float, rng: random.Random) -> Prompt:
    """evaluate.passkey_prompt's text; the key is the one evaluate.passkey_key draws from the same seed."""
    key = str(rng.randint(10000, 99999))
    context = haystack(n, [(needle_position(n, depth), ev.PASSKEY_LINE.format(key=key))])
    return Prompt("\n".join([ev.PASSKEY_TASK, context, ev.PASSKEY_QUESTION]), [key])


def build_multikey(n: int, depth: float, rng: random.Random, keys: int = 4) -> Prompt:
    names = distinct(lambda: word_key(rng), keys)
    values = distinct(lambda: magic_number(rng), keys)
    needles = [(needle_position(n, depth), NIAH_NEEDLE.format(key=names[0], value=values[0]))]
    needles += [(rng.randint(0, n), NIAH_NEEDLE.format(key=k, value=v)) for k, v in zip(names[1:], values[1:])]
    return Prompt(niah_prompt(haystack(n, needles), names[0], 1), [values[0]])


def build_multivalue(n: int, depth: float, rng: random.Random, values: int = 4) -> Prompt:
    key = word_key(rng)
    vals = distinct(lambda: magic_number(rng), values)
    needles = [(needle_position(n, depth), NIAH_NEEDLE.format(key=key, value=vals[0]))]
    needles += [(rng.randint(0, n), NIAH_NEEDLE.format(key=key, value=v)) for v in vals[1:]]
    return Prompt(niah_prompt(haystack(n, needles), key, values), vals)


def build_vartrack(n: int, depth: float, rng: random.Random, hops: int = 4) -> Prompt:
    names = distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), hops + 1)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
    start = needle_position(n, depth)
    positions = [start] + sorted(rng.randint(start, n) for _ in range(hops))  # in order: the chain resolves
    context = haystack(n, list(zip(positions, chain)))
    return Prompt(VT_TEMPLATE.format(context=context, query=value, num_v=hops + 1), names)


TASKS: dict[str, Task] = {
    "passkey": Task(build_passkey, passkey_score, 0, "passkey retrieval (evaluate.passkey, as a task)"),
    "multikey": Task(build_multikey, string_match_all, 128,
                     "multi-key needle (RULER niah_multikey_1): 4 keys in the haystack, retrieve one's value"),
    "multivalue": Task(build_multivalue, string_match_all, 128,
                       "multi-value needle (RULER niah_multivalue): retrieve all 4 values of one key"),
    "vartrack": Task(build_vartrack, string_match_all, 30,
                     "variable tracking (RULER vt): all names a chain of 4 assignments gives one value"),
}


# ---------------------------------------------------------------------------------------------------------------
# Prompts of a length, the evaluation loop

def trial_rng(name: str, seed: int, length: int, depth: float, trial: int) -> random.Random:
    """The same draws for the same (task, seed, length, depth, trial) on every run; passkey's are
    evaluate.passkey_key's, each other task has its own."""
    return random.Random(f"{seed}:{length}:{depth}:{trial}" if name == "passkey" else
                         f"{name}:{seed}:{length}:{depth}:{trial}")


def task_prompt(name: str, tokenizer, length: int, depth: float, seed: int = 0, trial: int = 0) -> dict:
    """The longest prompt of task `name` of at most `length` tokens (special tokens included):
    {text, input_ids, answers, tokens, filler}."""
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"--depths: every depth must be in [0, 1] (0 = right after the task, 1 = right before the "
                          f"question), got {depth}")
    task = TASKS[name]

    def build(n: int) -> Prompt:
        return task.build(n, depth, trial_rng(name, seed, length, depth, trial))

    n = ev.longest_filler(lambda n: len(tokenizer(build(n).text).input_ids), length, name)
    prompt = build(n)
    ids = tokenizer(prompt.text).input_ids
    return {"text": prompt.text, "input_ids": ids, "answers": prompt.answers, "tokens": len(ids), "filler": n}


def new_tokens(name: str, tokenizer, answers: list[str]) -> int:
    """RULER's budget, or enough new tokens for the answers written out however the tokenizer splits them."""
    written = len(tokenizer(" " + ", ".join(answers) + ".", add_special_tokens=False).input_ids)
    return max(TASKS[name].tokens_to_generate, written + 2 * len(answers))


def evaluate_task(name: str, model, tokenizer, lengths: list[int], depths: list[float], trials: int = 5,
                  seed: int = 0) -> dict:
    """Accuracy (mean score) of task `name` for every (length, depth): {task, lengths, depths, trials, seed, cells},
    cells as evaluate.passkey's, with each trial's expected answers, generated text and score."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    ev.check_grid(depths, trials)
    if hasattr(model, "eval"):
        model.eval()
    cells = []
    for L in lengths:
        for d in depths:
            total, correct, tokens, answers = 0.0, 0, 0, []
            for t in tqdm(range(trials), desc=f"{name}@{L} depth {d}", leave=False):
                prompt = task_prompt(name, tokenizer, L, d, seed, t)
                answer = ev.passkey_answer(model, tokenizer, prompt["input_ids"],
                                           new_tokens(name, tokenizer, prompt["answers"]))
                score = TASKS[name].score(answer, prompt["answers"])
                total += score
                correct += score == 1.0
                tokens += prompt["tokens"]
                answers.append({"expected": prompt["answers"], "answer": answer, "score": score})
            cells.append({"length": L, "depth": d, "accuracy": total / trials, "correct": correct, "trials": trials,
                          "mean_tokens": tokens / trials, "answers": answers})
    return {"task": name, "lengths": list(lengths), "depths": list(depths), "trials": trials, "seed": seed,
            "cells": cells}


# ---------------------------------------------------------------------------------------------------------------
# CLI: `longctx eval multikey|multivalue|vartrack`, the flags of `longctx eval passkey`

def cmd_task(args) -> int:
    rope, method = ev.rope_overrides(args.rope), ev.method_arg(args.method)
    for d in args.depths:  # before the model loads
        if not 0.0 <= d <= 1.0:
            raise ConfigError(f"--depths: every depth must be in [0, 1] (0 = right after the task, 1 = right before "
                              f"the question), got {d:g}")
    out = ev.out_dir(args.out)
    model, tokenizer, label = ev.load_for_eval(args.model, rope=rope, dtype=args.dtype, method=method)
    result = {"model": label, **evaluate_task(args.task, model, tokenizer, args.lengths, args.depths, args.trials,
                                              args.seed)}
    ev.write_passkey(result, out, args.task)
    print((out / f"{args.task}.md").read_text())
    return 0


def add_parsers(esub) -> None:
    from longctx.cli import number

    for name, task in TASKS.items():
        if name == "passkey":  # `longctx eval passkey` is evaluate's own command
            continue
        k = esub.add_parser(name, help=task.help)
        k.add_argument("--model", required=True, help="RUN/final, an exported dir, or a base model")
        k.add_argument("--lengths", type=ev.lengths_arg, required=True, help="prompt lengths in tokens, e.g. 256,1024")
        k.add_argument("--depths", type=ev.depths_arg, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                       help="positions of the target needle in [0, 1] (default 0,0.25,0.5,0.75,1)")
        k.add_argument("--trials", type=number(int, 1), default=5, help="prompts per (length, depth) (default 5)")
        k.add_argument("--seed", type=number(int, 0), default=0, help="seed of the keys, values and positions")
        k.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        ev.add_method_args(k)
        k.add_argument("--out", required=True, help=f"output directory ({name}.json, {name}.md, {name}.png)")
        k.set_defaults(func=cmd_task, task=name)
