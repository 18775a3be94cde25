"""The GGUF checks on files written here with the `gguf` package (no llama.cpp needed): the metadata check names
what a file says differently from config.json, and the llama.cpp comparison names what differed. The end-to-end
conversion and llama.cpp run are in tests/test_export.py (SmolLM2, slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, RopeScalingType
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from longctx import gguf_export

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def config(rope_parameters: dict, max_pos: int = 256) -> dict:
    return {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "num_hidden_layers": 1, "intermediate_size": 32, "vocab_size": 32,
            "max_position_embeddings": max_pos, "rope_parameters": rope_parameters}


def write_gguf(path, context: int = 256, base: float = 1e4, scaling=None, factor=None, orig=None, freqs=None):
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(context)
    w.add_rope_freq_base(base)
    if scaling is not None:
        w.add_rope_scaling_type(scaling)
        w.add_rope_scaling_factor(factor)
    if orig is not None:
        w.add_rope_scaling_orig_ctx_len(orig)
    if freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(freqs, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kwargs,named", [
    ({}, None),
    ({"context": 64}, "llama.context_length is 64, config.json says 256"),  # issue 19: the original length
    ({"factor": 2.0}, "llama.rope.scaling.factor is 2.0"),
    ({"scaling": None, "factor": None, "orig": None}, "llama.rope.scaling.type is None"),  # the scaling lost
    ({"orig": 256}, "original_context_length is 256"),
    ({"base": 5e5}, "llama.rope.freq_base"),
])
def test_metadata_check_of_a_yarn_file(tmp_path, kwargs, named):
    args = {"scaling": RopeScalingType.YARN, "factor": 4.0, "orig": 64, **kwargs}
    problems = gguf_export.metadata_problems(write_gguf(tmp_path / "m.gguf", **args), config(YARN))
    if named is None:
        assert problems == []
    else:
        assert any(named in p for p in problems), problems


def llama3_factors() -> torch.Tensor:
    """What llama.cpp divides each pair's frequency by: transformers' default / llama3 inverse frequency."""
    cfg = LlamaConfig(**{k: v for k, v in config(LLAMA3).items() if k != "model_type"})
    return (LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)[0]
            / ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0])


def test_metadata_check_of_a_llama3_file(tmp_path):
    good = llama3_factors()
    assert good.min() == 1.0 and good.max() == 4.0  # some pairs kept, some divided by the factor
    assert gguf_export.metadata_problems(write_gguf(tmp_path / "a.gguf", freqs=good), config(LLAMA3)) == []
    missing = gguf_export.metadata_problems(write_gguf(tmp_path / "b.gguf"), config(LLAMA3))
    assert any("no rope_freqs tensor" in p for p in missing)
    wrong = gguf_export.metadata_problems(write_gguf(tmp_path / "c.gguf", freqs=torch.ones_like(good)),
                                          config(LLAMA3))
    assert any("differs from transformers' llama3 factors" in p for p in wrong)
    scaled = gguf_export.metadata_problems(write_gguf(tmp_path / "d.gguf", freqs=good, scaling=RopeScalingType.LINEAR,
                                                      factor=4.0), config(LLAMA3))
    assert any("rope.scaling is 'linear'" in p for p in scaled)  # llama3 on top of a linear scaling: twice


def test_compare_names_the_first_differing_step_and_the_logit_difference():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0)) * 5
    tokens = logits.argmax(-1).tolist()
    reference = {"tokens": tokens, "logits": logits}
    assert gguf_export.compare({"tokens": tokens, "logits": logits + 1e-4}, reference, "f32") == []
    other = tokens[:2] + [(tokens[2] + 1) % 10] + tokens[3:]
    problems = gguf_export.compare({"tokens": other, "logits": logits}, reference, "f16")
    assert len(problems) == 1 and "differ from step 2" in problems[0]
    problems = gguf_export.compare({"tokens": tokens, "logits": logits + 1.0}, reference, "f16")
    assert len(problems) == 1 and "logits differ by up to 1" in problems[0]
