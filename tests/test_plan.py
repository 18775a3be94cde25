"""The memory planner against independent references: parameter counts of real transformers models and of PEFT,
the scaling of each term in N, V and the world size, the CLI, and the warning `train` logs before a run."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import longctx
from longctx import plan
from longctx import trainer as trainer_lib
from longctx.cli import main
from longctx.config import load_config
from longctx.families import FAMILIES
from longctx.model import add_lora
from reference import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
LLAMA2_7B = LlamaConfig()  # transformers' defaults are Llama-2-7B's shape
GiB = 2**30


def tiny_configs():
    return {
        "llama-untied": LlamaConfig(**TINY, num_key_value_heads=4, tie_word_embeddings=False),
        "llama-tied-bias": LlamaConfig(**TINY, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
                                       mlp_bias=True),
        "qwen2-gqa-tied": Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True),
        "qwen2-gqa-untied": Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=False),
        "qwen3-qk-norm": Qwen3Config(**TINY, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    }


def numel(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


@pytest.mark.parametrize("name", list(tiny_configs()))
def test_parameter_count_equals_transformers(name):
    config = tiny_configs()[name]
    model = AutoModelForCausalLM.from_config(config)
    assert sum(plan.parameter_counts(plan.Shape.of(config)).values()) == numel(model)


@pytest.mark.parametrize("config", [LLAMA2_7B, MistralConfig()], ids=["llama2-7b", "mistral-7b-gqa"])
def test_parameter_count_equals_transformers_at_full_size(config):
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    assert sum(plan.parameter_counts(plan.Shape.of(config)).values()) == numel(model)


@pytest.mark.parametrize("targets, extras", [(("q_proj", "k_proj", "v_proj", "o_proj"), ("embed", "norm")),
                                             ("all-linear", ()), (["v_proj", "down_proj"], ("norm",))])
@pytest.mark.parametrize("name", ["llama-untied", "qwen2-gqa-tied"])
def test_trainable_count_equals_peft(name, targets, extras):
    config = tiny_configs()[name]
    model = add_lora(AutoModelForCausalLM.from_config(config), r=4, target_modules=targets, trainable_params=extras,
                     gradient_checkpointing=False)
    trainable, _ = model.get_nb_trainable_parameters()
    assert plan.trainable_parameter_count(config, lora_r=4, lora_targets=targets, trainable_params=extras) == trainable


def test_full_fine_tuning_trains_every_parameter():
    config = tiny_configs()["qwen2-gqa-tied"]
    assert plan.trainable_parameter_count(config, lora=False) == numel(AutoModelForCausalLM.from_config(config))


def test_unknown_lora_target_or_trainable_param_is_an_error():
    with pytest.raises(ValueError, match="x_proj"):
        plan.estimate(LLAMA2_7B, seq_len=128, lora_targets=["x_proj"])
    with pytest.raises(ValueError, match="lm_hed"):
        plan.estimate(LLAMA2_7B, seq_len=128, trainable_params=["lm_hed"])


def loss_part(n: int, vocab: int, chunked: bool) -> int:
    config = LlamaConfig(**{**TINY, "hidden_size": 256, "vocab_size": vocab})
    return plan.estimate(config, seq_len=n, chunked_loss=chunked, loss_chunk_size=1024).parts[plan.LOSS]


def test_plain_loss_scales_with_tokens_times_vocab():
    def vocab_part(n):  # the part that grows with V
        return loss_part(n, 64_000, False) - loss_part(n, 32_000, False)

    assert vocab_part(8192) == 2 * vocab_part(4096)
    float32_logits = 4096 * 32_000 * 4
    assert 2 * float32_logits <= vocab_part(4096) <= 4 * float32_logits  # logits, log-softmax, gradient: ~3 copies


def test_chunked_loss_vocab_term_is_flat_in_tokens():
    def vocab_part(n):
        return loss_part(n, 64_000, True) - loss_part(n, 32_000, True)

    assert vocab_part(4096) == vocab_part(65536)
    assert loss_part(65536, 32_000, True) < loss_part(65536, 32_000, False) / 20


def test_zero3_partitions_the_weights_across_ranks():
    kw = dict(seq_len=1024, dtype="bfloat16", mixed_precision="bf16")
    whole = plan.estimate(LLAMA2_7B, **kw).parts  # no ZeRO: every device holds the whole model
    one, two, four = (plan.estimate(LLAMA2_7B, zero_stage=3, world_size=n, **kw).parts for n in (1, 2, 4))
    assert one[plan.WEIGHTS] - two[plan.WEIGHTS] == pytest.approx(whole[plan.WEIGHTS] / 2, abs=1)
    assert two[plan.WEIGHTS] - four[plan.WEIGHTS] == pytest.approx(whole[plan.WEIGHTS] / 4, abs=1)
    assert two[plan.TRAINABLE] == pytest.approx(one[plan.TRAINABLE] / 2, abs=1)
    zero2_one, zero2_two = (plan.estimate(LLAMA2_7B, zero_stage=2, world_size=n, **kw).parts for n in (1, 2))
    assert zero2_two[plan.WEIGHTS] == whole[plan.WEIGHTS]  # ZeRO-2 partitions gradients and optimizer state only
    assert zero2_two[plan.OPTIMIZER] == pytest.approx(zero2_one[plan.OPTIMIZER] / 2, abs=1)


def test_offload_moves_the_optimizer_to_host_ram():
    kw = dict(seq_len=1024, dtype="bfloat16", mixed_precision="bf16", zero_stage=2, world_size=8)
    on_device, offloaded = plan.estimate(LLAMA2_7B, **kw), plan.estimate(LLAMA2_7B, offload=True, **kw)
    assert offloaded.parts[plan.OPTIMIZER] == 0 and on_device.host_parts == {}
    assert offloaded.host_parts[plan.OPTIMIZER] == on_device.parts[plan.OPTIMIZER]
    assert offloaded.total < on_device.total


def test_checkpointing_keeps_only_the_layer_inputs():
    kw = dict(seq_len=4096, batch_size=2, dtype="bfloat16")
    on = plan.estimate(LLAMA2_7B, gradient_checkpointing=True, **kw)
    off = plan.estimate(LLAMA2_7B, gradient_checkpointing=False, **kw)
    assert on.total < off.total
    layer_inputs = 32 * 2 * 4096 * 4096 * 2  # L x [B, N, H] in bfloat16
    assert on.parts[plan.CHECKPOINTS] == pytest.approx(layer_inputs, rel=0.05)
    assert off.parts[plan.ALL_ACTIVATIONS] > 10 * on.parts[plan.CHECKPOINTS]


def test_attention_memory_is_linear_for_s2_and_quadratic_for_eager():
    def attention(n, kind):
        return plan.estimate(LLAMA2_7B, seq_len=n, attention=kind).parts[plan.ATTENTION]

    assert attention(8192, "s2") == 2 * attention(4096, "s2")
    assert attention(8192, "eager") > 3.8 * attention(4096, "eager")  # N x N probabilities dominate


def test_qlora_stores_decoder_weights_in_about_half_a_byte():
    kw = dict(seq_len=1024, lora_r=64, lora_targets="all-linear", trainable_params=())
    nf4 = plan.estimate(LLAMA2_7B, quantization="4bit", dtype="bfloat16", **kw).parts[plan.WEIGHTS]
    decoder_linears = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    float32_rest = 4 * (2 * 32000 * 4096 + 65 * 4096)  # embedding, head, norms: upcast to float32 by PEFT
    assert nf4 == pytest.approx(0.5 * decoder_linears + float32_rest, rel=0.05)


# ---------------------------------------------------------------------------------------------------------------
# CLI

def test_cli_prints_the_breakdown_for_the_quickstart(capsys):
    assert main(["plan", str(ROOT / "configs/quickstart.yaml"), "--device", "cpu", "--budget-gb", "64"]) == 0
    out = capsys.readouterr().out
    for row in ("weights", "lora+trainable weights", "optimizer", "activations (all layers)", "logits + loss",
                "runtime", "peak (predicted)", "budget"):
        assert row in out
    assert "WARNING" not in out


def test_cli_warns_when_it_will_not_fit(capsys):
    config = str(ROOT / "configs/quickstart.yaml")
    assert main(["plan", config, "--device", "cpu", "--budget-gb", "0.001"]) == 0  # advice: still exit 0
    out = capsys.readouterr().out
    assert "WARNING: predicted peak" in out and "exceeds the budget of 0.00 GiB" in out
    assert main(["plan", config, "--device", "cpu", "--budget-gb", "0.001", "--strict"]) == 3


def test_cli_plans_a_gpu_recipe_from_a_local_model_config(tmp_path, capsys):
    LLAMA2_7B.save_pretrained(tmp_path)
    assert main(["plan", str(ROOT / "configs/llama2-7b-longlora-32k.yaml"), f"model.name_or_path={tmp_path}",
                 "--world-size", "8", "--device", "cuda", "--budget-gb", "80"]) == 0
    out = capsys.readouterr().out
    frozen = 6_738_415_616 - 32000 * 4096 - 65 * 4096  # everything but the trainable embedding and norms, bf16
    weights = next(line for line in out.splitlines() if line.strip().startswith("weights"))
    assert float(weights.split()[-1]) == pytest.approx(frozen * 2 / GiB, abs=0.001)
    assert "WARNING" not in out


def test_cli_says_clearly_when_the_model_config_cannot_be_read(monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, no network retries
    assert main(["plan", str(ROOT / "configs/llama2-7b-longlora-32k.yaml")]) == 2
    err = capsys.readouterr().err
    assert "could not read the model config of 'meta-llama/Llama-2-7b-hf'" in err
    assert "config.json" in err and "Traceback" not in err


def test_cli_refuses_a_lora_target_the_model_lacks(capsys):
    assert main(["plan", str(ROOT / "configs/quickstart.yaml"), "lora.target_modules=[x_proj]", "--device",
                 "cpu"]) == 2
    assert "x_proj" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The warning in `train`

def test_train_warns_in_one_line_naming_longctx_plan(monkeypatch, caplog):
    monkeypatch.setattr(plan, "device_budget", lambda device: 1)
    cfg = load_config(ROOT / "configs/quickstart.yaml")
    with caplog.at_level(logging.INFO, logger="longctx"):
        plan.warn_if_too_big(plan.read_model_config(str(ROOT / "data/tiny-base")), 1, **plan.plan_arguments(cfg))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "longctx plan" in warnings[0] and "\n" not in warnings[0]


def test_an_unplannable_model_never_stops_training(caplog):
    cfg = load_config(ROOT / "configs/quickstart.yaml")
    with caplog.at_level(logging.INFO, logger="longctx"):
        plan.warn_if_too_big(SimpleNamespace(model_type="llama"), 1, **plan.plan_arguments(cfg))  # no shape: logs
    assert "memory plan skipped" in caplog.text


def test_train_consults_the_plan_before_loading_the_model(monkeypatch, tmp_path):
    calls = []

    class Stop(Exception):
        pass

    def fake_warn(model_config, world_size, **settings):
        calls.append((model_config.model_type, world_size, settings["seq_len"]))
        raise Stop

    monkeypatch.setattr(plan, "warn_if_too_big", fake_warn)
    monkeypatch.setattr(trainer_lib.model_lib, "load_tokenizer", lambda *a, **k: calls.append("tokenizer"))
    cfg = load_config(ROOT / "configs/quickstart.yaml", overrides=[f"train.output_dir={tmp_path}"])
    with pytest.raises(Stop):
        trainer_lib.train(cfg)
    assert calls == [("llama", 1, cfg.train.seq_len)]


# ---------------------------------------------------------------------------------------------------------------
# Measured references on the CPU: what autograd saves, and torch's own memory timeline of a training step

MEASURED = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=2000, tie_word_embeddings=False)
# SmolLM2's head layout (9 query heads over 3 kv heads): S2's head halves split a kv group, so k/v are copied out.
MEASURED_9_3 = LlamaConfig(hidden_size=144, intermediate_size=384, num_hidden_layers=2, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=2000, tie_word_embeddings=True)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def training_model(config, dtype: str, targets, extras, checkpointing: bool = False):
    """A LoRA (or, with targets None, fully trained) micro Llama with S2 attention, in training mode."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(DTYPES[dtype])
    if targets is not None:
        model = add_lora(model, r=8, target_modules=targets, trainable_params=extras,
                         gradient_checkpointing=checkpointing)
    model.config.use_cache = False
    longctx.apply(model, attention={"type": "s2", "group_size_ratio": 0.25})
    return model.train()


@pytest.mark.parametrize("config, dtype, targets, extras, mixed", [
    (MEASURED, "float32", ("q_proj", "k_proj", "v_proj", "o_proj"), ("embed", "norm"), None),
    (MEASURED, "bfloat16", "all-linear", (), None),
    (MEASURED, "bfloat16", ("q_proj", "k_proj", "v_proj", "o_proj"), ("embed", "norm"), "bf16"),
    (MEASURED, "float32", None, (), "bf16"),
    (MEASURED_9_3, "float32", ("q_proj", "k_proj", "v_proj", "o_proj"), ("embed", "norm"), None),
], ids=["fp32-lora", "bf16-all-linear", "bf16-autocast", "full-ft-autocast", "fp32-lora-9-over-3-heads"])
def test_saved_activations_equal_what_autograd_keeps(config, dtype, targets, extras, mixed):
    assert_activations_match(config, dtype, targets, extras, mixed)


@pytest.mark.parametrize("family", [f for f, fam in FAMILIES.items() if fam.s2_refused is None])
def test_every_family_saved_activations_equal_what_autograd_keeps(family):
    """Gemma-3 runs its sliding layers (window 6) inside S² groups; Phi-3's v keeps the fused qkv output alive."""
    config = tiny_config(family, heads=4, kv_heads=2, head_dim=32, vocab=2000)
    assert_activations_match(config, "float32", ("q_proj", "k_proj", "v_proj", "o_proj"), ("embed", "norm"), None)


def assert_activations_match(config, dtype, targets, extras, mixed):
    n = 512
    model = training_model(config, dtype, targets, extras)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):  # every distinct storage a layer keeps for backward, weights aside
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:  # record inside the decoder layers only
        layer.register_forward_pre_hook(lambda *_: hooks.__enter__())
        layer.register_forward_hook(lambda *_: hooks.__exit__(None, None, None))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed is not None):
        model(input_ids=torch.randint(3, config.vocab_size, (1, n)))
    e = plan.estimate(config, seq_len=n, lora=targets is not None, lora_targets=targets or (),
                      trainable_params=extras, dtype=dtype, mixed_precision=mixed, gradient_checkpointing=False,
                      device="cpu")
    assert e.parts[plan.ALL_ACTIVATIONS] + e.parts[plan.ATTENTION] == pytest.approx(sum(kept.values()), rel=0.05)


# The peak holds the larger of two backward phases (a layer's working set, or the loss); the smaller one is not
# counted. The first two cases have phases of similar size (counting both would be ~45% over the measured peak):
# the layer's phase larger, then the loss's; the third is the plain loss at a larger vocabulary.
@pytest.mark.parametrize("vocab, checkpointing, chunked, loss_phase_larger", [
    (2000, True, True, False), (2000, True, False, True), (8000, False, False, True)])
def test_peak_equals_torch_memory_timeline_of_a_training_step(vocab, checkpointing, chunked, loss_phase_larger):
    timeline = pytest.importorskip("torch.profiler._memory_profiler")  # private torch API: skip if it moves
    from torch.profiler import ProfilerActivity, profile

    from longctx import loss as loss_lib

    n, config = 1024, LlamaConfig(**{**MEASURED.to_dict(), "vocab_size": vocab})
    model = training_model(config, "float32", ("q_proj", "k_proj", "v_proj", "o_proj"), ("embed", "norm"),
                           checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, vocab, (1, n))
    head = model.get_base_model().lm_head

    def step():  # as LongctxTrainer.compute_loss does it, then backward and AdamW
        if chunked:
            with loss_lib.lm_head_passthrough(head) as seen:
                model(input_ids=ids)
            loss = loss_lib.causal_lm_loss(seen["hidden"], head.weight, ids, chunk_size=512)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    step()  # the optimizer state exists from the second step on
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = timeline.MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    e = plan.estimate(config, seq_len=n, gradient_checkpointing=checkpointing, chunked_loss=chunked,
                      loss_chunk_size=512, device="cpu")
    assert e.total - e.parts[plan.RUNTIME] == pytest.approx(max(sum(s) for s in sizes), rel=0.1)
    assert (e.parts[plan.LOSS] > e.parts[plan.WORKING_SET] + e.parts[plan.ATTENTION]) == loss_phase_larger


# ---------------------------------------------------------------------------------------------------------------
# Every supported family (longctx.families): its parameter layout, and a clear refusal for the others

@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_parameter_count_equals_transformers(family):
    config = tiny_config(family, vocab=100)
    model = AutoModelForCausalLM.from_config(config)
    counts = plan.parameter_counts(plan.Shape.of(config))
    assert counts == {n: p.numel() for n, p in model.named_parameters()}


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj"), "all-linear"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_trainable_count_equals_peft(family, targets):
    config = tiny_config(family, vocab=100)
    model = add_lora(AutoModelForCausalLM.from_config(config), r=4, target_modules=targets,
                     trainable_params=("embed", "norm"), gradient_checkpointing=False)
    trainable, _ = model.get_nb_trainable_parameters()
    assert plan.trainable_parameter_count(config, lora_r=4, lora_targets=targets) == trainable


def test_planner_refuses_an_unsupported_family_by_name():
    with pytest.raises(longctx.ConfigError, match="model type 'cohere2' is not supported"):
        plan.estimate(tiny_config("cohere2"), seq_len=128)
