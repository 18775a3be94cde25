"""longctx.loss: the chunked causal-LM loss equals transformers' own loss and gradients; it saves no T x V tensor.

CPU, tiny random Llamas, seconds; plus one short end-to-end run with the chunked loss on and off.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from longctx.loss import causal_lm_loss, lm_head_passthrough, shift_causal_labels, token_nll
from longctx.model import add_lora

ROOT = Path(__file__).resolve().parents[1]
VOCAB, T = 300, 37  # T x batch 2 = 74 tokens: chunk 7 does not divide it


def tiny(tie: bool, dtype=torch.float32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(dtype)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, T), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100   # a masked prompt
    labels[1, 30:] = -100  # padding
    labels[1, 11] = -100
    return ids, labels


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def chunked(model, ids, labels, **kw) -> torch.Tensor:
    head = model.get_output_embeddings()
    with lm_head_passthrough(head) as seen:
        out = model(input_ids=ids)
    assert out.logits is seen["hidden"] and out.logits.shape[-1] == head.in_features  # no logits were built
    return causal_lm_loss(seen["hidden"], head.weight, labels, bias=head.bias, compute_dtype=seen["dtype"], **kw)


def assert_same(model, ids, labels, tol, num_items=None, chunk_size=7):
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    ref = model(input_ids=ids, labels=labels, **extra).loss
    ref.backward()
    g_ref = grads(model)
    loss = chunked(model, ids, labels, chunk_size=chunk_size, **extra)
    loss.backward()
    g = grads(model)
    assert loss.dtype == ref.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= tol, (loss.item(), ref.item())
    assert g.keys() == g_ref.keys() and g
    for n in g_ref:
        assert (g[n] - g_ref[n]).abs().max().item() <= tol, n
    return g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("num_items", [None, 57])
@pytest.mark.parametrize("chunk_size", [7, 1, 4096])
def test_equals_transformers_loss_and_gradients(dtype, tie, num_items, chunk_size):
    model = tiny(tie, dtype)
    ids, labels = batch()
    # transformers upcasts (float64: casts) the logits to float32 for the softmax, so float64 is as close as that
    g = assert_same(model, ids, labels, 1e-5, num_items, chunk_size)
    # untied: the head's own gradient; tied: the head is embed_tokens, whose gradient is the reference's (above)
    assert ("lm_head.weight" in g) == (not tie) and "model.embed_tokens.weight" in g


def test_num_items_as_tensor_and_shift_labels():
    model = tiny(False)
    ids, labels = batch(seed=3)
    assert_same(model, ids, labels, 1e-5, num_items=torch.tensor(41))
    ref = model(input_ids=ids, labels=labels).loss
    loss = chunked(model, ids, None, shift_labels=shift_causal_labels(labels), chunk_size=5)
    assert abs(loss.item() - ref.item()) <= 1e-6


@pytest.mark.parametrize("tie", [False, True])
def test_lora_with_trainable_embed(tie):
    """LongLoRA+: LoRA on q/k/v/o plus embed/norm. Tied: the head IS the trainable embedding and gets gradient
    from the loss too; untied: the head is frozen and no head gradient is computed."""
    model = add_lora(tiny(tie), r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids, labels = batch(seed=5)
    head = model.get_base_model().lm_head
    assert head.weight.requires_grad == tie
    g = assert_same(model, ids, labels, 1e-5, num_items=torch.tensor(60))
    assert any("lora_A" in n for n in g) and not any("lm_head" in n for n in g)
    (embed,) = [g[n] for n in g if "embed_tokens" in n]
    # Rows of tokens that are never input get gradient only through the head: every one when tied, none untied.
    never_input = sorted(set(range(VOCAB)) - set(ids.flatten().tolist()))
    through_head = embed[never_input].abs().sum(-1) > 0
    assert len(never_input) > 100 and (through_head.all() if tie else not through_head.any())


@pytest.mark.parametrize("tie", [False, True])
def test_autocast_bf16_computes_the_head_in_bf16(tie):
    """Under autocast (bf16 mixed precision) the lm_head runs in bf16 as nn.Linear would: the same loss; gradients
    within bf16 rounding (the head's weight gradient is accumulated over chunks in float32)."""
    model = tiny(tie)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    g_ref = grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked(model, ids, labels, chunk_size=7)
    loss.backward()
    g = grads(model)
    assert abs(loss.item() - ref.item()) <= 1e-5
    for n in g_ref:
        assert (g[n] - g_ref[n]).abs().max() <= 2 ** -7 * g_ref[n].abs().max(), n


def test_bias_and_all_ignored():
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 10))
    labels[1, 4:] = -100
    logits = F.linear(hidden, weight, bias).float()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    ref_g = torch.autograd.grad(ref, (hidden, weight, bias))
    loss = causal_lm_loss(hidden, weight, labels, bias=bias, chunk_size=4)
    g = torch.autograd.grad(loss, (hidden, weight, bias))
    assert abs(loss.item() - ref.item()) <= 1e-6
    for a, b in zip(g, ref_g):
        assert a.dtype == b.dtype and (a - b).abs().max().item() <= 1e-7
    nothing = torch.full_like(labels, -100)
    assert torch.isnan(causal_lm_loss(hidden, weight, nothing)).item()  # as torch's mean over no tokens
    assert torch.isnan(F.cross_entropy(logits.reshape(-1, 50), nothing.reshape(-1))).item()


def saved_numels(fn) -> list[int]:
    """numel of every tensor autograd saves for backward while fn() builds the graph."""
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().backward()
    return sizes


def test_saves_no_tokens_x_vocab_tensor():
    torch.manual_seed(0)
    n, h, v = 1024, 16, 2048
    hidden = torch.randn(1, n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (1, n))
    plain = saved_numels(lambda: F.cross_entropy(F.linear(hidden, weight).float()[0, :-1], labels[0, 1:]))
    chunk = saved_numels(lambda: causal_lm_loss(hidden, weight, labels, chunk_size=128))
    assert max(plain) >= (n - 1) * v  # the plain path keeps the (log-softmax of the) logits for backward
    assert max(chunk) < n * v / 8 and sum(chunk) < sum(plain) / 8
    assert sum(chunk) <= hidden.numel() + weight.numel() + 2 * n + 64  # hidden, weight, targets, log-sum-exp


# ---------------------------------------------------------------------------------------------------------------
# The trainer: compute_loss in process, and a short run with chunked_loss on and off.

def _trainer(model, tmp_path, **kw):
    from longctx.trainer import LongctxTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True)
    return LongctxTrainer(model=model, args=args, **kw)


def test_trainer_compute_loss_equals_plain(tmp_path):
    model = add_lora(tiny(True), r=4, alpha=8)
    ids, labels = batch(seed=7)
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    n = (labels[:, 1:] != -100).sum()
    model.train()
    plain_tr = _trainer(model, tmp_path, chunked_loss=False)
    ref = plain_tr.compute_loss(model, inputs, num_items_in_batch=n)
    ref.backward()
    g_ref = grads(model)
    tr = _trainer(model, tmp_path, chunked_loss=True, loss_chunk_size=9)
    loss = tr.compute_loss(model, inputs, num_items_in_batch=n)
    loss.backward()
    g = grads(model)
    assert tr.chunked_loss and tr._chunked_verified
    assert abs(loss.item() - ref.item()) <= 1e-5
    for k in g_ref:
        assert (g[k] - g_ref[k]).abs().max().item() <= 1e-5, k


def test_trainer_falls_back_when_logits_are_changed_after_the_head(tmp_path):
    """Gemma-2 softcaps its logits after the lm_head: the chunked loss would be wrong, so the plain one is used."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, final_logit_softcapping=3.0))
    model.train()
    ids, labels = batch()
    tr = _trainer(model, tmp_path, chunked_loss=True)
    loss = tr.compute_loss(model, {"input_ids": ids, "labels": labels})
    assert not tr.chunked_loss
    assert abs(loss.item() - model(input_ids=ids, labels=labels).loss.item()) <= 1e-6


def _run(tmp_path: Path, train_config, name: str, chunked: bool) -> tuple[Path, str]:
    out = tmp_path / name
    cfg = train_config(out, train={"gradient_accumulation_steps": 2, "gradient_checkpointing": True,
                                   "chunked_loss": chunked, "loss_chunk_size": 100})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


@pytest.mark.slow  # two train.py subprocesses: the end-to-end layer
def test_training_run_same_losses_with_chunked_loss_on_and_off(train_config, tmp_path):
    on, err_on = _run(tmp_path, train_config, "on", True)
    off, err_off = _run(tmp_path, train_config, "off", False)
    assert "chunked lm_head + cross-entropy, 100 tokens per chunk" in err_on
    assert "train.chunked_loss" not in err_off

    def losses(run):
        state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
        return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}

    a, b = losses(on), losses(off)
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    wa, wb = (load_file(str(r / "final" / "adapter_model.safetensors")) for r in (on, off))  # LoRA + embed/norm
    for k in wb:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-5, k


# ---------------------------------------------------------------------------------------------------------------
# token_nll: evaluation's per-token NLL without all logits (perplexity, per-position loss)

def reference_nll(model, ids) -> torch.Tensor:
    """The plain way: every logit, then cross-entropy of position t against token t + 1."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


def count_full_logits(model, ids, vocab: int) -> int:
    """How many [.., T, vocab] tensors the lm_head produced during token_nll (forward hook)."""
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        token_nll(model, ids, chunk_size=7)
    finally:
        handle.remove()
    return sum(1 for s in seen if s[-1] == vocab and s[-2] == ids.shape[1])


@pytest.mark.parametrize("tie", [False, True])
def test_token_nll_equals_full_logits_without_building_them(tie):
    model = tiny(tie).eval()
    ids, _ = batch()
    got = token_nll(model, ids, chunk_size=7)  # 36 predictions per row: chunks of 7 do not divide them
    assert got.shape == (2, T - 1)
    assert (got - reference_nll(model, ids)).abs().max().item() <= 1e-5
    assert count_full_logits(model, ids, VOCAB) == 0  # the lm_head passed its input through


def test_token_nll_through_peft_with_trained_embed():
    model = add_lora(tiny(True), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                     trainable_params=["embed", "norm"], gradient_checkpointing=False).eval()
    ids, _ = batch(3)
    assert (token_nll(model, ids, chunk_size=5) - reference_nll(model, ids)).abs().max().item() <= 1e-5


def test_token_nll_falls_back_when_logits_are_changed_after_the_head():
    """Gemma-2 softcaps after the lm_head: chunks of the head's output would be wrong, so all logits are built."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, final_logit_softcapping=0.05)).eval()
    ids, _ = batch()
    ref = reference_nll(model, ids)
    raw = model.get_output_embeddings()(model.model(input_ids=ids).last_hidden_state).float()  # not softcapped
    wrong = F.cross_entropy(raw[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    assert (wrong - ref).abs().max().item() > 1e-2  # softcapping changes the loss: the check below can fail
    assert (token_nll(model, ids, chunk_size=7) - ref).abs().max().item() <= 1e-5
