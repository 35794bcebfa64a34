"""Configuration of the streaming pipeline: which stores, in what mixture, and how to cut batches."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from data_prep import configtree
from data_prep.errors import UserError

from .colocated_config import ColocatedConfig


class DataError(UserError):
    """A data source or data setting is unusable: raised before any batch (or past ``max_bad_fraction``)."""


class LoaderWorkerError(UserError, RuntimeError):
    """A reader worker process of the pipeline died (killed, out of memory, crashed in native code)."""


@dataclass
class SourceConfig:
    """One patch store in the mixture.

    ``url`` is the store (any fsspec URL, e.g. ``/data/emit_L2.zarr`` or ``s3://bucket/emit_L2.zarr``).
    ``weight`` is the relative probability that a batch is drawn from this store (0 leaves the store out).
    ``subset`` takes a fixed, seeded subset of exactly that many patches (the same in every epoch);
    None uses every committed patch.
    """

    url: str
    weight: float = 1.0
    subset: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise DataError(f"source url must be a non-empty string, got {self.url!r}")
        try:
            self.weight = float(self.weight)
        except (TypeError, ValueError):
            raise DataError(f"source {self.url}: weight must be a number, got {self.weight!r}") from None
        if not math.isfinite(self.weight) or self.weight < 0:
            raise DataError(f"source {self.url}: weight must be finite and >= 0, got {self.weight}")
        if self.subset is not None and (int(self.subset) != self.subset or self.subset < 1):
            raise DataError(f"source {self.url}: subset must be a positive integer or None, got {self.subset!r}")


@dataclass
class DataConfig:
    """Settings of :func:`pretrain.data.build_loader`.

    batch_size: samples per batch on each rank.
    crop: side of the square random crop taken from each patch (pixels).
    crop_align: crop corners are multiples of this (pixels); 0 = the store's spatial chunk, so a crop
        decodes no pixel outside itself. 1 = any position.
    band_window: contiguous good bands per batch (a sensor with fewer good bands takes all of them).
    band_stride: the window starts at a multiple of this, counted in good bands.
    band_step: the window takes every ``band_step``-th good band: ``band_window`` bands spread over
        ``(band_window - 1) * band_step + 1`` good bands (a store with fewer takes every ``band_step``-th of
        all of them), so a window can span a sensor's whole range at a coarser spacing. 1 = contiguous.
    sensor_dropout: probability that a sample's sensor index is replaced by 0 (unknown).
    num_workers: parallel readers (0 = read in the pipeline thread); worker_type ``thread`` or ``process``.
    epochs: passes over every source (each source's patches, or subset, once per pass); None = endless.
    seed: seeds the permutations, mixture draws, windows, crops and dropout.
    max_bad_fraction: a sample whose chunks fail to decode is replaced by a seeded substitute from the same
        store (batch size and batch count never change); iteration fails with DataError once more than
        ``max(1, max_bad_fraction * reads tried from that store)`` reads of one store have failed
        (0 = fail on the first).
    max_bad_batch_fraction: iteration fails with DataError when more than this fraction of one batch's
        samples fail to decode (a store gone bad is not papered over with substitutes).
    prefetch: batches prepared ahead of the consumer.
    storage_options: passed to fsspec for remote URLs.
    pin_memory: pin batches (only when CUDA is available): thread workers allocate them pinned, process workers'
        batches are copied into pinned memory; the copy to the GPU is then asynchronous.
    decoder: ``auto`` (the ``zarrs`` codec pipeline for local stores, zarr-python's for other URLs), ``zarrs`` or
        ``zarr`` (zarr-python's own pipeline everywhere).
    normalise_on: ``workers`` (workers deliver normalised float32 ``pixels``), ``device`` (workers deliver the
        stored FP16 ``raw`` + ``norm``; the loader normalises on the device it was built for, see
        :func:`pretrain.data.build_loader`), or ``auto``: ``device`` when the loader is built for a CUDA device.
    mix: ``store`` (a batch holds one store and one band window) or ``mixed`` (any sensor mix in one batch, padded,
        with ``band_mask``: :mod:`pretrain.data.mixed`).
    colocated: co-located groups instead of single images (:class:`~pretrain.data.colocated_config.ColocatedConfig`,
        :mod:`pretrain.data.colocated`); None = off.
    """

    sources: list[SourceConfig]
    batch_size: int = 8
    crop: int = 128
    band_window: int = 100
    band_stride: int = 32
    band_step: int = 1
    sensor_dropout: float = 0.1
    num_workers: int = 2
    worker_type: str = "thread"
    epochs: int | None = None
    seed: int = 0
    max_bad_fraction: float = 0.01
    max_bad_batch_fraction: float = 0.5
    prefetch: int = 2
    storage_options: dict | None = None
    crop_align: int = 0
    pin_memory: bool = False
    decoder: str = "auto"
    normalise_on: str = "auto"
    mix: str = "store"
    colocated: ColocatedConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sources, list | tuple) or not self.sources:
            raise DataError("DataConfig.sources must be a non-empty list of SourceConfig")
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        urls = [s.url for s in self.sources]
        dup = sorted({u for u in urls if urls.count(u) > 1})
        if dup:
            raise DataError(f"DataConfig.sources lists the same store more than once: {dup}")
        total = sum(s.weight for s in self.sources)
        if total <= 0:
            raise DataError(f"DataConfig.sources: weights must sum to more than 0, got {[s.weight for s in self.sources]}")
        for name in ("batch_size", "crop", "band_window", "band_stride", "band_step", "prefetch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise DataError(f"DataConfig.{name} must be a positive integer, got {v!r}")
        for name in ("num_workers", "crop_align", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise DataError(f"DataConfig.{name} must be an integer >= 0, got {v!r}")
        if self.mix not in ("store", "mixed"):
            raise DataError(f"DataConfig.mix must be 'store' or 'mixed', got {self.mix!r}")
        if isinstance(self.colocated, dict):
            self.colocated = ColocatedConfig(**self.colocated)
        if self.worker_type not in ("thread", "process"):
            raise DataError(f"DataConfig.worker_type must be 'thread' or 'process', got {self.worker_type!r}")
        if self.decoder not in ("auto", "zarrs", "zarr"):
            raise DataError(f"DataConfig.decoder must be 'auto', 'zarrs' or 'zarr', got {self.decoder!r}")
        if self.normalise_on not in ("auto", "workers", "device"):
            raise DataError(f"DataConfig.normalise_on must be 'auto', 'workers' or 'device', got {self.normalise_on!r}")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise DataError(f"DataConfig.epochs must be a positive integer or None (endless), got {self.epochs!r}")
        for name in ("sensor_dropout", "max_bad_fraction", "max_bad_batch_fraction"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                raise DataError(f"DataConfig.{name} must be in [0, 1], got {v!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from a plain mapping (e.g. a YAML section); ``sources`` may be a list of mappings.

        Keys and types are checked by :mod:`data_prep.configtree` (the one config mechanism)."""
        return configtree.build(cls, d, "data", DataError, what="data config key")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
