"""Sequence parallelism (issue 12): S² with the head offset of a DeepSpeed Ulysses rank, config validation, and the
real thing under torchrun against a 1-process run.

The simulated ranks hand each rank exactly what Ulysses' all-to-all hands it (docs/design.md §7): the whole
sequence for query heads [r*H/P, (r+1)*H/P), and kv heads [r*H_kv/P, ...) when P divides H_kv, else the kv heads
repeat_interleaved P/H_kv times with one per rank. Concatenating the ranks' outputs along the heads must give the
dense S² reference of the whole model (reference.py, built from the written rule).
"""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from longctx.attention import S2Settings, s2_attention_forward
from reference import dense_reference_attention, real_positions, s2_rule_mask

ROOT = Path(__file__).resolve().parents[1]

# (H, H_kv, P): plain GQA; kv replication (P > H_kv); odd P with a rank straddling H//2 (H=6, P=3: rank 1 holds
# heads 2, 3 and the split is at 3); straddling and replicated; one head per rank.
CASES = [(4, 2, 2), (4, 1, 2), (6, 3, 3), (6, 1, 3), (8, 2, 4), (4, 4, 4)]


class _Attention(torch.nn.Module):
    def __init__(self, settings: S2Settings):
        super().__init__()
        self.s2_settings = settings


def _rank_inputs(q, k, v, rank: int, P: int):
    """What rank `rank` holds after Ulysses' all-to-all (sequence shard -> head shard)."""
    H, H_kv = q.shape[1], k.shape[1]
    h = H // P
    if H_kv % P == 0:
        hk = H_kv // P
        return q[:, rank * h:(rank + 1) * h], k[:, rank * hk:(rank + 1) * hk], v[:, rank * hk:(rank + 1) * hk]
    rep = P // H_kv  # DeepSpeed: kv heads repeat_interleave'd so that each rank gets one
    return q[:, rank * h:(rank + 1) * h], k.repeat_interleave(rep, 1)[:, rank:rank + 1], \
        v.repeat_interleave(rep, 1)[:, rank:rank + 1]


def _simulated(q, k, v, P: int, settings: S2Settings, position_ids, offset: bool = True):
    outs = []
    for r in range(P):
        module = _Attention(replace(settings, sp_rank=r, sp_size=P) if offset else settings).train()
        out, _ = s2_attention_forward(module, *_rank_inputs(q, k, v, r, P), None, scaling=q.shape[-1] ** -0.5,
                                      position_ids=position_ids)
        outs.append(out)  # [B, T, H/P, D]
    return torch.cat(outs, dim=2)


def _inputs(H, H_kv, T=32, B=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, T, D, generator=g, dtype=torch.float64, requires_grad=True) for n in (H, H_kv, H_kv)]


DOCS = {
    "rows": ([[(0, 32)], [(0, 32)]], None),
    # document-aware packing: position_ids restart (the wrapper hands S² the gathered global position_ids)
    "packed": ([[(0, 10), (10, 3), (13, 19)], [(0, 32)]],
               torch.stack([torch.cat([torch.arange(10), torch.arange(3), torch.arange(19)]), torch.arange(32)])),
}


@pytest.mark.parametrize("H,H_kv,P", CASES)
@pytest.mark.parametrize("layout", DOCS)
def test_ranks_together_equal_the_dense_s2_reference(H, H_kv, P, layout):
    docs, pos = DOCS[layout]
    T, group = 32, 8
    q, k, v = _inputs(H, H_kv, T)
    ours = _simulated(q, k, v, P, S2Settings(group_size=group), pos)
    ref, _ = dense_reference_attention(s2_rule_mask(docs, T, group, H))(None, q, k, v, None, scaling=8 ** -0.5)
    real = real_positions(docs, T)
    torch.testing.assert_close(ours[real], ref[real], rtol=0, atol=1e-12)
    # gradients through every rank's piece, against the reference's
    w = torch.randn_like(ref)
    g_ours = torch.autograd.grad((ours[real] * w[real]).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref[real] * w[real]).sum(), (q, k, v))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("H,H_kv,P", [(4, 2, 2), (6, 3, 3)])
def test_without_the_head_offset_the_ranks_are_wrong(H, H_kv, P):
    """The bug the offset fixes (docs/design.md §7): each rank shifting half of its own heads runs without an
    error and differs from S²; this is what the test above would catch."""
    T, group = 32, 8
    q, k, v = _inputs(H, H_kv, T)
    naive = _simulated(q, k, v, P, S2Settings(group_size=group), None, offset=False)
    ref, _ = dense_reference_attention(s2_rule_mask([[(0, T)]] * 2, T, group, H))(None, q, k, v, None,
                                                                                  scaling=8 ** -0.5)
    assert (naive - ref).abs().max() > 1e-3


@pytest.mark.parametrize("H,P,expected", [(4, 2, [2, 0]), (6, 3, [2, 1, 0]), (8, 4, [2, 2, 0, 0]), (9, 3, [3, 1, 0])])
def test_shifted_from_is_the_global_split_in_local_heads(H, P, expected):
    """Local index of the first shifted head: global heads >= H//2 are shifted (docs/design.md §3)."""
    h = H // P
    got = [S2Settings(sp_rank=r, sp_size=P).shifted_from(h) for r in range(P)]
    assert got == expected
    assert [sum(1 for j in range(h) if r * h + j >= H // 2) for r in range(P)] == [h - s for s in got]
    assert S2Settings(shift=False, sp_rank=1, sp_size=P).shifted_from(h) == h


# ---------------------------------------------------------------------------------------------------------------
# Validation: every problem names train.sequence_parallel_size and what is allowed, before any model loads

BASE = {"model": {"name_or_path": "data/tiny-base"}, "train": {"seq_len": 1024, "sequence_parallel_size": 2,
                                                               "deepspeed": "configs/deepspeed/zero2.json"}}


@pytest.mark.parametrize("overrides,message", [
    (["train.deepspeed=null"], "train.sequence_parallel_size: 2 needs DeepSpeed"),
    (["train.seq_len=1025", "attention.type=full"], "train.sequence_parallel_size: 2 must divide train.seq_len=1025"),
    (["model.quantization=4bit", "lora.enabled=true"], "(QLoRA) is not supported"),
    (["train.gradient_accumulation_steps=3"], "2 must divide train.gradient_accumulation_steps=3"),
    (["train.sequence_parallel_size=0"], "train.sequence_parallel_size: must be >= 1, got 0"),
])
def test_bad_sequence_parallel_configs_are_refused(overrides, message, monkeypatch):
    from longctx.config import ConfigError, load_config

    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as e:
        load_config(data=BASE, overrides=overrides)
    assert message in str(e.value)


def test_a_good_sequence_parallel_config_loads(monkeypatch):
    from longctx.config import load_config

    monkeypatch.chdir(ROOT)
    assert load_config(data=BASE).train.sequence_parallel_size == 2
    assert load_config(data={"model": BASE["model"], "train": {"seq_len": 1024}}).train.sequence_parallel_size == 1


@pytest.mark.parametrize("H,H_kv,P,allowed", [
    (4, 2, 3, "allowed: 2, 4"),
    (9, 3, 2, "allowed: 3, 9"),  # SmolLM2-135M
    (32, 8, 16, None),  # Llama-3-8B at P = 16: kv heads replicated twice
    (32, 8, 64, "allowed: 2, 4, 8, 16, 32"),
    (4, 1, 4, None),
])
def test_heads_decide_which_sizes_deepspeed_accepts(H, H_kv, P, allowed):
    from longctx.sequence_parallel import model_problems
    from reference import tiny_config

    problems = model_problems(P, tiny_config(heads=H, kv_heads=H_kv))
    if allowed is None:
        assert problems == []
    else:
        assert len(problems) == 1 and f"train.sequence_parallel_size: {P} does not fit" in problems[0] \
            and allowed in problems[0]


def test_world_size_must_be_a_multiple_of_p():
    from longctx.sequence_parallel import world_problems

    assert world_problems(2, 4) == [] and world_problems(1, 3) == []
    assert "must divide the number of processes, 3" in world_problems(2, 3)[0]


def test_train_exits_2_without_enough_processes(micro, corpus, train_config, tmp_path):
    """One process, P = 2: exit 2 naming the key, before a model loads (no run directory is written)."""
    from test_train import run, write_config

    cfg = write_config(tmp_path / "c.yaml", train_config, tmp_path / "run")
    proc = run(cfg, "train.sequence_parallel_size=2", "train.deepspeed=configs/deepspeed/zero2.json", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "train.sequence_parallel_size: 2 must divide the number of processes, 1" in proc.stderr
    assert not (tmp_path / "run").exists()


def _short_documents(corpus: Path, dest: Path) -> Path:
    """The corpus cut into documents of 3 to 40 lines, one file each: rows of 128 tokens hold several."""
    dest.mkdir()
    lines = [line for f in sorted(corpus.iterdir()) for line in f.read_text().splitlines() if line.strip()][:3000]
    i = k = 0
    while i < len(lines):
        n = 3 + (k * 7) % 38
        (dest / f"doc{k:04d}.txt").write_text("\n".join(lines[i:i + n]) + "\n")
        i, k = i + n, k + 1
    return dest


# ---------------------------------------------------------------------------------------------------------------
# The real thing: torchrun, 2 processes, P = 2, gloo on the CPU, Trainer + DeepSpeed ZeRO-2, against one process

@pytest.mark.slow  # torchrun with two processes plus a 1-process run: 40-60 s per case on 2 CPU cores
@pytest.mark.parametrize("attention,zero,extra", [
    ("s2", "zero2", []), ("full", "zero2", []),
    ("s2", "zero3", []),  # ZeRO-3 averages SP gradients differently (sequence_parallel.zero_gradient_scale)
    ("s2", "zero2", ["lora.enabled=false"]),  # full fine-tuning
    # document-aware packing of short documents: position_ids restart inside rows (S² and, under SP, full
    # attention find the documents from the gathered position_ids; one process: transformers' packed mask)
    ("s2", "zero2", ["data.document_aware=true"]), ("full", "zero2", ["data.document_aware=true"]),
], ids=["s2", "full", "s2-zero3", "s2-full-finetuning", "s2-packed", "full-packed"])
def test_two_processes_at_p2_give_the_one_process_losses(micro, corpus, train_config, tmp_path, attention, zero, extra):
    """The first steps' losses and grad norms of `torchrun --nproc_per_node 2` with train.sequence_parallel_size=2
    (float32) equal the 1-process run's within 1e-5: the S² head offset, position_ids, the SP loss (whose gradient
    must not be P times too large: the grad norm shows it) and the data order all have to be right."""
    import json
    import os
    import subprocess
    import sys

    from test_train import run, write_config

    if "data.document_aware=true" in extra:
        corpus = _short_documents(corpus, tmp_path / "short")
    cfg = write_config(tmp_path / "c.yaml", train_config, tmp_path / "one", max_steps=3, save_steps=3)
    common = [f"attention.type={attention}", *extra]
    evaluation = not extra and zero == "zero2" and attention == "s2"
    if evaluation:  # in-training evaluation (dense, every rank) at the last step, then rank 0's after training
        common += ["eval.lengths=[64,128]", "eval.max_tokens=256", "eval.every=3"]
    run(cfg, *common)
    sp_run = tmp_path / "sp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), str(cfg), *common, f"train.output_dir={sp_run}",
                           "train.sequence_parallel_size=2", f"train.deepspeed=configs/deepspeed/{zero}.json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 2 x 2 x 1 = 4 sequences of 128 tokens (sequence parallel: 2 processes per sequence)" \
        in proc.stderr

    def history(run_dir):
        state = json.loads((run_dir / "checkpoint-3" / "trainer_state.json").read_text())
        return [(e["step"], e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e]

    if evaluation:
        def ppl(run_dir):
            state = json.loads((run_dir / "checkpoint-3" / "trainer_state.json").read_text())
            return [v for e in state["log_history"] if "ppl@64" in e for k, v in sorted(e.items())
                    if k.startswith("ppl@")]

        assert ppl(tmp_path / "one") and ppl(tmp_path / "one") == pytest.approx(ppl(sp_run), rel=1e-5)
        assert (sp_run / "eval" / "ppl.json").is_file()

    one, two = history(tmp_path / "one"), history(sp_run)
    assert [s for s, _, _ in one] == [s for s, _, _ in two] == [1, 2, 3]
    for (_, loss1, norm1), (_, loss2, norm2) in zip(one, two):
        assert abs(loss1 - loss2) <= 1e-5 and abs(norm1 - norm2) <= 1e-5 * max(1.0, norm1), (one, two)


# ---------------------------------------------------------------------------------------------------------------
# The SP loss: each rank's chunked loss over its shard, token-weighted over the group, against the plain loss

def _sp_loss_worker(rank, world, port, path):
    import os

    import torch.nn.functional as F

    from longctx import loss as loss_lib
    from longctx.sequence_parallel import token_weighted_mean

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    B, T, Hd, V = 2, 12, 8, 31
    hidden = torch.randn(B, T, Hd, generator=g, dtype=torch.float64)
    weight = torch.randn(V, Hd, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :7] = -100  # prompt tokens: rank 0's shard of row 0 scores one token, rank 1's all of its own
    shift = loss_lib.shift_causal_labels(labels)  # what UlyssesSPDataLoaderAdapter hands out as shift_labels
    n = T // world
    h = hidden[:, rank * n:(rank + 1) * n].clone().requires_grad_()
    w = weight.clone().requires_grad_()
    local_labels = shift[:, rank * n:(rank + 1) * n]
    total = loss_lib.causal_lm_loss(h, w, shift_labels=local_labels, num_items_in_batch=1, chunk_size=5)
    loss = token_weighted_mean(total, (local_labels != -100).sum(), group=torch.distributed.group.WORLD)
    loss.backward()
    grads = [torch.zeros_like(hidden[:, :n]) for _ in range(world)]
    torch.distributed.all_gather(grads, h.grad)
    torch.distributed.all_reduce(w.grad)  # DeepSpeed sums the SP ranks' gradients
    if rank == 0:
        ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ref = F.cross_entropy((ref_h @ ref_w.T).flatten(0, 1), shift.flatten(), ignore_index=-100)
        ref.backward()
        torch.save({"loss": loss.detach(), "ref": ref.detach(), "h": torch.cat(grads, 1), "ref_h": ref_h.grad,
                    "w": w.grad, "ref_w": ref_w.grad}, path)
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # three spawned processes, each importing transformers: about 35 s on 2 CPU cores
def test_sp_loss_equals_the_plain_loss_with_its_gradients(tmp_path, world=3):
    """Three gloo processes, shards of 4 tokens: the value on every rank is the whole sequence's mean
    loss, and the gradients summed over the ranks (as DeepSpeed sums them) are the plain loss's, also with a shard
    whose tokens are mostly ignored."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "out.pt"
    mp.spawn(_sp_loss_worker, args=(world, port, str(path)), nprocs=world)
    out = torch.load(path)
    # the chunked loss sums in float32 (loss.py), as transformers upcasts the logits
    torch.testing.assert_close(out["loss"].double(), out["ref"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["h"], out["ref_h"], rtol=0, atol=1e-6, check_dtype=False)
    torch.testing.assert_close(out["w"], out["ref_w"], rtol=0, atol=1e-6, check_dtype=False)


@pytest.mark.parametrize("attention", ["s2", "full"])
def test_remove_after_sequence_parallel_setup_restores_the_model(attention):
    """DeepSpeed installs its wrapper over the attention name process-wide with no undo and sets
    num_key_value_groups on the modules (kv replication); `prepare` puts both on the handle, so `remove()` leaves
    a model that computes exactly what it computed before, and a later S² model in the process is unwrapped."""
    import longctx
    from longctx import attention as s2
    from longctx.methods.rotary import attention_modules
    from longctx.sequence_parallel import prepare
    from reference import tiny_model
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model(heads=4, kv_heads=1)
    groups = [m.num_key_value_groups for m in attention_modules(model)]  # 4; eager attention repeats kv by it
    ids = torch.randint(0, 97, (2, 32))
    model.train()
    before = model(input_ids=ids, use_cache=False).logits
    handle = longctx.apply(model, rope={"rope_type": "linear", "factor": 2.0}, attention={"type": attention})
    prepare(handle, P=2, rank=1)
    assert all(m.s2_settings.sp_rank == 1 and m.s2_settings.sp_size == 2 for m in attention_modules(model))
    assert model.config._attn_implementation == s2.NAME
    # what UlyssesSPAttentionHF.register_with_transformers and its forward do (ulysses_sp.py l.566, l.317)
    ALL_ATTENTION_FUNCTIONS[s2.NAME] = lambda *a, **kw: (_ for _ in ()).throw(AssertionError("wrapped"))
    for m in attention_modules(model):
        m.num_key_value_groups = 2
    handle.remove()
    assert ALL_ATTENTION_FUNCTIONS[s2.NAME] is s2.s2_attention_forward
    assert all(not hasattr(m, "s2_settings") for m in attention_modules(model))
    assert [m.num_key_value_groups for m in attention_modules(model)] == groups
    torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, before, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The planner under SP

def test_plan_holds_n_over_p_tokens_per_process_and_partitions_over_the_world():
    """Under SP every activation term is that of N/P tokens (a process holds N/P tokens of every layer's input
    and, after the all-to-all, N tokens of H/P heads), while weights, gradients and optimizer state are those of
    the same world size without SP."""
    from transformers import LlamaConfig

    from longctx import plan

    llama3 = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256)
    kw = dict(dtype="bfloat16", zero_stage=3, world_size=8)
    sp = plan.estimate(llama3, seq_len=131072, sequence_parallel=8, **kw)
    short = plan.estimate(llama3, seq_len=131072 // 8, **kw)
    assert sp.parts == short.parts
    whole = plan.estimate(llama3, seq_len=131072, **kw)
    for part in (plan.WEIGHTS, plan.GRADIENTS, plan.OPTIMIZER):
        assert sp.parts[part] == whole.parts[part]
    assert sp.parts[plan.CHECKPOINTS] * 8 == whole.parts[plan.CHECKPOINTS]
    with pytest.raises(ValueError, match="sequence_parallel must divide world_size=8"):
        plan.estimate(llama3, seq_len=131072, sequence_parallel=3, **kw)


def test_plan_sequence_parallel_auto_picks_the_smallest_p_that_fits(tmp_path, capsys):
    from transformers import LlamaConfig

    from longctx.cli import main

    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path)
    base = ["plan", str(ROOT / "configs/llama3-8b-sp-128k.yaml"), f"model.name_or_path={tmp_path}", "--world-size",
            "8", "--device", "cuda", "--budget-gb", "80"]
    assert main(base + ["--sequence-parallel", "auto"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("P=")]
    assert [r[0] for r in rows] == ["P=1", "P=2", "P=4", "P=8"]  # 32 heads, 8 kv heads, 8 processes
    fits = [r[0] for r in rows if "(does" not in " ".join(r)]
    chosen = fits[0][2:]
    assert f"chosen: train.sequence_parallel_size={chosen} (data-parallel size {8 // int(chosen)})" in out
    # each row's peak is the plan of that P on its own, and the chosen one's breakdown follows
    for r in rows:
        assert main(base + ["--sequence-parallel", r[0][2:]]) == 0
        peak = next(line for line in capsys.readouterr().out.splitlines() if "peak (predicted)" in line)
        assert float(peak.split()[-1]) == pytest.approx(float(r[-2] if "(does" not in " ".join(r) else r[-5]),
                                                        abs=1e-3)
    assert main(base + ["--sequence-parallel", "3"]) == 2  # does not divide 8
    assert "--sequence-parallel: 3 must divide --world-size 8" in capsys.readouterr().err


@pytest.mark.slow  # a 1-process run and two torchrun launches (one killed): about 1.5 min on 2 CPU cores
def test_kill9_then_resume_under_sp_gives_uninterrupted_losses(micro, corpus, train_config, tmp_path):
    """torchrun P = 2 killed with SIGKILL (the whole process group) once checkpoint-2 exists, then rerun: it resumes
    from the newest complete checkpoint (Trainer's own batch skip fails on DeepSpeed's SP adapter;
    sequence_parallel.skip_trained_batches) and all 20 steps equal an uninterrupted 1-process run's. 20 steps: a
    step takes a fraction of a second here, and the kill must land before the end."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_train import run, write_config

    cfg = write_config(tmp_path / "c.yaml", train_config, tmp_path / "one", max_steps=20, save_steps=2)
    run(cfg)
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "train.py"), str(cfg),
           f"train.output_dir={cut}", "train.sequence_parallel_size=2", "train.deepspeed=configs/deepspeed/zero2.json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (cut / "checkpoint-2" / "longctx_complete.json").exists():
            assert proc.poll() is None and time.time() < deadline, "run ended before checkpoint-2"
            time.sleep(0.05)
    finally:
        import psutil

        # torchrun and both ranks (they run in sessions of their own), no chance to clean up
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait()
    assert not (cut / "final").exists()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr

    def history(run_dir):
        state = json.loads((run_dir / "checkpoint-20" / "trainer_state.json").read_text())
        return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}

    one, resumed = history(tmp_path / "one"), history(cut)
    assert sorted(resumed) == list(range(1, 21)) and all(abs(resumed[k] - one[k]) <= 1e-5 for k in one), (one, resumed)
