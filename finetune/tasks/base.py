"""The task base class: one subclass per task kind, one module each, registered by its ``kind``.

A run is always, in this order: seed -> prepare the data (standardisation, split) -> build the head ->
train -> evaluate. Seeding comes first (torch, numpy and ``random``, from ``train.seed``), so every random
choice of a task — its split, its head's initial weights, its batches, dropout — is a function of its seed
alone: a task scores the same alone as inside a suite, whatever ran before it.

A new kind is one module with one :class:`Task` subclass that sets ``kind`` (and its data type and headline
metric); nothing else switches on the kind's name: :func:`task_class`, :func:`kinds` and the runner read the
registry this class keeps.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from finetune.datasets.base import DatasetError, Spectral
from finetune.encoder_api import Encoder
from finetune.tasks.pangaea import multistep_factor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from finetune.config import TaskConfig


@dataclass
class TaskResult:
    name: str
    kind: str
    metrics: dict
    """Scalar metrics (the report's rows)."""
    details: dict = field(default_factory=dict)
    """Per-class values, confusion matrices, baselines."""
    arrays: dict = field(default_factory=dict)
    """What the figure needs (maps, spectra); not written to the JSON."""
    dataset: str = ""
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    """The trained model (head around the encoder), set by :meth:`Task.run`; the runner passes it to its
    ``on_task`` callback (e.g. ``launch/finetune.py --save-head``) and then drops it."""


class Task:
    """Base of every task kind. Subclasses set the class attributes and implement the hooks."""

    kind: ClassVar[str]
    """The config's ``kind:`` value."""
    data_type: ClassVar[type]
    """The dataset container the task reads (``finetune.datasets.base``)."""
    headline: ClassVar[str]
    """The metric summaries rank by (higher is better)."""
    protocols: ClassVar[tuple[str, ...]] = ("finetune",)
    """Evaluation protocols the kind implements (``TaskConfig.protocol``)."""

    _registry: ClassVar[dict[str, type[Task]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is not None:
            if kind in Task._registry and Task._registry[kind] is not cls:
                raise TypeError(f"task kind {kind!r} is registered twice ({Task._registry[kind].__name__}, "
                                f"{cls.__name__})")
            Task._registry[kind] = cls

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self.device = device_of(cfg)

    # ------------------------------------------------------------------ hooks
    def prepare(self, encoder: Encoder, data) -> None:
        """Standardise the inputs and split them (after seeding); keep what ``batch``/``evaluate`` need."""
        raise NotImplementedError

    def build_head(self, encoder: Encoder) -> nn.Module:
        """The model (head around ``encoder``) to train; built after :meth:`prepare`."""
        raise NotImplementedError

    def batch(self, rng: np.random.Generator) -> tuple[tuple, torch.Tensor]:
        """One training batch: ``(model inputs, target)``."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, losses: list[float]) -> TaskResult:
        raise NotImplementedError

    @classmethod
    def draw(cls, result: TaskResult) -> Figure:
        """The task's figure (matplotlib)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the run
    def run(self, encoder: Encoder, data) -> TaskResult:
        """Seed, prepare, build, train, evaluate (see the module docstring)."""
        if not isinstance(data, self.data_type):
            raise DatasetError(f"task {self.cfg.name!r} ({self.kind}) needs {self.data_type.__name__}, "
                               f"got {type(data).__name__}")
        protocol = getattr(self.cfg, "protocol", "finetune")
        if protocol not in self.protocols:
            raise DatasetError(f"task {self.cfg.name!r}: protocol {protocol!r} is not implemented for {self.kind} "
                               f"tasks; expected one of {list(self.protocols)}")
        seed_everything(self.cfg.train.seed)
        self.prepare(encoder, data)
        steps = self.n_steps()
        model = self.build_head(encoder)
        losses = train_loop(model, encoder, self.cfg, self.batch, self.loss, self.trainable_encoder(),
                            self.lr_schedule, steps=steps)
        res = self.evaluate(model, losses)
        res.details.setdefault("steps", steps)
        res.model = model
        return res

    def steps_per_epoch(self) -> int | None:
        """Optimiser steps of one pass over the training samples (after :meth:`prepare`); None: the kind has no
        epoch (``train.epochs`` is then refused)."""
        return None

    def n_steps(self) -> int:
        """``train.steps``, or ``train.epochs`` x :meth:`steps_per_epoch` when epochs are set."""
        epochs = self.cfg.train.epochs
        if epochs is None:
            return self.cfg.train.steps
        per = self.steps_per_epoch()
        if per is None:
            raise DatasetError(f"task {self.cfg.name!r}: train.epochs is not defined for {self.kind} tasks; give "
                               "train.steps (and train.epochs: null)")
        return epochs * per

    @property
    def pangaea(self) -> bool:
        """Whether the task runs PANGAEA's protocol (``protocol: pangaea``; :mod:`finetune.tasks.pangaea`)."""
        return getattr(self.cfg, "protocol", "finetune") == "pangaea"

    def lr_schedule(self, step: int, total: int) -> float:
        """The learning-rate factor at ``step``: :func:`lr_factor` (warm-up + cosine), or PANGAEA's multi-step."""
        return multistep_factor(step, total) if self.pangaea else lr_factor(step, total)

    def trainable_encoder(self) -> bool:
        """Whether the encoder trains (``train.mode: finetune``) or stays frozen (``linear_probe``; always under
        PANGAEA, whose ``finetune: false`` freezes it)."""
        return not self.pangaea and self.cfg.train.mode == "finetune"

    def result(self, metrics: dict, details: dict, arrays: dict, dataset: str) -> TaskResult:
        return TaskResult(self.cfg.name, self.kind, metrics, details, arrays, dataset)


def raw_linear(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray | None = None,
               balanced: bool = False, max_train: int = 20000, seed: int = 0) -> np.ndarray:
    """Predictions for the rows ``test`` (default: every row) of ``x`` (``[N, C]`` raw-input features: a tile's
    mean spectrum, a pixel's spectrum) by a multinomial logistic regression fitted on the rows ``train`` (labels
    ``y[train]``), standardised on them: the baseline any encoder must beat. ``balanced`` weights classes by
    inverse frequency (as the fine-tuning heads' class weights do). At most ``max_train`` training rows are fitted,
    a seeded random draw made before any row is copied (a whole-scene map has millions of labelled pixels, and a
    linear model of a few dozen features is settled long before); the test rows are predicted in blocks of ~16 M
    values, so a large scene costs no float64 copy of itself."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = np.asarray(train)
    if len(train) > max_train:
        train = np.sort(np.random.default_rng(seed).choice(train, max_train, replace=False))
    rows = np.arange(len(x)) if test is None else np.asarray(test)
    y_train = y[train]
    if np.unique(y_train).size < 2:  # one class: nothing to fit, predict it
        return np.full(len(rows), y_train[0] if len(y_train) else 0, np.int64)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced" if balanced else None))
    clf.fit(np.asarray(x[train], np.float64), y_train)
    block = max(1, (1 << 24) // max(1, x.shape[1]))
    return np.concatenate([clf.predict(np.asarray(x[rows[i:i + block]], np.float64)).astype(np.int64)
                           for i in range(0, len(rows), block)] or [np.zeros(0, np.int64)])


def task_class(kind: str) -> type[Task]:
    """The :class:`Task` subclass of ``kind``; a clear error naming the known kinds."""
    import finetune.tasks  # noqa: F401  (imports every kind's module, which registers it)

    try:
        return Task._registry[kind]
    except KeyError:
        raise DatasetError(f"unknown task kind {kind!r}; expected one of {kinds()}") from None


def kinds() -> tuple[str, ...]:
    """Every registered task kind."""
    import finetune.tasks  # noqa: F401

    return tuple(sorted(Task._registry))


def run_task(encoder: Encoder, data, cfg: TaskConfig) -> TaskResult:
    """Train and evaluate ``cfg.kind`` on ``data`` (a dataset container of that kind)."""
    return task_class(cfg.kind)(cfg).run(encoder, data)


# ----------------------------------------------------------------------------- shared helpers

def seed_everything(seed: int) -> None:
    """Seed every generator a task may draw from (torch CPU and CUDA, numpy's global one, ``random``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_of(cfg: TaskConfig) -> torch.device:
    d = cfg.train.device
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(d)


def spectral_tensors(spectral: Spectral) -> tuple[torch.Tensor, torch.Tensor]:
    """(wavelengths, fwhm) float32 tensors of a band table."""
    return (torch.as_tensor(spectral.wavelengths, dtype=torch.float32),
            torch.as_tensor(spectral.fwhm, dtype=torch.float32))


#: Encoder parameters (names inside the encoder, e.g. ``inner.meta.x``) of the patch embedding: layer 0 of the
#: layer-wise learning-rate decay (BEiT's ``get_layer_id``: cls token, position and patch embedding are layer 0).
EMBEDDING_PREFIXES = ("inner.content.", "inner.meta.", "inner.hyper.", "inner.fixed.")


def encoder_layer_id(name: str, depth: int) -> int:
    """The layer of an encoder parameter for layer-wise learning-rate decay, as BEiT / MAE fine-tuning number them:
    the patch embedding (here the band conditions, content encoder and hypernetwork) 0, ``blocks.i`` ``i + 1``, and
    everything after the blocks (final norm, fusion module) ``depth + 1``, the head's layer."""
    if name.startswith(EMBEDDING_PREFIXES):
        return 0
    if name.startswith("inner.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def encoder_param_groups(encoder: Encoder, encoder_lr: float, layer_decay: float) -> list[dict]:
    """The encoder's trainable parameters as optimiser groups: one group at ``encoder_lr`` when ``layer_decay`` is 1,
    else one per layer with ``encoder_lr * layer_decay ** (depth + 1 - layer)`` (:func:`encoder_layer_id`; BEiT,
    MAE fine-tuning: the embedding learns slowest, the last block at ``layer_decay`` times ``encoder_lr``, what
    follows the blocks at ``encoder_lr``). Each group records its ``layer``."""
    named = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    if not named:
        return []
    if layer_decay == 1:
        return [{"params": [p for _, p in named], "lr": encoder_lr, "layer": None}]
    depth = encoder.depth
    by_layer: dict[int, list] = {}
    for n, p in named:
        by_layer.setdefault(encoder_layer_id(n, depth), []).append(p)
    return [{"params": ps, "lr": encoder_lr * layer_decay ** (depth + 1 - k), "layer": k}
            for k, ps in sorted(by_layer.items())]


def _optimizer(model: nn.Module, encoder: Encoder, cfg: TaskConfig) -> torch.optim.Optimizer:
    enc_ids = {id(p) for p in encoder.parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in enc_ids]
    groups = [{"params": head, "lr": cfg.train.lr, "layer": "head"}]
    groups += encoder_param_groups(encoder, cfg.train.encoder_lr, cfg.train.layer_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)  # betas (0.9, 0.999), as PANGAEA's


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 5% then cosine to 0 — a pure function of the step."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _to(x, dev: torch.device):
    if isinstance(x, tuple):
        return tuple(_to(v, dev) for v in x)
    return x.to(dev) if isinstance(x, torch.Tensor) else x


def train_loop(model: nn.Module, encoder: Encoder, cfg: TaskConfig, batch_fn: Callable, loss_fn: Callable,
               train_encoder: bool | None = None, schedule: Callable[[int, int], float] = None,
               steps: int | None = None) -> list[float]:
    """``steps`` (default ``cfg.train.steps``) AdamW steps (head ``lr``, encoder ``encoder_lr``; the
    learning rates times ``schedule(step, steps)``, default warm-up + cosine): ``batch_fn(rng) -> (inputs tuple,
    target)``, ``loss_fn(model(*inputs), target)``; returns the loss curve. The encoder is frozen unless
    ``train_encoder`` (default: ``train.mode == "finetune"``). The model is moved to the configured device;
    inputs and targets follow it; batches are drawn from ``default_rng(train.seed)``."""
    dev = device_of(cfg)
    model.to(dev)
    rng = np.random.default_rng(cfg.train.seed)
    if train_encoder is None:
        train_encoder = cfg.train.mode == "finetune"
    if train_encoder:
        encoder.unfreeze()
    else:
        encoder.freeze()
    opt = _optimizer(model, encoder, cfg)
    base = [g["lr"] for g in opt.param_groups]
    losses = []
    total = cfg.train.steps if steps is None else steps
    model.train()
    for step in range(total):
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * (schedule or lr_factor)(step, total)
        inputs, target = batch_fn(rng)
        loss = loss_fn(model(*(_to(x, dev) for x in inputs)), _to(target, dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
