"""Memory planner: the peak memory per device of a training run, predicted from the config before it starts.

    longctx plan configs/llama2-7b-longlora-32k.yaml --world-size 8 --budget-gb 80

    from transformers import AutoConfig
    e = estimate(AutoConfig.from_pretrained("data/tiny-base"), seq_len=1024, batch_size=4)
    print(format_estimate(e, budget_bytes=24 * GiB))       # the breakdown in GiB; e.total is the peak in bytes

Every term is a formula of the model's shape (hidden size H, MLP size I, L layers, V vocabulary, heads) and the
run's settings (B sequences of N tokens, LoRA/QLoRA, dtypes, checkpointing, attention, ZeRO stage, chunked loss),
in bytes per device; each says why in a comment. The constants below are the knobs to tune against measured peaks.

The peak of a training step is in backward, from the second step on (when the optimizer state exists). At that
moment the device holds the persistent parts (weights, gradients, optimizer state, saved activations, runtime)
plus one of two phases that never overlap: the loss backward (the logits and their gradient), which ends before
the backward of the last decoder layer starts, and one layer's backward (its recomputed activations and their
gradients). `Estimate.total` adds the larger phase to the persistent parts.

tests/test_plan.py checks the formulas against references on the CPU: parameter counts of transformers and PEFT,
the tensors autograd keeps for backward, and torch's memory timeline of whole training steps.

The model's parameters follow its family's layout (longctx.families: norms per layer, q/k norms, fused
projections such as Phi-3's qkv_proj); a model type longctx does not support is refused with its name.

Not modelled: evaluation during training (no gradients; smaller than a training step at the same length), the
CUDA caching allocator's fragmentation, Liger's own chunking on CUDA, and the activations of what other families
add to the Llama layer (q/k norms, Gemma's extra norms are counted; Granite's multipliers, OLMo-2's full-width q/k
norms and soft-capping are not): their activations are estimated as a Llama layer of the same shape.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from longctx import families
from longctx.config import Config, ConfigError, group_size

log = logging.getLogger("longctx")

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "bf16": 2, "fp16": 2}
# bitsandbytes NF4 with double quantization: 4 bits a weight, an 8-bit absmax per block of 64 weights and a
# float32 scale per 256 of those blocks (QLoRA paper, section 3: 0.127 bits of constants per weight).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# AdamW keeps two states per trainable parameter (exp_avg, exp_avg_sq).
ADAM_STATES = 2
# Plain loss: float32 [B, N, V] copies live at the loss backward: the log-softmax output saved in forward, the
# gradient nll_loss hands back and the gradient log-softmax produces (the forward peak, the logits in the compute
# dtype plus their float32 upcast plus the log-softmax, is no larger).
PLAIN_LOSS_COPIES = 3
# Chunked loss (longctx/loss.py), float32 copies of one chunk of loss_chunk_size tokens: in forward the logits and
# logsumexp's temporary; in backward the recomputed logits, turned into their gradient in place.
CHUNK_LOSS_COPIES = 2
# [B, N, I] gradients live at once in the MLP backward, the peak of a layer's backward: d(act * up) until both
# d act and d up exist, then d act, d up and d gate.
MLP_GRAD_COPIES = 3
# ZeRO-3 gathers the full weights of the layer it computes and prefetches the next one.
ZERO3_LIVE_LAYERS = 2
# DeepSpeed's reduce_bucket_size when its json leaves it out (elements).
DEEPSPEED_DEFAULT_BUCKET = 500_000_000
# The CUDA context (kernels, cuBLAS/cuDNN workspaces): memory the device loses before the first tensor.
CUDA_RUNTIME = GiB // 2
# On the CPU, the process besides its tensors. Max RSS measured 2026-11-22 (torch 2.13, transformers 5.23):
# `import torch, transformers, peft` 389 MiB; with longctx.trainer imported 484 MiB; a whole `train` run of
# configs/quickstart.yaml at seq_len 64 (tensors ~12 MiB; the tokenizer, the packed stdlib corpus, Trainer state
# and allocator slack on top of the imports) 697 MiB. The run's figure, less its tensors:
CPU_RUNTIME = 685 * 2**20

# Parts of an estimate (keys of Estimate.parts).
WEIGHTS = "weights"
TRAINABLE = "lora+trainable weights"
GRADIENTS = "gradients"
OPTIMIZER = "optimizer"
CHECKPOINTS = "activations (checkpointed)"
ALL_ACTIVATIONS = "activations (all layers)"
WORKING_SET = "layer working set"
ATTENTION = "attention"
LOSS = "logits + loss"
RUNTIME = "runtime"

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")  # LongLoRA's LoRA targets
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj")  # the linears reading the attention's input
MLP_INPUTS = ("gate_proj", "up_proj", "gate_up_proj")
MLP_LINEARS = MLP_INPUTS + ("down_proj",)
ATTENTIONS = ("s2", "sdpa", "flash", "eager")


@dataclass
class Estimate:
    parts: dict[str, int]  # bytes per device
    host_parts: dict[str, int] = field(default_factory=dict)  # bytes of host RAM per process (DeepSpeed offload)
    # Groups of parts live at different moments of backward; only the largest group counts toward the peak.
    phases: tuple[tuple[str, ...], ...] = ()

    @property
    def total(self) -> int:
        """The predicted peak in bytes: the persistent parts plus the largest phase."""
        in_phase = {k for group in self.phases for k in group}
        persistent = sum(v for k, v in self.parts.items() if k not in in_phase)
        return persistent + max((sum(self.parts[k] for k in group) for group in self.phases), default=0)


# ---------------------------------------------------------------------------------------------------------------
# The model's shape and parameters

@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: str | None = None  # "head": q/k norm weights of head_dim (Qwen3, Gemma-3); "full": of q/kv width (OLMo-2)
    norms: tuple[str, ...] = families.LLAMA_NORMS  # norm weights of one decoder layer
    fused: tuple[str, ...] = ()  # fused projections (Phi-3: qkv_proj, gate_up_proj)
    model_type: str = "llama"

    @classmethod
    def of(cls, config) -> "Shape":
        """From a transformers config of a family longctx supports (ConfigError naming any other model type)."""
        fam = families.of(config)
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = c.num_attention_heads
        attention_bias = bool(getattr(c, "attention_bias", False))
        return cls(hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_hidden_layers, heads=heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, vocab=c.vocab_size,
                   tied=bool(getattr(c, "tie_word_embeddings", False)), qkv_bias=attention_bias or fam.qkv_bias,
                   o_bias=attention_bias, mlp_bias=bool(getattr(c, "mlp_bias", False)), qk_norm=fam.qk_norm,
                   norms=fam.norms, fused=tuple(fam.fused), model_type=config.model_type)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a decoder layer; k/v are narrower under GQA."""
        H, I, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = ({"qkv_proj": (H, q + 2 * kv)} if "qkv_proj" in self.fused
                     else {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv)})
        mlp = {"gate_up_proj": (H, 2 * I)} if "gate_up_proj" in self.fused else {"gate_proj": (H, I), "up_proj": (H, I)}
        return {**attention, "o_proj": (q, H), **mlp, "down_proj": (I, H)}

    def has_bias(self, linear: str) -> bool:
        if linear in MLP_LINEARS:
            return self.mlp_bias
        return self.o_bias if linear == "o_proj" else self.qkv_bias

    def qk_norm_widths(self) -> tuple[int, int]:
        """Weights of the q and k norms of one layer (0, 0 without)."""
        if self.qk_norm == "full":
            return self.heads * self.head_dim, self.kv_heads * self.head_dim
        return (self.head_dim, self.head_dim) if self.qk_norm else (0, 0)


def parameter_counts(shape: Shape) -> dict[str, int]:
    """{name: numel} under transformers' names, as named_parameters() lists them (a tied head once)."""
    out = {"model.embed_tokens.weight": shape.vocab * shape.hidden}
    for i in range(shape.layers):
        prefix = f"model.layers.{i}."
        for name, (n_in, n_out) in shape.linears().items():
            module = prefix + ("mlp." if name in MLP_LINEARS else "self_attn.") + name
            out[module + ".weight"] = n_in * n_out
            if shape.has_bias(name):
                out[module + ".bias"] = n_out
        if shape.qk_norm:
            q, k = shape.qk_norm_widths()
            out[prefix + "self_attn.q_norm.weight"], out[prefix + "self_attn.k_norm.weight"] = q, k
        for norm in shape.norms:
            out[prefix + norm + ".weight"] = shape.hidden
    out["model.norm.weight"] = shape.hidden
    if not shape.tied:
        out["lm_head.weight"] = shape.vocab * shape.hidden
    return out


def lora_modules(shape: Shape, targets: Sequence[str] | str) -> tuple[str, ...]:
    """The adapted linears of each layer; 'all-linear' adapts every decoder linear (PEFT's rule: not the head).
    LongLoRA's names map onto fused projections as `add_lora` maps them (families.lora_targets)."""
    linears = shape.linears()
    names = tuple(linears) if targets == "all-linear" else tuple(families.lora_targets(shape.model_type, targets))
    unknown = [t for t in names if t not in linears]
    if unknown:
        raise ValueError(f"LoRA target(s) {', '.join(unknown)} are not linear layers of this model "
                         f"(it has {', '.join(linears)})")
    return names


def _lora_width(shape: Shape, adapted: Sequence[str]) -> int:
    """in + out features summed over the adapted linears of one layer: LoRA adds r * (in + out) to each."""
    return sum(sum(shape.linears()[name]) for name in adapted)


def lora_parameter_count(shape: Shape, r: int, targets: Sequence[str] | str) -> int:
    """r * (in + out) per adapted linear per layer."""
    return shape.layers * r * _lora_width(shape, lora_modules(shape, targets))


def trainable_names(params: dict[str, int], patterns: Sequence[str]) -> set[str]:
    """Parameter names containing one of the substrings, as `model.make_trainable` selects them."""
    names = set()
    for key in patterns:
        matched = {n for n in params if key in n}
        if not matched:
            raise ValueError(f"trainable_params: {key!r} matches no parameter name; names look like "
                             f"model.embed_tokens.weight, model.layers.0.input_layernorm.weight, model.norm.weight")
        names |= matched
    return names


def trainable_parameter_count(model_config, *, lora: bool = True, lora_r: int = 8,
                              lora_targets: Sequence[str] | str = ATTENTION_LINEARS,
                              trainable_params: Sequence[str] = ("embed", "norm")) -> int:
    """Trainable parameters of the run: LoRA adapters plus the embed/norm weights (everything without LoRA)."""
    shape = Shape.of(model_config)
    params = parameter_counts(shape)
    if not lora:
        return sum(params.values())
    extras = trainable_names(params, trainable_params)
    return lora_parameter_count(shape, lora_r, lora_targets) + sum(params[n] for n in extras)


# ---------------------------------------------------------------------------------------------------------------
# The estimate

@dataclass(frozen=True)
class _Bytes:
    """Bytes per element of each kind of tensor of the run."""

    weight: int  # unquantized base weights
    stream: int  # the residual stream (layer inputs, norm outputs)
    matmul: int  # linear-layer outputs (the autocast dtype under mixed precision)
    autocast: int | None  # what autocast casts a linear's input to (None: no mixed precision)
    lora: int  # LoRA adapters
    extra: int  # embed/norm weights trained beside LoRA

    @property
    def attention(self) -> int:
        """q, k, v and the attention output: autocast runs SDPA in its dtype (also under QLoRA's float32 stream)."""
        return self.autocast or self.matmul


def _bytes(dtype: str, quantization: str | None, mixed_precision: str | None, zero_stage: int) -> _Bytes:
    weight = DTYPE_BYTES[dtype]
    autocast = DTYPE_BYTES[mixed_precision] if mixed_precision else None
    if zero_stage and autocast:
        weight = autocast  # DeepSpeed casts every parameter (LoRA too) to the 16-bit dtype
    lora = weight if zero_stage and autocast else 4  # else PEFT keeps adapters in float32
    if quantization == "4bit":
        # PEFT's prepare_model_for_kbit_training upcasts every unquantized weight (embedding, norms, head) to
        # float32, so the residual stream is float32, and bitsandbytes returns its input's dtype.
        return _Bytes(weight=4, stream=4, matmul=4, autocast=autocast, lora=lora, extra=4)
    return _Bytes(weight=weight, stream=weight, matmul=autocast or weight, autocast=autocast, lora=lora, extra=weight)


def _is_quantized(name: str) -> bool:
    """bitsandbytes quantizes the decoder's linear weights; the embedding, norms, biases and head stay."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def _weight_bytes(params: dict[str, int], trained: set[str], n_lora: int, b: _Bytes, lora: bool,
                  quantization: str | None) -> tuple[int, int, int]:
    """(frozen weight bytes, trainable weight bytes, trainable parameters)."""
    frozen = sum(n * (NF4_BYTES_PER_PARAM if quantization == "4bit" and _is_quantized(k) else b.weight)
                 for k, n in params.items() if k not in trained)
    n_extra = sum(params[k] for k in trained)
    return int(frozen), n_lora * b.lora + n_extra * (b.extra if lora else b.weight), n_lora + n_extra


def _zero3_gathered(shape: Shape, b: _Bytes) -> int:
    """ZeRO-3 gathers whole weights while they compute: two layers, or the embedding/head when that is larger."""
    layer = sum(n_in * n_out for n_in, n_out in shape.linears().values())
    return max(ZERO3_LIVE_LAYERS * layer, shape.vocab * shape.hidden) * b.weight


def _kept_input(width: int, x_bytes: int, n_trained: int, n_adapted: int, b: _Bytes) -> int:
    """Bytes per token kept by the linears reading one input: a frozen linear keeps nothing (dx needs only W), a
    trained one its input, a LoRA one the input of lora_A. Read as it is, the input is kept once for all readers;
    cast, each reader keeps its own copy: autocast casts for every matmul, and PEFT casts to the adapter's dtype
    before that (then autocast casts back)."""
    trained_cast = b.autocast is not None and b.autocast != x_bytes
    adapted_cast = trained_cast or b.lora != x_bytes
    copies = ((n_trained * b.autocast if trained_cast else 0)
              + (n_adapted * (b.autocast or b.lora) if adapted_cast else 0))
    shared = (n_trained and not trained_cast) or (n_adapted and not adapted_cast)
    return width * (copies + (x_bytes if shared else 0))


def _layer_bytes_per_token(shape: Shape, b: _Bytes, adapted: Sequence[str], trained: set[str], lora_r: int) -> int:
    """Bytes one decoder layer keeps for its backward per token, besides the attention kernel's own state."""
    H, I, q = shape.hidden, shape.intermediate, shape.heads * shape.head_dim
    prefix = "model.layers.0."
    norms_trained = prefix + shape.norms[0] + ".weight" in trained
    linears = shape.linears()

    def readers(names):
        names = [n for n in names if n in linears]
        scope = "mlp." if names[0] in MLP_LINEARS else "self_attn."
        return (sum(prefix + scope + name + ".weight" in trained for name in names),
                sum(name in adapted for name in names))

    # Each RMSNorm keeps its input in float32 and, when its weight trains, its normalised input; q/k norms (Qwen3,
    # Gemma-3 per head, OLMo-2 over all heads) do the same over the q and k widths.
    norms = len(shape.norms) * H * (4 + (b.stream if norms_trained else 0))
    if shape.qk_norm:
        qk_trained = prefix + "self_attn.q_norm.weight" in trained
        norms += (q + shape.kv_heads * shape.head_dim) * (4 + (b.stream if qk_trained else 0))
    inputs = (_kept_input(H, b.stream, *readers(ATTENTION_INPUTS), b)
              + _kept_input(q, b.attention, *readers(["o_proj"]), b)  # the attention output
              + _kept_input(H, b.stream, *readers(MLP_INPUTS), b)
              + _kept_input(I, b.matmul, *readers(["down_proj"]), b))  # act(gate) * up
    lora_hidden = len(adapted) * lora_r * (b.autocast or b.lora)  # lora_A's output, kept by lora_B
    mlp = 3 * I * b.matmul  # gate (for silu), silu(gate) and up (for their product)
    return norms + inputs + lora_hidden + mlp


def _attention_bytes_per_token(shape: Shape, b: _Bytes, seq_len: int, attention: str) -> int:
    """What the attention keeps per token and layer for its backward: q, k and v after RoPE (S2 on the CPU: their
    copies laid out as segments), the output and a float32 log-sum-exp per head.

    S2 (segments of G tokens), SDPA and flash-attn kernels (also the CPU flash kernel SDPA picks for is_causal
    without a mask) are linear in N. Eager attention also keeps the N x N probabilities, in float32 (softmax) and
    cast for the matmul with v.
    """
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    rep = shape.heads // shape.kv_heads
    if attention == "s2" and rep > 1 and (shape.heads // 2) % rep:
        # S2's head halves do not split the kv groups evenly (SmolLM2: 9 heads over 3 kv heads), so k and v are
        # copied out per query head (attention._head_halves / _expand_kv).
        kv = q
    linear = (2 * q + 2 * kv) * b.attention + shape.heads * 4
    if "qkv_proj" in shape.fused:  # Phi-3: v is a view of the fused q/k/v output, which it keeps alive whole
        linear += (q + kv) * b.attention
    if attention == "eager":
        return linear + shape.heads * seq_len * (4 + b.attention)
    return linear


def _autocast_weight_copies(shape: Shape, b: _Bytes, quantization: str | None) -> int:
    """Bytes per layer of the 16-bit copies autocast makes of 32-bit linear weights, kept by the matmuls for dx
    (bitsandbytes keeps its 4-bit weights as they are)."""
    if not b.autocast or b.autocast == b.weight or quantization:
        return 0
    return sum(n_in * n_out for n_in, n_out in shape.linears().values()) * b.autocast


def _activation_parts(shape: Shape, b: _Bytes, layer: int, copies: int, tokens: int, seq_len: int, attention: str,
                      checkpointing: bool) -> dict[str, int]:
    """Saved activations, one layer's backward and the attention state; `layer`: _layer_bytes_per_token, `copies`:
    _autocast_weight_copies."""
    attn = _attention_bytes_per_token(shape, b, seq_len, attention)
    # The backward of one layer: the MLP gradients, plus the gradient arriving at the layer and its residual copy.
    grads = MLP_GRAD_COPIES * shape.intermediate * b.matmul + 2 * shape.hidden * b.stream
    rope = 2 * shape.head_dim * b.stream  # cos and sin, computed once per forward and shared by every layer
    if checkpointing:
        # Non-reentrant checkpointing keeps each layer's input only; backward recomputes one layer at a time, so
        # one layer's activations (and its attention state) exist at once, with their gradients.
        return {CHECKPOINTS: tokens * (shape.layers * shape.hidden * b.stream + rope),
                WORKING_SET: tokens * (layer + grads) + copies, ATTENTION: tokens * attn}
    return {ALL_ACTIVATIONS: tokens * (shape.layers * layer + rope) + shape.layers * copies,
            WORKING_SET: tokens * grads, ATTENTION: tokens * shape.layers * attn}


def _loss_bytes(shape: Shape, b: _Bytes, tokens: int, chunked: bool, chunk_size: int) -> int:
    """The loss phase: the logits (all of them, or one chunk) and the final norm with its output's gradient."""
    H = shape.hidden
    final_norm = tokens * (4 * H + 3 * b.stream * H)  # input, normalised input, output and the output's gradient
    if chunked:
        # One chunk of logits at a time, a float32 log-sum-exp per token kept for the backward.
        return CHUNK_LOSS_COPIES * min(chunk_size, tokens) * shape.vocab * 4 + tokens * 4 + final_norm
    return PLAIN_LOSS_COPIES * tokens * shape.vocab * 4 + final_norm


def _state_parts(shape: Shape, b: _Bytes, frozen: int, trainable: int, n_trainable: int, *, zero_stage: int,
                 world_size: int, offload: bool, reduce_bucket_size: int) -> tuple[dict[str, int], dict[str, int]]:
    """Weights, gradients and optimizer state: (bytes on the device, bytes in host RAM)."""
    if zero_stage:
        # DeepSpeed: float32 gradient partitions (ZeRO-2/3 keep only this rank's share) plus the reduce bucket
        # it stages them through (allocated whole, however few parameters train); float32 Adam states and, for
        # 16-bit weights, float32 master weights (ZeRO-1+ partition both).
        grads = n_trainable * 4 // (world_size if zero_stage >= 2 else 1)
        bucket = reduce_bucket_size * b.weight
        optimizer = n_trainable * (4 * ADAM_STATES + (4 if b.weight < 4 else 0)) // world_size
    else:
        # torch AdamW: gradients and both states in each trainable parameter's own dtype.
        grads, bucket, optimizer = trainable, 0, ADAM_STATES * trainable
    shard = world_size if zero_stage == 3 else 1  # ZeRO-3 partitions the parameters themselves
    weights, trainable = frozen // shard, trainable // shard
    host = {}
    if offload:
        # DeepSpeed's CPU Adam: gradients, master weights and states in host RAM; under ZeRO-3 the weights too.
        host = {GRADIENTS: grads, OPTIMIZER: optimizer} | ({WEIGHTS: weights + trainable} if zero_stage == 3 else {})
        grads = optimizer = 0
        weights, trainable = (0, 0) if zero_stage == 3 else (weights, trainable)
    gathered = _zero3_gathered(shape, b) if zero_stage == 3 else 0
    parts = {WEIGHTS: weights + gathered, TRAINABLE: trainable, GRADIENTS: bucket + grads, OPTIMIZER: optimizer}
    return parts, host


def estimate(model_config, *, seq_len: int, batch_size: int = 1, lora: bool = True, lora_r: int = 8,
             lora_targets: Sequence[str] | str = ATTENTION_LINEARS, trainable_params: Sequence[str] = ("embed", "norm"),
             quantization: str | None = None, dtype: str = "float32", mixed_precision: str | None = None,
             gradient_checkpointing: bool = True, attention: str = "s2", group_size: int | None = None,
             chunked_loss: bool = True, loss_chunk_size: int = 1024, zero_stage: int = 0, world_size: int = 1,
             offload: bool = False, reduce_bucket_size: int = DEEPSPEED_DEFAULT_BUCKET,
             device: str = "cuda", sequence_parallel: int = 1) -> Estimate:
    """Peak memory per device of one training step; see the module docstring for the model.

    zero_stage 0 means no DeepSpeed (torch AdamW, states in each parameter's dtype); 1-3 DeepSpeed ZeRO, which
    under mixed precision casts the model to 16 bits and keeps float32 master weights. `offload` moves the
    optimizer (and under ZeRO-3 the weights) to host RAM (`host_parts`). `group_size` (S2) does not change the
    memory, which is linear in N for any G; it is checked only. `reduce_bucket_size` (elements): ZeRO's gradient
    bucket. `sequence_parallel` P (DeepSpeed Ulysses, issue 12): a process holds N/P tokens of each sequence in
    every layer, the loss included, and after the all-to-all the whole sequence for H/P heads, the same number of
    attention bytes; ZeRO still partitions over all world_size processes (DeepSpeed's sequence-data-parallel
    group). Not modelled under SP: the all-to-all buffers and the kv heads replicated when P > H_kv.
    Raises ValueError for settings the model does not have (a LoRA target, a trainable_params substring).
    """
    _check(dtype, quantization, mixed_precision, attention, zero_stage, world_size, seq_len, group_size, device)
    if sequence_parallel < 1 or world_size % sequence_parallel or seq_len % sequence_parallel:
        raise ValueError(f"sequence_parallel must divide world_size={world_size} and seq_len={seq_len}, "
                         f"got {sequence_parallel}")
    tokens = batch_size * seq_len // sequence_parallel
    shape = Shape.of(model_config)
    b = _bytes(dtype, quantization, mixed_precision, zero_stage)
    params = parameter_counts(shape)
    trained = trainable_names(params, trainable_params) if lora else set(params)  # full fine-tuning: every one
    adapted = lora_modules(shape, lora_targets) if lora else ()
    n_lora = shape.layers * lora_r * _lora_width(shape, adapted)
    frozen, trainable, n_trainable = _weight_bytes(params, trained, n_lora, b, lora, quantization)
    parts, host = _state_parts(shape, b, frozen, trainable, n_trainable, zero_stage=zero_stage,
                               world_size=world_size, offload=offload, reduce_bucket_size=reduce_bucket_size)
    layer = _layer_bytes_per_token(shape, b, adapted, trained, lora_r)
    copies = _autocast_weight_copies(shape, b, quantization)
    parts |= _activation_parts(shape, b, layer, copies, tokens, seq_len, attention, gradient_checkpointing)
    # The chunked loss falls back to the plain one under ZeRO-3 (the head's weight is a partition: trainer.py).
    parts[LOSS] = _loss_bytes(shape, b, tokens, chunked_loss and zero_stage != 3, loss_chunk_size)
    parts[RUNTIME] = CUDA_RUNTIME if device == "cuda" else CPU_RUNTIME
    layer_phase = (WORKING_SET, ATTENTION) if gradient_checkpointing else (WORKING_SET,)
    return Estimate(parts=parts, host_parts=host, phases=(layer_phase, (LOSS,)))


def _check(dtype, quantization, mixed_precision, attention, zero_stage, world_size, seq_len, group_size,
           device) -> None:
    problems = []
    if dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if quantization not in (None, "4bit"):
        problems.append(f"quantization must be None or '4bit', got {quantization!r}")
    if mixed_precision not in (None, "bf16", "fp16"):
        problems.append(f"mixed_precision must be None, 'bf16' or 'fp16', got {mixed_precision!r}")
    if attention not in ATTENTIONS:
        problems.append(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if zero_stage not in (0, 1, 2, 3) or world_size < 1 or seq_len < 1:
        problems.append(f"need zero_stage in 0..3, world_size >= 1, seq_len >= 1; got {zero_stage}, "
                        f"{world_size}, {seq_len}")
    if group_size is not None and not 2 <= group_size <= seq_len:
        problems.append(f"group_size must be in [2, seq_len={seq_len}], got {group_size}")
    if device not in ("cuda", "cpu"):
        problems.append(f"device must be 'cuda' or 'cpu', got {device!r}")
    if problems:
        raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# From a longctx config

def read_model_config(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The transformers config of the base model (config.json, or the GGUF metadata) of a family longctx supports;
    ConfigError if unreadable or unsupported (the family is named before any LoRA target problem)."""
    from longctx.model import read_config
    from longctx.patch import check_supported

    model_config = read_config(name_or_path, gguf_file, trust_remote_code)
    check_supported(model_config)
    return model_config


def deepspeed_settings(path: str | None, hidden_size: int) -> tuple[int, bool, int]:
    """(zero stage, optimizer offloaded, reduce bucket elements) from a DeepSpeed json; (0, False, 0) without one."""
    if path is None:
        return 0, False, 0
    try:
        zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.deepspeed: cannot read {path}: {e}") from None
    offload = zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    bucket = zero.get("reduce_bucket_size", DEEPSPEED_DEFAULT_BUCKET)
    # Trainer fills "auto" with hidden_size^2 (transformers.integrations.deepspeed).
    bucket = hidden_size * hidden_size if bucket == "auto" else int(bucket)
    return int(zero.get("stage", 0)), offload, bucket


def plan_arguments(cfg: Config) -> dict:
    """`estimate_model`'s settings from a validated config: the builder's half (train and `longctx plan` call it;
    everything below takes plain arguments)."""
    m, t, a = cfg.model, cfg.train, cfg.attention
    s2 = a.type == "s2"
    return dict(
        seq_len=t.seq_len, batch_size=t.per_device_train_batch_size, lora=cfg.lora.enabled, lora_r=cfg.lora.r,
        lora_targets=cfg.lora.target_modules, trainable_params=cfg.lora.trainable_params,
        quantization=m.quantization, dtype=m.dtype, mixed_precision="bf16" if t.bf16 else "fp16" if t.fp16 else None,
        gradient_checkpointing=t.gradient_checkpointing, attention="s2" if s2 else None,  # None: as load_model
        group_size=group_size(t.seq_len, a.group_size_ratio, a.group_size) if s2 else None,
        chunked_loss=t.chunked_loss, loss_chunk_size=t.loss_chunk_size, deepspeed=t.deepspeed,
        sequence_parallel=t.sequence_parallel_size)


def estimate_model(model_config, *, deepspeed: str | None = None, world_size: int = 1, device: str = "cuda",
                   **settings) -> Estimate:
    """`estimate` with the ZeRO settings read from a DeepSpeed json; ConfigError for a shape the planner does not
    know or a LoRA target the model lacks."""
    try:
        shape = Shape.of(model_config)
    except AttributeError as e:
        raise ConfigError(f"model.name_or_path: {getattr(model_config, 'name_or_path', '') or 'the model'} has no "
                          f"Llama-style shape the planner knows ({e})") from None
    stage, offload, bucket = deepspeed_settings(deepspeed, shape.hidden)
    P = settings.get("sequence_parallel", 1)
    if world_size % P:
        raise ConfigError(f"train.sequence_parallel_size: {P} must divide the number of processes, {world_size} "
                          "(longctx plan --world-size)")
    try:
        if settings.get("attention") is None:  # full attention: the implementation load_model picks (Gemma-2 eager)
            settings["attention"] = families.of(model_config).attn_implementation
        return estimate(model_config, zero_stage=stage, world_size=world_size, offload=offload,
                        reduce_bucket_size=bucket, device=device, **settings)
    except ValueError as e:  # a LoRA target or trainable_params substring the model does not have
        raise ConfigError(f"lora: {e}") from None


def estimate_config(cfg: Config, world_size: int = 1, device: str = "cuda", sequence_parallel: int | None = None
                    ) -> Estimate:
    """`estimate` for a validated longctx config: reads the model's config.json and the DeepSpeed json.
    `sequence_parallel`: P instead of the config's train.sequence_parallel_size."""
    m = cfg.model
    model_config = read_model_config(m.name_or_path, m.gguf_file, m.trust_remote_code)
    settings = plan_arguments(cfg) | ({} if sequence_parallel is None else {"sequence_parallel": sequence_parallel})
    return estimate_model(model_config, world_size=world_size, device=device, **settings)


def sequence_parallel_sizes(model_config, world_size: int, seq_len: int) -> list[int]:
    """The P a run of `world_size` processes can use for this model and seq_len: 1 and what DeepSpeed Ulysses
    accepts for the heads (longctx.sequence_parallel), dividing the world size and seq_len."""
    from longctx.sequence_parallel import allowed_sizes, heads_of

    return [1] + [p for p in allowed_sizes(*heads_of(model_config), upto=world_size)
                  if world_size % p == 0 and seq_len % p == 0]


def choose_sequence_parallel(cfg: Config, world_size: int, device: str, budget: int | None
                             ) -> tuple[int, Estimate, list[str]]:
    """`longctx plan --sequence-parallel auto`: the smallest P whose predicted peak fits `budget` (the largest
    possible P when none does), its estimate, and one line per P tried. Smaller P is preferred: less all-to-all
    traffic, more data parallelism."""
    m = cfg.model
    model_config = read_model_config(m.name_or_path, m.gguf_file, m.trust_remote_code)
    lines, chosen = [], None
    for p in sequence_parallel_sizes(model_config, world_size, cfg.train.seq_len):
        e = estimate_model(model_config, world_size=world_size, device=device,
                           **(plan_arguments(cfg) | {"sequence_parallel": p}))
        fits = budget is None or e.total <= budget
        lines.append(f"  P={p:<4} {cfg.train.seq_len // p:>9} tokens per process  peak {e.total / GiB:9.3f} GiB"
                     f"{'' if fits else '  (does not fit)'}")
        if chosen is None and fits:
            chosen = (p, e)
        last = (p, e)
    p, e = chosen or last
    return p, e, lines


# ---------------------------------------------------------------------------------------------------------------
# Output

def device_budget(device: str) -> int | None:
    """Bytes of the device: the machine's RAM on cpu, GPU 0's memory on cuda (None without a GPU here)."""
    if device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def warning(e: Estimate, budget_bytes: int | None) -> str | None:
    """One line when the estimate exceeds the budget, naming the largest part; None when it fits."""
    if budget_bytes is None or e.total <= budget_bytes:
        return None
    largest = max(e.parts, key=e.parts.get)
    return (f"WARNING: predicted peak {e.total / GiB:.2f} GiB per device exceeds the budget of "
            f"{budget_bytes / GiB:.2f} GiB; the largest part is {largest} ({e.parts[largest] / GiB:.2f} GiB)")


def format_estimate(e: Estimate, budget_bytes: int | None) -> str:
    """The breakdown in GiB, the peak, host RAM under offload, the budget and a WARNING line if it won't fit."""
    in_phase = {k: i for i, group in enumerate(e.phases) for k in group}
    lines = ["memory per device (GiB)"]
    lines += [f"  {name:<28}{value / GiB:>9.3f}{'  *' if name in in_phase else ''}" for name, value in e.parts.items()]
    lines.append(f"  {'peak (predicted)':<28}{e.total / GiB:>9.3f}")
    if e.phases:
        groups = " | ".join(" + ".join(g) for g in e.phases)
        lines.append(f"  * live at different moments of backward; the peak counts the larger of: {groups}")
    if e.host_parts:
        host = ", ".join(f"{k} {v / GiB:.3f}" for k, v in e.host_parts.items())
        lines.append(f"  host RAM per process (offload): {host}")
    lines.append(f"  {'budget':<28}{budget_bytes / GiB:>9.3f}" if budget_bytes is not None
                 else "  budget: unknown (no GPU on this machine; give --budget-gb)")
    line = warning(e, budget_bytes)
    return "\n".join(lines + ([line] if line else []))


def warn_if_too_big(model_config, world_size: int, **settings) -> None:
    """Log one WARNING when the plan (`estimate_model(model_config, **settings)`) exceeds this device; never stops
    training (the plan is advice)."""
    device = "cpu"
    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        line = warning(estimate_model(model_config, world_size=world_size, device=device, **settings),
                       device_budget(device))
    except Exception as e:  # noqa: BLE001  an unknown architecture or setting must not stop a run
        log.info("memory plan skipped: %s", e)
        return
    if line:
        log.warning("%s on %s; see `longctx plan CONFIG` for the breakdown", line, device)


def cmd_plan(args) -> int:
    from longctx.config import load_config

    cfg = load_config(args.config, overrides=args.overrides)
    budget = int(args.budget_gb * GiB) if args.budget_gb is not None else device_budget(args.device)
    sp = args.sequence_parallel
    if sp == "auto":
        p, e, lines = choose_sequence_parallel(cfg, args.world_size, args.device, budget)
        print(f"sequence parallelism for {cfg.train.seq_len} tokens on {args.world_size} processes:")
        print("\n".join(lines))
        print(f"chosen: train.sequence_parallel_size={p} (data-parallel size {args.world_size // p})")
    else:
        if sp is not None and (args.world_size % int(sp) or cfg.train.seq_len % int(sp)):
            raise ConfigError(f"--sequence-parallel: {sp} must divide --world-size {args.world_size} and "
                              f"train.seq_len={cfg.train.seq_len}")
        e = estimate_config(cfg, world_size=args.world_size, device=args.device,
                            sequence_parallel=None if sp is None else int(sp))
    print(format_estimate(e, budget))
    return 3 if args.strict and warning(e, budget) else 0


def add_parser(sub) -> None:
    import torch

    from longctx.cli import number

    about = ("predict the peak memory per device of a training config and print the breakdown; advice only: "
             "exits 0 even when it will not fit (with a WARNING line), unless --strict")
    p = sub.add_parser("plan", help=about, description=about)
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.seq_len=16384")
    p.add_argument("--world-size", type=number(int, 1), default=1,
                   help="processes (GPUs) in the run, all nodes together")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where it runs (default: what `train` would use on this machine)")
    p.add_argument("--budget-gb", type=number(float, 0, low_in=False), default=None,
                   help="device memory in GiB (default: GPU 0's memory on cuda, total RAM on cpu)")
    p.add_argument("--strict", action="store_true", help="exit 3 when the plan does not fit the budget")
    p.add_argument("--sequence-parallel", type=_sp_size, default=None, metavar="P|auto",
                   help="plan with this train.sequence_parallel_size (processes per sequence, DeepSpeed Ulysses), "
                        "or 'auto': the smallest P that fits the budget for this seq_len on --world-size processes")
    p.set_defaults(func=cmd_plan)


def _sp_size(text: str) -> str:
    import argparse

    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'auto', got {text!r}")
