"""Typed configuration of a pretraining run: nested dataclasses, YAML files and ``key=value`` overrides.

A YAML file only overrides the defaults below. ``key=value`` overrides use dotted paths into the same
tree, list items by index (``optim.lr=1e-4``, ``stages.0.steps=10``, ``data.sources.1.subset=100``);
values are parsed as YAML scalars. An unknown key is a :class:`ConfigError` naming the valid ones.

The data section is :class:`pretrain.data.DataConfig` itself; its ``batch_size`` is the per-rank
micro-batch and is set from ``parallel.micro_batch``. A stage may replace ``data.sources`` with its
own mixture (``stages.N.sources``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from data_prep.errors import UserError
from pretrain.data import DataConfig, DataError, SourceConfig


class ConfigError(UserError):
    """A configuration value or key is invalid; the message names the key, the value and what was expected."""


@dataclass
class ModelConfig:
    """Which model to build.

    name: size name passed to the builder ("debug", "tiny", "small", "base", "large", "huge").
    objective: "mae" or "jepa".
    overrides: extra keyword arguments for the builder (e.g. {mask_ratio: 0.75}).
    builder: "module:function" that builds the model, called as ``fn(name, objective=..., **overrides)``.
    exporter: "module:function" that writes the encoder export, called as ``fn(model, out_dir)``.
    activation_checkpointing: recompute each encoder block in the backward pass (saves activation memory).
    """

    name: str = "debug"
    objective: str = "mae"
    overrides: dict = field(default_factory=dict)
    builder: str = "pretrain.models:build_model"
    exporter: str = "pretrain.models.export:save_encoder"
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.objective not in ("mae", "jepa"):
            raise ConfigError(f"model.objective must be 'mae' or 'jepa', got {self.objective!r}")
        for k in ("builder", "exporter"):
            if ":" not in getattr(self, k):
                raise ConfigError(f"model.{k} must be 'module:function', got {getattr(self, k)!r}")


@dataclass
class OptimConfig:
    """AdamW and the default learning-rate schedule (a stage may override lr, min_lr and warm-up).

    lr: peak learning rate after warm-up. min_lr: floor reached by the cosine at the end of a stage.
    warmup_steps: linear warm-up in optimizer steps. weight_decay: applied to weight matrices only
    (never to norms, biases, embeddings or other 1-d parameters). betas, eps: AdamW's. grad_clip: global
    gradient-norm clipping (0 = off).
    """

    lr: float = 1.5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim: need 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps, weight_decay and grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclass
class ParallelConfig:
    """Data-parallel layout and DeepSpeed settings.

    zero_stage: DeepSpeed ZeRO stage 0-3. micro_batch: samples per rank per forward pass.
    grad_accum: micro-batches per optimizer step; None = derived from global_batch.
    global_batch: samples per optimizer step over all ranks; must equal micro_batch x grad_accum x
    world size (checked at start). None = micro_batch x grad_accum x world size.
    precision: "fp32" or "bf16".
    bucket_elements: size of DeepSpeed's communication buckets in elements (reduce, all-gather, ZeRO-3
    prefetch); DeepSpeed's defaults (5e8) make buffers of gigabytes, too much for small models.
    """

    zero_stage: int = 2
    micro_batch: int = 8
    grad_accum: int | None = None
    global_batch: int | None = None
    precision: str = "fp32"
    bucket_elements: int = 20_000_000

    def __post_init__(self) -> None:
        if self.bucket_elements < 1:
            raise ConfigError(f"parallel.bucket_elements must be >= 1, got {self.bucket_elements}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.micro_batch < 1:
            raise ConfigError(f"parallel.micro_batch must be >= 1, got {self.micro_batch}")
        if self.grad_accum is not None and self.grad_accum < 1:
            raise ConfigError(f"parallel.grad_accum must be >= 1 or null, got {self.grad_accum}")
        if self.global_batch is not None and self.global_batch < 1:
            raise ConfigError(f"parallel.global_batch must be >= 1 or null, got {self.global_batch}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"parallel.precision must be 'fp32' or 'bf16', got {self.precision!r}")

    def resolve(self, world_size: int) -> tuple[int, int]:
        """(grad_accum, global_batch) for ``world_size`` ranks, or ConfigError when they do not fit."""
        per_step = self.micro_batch * world_size
        if self.grad_accum is None and self.global_batch is None:
            return 1, per_step
        if self.grad_accum is None:
            if self.global_batch % per_step:
                raise ConfigError(
                    f"parallel.global_batch={self.global_batch} is not divisible by micro_batch x world size = "
                    f"{self.micro_batch} x {world_size} = {per_step}; choose a global batch that is a multiple "
                    f"of {per_step} or change parallel.micro_batch")
            return self.global_batch // per_step, self.global_batch
        total = per_step * self.grad_accum
        if self.global_batch is not None and self.global_batch != total:
            raise ConfigError(
                f"parallel.global_batch={self.global_batch} != micro_batch x grad_accum x world size = "
                f"{self.micro_batch} x {self.grad_accum} x {world_size} = {total}")
        return self.grad_accum, total


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints for resuming.

    dir: where checkpoints go; None = ``<run_dir>/checkpoints``. every: optimizer steps between saves
    (a save also happens at the end of each stage and on SIGTERM). keep: complete checkpoints kept per stage.
    resume: resume from the newest complete checkpoint when one exists.
    """

    dir: str | None = None
    every: int = 500
    keep: int = 2
    resume: bool = True

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ConfigError(f"checkpoint.every and checkpoint.keep must be >= 1, got {self.every}, {self.keep}")


@dataclass
class LoggingConfig:
    """Console, JSONL and wandb logging.

    wandb: "online", "offline" or "disabled". project: wandb project. every: optimizer steps between log
    records. jsonl: write ``<run_dir>/metrics.jsonl``. viz_every: steps between reconstruction figures
    (0 = only at the end of each stage; -1 = never). peak_tflops: peak FLOP/s per rank (in TFLOP/s) that
    model FLOP utilisation is measured against. progress: tqdm bar on rank 0.
    """

    wandb: str = "offline"
    project: str = "specfm"
    every: int = 10
    jsonl: bool = True
    viz_every: int = 500
    peak_tflops: float = 989.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.wandb not in ("online", "offline", "disabled"):
            raise ConfigError(f"logging.wandb must be 'online', 'offline' or 'disabled', got {self.wandb!r}")
        if self.every < 1:
            raise ConfigError(f"logging.every must be >= 1, got {self.every}")
        if self.peak_tflops <= 0:
            raise ConfigError(f"logging.peak_tflops must be > 0, got {self.peak_tflops}")


@dataclass
class PrepareConfig:
    """Make the data when it is missing (the demo): simulate a small corpus and ingest it, on rank 0.

    enabled: when true and any store a stage reads is missing, simulate into raw_dir and ingest into
    store_root before training (other ranks wait). sensors: None = all six hyperspectral sensors.
    levels, scenes, size, seed: passed to data_prep.simulate.simulate_corpus. patch_size: ingest patch side.
    """

    enabled: bool = False
    raw_dir: str = "data/demo/raw"
    store_root: str = "data/demo/stores"
    sensors: list | None = None
    levels: list = field(default_factory=lambda: ["L1", "L2"])
    scenes: int = 1
    size: int = 64
    seed: int = 0
    patch_size: int = 32


@dataclass
class StageConfig:
    """One stage of progressive pretraining.

    name: the stage's name (directory of its export and checkpoints). sources: the data mixture (list of
    {url, weight, subset}); None = ``data.sources``. steps: optimizer steps; or epochs: passes over the
    mixture (exactly one of the two). warmup_steps, lr, min_lr: None = ``optim``'s.
    init_from: "previous" (the export of the stage before; none for the first stage), "none", or the path of
    an export directory.
    """

    name: str
    sources: list | None = None
    steps: int | None = None
    epochs: int | None = None
    warmup_steps: int | None = None
    lr: float | None = None
    min_lr: float | None = None
    init_from: str = "previous"

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"stage name must be a non-empty name without '/', got {self.name!r}")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"stage {self.name!r}: set exactly one of steps or epochs "
                              f"(got steps={self.steps}, epochs={self.epochs})")
        for k in ("steps", "epochs"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"stage {self.name!r}: {k} must be >= 1, got {v}")
        if self.sources is not None:
            try:
                self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
            except (TypeError, DataError) as e:
                raise ConfigError(f"stage {self.name!r}: sources: {e}") from None


@dataclass
class TrainConfig:
    """A whole run.

    run_dir: where the resolved config, git SHA, metrics, figures, checkpoints and exports go.
    seed: base seed of model init and the model's own randomness (masking); the loader has data.seed.
    max_steps: stop this invocation after this many optimizer steps in total (counted from step 0 of the
    first stage, so a re-run resumes and goes on); None = run every stage to the end.
    """

    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int | None = None
    data: DataConfig = field(default_factory=lambda: DataConfig(sources=[SourceConfig(url="data/stores/x.zarr")]))
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    stages: list[StageConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("config needs at least one entry in 'stages'")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")
        if self.stages[0].init_from == "previous":
            self.stages[0].init_from = "none"
        self.data.batch_size = self.parallel.micro_batch

    def stage_data(self, stage: StageConfig) -> DataConfig:
        """The loader config of one stage: ``data`` with the stage's sources and epochs."""
        return dataclasses.replace(self.data, sources=list(stage.sources or self.data.sources),
                                   epochs=stage.epochs, batch_size=self.parallel.micro_batch)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- building from dicts

def _check_scalar(path: str, value: Any, tp: Any) -> Any:
    """Coerce/check a leaf value against a field type (int, float, str, bool, list, dict, Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_scalar(path, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    base = origin or tp
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    elif base is list:
        if isinstance(value, list | tuple):
            return list(value)
    elif base is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"{path}: expected {getattr(base, '__name__', base)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, d: Any, path: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        where = f"in {path!r}" if path else "at the top level"
        raise ConfigError(f"unknown config key(s) {unknown} {where}; valid keys: {valid}")
    kwargs = {}
    for name in valid:
        if name not in d:
            continue
        sub = f"{path}.{name}" if path else name
        tp, v = hints[name], d[name]
        if tp is DataConfig:
            kwargs[name] = _build_data(v, sub)
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, v, sub)
        elif typing.get_origin(tp) is list and typing.get_args(tp) and dataclasses.is_dataclass(
                typing.get_args(tp)[0]):
            if not isinstance(v, list):
                raise ConfigError(f"{sub}: expected a list, got {v!r}")
            kwargs[name] = [_build(typing.get_args(tp)[0], x, f"{sub}.{i}") for i, x in enumerate(v)]
        else:
            kwargs[name] = _check_scalar(sub, v, tp)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{path or 'config'}: {e}") from None


def _build_data(d: Any, path: str) -> DataConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping, got {d!r}")
    valid = [f.name for f in fields(DataConfig)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} in {path!r}; valid keys: {valid}")
    try:
        return DataConfig.from_dict(d)
    except (DataError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i]) or 'list'} has {len(node)} "
                                  f"entries, {p!r} is not an index of it")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            else:
                if node.get(p) is None:
                    node[p] = {}
                node = node[p]
        else:
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i])} is a value, not a section")


def parse_override(arg: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ("optim.lr", 0.0001); the value is read as a YAML scalar."""
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like key=value (e.g. optim.lr=1e-4)")
    key, raw = arg.split("=", 1)
    if not key:
        raise ConfigError(f"override {arg!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    value = _fix_floats(value)
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML file (or nothing), apply ``key=value`` overrides, and build the typed config."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping, got {type(tree).__name__}")
    tree = _fix_floats(tree)
    for arg in overrides:
        key, value = parse_override(arg)
        _set_path(tree, key, value)
    try:
        return _build(TrainConfig, tree, "")
    except DataError as e:
        raise ConfigError(str(e)) from None


def _fix_floats(obj: Any) -> Any:
    """PyYAML reads ``1e-4`` (no dot) as a string; turn such strings into floats."""
    if isinstance(obj, dict):
        return {k: _fix_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fix_floats(v) for v in obj]
    if isinstance(obj, str):
        try:
            if any(c in obj.lower() for c in "e.") and obj.lower() not in ("inf", "nan") and obj[0] in "0123456789-+.":
                return float(obj)
        except (ValueError, IndexError):
            return obj
    return obj


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML (loads back with :func:`load_config`)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
