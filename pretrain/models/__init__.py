"""Models: the any-sensor hypernetwork encoder (SpecAware), MAE and JEPA objectives, export.

``build_model(name, objective="mae"|"jepa", **overrides)`` builds a named size from :data:`MODEL_SIZES`;
``model(batch)`` returns a dict with ``loss``; ``model.encoder`` is the shared :class:`SpectralEncoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .args import MODEL_SIZES, ModelArgs, ModelError, get_args
from .encoder import SpectralEncoder
from .mae import MAE, random_mask

OBJECTIVES = ("mae", "jepa")


def build_model(name: str, objective: str = "mae", *, sensor_names: Sequence[str] | None = None,
                level_names: Sequence[str] | None = None, **overrides: Any) -> nn.Module:
    """Build the named size (``debug``, ``tiny``, ``small``, ``base``, ``large``, ``huge``) for an objective.

    ``overrides`` replace fields of :class:`ModelArgs` (unknown keys are an error). The sensor vocabulary
    defaults to the registry's ``sensor_vocab()``; its MiniLM embeddings come from the text cache."""
    args = get_args(name, **overrides)
    if objective == "mae":
        return MAE(args, sensor_names, level_names)
    if objective == "jepa":
        from .jepa import JEPA

        return JEPA(args, sensor_names, level_names)
    raise ModelError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def check_args(name: str, objective: str = "mae", **overrides: Any) -> ModelArgs:
    """What :func:`build_model` would build, checked without building it (a bad name, objective or override
    raises :class:`ModelError`); the config loader calls it through ``build_model.check_args``."""
    if objective not in OBJECTIVES:
        raise ModelError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    return get_args(name, **overrides)


build_model.check_args = check_args


__all__ = ["MAE", "MODEL_SIZES", "ModelArgs", "ModelError", "SpectralEncoder", "build_model", "get_args",
           "random_mask"]
