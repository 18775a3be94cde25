"""Long-context evaluation: perplexity against context length, passkey retrieval, with plots.

    longctx eval ppl --model runs/quickstart/final --lengths 256,512,1024 --out runs/quickstart/eval
    longctx eval passkey --model runs/quickstart/final --lengths 256,512,1024 --trials 5 --out runs/quickstart/eval

The metric, defined once (Press et al. striding, as in transformers' perplexity guide):
- one token stream: the evaluation documents tokenized, EOS between them (the same packing as training);
- windows of exactly L tokens start at 0, S, 2S, ... (S = stride, default L); the model sees each window alone;
- the first window scores its L-1 next-token predictions; every later window scores only its last min(S, L-1)
  predictions, so each token is scored once and with as much context as the window gives;
- NLL is the token-weighted mean over all scored tokens, PPL = exp(NLL); `tokens` is how many were scored.
stride = L means non-overlapping windows. Evaluation always uses dense causal attention (model.eval()).

Passkey retrieval (Landmark Attention / LongLoRA): a task sentence, filler sentences, "The pass key is K. Remember
it. K is the pass key." after the filler sentence nearest the chosen depth, then "What is the pass key? The pass
key is"; K is 5 random digits (seeded). The prompt is as long as the target length in the model's own tokens, to
within one filler sentence and never longer; greedy decoding; correct iff the first number generated is K.

During training (`eval.lengths`, `eval.every`): `training_callback` logs ppl@L every `eval.every` steps and at the
last step to the trainer's loggers; `eval_run` then writes RUN/eval/ for the base and the final model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
from pathlib import Path

import torch
from tqdm import tqdm

from longctx import dist, rundir
from longctx.config import MAX_LENGTH, ConfigError
from longctx.loss import token_nll

log = logging.getLogger("longctx")


# ---------------------------------------------------------------------------------------------------------------
# The metric

def window_targets(n_tokens: int, length: int, stride: int) -> list[tuple[int, int]]:
    """(window start, number of scored predictions at its end) for every full window over `n_tokens` tokens."""
    if length < 2 or stride < 1:
        raise ConfigError(f"--lengths must be >= 2 and --stride >= 1, got length {length}, stride {stride}")
    out = []
    for i, start in enumerate(range(0, n_tokens - length + 1, stride)):
        out.append((start, length - 1 if i == 0 else min(stride, length - 1)))
    return out


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, length: int, stride: int | None = None, batch_size: int = 1,
               max_tokens: int | None = None, desc: str | None = None) -> dict:
    """{length, stride, nll, ppl, tokens, windows} of a causal LM over a 1-D token stream (see module doc)."""
    stride = stride or length
    if tokens.numel() < length:
        raise ConfigError(f"the evaluation data has {tokens.numel()} tokens, fewer than one window of {length}")
    windows = window_targets(tokens.numel(), length, stride)
    if max_tokens:  # a budget for quick runs: keep the first windows until the scored tokens reach it
        kept, scored = [], 0
        for w in windows:
            if scored >= max_tokens:
                break
            kept.append(w)
            scored += w[1]
        windows = kept
    model.eval()
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    for b in tqdm(range(0, len(windows), batch_size), desc=desc or f"ppl@{length}", leave=False):
        batch = windows[b:b + batch_size]
        ids = torch.stack([tokens[s:s + length] for s, _ in batch]).to(device)
        nll = token_nll(model, ids)  # [B, length - 1]: position t predicts ids[t + 1]
        for row, (_, n) in enumerate(batch):
            nll_sum += nll[row, length - 1 - n:].double().sum().item()
            count += n
    nll = nll_sum / count
    return {"length": length, "stride": stride, "nll": nll, "ppl": math.exp(nll), "tokens": count,
            "windows": len(windows)}


def eval_tokens(source, tokenizer, max_length: int, text_field: str = "text", split: str | None = "validation",
                hub_config: str | None = None, hub_split: str = "validation", suffixes=None) -> torch.Tensor:
    """The evaluation token stream: documents packed exactly as for training, flattened. `source`: one or several
    (one after the other); `split`: None for the whole, "train"/"validation" for the deterministic parts
    (longctx.data.split)."""
    from longctx import data as data_lib

    ds = data_lib.build_pretrain_dataset(source, tokenizer, max_length, split=split, text_field=text_field,
                                         hub_config=hub_config, hub_split=hub_split, suffixes=suffixes, mix=False)
    return torch.tensor(ds["input_ids"], dtype=torch.long).flatten()


# ---------------------------------------------------------------------------------------------------------------
# Passkey retrieval

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_key(seed: int, length: int, depth: float, trial: int) -> str:
    """The 5-digit key of one trial: the same for the same (seed, length, depth, trial) on every run."""
    return str(random.Random(f"{seed}:{length}:{depth}:{trial}").randint(10000, 99999))


def passkey_parts(n: int, depth: float, key: str) -> tuple[str, str]:
    """(text before the key line, text from the key line on) with n filler sentences, the key after
    round(depth * n) of them."""
    k = round(depth * n)
    filler = [PASSKEY_FILLER[i % len(PASSKEY_FILLER)] for i in range(n)]
    before = "\n".join(x for x in (PASSKEY_TASK, " ".join(filler[:k])) if x) + "\n"
    after = "\n".join(x for x in (PASSKEY_LINE.format(key=key), " ".join(filler[k:]), PASSKEY_QUESTION) if x)
    return before, after


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> dict:
    """The longest passkey prompt of at most `length` tokens (as the model sees it, special tokens included).

    Returns {text, input_ids, key, tokens, filler (sentences), key_sentence (filler sentences before the key),
    key_start (token index where the key line starts)}. It is `length` tokens to within one filler sentence.
    """
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"--depths: every depth must be in [0, 1] (0 = right after the task, 1 = right before the "
                          f"question), got {depth}")

    n = longest_filler(lambda n: len(tokenizer("".join(passkey_parts(n, depth, key))).input_ids), length)
    before, after = passkey_parts(n, depth, key)
    ids = tokenizer(before + after).input_ids
    return {"text": before + after, "input_ids": ids, "key": key, "tokens": len(ids), "filler": n,
            "key_sentence": round(depth * n), "key_start": len(tokenizer(before).input_ids)}


def longest_filler(count, length: int, what: str = "passkey") -> int:
    """The largest number n of filler sentences whose prompt takes count(n) <= `length` tokens (every prompt of
    longctx.tasks is fitted here too; `what` names the prompt in the error)."""
    empty = count(0)
    if empty > length:
        raise ConfigError(f"--lengths: {length} tokens cannot hold the {what} prompt, which is {empty} tokens "
                          "without any filler")
    per = (count(10 * len(PASSKEY_FILLER)) - empty) / (10 * len(PASSKEY_FILLER))  # tokens per filler sentence
    n, seen = max(0, int((length - empty) / per)), set()
    while n not in seen:  # Newton steps on the exact count, then +-1 to the largest n that fits
        seen.add(n)
        n = max(0, n + math.floor((length - count(n)) / per))
    while n > 0 and count(n) > length:
        n -= 1
    while count(n + 1) <= length:
        n += 1
    return n


def passkey_correct(generated: str, key: str) -> bool:
    """Exact match: the first number in the generated text is the key."""
    m = re.search(r"\d+", generated)
    return m is not None and m.group() == key


@torch.no_grad()
def passkey_answer(model, tokenizer, input_ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of the prompt, decoded. `model` needs only `generate` (and optionally `device`)."""
    ids = torch.tensor([input_ids], device=getattr(model, "device", None) or "cpu")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def check_grid(depths: list[float], trials: int) -> None:
    """The depth x trials grid of a retrieval evaluation (passkey, the RULER tasks): ConfigError naming the flag."""
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if not depths:
        raise ConfigError("--depths: give at least one depth in [0, 1]")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ConfigError(f"--depths: every depth must be in [0, 1], got {d}")


def passkey(model, tokenizer, lengths: list[int], depths: list[float], trials: int = 5, seed: int = 0) -> dict:
    """Passkey accuracy for every (length, depth): {lengths, depths, trials, seed, cells: [...]}."""
    check_grid(depths, trials)
    if hasattr(model, "eval"):
        model.eval()
    cells = []
    for L in lengths:
        for d in depths:
            correct, tokens, answers = 0, 0, []
            for t in tqdm(range(trials), desc=f"passkey@{L} depth {d}", leave=False):
                key = passkey_key(seed, L, d, t)
                prompt = passkey_prompt(tokenizer, L, d, key)
                # enough new tokens for " KEY." however the tokenizer splits digits
                n_new = len(tokenizer(" " + key + ".", add_special_tokens=False).input_ids) + 2
                answer = passkey_answer(model, tokenizer, prompt["input_ids"], n_new)
                correct += passkey_correct(answer, key)
                tokens += prompt["tokens"]
                answers.append({"key": key, "answer": answer})
            cells.append({"length": L, "depth": d, "accuracy": correct / trials, "correct": correct,
                          "trials": trials, "mean_tokens": tokens / trials, "answers": answers})
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "seed": seed, "cells": cells}


# ---------------------------------------------------------------------------------------------------------------
# Loading what to evaluate

def load_for_eval(path: str, rope: dict | None = None, dtype: str = "float32", device: str | None = None,
                  method: dict | None = None):
    """(model, tokenizer, label) from a run's final/ dir, an exported HF dir, or a base model (+ rope overrides and
    a training-free method). Every eval command, `longctx generate` and the benchmarks load through here.

    A run's final/ is rebuilt as it was trained: the base model (never 4-bit: a QLoRA run is rebuilt on the
    16-bit/float32 base), its LoRA adapter, the embed/norm weights, the rope scaling and a method trained with
    (log-n) from longctx.json. A full fine-tuning run's final/ holds the whole model. `method` comes on top (the
    returned "model" is then what the method evaluates with: the patched model, or NBCE's runner). On the GPU
    when there is one (`device` overrides).
    """
    from longctx import model as model_lib
    from longctx.patch import check_supported

    device = device or dist.local_device()
    p = Path(path)
    info_path = rundir.info_path(p)
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("lora"):
            from peft import PeftModel

            base_model = base_model_path(p, info)
            check_supported(model_lib.read_config(base_model, info.get("gguf_file"),
                                                  key=f"{info_path}: base_model"))
            base = model_lib.load_model(base_model, dtype=dtype, gguf_file=info.get("gguf_file"))
            model = PeftModel.from_pretrained(base, str(p))
        else:  # full fine-tuning: final/ holds every weight
            check_supported(model_lib.read_config(str(p), key="--model"))
            model = model_lib.load_model(str(p), dtype=dtype)
        extras = p / rundir.TRAINABLE
        if extras.is_file():
            from safetensors.torch import load_file

            model_lib.load_trainable_state_dict(model, load_file(str(extras)))
        user_rope = {k: v for k, v in (info.get("rope") or {}).items() if k not in ("head_dim",
                                                                                  "partial_rotary_factor")}
        if not info.get("lora") and getattr(model.config, "rope_parameters", None) == info.get("rope_parameters"):
            user_rope = {}  # a full fine-tuning's config.json already carries the scaling: applying it again would
            #                 compose it on itself (and be refused as "does not go beyond" the native one)
        tokenizer = model_lib.load_tokenizer(str(p))
        runner = apply_methods(model, rope or user_rope or None, [method, info.get("method")], tokenizer,
                               always=True)
        return runner.to(device).eval(), tokenizer, p.parent.name + "/" + p.name + _method_label(method)
    if not p.exists() and not model_lib.is_hub_id(path):
        raise ConfigError(f"--model: {path} does not exist (expected a run's final/ directory, an exported model "
                          "directory, a .gguf file or a hub id)")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"--model: {path} is a directory without config.json or longctx.json (expected a run's "
                          "final/ directory or a Hugging Face model directory)")
    if rope or path.endswith(".gguf"):  # a model longctx patches must be of a family it supports; a GGUF is read
        config = model_lib.read_config(path, key="--model")  # here so that a truncated one exits 2
        if rope:
            check_supported(config)
    try:
        model = model_lib.load_model(path, dtype=dtype)
    except OSError as e:
        if p.exists():
            raise
        raise ConfigError(f"--model: {path} is not a local path and could not be loaded from the hub: {e}") from None
    tokenizer = model_lib.load_tokenizer(path)
    runner = apply_methods(model, rope, [method], tokenizer)
    label = p.name + (f" {rope.get('rope_type')} x{rope.get('factor', '')}" if rope else "") + _method_label(method)
    return runner.to(device).eval(), tokenizer, label


def apply_methods(model, rope: dict | None, methods: list, tokenizer, always: bool = False):
    """Apply the rope scaling and the methods (a CLI method and one trained with; logn last, since it wraps the
    attention selected before it) to `model`; what to evaluate with. `always`: call `longctx.apply` even with
    nothing to apply (a run's model gets what longctx gives every model it trains, e.g. MPT past max_seq_len)."""
    import longctx

    always = always or getattr(model.config, "model_type", None) == "mpt"  # past max_seq_len: ALiBi, not an error
    specs = [m for m in methods if m]
    specs = [m for i, m in enumerate(specs) if m not in specs[:i]]
    specs.sort(key=lambda m: m["name"] == "logn")
    if not specs:
        handles = [longctx.apply(model, rope=rope)] if rope or always else []
    else:  # the rope goes with the first method: rerope rotates with the scaled frequencies
        handles = [longctx.apply(model, rope=rope, method=specs[0])]
        handles += [longctx.apply(model, method=m) for m in specs[1:]]
    for h in handles:
        runner = h.runner(tokenizer)
        if runner is not model:
            return runner
    return model


def _method_label(method) -> str:
    from longctx import methods

    if not method:
        return ""
    d = methods.parse(method).model_dump(exclude_none=True)  # every key, defaults included
    return " " + " ".join([d.pop("name")] + [f"{k}={v}" for k, v in d.items()])


def base_model_path(final: Path, info: dict) -> str:
    """The base model final/longctx.json records, found from any working directory. Runs record it absolute (or
    as a hub id); an older run's relative path is tried from the directory training ran in (longctx.json's cwd,
    or what train.output_dir says about it), then from here."""
    from longctx import model as model_lib

    base = info["base_model"]
    p = Path(base).expanduser()
    if p.is_absolute():
        return base
    tried = []
    for root in _training_dirs(final, info):
        if (root / p).exists():
            return str(root / p)
        tried.append(str(root / p))
    if p.exists() or model_lib.is_hub_id(base):
        return base
    raise ConfigError(f"{rundir.info_path(final)}: the base model {base!r} is a path relative to where training ran, "
                      f"and it is neither here nor at {', '.join(tried) or 'a recorded training directory'}; run from "
                      "that directory, or write the absolute path into base_model")


def _training_dirs(final: Path, info: dict) -> list[Path]:
    """Where training may have run: the recorded cwd, and RUN minus a relative train.output_dir (runs/x: RUN/../..)."""
    dirs = [Path(info["cwd"])] if info.get("cwd") else []
    out = Path(((info.get("config") or {}).get("train") or {}).get("output_dir") or "")
    run = Path(final).resolve().parent
    if out.parts and not out.is_absolute() and ".." not in out.parts and run.parts[-len(out.parts):] == out.parts:
        dirs.append(Path(*run.parts[:-len(out.parts)]))
    return dirs


# ---------------------------------------------------------------------------------------------------------------
# Reports

def write_ppl(results: dict[str, list[dict]], out: Path) -> None:
    """ppl.json, ppl.md (a table) and ppl.png (PPL vs length, log scale, one line per model)."""
    out.mkdir(parents=True, exist_ok=True)
    lengths = sorted({r["length"] for rows in results.values() for r in rows})
    lines = ["| model | " + " | ".join(f"PPL@{L}" for L in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name, rows in results.items():
        by_len = {r["length"]: r["ppl"] for r in rows}
        lines.append(f"| {name} | " + " | ".join(f"{by_len[L]:.3f}" if L in by_len else "-" for L in lengths) + " |")
    (out / "ppl.md").write_text("\n".join(lines) + "\n")
    plot_ppl(results, out / "ppl.png")
    rundir.write_atomic(out / "ppl.json", json.dumps(results, indent=1))  # last: present means the evaluation is done


def plot_ppl(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in results.items():
        rows = sorted(rows, key=lambda r: r["length"])
        ax.plot([r["length"] for r in rows], [r["ppl"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_passkey(result: dict, out: Path, name: str = "passkey") -> None:
    """passkey.json (accuracy per length and depth), passkey.md (a table) and passkey.png (a depth x length heatmap);
    `name` for the other tasks of longctx.tasks (multikey.json, ...)."""
    out.mkdir(parents=True, exist_ok=True)
    acc = {str(L): {str(d): c["accuracy"] for d in result["depths"] for c in result["cells"]
                    if c["length"] == L and c["depth"] == d} for L in result["lengths"]}
    by_length = {str(L): sum(v.values()) / len(v) for L, v in acc.items()}
    (out / f"{name}.json").write_text(json.dumps({**result, "accuracy": acc, "accuracy_by_length": by_length},
                                                 indent=1))
    lines = ["| depth | " + " | ".join(f"{L} tok" for L in result["lengths"]) + " |",
             "|---|" + "---|" * len(result["lengths"])]
    for d in result["depths"]:
        lines.append(f"| {d:g} | " + " | ".join(f"{acc[str(L)][str(d)]:.2f}" for L in result["lengths"]) + " |")
    lines.append("| all | " + " | ".join(f"{by_length[str(L)]:.2f}" for L in result["lengths"]) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot_passkey(result["lengths"], result["depths"], acc, out / f"{name}.png", result.get("model"), name)


def plot_passkey(lengths: list[int], depths: list[float], acc: dict, path: Path, title: str | None = None,
                 name: str = "passkey") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[acc[str(L)][str(d)] for L in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(f"{name} accuracy{': ' + title if title else ''}", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_eval_tokens(cfg, tokenizer) -> torch.Tensor:
    """The evaluation stream of a training config: data.eval whole, else the validation split of data.train (every
    source's, unweighted), which training holds out (trainer._dataset)."""
    d = cfg.data
    source, split = (d.eval, None) if d.eval else (d.train_sources(), "validation")
    return eval_tokens(source, tokenizer, max(cfg.eval.lengths), text_field=d.text_field, split=split,
                       hub_config=d.hub_config, hub_split=d.hub_split, suffixes=d.suffixes)


def eval_run(cfg, final: Path) -> dict:
    """After training: PPL of the base (unscaled) and of RUN/final at eval.lengths -> RUN/eval/ (rank 0 only)."""
    if not dist.is_main():
        return {}
    results = {}
    tokens = None
    for label, path in (("base", cfg.model.name_or_path), ("extended", str(final))):
        model, tokenizer, _ = load_for_eval(path, dtype=cfg.model.dtype)
        if tokens is None:
            tokens = run_eval_tokens(cfg, tokenizer)
        results[label] = [perplexity(model, tokens, L, cfg.eval.stride, max_tokens=cfg.eval.max_tokens,
                                     desc=f"{label} ppl@{L}") for L in cfg.eval.lengths]
        del model
    out = rundir.eval_dir(cfg.train.output_dir)
    write_ppl(results, out)
    log.info("perplexity:\n%s", (out / "ppl.md").read_text())
    return results


def training_callback(tokens, lengths: list[int], log_fn, every: int | None = None, stride: int | None = None,
                      max_tokens: int | None = None):
    """A TrainerCallback that logs ppl@L for each of `lengths` every `every` steps and at the last step through
    `log_fn` (Trainer.log: every logger). `tokens()` gives the evaluation stream; it is called before the first
    step, so data shorter than a window fails before any training.

    Every rank runs the same windows (under ZeRO-3 a forward is collective); Trainer's loggers report from rank 0.
    """
    from transformers import TrainerCallback

    class PerplexityDuringTraining(TrainerCallback):
        def __init__(self):
            self.tokens = None

        def on_train_begin(self, args, state, control, **kwargs):
            if self.tokens is None:  # fails before the first step if the data is too short for a window
                self.tokens = tokens()
                if self.tokens.numel() < max(lengths):
                    raise ConfigError(f"eval.lengths: the evaluation data has {self.tokens.numel()} tokens, fewer "
                                      f"than one window of {max(lengths)}")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            last = step >= state.max_steps
            if not (last or (every and step % every == 0)):
                return
            was_training = model.training
            try:
                logs = {f"ppl@{L}": perplexity(model, self.tokens, L, stride, max_tokens=max_tokens,
                                               desc=f"step {step} ppl@{L}")["ppl"] for L in lengths}
            finally:
                model.train(was_training)
            if dist.is_main():
                log.info("step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in logs.items()))
            should_log = control.should_log
            log_fn(logs)
            control.should_log = should_log  # Trainer.log clears it: this step's loss would go unlogged

    return PerplexityDuringTraining()


# ---------------------------------------------------------------------------------------------------------------
# CLI

def lengths_arg(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(not 2 <= v <= MAX_LENGTH for v in values):
        raise argparse.ArgumentTypeError(f"lengths must be integers in [2, {MAX_LENGTH}], got {text!r}")
    return values


def rope_overrides(items: list[str] | None) -> dict | None:
    """--rope rope_type=yarn factor=4 -> a validated rope dict (the rope.* keys of the config)."""
    from longctx import rope as rope_registry
    from longctx.config import apply_override

    if not items:
        return None
    raw: dict = {}
    for item in items:
        apply_override(raw, item if item.startswith("rope.") else "rope." + item)
    try:
        return rope_registry.as_dict(rope_registry.parse(raw["rope"], prefix="--rope "))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def method_arg(tokens: list[str] | None) -> dict | None:
    """--method NAME key=value ... -> a validated method dict (the config's method section)."""
    from longctx import methods

    if not tokens:
        return None
    try:
        return methods.parse_cli(tokens).model_dump(exclude_none=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def add_method_args(p) -> None:
    """--rope and --method, the same on every command that loads a model for evaluation or generation."""
    from longctx import methods

    p.add_argument("--rope", nargs="*", help="rope overrides for a base model, e.g. rope_type=yarn factor=4")
    p.add_argument("--method", nargs="+", metavar="NAME [KEY=VALUE ...]",
                   help=f"a training-free method: {', '.join(methods.METHODS)} (e.g. rerope window=64)")


def _earlier_results(paths: list[str] | None) -> dict:
    """--add: earlier ppl.json files, read before any model loads."""
    results = {}
    for extra in paths or []:
        try:
            rows = json.loads(Path(extra).read_text())
        except OSError as e:
            raise ConfigError(f"--add: cannot read {extra}: {e.strerror or e}") from None
        except ValueError:
            raise ConfigError(f"--add: {extra} is not JSON (expected a ppl.json written by longctx eval ppl)") from None
        if not isinstance(rows, dict) or not all(isinstance(v, list) and all(isinstance(r, dict) and "length" in r
                                                                            and "ppl" in r for r in v)
                                                 for v in rows.values()):
            raise ConfigError(f"--add: {extra} is not a ppl.json ({{model: [{{length, ppl, ...}}]}})")
        results.update(rows)
    return results


def out_dir(out: str) -> Path:
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    return Path(out)


def cmd_ppl(args) -> int:
    rope, method = rope_overrides(args.rope), method_arg(args.method)
    earlier, out = _earlier_results(args.add), out_dir(args.out)
    results = {}
    tokens = None
    for path in args.model:
        model, tokenizer, label = load_for_eval(path, rope=rope, dtype=args.dtype, method=method)
        if tokens is None:
            split = args.split or ("validation" if args.data[0].startswith("builtin:") else None)
            tokens = eval_tokens(args.data if len(args.data) > 1 else args.data[0], tokenizer, max(args.lengths),
                                 split=split, suffixes=args.suffixes)
        results[label] = [perplexity(model, tokens, L, args.stride, args.batch_size, args.max_tokens)
                          for L in args.lengths]
    results.update(earlier)
    write_ppl(results, out)
    print((out / "ppl.md").read_text())
    return 0


def depths_arg(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None


def cmd_passkey(args) -> int:
    rope, method = rope_overrides(args.rope), method_arg(args.method)
    for d in args.depths:  # before the model loads
        if not 0.0 <= d <= 1.0:
            raise ConfigError(f"--depths: every depth must be in [0, 1] (0 = right after the task, 1 = right before "
                              f"the question), got {d:g}")
    out = out_dir(args.out)
    model, tokenizer, label = load_for_eval(args.model, rope=rope, dtype=args.dtype, method=method)
    result = {"model": label, **passkey(model, tokenizer, args.lengths, args.depths, args.trials, args.seed)}
    write_passkey(result, out)
    print((out / "passkey.md").read_text())
    return 0


def add_parsers(sub) -> None:
    from longctx.cli import number

    e = sub.add_parser("eval", help="evaluate: perplexity vs length, passkey and RULER retrieval tasks, "
                                    "per-position loss")
    esub = e.add_subparsers(dest="eval_command", required=True)
    p = esub.add_parser("ppl", help="perplexity at several context lengths")
    p.add_argument("--model", nargs="+", required=True, help="RUN/final, an exported dir, or a base model")
    p.add_argument("--lengths", type=lengths_arg, required=True, help="e.g. 256,512,1024")
    p.add_argument("--data", nargs="+", default=["builtin:python-stdlib"],
                   help="evaluation source(s), read one after the other (default: the stdlib's validation part)")
    p.add_argument("--split", choices=["train", "validation"], default=None,
                   help="a deterministic part of --data (README: validation split); default: the validation part "
                        "of builtin sources, the whole of any other")
    p.add_argument("--suffixes", nargs="+", default=None, help="file types read from a directory or glob of --data, "
                   "as data.suffixes: e.g. .py .md for a code repository (default .txt .jsonl .json .parquet)")
    p.add_argument("--stride", type=number(int, 1), default=None,
                   help="scored tokens per window after the first (default L)")
    p.add_argument("--batch-size", type=number(int, 1), default=1)
    p.add_argument("--max-tokens", type=number(int, 1), default=None, help="scored-token budget per length")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_method_args(p)
    p.add_argument("--add", nargs="*", help="earlier ppl.json files to draw on the same plot")
    p.add_argument("--out", required=True, help="output directory (ppl.json, ppl.md, ppl.png)")
    p.set_defaults(func=cmd_ppl)

    k = esub.add_parser("passkey", help="passkey retrieval accuracy by context length and key depth")
    k.add_argument("--model", required=True, help="RUN/final, an exported dir, or a base model")
    k.add_argument("--lengths", type=lengths_arg, required=True, help="prompt lengths in tokens, e.g. 256,512,1024")
    k.add_argument("--depths", type=depths_arg, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="key positions in [0, 1] (default 0,0.25,0.5,0.75,1)")
    k.add_argument("--trials", type=number(int, 1), default=5, help="keys per (length, depth) (default 5)")
    k.add_argument("--seed", type=number(int, 0), default=0, help="seed of the random keys")
    k.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_method_args(k)
    k.add_argument("--out", required=True, help="output directory (passkey.json, passkey.md, passkey.png)")
    k.set_defaults(func=cmd_passkey)

    from longctx import position_loss, tasks  # multikey, multivalue, vartrack; position-loss

    tasks.add_parsers(esub)
    position_loss.add_parser(esub)
