"""Per-position loss: the mean next-token loss at each position of long documents, which shows whether a model uses
tokens far back (a model that does keeps lowering its loss with position; one that does not flattens out, or rises
past its context window).

    longctx eval position-loss --model data/tiny-base runs/x/final --length 1024 --out runs/x/eval

The metric: the documents of --data (the validation part of builtin sources, as `longctx eval ppl`), tokenized as
for training (no special tokens), each one alone; those with at least `length` tokens, in order, at most
--max-docs of them. One forward per document over its first `length` tokens, dense causal attention (eval mode);
the loss at position p (1 <= p < length) is the cross-entropy of token p given tokens 0..p-1, in nats, averaged
over the documents. A document is never packed with another, so position p has exactly p tokens of its own
context. The plot averages positions in buckets of --bucket tokens (default length / 32).

Writes position_loss.json ({model: {length, documents, bucket, loss (per position 1..length-1), buckets}}) and
position_loss.png (one line per model).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from longctx import rundir
from longctx.config import ConfigError
from longctx.loss import token_nll


def long_documents(source, tokenizer, length: int, split: str | None = None, max_docs: int | None = None,
                   text_field: str = "text") -> list[torch.Tensor]:
    """The first `length` tokens of each document of `source` that has at least that many (at most `max_docs`)."""
    from longctx.data import load_texts, tokenize_documents

    texts = load_texts(source, split, text_field)
    docs = tokenize_documents(texts, tokenizer, None)["input_ids"]
    kept = [torch.tensor(d[:length], dtype=torch.long) for d in docs if len(d) >= length][:max_docs]
    if not kept:
        longest = max((len(d) for d in docs), default=0)
        raise ConfigError(f"--data: no document of {source} has {length} tokens (the longest has {longest}); give "
                          "a shorter --length or longer documents")
    return kept


@torch.no_grad()
def position_loss(model, docs: list[torch.Tensor], desc: str | None = None) -> list[float]:
    """Mean cross-entropy at positions 1..n-1 over documents of n tokens each (index i: position i + 1)."""
    if len({d.numel() for d in docs}) != 1 or docs[0].numel() < 2:
        raise ValueError("position_loss needs documents of one length >= 2")
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(docs[0].numel() - 1, dtype=torch.float64)
    for ids in tqdm(docs, desc=desc or "position loss", leave=False):
        ids = ids.to(device)[None]
        total += token_nll(model, ids)[0].double().cpu()  # without all logits at once (longctx/loss.py)
    return (total / len(docs)).tolist()


def buckets(loss: list[float], size: int) -> list[dict]:
    """Positions [start, end) in buckets of `size` (the last may be shorter) with their mean loss; loss[i] is at
    position i + 1."""
    out = []
    for i in range(0, len(loss), size):
        part = loss[i:i + size]
        out.append({"start": i + 1, "end": i + 1 + len(part), "loss": sum(part) / len(part)})
    return out


def write_position_loss(results: dict[str, dict], out: Path) -> None:
    """position_loss.png (mean loss per bucket against position, one line per model), then position_loss.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot([(b["start"] + b["end"] - 1) / 2 for b in r["buckets"]], [b["loss"] for b in r["buckets"]],
                marker=".", label=f"{name} ({r['documents']} docs)")
    ax.set_xlabel("token position")
    ax.set_ylabel("mean loss (nats)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("loss by position", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "position_loss.png", dpi=120)
    plt.close(fig)
    rundir.write_atomic(out / "position_loss.json", json.dumps(results, indent=1))


def cmd_position_loss(args) -> int:
    from longctx import evaluate as ev

    rope, method = ev.rope_overrides(args.rope), ev.method_arg(args.method)
    out = ev.out_dir(args.out)
    bucket = args.bucket or max(1, args.length // 32)
    results, docs = {}, None
    for path in args.model:
        model, tokenizer, label = ev.load_for_eval(path, rope=rope, dtype=args.dtype, method=method)
        if docs is None:
            split = args.split or ("validation" if args.data.startswith("builtin:") else None)
            docs = long_documents(args.data, tokenizer, args.length, split, args.max_docs)
        loss = position_loss(model, docs, desc=f"{label} position loss")
        results[label] = {"length": args.length, "documents": len(docs), "bucket": bucket, "loss": loss,
                          "buckets": buckets(loss, bucket)}
        del model
    write_position_loss(results, out)
    for label, r in results.items():
        print(f"{label}: " + ", ".join(f"{b['start']}-{b['end'] - 1}: {b['loss']:.3f}" for b in r["buckets"]))
    return 0


def add_parser(esub) -> None:
    from longctx import evaluate as ev
    from longctx.cli import number

    p = esub.add_parser("position-loss", help="mean loss at each token position over long documents")
    p.add_argument("--model", nargs="+", required=True, help="RUN/final, an exported dir, or a base model")
    p.add_argument("--length", type=number(int, 2, ev.MAX_LENGTH), required=True,
                   help="tokens per document (documents shorter than this are left out)")
    p.add_argument("--data", default="builtin:python-stdlib",
                   help="evaluation source (default: the stdlib's validation part)")
    p.add_argument("--split", choices=["train", "validation"], default=None,
                   help="a deterministic part of --data; default: the validation part of builtin sources, the "
                        "whole of any other")
    p.add_argument("--max-docs", type=number(int, 1), default=None, help="at most this many documents (default all)")
    p.add_argument("--bucket", type=number(int, 1), default=None, help="positions per plotted bucket "
                                                                       "(default length / 32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_method_args(p)
    p.add_argument("--out", required=True, help="output directory (position_loss.json, position_loss.png)")
    p.set_defaults(func=cmd_position_loss)
