"""Load the base model and tokenizer; add LoRA (or QLoRA) with trainable embedding and norm layers (LongLoRA+).

    model = load_model("HuggingFaceTB/SmolLM2-135M", dtype="bfloat16", quantization="4bit")
    model = add_lora(model, r=8, alpha=16, trainable_params=("embed", "norm"))
    extras = trainable_state_dict(model)          # save next to the adapter: {"model.embed_tokens.weight": ...}
    load_trainable_state_dict(other_model, extras)

Full fine-tuning: don't call `add_lora` (every parameter of a loaded model already requires grad, so
`make_trainable` has nothing to add); call `prepare_for_training(model)` for checkpointing and `use_cache`.

Names in `trainable_state_dict` are those of the plain transformers model ("model.norm.weight"), the same with
or without the PEFT wrapper, so they load into a fresh, a LoRA-wrapped or a merged model alike. LongLoRA kept
them out of the adapter and sliced a hard-coded prefix off to recover them (issues #53, #98); its QLoRA path
lost them altogether (#123). In RUN/final, `add_modules_to_save` writes them into the adapter as PEFT's own
`modules_to_save`, so plain PEFT loads the whole trained model (issue 15).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GgufConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

from longctx import dist, families
from longctx.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LONGLORA_TARGETS = families.LONGLORA_TARGETS


def _split_gguf(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """'dir/model.gguf' -> ('dir', 'model.gguf'); transformers wants the directory (or hub id) and the file apart."""
    if not name_or_path.endswith(".gguf"):
        return name_or_path, gguf_file
    directory, name = os.path.split(name_or_path)
    if gguf_file is not None and gguf_file != name:
        raise ValueError(f"name_or_path names the GGUF file {name!r}, but gguf_file={gguf_file!r}; give one of them")
    return directory or ".", name


def is_hub_id(name: str) -> bool:
    """'owner/name' that is no local path: what transformers looks up on the model hub."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(".gguf") \
        and not Path(name).exists()


def absolute_source(name_or_path: str) -> str:
    """A local model path made absolute (recorded so, a run's final/ loads from any working directory); a hub id
    as it is."""
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.exists() else name_or_path


def read_config(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                key: str = "model.name_or_path"):
    """The base model's transformers config (config.json, or a GGUF file's metadata, which also reads every tensor
    header, so a truncated GGUF fails here); one ConfigError naming `key` when the model is missing, is not a model
    or cannot be read. Train, eval, export and plan call it before loading anything."""
    from transformers import AutoConfig

    p = Path(name_or_path)
    if not p.exists() and not is_hub_id(name_or_path):
        raise ConfigError(f"{key}: {name_or_path} does not exist (expected a Hugging Face model directory, a .gguf "
                          "file or a hub id such as HuggingFaceTB/SmolLM2-135M)")
    directory, gguf = _split_gguf(name_or_path, gguf_file)
    if p.is_dir() and gguf is None and not (p / "config.json").is_file():
        raise ConfigError(f"{key}: {name_or_path} is a directory without config.json: not a Hugging Face model "
                          "directory (for a GGUF file in it, set model.gguf_file)")
    if gguf is not None and Path(directory).is_dir() and not (Path(directory) / gguf).is_file():
        raise ConfigError(f"{key}: GGUF file {Path(directory) / gguf} does not exist")
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code,
                                          **({"gguf_file": gguf} if gguf else {}))
    except Exception as e:  # noqa: BLE001  OSError, ValueError, struct.error from a truncated GGUF, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = f"the GGUF file {gguf} (truncated or not a GGUF file?)" if gguf else f"the model config of {name_or_path!r}"
        raise ConfigError(f"{key}: could not read {what}: {reason}; a model directory needs its config.json, a hub "
                          "id needs the network or the hub cache") from None


def load_model(name_or_path: str, dtype: str = "float32", quantization: str | None = None,
               gguf_file: str | None = None, trust_remote_code: bool = False,
               attn_implementation: str | None = None) -> PreTrainedModel:
    """A causal LM from a Hugging Face directory, a hub id, or a GGUF file (dequantized to `dtype`).

    attn_implementation None: transformers' choice, SDPA wherever the model supports it (eager for Gemma-2, whose
    attention soft-capping SDPA cannot do; longctx.families).

    quantization="4bit": bitsandbytes NF4 with double quantization, computing in `dtype` (QLoRA); `add_lora`
    then prepares it for k-bit training. bitsandbytes >= 0.45 also runs 4-bit on the CPU.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantization not in (None, "4bit"):
        raise ValueError(f"quantization must be None or '4bit', got {quantization!r}")
    name_or_path, gguf_file = _split_gguf(name_or_path, gguf_file)
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    if gguf_file is not None:
        if quantization:
            raise ValueError("quantization='4bit' cannot be combined with a GGUF file (transformers loads GGUF "
                             "weights dequantized only); use a Hugging Face directory or hub id for QLoRA")
        # Dequantize every weight into a plain dense model. Left to itself transformers keeps a GGUF quantizer on
        # the model, and with it attached Trainer refuses to train and save_pretrained refuses to save.
        kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    elif quantization == "4bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError("quantization='4bit' needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from e
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[dtype])
        # A 4-bit model cannot be moved after loading: put it on this process's device now (LongQLoRA does the same).
        kwargs["device_map"] = {"": dist.local_device()}
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def load_config(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The model config of a Hugging Face directory, a hub id or a GGUF file, as `load_model` reads it."""
    name_or_path, gguf_file = _split_gguf(name_or_path, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)


def load_tokenizer(name_or_path: str, gguf_file: str | None = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer, with pad = eos when it has no pad token (padding positions are masked out of the loss)."""
    name_or_path, gguf_file = _split_gguf(name_or_path, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare_for_training(model: PreTrainedModel, gradient_checkpointing: bool = True) -> PreTrainedModel:
    """No KV cache while training; non-reentrant activation checkpointing if asked.

    Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings (plain LoRA) still pass
    gradients to the adapters; transformers also hooks the input embeddings itself (enable_input_require_grads).
    """
    model.config.use_cache = False
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def add_lora(model: PreTrainedModel, r: int = 8, alpha: float = 16, dropout: float = 0.0,
             target_modules: Sequence[str] | str = LONGLORA_TARGETS,
             trainable_params: Sequence[str] = ("embed", "norm"), gradient_checkpointing: bool = True):
    """Wrap in PEFT LoRA (LongLoRA: r=8, alpha=16, q/k/v/o) and make embed/norm fully trainable; a PeftModel.

    target_modules="all-linear" adapts every linear layer except the output head (PEFT's rule). The LongLoRA default
    (q/k/v/o_proj) means the attention projections of BLOOM and MPT too (longctx.families.ALIBI_FAMILIES).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # Freezes the base and upcasts the non-quantized weights (norms, embeddings) to float32 (QLoRA).
        # Checkpointing is enabled below, the same way as without quantization.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    prepare_for_training(model, gradient_checkpointing)
    # LongLoRA's q/k/v/o_proj onto fused projections (Phi-3's qkv_proj, BLOOM's query_key_value, MPT's Wqkv);
    # ValueError for a partial fused set
    targets = families.lora_targets(model.config.model_type, target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if trainable_params:
        make_trainable(model, trainable_params)
    return model


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters under the plain transformers names: no PEFT prefix, no '.base_layer' of wrapped layers.

    named_parameters() lists a tied weight once (embed_tokens; lm_head shares it), so it is saved once.
    """
    return {name.replace(".base_layer", ""): p for name, p in _base(model).named_parameters()}


def _is_lora(name: str) -> bool:
    return "lora_" in name


def make_trainable(model: torch.nn.Module, trainable_params: Sequence[str]) -> list[str]:
    """Set requires_grad on every non-LoRA parameter whose name contains one of the substrings; their names.

    In place, on the base model's own parameters: no copy (PEFT's modules_to_save would copy them, LongLoRA
    #79) and a tied embedding stays tied, so lm_head trains with it. "embed" and "norm" also match BLOOM's ln_f
    and MPT's wte (longctx.families.trainable_aliases).
    """
    params = {n: p for n, p in _named_parameters(model).items() if not _is_lora(n)}
    aliases = families.trainable_aliases(getattr(_base(model).config, "model_type", None))
    names = []
    for key in trainable_params:
        matched = [n for n in params if any(k in n for k in aliases.get(key, (key,)))]
        if not matched:
            raise ValueError(f"trainable_params: {key!r} matches no parameter name; names look like "
                             f"{', '.join(list(params)[:3])}, ..., {list(params)[-1]}")
        names += [n for n in matched if n not in names]
    for n in names:
        if not params[n].is_floating_point():
            raise ValueError(f"trainable_params: {n} is quantized ({params[n].dtype}) and cannot be trained")
        params[n].requires_grad_(True)
    return names


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights other than LoRA's (embed/norm; everything under full fine-tuning), detached."""
    return {n: p.detach() for n, p in _named_parameters(model).items() if p.requires_grad and not _is_lora(n)}


def load_trainable_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from `trainable_state_dict`) into the model's parameters, in place (ties survive).

    Strict on what is given: every key must name a parameter with the same shape. Parameters it doesn't name
    are left alone, so it also loads into a fresh or merged model.
    """
    params = _named_parameters(model)
    unknown = [k for k in state if k not in params]
    if unknown:
        raise KeyError(f"load_trainable_state_dict: no parameter named {', '.join(unknown[:5])}"
                       f"{' ...' if len(unknown) > 5 else ''}; the model has e.g. {', '.join(list(params)[:3])}")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(params[k].shape)}" for k, v in state.items()
             if v.shape != params[k].shape]
    if wrong:
        raise ValueError(f"load_trainable_state_dict: shape mismatch (given vs model): {'; '.join(wrong[:5])}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), a tied weight counted once and 4-bit weights by their unpacked size."""
    trainable = total = 0
    for p in _named_parameters(model).values():
        # bitsandbytes packs two 4-bit values per byte of its storage dtype.
        n = p.numel() * 2 * p.element_size() if type(p).__name__ == "Params4bit" else p.numel()
        n = getattr(p, "ds_numel", n)  # ZeRO-3 keeps a shard here; ds_numel is the whole parameter
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


PEFT_PREFIX = "base_model.model."  # PEFT's saved names: this prefix + the plain transformers name


def add_modules_to_save(adapter_dir: str | Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Write `state` (`trainable_state_dict`: embed/norm) into the PEFT adapter saved in `adapter_dir` as PEFT's
    `modules_to_save`, so `PeftModel.from_pretrained(base, adapter_dir)` alone loads the trained model.

    adapter_config.json lists the modules (full paths: PEFT matches names by suffix, and "norm" alone would also
    match every layer's norms); adapter_model.safetensors gets their weights under the names PEFT's own
    `get_peft_model_state_dict` gives them. A tied output head (lm_head = embed_tokens) gets PEFT's
    `ensure_weight_tying` (PEFT >= 0.18), which ties its copy to the trained embedding, and its weight is saved
    too, as PEFT saves it. Training never uses modules_to_save (it would copy each weight, LongLoRA #79); this only
    changes how RUN/final is written. Returns False, writing nothing, when a trained parameter belongs to a
    LoRA-adapted layer (PEFT cannot wrap one module both ways): the caller keeps the weights in its own file.
    """
    from safetensors.torch import load_file, save_file

    base = _base(model)
    raw = dict(base.named_parameters(remove_duplicate=False))
    if any(n.replace(".base_layer", "") in state and ".base_layer" in n for n in raw):
        return False
    modules = sorted({name.rsplit(".", 1)[0] for name in state})
    by_tensor = {id(raw[n]): n for n in state}
    tied = {n: by_tensor[id(p)] for n, p in raw.items() if n not in state and id(p) in by_tensor}
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    config = json.loads(config_path.read_text())
    config["modules_to_save"] = sorted(set(config.get("modules_to_save") or []) | set(modules))
    if tied:
        config["ensure_weight_tying"] = True
    tensors = load_file(str(weights_path))
    tensors.update({PEFT_PREFIX + n: v.detach().contiguous() for n, v in state.items()})
    tensors.update({PEFT_PREFIX + alias: state[src].detach().clone().contiguous() for alias, src in tied.items()})
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True
