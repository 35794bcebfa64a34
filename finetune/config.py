"""Typed configs of fine-tuning tasks and benchmark suites (YAML files only override these defaults).

Built by the one config mechanism, :mod:`data_prep.configtree` (the same as pretraining's): unknown keys
list the valid ones, values are checked against the field types (``train.lr=1e-4`` is a float), overrides
are dotted ``key=value`` paths with list indices (``tasks.0.train.steps=5``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep import configtree
from data_prep.configtree import ConfigError

MODES = ("linear_probe", "finetune")

__all__ = ["MODES", "ConfigError", "EvalConfig", "SuiteConfig", "TaskConfig", "TrainConfig",
           "load_suite", "load_task"]


@dataclass
class TrainConfig:
    """Optimisation of one task."""

    mode: str = "finetune"
    """``linear_probe`` (encoder frozen, only the head trains) or ``finetune`` (everything trains)."""
    steps: int = 200
    """Optimiser steps (unless ``epochs`` is set)."""
    epochs: int | None = None
    """When set: this many passes over the training samples instead of ``steps`` (a scene task's samples are its
    ``eval.window`` tiles with labels; PANGAEA trains 80 epochs); ``steps`` is then derived and reported."""
    batch_size: int = 16
    lr: float = 1e-3
    """Learning rate of the head."""
    encoder_lr: float = 1e-4
    """Learning rate of the encoder when fine-tuning."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay of the fine-tuned encoder (BEiT, MAE fine-tuning: 0.65-0.75 for ViT-B): block
    ``i`` of ``depth`` learns at ``encoder_lr * layer_decay ** (depth - i)``, the patch embedding at
    ``encoder_lr * layer_decay ** (depth + 1)``; 1 = one rate for the whole encoder."""
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``..."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"train.mode is {self.mode!r}; expected one of {MODES}")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.encoder_lr <= 0:
            raise ConfigError(f"train: need steps >= 0, batch_size >= 1, lr > 0 and encoder_lr > 0; got steps="
                              f"{self.steps}, batch_size={self.batch_size}, lr={self.lr}, encoder_lr={self.encoder_lr}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1 (or null: use train.steps), got {self.epochs}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"train.layer_decay must lie in (0, 1] (1 = no decay), got {self.layer_decay}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class EvalConfig:
    """Task-specific protocol settings (each kind reads its own)."""

    train_fraction: float = 0.5
    """Segmentation/fusion/PANGAEA change: leftmost fraction of columns used for training (when the data has no split);
    classification: fraction of each class's samples used for training."""
    window: int = 32
    """Segmentation and PANGAEA change: training crop and sliding-window size (pixels, a multiple of the encoder patch
    size; PANGAEA crops to the encoder's input size)."""
    label_fraction: float = 1.0
    """Segmentation and PANGAEA change: fraction of the labelled training tiles (``window`` pixels square) kept,
    stratified by their class shares as PANGAEA draws limited labels (seeded); PANGAEA's limited-label runs use 0.1."""
    stride: int = 16
    """Segmentation (``protocol: finetune``): sliding-window stride (overlap = window - stride); PANGAEA spreads
    ``ceil(size / window)`` windows evenly instead."""
    patch: int = 15
    """Change detection: neighbourhood size around each pixel."""
    token_patch: int = 3
    """Change detection: pixels per token side."""
    n_per_class: int = 500
    """Change detection: changed and unchanged training pixels each (balanced sampling)."""
    test_max: int | None = None
    """Change detection: cap on test pixels (random subset; None = all others)."""
    tile: int = 24
    """Fusion: tile size on the high-resolution grid (multiple of the patch size and the ratio)."""
    overlap: int = 12
    """Fusion: tile overlap (tile - overlap must be a multiple of the ratio)."""
    size: int | None = None
    """Classification: patches resized to this side (None: smallest multiple of the patch size >= input)."""

    def __post_init__(self) -> None:
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"eval.label_fraction must lie in (0, 1], got {self.label_fraction}")
        if not 0 < self.train_fraction < 1:
            raise ConfigError(f"eval.train_fraction must lie in (0, 1), got {self.train_fraction}")
        if self.stride < 1 or self.stride > self.window:
            raise ConfigError(f"eval.stride must lie in 1..window ({self.window}), got {self.stride}")
        if self.overlap >= self.tile:
            raise ConfigError(f"eval.overlap ({self.overlap}) must be smaller than eval.tile ({self.tile})")


@dataclass
class TaskConfig:
    """One downstream task: data, head, training and evaluation."""

    name: str
    kind: str
    """classification | segmentation | change | fusion."""
    data: dict[str, Any]
    """``{loader: <name in finetune.datasets.LOADERS>, <its keyword arguments>}``."""
    head: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the head (e.g. UperNet ``channels``, ``layers``)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    normalise: bool = True
    """Per-band z-score of the inputs with the image's own statistics."""
    paper: dict[str, float] | None = None
    """SpecAware paper figures for this task (metric -> value), shown beside ours; None if unknown."""
    paper_note: str = ""
    protocol: str = "finetune"
    """``finetune`` (this project's heads and schedule) or ``pangaea`` (segmentation and change: PANGAEA's frozen
    encoder, (Siamese) UPerNet over layers [3, 5, 7, 11], multi-step schedule, logit-averaged sliding windows; see
    finetune.tasks.pangaea)."""

    def __post_init__(self) -> None:
        from finetune.tasks import kinds  # the kinds are the registered task classes

        if self.protocol not in ("finetune", "pangaea"):
            raise ConfigError(f"task {self.name!r}: protocol is {self.protocol!r}; expected 'finetune' or 'pangaea'")
        if self.kind not in kinds():
            raise ConfigError(f"task {self.name!r}: kind is {self.kind!r}; expected one of {kinds()}")
        if not isinstance(self.data, dict) or "loader" not in self.data:
            raise ConfigError(f"task {self.name!r}: data must be a mapping with a 'loader' key")
        if isinstance(self.train, dict):
            self.train = configtree.build(TrainConfig, self.train, f"task {self.name}.train")
        if isinstance(self.eval, dict):
            self.eval = configtree.build(EvalConfig, self.eval, f"task {self.name}.eval")


@dataclass
class SuiteConfig:
    """A benchmark suite: tasks run one after another on one encoder export."""

    name: str
    tasks: list[TaskConfig]
    simulate: dict[str, Any] | None = None
    """When set, a corpus is simulated with these ``simulate_corpus`` arguments (unless --data is given) and
    the string ``${corpus}`` in data blocks is replaced by its manifest path."""
    simulate_colocated: dict[str, Any] | None = None
    """When set, co-located products are simulated with these ``simulate_colocated`` arguments and ``${colocated}``
    in data blocks is replaced by their manifest path (the cross-sensor task)."""
    note: str = ""

    def __post_init__(self) -> None:
        self.tasks = [t if isinstance(t, TaskConfig) else configtree.build(TaskConfig, t, f"tasks.{i}")
                      for i, t in enumerate(self.tasks)]
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"suite {self.name!r}: task names repeat: {names}")


def load_task(path: str | Path, overrides: list[str] = ()) -> TaskConfig:
    """A task YAML with ``key=value`` overrides (e.g. ``train.steps=50``)."""
    return _named(path, lambda: configtree.load(TaskConfig, path, overrides))


def load_suite(path: str | Path, overrides: list[str] = (), task_overrides: list[str] = ()) -> SuiteConfig:
    """A suite YAML with suite-level ``key=value`` overrides and ``task_overrides`` applied to every task."""
    def build() -> SuiteConfig:
        tree = configtree.apply_overrides(configtree.read_yaml(path), overrides)
        for t in tree.get("tasks") or []:
            if isinstance(t, dict):
                configtree.apply_overrides(t, task_overrides)
        return configtree.build(SuiteConfig, tree)

    return _named(path, build)


def _named(path: str | Path, build: Any) -> Any:
    """Errors of a file's config name the file first (reading errors already do)."""
    try:
        return build()
    except ConfigError as e:
        if str(e).startswith(str(path)) or str(e).startswith(f"config file {path}"):
            raise
        raise ConfigError(f"{path}: {e}") from e
