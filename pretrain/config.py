"""Typed configuration of a pretraining run: nested dataclasses, YAML files and ``key=value`` overrides.

Built by the one config mechanism, :mod:`data_prep.configtree`: a YAML file only overrides the defaults
below; ``key=value`` overrides use dotted paths into the same tree, list items by index
(``optim.lr=1e-4``, ``stages.0.steps=10``, ``data.sources.1.subset=100``); values are read as YAML and
checked against the field types (``1e-4`` is a float); an unknown key is a :class:`ConfigError` naming the
valid ones. The model's name and overrides are checked against the builder's arguments when the config is
loaded (before any process group exists), so a typo fails in the same second on every rank.

The data section is :class:`pretrain.data.DataConfig` itself; its ``batch_size`` is the per-rank
micro-batch and is set from ``parallel.micro_batch``. A stage may replace ``data.sources`` with its
own mixture (``stages.N.sources``). Values derived from the config and the world size (accumulation,
per-stage schedules and data, the DeepSpeed config, the run layout) are resolved once by
:func:`pretrain.plan.make_plan`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep import configtree
from data_prep.configtree import ConfigError
from pretrain.data import DataConfig, SourceConfig
from pretrain.data.colocated_config import ColocatedPrepareConfig

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig", "OptimConfig",
           "ParallelConfig", "PrepareConfig", "SourceConfig", "StageConfig", "TrainConfig", "dump_config",
           "load_config"]

DEFAULT_BUILDER = "pretrain.models:build_model"


@dataclass
class ModelConfig:
    """Which model to build.

    name: size name passed to the builder ("debug", "tiny", "small", "base", "large", "huge").
    objective: "mae" or "jepa".
    overrides: extra keyword arguments for the builder (e.g. {mask_ratio: 0.75}).
    builder: "module:function" that builds the model, called as ``fn(name, objective=..., **overrides)``.
        When the builder has an attribute ``check_args`` (the default builder does), it is called as
        ``check_args(name, objective=..., **overrides)`` when the config is loaded and raises on a bad
        name or override.
    exporter: "module:function" that writes the encoder export, called as ``fn(model, out_dir)``.
    activation_checkpointing: recompute each encoder block in the backward pass (saves activation memory).
    """

    name: str = "debug"
    objective: str = "mae"
    overrides: dict[str, Any] = field(default_factory=dict)
    builder: str = DEFAULT_BUILDER
    exporter: str = "pretrain.models.export:save_encoder"
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.objective not in ("mae", "jepa"):
            raise ConfigError(f"model.objective must be 'mae' or 'jepa', got {self.objective!r}")
        for k in ("builder", "exporter"):
            spec = getattr(self, k)
            if ":" not in spec:
                raise ConfigError(f"model.{k} must be 'module:function', got {spec!r}")
        build = configtree.import_object(self.builder)
        configtree.import_object(self.exporter)
        check = getattr(build, "check_args", None)
        if check is not None:
            check(self.name, objective=self.objective, **self.overrides)


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
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
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
    precision: "fp32"; "bf16" (DeepSpeed's bf16 mode: bf16 weights and inputs, fp32 master weights in the
    optimizer); "bf16-autocast" (fp32 weights, matmuls and attention in bf16 under ``torch.autocast`` through
    DeepSpeed's ``torch_autocast``; losses in fp32 outside it; the GPU recipe).
    compile: wrap the model in ``torch.compile`` (DeepSpeed's ``engine.compile()``); off by default (adopt it only
    where a short run's loss curve matches eager: ``bench/gpu.py`` prints both).
    bucket_elements: size of DeepSpeed's communication buckets in elements (reduce, all-gather, ZeRO-3
    prefetch); DeepSpeed's defaults (5e8) make buffers of gigabytes, too much for small models.
    """

    zero_stage: int = 2
    micro_batch: int = 8
    grad_accum: int | None = None
    global_batch: int | None = None
    precision: str = "fp32"
    compile: bool = False
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
        if self.precision not in ("fp32", "bf16", "bf16-autocast"):
            raise ConfigError(f"parallel.precision must be 'fp32', 'bf16' or 'bf16-autocast', got {self.precision!r}")

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
    instruments: "module:function" callables that contribute metrics to every log record, called on
    every rank as ``fn(model, batch, out) -> {name: float}`` (see :mod:`pretrain.trainer`).
    """

    wandb: str = "offline"
    project: str = "specfm"
    every: int = 10
    jsonl: bool = True
    viz_every: int = 500
    peak_tflops: float = 989.0
    progress: bool = True
    instruments: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for spec in self.instruments:
            configtree.import_object(spec)
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
    colocated: also make co-located products, stores and their location index (a co-located JEPA stage's data;
    :class:`~pretrain.data.colocated_config.ColocatedPrepareConfig`); None = not.
    """

    enabled: bool = False
    raw_dir: str = "data/demo/raw"
    store_root: str = "data/demo/stores"
    sensors: list[str] | None = None
    levels: list[str] = field(default_factory=lambda: ["L1", "L2"])
    scenes: int = 1
    size: int = 64
    seed: int = 0
    patch_size: int = 32
    colocated: ColocatedPrepareConfig | None = None


@dataclass
class StageConfig:
    """One stage of progressive pretraining.

    name: the stage's name (directory of its export and checkpoints). sources: the data mixture (list of
    {url, weight, subset}); None = ``data.sources``. steps: optimizer steps; or epochs: passes over the
    mixture (exactly one of the two). warmup_steps, lr, min_lr: None = ``optim``'s.
    init_from: "previous" (the export of the stage before; none for the first stage), "none", or the path of
    an export directory.
    objective: this stage's objective ("mae" or "jepa"); None = ``model.objective`` (every stage builds the same
    encoder, so a stage's export initialises the next whatever their objectives).
    data: this stage's changes to the ``data`` section (checked keys, e.g. ``{mix: mixed}`` or a co-located JEPA
    stage's ``{colocated: {global_sensors: [...], ...}}``, see :mod:`pretrain.data.colocated`).
    carry_objective: also start the objective's own parts (the MAE's decoder, mask token and output head; the
    JEPA's predictor and target encoder) from the export this stage starts from, when that export was written
    by a stage of the same objective (its ``objective.safetensors``); otherwise they start fresh. False: always
    fresh (only the encoder is carried over).
    """

    name: str
    sources: list[SourceConfig] | None = None
    steps: int | None = None
    epochs: int | None = None
    warmup_steps: int | None = None
    lr: float | None = None
    min_lr: float | None = None
    init_from: str = "previous"
    objective: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    carry_objective: bool = True

    def __post_init__(self) -> None:
        if self.objective is not None and self.objective not in ("mae", "jepa"):
            raise ConfigError(f"stage {self.name!r}: objective must be 'mae', 'jepa' or null, got {self.objective!r}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"stage name must be a non-empty name without '/', got {self.name!r}")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"stage {self.name!r}: set exactly one of steps or epochs "
                              f"(got steps={self.steps}, epochs={self.epochs})")
        for k in ("steps", "epochs"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"stage {self.name!r}: {k} must be >= 1, got {v}")
        if self.sources is not None and not self.sources:
            raise ConfigError(f"stage {self.name!r}: sources must be a non-empty list or null (= data.sources)")


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
        check = getattr(configtree.import_object(self.model.builder), "check_args", None)
        for k, st in enumerate(self.stages):
            if st.objective is not None and check is not None:
                check(self.model.name, objective=st.objective, **self.model.overrides)
            self.stage_data(st, f"stages.{k}.data")  # a bad data key or value fails at load

    def stage_data(self, stage: StageConfig, where: str = "stage data") -> DataConfig:
        """The loader config of one stage: ``data`` with the stage's sources, epochs and ``data`` changes."""
        d = dataclasses.replace(self.data, sources=list(stage.sources or self.data.sources),
                                epochs=stage.epochs, batch_size=self.parallel.micro_batch)
        if stage.data:
            from pretrain.data import DataError

            d = configtree.replace(d, dict(stage.data), where, DataError, what="data key")
        return d

    def to_dict(self) -> dict[str, Any]:
        return configtree.to_plain(self)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML file (or nothing), apply ``key=value`` overrides, and build the typed config."""
    return configtree.load(TrainConfig, path, overrides)


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML (loads back with :func:`load_config`)."""
    return configtree.dump(cfg)
