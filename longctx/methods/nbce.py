"""NBCE, naive Bayes-based context extension (Su et al., NAACL 2024; kexue.fm/archives/9617; bojone/NBCE).

    longctx generate --model data/tiny-base --prompt-file long.txt --method nbce chunk=128 beta=0.25
    longctx eval passkey --model data/tiny-base --method nbce --lengths 256,1024 --out /tmp/nbce

A long context is cut into chunks of `chunk` tokens that each fit the model's window. Every chunk followed by the
question is one row of a batch, plus one row with the question alone; at each step the next-token log-probabilities
are pooled over the chunk rows (`min_entropy`: the row with the lowest entropy, as the reference code; `mean`: their
average, the paper's first form) and combined with the question-alone row as (1 + beta) * pooled - beta * uncond
(where the unconditional log-probability is > -100; else the pooled one, as the reference). The result is treated as
logits: greedy decoding takes its argmax, sampling softmax(. / temperature) with top-p. The rows decode together,
each keeping its KV cache across steps (left padding, positions from the mask).

The question is the prompt's last line (the tokens after the last one containing a newline; the passkey prompt
ends with its question line), or the prompt's last block of `chunk` tokens when that line is empty or longer.

Perplexity (teacher forcing, `NBCEModel.forward`): the window is cut into blocks of `chunk` tokens; block k is the
"question", blocks 0..k-1 are its context chunks, and its predictions are the NBCE combination of rows
[chunk_j + block k] and [block k]. Block 0 has no context: the model's own predictions. Every prediction of the
window is scored, as for every other method, each from at most 2 x chunk tokens of one row.

Differences from the reference demo: no top-p before pooling (the demo truncates each row with top-p 0.95 before the
entropies), and no stickiness (the demo lowers the previous step's chosen row's entropy by eta = 0.1).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

MAX_ROWS = 16  # rows per forward when teacher forcing


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: Literal["nbce"]
    beta: float = Field(0.25, ge=0, description="Weight of the unconditional row: (1 + beta) pooled - beta uncond "
                                          "(reference: 0.25).")
    chunk: int | None = Field(None, ge=1, description="Context tokens per row; default: the model's original length "
                                                      "/ 2.")
    pool: Literal["min_entropy", "mean"] = Field("min_entropy", description="How chunk rows are pooled per step.")


def apply(model, spec: Params, target, undo: list) -> None:
    """NBCE changes nothing on the model: it is a way of running it (`runner`)."""
    if spec.chunk is None and target.original_length is None:
        raise ValueError("method nbce: the model config gives no original length; pass chunk=C")


def runner(model, spec: Params, target, tokenizer=None) -> "NBCEModel":
    return NBCEModel(model, spec, spec.chunk or max(1, target.original_length // 2), tokenizer)


def combine(logits: torch.Tensor, beta: float, pool: str) -> torch.Tensor:
    """logits [n + 1, ..., V]: rows 0..n-1 each with a context chunk, row n the question alone -> [..., V]."""
    logp = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32).log_softmax(-1)
    ctx, uncond = logp[:-1], logp[-1]
    if ctx.shape[0] == 0:
        return uncond
    if pool == "min_entropy":
        entropy = -(ctx.exp() * ctx.clamp(-100, 0)).sum(-1)  # [n, ...]
        best = entropy.argmin(0)  # [...]
        pooled = ctx.gather(0, best[None, ..., None].expand(1, *ctx.shape[1:])).squeeze(0)
    else:
        pooled = ctx.mean(0)
    return torch.where(uncond > -100, (1 + beta) * pooled - beta * uncond, pooled)


class NBCEModel(torch.nn.Module):
    """The model run the NBCE way: `forward` (teacher forcing, for perplexity) and `generate`, as
    `longctx.evaluate` and `longctx generate` call a transformers model."""

    def __init__(self, model, spec: Params, chunk: int, tokenizer=None):
        super().__init__()
        self.model, self.spec, self.chunk, self.tokenizer = model, spec, chunk, tokenizer
        self._newline_ids: set[int] | None = None

    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- teacher forcing ------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutput

        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("NBCE teacher forcing takes unpadded rows (attention_mask all ones)")
        return CausalLMOutput(logits=torch.stack([self._row_logits(row) for row in input_ids]))

    def _row_logits(self, ids: torch.Tensor) -> torch.Tensor:
        C, out = self.chunk, []
        for start in range(0, ids.numel(), C):
            block = ids[start:start + C]
            chunks = ids[:start].view(-1, C)  # the blocks before this one: its context
            rows = []
            for a in range(0, len(chunks), MAX_ROWS):  # [chunk_j + block], at most MAX_ROWS rows per forward
                part = chunks[a:a + MAX_ROWS]
                rows.append(self._logits(torch.cat([part, block.expand(len(part), -1)], dim=1))[:, C:])
            rows.append(self._logits(block[None]))  # the block alone, last
            out.append(combine(torch.cat(rows), self.spec.beta, self.spec.pool))
        return torch.cat(out)

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits

    # -- generation -----------------------------------------------------------------------------------------------

    def question_length(self, ids: list[int]) -> int:
        """Tokens of the question: after the last token containing a newline, else (or when that is empty or
        longer than a chunk) the last block of `chunk` tokens."""
        if self._newline_ids is None:
            self._newline_ids = set() if self.tokenizer is None else {
                i for i, t in enumerate(self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))]))
                if "\n" in t}
        last = max((i for i, t in enumerate(ids) if t in self._newline_ids), default=None)
        after = len(ids) - last - 1 if last is not None else 0
        return after if 0 < after <= self.chunk else len(ids) - self.chunk * ((len(ids) - 1) // self.chunk)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 pad_token_id: int | None = None, eos_token_id: int | list[int] | None = None, streamer=None,
                 generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
        """One prompt ([1, P]) -> [1, P + new tokens], like `model.generate`; `streamer.put`/`end` as transformers'."""
        if input_ids.shape[0] != 1:
            raise ValueError(f"NBCE generates one prompt at a time, got a batch of {input_ids.shape[0]}")
        ids = input_ids[0][attention_mask[0].bool()] if attention_mask is not None else input_ids[0]
        ids = ids.tolist()
        q = self.question_length(ids)
        context, question = ids[:len(ids) - q], ids[len(ids) - q:]
        rows = [context[i:i + self.chunk] + question for i in range(0, len(context), self.chunk)] + [question]
        pad = pad_token_id if pad_token_id is not None else 0
        width = max(map(len, rows))
        device = self.device
        batch = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        eos = eos_token_id if eos_token_id is not None else self.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if streamer is not None:
            streamer.put(input_ids[:, :].cpu())
        new, cache = [], None
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        for _ in range(max_new_tokens):
            out = self.model(input_ids=batch, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True)
            cache = out.cache
            scores = combine(out.logits[:, -1], self.spec.beta, self.spec.pool)
            token = _choose(scores, do_sample, temperature, top_p, generator)
            new.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in eos:
                break
            batch = torch.full((len(rows), 1), token, device=device)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype, device=input_ids.device)], dim=1)


def _choose(scores: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> int:
    if not do_sample:
        return int(scores.argmax())
    from transformers import TopPLogitsWarper

    logits = (scores / temperature)[None]
    if top_p < 1:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return int(torch.multinomial(logits.softmax(-1).float(), 1, generator=generator))
