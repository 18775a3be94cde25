"""A micro base model for end-to-end tests: a BPE tokenizer and a random 2-layer Llama (or another family, BLOOM
and MPT included), built in a second."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM,
                          MptConfig, MptForCausalLM, PreTrainedTokenizerFast)


def make_micro_base(path: Path, max_pos: int = 64, seed: int = 0, family: str = "llama", **extra) -> Path:
    """Save tokenizer + model to `path` (HF format) and return it; `family`: a model type (reference.tiny_config;
    bloom and mpt here: BLOOM configs carry no context length), `extra`: config fields (e.g. a native
    rope_parameters)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "string.py", "bisect.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    ids = dict(vocab_size=len(fast), eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id,
               pad_token_id=fast.pad_token_id)
    if family == "bloom":
        cls, cfg = BloomForCausalLM, BloomConfig(hidden_size=32, n_head=4, n_layer=2, **ids)
    elif family == "mpt":
        cls, cfg = MptForCausalLM, MptConfig(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=max_pos,
                                             **ids)
    elif family == "llama":
        cls, cfg = LlamaForCausalLM, LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                                 num_hidden_layers=2, intermediate_size=64, max_position_embeddings=max_pos,
                                                 tie_word_embeddings=True, **ids)
    else:
        from reference import tiny_config

        cfg = tiny_config(family, max_pos=max_pos, vocab=len(fast), **extra)
        cfg.pad_token_id = cfg.bos_token_id = cfg.eos_token_id = fast.eos_token_id
        cls = AutoModelForCausalLM.from_config
    torch.manual_seed(seed)
    cls(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def trained_extras(final: Path) -> dict[str, torch.Tensor]:
    """The embed/norm weights a run trained, by their plain transformers names, from RUN/final (or a checkpoint):
    longctx's trainable_params.safetensors where it wrote one, else the adapter's PEFT modules_to_save entries
    (issue 15: a plain PEFT adapter), whose saved names are `base_model.model.<name>` (PEFT's own spelling)."""
    from safetensors.torch import load_file

    from longctx import rundir
    from longctx.model import PEFT_PREFIX

    final = Path(final)
    if (final / rundir.TRAINABLE).exists():
        return load_file(str(final / rundir.TRAINABLE))
    adapter = load_file(str(final / "adapter_model.safetensors"))
    return {k[len(PEFT_PREFIX):]: v for k, v in adapter.items() if "lora_" not in k}
