"""GGUF export through llama.cpp's own converter, checked by llama.cpp itself (issue 15).

    longctx export RUN/final --out DIR --gguf [--outtype f32|f16|q8_0]

1. Before anything slow (`preflight`): the scaling must be one llama.cpp can express (`serving.llama_cpp_problems`:
   not dynamic NTK, not longrope, yarn with llama.cpp's fixed betas and temperature, llama3 only for the Llama
   converter), llama-cpp-python must be installed (it runs the check), and the tokenizer must be one llama.cpp's
   converter knows; otherwise exit 2 with the reason.
2. The converter is `convert_hf_to_gguf.py` with its `conversion/` package and its own `gguf-py`, exactly as
   vendored in the llama-cpp-python source distribution of the pinned version `LLAMA_CPP_PYTHON`, so the converter
   and the llama.cpp that checks the file are one llama.cpp. It is fetched once with
   `pip download --no-binary :all: --no-deps llama-cpp-python==<version>` (the installed wheel does not ship it)
   and extracted to `$LONGCTX_CACHE` (default ~/.cache/longctx).
3. Tokenizers: the converter identifies a BPE pre-tokenizer by the hash of a fixed text's token ids
   (`get_vocab_base_pre`) and refuses a tokenizer it does not know ("BPE pre-tokenizer was not recognized"),
   because llama.cpp must reimplement the pre-tokenizer in C++. We never guess one (a wrong pre-tokenizer silently
   tokenizes differently): a `--vocab-only` conversion runs first and a refusal is reported as exit 2 naming the
   cause. Model families llama.cpp supports (SmolLM2, Llama, Mistral, Qwen) pass; custom tokenizers do not.
4. DIR/model-<outtype>.gguf is converted from the verified HF export in DIR.
5. Its metadata is read back with the `gguf` package: context length = max_position_embeddings, rope base, and the
   scaling (type, factor, original context, yarn betas; llama3's `rope_freqs` tensor against transformers'
   factors). Any difference: exit 1.
6. A fresh process (`python -I`, never importing longctx) loads the file with llama-cpp-python and continues the
   verification input (longer than the original context) greedily for `GREEDY_TOKENS` tokens; the tokens must be
   plain transformers' (the export's check computes them from DIR) and their logits within `llama_cpp_atol`, for
   f32 and f16; else exit 1 naming the first difference. q8_0 is checked for its metadata and must run, its
   tokens are reported (quantization may flip a near tie). The same process checks that llama.cpp's tokenizer gives
   the Hugging Face tokenizer's ids on a fixed text.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from longctx import serving
from longctx.config import ConfigError

log = logging.getLogger("longctx")

LLAMA_CPP_PYTHON = "0.3.36"  # the pinned llama-cpp-python: its sdist's converter, its llama.cpp for the check
OUTTYPES = ("f32", "f16", "q8_0")
EXACT_OUTTYPES = ("f32", "f16")  # checked token by token
GREEDY_TOKENS = 8
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
UNKNOWN_TOKENIZER = "BPE pre-tokenizer was not recognized"
TOKENIZER_TEXT = "The grass is green. The sky is blue.\n\tdef f(x): return x ** 2  # 3.14159, 42 apples!"


class GgufError(RuntimeError):
    """The GGUF file does not reproduce the export (exit 1)."""


def llama_cpp_atol(outtype: str, ref_logits: torch.Tensor) -> float:
    """llama.cpp vs transformers logits on the greedy steps: a fraction of the largest logit. f32: both compute in
    float32 with different kernels and summation orders (2**-9); f16: the weights are rounded to 11 bits (2**-5)."""
    return (2.0 ** -9 if outtype == "f32" else 2.0 ** -5) * max(1.0, ref_logits.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# Preflight and the converter

def preflight(final: Path, info: dict, outtype: str, verify: bool = True) -> Path:
    """Refuse (ConfigError, exit 2) what cannot give a checked GGUF, before the export's slow steps; the converter.
    Without `verify` (--no-verify) llama-cpp-python is not needed: the metadata is still checked."""
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    rp = info.get("rope_parameters") or {}
    problems = serving.llama_cpp_problems(rp, _model_type(info))
    if problems:
        raise ConfigError("--gguf: llama.cpp cannot express this run's RoPE scaling: " + "; ".join(problems)
                          + ". Export without --gguf (the Hugging Face export keeps it)")
    if verify and importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(f"--gguf: llama-cpp-python is not installed; it runs the check of the GGUF file: "
                          f"pip install 'llama-cpp-python=={LLAMA_CPP_PYTHON}' (or pip install 'longctx[gguf]')")
    missing = [m for m in ("gguf", "sentencepiece") if importlib.util.find_spec(m) is None]
    if missing:  # llama.cpp's converter imports both, even for a BPE tokenizer
        raise ConfigError(f"--gguf: llama.cpp's converter needs {' and '.join(missing)}, not installed: "
                          "pip install 'longctx[gguf]' (or pip install gguf sentencepiece)")
    converter = converter_dir()
    check_tokenizer(final, info, converter)
    return converter


def _model_type(info: dict) -> str:
    from longctx.model import load_config

    return load_config(info["base_model"], info.get("gguf_file")).model_type


def cache_dir() -> Path:
    return Path(os.environ.get("LONGCTX_CACHE") or Path.home() / ".cache" / "longctx")


def converter_dir(version: str = LLAMA_CPP_PYTHON) -> Path:
    """The directory holding llama.cpp's convert_hf_to_gguf.py of llama-cpp-python==version (fetched once)."""
    target = cache_dir() / f"llama-cpp-python-{version}-converter"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching llama.cpp's converter: the llama-cpp-python==%s source distribution (about 77 MB, once)",
             version)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                               "--quiet", f"llama-cpp-python=={version}", "-d", tmp], capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise GgufError(f"could not download the llama-cpp-python=={version} source distribution (it holds "
                            f"llama.cpp's convert_hf_to_gguf.py): {proc.stderr.strip()[-1000:]}")
        staging = Path(tmp) / "converter"
        _extract_converter(sdists[0], staging)
        try:
            os.replace(staging, target)  # atomic: a half-extracted converter is never picked up
        except OSError:  # another process got there first
            if not (target / "convert_hf_to_gguf.py").is_file():
                raise
    return target


def _extract_converter(sdist: Path, dest: Path) -> None:
    """vendor/llama.cpp/{convert_hf_to_gguf.py, conversion/, gguf-py/, LICENSE} of the sdist, into dest."""
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not member.isfile() or ".." in parts:
                continue
            rel = "/".join(parts[3:])
            if any(rel == f or (f.endswith("/") and rel.startswith(f)) for f in CONVERTER_FILES):
                path = dest / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tar.extractfile(member).read())
    if not (dest / "convert_hf_to_gguf.py").is_file():
        raise GgufError(f"{sdist.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")


def run_converter(converter: Path, hf_dir: Path, outfile: Path, *args: str) -> subprocess.CompletedProcess:
    # Not `python -I`: the script imports its `conversion` package from its own directory.
    return subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile",
                           str(outfile), *args], capture_output=True, text=True, cwd=hf_dir)


def check_tokenizer(final: Path, info: dict, converter: Path) -> None:
    """A --vocab-only conversion of the run's tokenizer with the base model's config: exit 2 if llama.cpp's
    converter does not know the tokenizer."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from longctx.model import load_config, load_tokenizer

    config = load_config(info["base_model"], info.get("gguf_file"))
    if not config.architectures:  # a config read from a GGUF file names no class
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        load_tokenizer(str(final)).save_pretrained(tmp)
        proc = run_converter(converter, Path(tmp), Path(tmp) / "vocab.gguf", "--vocab-only")
    if UNKNOWN_TOKENIZER in proc.stderr + proc.stdout:
        raise ConfigError(f"--gguf: llama.cpp's converter does not know this run's tokenizer ({UNKNOWN_TOKENIZER}: "
                          "it identifies BPE pre-tokenizers by a hash of their output, get_vocab_base_pre, and "
                          "llama.cpp must implement each in C++); a custom tokenizer, or a family that the converter "
                          f"of llama-cpp-python {LLAMA_CPP_PYTHON} does not support. Export without --gguf")
    if proc.returncode != 0:
        raise GgufError(f"llama.cpp's converter failed on the tokenizer:\n{proc.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------------------------
# Conversion and checks

def export_gguf(out: Path, converter: Path, outtype: str, config: dict, ids: torch.Tensor | None,
                reference: dict | None) -> dict:
    """Convert the HF export in `out`, check its metadata, and (with `ids` and `reference` = the export check's
    greedy tokens and logits) check llama.cpp's greedy continuation. Returns the report's `gguf` part."""
    gguf_path = out / f"model-{outtype}.gguf"
    proc = run_converter(converter, out, gguf_path, "--outtype", outtype)
    if proc.returncode != 0 or not gguf_path.is_file():
        raise GgufError(f"llama.cpp's converter failed on {out}:\n{proc.stderr[-3000:]}")
    wrong = metadata_problems(gguf_path, config)
    if wrong:
        raise GgufError(f"{gguf_path.name}: the GGUF metadata does not hold the export's RoPE scaling: "
                        + "; ".join(wrong))
    report = {"file": gguf_path.name, "outtype": outtype, "metadata_checked": True}
    if ids is not None and reference is not None:  # the reference stays in the report (for a caller's own checks)
        report.update(verify_llama_cpp(gguf_path, ids, reference, outtype, out), reference=reference, input_ids=ids)
    return report


def read_metadata(path: Path) -> dict:
    """GGUF key-value metadata (arrays left out) and tensor names, read with the gguf package."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or len(field.types) != 1:
            continue  # header fields and arrays (the vocabulary)
        meta[key] = field.contents()
    tensors = {t.name: t for t in reader.tensors}
    return {"fields": meta, "tensors": tensors}


def metadata_problems(path: Path, config: dict) -> list[str]:
    """What the GGUF says differently from config.json about the context and RoPE; [] if nothing."""
    meta = read_metadata(path)
    f = meta["fields"]
    arch = f.get("general.architecture", "?")
    rp = config["rope_parameters"]
    rt = rp.get("rope_type", "default")
    expected = {f"{arch}.context_length": config["max_position_embeddings"], f"{arch}.rope.freq_base": rp["rope_theta"]}
    if rt == "linear":
        expected.update({f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": rp["factor"]})
    elif rt == "yarn":
        expected.update({f"{arch}.rope.scaling.type": "yarn", f"{arch}.rope.scaling.factor": rp["factor"],
                         f"{arch}.rope.scaling.original_context_length": rp["original_max_position_embeddings"]})
        for key in ("beta_fast", "beta_slow"):
            if rp.get(key) is not None:
                expected[f"{arch}.rope.scaling.yarn_{key}"] = rp[key]
    out = []
    for key, want in expected.items():
        got = f.get(key)
        same = got == want if isinstance(want, str) else got is not None and abs(float(got) - want) <= 1e-6 * abs(want)
        if not same:
            out.append(f"{key} is {got!r}, config.json says {want!r}")
    if rt in ("default", "llama3"):  # llama3 lives in the rope_freqs tensor, not in the scaling fields
        stype, sfactor = f.get(f"{arch}.rope.scaling.type"), f.get(f"{arch}.rope.scaling.factor")
        if stype not in (None, "none") or sfactor not in (None, 1.0):
            out.append(f"{arch}.rope.scaling is {stype!r} x{sfactor}, config.json has rope_type {rt!r}")
    if rt == "llama3":
        out += _llama3_problems(meta["tensors"].get("rope_freqs.weight"), config)
    return out


def _llama3_problems(tensor, config: dict) -> list[str]:
    """llama.cpp divides each pair's frequency by the `rope_freqs` factor: it must equal transformers' default /
    llama3 inverse frequency ratio."""
    if tensor is None:
        return ["no rope_freqs tensor: llama.cpp would run llama3 unscaled"]
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = AutoConfig.for_model(**config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    default, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    want = default / scaled
    got = torch.from_numpy(tensor.data.copy()).float().flatten()
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5):
        return [f"rope_freqs {got.tolist()[:4]}... differs from transformers' llama3 factors {want.tolist()[:4]}..."]
    return []


# Runs in a fresh interpreter (-I) that never imports longctx: llama.cpp's greedy continuation of the input ids, its
# logits at each step (the last position's row, llama_get_logits_ith), and its tokenization of a fixed text.
LLAMA_CPP_SCRIPT = r"""
import json, os, sys
import numpy as np
import llama_cpp
gguf_path, data_path = sys.argv[1:3]
data = json.load(open(data_path))
ids, n_new, threads = data["input_ids"], data["n_new"], data["threads"]
llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=len(ids) + n_new, n_batch=512, n_threads=threads,
                      n_threads_batch=threads, seed=0, verbose=False)
tokens, logits = [], []
llm.eval(ids)
for i in range(n_new):
    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    tokens.append(int(row.argmax()))
    logits.append(row)
    if i + 1 < n_new:
        llm.eval([tokens[-1]])
np.save(data_path + ".npy", np.stack(logits))
text_ids = llm.tokenize(data["text"].encode("utf-8"), add_bos=False, special=False)
print(json.dumps({"tokens": tokens, "text_ids": text_ids, "version": llama_cpp.__version__,
                  "longctx_imported": sorted(m for m in sys.modules if m.split(".")[0] == "longctx")}))
"""


def run_llama_cpp(gguf_path: Path, ids: list[int], n_new: int, text: str) -> dict:
    """llama.cpp's greedy tokens and step logits [n_new, vocab] for `ids`, and its token ids of `text`."""
    import numpy as np

    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "input.json"
        data_path.write_text(json.dumps({"input_ids": ids, "n_new": n_new, "threads": threads, "text": text}))
        proc = subprocess.run([sys.executable, "-I", "-c", LLAMA_CPP_SCRIPT, str(gguf_path.resolve()),
                               str(data_path)], capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            raise GgufError(f"llama.cpp could not load or run {gguf_path}:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["logits"] = torch.from_numpy(np.load(str(data_path) + ".npy"))
    if result["longctx_imported"]:
        raise GgufError(f"the llama.cpp check is void: its process imported {result['longctx_imported']}")
    return result


def compare(llama: dict, reference: dict, outtype: str) -> list[str]:
    """What differs between llama.cpp's greedy continuation and transformers' (`reference`: tokens, logits)."""
    ref_tokens, ref_logits = reference["tokens"], reference["logits"]
    n = min(len(ref_tokens), len(llama["tokens"]))
    diff = (llama["logits"][:n].float() - ref_logits[:n].float()).abs().max().item()
    atol = llama_cpp_atol(outtype, ref_logits)
    problems = []
    first = next((i for i in range(n) if llama["tokens"][i] != ref_tokens[i]), None)
    if first is not None or len(llama["tokens"]) != len(ref_tokens):
        problems.append(f"greedy tokens differ from step {first}: llama.cpp {llama['tokens']}, transformers "
                        f"{ref_tokens}")
    if not diff <= atol:
        problems.append(f"logits differ by up to {diff:.3g} (tolerance {atol:.3g})")
    return problems


def verify_llama_cpp(gguf_path: Path, ids: torch.Tensor, reference: dict, outtype: str, hf_dir: Path) -> dict:
    """llama.cpp continues `ids` as transformers did (exact outtypes), and tokenizes a fixed text alike."""
    from transformers import AutoTokenizer

    llama = run_llama_cpp(gguf_path, ids[0].tolist(), len(reference["tokens"]), TOKENIZER_TEXT)
    hf_ids = AutoTokenizer.from_pretrained(str(hf_dir))(TOKENIZER_TEXT, add_special_tokens=False)["input_ids"]
    problems = compare(llama, reference, outtype)
    if llama["text_ids"] != hf_ids:
        problems.append(f"llama.cpp tokenizes {TOKENIZER_TEXT!r} as {llama['text_ids']}, the Hugging Face tokenizer "
                        f"as {hf_ids}")
    diff = (llama["logits"].float() - reference["logits"].float()).abs().max().item()
    report = {"tokens": llama["tokens"], "max_abs_diff": diff, "llama_cpp_python": llama["version"],
              "prompt_tokens": ids.shape[1]}
    if outtype not in EXACT_OUTTYPES:
        log.info("gguf %s: llama.cpp ran it; not compared token by token (%s)", outtype,
                 "; ".join(problems) or "same greedy tokens")
        return {**report, "llama_cpp_verified": False, "differences": problems}
    if problems:
        raise GgufError(f"{gguf_path.name}: llama.cpp does not reproduce transformers on the {ids.shape[1]}-token "
                        "input (longer than the original context): " + "; ".join(problems))
    log.info("gguf verified: llama.cpp continues the %d-token input with transformers' %d greedy tokens "
             "(max |logit diff| %.3g)", ids.shape[1], len(llama["tokens"]), diff)
    return {**report, "llama_cpp_verified": True}
