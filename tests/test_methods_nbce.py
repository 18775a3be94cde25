"""NBCE against a straightforward reference loop: one chunk at a time, no cache, every step recomputed from the
text so far, pooled and combined as the rule says (bojone/NBCE's `min entropy` core, or the mean)."""

import pytest
import torch

import longctx
from longctx.methods import nbce
from reference import tiny_model

L = 16


def rule(logits: list[torch.Tensor], uncond: torch.Tensor, beta: float, pool: str) -> torch.Tensor:
    """The reference's core, one step: log-softmax each row; min entropy (entropy with log p clipped to [-100, 0])
    or mean over the chunk rows; (1 + beta) pooled - beta uncond where uncond > -100, else pooled."""
    if not logits:
        return uncond.log_softmax(-1)
    rows = [x.log_softmax(-1) for x in logits]
    u = uncond.log_softmax(-1)
    if pool == "min_entropy":
        entropies = [-(r.exp() * r.clamp(-100, 0)).sum().item() for r in rows]
        pooled = rows[min(range(len(rows)), key=entropies.__getitem__)]
    else:
        pooled = sum(rows) / len(rows)
    return torch.where(u > -100, (1 + beta) * pooled - beta * u, pooled)


def reference_generate(model, chunks, question, steps, beta, pool):
    """Greedy NBCE, the slow way: every step, every chunk row and the question row run from scratch, alone."""
    new, scores = [], []
    for _ in range(steps):
        q = question + new
        rows = [model(input_ids=torch.tensor([c + q])).logits[0, -1] for c in chunks]
        s = rule(rows, model(input_ids=torch.tensor([q])).logits[0, -1], beta, pool)
        scores.append(s)
        new.append(int(s.argmax()))
    return new, torch.stack(scores)


class Recorder:
    """A streamer that keeps what it is given (the prompt first, then one token per step)."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.flatten().tolist())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("pool", ["min_entropy", "mean"])
def test_generation_matches_reference_loop(pool, monkeypatch):
    """A 37-token context in chunks of 8 (the last one short: left padding in the batch) + a 5-token question."""
    torch.manual_seed(0)
    model = tiny_model(layers=2, max_pos=L)
    context, question = torch.randint(0, 97, (37,)).tolist(), torch.randint(0, 97, (5,)).tolist()
    h = longctx.apply(model, method={"name": "nbce", "chunk": 8, "beta": 0.25, "pool": pool})
    runner = h.runner()
    runner.question_length = lambda ids: 5  # the split is tested below; here the prompt's last 5 tokens
    streamer = Recorder()
    out = runner.generate(input_ids=torch.tensor([context + question]), max_new_tokens=12, streamer=streamer,
                          eos_token_id=-1)
    chunks = [context[i:i + 8] for i in range(0, 37, 8)]
    want, ref_scores = reference_generate(model, chunks, question, 12, 0.25, pool)
    assert out[0, 42:].tolist() == want and out[0, :42].tolist() == context + question
    assert streamer.puts[0] == context + question and [p[0] for p in streamer.puts[1:]] == want and streamer.ended
    # the scores of every step, from the cached batch, within 1e-5 of the reference's
    batch = _step_scores(runner, context, question, want, monkeypatch)
    torch.testing.assert_close(batch, ref_scores, rtol=0, atol=1e-5)
    h.remove()


def _step_scores(runner, context, question, tokens, monkeypatch):
    """The combined scores the runner decodes from, step by step (greedy over the given tokens)."""
    scores = []
    original = nbce.combine

    def spy(logits, beta, pool):
        scores.append(original(logits, beta, pool))
        return scores[-1]

    monkeypatch.setattr(nbce, "combine", spy)
    runner.generate(input_ids=torch.tensor([context + question]), max_new_tokens=len(tokens), eos_token_id=-1)
    monkeypatch.undo()
    return torch.stack(scores)


def test_teacher_forcing_matches_reference_per_position():
    """forward() (for perplexity): block k of `chunk` tokens is the question, blocks before it the chunks; each
    position's logits are the rule applied to [chunk_j + block[:t+1]] and [block[:t+1]], computed one by one."""
    torch.manual_seed(1)
    model = tiny_model(layers=2, max_pos=L)
    ids = torch.randint(0, 97, (1, 21))
    h = longctx.apply(model, method={"name": "nbce", "chunk": 6})
    ours = h.runner()(input_ids=ids).logits[0]
    h.remove()
    seq = ids[0].tolist()
    for t in range(21):
        start = t - t % 6
        block = seq[start:t + 1]
        chunks = [seq[j:j + 6] for j in range(0, start, 6)]
        rows = [model(input_ids=torch.tensor([c + block])).logits[0, -1] for c in chunks]
        want = rule(rows, model(input_ids=torch.tensor([block])).logits[0, -1], 0.25, "min_entropy")
        torch.testing.assert_close(ours[t].log_softmax(-1), want.log_softmax(-1), rtol=0, atol=1e-6)
    # block 0 has no context: the model's own predictions
    torch.testing.assert_close(ours[:6], model(input_ids=ids[:, :6]).logits[0].log_softmax(-1), rtol=0, atol=1e-10)


def test_sampling_draws_from_the_combined_scores():
    torch.manual_seed(2)
    model = tiny_model(layers=1, max_pos=L)
    context, question = torch.randint(0, 97, (20,)).tolist(), torch.randint(0, 97, (4,)).tolist()
    h = longctx.apply(model, method={"name": "nbce", "chunk": 8, "pool": "mean"})
    runner = h.runner()
    runner.question_length = lambda ids: 4
    out = runner.generate(input_ids=torch.tensor([context + question]), max_new_tokens=6, do_sample=True,
                          temperature=0.7, eos_token_id=-1, generator=torch.Generator().manual_seed(5))
    gen, new = torch.Generator().manual_seed(5), []
    for _ in range(6):
        q = question + new
        rows = [model(input_ids=torch.tensor([c + q])).logits[0, -1] for c in (context[:8], context[8:16],
                                                                                context[16:])]
        s = rule(rows, model(input_ids=torch.tensor([q])).logits[0, -1], 0.25, "mean")
        new.append(int(torch.multinomial((s / 0.7).softmax(-1).float(), 1, generator=gen)))
    assert out[0, 24:].tolist() == new
    h.remove()


def test_question_is_the_last_line(micro):
    from longctx.model import load_tokenizer

    tok = load_tokenizer(str(micro))
    runner = nbce.NBCEModel(None, nbce.Params(name="nbce"), chunk=64, tokenizer=tok)
    ids = tok("def f(x):\n    return x\nWhat is f").input_ids
    q = runner.question_length(ids)
    assert tok.decode(ids[-q:]) == "What is f"
    assert runner.question_length(tok("no newline at all here").input_ids) <= 64
    runner.chunk = 2  # a last line longer than a chunk: the last block instead
    assert runner.question_length(ids) == len(ids) - 2 * ((len(ids) - 1) // 2)


def test_passkey_runs_through_nbce(micro):
    """The eval commands take the runner as the model: passkey end to end (a random micro model finds nothing)."""
    from longctx.evaluate import load_for_eval, passkey

    model, tok, label = load_for_eval(str(micro), method={"name": "nbce", "chunk": 32})
    assert isinstance(model, nbce.NBCEModel) and label.endswith("nbce beta=0.25 chunk=32 pool=min_entropy")
    result = passkey(model, tok, [200], [0.5], trials=1)
    assert result["cells"][0]["trials"] == 1 and isinstance(result["cells"][0]["answers"][0]["answer"], str)
