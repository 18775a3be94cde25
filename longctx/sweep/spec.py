"""The sweep file: its schema, reading and checking it, and expanding it into runs with validated configs."""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from longctx.config import Config, ConfigError, load_config, read_yaml, train_problems
from longctx.errors import validation_messages
from longctx.sweep.names import override_text, run_names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SlurmSettings(_Strict):
    partition: str | None = Field(None, description="SLURM partition.")
    account: str | None = Field(None, description="SLURM account.")
    nodes: int = Field(1, description="Nodes per run; each node starts one torchrun.")
    gpus_per_node: int = Field(8, description="GPUs per node = processes per torchrun.")
    cpus_per_task: int | None = Field(None, description="CPUs per node (one task per node).")
    mem_gb: float | None = Field(None, description="Memory per node in GB.")
    time_min: int = Field(24 * 60, description="Time limit per job in minutes; jobs requeue themselves past it.")
    array_parallelism: int = Field(64, description="Runs of the job array at once.")
    signal_delay_s: int = Field(300, description="SIGUSR1 this many seconds before the time limit.")
    max_requeues: int = Field(20, description="Requeues after hitting the time limit (preemptions do not count).")
    setup: list[str] = Field([], description="Shell lines run before each job (module load, source a venv).")
    additional_parameters: dict[str, Any] = Field({}, description="Other #SBATCH flags, e.g. {qos: high}.")


class SweepFile(_Strict):
    base: str = Field(description="The base config every run starts from.")
    output_dir: str = Field(description="Run directories, logs and the leaderboard go here.")
    name: str | None = Field(None, description="Sweep name (wandb group, SLURM job name); default: output_dir's name.")
    executor: Literal["local", "slurm", "debug"] = Field("local", description="Where the runs execute.")
    mode: Literal["train", "eval"] = Field("train", description="train: train then evaluate; eval: evaluate the "
                                                                "base model with each run's rope and method "
                                                                "(training-free).")
    overrides: dict[str, Any] = Field({}, description="Dotted keys applied to every run.")
    grid: dict[str, list[Any]] = Field({}, description="Dotted key -> values; the runs are the cartesian product.")
    runs: list[dict[str, Any]] = Field([], description="Explicit runs (override dicts); combined with every grid point.")
    max_parallel: int = Field(1, description="local: runs at once.")
    slurm: SlurmSettings = SlurmSettings()


@dataclass
class Run:
    name: str
    own: dict[str, Any]  # the overrides that make this run differ from the others
    dir: Path
    args: list[str]  # every dotted override given to train.py, in order
    config: Config


@dataclass
class Sweep:
    file: SweepFile
    path: Path
    base: Path
    output_dir: Path
    runs: list[Run] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.file.name or self.output_dir.name

    @property
    def logs(self) -> Path:
        return self.output_dir / "logs"


def load_sweep(path: str | Path, executor: str | None = None) -> Sweep:
    """Read and check a sweep file, expand its runs and validate every run's config (nothing is launched)."""
    path = Path(path)
    raw = read_yaml(path, "sweep file")
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path}: the top level must be a mapping (base, output_dir, grid, ...)")
    if executor is not None:
        raw["executor"] = executor
    try:
        sf = SweepFile.model_validate(raw)
    except ValidationError as e:
        messages = validation_messages(e, unknown=_unknown_key)
        raise ConfigError(f"invalid sweep file {path}:\n" + "\n".join("  - " + m for m in messages)) from None
    problems = _file_problems(sf)
    if problems:
        raise ConfigError(f"invalid sweep file {path}:\n" + "\n".join("  - " + m for m in problems))
    sweep = Sweep(file=sf, path=path, base=Path(sf.base).resolve(), output_dir=Path(sf.output_dir).resolve())
    sweep.runs = expand(sweep)
    return sweep


def _unknown_key(loc: tuple) -> str:
    model = SlurmSettings if loc[0] == "slurm" else SweepFile
    valid = list(model.model_fields)
    key = str(loc[-1])
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5) or [v for v in valid if v.startswith(key)]
    prefix = "".join(f"{x}." for x in loc[:-1])
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return f"unknown key{hint}; valid keys here: {', '.join(valid)}"


def _file_problems(sf: SweepFile) -> list[str]:
    out = [f"grid.{k}: empty list; give at least one value" for k, v in sf.grid.items() if not v]
    for i, run in enumerate(sf.runs):
        both = sorted(set(run) & set(sf.grid))
        if both:
            out.append(f"runs[{i}]: {', '.join(both)} also in grid; a key is either swept by the grid or set per run")
    settings = [("overrides", k, v) for k, v in sf.overrides.items()] + \
        [("grid", k, v) for k, values in sf.grid.items() for v in values] + \
        [(f"runs[{i}]", k, v) for i, r in enumerate(sf.runs) for k, v in r.items()]
    for where, key in sorted({(where, key) for where, key, value in settings if _sets_output_dir(key, value)}):
        how = "" if key.replace(" ", "") == "train.output_dir" else "sets train.output_dir, which is "
        out.append(f"{where}.{key}: {how}set by the sweep (OUTPUT/<run name>); use the sweep's output_dir instead")
    if sf.max_parallel < 1:
        out.append(f"max_parallel: must be >= 1, got {sf.max_parallel}")
    s = sf.slurm
    for key in ("nodes", "gpus_per_node", "time_min", "array_parallelism", "cpus_per_task"):
        if getattr(s, key) is not None and getattr(s, key) < 1:
            out.append(f"slurm.{key}: must be >= 1, got {getattr(s, key)}")
    if s.mem_gb is not None and s.mem_gb <= 0:
        out.append(f"slurm.mem_gb: must be > 0, got {s.mem_gb}")
    if s.max_requeues < 0:
        out.append(f"slurm.max_requeues: must be >= 0, got {s.max_requeues}")
    if not 0 <= s.signal_delay_s < s.time_min * 60:
        out.append(f"slurm.signal_delay_s: must be in [0, time_min * 60), got {s.signal_delay_s}")
    if not Path(sf.base).is_file():
        out.append(f"base: config file not found: {sf.base}")
    return out


def _sets_output_dir(key: str, value: Any) -> bool:
    """Whether the override `key: value` sets train.output_dir, however it is written: `train.output_dir: X`, or a
    whole section, `train: {output_dir: X}` (a dotted override replaces what it names, sections included)."""
    path = tuple(part.strip() for part in str(key).split("."))
    if path == ("train", "output_dir"):
        return True
    return isinstance(value, dict) and path in ((), ("",), ("train",)) and \
        any(_sets_output_dir(".".join(path + (str(k),)).strip("."), v) for k, v in value.items())


def expand(sweep: Sweep) -> list[Run]:
    """The runs: grid points x explicit runs, named from their own overrides; every config validated."""
    sf = sweep.file
    keys = list(sf.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*sf.grid.values())] if keys else [{}]
    owns = [{**p, **r} for r in (sf.runs or [{}]) for p in points]
    names = run_names(owns)
    runs, errors = [], {}
    for name, own in zip(names, owns):
        run_dir = sweep.output_dir / name
        # train.output_dir last: whatever the overrides replace, every run writes in its own directory in OUTPUT
        args = ["train.resume=auto"] + [f"{k}={override_text(v)}" for k, v in {**sf.overrides, **own}.items()] + \
               [f"train.output_dir={run_dir}"]
        try:
            cfg = load_config(sweep.base, overrides=args)
        except ConfigError as e:
            lines = str(e).splitlines()
            for line in (lines[1:] if lines[0].startswith("invalid config") else lines):
                errors.setdefault(line.strip().removeprefix("- "), []).append(name)
            continue
        assert Path(cfg.train.output_dir) == run_dir, (cfg.train.output_dir, run_dir)
        if sf.mode == "eval" and not cfg.eval.lengths:
            errors.setdefault("eval.lengths: an eval sweep needs evaluation lengths", []).append(name)
        for problem in (train_problems(cfg) if sf.mode == "train" else []):  # what `train` would refuse
            errors.setdefault(problem, []).append(name)
        runs.append(Run(name=name, own=own, dir=run_dir, args=args, config=cfg))
    if errors:
        lines = [f"  - {msg} ({'all runs' if len(who) == len(owns) > 1 else 'run ' + ', '.join(who)})"
                 for msg, who in errors.items()]
        raise ConfigError(f"sweep {sweep.path}: invalid run config (base {sf.base}):\n" + "\n".join(lines))
    return runs
