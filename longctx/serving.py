"""How serving runtimes read an export's RoPE scaling: transformers 4.x's config fields, llama.cpp, vLLM.

    fields = legacy_rope_fields(config["rope_parameters"])     # {"rope_theta": ..., "rope_scaling": {...}}
    problems = llama_cpp_problems(config["rope_parameters"], "llama")   # [] if GGUF/llama.cpp can express it
    flags = llama_cpp_flags(config["rope_parameters"], 16384)  # "--ctx-size 16384 --rope-scaling yarn ..."

Runtimes have each lost the scaling at some point since configs moved from `rope_scaling` to `rope_parameters`
(llama.cpp #18013, SGLang #26187, unsloth #3083; issue 15), so an export writes both spellings with the same
numbers and its model card names the flags that reproduce the scaling where a runtime needs them.

What llama.cpp can express (read from llama.cpp as vendored in llama-cpp-python 0.3.36: its converter
`conversion/base.py` `set_gguf_parameters`, `conversion/llama.py` `generate_extra_tensors`, and
`src/llama-context.cpp`, `src/llama-model.cpp`):
- default (and longctx's static `ntk`, which exports as default with a new base): `rope.freq_base`;
- linear: `rope.scaling.type linear` + `rope.scaling.factor`;
- yarn: type, factor, `rope.scaling.original_context_length`. llama.cpp applies the paper's attention temperature
  0.1 ln(factor) + 1 itself, floors/ceils the correction range (transformers' truncate=True) and, for Llama-family
  architectures, reads neither beta_fast/beta_slow (fixed at 32/1) nor yarn_attn_factor nor mscale from the file;
- llama3: the converter writes the per-pair factors as the `rope_freqs` tensor, for the Llama/Mistral converter
  class only;
- dynamic NTK: no GGUF field (its base changes with the sequence length); longrope: the Llama converter writes the
  type but not the per-pair factors (only Phi-3's converter does).
"""

from __future__ import annotations

import json
import math
from typing import Any

LEGACY_EXCLUDED = ("rope_theta", "partial_rotary_factor")  # top-level fields in transformers 4.x
YARN_DEFAULTS = {"beta_fast": 32, "beta_slow": 1}  # llama.cpp's fixed values (and transformers' defaults)
LLAMA_CPP_LLAMA3 = ("llama", "mistral")  # model types whose llama.cpp converter writes llama3's rope_freqs


def global_rope(rope_parameters: dict[str, Any]) -> dict[str, Any]:
    """The scaling that sets the context: the global layers' dict when it is given per layer type (Gemma-3's
    {"full_attention": ..., "sliding_attention": ...}; the sliding layers never see past their window), else itself."""
    rp = rope_parameters
    return rp["full_attention"] if isinstance(rp.get("full_attention"), dict) else rp


def legacy_rope_fields(rope_parameters: dict[str, Any]) -> dict[str, Any]:
    """The transformers-4 spelling of `rope_parameters`: top-level `rope_theta` (and `partial_rotary_factor`) and,
    for a scaled type, `rope_scaling` with the same keys otherwise. transformers 5 itself prefers `rope_scaling`
    over `rope_parameters` when both are in config.json (`convert_rope_params_to_dict`), so they must agree.
    longrope also gets a top-level `original_max_position_embeddings`: transformers 4.x reads Phi-3's layout there
    and takes max_position_embeddings as the original length without it."""
    rp = rope_parameters
    if isinstance(rp.get("full_attention"), dict):  # per layer type (Gemma-3): transformers 4 kept the global layers'
        fields = legacy_rope_fields(rp["full_attention"])  # theta and scaling at the top, the sliding layers' theta
        local = rp.get("sliding_attention") or {}  # in rope_local_base_freq
        return fields | ({"rope_local_base_freq": local["rope_theta"]} if "rope_theta" in local else {})
    fields: dict[str, Any] = {"rope_theta": rp["rope_theta"]}
    if "partial_rotary_factor" in rp:
        fields["partial_rotary_factor"] = rp["partial_rotary_factor"]
    if rp.get("rope_type", "default") != "default":
        fields["rope_scaling"] = {k: v for k, v in rp.items() if k not in LEGACY_EXCLUDED}
        if rp["rope_type"] == "longrope":
            fields["original_max_position_embeddings"] = rp["original_max_position_embeddings"]
    return fields


def legacy_factor_mismatch(rope_parameters: dict[str, Any], max_position_embeddings: int) -> str | None:
    """transformers 4.45-4.5x recompute the yarn (and longrope) factor as max_position_embeddings / original length
    and ignore the written one; a sentence when that differs from `factor`, else None."""
    rp = global_rope(rope_parameters)
    if rp.get("rope_type") not in ("yarn", "longrope") or "factor" not in rp:
        return None
    implied = max_position_embeddings / rp["original_max_position_embeddings"]
    if math.isclose(implied, rp["factor"], rel_tol=1e-9):
        return None
    return (f"max_position_embeddings / original_max_position_embeddings = {implied:g} differs from factor "
            f"{rp['factor']:g}: transformers 4.x computes {rp['rope_type']} with {implied:g}; set "
            "rope.max_position_embeddings = factor x original for the same numbers everywhere")


def llama_cpp_problems(rope_parameters: dict[str, Any], model_type: str) -> list[str]:
    """Why llama.cpp (GGUF) cannot reproduce this scaling, one sentence each; [] when it can."""
    rp = rope_parameters
    rt = rp.get("rope_type", "default")
    if rt in ("default", "linear"):
        return []
    if rt == "dynamic":
        return ["rope_type 'dynamic' (dynamic NTK) has no GGUF field: its base changes with the sequence length; "
                "export a static type (linear, yarn, ntk) for llama.cpp"]
    if rt == "longrope":
        return ["rope_type 'longrope': llama.cpp's converter writes the per-pair factors for Phi-3 only, not for "
                f"{model_type!r}"]
    if rt == "llama3":
        return [] if model_type in LLAMA_CPP_LLAMA3 else [
            f"rope_type 'llama3': llama.cpp's converter writes its factors only for {', '.join(LLAMA_CPP_LLAMA3)}, "
            f"not for {model_type!r}"]
    if rt == "yarn":
        out = []
        for key, value in YARN_DEFAULTS.items():
            if rp.get(key) not in (None, value):
                out.append(f"yarn {key}={rp[key]:g}: llama.cpp fixes it at {value} for Llama-family models")
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if rp.get(key) is not None:
                out.append(f"yarn {key}={rp[key]:g}: llama.cpp applies only the default temperature "
                           "0.1 ln(factor) + 1 for Llama-family models")
        if rp.get("truncate") is False:
            out.append("yarn truncate=false: llama.cpp always rounds the correction range (truncate=true)")
        return out
    return [f"rope_type {rt!r} is unknown to llama.cpp"]


def llama_cpp_flags(rope_parameters: dict[str, Any], context: int) -> str:
    """llama.cpp command-line flags (llama-server, llama-cli; common/arg.cpp) that reproduce the scaling for a GGUF
    file that lacks it in its metadata. A GGUF from `longctx export --gguf` carries it and needs only --ctx-size."""
    rp = rope_parameters
    rt = rp.get("rope_type", "default")
    flags = [f"--ctx-size {context}"]
    if rt == "default":
        flags.append(f"--rope-scaling none --rope-freq-base {rp['rope_theta']:g}")
    elif rt == "linear":
        flags.append(f"--rope-scaling linear --rope-scale {rp['factor']:g}")
    elif rt == "yarn":
        flags.append(f"--rope-scaling yarn --rope-scale {rp['factor']:g} "
                     f"--yarn-orig-ctx {rp['original_max_position_embeddings']}")
    # llama3 has no flag: llama.cpp reads it only from the GGUF's rope_freqs tensor.
    return " ".join(flags)


def vllm_command(model: str, rope_parameters: dict[str, Any], context: int, overrides: bool) -> str:
    """`vllm serve`: vLLM reads the scaling from config.json; `overrides` adds it as `--hf-overrides` (vLLM's
    current spelling; its older `--rope-scaling` flag was removed), for a model directory without it."""
    cmd = f"vllm serve {model} --max-model-len {context}"
    if overrides:
        cmd += " --hf-overrides '" + json.dumps({"rope_parameters": rope_parameters,
                                                  "max_position_embeddings": context}, sort_keys=True) + "'"
    return cmd
