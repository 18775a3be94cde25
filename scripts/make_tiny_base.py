"""Build data/tiny-base: a small short-context Llama trained from scratch on the Python standard library.

    python scripts/make_tiny_base.py --out data/tiny-base --steps 2000 --batch 8 --threads 1
    python scripts/make_tiny_base.py --out data/tiny-base --init data/tiny-base --seed 1 --steps 1000 --batch 8 --lr 1e-3 --threads 1

(the shipped base, 2026-12-02: stage 1 ended with passkey@256 at 0.40 as retrieval was just appearing, so a second
stage continued it; 2 threads on the shared 2-core machine ran at 8 s/step, 1 thread at 1-1.8 s/step at batch 8).

Trains a byte-level BPE tokenizer and a ~3.8M-parameter LlamaForCausalLM (RoPE theta 10000, context 256) on
builtin:python-stdlib (train split) mixed with synthetic retrieval documents (scripts/tiny_base_docs.py: the
eval's passkey prompt, key-value lookups, copying a line), on CPU, deterministically from --seed, with an
in-training passkey check; then measures validation perplexity at 128..2048 tokens and passkey accuracy at
256..1024 with plain RoPE (no scaling) and writes README.md, metrics.json and training.png next to the model.
The recipe is the probe's of /work/shared/research/tiny-retrieval.md (issue 14 section 1): retrieval appears
suddenly after 700-900 steps, so fewer than ~1500 steps is risky.
A plain PyTorch loop: this is a build script, not the product.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from longctx.data import STDLIB, load_texts  # noqa: E402
from longctx.evaluate import passkey, passkey_key, passkey_prompt  # noqa: E402
from tiny_base_docs import copy_document, kv_document, passkey_answer_ids, random_passkey_document  # noqa: E402

EOS = "<|endoftext|>"
EVAL_LENGTHS = (128, 256, 512, 1024, 2048)
PASSKEY_LENGTHS, PASSKEY_DEPTHS, PASSKEY_TRIALS = [256, 512, 1024], [0.1, 0.5, 0.9], 5  # as the README's CLI eval
CHECK_DEPTHS, CHECK_TRIALS, CHECK_SEED = [0.1, 0.5, 0.9], 3, 1  # in-training check: 9 keys at 256, not the eval's


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=None, clean_up_tokenization_spaces=False)


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All documents, each followed by EOS, as one int64 array."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for doc in ids:
        if doc:
            out.extend(doc)
            out.append(tokenizer.eos_token_id)
    return np.asarray(out, dtype=np.int64)


@torch.no_grad()
def evaluate(out: Path, val_texts: list[str], batch_tokens: int) -> dict:
    """Validation perplexity of the saved model with plain transformers (dense attention, no RoPE scaling):
    token-weighted mean NLL over non-overlapping windows of each length, all lengths on the same tokens;
    and, inside the longest windows, the perplexity of the predictions made at each range of positions."""
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer(val_texts[0])["input_ids"]) == val_texts[0]
    stream = token_stream(tokenizer, val_texts)
    stream = stream[: len(stream) // max(EVAL_LENGTHS) * max(EVAL_LENGTHS)]
    table, by_position = {}, {}
    for length in EVAL_LENGTHS:
        windows = torch.from_numpy(stream.reshape(-1, length))
        nlls = []
        for i in range(0, len(windows), max(1, batch_tokens // length)):
            x = windows[i:i + max(1, batch_tokens // length)]
            logits = model(input_ids=x, use_cache=False).logits.float()
            nlls.append(torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:],
                                                          reduction="none"))
        nll = torch.cat(nlls)                     # (windows, length - 1); column j = prediction at position j
        table[length] = {"nll": round(nll.mean().item(), 4), "ppl": round(math.exp(nll.mean().item()), 2),
                         "tokens": nll.numel()}
        print(f"ppl@{length}: {table[length]['ppl']:.2f} (nll {table[length]['nll']:.4f}, {nll.numel()} "
              f"predicted tokens)", flush=True)
    edges = [0, 128, 256, 512, 1024, max(EVAL_LENGTHS) - 1]
    for lo, hi in zip(edges, edges[1:]):
        part = nll[:, lo:hi].mean().item()
        by_position[f"{lo}-{hi}"] = {"nll": round(part, 4), "ppl": round(math.exp(part), 2)}
    print("ppl by position in", max(EVAL_LENGTHS), "windows:", by_position, flush=True)
    keys = passkey(model, tokenizer, PASSKEY_LENGTHS, PASSKEY_DEPTHS, PASSKEY_TRIALS, seed=0)
    by_length = {L: sum(c["correct"] for c in keys["cells"] if c["length"] == L) / (len(PASSKEY_DEPTHS) * PASSKEY_TRIALS)
                 for L in PASSKEY_LENGTHS}
    print("passkey accuracy by length:", by_length, flush=True)
    return {"validation_documents": len(val_texts), "validation_eval_tokens": int(len(stream)), "ppl": table,
            "ppl_by_position_in_2048_windows": by_position, "passkey_accuracy": by_length,
            "passkey_cells": [{k: c[k] for k in ("length", "depth", "accuracy", "answers")} for c in keys["cells"]]}


def passkey_check(model, tokenizer, length: int = 256) -> dict:
    """The in-training check: greedy passkey accuracy on 9 fixed prompts of `length` tokens (seed 1, so not the
    final eval's keys) and the mean NLL of their answer tokens " KEY." (teacher-forced)."""
    acc = passkey(model, tokenizer, [length], CHECK_DEPTHS, CHECK_TRIALS, seed=CHECK_SEED)
    correct = sum(c["correct"] for c in acc["cells"])
    nlls = []
    with torch.no_grad():
        for d in CHECK_DEPTHS:
            for t in range(CHECK_TRIALS):
                key = passkey_key(CHECK_SEED, length, d, t)
                prompt = passkey_prompt(tokenizer, length, d, key)["input_ids"]
                answer = passkey_answer_ids(tokenizer, key)[:-1]  # without EOS
                x = torch.tensor([prompt + answer])
                logits = model(input_ids=x, use_cache=False).logits[0, len(prompt) - 1:-1]
                nlls.append(torch.nn.functional.cross_entropy(logits, x[0, len(prompt):]).item())
    return {"passkey": round(correct / (len(CHECK_DEPTHS) * CHECK_TRIALS), 4),
            "answer_nll": round(sum(nlls) / len(nlls), 4)}


def make_row(rng: random.Random, tokenizer, stream: np.ndarray, lines: list[str], args) -> tuple[list[int], str]:
    """One training row of seq_len tokens: maybe a synthetic document (then EOS), then stdlib text to the end."""
    r, doc, kind = rng.random(), [], "text"
    if r < args.passkey_frac:
        doc, kind = random_passkey_document(tokenizer, rng, args.seq_len)[0], "passkey"
    elif r < args.passkey_frac + args.kv_frac:
        doc, kind = kv_document(tokenizer, rng, args.seq_len)[0], "kv"
    elif r < args.passkey_frac + args.kv_frac + args.copy_frac:
        doc, kind = copy_document(tokenizer, rng, lines, args.seq_len)[0], "copy"
    rest = args.seq_len - len(doc)
    start = rng.randrange(len(stream) - rest)
    return doc + stream[start:start + rest].tolist(), kind


def plot_training(log: list[dict], checks: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["step"] for r in log], [r["avg50"] for r in log], label="train loss (mean of 50 steps)")
    a.set_xlabel("step"); a.set_ylabel("loss"); a.grid(alpha=0.3); a.legend(fontsize=8)
    steps = [c["step"] for c in checks]
    b.plot(steps, [c["passkey"] for c in checks], "o-", label="passkey@256 accuracy (9 keys)")
    b.set_xlabel("step"); b.set_ylabel("accuracy"); b.set_ylim(-0.05, 1.05); b.grid(alpha=0.3)
    c = b.twinx()
    c.plot(steps, [c_["answer_nll"] for c_ in checks], "s--", color="tab:red", label="answer NLL")
    c.set_ylabel("answer NLL")
    b.legend(loc="center left", fontsize=8); c.legend(loc="center right", fontsize=8)
    fig.suptitle("tiny-base training (scripts/make_tiny_base.py)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(model, tokenizer, out: Path) -> None:
    """Weights stored in float16 to ship under 12 MB (issue 14); config.json keeps dtype float32 so
    from_pretrained upcasts and the model computes in float32 as it was trained. The live model is untouched."""
    import copy

    copy.deepcopy(model).to(torch.float16).save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def write_readme(out: Path, m: dict) -> None:
    """README.md from metrics.json: recipe, command, time, machine, and every number measured."""
    a, ppl = m["args"], m["ppl"]
    lengths = list(ppl)
    pos = m["ppl_by_position_in_2048_windows"]
    acc = m["passkey_accuracy"]
    ratio = ppl["1024"]["ppl"] / ppl["256"]["ppl"]
    checks = m.get("checks", [])
    prev = m.get("previous_stage")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != "README.md")
    lines = [
        f"# tiny-base: a {m['parameters'] / 1e6:.1f}M-parameter short-context Llama trained to retrieve inside its "
        "256-token window", "",
        "A real, tiny, **short-context** RoPE base model for longctx's CPU tests and demos: trained from scratch at "
        "context 256 with plain RoPE (theta 10000) on the Python standard library mixed with synthetic retrieval "
        "documents, so it finds a passkey inside 256 tokens and fails beyond (issue 14 section 1). Loads with "
        "plain transformers:", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("data/tiny-base")',
        'tokenizer = AutoTokenizer.from_pretrained("data/tiny-base")', "```", "",
        "Built by (seeded; generated by the script itself):", "", "```",
        *([f"{prev['command']}   # stage 1 ({prev.get('steps')} steps, {prev.get('train_seconds')} s training, "
           f"finished {prev.get('finished_utc')})"] if prev else []),
        m["command"] + ("   # stage 2, continuing from stage 1's model" if prev else ""),
        "python scripts/make_tiny_base.py --out data/tiny-base --eval-only   # recompute the tables below", "```", "",
        f"Started {m['started_utc']}, finished {m['finished_utc']} ({m['total_seconds']} s in all, "
        f"{m['train_seconds']} s training), on {m['machine']} with {a['threads']} torch threads, shared with other "
        f"jobs; torch {m['torch']}, Python {m['python']}.", "",
        "## Recipe", "", "| | |", "|---|---|",
        f"| data | `builtin:python-stdlib` train split ({m['train_documents']} files, {m['train_tokens']:,} tokens, "
        "each file followed by `<\|endoftext\|>`). Each 256-token row starts, with probability "
        f"{a['passkey_frac']}, with a passkey document in exactly `longctx eval passkey`'s format (0-23 filler "
        "sentences, half of the time 14-23, uniform depth, random 5-digit key) followed by ` KEY.` and EOS; with "
        f"probability {a['kv_frac']} with a key-value lookup (`table = {{...}}` then `assert table['k'] == V`); "
        f"with probability {a['copy_frac']} with a line copied after 2-12 stdlib lines; stdlib text from a random "
        "offset fills the rest of every row (scripts/tiny_base_docs.py) |",
        f"| tokenizer | byte-level BPE (tokenizers), vocab {m['vocab_size']}, trained on the same train split; "
        "`<\|endoftext\|>` is bos = eos = pad; no BOS is added automatically; lossless round trip |",
        f"| model | `LlamaForCausalLM`: {a['layers']} layers, hidden {a['hidden']}, {a['heads']} heads, "
        f"{a['kv_heads']} KV heads, MLP {a['intermediate']}, tied embeddings, **{m['parameters']:,} parameters**, "
        "`max_position_embeddings` 256, `rope_parameters = {rope_type: default, rope_theta: 10000}`, computed in "
        "float32, **stored in float16** (to ship under 12 MB; `config.json` says float32, so it loads as "
        "float32; every number below is measured on the stored weights) |",
        f"| training | plain PyTorch loop, plain LM loss on all tokens, AdamW (0.9/0.95, weight decay 0.1 on "
        f"matrices), lr {a['lr']}, {a['warmup']} warmup steps then cosine to {a['lr'] / 10:g}, grad clip 1.0, "
        f"batch {a['batch']} x {a['seq_len']}, **{m['steps']} steps = {m['tokens_seen']:,} tokens**, seed "
        f"{a['seed']} |",
        f"| final train loss | {m['final_loss_avg_last_50']} (mean of the last 50 steps) |",
        f"| size | {size / 1e6:.1f} MB without this README |", "",
        "## Passkey accuracy, no scaling", "",
        f"`longctx.evaluate.passkey` (what `longctx eval passkey` runs), depths {PASSKEY_DEPTHS} x "
        f"{PASSKEY_TRIALS} keys = {len(PASSKEY_DEPTHS) * PASSKEY_TRIALS} per length, seed 0, greedy:", "",
        "| L (tokens) | " + " | ".join(str(L) for L in acc) + " |", "|---|" + "---|" * len(acc),
        "| accuracy | " + " | ".join(f"{v:.2f}" for v in acc.values()) + " |", "",
        "## Validation perplexity vs context length (no scaling)", "",
        f"The {m['validation_documents']} held-out stdlib files joined with EOS, truncated to "
        f"{m['validation_eval_tokens']:,} tokens so every length is scored on the same tokens; non-overlapping "
        f"windows, sdpa attention, plain RoPE. PPL@1024 / PPL@256 = **{ratio:.2f}x**.", "",
        "| L (tokens) | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths),
        "| PPL | " + " | ".join(f"{ppl[L]['ppl']:.2f}" for L in lengths) + " |",
        "| NLL | " + " | ".join(f"{ppl[L]['nll']:.4f}" for L in lengths) + " |", "",
        "Inside the 2048-token windows, by the position that makes the prediction:", "",
        "| positions | " + " | ".join(pos) + " |", "|---|" + "---|" * len(pos),
        "| PPL | " + " | ".join(f"{v['ppl']:.2f}" for v in pos.values()) + " |", "",
    ]
    for stage, stage_checks in ((("stage 1", prev.get("checks", [])), ("stage 2", checks)) if prev
                                else (("", checks),)):
        if not stage_checks:
            continue
        lines += [f"## In-training passkey check{', ' + stage if stage else ''}", "",
                  "9 fixed keys at 256 tokens (depths 0.1/0.5/0.9 x 3, seed 1), greedy accuracy and the "
                  "teacher-forced NLL of the answer tokens; curves in `training.png`.", "",
                  "| step | " + " | ".join(str(c["step"]) for c in stage_checks) + " |",
                  "|---|" + "---|" * len(stage_checks),
                  "| passkey@256 | " + " | ".join(f"{c['passkey']:.2f}" for c in stage_checks) + " |",
                  "| answer NLL | " + " | ".join(f"{c['answer_nll']:.2f}" for c in stage_checks) + " |", ""]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/tiny-base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=640)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--passkey-frac", type=float, default=0.5, help="rows that start with a passkey document")
    ap.add_argument("--kv-frac", type=float, default=0.1, help="rows that start with a key-value lookup")
    ap.add_argument("--copy-frac", type=float, default=0.1, help="rows that start with a copied line")
    ap.add_argument("--check-every", type=int, default=150, help="steps between in-training passkey checks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", default=None,
                    help="continue from this model (a tiny-base built by this script) instead of a random init: "
                         "a second stage with its own warmup and cosine; its metrics.json is kept as the first stage")
    ap.add_argument("--save-latest", default=None,
                    help="also save the model here at every check, so a build stopped early leaves a usable model")
    ap.add_argument("--eval-batch-tokens", type=int, default=8192)
    ap.add_argument("--eval-only", action="store_true",
                    help="re-evaluate the model in --out, update metrics.json and README.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.eval_only:
        path = out / "metrics.json"
        metrics = json.loads(path.read_text())
        val_texts = list(load_texts(STDLIB, "validation")["text"])
        metrics.update(evaluate(out, val_texts, args.eval_batch_tokens))
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        write_readme(out, json.loads(path.read_text()))
        return

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    t0, started = time.time(), datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    train_texts = list(load_texts(STDLIB, "train")["text"])
    val_texts = list(load_texts(STDLIB, "validation")["text"])
    tokenizer = train_tokenizer(train_texts, args.vocab)
    train_ids = token_stream(tokenizer, train_texts)
    val_ids = token_stream(tokenizer, val_texts)
    lines = [line for text in train_texts for line in text.splitlines() if line.strip()]
    print(f"tokenizer: vocab {len(tokenizer)}; train {len(train_texts)} docs {len(train_ids)} tokens; "
          f"validation {len(val_texts)} docs {len(val_ids)} tokens; {time.time() - t0:.0f}s", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
    )
    previous = None
    if args.init:
        model = LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32, attn_implementation="sdpa")
        assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (
            args.hidden, args.layers, len(tokenizer)), f"--init {args.init}: another shape than the arguments give"
        stage1 = Path(args.init) / "metrics.json"
        previous = json.loads(stage1.read_text()) if stage1.exists() else {"command": f"(model in {args.init})"}
        print(f"continuing from {args.init}", flush=True)
    else:
        model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step: int) -> float:  # linear warmup, cosine to 10%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = random.Random(args.seed)
    kinds: dict[str, int] = {}
    log, checks, losses, t_train = [], [], [], time.time()
    model.train()
    bar = tqdm(range(args.steps), desc="train", mininterval=30)
    for step in bar:
        rows = []
        for _ in range(args.batch):
            row, kind = make_row(rng, tokenizer, train_ids, lines, args)
            rows.append(row)
            kinds[kind] = kinds.get(kind, 0) + 1
        x = torch.tensor(rows)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log.append({"step": step, "loss": round(loss.item(), 4), "avg50": round(recent, 4)})
            bar.set_postfix(loss=f"{recent:.3f}")
            print(f"step {step} loss {loss.item():.4f} avg50 {recent:.4f} lr {lr_at(step):.2e} "
                  f"{time.time() - t_train:.0f}s", flush=True)
        if (step + 1) % args.check_every == 0 or step == args.steps - 1:
            check = {"step": step + 1, **passkey_check(model, tokenizer), "seconds": round(time.time() - t_train)}
            model.train()
            checks.append(check)
            print(f"check {json.dumps(check)}", flush=True)
            plot_training(log, checks, out / "training.png")
            if args.save_latest:
                save(model, tokenizer, Path(args.save_latest))
    train_seconds = time.time() - t_train
    final_loss = sum(losses[-50:]) / len(losses[-50:])

    save(model, tokenizer, out)

    metrics = {
        "command": "python scripts/make_tiny_base.py " + " ".join(sys.argv[1:]),
        "previous_stage": previous,
        "args": vars(args), "parameters": n_params, "vocab_size": len(tokenizer),
        "train_documents": len(train_texts), "train_tokens": int(len(train_ids)), "rows_by_kind": kinds,
        "steps": args.steps, "tokens_seen": args.steps * args.batch * args.seq_len,
        "final_loss_avg_last_50": round(final_loss, 4), "train_seconds": round(train_seconds),
        "checks": checks, "loss_log": log,
        "torch": torch.__version__, "python": platform.python_version(), "machine": machine(),
        "started_utc": started,
        **evaluate(out, val_texts, args.eval_batch_tokens), "total_seconds": round(time.time() - t0),
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_readme(out, json.loads((out / "metrics.json").read_text()))
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("loss_log", "passkey_cells")}, indent=2))


if __name__ == "__main__":
    main()
