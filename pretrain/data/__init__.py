"""Streaming pipeline from patch stores to training batches (torchdata.nodes), resumable exactly.

``build_loader(DataConfig(sources=[SourceConfig(url, weight, subset)], ...), rank, world_size)``
returns an iterable of batch dicts with ``state_dict()`` / ``load_state_dict()``; ``build_loader(..., device=)``
normalises on that device (GPU: workers only decode; copies from pinned memory overlap the step).
"""

from data_prep.spectral import normalise

from .config import DataConfig, DataError, LoaderWorkerError, SourceConfig
from .loader import SpecLoader, build_loader, build_plan
from .reader import (
    SampleReader,
    finish_batch,
    normalise_tensor,
    open_store,
    touched_elements,
    window_segments,
)

__all__ = [
    "DataConfig",
    "DataError",
    "LoaderWorkerError",
    "SampleReader",
    "SourceConfig",
    "SpecLoader",
    "build_loader",
    "build_plan",
    "finish_batch",
    "normalise",
    "normalise_tensor",
    "open_store",
    "touched_elements",
    "window_segments",
]
