"""Models: the any-sensor hypernetwork encoder (SpecAware), MAE and JEPA objectives, export.

``build_model(name, objective="mae"|"jepa", vocab=None, **overrides)`` builds a named size from
:data:`MODEL_SIZES`; the models follow the written contract of :mod:`pretrain.models.contract`
(``model(batch)`` returns a dict with ``loss``; ``model.encoder`` is the exported :class:`SpectralEncoder`;
``flops_per_sample``, ``init_weights``, ``vocab``; JEPA adds ``update_target``).
"""

from __future__ import annotations

from typing import Any

from .args import MODEL_SIZES, ModelArgs, ModelError, get_args
from .contract import EMAModel, Objective, PretrainModel
from .encoder import SpectralEncoder
from .mae import MAE, random_mask
from .vocab import Vocabulary

OBJECTIVES = ("mae", "jepa")


def build_model(name: str, objective: str = "mae", *, vocab: Vocabulary | None = None,
                **overrides: Any) -> Objective:
    """Build the named size (``debug``, ``tiny``, ``small``, ``base``, ``large``, ``huge``) for an objective.

    ``overrides`` replace fields of :class:`ModelArgs` (unknown keys are an error). ``vocab`` is the
    vocabulary to embed (a resumed run's, a previous stage's); by default the registry's
    (:meth:`Vocabulary.from_registry`), with MiniLM embeddings from the text cache. The model comes back
    initialised; every module initialises its own parameters, so this builder runs under ``zero.Init``."""
    args = get_args(name, **overrides)
    if objective == "mae":
        return MAE(args, vocab)
    if objective == "jepa":
        from .jepa import JEPA

        return JEPA(args, vocab)
    raise ModelError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def check_args(name: str, objective: str = "mae", **overrides: Any) -> ModelArgs:
    """What :func:`build_model` would build, checked without building it (a bad name, objective or override
    raises :class:`ModelError`); the config loader calls it through ``build_model.check_args``."""
    if objective not in OBJECTIVES:
        raise ModelError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    return get_args(name, **overrides)


build_model.check_args = check_args  # type: ignore[attr-defined]
#: Read by ``pretrain.engine.construct_model``: under ZeRO-3 these models are built inside ``zero.Init``.
build_model.zero_init_safe = True  # type: ignore[attr-defined]

__all__ = ["MAE", "MODEL_SIZES", "EMAModel", "ModelArgs", "ModelError", "Objective", "PretrainModel",
           "SpectralEncoder", "Vocabulary", "build_model", "check_args", "get_args", "random_mask"]
