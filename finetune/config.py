"""Typed configs of fine-tuning tasks and benchmark suites (YAML files only override these defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from data_prep.errors import UserError

MODES = ("linear_probe", "finetune")


class ConfigError(UserError):
    """A finetune/benchmark config is malformed; the message names the file and key."""


@dataclass
class TrainConfig:
    """Optimisation of one task."""

    mode: str = "finetune"
    """``linear_probe`` (encoder frozen, only the head trains) or ``finetune`` (everything trains)."""
    steps: int = 200
    """Optimiser steps."""
    batch_size: int = 16
    lr: float = 1e-3
    """Learning rate of the head."""
    encoder_lr: float = 1e-4
    """Learning rate of the encoder when fine-tuning."""
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``..."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"train.mode is {self.mode!r}; expected one of {MODES}")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("train.steps must be >= 0, batch_size >= 1, lr > 0")


@dataclass
class EvalConfig:
    """Task-specific protocol settings (each kind reads its own)."""

    train_fraction: float = 0.5
    """Segmentation/fusion: leftmost fraction of columns used for training (when the data has no split);
    classification: fraction of each class's samples used for training."""
    window: int = 32
    """Segmentation: sliding-window size (pixels, a multiple of the encoder patch size)."""
    stride: int = 16
    """Segmentation: sliding-window stride (overlap = window - stride)."""
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

    def __post_init__(self) -> None:
        from finetune.tasks import kinds  # the kinds are the registered task classes

        if self.kind not in kinds():
            raise ConfigError(f"task {self.name!r}: kind is {self.kind!r}; expected one of {kinds()}")
        if not isinstance(self.data, dict) or "loader" not in self.data:
            raise ConfigError(f"task {self.name!r}: data must be a mapping with a 'loader' key")
        if isinstance(self.train, dict):
            self.train = _build(TrainConfig, self.train, f"task {self.name}.train")
        if isinstance(self.eval, dict):
            self.eval = _build(EvalConfig, self.eval, f"task {self.name}.eval")


@dataclass
class SuiteConfig:
    """A benchmark suite: tasks run one after another on one encoder export."""

    name: str
    tasks: list[TaskConfig]
    simulate: dict[str, Any] | None = None
    """When set, a corpus is simulated with these ``simulate_corpus`` arguments (unless --data is given) and
    the string ``${corpus}`` in data blocks is replaced by its manifest path."""
    note: str = ""

    def __post_init__(self) -> None:
        self.tasks = [t if isinstance(t, TaskConfig) else _build(TaskConfig, t, f"suite {self.name} task")
                      for t in self.tasks]
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"suite {self.name!r}: task names repeat: {names}")


def _build(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def _set(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """``key.sub=value`` strings (values parsed as YAML) into a nested dict."""
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not key=value")
        k, v = o.split("=", 1)
        _set(doc, k, yaml.safe_load(v))
    return doc


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p} does not exist")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return doc


def load_task(path: str | Path, overrides: list[str] = ()) -> TaskConfig:
    doc = apply_overrides(load_yaml(path), list(overrides))
    try:
        return _build(TaskConfig, doc, str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def load_suite(path: str | Path, overrides: list[str] = (), task_overrides: list[str] = ()) -> SuiteConfig:
    """A suite YAML with suite-level ``key=value`` overrides and ``task_overrides`` applied to every task."""
    doc = apply_overrides(load_yaml(path), list(overrides))
    if task_overrides:
        for t in doc.get("tasks") or []:
            if isinstance(t, dict):
                apply_overrides(t, list(task_overrides))
    try:
        return _build(SuiteConfig, doc, str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def to_dict(cfg) -> dict:
    return asdict(cfg)
