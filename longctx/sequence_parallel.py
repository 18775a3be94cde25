"""Sequence parallelism (issue 12): one sequence split over P processes with DeepSpeed Ulysses (ALST,
arXiv 2506.13996), wired the way transformers 5 and accelerate wire it.

`train.sequence_parallel_size: P` passes `ParallelismConfig(sp_size=P, sp_backend="deepspeed")` to TrainingArguments.
accelerate then registers DeepSpeed's `UlyssesSPAttentionHF` over the model's attention, builds the SP groups
(consecutive ranks: SP rank = rank % P), wraps the train dataloader in `UlyssesSPDataLoaderAdapter` (each rank gets
T/P tokens of every batch, labels pre-shifted as `shift_labels`); LongctxTrainer computes the loss. Before
attention one all-to-all swaps the sequence shard for a head shard: rank r then holds query heads
[r*H/P, (r+1)*H/P) of the whole sequence. No all-to-all here: only what the engine does not do for us.

- `config_problems`, `world_problems`, `model_problems`: what cannot work, named by key, before any model loads.
- `prepare`: after `longctx.apply`, tells S² which global heads this rank holds (DeepSpeed passes no head offset:
  without it each rank shifted half of its own heads, silently wrong, docs/design.md §7); full attention runs as S²
  with one group and no shift, i.e. causal attention within each document, because the wrapper drops every mask and
  hands over the gathered position_ids only (SDPA would then attend across packed documents). Either way the wrapped
  name is longctx's own, so the process's "sdpa" is never wrapped. Undo steps go on the handle: DeepSpeed installs
  its wrapper process-wide with no undo and sets `num_key_value_groups` on the modules; `remove()` takes both back.
- `PositionIds`: the wrapper asserts position_ids in every batch (TRL #6812 failed on exactly that).
- `token_weighted_mean`, `zero_gradient_scale`: the SP loss (transformers' own gives P times the gradients).
- `skip_trained_batches`: resume (Trainer's own skip fails on the adapter).
"""

from __future__ import annotations

from dataclasses import replace

import torch

SDPA_EQUIVALENT = {"group_size_ratio": 1.0, "shift": False}  # S² with one group, no shift = causal per document


def config_problems(cfg) -> list[str]:
    """What a config with train.sequence_parallel_size > 1 must satisfy without knowing the model or the launch."""
    t, P = cfg.train, cfg.train.sequence_parallel_size
    out = []
    if t.deepspeed is None:
        out.append(f"train.sequence_parallel_size: {P} needs DeepSpeed (sequence parallelism is DeepSpeed Ulysses): "
                   "set train.deepspeed, e.g. configs/deepspeed/zero2.json or zero3.json")
    if t.seq_len % P:
        out.append(f"train.sequence_parallel_size: {P} must divide train.seq_len={t.seq_len} (each process holds "
                   f"seq_len / P tokens); allowed: a divisor of {t.seq_len}, or a seq_len that is a multiple of {P}")
    if t.gradient_accumulation_steps % P:
        out.append(f"train.sequence_parallel_size: {P} must divide train.gradient_accumulation_steps="
                   f"{t.gradient_accumulation_steps}: DeepSpeed's data adapter hands out the batches of an SP group's "
                   f"{P} processes in turns of {P} micro-batches, and a checkpoint must end a turn to resume exactly; "
                   f"allowed: gradient_accumulation_steps a multiple of {P}")
    if cfg.model.quantization:
        out.append(f"train.sequence_parallel_size: {P} with model.quantization {cfg.model.quantization} (QLoRA) is "
                   "not supported: DeepSpeed ZeRO does not partition 4-bit weights; use LoRA on a 16-bit base "
                   "(model.quantization: null), or sequence_parallel_size: 1")
    return out


def allowed_sizes(heads: int, kv_heads: int, upto: int | None = None) -> list[int]:
    """The P > 1 DeepSpeed Ulysses accepts for a model: P divides the query heads, and P divides the kv heads or
    is a multiple of them (kv heads are then replicated)."""
    return [p for p in range(2, (upto or heads) + 1)
            if heads % p == 0 and (kv_heads % p == 0 or p % kv_heads == 0)]


def heads_of(model_config) -> tuple[int, int]:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    H = text.num_attention_heads
    return H, getattr(text, "num_key_value_heads", None) or H


def world_problems(P: int, world: int) -> list[str]:
    """The launch: checked before TrainingArguments, which size the SP and data-parallel groups from it."""
    if P == 1 or world % P == 0:
        return []
    return [f"train.sequence_parallel_size: {P} must divide the number of processes, {world} (launch with torchrun "
            f"and a multiple of {P} processes in all; the data-parallel size is processes / {P})"]


def model_problems(P: int, model_config) -> list[str]:
    """The model (family, heads): checked on its config before the weights load."""
    if P == 1:
        return []
    from longctx import families

    try:
        if families.check(model_config) != "rope":
            raise ValueError(f"model type {model_config.model_type!r} uses ALiBi, whose bias would be built for "
                             "the local shard's length")
        families.check_s2(model_config)  # longctx runs attention under SP through the S² function (prepare)
    except ValueError as e:
        return [f"train.sequence_parallel_size: {P} is not supported for this model: {e}"]
    H, H_kv = heads_of(model_config)
    if P not in allowed_sizes(H, H_kv, upto=max(P, H)):
        return [f"train.sequence_parallel_size: {P} does not fit the model's {H} attention heads and {H_kv} kv heads "
                f"(DeepSpeed Ulysses: P divides the heads, and divides the kv heads or is a multiple of them); "
                f"allowed: {', '.join(map(str, allowed_sizes(H, H_kv))) or 'none'}"]
    return []


def training_arguments(P: int, world: int, seq_len: int) -> dict:
    """The TrainingArguments fields for SP (empty for P = 1)."""
    if P == 1:
        return {}
    from accelerate import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    from longctx.attention import NAME

    handler = DeepSpeedSequenceParallelConfig(sp_seq_length=seq_len, sp_seq_length_is_variable=True,
                                              sp_attn_implementation="sdpa")
    # accelerate's __post_init__ admits only its built-in names; DeepSpeed wraps any registered attention (ran:
    # docs/design.md §7), and longctx's is the S² function for both attention types (module docstring).
    handler.sp_attn_implementation = NAME
    # dp_shard_size: accelerate sizes DeepSpeed's train_batch_size with the data-parallel size (world / P).
    pc = ParallelismConfig(sp_size=P, sp_backend="deepspeed", sp_handler=handler, dp_shard_size=max(world // P, 1))
    # The wrapper checks the micro batch shape: a short last batch would fail its assertion.
    return {"parallelism_config": pc, "dataloader_drop_last": True}


def data_parallel_size(P: int, world: int) -> int:
    return max(world // P, 1)


def prepare(handle, P: int, rank: int) -> None:
    """After `longctx.apply` and before Trainer: select longctx's attention with this rank's head offset, and push
    the undo steps on `handle` (see the module docstring)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from longctx import attention as s2
    from longctx.methods.rotary import attention_modules

    base = handle.model.get_base_model() if hasattr(handle.model, "get_base_model") else handle.model
    modules = attention_modules(base)
    s2.register()
    if base.config._attn_implementation != s2.NAME:  # attention.type: full
        old_impl = base.config._attn_implementation
        base.set_attn_implementation(s2.NAME)
        handle._undo.append(lambda: base.set_attn_implementation(old_impl))
        for m in modules:
            m.s2_settings = s2.S2Settings(**SDPA_EQUIVALENT)
            handle._undo.append(lambda m=m: delattr(m, "s2_settings"))
    for m in modules:
        old = m.s2_settings
        m.s2_settings = replace(old, sp_rank=rank % P, sp_size=P)  # DeepSpeed's SP groups are consecutive ranks
        handle._undo.append(lambda m=m, old=old: setattr(m, "s2_settings", old))
        if hasattr(m, "num_key_value_groups"):  # the wrapper sets it when it replicates kv heads (P > H_kv)
            handle._undo.append(lambda m=m, g=m.num_key_value_groups: setattr(m, "num_key_value_groups", g))

    def unwrap():  # the wrapper sits in the instance mapping, over the registered function: drop it
        if ALL_ATTENTION_FUNCTIONS[s2.NAME] is not s2.s2_attention_forward:
            del ALL_ATTENTION_FUNCTIONS[s2.NAME]

    handle._undo.append(unwrap)


def skip_trained_batches(dataloader, global_step: int, grad_accum: int, P: int):
    """Resume: the train dataloader of this rank without the batches the checkpoint's steps consumed.

    Trainer's own skip (accelerate's `skip_first_batches`) fails on DeepSpeed's `UlyssesSPDataLoaderAdapter` (it has
    no `.dataset`: AttributeError on every resume), so train() turns Trainer's skip off (`ignore_data_skip`) and
    the batches are skipped here, under the adapter: each rank's batch becomes P micro-batches of the SP group, so
    the micro-batches trained in this epoch are P times this rank's batches (config_problems: GA % P == 0)."""
    from accelerate import skip_first_batches

    per_epoch = -(-len(dataloader) * P // grad_accum)  # optimizer steps per epoch, as Trainer counts them under SP
    micro = (global_step % per_epoch) * grad_accum
    return skip_first_batches(dataloader, micro // P) if micro else dataloader


def enabled(accelerator) -> bool:
    pc = getattr(accelerator, "parallelism_config", None)
    return pc is not None and pc.sp_backend == "deepspeed" and pc.sp_size > 1


def zero_gradient_scale(ds_config: dict, P: int) -> float:
    """What the SP loss's gradient must be multiplied by for DeepSpeed to end with the true gradient.

    DeepSpeed 0.19.8 reduces SP gradients two ways: ZeRO-1/2 (zero/stage_1_and_2.py) and ZeRO-3's contiguous
    path divide the sum over all ranks by world / P, so the SP ranks' gradients add up; ZeRO-3's reduce-scatter
    path (stage3.py `__avg_scatter_grads` -> `reduce_scatter_coalesced`, the default: reduce_scatter true) divides
    by the whole world, which leaves 1/P of the gradient (measured: the grad norm of a zero3.json run at P = 2 was
    half the 1-process one). Each rank backpropagates its own tokens once, so the second case needs P."""
    zero = ds_config.get("zero_optimization", {})
    return float(P) if zero.get("stage", 0) == 3 and zero.get("reduce_scatter", True) else 1.0


def token_weighted_mean(total: torch.Tensor, count: torch.Tensor, group=None, grad_scale: float = 1.0
                        ) -> torch.Tensor:
    """The loss of the whole sequence from each SP rank's loss sum over its shard (`total`) and its number of scored
    tokens (`count`): sum of totals / sum of counts over the SP group, the same value on every rank.

    Only this rank's own sum carries gradient. DeepSpeed sums gradients over the SP group (ZeRO divides by
    dp_world / P, zero/stage_1_and_2.py), so each rank must backpropagate its own tokens once. transformers'
    deepspeed_sp_compute_loss all-gathers the losses differentiably instead, and that all-gather's backward sums
    the P ranks' copies: P times the gradient (the logged grad_norm doubled at P = 2; Adam hides most of it, but
    not gradient clipping). `grad_scale` multiplies the gradient only (zero_gradient_scale)."""
    if group is None:
        from deepspeed.utils import groups  # the SP group DeepSpeed built (accelerate and transformers look it up so)

        group = groups._get_sequence_parallel_group()
    sums = torch.stack([total.detach().float(), count.to(total.device).float()])
    torch.distributed.all_reduce(sums, group=group)
    n = sums[1].clamp(min=1)
    local = total * (grad_scale / n)
    return local + (sums[0] / n - local).detach()


class PositionIds:
    """A collator wrapper: every batch carries position_ids (0..T-1 per row where the rows have none), as the
    Ulysses wrapper requires; rows are padded to a multiple of P by the inner collator."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        if "position_ids" not in batch:
            B, T = batch["input_ids"].shape
            batch["position_ids"] = torch.arange(T).expand(B, T).contiguous()
        return batch
