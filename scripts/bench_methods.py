"""Cost of the training-free methods (issue 13 §8): prefill and decode tokens/s against plain RoPE at the same
length, and how far cached decoding is from a full forward for transformers' dynamic NTK and consistent_dynamic.

    python scripts/bench_methods.py                                    # data/tiny-base -> benchmarks/methods.{json,md}
    python scripts/bench_methods.py --lengths 512 --decode-tokens 4 --repeats 1 --out /tmp/methods   # a smoke run

Every arm runs the same way: a prompt of L random tokens (batch 1), `generate` with 1 new token timed as the prefill
(tokens/s = L / t1) and with 1 + N new tokens (decode tokens/s = N / (t(1+N) - t1)), the median of --repeats after
one warm-up; greedy, no early stop. Arms: plain RoPE (the base as it is), transformers' `dynamic`, and every RoPE
method of longctx/methods with its defaults. Time it on a quiet machine: the numbers are wall clock.

Consistency: from a prompt of L/2 tokens, greedy cached decoding to 2L; at every step the largest |logit
difference| from a full forward (no cache) of the same prefix. With more than one layer neither is 0
(docs/design.md §5); tests/test_methods_dynamic.py shows consistent_dynamic exact for one layer.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine  # noqa: E402

from longctx import evaluate as ev  # noqa: E402
from longctx import families  # noqa: E402
from longctx.methods.nbce import NBCEModel  # noqa: E402

ARMS = {  # name -> (rope, method) for evaluate.load_for_eval
    "rope": (None, None),
    "hf-dynamic x4": ({"rope_type": "dynamic", "factor": 4.0}, None),
    "consistent_dynamic x4": (None, {"name": "consistent_dynamic", "factor": 4.0}),
    "rerope": (None, {"name": "rerope"}),
    "leaky_rerope": (None, {"name": "leaky_rerope"}),
    "logn": (None, {"name": "logn"}),
    "nbce": (None, {"name": "nbce"}),
}


def _generate(model, ids: torch.Tensor, new: int) -> float:
    kw = {"eos_token_id": -1} if isinstance(model, NBCEModel) else {"min_new_tokens": new}  # never stop early
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                       pad_token_id=0, **kw)
    return time.perf_counter() - t0


def speed(model, length: int, decode: int, repeats: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length))
    _generate(model, ids, 1 + decode)  # warm-up
    t1 = statistics.median(_generate(model, ids, 1) for _ in range(repeats))
    tn = statistics.median(_generate(model, ids, 1 + decode) for _ in range(repeats))
    return {"length": length, "prefill_s": t1, "prefill_tok_s": length / t1, "decode_tokens": decode,
            "decode_tok_s": decode / (tn - t1) if tn > t1 else None}  # None: lost in the noise (more --decode-tokens)


@torch.no_grad()
def consistency(model, original: int, vocab: int) -> float:
    """max over steps of max |cached step logits - full forward logits|, decoding from original/2 to 2 original."""
    ids = torch.randint(0, vocab, (1, original // 2), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, use_cache=True)
    worst, seq = 0.0, ids
    while seq.shape[1] < 2 * original:
        nxt = out.logits[:, -1:].argmax(-1)
        seq = torch.cat([seq, nxt], 1)
        out = model(input_ids=nxt, cache=out.cache, use_cache=True)
        full = model(input_ids=seq, use_cache=False).logits[:, -1]
        worst = max(worst, (out.logits[:, -1] - full).abs().max().item())
    return worst


def write(doc: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    plain = {r["length"]: r for r in doc["arms"].get("rope", [])}
    lines = ["# Training-free methods: cost against plain RoPE (issue 13 §8)", "",
             f"Command: `{doc['command']}`  ", f"Machine: {doc['machine']}  ",
             f"Model `{doc['model']}` (trained at {doc['original']} tokens), batch 1, greedy; prefill = a "
             f"`generate` call with 1 new token, decode = {doc['decode_tokens']} more tokens with the KV cache; median "
             f"of {doc['repeats']} after a warm-up.", "",
             "| arm | length | prefill tok/s | x plain | decode tok/s | x plain |", "|---|---|---|---|---|---|"]
    for name, rows in doc["arms"].items():
        for r in rows:
            p = plain.get(r["length"])
            rel = (lambda k: f"{r[k] / p[k]:.2f}" if p and r[k] and p[k] else "-")
            decode = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
            lines.append(f"| {name} | {r['length']} | {r['prefill_tok_s']:.0f} | {rel('prefill_tok_s')} | "
                         f"{decode} | {rel('decode_tok_s')} |")
    if doc.get("consistency"):
        lines += ["", "## Cached decoding against a full forward of the same prefix", "",
                  f"Greedy from {doc['original'] // 2} to {2 * doc['original']} tokens; the largest |logit difference| "
                  "over all steps (float32).", "", "| arm | max abs diff |", "|---|---|"]
        lines += [f"| {k} | {v:.3g} |" for k, v in doc["consistency"].items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[bench_methods] %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/tiny-base")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated: {', '.join(ARMS)}")
    ap.add_argument("--lengths", type=ev.lengths_arg, default=[1024, 2048, 4096])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/methods", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        print(f"error: --arms: unknown {', '.join(unknown)}; valid: {', '.join(ARMS)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    doc = {"command": "python " + " ".join(["scripts/bench_methods.py", *(sys.argv[1:] if argv is None else argv)]),
           "machine": machine(), "model": args.model, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
           "arms": {}, "consistency": {}}
    for name in (bar := tqdm(args.arms.split(","), desc="arms")):
        bar.set_postfix_str(name)
        rope, method = ARMS[name]
        model, tokenizer, _ = ev.load_for_eval(args.model, rope=rope, method=method)
        config = model.config
        doc["original"] = families.original_length(config)
        doc["arms"][name] = [speed(model, L, args.decode_tokens, args.repeats, config.vocab_size)
                             for L in args.lengths]
        if name in ("rope", "hf-dynamic x4", "consistent_dynamic x4"):
            doc["consistency"][name] = consistency(model, doc["original"], config.vocab_size)
        write(doc, Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
