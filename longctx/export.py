"""Export a run as one merged Hugging Face model that plain transformers loads with its extended context.

    longctx export runs/quickstart/final --out runs/quickstart/hf [--dtype bfloat16] [--gguf [--outtype f16]]

1. Rebuild the run's model exactly as evaluation does (`evaluate.load_for_eval`), in float32: the base (never 4-bit:
   a QLoRA adapter merges into the 16-bit/float32 base, as LongQLoRA's merge does), the LoRA adapter, the
   embed/norm weights and the rope scaling from longctx.json.
2. Its logits in eval mode (dense attention) on a fixed text longer than the original context (original +
   max(64, original/8) tokens, whatever the training length: issue 19): the reference.
3. Merge LoRA into the base weights (PEFT `merge_and_unload`), cast to `--dtype` (default: the run's
   model.dtype), and write the weights, config.json, the tokenizer and a model card (README.md). config.json
   carries the scaling twice with the same numbers (issue 15): `rope_parameters` (transformers 5) and, for a scaled
   type, `rope_scaling` + top-level `rope_theta` (transformers 4.x, vLLM, SGLang, llama.cpp's converter).
   `max_position_embeddings` = the configured target length (`rope.max_position_embeddings`, default the training
   length; for `dynamic`, transformers reads that field as the original length, so it stays the original one).
4. Verify in a fresh Python process that never imports longctx: `AutoModelForCausalLM.from_pretrained(DIR)` must
   give the reference logits (max |difference| <= 1e-4 for a float32 export; a 16-bit export is loaded in float32
   and compared with a tolerance relative to the logit scale, see `default_atol`). Otherwise exit 1.
5. `--gguf`: convert DIR with llama.cpp's own converter and check the file with llama.cpp (longctx/gguf_export.py).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from longctx import families, gguf_export, rundir, serving
from longctx import rope as rope_registry
from longctx.config import ConfigError

log = logging.getLogger("longctx")

STANDARD_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


class ExportError(RuntimeError):
    """The exported model does not reproduce the longctx model (exit 1)."""


def default_atol(dtype: str, ref_logits: torch.Tensor) -> float:
    """1e-4 for float32; for 16-bit weights, 2**-6 of the largest reference logit (bf16 keeps 8 mantissa bits, so
    each weight moves by up to 2**-9 of itself when it is cast)."""
    return 1e-4 if dtype == "float32" else 2.0 ** -6 * max(1.0, ref_logits.abs().max().item())


def verify_length(original: int) -> int:
    """Tokens of the verification input: past the original context (where the scaling matters), bounded, whatever
    the training length (a run trained shorter than its target is still checked where the scaling acts)."""
    return original + max(64, original // 8)


def verify_positions(n: int) -> list[int]:
    """Positions whose logits are compared: every position up to 512 tokens, else about 256 spread over the
    input plus the last 256."""
    if n <= 512:
        return list(range(n))
    return sorted(set(range(0, n, n // 256)) | set(range(n - 256, n)))


def verify_input(tokenizer, n: int) -> torch.Tensor:
    """[1, n] token ids of natural text: LongLoRA's passkey filler sentences, repeated. A model continues it with
    confident tokens, so the greedy comparison with llama.cpp (`--gguf`) is not decided by near ties."""
    from longctx.evaluate import PASSKEY_FILLER

    piece = tokenizer(" ".join(PASSKEY_FILLER) + " ", add_special_tokens=False)["input_ids"]
    return torch.tensor([(piece * (n // len(piece) + 1))[:n]])


def target_length(info: dict) -> int:
    """The configured target context (`rope.max_position_embeddings`, default `train.seq_len`) from longctx.json.

    Runs written before longctx.json recorded `target_length` fall back to the target their rope parameters were
    resolved with (`rope.max_position_embeddings`, present whenever a scaling was applied), then to the run config's
    `rope.max_position_embeddings`, then to the training length: the same default the config has.
    """
    if info.get("target_length"):
        return int(info["target_length"])
    resolved = (info.get("rope") or {}).get("max_position_embeddings")
    configured = ((info.get("config") or {}).get("rope") or {}).get("max_position_embeddings")
    return int(resolved or configured or info["train_seq_len"])


def _read_info(final: Path) -> dict:
    if not final.is_dir():
        raise ConfigError(f"export: {final} does not exist or is not a directory (expected a run's final/ directory)")
    info_path = rundir.info_path(final)
    if not info_path.is_file():
        raise ConfigError(f"export: {final} has no {rundir.INFO}: it is not a run's final/ directory (train writes "
                          "RUN/final; an exported or base model needs no export)")
    return json.loads(info_path.read_text())


def export(final: str | Path, out: str | Path, dtype: str | None = None, verify: bool = True,
           atol: float | None = None, force: bool = False, gguf: bool = False, outtype: str = "f16") -> dict:
    """Merge and write RUN/final as a Hugging Face model in `out`; verify the round trip; with `gguf`, also write
    and check `out/model-<outtype>.gguf`. Returns a report."""
    from longctx import evaluate
    from longctx.model import DTYPES

    final, out = Path(final), Path(out)
    info = _read_info(final)
    dtype = dtype or (info.get("config") or {}).get("model", {}).get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.resolve() == final.resolve():
        raise ConfigError(f"--out must differ from the run's final/ directory {final}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"--out: {out} exists and is not empty; choose another directory or pass --force "
                              "(which writes over the files there)")
    if info.get("method"):  # log-n: the only method a run trains with (config.train_problems)
        name = info["method"]["name"]
        raise ConfigError(f"export: {final} was trained with method {name} (queries scaled by position), which plain "
                          "transformers cannot run and no config.json can carry; evaluate and generate with it "
                          "through longctx (`longctx eval`, `longctx generate` rebuild it from RUN/final)")
    converter = gguf_export.preflight(final, info, outtype, verify) if gguf else None  # refuse before the slow part
    trained, target = int(info["train_seq_len"]), target_length(info)

    model, tokenizer, _ = evaluate.load_for_eval(str(final), dtype="float32")
    device = next(model.parameters()).device
    alibi = families.family(model.config) == "alibi"
    original = int(families.original_length(model.config) or trained)  # per layer type: the global layers' length
    target = max(target, original)  # no scaling and a short training length: the model keeps its original context
    n = verify_length(original)
    if alibi:  # no original context to pass: checked up to the trained/target length (MPT cannot run past it)
        n = min(n, target)
    positions = torch.tensor(verify_positions(n))
    ids = verify_input(tokenizer, n)
    with torch.no_grad():  # logits_to_keep: only the compared rows (a 9k-token SmolLM2 input has 1.8 GB of logits)
        ref = model(input_ids=ids.to(device), use_cache=False,
                    logits_to_keep=positions.to(device)).logits[0].float().cpu()

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if alibi:
        finalize_alibi_config(model.config, target)
    else:
        finalize_config(model.config, target, original)
    if model.config._attn_implementation not in STANDARD_ATTENTION:
        model.set_attn_implementation("sdpa")
    model = model.to(DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    clean_config_json(out / "config.json")
    config = json.loads((out / "config.json").read_text())
    del model
    report = {"dtype": dtype, "tokens": n, "positions": len(positions), "original": original, "trained": trained,
              "target": target, "rope_parameters": config.get("rope_parameters"),
              "rope_scaling": config.get("rope_scaling"),
              "max_position_embeddings": config.get("max_position_embeddings"),
              "legacy_warning": None if alibi else serving.legacy_factor_mismatch(config["rope_parameters"],
                                                                                  config["max_position_embeddings"])}
    if report["legacy_warning"]:
        log.warning("export: %s", report["legacy_warning"])
    greedy = gguf_export.GREEDY_TOKENS if gguf else 0
    if verify:
        report.update(verify_export(out, ids, positions, ref, atol if atol is not None else default_atol(dtype, ref),
                                    str(device), greedy=greedy))
    if gguf:  # the check's greedy continuation (plain transformers) is the reference for llama.cpp
        reference = {"tokens": report.pop("greedy_tokens"), "logits": report.pop("greedy_logits")} if verify else None
        report["gguf"] = gguf_export.export_gguf(out, converter, outtype, config, ids, reference)
    (out / "README.md").write_text(model_card(info, final, config, report))
    return report


def finalize_config(config, target: int, original: int) -> None:
    """rope_parameters with theta and the original length always set; max_position_embeddings = the target length
    (never below the original one)."""
    rp = dict(rope_registry.native_rope(config))  # per layer type (Gemma-3): the global layers' dict
    rp.setdefault("rope_type", "default")
    rp.setdefault("original_max_position_embeddings", original)
    if "rope_theta" not in rp and getattr(config, "rope_theta", None) is not None:
        rp["rope_theta"] = config.rope_theta
    config.rope_parameters = rope_registry.with_scaled(config, rp)
    if rp["rope_type"] != "dynamic":  # dynamic: transformers reads max_position_embeddings as the original length
        config.max_position_embeddings = max(target, original)
    config.use_cache = True


def finalize_alibi_config(config, trained: int) -> None:
    """ALiBi has no positions to scale. MPT builds its bias for `max_seq_len` and cannot run past it in plain
    transformers: raised to the trained length (the bias values are the same, ALiBi depends on distances only)."""
    if hasattr(config, "max_seq_len"):
        config.max_seq_len = max(trained, config.max_seq_len)
    config.use_cache = True


def clean_config_json(path: Path) -> None:
    """No longctx attention implementation and no quantization config in the written config.json; the
    transformers-4 spelling of the scaling next to `rope_parameters` (serving.legacy_rope_fields)."""
    config = json.loads(path.read_text())
    for key in ("attn_implementation", "_attn_implementation"):
        if key in config and config[key] not in STANDARD_ATTENTION:
            del config[key]
    config.pop("quantization_config", None)
    if config.get("rope_parameters"):  # RoPE families (ALiBi ones have none)
        config.update(serving.legacy_rope_fields(config["rope_parameters"]))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# The check runs in a fresh interpreter (-I: no PYTHONPATH, no user site, not the current directory) and proves
# that it never imported longctx. With `greedy` > 0 it also continues the input greedily for that many tokens
# (the reference for the llama.cpp check of a GGUF export).
VERIFY_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
out, ref_path, device, greedy = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ref = load_file(ref_path)
model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
ids, positions = ref["input_ids"].to(device), ref["positions"].to(device)
with torch.no_grad():
    result = model(input_ids=ids, use_cache=greedy > 0, logits_to_keep=positions)
    logits = result.logits[0].float().cpu()
    tokens, steps = [], []
    cache, last = result.past_key_values, logits[-1]
    for i in range(greedy):  # positions ends with the last input position
        tokens.append(int(last.argmax()))
        steps.append(last)
        if i + 1 < greedy:
            step = model(input_ids=torch.tensor([[tokens[-1]]], device=device), past_key_values=cache, use_cache=True)
            cache, last = step.past_key_values, step.logits[0, -1].float().cpu()
if greedy:
    save_file({"logits": torch.stack(steps).contiguous()}, ref_path + ".greedy")
print(json.dumps({"max_abs_diff": (logits - ref["logits"]).abs().max().item(), "greedy_tokens": tokens,
                  "longctx_imported": sorted(m for m in sys.modules if m.split(".")[0] == "longctx"),
                  "attn_implementation": model.config._attn_implementation,
                  "max_position_embeddings": getattr(model.config, "max_position_embeddings", None)}))
"""


def verify_export(out: Path, ids: torch.Tensor, positions: torch.Tensor, ref: torch.Tensor, atol: float,
                  device: str = "cpu", greedy: int = 0) -> dict:
    """Plain transformers in a fresh process must reproduce `ref` (logits at `positions`) within `atol`. With
    `greedy` > 0, also its greedy continuation of `ids` (tokens and their logits, for the llama.cpp check)."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        ref_path = Path(tmp) / "reference.safetensors"
        save_file({"input_ids": ids.contiguous(), "positions": positions.contiguous(), "logits": ref.contiguous()},
                  str(ref_path))
        proc = subprocess.run([sys.executable, "-I", "-c", VERIFY_SCRIPT, str(out.resolve()), str(ref_path), device,
                               str(greedy)], capture_output=True, text=True, cwd=tmp)
        greedy_logits = load_file(str(ref_path) + ".greedy")["logits"] if greedy and proc.returncode == 0 else None
    if proc.returncode != 0:
        raise ExportError(f"verification failed: plain transformers could not load or run {out}:\n"
                          f"{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["longctx_imported"]:
        raise ExportError(f"verification is void: the fresh process imported {result['longctx_imported']}")
    diff = result["max_abs_diff"]
    if not diff <= atol:  # also catches NaN
        raise ExportError(f"verification failed: AutoModelForCausalLM.from_pretrained({out}) gives logits that differ "
                          f"from the longctx model by up to {diff:.3g} (tolerance {atol:.3g}) on {ids.shape[1]} "
                          f"tokens; the exported config.json does not reproduce the trained model")
    log.info("verified: plain transformers reproduces the longctx logits on %d tokens (max |diff| %.3g <= %.3g)",
             ids.shape[1], diff, atol)
    report = {"verified": True, "max_abs_diff": diff, "atol": atol}
    if greedy:
        report.update(greedy_tokens=result["greedy_tokens"], greedy_logits=greedy_logits)
    return report


def model_card(info: dict, final: Path, config: dict, report: dict) -> str:
    """README.md: base model, scheme, lengths, data, evaluation tables, how it was verified, how to serve it."""
    cfg = info.get("config") or {}
    base = info.get("base_model", "?")
    rp = serving.global_rope(config.get("rope_parameters") or {})
    att = info.get("attention") or {}
    lora, data, train = cfg.get("lora") or {}, cfg.get("data") or {}, cfg.get("train") or {}
    front = ["---", "library_name: transformers", "tags: [longctx, long-context, rope-scaling]"]
    if base.count("/") == 1 and not Path(base).exists():  # a hub id, not a local path
        front.append(f"base_model: {base}")
    front.append("---")
    scheme = rp.get("rope_type", "default") + (f" x{rp['factor']:g}" if "factor" in rp else "")
    method = (f"LoRA r{lora.get('r')} alpha {lora.get('alpha')} on {lora.get('target_modules')}, trainable "
              f"{lora.get('trainable_params')} (merged)" if info.get("lora") else "full fine-tuning")
    if (cfg.get("model") or {}).get("quantization"):
        method = "QLoRA (4-bit NF4 base while training; merged into the unquantized base); " + method
    context = config.get("max_position_embeddings")
    lines = [*front, "", f"# {final.parent.name}", "",
             f"`{base}` extended from {report['original']} to {report['target']} tokens by longctx "
             "(LongLoRA-style fine-tuning), merged into one Hugging Face model.", "",
             "| | |", "|---|---|",
             f"| base model | `{base}` |",
             f"| RoPE scaling | {scheme}: `{json.dumps(rp, sort_keys=True)}` |",
             f"| context | target {report['target']} tokens (`max_position_embeddings` {context}); original "
             f"{report['original']} |",
             f"| training length | {report['trained']} tokens |",
             f"| attention while training | {att.get('type', 'full')}"
             + (f" (group size ratio {att.get('group_size_ratio')})" if att.get("type") == "s2" else "")
             + "; dense causal attention at inference |",
             f"| method | {method} |",
             f"| data | `{data.get('train', '?')}` ({data.get('format', 'pretrain')}) |",
             f"| steps | {info.get('steps', '?')} (lr {train.get('learning_rate', '?')}, "
             f"batch {train.get('per_device_train_batch_size', '?')} x "
             f"{train.get('gradient_accumulation_steps', '?')} per device) |",
             f"| weights | {report['dtype']} |", ""]
    for name, title in (("ppl.md", "Perplexity"), ("passkey.md", "Passkey retrieval (accuracy, depth x length)")):
        table = rundir.eval_dir(final.parent) / name
        if table.is_file():
            lines += [f"## {title}", "", table.read_text().strip(), ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("PATH")  # the scaling is in config.json',
              'tokenizer = AutoTokenizer.from_pretrained("PATH")', "```", ""]
    if rp:
        lines += serving_section(rp, context, config.get("model_type", "llama"), report)
    else:  # ALiBi (BLOOM, MPT): distances only, nothing to scale; runtimes need only the context length
        lines += ["## Serve", "", "ALiBi model: no RoPE scaling to carry; pass the context length, e.g. "
                  f"`vllm serve PATH --max-model-len {report['target']}`.", ""]
    if report.get("verified"):
        lines += [f"Verified at export: plain `AutoModelForCausalLM.from_pretrained` reproduces the longctx model's "
                  f"logits on {report['tokens']} tokens (max |difference| {report['max_abs_diff']:.2g}, tolerance "
                  f"{report['atol']:.2g}).", ""]
    g = report.get("gguf")
    if g and g.get("llama_cpp_verified"):
        lines += [f"Verified at export: llama.cpp (llama-cpp-python {g['llama_cpp_python']}) continues the same "
                  f"{report['tokens']}-token input with the same {len(g['tokens'])} greedy tokens as transformers "
                  f"from `{g['file']}` (max |logit difference| {g['max_abs_diff']:.2g}).", ""]
    return "\n".join(lines)


def serving_section(rp: dict, context: int, model_type: str, report: dict) -> list[str]:
    """The card's serving flags: config.json and the GGUF carry the scaling; the flags are for copies without it."""
    lines = ["## Serve", "",
             "config.json carries the scaling as `rope_parameters` (transformers 5) and, for a scaled type, as "
             "`rope_scaling` + `rope_theta` (transformers 4.x and runtimes that read that spelling), with the same "
             "numbers.", ""]
    if report.get("legacy_warning"):
        lines += [f"Note: {report['legacy_warning']}.", ""]
    lines += ["vLLM (reads config.json; pass the context length):", "", "```bash",
              serving.vllm_command("PATH", rp, context, overrides=False),
              "# the same scaling on a directory without it (e.g. the base model):",
              serving.vllm_command("BASE", rp, context, overrides=True), "```", ""]
    problems = serving.llama_cpp_problems(rp, model_type)
    if problems:
        lines += ["llama.cpp cannot reproduce this scaling: " + "; ".join(problems) + ".", ""]
    else:
        gguf = (report.get("gguf") or {}).get("file", "model.gguf")
        lines += ["llama.cpp (`longctx export --gguf` writes the scaling into the GGUF metadata, so only the context "
                  "length is needed; the other flags restore it on a GGUF converted without it):", "", "```bash",
                  f"llama-server -m {gguf} {serving.llama_cpp_flags(rp, context)}", "```", ""]
    if rp.get("rope_type") == "llama3":
        lines += ["llama3 scaling has no llama.cpp flag: it lives in the GGUF's `rope_freqs` tensor.", ""]
    return lines


# ---------------------------------------------------------------------------------------------------------------
# CLI

def cmd_export(args) -> int:
    try:
        report = export(args.final, args.out, dtype=args.dtype, verify=not args.no_verify, atol=args.atol,
                        force=args.force, gguf=args.gguf, outtype=args.outtype)
    except (ExportError, gguf_export.GgufError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.final} -> {args.out} ({report['dtype']}; rope_parameters {report['rope_parameters']}, "
          f"max_position_embeddings {report['max_position_embeddings']})"
          + (f"; verified, max |logit difference| {report['max_abs_diff']:.2g}" if report.get("verified") else ""))
    if report.get("gguf"):
        g = report["gguf"]
        print(f"gguf: {Path(args.out) / g['file']} (rope metadata checked"
              + (f"; llama.cpp continues with the same {len(g['tokens'])} greedy tokens, max |logit difference| "
                 f"{g['max_abs_diff']:.2g}" if g.get("llama_cpp_verified") else "") + ")")
    return 0


def add_parser(sub) -> None:
    from longctx.cli import number

    p = sub.add_parser("export", help="merge RUN/final into a Hugging Face model with the scaling in config.json")
    p.add_argument("final", help="a run's final/ directory")
    p.add_argument("--out", required=True, help="output directory (must be empty unless --force)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights of the export (default: the run's model.dtype)")
    p.add_argument("--atol", type=number(float, 0), default=None,
                   help="logit tolerance of the check (default 1e-4 for float32; relative for 16-bit)")
    p.add_argument("--no-verify", action="store_true", help="skip the round-trip checks (not recommended)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--gguf", action="store_true",
                   help="also write OUT/model-OUTTYPE.gguf with llama.cpp's converter and check it with llama.cpp "
                        "(needs llama-cpp-python: pip install 'longctx[gguf]')")
    p.add_argument("--outtype", default="f16", choices=gguf_export.OUTTYPES,
                   help="GGUF weights (default f16); q8_0 is checked for its metadata and run, not token by token")
    p.set_defaults(func=cmd_export)
