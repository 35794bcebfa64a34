"""Downstream heads, datasets, metrics and the benchmark runner.

``finetune.load_encoder(path)`` is the public entry: see :mod:`finetune.encoder_api`.
"""

from finetune.encoder_api import Encoder, ExportError, load_encoder, wrap_encoder

__all__ = ["Encoder", "ExportError", "load_encoder", "wrap_encoder"]
