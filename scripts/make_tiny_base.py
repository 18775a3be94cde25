"""Build data/tiny-base: a small short-context Llama trained from scratch on the Python standard library.

    python scripts/make_tiny_base.py --out data/tiny-base

Trains a byte-level BPE tokenizer and a ~2.3M-parameter LlamaForCausalLM (RoPE theta 10000, context 256) on
builtin:python-stdlib (train split) on CPU, deterministically from --seed, then measures validation
perplexity at 128..2048 tokens with plain RoPE (no scaling) and writes README.md + metrics.json next to the
model. A plain PyTorch loop: this is a build script, not the product.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longctx.data import STDLIB, load_texts  # noqa: E402

EOS = "<|endoftext|>"
EVAL_LENGTHS = (128, 256, 512, 1024, 2048)


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
    return {"validation_documents": len(val_texts), "validation_eval_tokens": int(len(stream)), "ppl": table,
            "ppl_by_position_in_2048_windows": by_position}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/tiny-base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--intermediate", type=int, default=448)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-batch-tokens", type=int, default=8192)
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate the model in --out, update metrics.json")
    args = ap.parse_args()
    if args.eval_only:
        torch.set_num_threads(args.threads)
        path = Path(args.out) / "metrics.json"
        metrics = json.loads(path.read_text()) if path.exists() else {}
        val_texts = list(load_texts(STDLIB, "validation")["text"])
        metrics.update(evaluate(Path(args.out), val_texts, args.eval_batch_tokens))
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        return

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    train_texts = list(load_texts(STDLIB, "train")["text"])
    val_texts = list(load_texts(STDLIB, "validation")["text"])
    tokenizer = train_tokenizer(train_texts, args.vocab)
    train_ids = token_stream(tokenizer, train_texts)
    val_ids = token_stream(tokenizer, val_texts)
    n_blocks = len(train_ids) // args.seq_len
    blocks = torch.from_numpy(train_ids[: n_blocks * args.seq_len].reshape(n_blocks, args.seq_len))
    print(f"tokenizer: vocab {len(tokenizer)}; train {len(train_texts)} docs {len(train_ids)} tokens "
          f"({n_blocks} blocks, {len(train_ids) - n_blocks * args.seq_len} remainder tokens unused); "
          f"validation {len(val_texts)} docs {len(val_ids)} tokens; {time.time() - t0:.0f}s", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
    )
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

    gen = torch.Generator().manual_seed(args.seed)
    order, pos, epoch = torch.randperm(n_blocks, generator=gen), 0, 0
    model.train()
    losses, t_train = [], time.time()
    bar = tqdm(range(args.steps), desc="train", mininterval=10)
    for step in bar:
        if pos + args.batch > n_blocks:
            order, pos, epoch = torch.randperm(n_blocks, generator=gen), 0, epoch + 1
        x = blocks[order[pos:pos + args.batch]]
        pos += args.batch
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
            bar.set_postfix(loss=f"{recent:.3f}")
            print(f"step {step} loss {loss.item():.4f} avg50 {recent:.4f} lr {lr_at(step):.2e} "
                  f"{time.time() - t_train:.0f}s", flush=True)
    train_seconds = time.time() - t_train
    final_loss = sum(losses[-50:]) / len(losses[-50:])

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    metrics = {
        "args": vars(args), "parameters": n_params, "vocab_size": len(tokenizer),
        "train_documents": len(train_texts), "train_tokens": int(len(train_ids)), "train_blocks": n_blocks,
        "epochs_started": epoch + 1, "steps": args.steps, "tokens_seen": args.steps * args.batch * args.seq_len,
        "final_loss_avg_last_50": round(final_loss, 4), "train_seconds": round(train_seconds),
        "torch": torch.__version__, "python": platform.python_version(),
        **evaluate(out, val_texts, args.eval_batch_tokens), "total_seconds": round(time.time() - t0),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
