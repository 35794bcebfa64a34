"""Streaming pipeline from patch stores to training batches (torchdata.nodes), resumable exactly.

``build_loader(DataConfig(sources=[SourceConfig(url, weight, subset)], ...), rank, world_size)``
returns an iterable of batch dicts with ``state_dict()`` / ``load_state_dict()``.
"""

from data_prep.spectral import normalise

from .config import DataConfig, DataError, LoaderWorkerError, SourceConfig
from .loader import SpecLoader, build_loader, build_plan
from .reader import SampleReader, touched_elements

__all__ = [
    "DataConfig",
    "DataError",
    "LoaderWorkerError",
    "SampleReader",
    "SourceConfig",
    "SpecLoader",
    "build_loader",
    "build_plan",
    "normalise",
    "touched_elements",
]
