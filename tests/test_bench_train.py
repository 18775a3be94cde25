"""scripts/bench_train.py's model-FLOP count (the MFU numerator) against torch's own FlopCounterMode on a real
forward + backward of a tiny Llama, LoRA + embed/norm and full fine-tuning."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_train imports benchlib from its own folder
_spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
bt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bt)


@pytest.mark.parametrize("full_ft", [False, True])
def test_step_flops_match_torchs_flop_counter(full_ft):
    from transformers import LlamaForCausalLM

    from longctx.model import add_lora

    n, r = 96, 4
    args = argparse.Namespace(hidden=64, intermediate=160, layers=2, heads=4, vocab=512)
    cfg = bt.model_config(args, n)
    cfg._attn_implementation = "eager"  # QK^T and PV as plain matmuls, which the counter sees
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if not full_ft:
        model = add_lora(model, r=r, gradient_checkpointing=False)
    ids = torch.randint(0, args.vocab, (1, n))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()

    linear_only = bt.step_flops(cfg, n, "s2", full_ft, r, ratio=0.0)  # a group of 0 keys: no attention term
    causal = bt.step_flops(cfg, n, "full", full_ft, r, ratio=0.25) - linear_only
    assert linear_only > 0 and causal > 0
    # eager attention computes the whole N x N square, masked: twice the causal half that step_flops counts
    assert counter.get_total_flops() == linear_only + 2 * causal
