"""Long-context evaluation: perplexity against context length, with plots.

    longctx eval ppl --model runs/quickstart/final --lengths 256,512,1024 --out runs/quickstart/eval

The metric, defined once (Press et al. striding, as in transformers' perplexity guide):
- one token stream: the evaluation documents tokenized, EOS between them (the same packing as training);
- windows of exactly L tokens start at 0, S, 2S, ... (S = stride, default L); the model sees each window alone;
- the first window scores its L-1 next-token predictions; every later window scores only its last min(S, L-1)
  predictions, so each token is scored once and with as much context as the window gives;
- NLL is the token-weighted mean over all scored tokens, PPL = exp(NLL); `tokens` is how many were scored.
stride = L means non-overlapping windows. Evaluation always uses dense causal attention (model.eval()).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from longctx.config import ConfigError

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
        logits = model(input_ids=ids, use_cache=False).logits.float()
        for row, (_, n) in enumerate(batch):
            pred = logits[row, length - 1 - n:length - 1]
            target = ids[row, length - n:]
            nll_sum += F.cross_entropy(pred, target, reduction="sum").item()
            count += n
    nll = nll_sum / count
    return {"length": length, "stride": stride, "nll": nll, "ppl": math.exp(nll), "tokens": count,
            "windows": len(windows)}


def eval_tokens(source: str, tokenizer, max_length: int, text_field: str = "text", split: str = "validation",
                hub_config: str | None = None, hub_split: str = "validation") -> torch.Tensor:
    """The evaluation token stream: documents packed exactly as for training, flattened."""
    from longctx import data as data_lib

    ds = data_lib.build_pretrain_dataset(source, tokenizer, max_length, split=split, text_field=text_field,
                                         hub_config=hub_config, hub_split=hub_split)
    return torch.tensor(ds["input_ids"], dtype=torch.long).flatten()


# ---------------------------------------------------------------------------------------------------------------
# Loading what to evaluate

def load_for_eval(path: str, rope: dict | None = None, dtype: str = "float32"):
    """(model, tokenizer, label) from a run's final/ dir, an exported HF dir, or a base model (+ rope overrides)."""
    import longctx
    from longctx import model as model_lib

    p = Path(path)
    info_path = p / "longctx.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        base = model_lib.load_model(info["base_model"], dtype=dtype, gguf_file=info.get("gguf_file"))
        model = base
        if info.get("lora"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, str(p))
        extras = p / "trainable_params.safetensors"
        if extras.is_file():
            from safetensors.torch import load_file

            model_lib.load_trainable_state_dict(model, load_file(str(extras)))
        user_rope = {k: v for k, v in (info.get("rope") or {}).items() if k not in ("head_dim",
                                                                                  "partial_rotary_factor")}
        longctx.apply(model, rope=rope or user_rope or None)
        tokenizer = model_lib.load_tokenizer(str(p))
        return model.eval(), tokenizer, p.parent.name + "/" + p.name
    if not p.exists() and ("/" not in path or path.startswith((".", "/"))):
        raise ConfigError(f"--model: {path} does not exist (expected a run's final/ directory, an exported model "
                          "directory, a .gguf file or a hub id)")
    model = model_lib.load_model(path, dtype=dtype)
    if rope:
        longctx.apply(model, rope=rope)
    tokenizer = model_lib.load_tokenizer(path)
    label = p.name + (f" {rope.get('rope_type')} x{rope.get('factor', '')}" if rope else "")
    return model.eval(), tokenizer, label


# ---------------------------------------------------------------------------------------------------------------
# Reports

def write_ppl(results: dict[str, list[dict]], out: Path) -> None:
    """ppl.json, ppl.md (a table) and ppl.png (PPL vs length, log scale, one line per model)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppl.json").write_text(json.dumps(results, indent=1))
    lengths = sorted({r["length"] for rows in results.values() for r in rows})
    lines = ["| model | " + " | ".join(f"PPL@{L}" for L in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name, rows in results.items():
        by_len = {r["length"]: r["ppl"] for r in rows}
        lines.append(f"| {name} | " + " | ".join(f"{by_len[L]:.3f}" if L in by_len else "-" for L in lengths) + " |")
    (out / "ppl.md").write_text("\n".join(lines) + "\n")
    plot_ppl(results, out / "ppl.png")


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


def eval_run(cfg, final: Path) -> dict:
    """After training: PPL of the base (unscaled) and of RUN/final at eval.lengths -> RUN/eval/."""
    source = cfg.data.eval or cfg.data.train
    split = "train" if cfg.data.eval else "validation"
    results = {}
    tokens = None
    for label, path in (("base", cfg.model.name_or_path), ("extended", str(final))):
        model, tokenizer, _ = load_for_eval(path, dtype=cfg.model.dtype)
        if tokens is None:
            tokens = eval_tokens(source, tokenizer, max(cfg.eval.lengths), text_field=cfg.data.text_field,
                                 split=split, hub_config=cfg.data.hub_config, hub_split=cfg.data.hub_split)
        results[label] = [perplexity(model, tokens, L, cfg.eval.stride, max_tokens=cfg.eval.max_tokens,
                                     desc=f"{label} ppl@{L}") for L in cfg.eval.lengths]
    out = Path(cfg.train.output_dir) / "eval"
    write_ppl(results, out)
    log.info("perplexity:\n%s", (out / "ppl.md").read_text())
    return results


# ---------------------------------------------------------------------------------------------------------------
# CLI

def _lengths(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"lengths must be integers >= 2, got {text!r}")
    return values


def cmd_ppl(args) -> int:
    from longctx.config import RopeConfig, _apply_override
    from pydantic import ValidationError

    rope = None
    if args.rope:
        raw: dict = {}
        for item in args.rope:
            _apply_override(raw, item if item.startswith("rope.") else "rope." + item)
        try:
            rope = RopeConfig.model_validate(raw["rope"]).model_dump(exclude_none=True)
        except ValidationError as e:
            raise ConfigError(f"--rope: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None
    results = {}
    tokens = None
    for path in args.model:
        model, tokenizer, label = load_for_eval(path, rope=rope, dtype=args.dtype)
        if tokens is None:
            tokens = eval_tokens(args.data, tokenizer, max(args.lengths), split=args.split)
        results[label] = [perplexity(model, tokens, L, args.stride, args.batch_size, args.max_tokens)
                          for L in args.lengths]
    for extra in args.add or []:
        results.update(json.loads(Path(extra).read_text()))
    write_ppl(results, Path(args.out))
    print((Path(args.out) / "ppl.md").read_text())
    return 0


def add_parsers(sub) -> None:
    e = sub.add_parser("eval", help="evaluate: perplexity vs length")
    esub = e.add_subparsers(dest="eval_command", required=True)
    p = esub.add_parser("ppl", help="perplexity at several context lengths")
    p.add_argument("--model", nargs="+", required=True, help="RUN/final, an exported dir, or a base model")
    p.add_argument("--lengths", type=_lengths, required=True, help="e.g. 256,512,1024")
    p.add_argument("--data", default="builtin:python-stdlib", help="evaluation source (default: stdlib validation)")
    p.add_argument("--split", default="validation")
    p.add_argument("--stride", type=int, default=None, help="scored tokens per window after the first (default L)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=None, help="scored-token budget per length")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rope", nargs="*", help="rope overrides for a base model, e.g. rope_type=yarn factor=4")
    p.add_argument("--add", nargs="*", help="earlier ppl.json files to draw on the same plot")
    p.add_argument("--out", required=True, help="output directory (ppl.json, ppl.md, ppl.png)")
    p.set_defaults(func=cmd_ppl)
