"""The longctx config: a typed, strict schema read from YAML plus dotted overrides.

    cfg = load_config("configs/quickstart.yaml", overrides=["train.max_steps=10"])

Every problem in a config is collected and reported at once in one `ConfigError` whose message names the key and
what is allowed; the CLI prints it and exits 2. Components never read this object: `train.py` and the CLI turn it
into plain arguments (docs/design.md §1, principle 4).
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from longctx import methods as method_registry
from longctx import rope as rope_registry
from longctx.errors import validation_messages


class ConfigError(ValueError):
    """An invalid config or input; the message is meant for the user as it is (the CLI exits 2 on it)."""


class _Section(BaseModel):
    # allow_inf_nan=False: inf and nan (YAML's .inf, .nan) are refused in every float field (issue 18 item 10)
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)


class ModelConfig(_Section):
    name_or_path: str = Field(description="Hugging Face directory or hub id, or a .gguf file.")
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path, when that is a directory or hub id.")
    tokenizer: str | None = Field(None, description="Tokenizer directory or hub id; default: the model's own.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weight dtype of the base model.")
    quantization: Literal["4bit"] | None = Field(None, description="'4bit': bitsandbytes NF4 with double quantization (QLoRA).")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless you need it.")


class AttentionConfig(_Section):
    type: Literal["s2", "full"] = Field("s2", description="'s2': shift-short attention while training (LongLoRA); 'full': dense causal.")
    group_size_ratio: float = Field(0.25, description="S2 group size as a fraction of the sequence length (LongLoRA: 1/4).")
    group_size: int | None = Field(None, description="Absolute S2 group size in tokens; overrides group_size_ratio.")
    shift: bool = Field(True, description="Shift half of the heads by half a group (the 'shift' in S2; off only for ablations).")


class LoraConfig(_Section):
    enabled: bool = Field(True, description="LoRA adapters; false means full fine-tuning.")
    r: int = Field(8, description="LoRA rank (LongLoRA: 8).")
    alpha: float = Field(16, description="LoRA alpha (LongLoRA: 16).")
    dropout: float = Field(0.0, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="Modules to adapt, or 'all-linear'.")
    trainable_params: list[str] = Field(
        ["embed", "norm"], description="Name substrings made fully trainable besides LoRA (LongLoRA+: embed, norm).")


class DataSource(_Section):
    path: str = Field(description="A source as data.train takes it: builtin, local file/dir/glob, or hub dataset name.")
    # nan/inf pass the type here (only here) so that cross_field_problems words it: "data.train[1].weight: must be
    # a finite number > 0", instead of pydantic's error for each branch of data.train's str | list union.
    weight: float = Field(1.0, allow_inf_nan=True,
                          description="Share of the training tokens, relative to the other sources' weights.")


class DataConfig(_Section):
    train: str | list[DataSource] = Field("builtin:python-stdlib", description="'builtin:python-stdlib', a local file/dir/glob (.txt .jsonl .json .parquet, or data.suffixes) or hub dataset name; or a list of {path, weight} to mix.")
    eval: str | None = Field(None, description="Evaluation source, used whole; default: the validation split held out of data.train (pretrain).")
    format: Literal["pretrain", "sft"] = Field("pretrain", description="'pretrain': packed blocks; 'sft': conversations (messages, instruction/input/output, prompt/completion) with the answers trained.")
    text_field: str = Field("text", description="Text field of json/parquet/hub records (pretrain; plain documents in sft).")
    suffixes: list[str] | None = Field(None, description="File types read from a directory or glob: .jsonl/.json/.parquet as rows, any other (.py, .md, .rs, ...) as one plain-text document per file; default .txt .jsonl .json .parquet.")
    hub_config: str | None = Field(None, description="Hub dataset config name.")
    hub_split: str = Field("train", description="Hub dataset split.")
    min_doc_tokens: int = Field(0, description="Skip (and count) documents shorter than this many tokens (pretrain).")
    document_aware: bool = Field(False, description="Restart position_ids at each packed document; attention never crosses documents (pretrain).")
    template: Literal["auto", "tokenizer", "chatml", "llama2", "prompt", "plain"] = Field("auto", description="sft: chat template; auto = the tokenizer's own, else 'prompt'.")
    prompt_template: str = Field("[INST] {instruction}{input} [/INST]", description="sft, template 'prompt': {instruction} and {input} are filled in.")
    train_on: Literal["assistant", "all"] = Field("assistant", description="sft: train on the assistant's tokens only, or on all tokens.")
    overlong: Literal["drop", "truncate_left", "truncate_right", "error"] = Field("drop", description="sft: a conversation longer than train.seq_len is dropped, cut at the start or end, or an error; counted in the log.")
    pack: bool = Field(True, description="sft: pack conversations into rows of train.seq_len (position_ids restart per conversation).")
    skip_bad_rows: bool = Field(False, description="Skip (and count) rows that do not fit their format and unreadable files, instead of exit 2.")
    num_proc: int | None = Field(None, description="Tokenization processes; default: the CPU count, at most 8.")

    @field_validator("train", mode="before")
    @classmethod
    def _plain_paths(cls, v):
        # a list may name sources by path alone (weight 1)
        return [{"path": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

    def train_sources(self) -> str | list[dict]:
        """data.train as the data builders take it."""
        return self.train if isinstance(self.train, str) else [s.model_dump() for s in self.train]


class TrainConfig(_Section):
    """Keys mirror transformers.TrainingArguments where one exists."""

    output_dir: str = Field("runs/run", description="Run directory (config.yaml, checkpoint-*, final/, eval/).")
    seq_len: int = Field(description="Training context length in tokens.")
    max_steps: int = Field(1000, description="Optimizer steps.")
    learning_rate: float = Field(2e-5, description="Peak learning rate (LongLoRA: 2e-5).")
    lr_scheduler_type: str = Field("constant_with_warmup", description="transformers scheduler name.")
    warmup_steps: int = Field(20, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, description="AdamW beta1.")
    adam_beta2: float = Field(0.95, description="AdamW beta2 (LongLoRA: 0.95).")
    max_grad_norm: float = Field(1.0, description="Gradient clipping.")
    per_device_train_batch_size: int = Field(1, description="Micro batch per device.")
    gradient_accumulation_steps: int = Field(8, description="Micro batches per optimizer step.")
    gradient_checkpointing: bool = Field(True, description="Non-reentrant activation checkpointing.")
    chunked_loss: bool = Field(True, description="Loss without materialising all logits: chunked lm_head + cross-entropy with recomputation (Liger's fused kernel on CUDA when installed); the same loss and gradients as the plain one.")
    loss_chunk_size: int = Field(1024, description="chunked_loss: tokens per chunk; at most this many x vocab logits exist at a time.")
    bf16: bool = Field(False, description="bf16 mixed precision.")
    fp16: bool = Field(False, description="fp16 mixed precision.")
    logging_steps: int = Field(10, description="Log every this many steps.")
    save_steps: int = Field(200, description="Checkpoint every this many steps.")
    save_total_limit: int | None = Field(None, description="Keep at most this many checkpoints.")
    seed: int = Field(42, description="Seed for model init, data order, the data mixture and dropout.")
    deepspeed: str | None = Field(None, description="Path to a DeepSpeed ZeRO json.")
    sequence_parallel_size: int = Field(1, description="P > 1: DeepSpeed Ulysses sequence parallelism, each sequence split over P processes (needs train.deepspeed; world size, seq_len and the model's heads divisible as longctx.sequence_parallel says).")
    resume: str | None = Field("auto", description="'auto' (newest complete checkpoint), a checkpoint path, or null/'off'.")
    report_to: list[str] = Field([], description="Loggers: wandb, tensorboard.")
    dataloader_num_workers: int = Field(0, description="DataLoader workers.")


    @field_validator("resume", mode="before")
    @classmethod
    def _resume_switch(cls, v):
        # YAML reads `off`/`no`/`false` as False and `on`/`yes`/`true` as True: `train.resume=off` means off.
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v

class EvalConfig(_Section):
    lengths: list[int] = Field([], description="Perplexity context lengths; [] switches evaluation off.")
    every: int | None = Field(None, description="Evaluate every this many steps during training (also at the end).")
    stride: int | None = Field(None, description="Scored tokens per window after the first; default: the window length.")
    max_tokens: int | None = Field(None, description="Token budget per length for quick runs.")


class Config(_Section):
    model: ModelConfig
    rope: rope_registry.RopeSpec = Field(rope_registry.NoneRope(), description=(
        "RoPE scaling, keyed by rope_type: " + "; ".join(f"{k}: {v.doc}" for k, v in rope_registry.SCHEMES.items())))
    method: method_registry.MethodSpec | None = Field(None, description=(
        "A training-free method for evaluation, keyed by name (train: logn only): "
        + "; ".join(f"{k}: {v.doc}" for k, v in method_registry.METHODS.items())))
    attention: AttentionConfig = AttentionConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def target_length(self) -> int:
        return getattr(self.rope, "max_position_embeddings", None) or self.train.seq_len

    def rope_dict(self) -> dict[str, Any] | None:
        """The rope section as `longctx.apply(rope=...)` takes it; None for rope_type 'none'."""
        d = rope_registry.as_dict(self.rope)
        if d is not None:
            d.setdefault("max_position_embeddings", self.target_length)
        return d

    def method_dict(self) -> dict[str, Any] | None:
        """The method section as `longctx.apply(method=...)` takes it; None when there is none."""
        return None if self.method is None else self.method.model_dump(exclude_none=True)

    def attention_dict(self) -> dict[str, Any]:
        return self.attention.model_dump()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# The longest context length longctx accepts anywhere (train.seq_len, eval lengths, rope lengths, CLI --lengths):
# 16M tokens, far beyond any model it can train, and small enough that a typo (1e12) fails here, not in a tensor.
MAX_LENGTH = 2**24

# Every numeric field and its allowed range: (low, high, low included, high included); None is unbounded. Checked
# when the config loads (train, eval, plan, sweep all load it here); inf and nan are refused by the schema itself.
# tests/test_config.py fails when a numeric field is missing here.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "rope.original_max_position_embeddings": (1, MAX_LENGTH, True, True),
    "rope.max_position_embeddings": (1, MAX_LENGTH, True, True),
    "rope.rope_theta": (0, None, False, False),
    "rope.attention_factor": (0, None, False, False),
    "rope.beta_fast": (0, None, False, False),
    "rope.beta_slow": (0, None, False, False),
    "rope.mscale": (0, None, False, False),
    "rope.mscale_all_dim": (0, None, True, False),
    "rope.low_freq_factor": (0, None, False, False),
    "rope.high_freq_factor": (0, None, False, False),
    "rope.short_factor": (0, None, False, False),
    "rope.long_factor": (0, None, False, False),
    "attention.group_size_ratio": (0, 1, False, True),
    "attention.group_size": (2, MAX_LENGTH, True, True),
    "lora.r": (1, None, True, False),
    "lora.alpha": (0, None, False, False),
    "lora.dropout": (0, 1, True, False),
    "data.min_doc_tokens": (0, None, True, False),
    "data.num_proc": (1, None, True, False),
    "train.seq_len": (2, MAX_LENGTH, True, True),
    "train.max_steps": (1, None, True, False),
    "train.learning_rate": (0, None, False, False),
    "train.warmup_steps": (0, None, True, False),
    "train.weight_decay": (0, None, True, False),
    "train.adam_beta1": (0, 1, True, False),
    "train.adam_beta2": (0, 1, True, False),
    "train.max_grad_norm": (0, None, True, False),  # 0 switches clipping off (Trainer)
    "train.per_device_train_batch_size": (1, None, True, False),
    "train.gradient_accumulation_steps": (1, None, True, False),
    "train.loss_chunk_size": (1, None, True, False),
    "train.logging_steps": (1, None, True, False),
    "train.save_steps": (1, None, True, False),
    "train.save_total_limit": (1, None, True, False),
    "train.seed": (0, 2**32 - 1, True, True),  # numpy's seeds
    "train.dataloader_num_workers": (0, None, True, False),
    "train.sequence_parallel_size": (1, None, True, False),
    "eval.lengths": (2, MAX_LENGTH, True, True),
    "eval.every": (1, None, True, False),
    "eval.stride": (1, None, True, False),
    "eval.max_tokens": (1, None, True, False),
}
RANGES_ELSEWHERE = ("rope.factor", "rope.alpha")  # rope.py's parameter models check them (>= 1)

def allowed(low: float, high: float | None, low_in: bool, high_in: bool) -> str:
    """A range as the message says it: '>= 1', '> 0', 'in [0, 1)'."""
    def num(x):
        return str(x) if isinstance(x, int) else f"{x:g}"

    if high is None:
        return f"{'>=' if low_in else '>'} {num(low)}"
    return f"in {'[' if low_in else '('}{num(low)}, {num(high)}{']' if high_in else ')'}"


def in_range(v: float, low: float | None, high: float | None, low_in: bool, high_in: bool) -> bool:
    return math.isfinite(v) and (low is None or (v >= low if low_in else v > low)) and \
        (high is None or (v <= high if high_in else v < high))


def range_problems(cfg: "Config") -> list[str]:
    """One line per numeric value outside its range (RANGES); for a list, the values that are."""
    out = []
    for key, bounds in RANGES.items():
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name, None)  # rope: only the chosen type's keys exist
        values = v if isinstance(v, list) else [] if v is None else [v]
        bad = [x for x in values if not in_range(x, *bounds)]
        if bad:
            got = v if isinstance(v, list) and len(v) <= 8 else bad[0]
            out.append(f"{key}: {'every value ' if isinstance(v, list) else ''}must be {allowed(*bounds)}, got {got}")
    return out


def group_size(seq_len: int, ratio: float, absolute: int | None) -> int:
    """S2 group size for a sequence of `seq_len` tokens: `absolute`, else ratio * seq_len (LongLoRA)."""
    return absolute if absolute is not None else int(seq_len * ratio)


def cross_field_problems(cfg: Config) -> list[str]:
    """Conflicts between fields, each a readable line naming the keys."""
    out: list[str] = range_problems(cfg)
    a, t, r = cfg.attention, cfg.train, cfg.rope
    out_of_range = {line.split(":")[0] for line in out}
    if a.type == "s2" and not out_of_range & {"train.seq_len", "attention.group_size_ratio", "attention.group_size"}:
        g = group_size(t.seq_len, a.group_size_ratio, a.group_size)
        if g < 2 or g % 2:
            out.append(f"attention: the S2 group size must be an even number >= 2, got {g} "
                       f"(train.seq_len={t.seq_len}, group_size_ratio={a.group_size_ratio}, group_size={a.group_size})")
        elif t.seq_len % g:
            out.append(f"attention: the S2 group size {g} does not divide train.seq_len={t.seq_len}; "
                       f"pick a seq_len that is a multiple of {g} or another group_size_ratio/group_size")
    if cfg.model.quantization and not cfg.lora.enabled:
        out.append("model.quantization: 4bit (QLoRA) needs lora.enabled: true; a 4-bit base cannot be fully fine-tuned")
    if cfg.model.quantization and cfg.model.dtype == "float32":
        pass  # allowed: compute dtype float32 works on the CPU
    if t.bf16 and t.fp16:
        out.append("train.bf16 and train.fp16: choose at most one")
    if t.deepspeed is not None and not Path(t.deepspeed).is_file():
        out.append(f"train.deepspeed: file not found: {t.deepspeed}")
    if t.sequence_parallel_size > 1 and "train.sequence_parallel_size" not in out_of_range:
        from longctx.sequence_parallel import config_problems  # issue 12

        out += config_problems(cfg)
    out += data_problems(cfg.data)
    if cfg.data.format == "sft" and cfg.eval.lengths and cfg.data.eval is None:
        out.append("eval.lengths: with data.format sft, set data.eval to a text source for perplexity (the "
                   "conversations of data.train are not a validation text)")
    target, orig = cfg.target_length, getattr(r, "original_max_position_embeddings", None)
    if r.rope_type != "none" and orig is not None and target <= orig:
        out.append(f"rope.max_position_embeddings: the target length {target} (default: train.seq_len) must be "
                   f"above the original length {orig} (original_max_position_embeddings)")
    if r.rope_type == "longrope" and r.long_factor is None:  # no base supplies it (compose.py); short_factor may come
        out.append("rope.long_factor: required for rope_type 'longrope' (one factor per rotary pair)")  # from one
    if cfg.method is not None:
        out += method_registry.rope_conflicts(cfg.method, r)
    return out


def data_problems(d: DataConfig) -> list[str]:
    out = []
    if isinstance(d.train, list) and not d.train:
        out.append("data.train: an empty list; give a source or a list of {path, weight}")
    for i, s in enumerate([] if isinstance(d.train, str) else d.train):
        if not (math.isfinite(s.weight) and s.weight > 0):
            out.append(f"data.train[{i}].weight: must be a finite number > 0, got {s.weight}")
    if d.suffixes is not None and (not d.suffixes or not all(x.startswith(".") and len(x) > 1 for x in d.suffixes)):
        out.append(f"data.suffixes: a list of file suffixes such as [.py, .md], got {d.suffixes}")
    if d.prompt_template != DataConfig.model_fields["prompt_template"].default:
        from longctx.data.templates import prompt_template_problem  # imports longctx.data only for a custom one

        problem = prompt_template_problem(d.prompt_template)
        if problem:
            out.append(f"data.prompt_template: {problem}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> Config, with every error collected into one readable message.

def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: dict | None = None) -> Config:
    """Read a YAML config (or a dict), apply `key.path=value` overrides, validate once."""
    raw: dict = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    if data is not None:
        raw = _deep_merge(raw, copy.deepcopy(data))
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, source=str(path) if path else "config")


def validate(raw: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        messages = validation_messages(e, unknown=lambda loc: "unknown key" + _suggest(loc), other=_must_be,
                                       unions={"rope": rope_registry.UNION, "method": method_registry.UNION})
        raise ConfigError(f"invalid config {source}:\n" + "\n".join("  - " + m for m in messages)) from None


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML forbids it; PyYAML keeps the last one,
    silently dropping a whole section) and a document whose aliases expand past MAX_YAML_NODES (a "billion laughs"
    alias bomb: PyYAML shares aliased nodes, but everything that walks the result expands them). The size is
    counted on the node graph, each shared node once, so the check itself never expands anything."""

    def construct_document(self, node):
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"its aliases (*name) expand to more than {MAX_YAML_NODES:,} values; a config "
                                 "never needs that many (an alias bomb?)")
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden key by key
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first:
                    raise yaml.YAMLError(f"duplicate key {key!r} at line {line} (first at line {first[key]}); the "
                                         "second would silently replace the first: keep one")
                first[key] = line
            except TypeError:
                continue  # an unhashable key: SafeConstructor's own error says so
        return super().construct_mapping(node, deep=deep)


MAX_YAML_NODES = 100_000


def _expanded_size(node, memo: dict) -> int:
    """Values in the document once every alias is expanded; shared (aliased) nodes are counted from `memo`."""
    if id(node) in memo:
        if memo[id(node)] is None:  # an alias inside its own anchor: infinite
            return MAX_YAML_NODES + 1
        return memo[id(node)]
    memo[id(node)] = None
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
        node.value if isinstance(node, yaml.SequenceNode) else []
    total = 1
    for child in children:
        total += _expanded_size(child, memo)
        if total > MAX_YAML_NODES:
            break
    memo[id(node)] = total
    return total


def load_yaml(text: str) -> Any:
    """YAML text -> Python values with StrictLoader (duplicate keys and alias bombs refused)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506  StrictLoader is a SafeLoader


def train_problems(cfg: Config) -> list[str]:
    """What `train` refuses in a valid config (evaluation takes it): checked by train and by `sweep` in train mode,
    so a dry run refuses what training would."""
    out = []
    if cfg.rope.rope_type not in rope_registry.STATIC_TYPES:
        out.append(f"rope.rope_type: {cfg.rope.rope_type} changes with batch length and is not KV-cache consistent; "
                   f"train with a static type ({', '.join(rope_registry.STATIC_TYPES[1:])}) and keep "
                   f"{cfg.rope.rope_type} for evaluation")
    if cfg.method is not None and not method_registry.METHODS[cfg.method.name].trains:
        trains = [k for k, v in method_registry.METHODS.items() if v.trains]
        out.append(f"method.name: {cfg.method.name} is training-free (evaluation only: `longctx eval --method`, "
                   f"`longctx generate`, sweep mode: eval); methods that also train: {', '.join(trains)}")
    return out


def read_yaml(path: Path, what: str) -> Any:
    """What a YAML file holds; a ConfigError naming `what` ('config file', 'sweep file') when it is missing or bad."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None


def _read_yaml(path: Path) -> dict:
    raw = read_yaml(path, "config file")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key.path=value, e.g. train.max_steps=10")
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
    try:
        node[parts[-1]] = load_yaml(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not a YAML scalar or list: {e}") from None


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _must_be(err: dict[str, Any]) -> str:
    """A bad value: 'must be <the allowed values>' where pydantic lists them (a Literal), else its own message."""
    allowed = err.get("ctx", {}).get("expected")
    msg = err["msg"] if not allowed else f"must be {allowed}"
    return f"{msg}, got {err.get('input')!r}"


def _suggest(loc: tuple) -> str:
    """' (did you mean ...?)' for an unknown key, from the keys valid at that place."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if model is None:
        return ""
    valid = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
    hint = f" (did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))}?)" if close else ""
    return f"{hint}; valid keys here: {', '.join(valid)}"
