"""The `longctx` command: train, eval, generate, export, sweep, plan.

Exit codes: 0 success; 2 invalid config or input (one readable message, no traceback); 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import sys

from longctx.config import ConfigError


def _setup_logging() -> None:
    from longctx import dist

    main = dist.is_main()  # rank 0 alone prints (torchrun sets RANK)
    logging.basicConfig(level=logging.INFO if main else logging.ERROR, format="[longctx] %(message)s")
    if not main:
        import transformers

        transformers.logging.set_verbosity_error()


def number(kind: type, low: float, high: float | None = None, low_in: bool = True, high_in: bool = True):
    """An argparse type: a finite `kind` (int or float) in a range, worded as the config's ranges are; argparse
    turns a bad value into exit 2 with one line naming the argument."""
    from longctx.config import allowed, in_range

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not in_range(value, low, high, low_in, high_in):
            raise argparse.ArgumentTypeError(f"must be {allowed(low, high, low_in, high_in)}, got {text}")
        return value

    return parse


def cmd_train(args: argparse.Namespace) -> int:
    from longctx import dist, rundir
    from longctx.config import load_config
    from longctx.trainer import Stopped, stop_on_signals, train

    cfg = load_config(args.config, overrides=args.overrides)
    final = train(cfg)  # the run directory when training stopped early (SIGTERM/SIGUSR1): no evaluation then
    if not (cfg.eval.lengths and final.name == rundir.FINAL and dist.is_main()):
        return 0
    from longctx.evaluate import eval_run

    done = rundir.eval_dir(cfg.train.output_dir) / "ppl.json"  # written last: present means complete
    if done.is_file():
        logging.getLogger("longctx").info("evaluation already done: %s", done)
        return 0
    try:
        # rank 0 alone evaluates (the other ranks have returned): no collective may wait for them
        with stop_on_signals(), dist.alone():  # a rerun finishes the evaluation; training is not repeated
            eval_run(cfg, final)
    except Stopped as e:
        logging.getLogger("longctx").warning("%s during the evaluation: stopped; rerun the same command to finish it "
                                             "(%s is kept, training is not repeated)", e, final)
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
