"""`longctx generate`: continue a prompt with a model, a rope scaling and/or a training-free method, streaming.

    longctx generate --model data/tiny-base --prompt "def main(" --max-new-tokens 64
    longctx generate --model data/tiny-base --prompt-file long.txt --method nbce chunk=128 --max-new-tokens 32
    longctx generate --model runs/x/final --prompt-file long.txt --method rerope window=64 --do-sample --top-p 0.9

The model loads as for evaluation (`evaluate.load_for_eval`: a run's final/, an exported or HF directory, a .gguf
file; `--rope`, `--method` as for `longctx eval`). The new text streams to stdout as it is decoded; a progress line
(tokens, tokens/s) goes to stderr. Greedy unless --do-sample.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from longctx.config import ConfigError


def streamer(tokenizer, max_new_tokens: int):
    """transformers' TextStreamer printing the new text to stdout, with a tqdm progress line on stderr."""
    from transformers import TextStreamer

    class ProgressStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", file=sys.stderr, leave=True)

        def put(self, value):
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.bar.update(value.numel())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            print(text, flush=True, end="\n" if stream_end else "")

        def end(self):
            super().end()
            self.bar.close()

    return ProgressStreamer()


def cmd_generate(args) -> int:
    from longctx.evaluate import rope_overrides, load_for_eval, method_arg

    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ConfigError(f"--prompt-file: {path} not found")
        prompt = path.read_text(encoding="utf-8")
    else:
        prompt = args.prompt
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    rope, method = rope_overrides(args.rope), method_arg(args.method)
    model, tokenizer, label = load_for_eval(args.model, rope=rope, dtype=args.dtype, method=method)
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    print(f"[generate] {label}: prompt {ids.shape[1]} tokens", file=sys.stderr)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.do_sample else \
        dict(do_sample=False)
    torch.manual_seed(args.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             pad_token_id=pad, streamer=streamer(tokenizer, args.max_new_tokens), **sampling)
    n = out.shape[1] - ids.shape[1]
    print(f"[generate] {n} tokens in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    from longctx.evaluate import add_method_args

    g = sub.add_parser("generate", help="continue a prompt (streamed), with a rope scaling or a training-free method")
    g.add_argument("--model", required=True, help="RUN/final, an exported dir, a base model or a .gguf file")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a UTF-8 text file holding the prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="torch seed for sampling")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_method_args(g)
    g.set_defaults(func=cmd_generate)
