"""The `longctx` command: train, eval, generate, export, sweep, plan.

Exit codes: 0 success; 2 invalid config or input (one readable message, no traceback); 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from longctx.config import ConfigError


def _setup_logging() -> None:
    main = int(os.environ.get("RANK", "0")) == 0  # rank 0 alone prints (torchrun sets RANK)
    logging.basicConfig(level=logging.INFO if main else logging.ERROR, format="[longctx] %(message)s")
    if not main:
        import transformers

        transformers.logging.set_verbosity_error()


def cmd_train(args: argparse.Namespace) -> int:
    from longctx.config import load_config
    from longctx.trainer import train

    cfg = load_config(args.config, overrides=args.overrides)
    final = train(cfg)
    if cfg.eval.lengths and final.name == "final":
        from longctx.evaluate import eval_run

        eval_run(cfg, final)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longctx", description="Extend the context window of RoPE language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config, then evaluate if `eval` is configured")
    t.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10 rope.factor=4")
    t.set_defaults(func=cmd_train)

    from longctx import evaluate, export, generate, plan, sweep

    evaluate.add_parsers(sub)
    generate.add_parser(sub)
    export.add_parser(sub)
    sweep.add_parsers(sub)
    plan.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    from longctx.data import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    sys.exit(main())
