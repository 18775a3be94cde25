"""Causal-LM training loss without materialising all logits: chunked lm_head + cross-entropy with recomputation.

    loss = causal_lm_loss(hidden, lm_head.weight, labels, num_items_in_batch=n)   # == model(..., labels=labels).loss

At long N the logits dominate training memory (SmolLM2: vocab 49152 x 16k tokens x 4 bytes = 3.2 GB, and as much
again for their gradient). `ChunkedLinearCrossEntropy` computes the lm_head and the cross-entropy `chunk_size`
tokens at a time, keeps only one float per token (the log-sum-exp) for backward, and in backward recomputes each
chunk's logits to produce the gradients of the hidden states, the lm_head weight (accumulated in float32) and its
bias. At most `chunk_size` x vocab logits exist at any time.

The semantics are those of transformers' `ForCausalLMLoss` (transformers/loss/loss_utils.py): labels shifted by
one inside (position t predicts labels[t + 1]; or `shift_labels` as given), ignore_index -100, the logits upcast to
float32 for the softmax, reduction sum / num_items_in_batch when that is given (Trainer's gradient-accumulation
normalisation), else the mean over the non-ignored tokens (NaN when there are none, as torch's mean). The lm_head
matmul runs in `compute_dtype` (the autocast dtype where the model's lm_head ran under autocast), as nn.Linear would.

On CUDA with liger-kernel installed, `LigerFusedLinearCrossEntropyLoss` (Triton, same semantics) does the work
instead (`use_liger`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 1024


def shift_causal_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """transformers' shift: position t is scored against labels[t + 1]; the last position is ignored."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross_entropy(hidden @ weight.T + bias, targets), float32, `chunk_size` rows at a time.

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] (already shifted; ignore_index rows count 0).
    Saves hidden, weight, bias, targets and the per-row log-sum-exp [N]; no [N, V] tensor outlives a chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, ignore_index, compute_dtype):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with _no_autocast(hidden.device):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                logits = F.linear(hidden[s:e].to(compute_dtype), w, b).float()  # [c, V]
                lse_c = torch.logsumexp(logits, dim=-1)
                t = targets[s:e]
                valid = t != ignore_index
                picked = logits.gather(1, t.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
                total += torch.where(valid, lse_c - picked, 0.0).sum()
                lse[s:e] = lse_c
                del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.ignore_index, ctx.compute_dtype = chunk_size, ignore_index, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cd, chunk_size, ignore_index = ctx.compute_dtype, ctx.chunk_size, ctx.ignore_index
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        if not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None
        g = grad_total.float()
        n = hidden.shape[0]
        with _no_autocast(hidden.device):
            w = weight.to(cd)
            b = bias.to(cd) if bias is not None else None
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                h = hidden[s:e].to(cd)
                # d loss_i / d logits_i = softmax_i - onehot(target_i), zero on ignored rows; in place on the logits.
                d = F.linear(h, w, b).float()
                d.sub_(lse[s:e].unsqueeze(1)).exp_()
                t = targets[s:e]
                valid = t != ignore_index
                d.scatter_add_(1, t.masked_fill(~valid, 0).unsqueeze(1), -valid.to(d.dtype).unsqueeze(1))
                d.mul_((valid.to(d.dtype) * g).unsqueeze(1))
                d = d.to(cd)  # the backward of the float32 upcast
                if need_h:
                    grad_h[s:e] = d @ w
                if need_w:
                    grad_w += (d.t() @ h).float()
                if need_b:
                    grad_b += d.float().sum(0)
                del d
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None, None, None)


def _liger_sum(hidden, weight, bias, targets, ignore_index):
    """Liger's fused linear cross-entropy, summed; None when liger-kernel is not importable (or too old)."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    try:
        fn = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")
    except TypeError:  # an old liger without `reduction`: mean only, which cannot take num_items_in_batch
        return None
    out = fn(weight, hidden, targets, bias)
    return out[0] if isinstance(out, tuple) else out


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, num_items_in_batch: torch.Tensor | int | None = None,
                   ignore_index: int = -100, shift_labels: torch.Tensor | None = None,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, compute_dtype: torch.dtype | None = None,
                   use_liger: bool | None = None) -> torch.Tensor:
    """transformers' causal-LM loss of `hidden @ weight.T + bias` against `labels`, without all the logits.

    hidden [B, T, H] (the decoder's final hidden states, what the lm_head reads), weight [V, H], labels [B, T]
    (shifted here) or shift_labels [B, T] (used as given). compute_dtype: the lm_head's matmul dtype (default
    hidden's). use_liger: None = on CUDA when liger-kernel is installed.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = shift_causal_labels(labels, ignore_index)
    cd = compute_dtype or hidden.dtype
    h = hidden.reshape(-1, hidden.shape[-1])
    targets = shift_labels.reshape(-1).to(h.device)
    if h.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} tokens but the labels {targets.shape[0]}")
    total = None
    if use_liger is None:
        use_liger = h.is_cuda
    if use_liger:
        with _no_autocast(h.device):
            total = _liger_sum(h.to(cd).contiguous(), weight.to(cd), bias.to(cd) if bias is not None else None,
                               targets, ignore_index)
        if total is not None:
            total = total.float()
    if total is None:
        total = ChunkedLinearCrossEntropy.apply(h, weight, bias, targets, int(chunk_size), ignore_index, cd)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / (targets != ignore_index).sum()


@contextlib.contextmanager
def lm_head_passthrough(head: torch.nn.Module):
    """While inside, `head` returns its input: the model's `logits` are the hidden states the lm_head would read.

    Yields a dict that receives, at the head's call, `hidden` (the tensor it got) and `dtype` (the autocast dtype
    active there, else None), so the chunked loss computes in the dtype the model's own lm_head would have.
    """
    seen: dict = {}
    own = head.__dict__.get("forward")  # accelerate hooks may have put a forward on the instance

    def passthrough(x, *args, **kwargs):
        dev = x.device.type
        seen["hidden"] = x
        seen["dtype"] = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return x

    head.forward = passthrough
    try:
        yield seen
    finally:
        if own is not None:
            head.forward = own
        else:
            del head.forward


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: per-token NLL without all logits (perplexity, per-position loss)

def plain_output_head(model) -> torch.nn.Linear | None:
    """The model's lm_head when it is a plain float nn.Linear (a PEFT wrapper looked through), else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or not head.weight.is_floating_point():
        return None
    return head


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """[B, T-1] float32: -log p(input_ids[:, t+1] | input_ids[:, :t+1]) under `model` (eval, no cache).

    The logits are built `chunk_size` tokens at a time from the hidden states the lm_head reads (as
    `causal_lm_loss` does for training): all logits at once are vocab x T floats, 6.4 GB for SmolLM2 at 32k and
    64 GB for Llama-3 at 128k, more than the model's own activations. A model that changes its logits after the
    lm_head (Gemma-2's softcapping, Granite's scaling) or has no plain head is run the plain way instead.
    """
    head = plain_output_head(model)
    targets = input_ids[:, 1:]
    if head is not None:
        with lm_head_passthrough(head) as seen:
            logits = model(input_ids=input_ids, use_cache=False).logits
        hidden = seen.get("hidden")
        if hidden is not None and (logits is hidden or (logits.shape == hidden.shape and torch.equal(
                logits.to(hidden.dtype), hidden))):
            cd = seen.get("dtype") or head.weight.dtype
            with _no_autocast(hidden.device):
                w = head.weight.to(cd)
                b = head.bias.to(cd) if head.bias is not None else None
                out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
                for s in range(0, targets.shape[1], chunk_size):
                    e = min(s + chunk_size, targets.shape[1])
                    chunk = F.linear(hidden[:, s:e].to(cd), w, b).float()  # [B, c, V]
                    out[:, s:e] = F.cross_entropy(chunk.transpose(1, 2), targets[:, s:e], reduction="none")
            return out
        del logits, seen
    logits = model(input_ids=input_ids, use_cache=False).logits
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least for softmax
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
