"""The model contract: what the engine, the trainer, checkpoints and the export rely on a model for.

A builder, ``fn(name, objective=..., vocab=..., **overrides) -> model`` (``model.builder`` in the config;
the shipped one is :func:`pretrain.models.build_model`), returns an ``nn.Module`` that satisfies
:class:`PretrainModel` (shape after torchtitan's ``protocols/model.py``: the model declares its contract,
everything parallel is applied from outside by ``pretrain.engine``):

``encoder``
    The part that is exported (``pretrain.models.export.save_encoder``), loaded into the next stage
    (``engine.load_export_into``) and used downstream (``finetune.load_encoder``). Nothing else of the model
    leaves the run. Its parameter names are the export's tensor names.
``forward(batch, generator=None) -> dict``
    ``batch`` holds ``pixels [B,C,H,W]``, ``wavelengths``/``fwhm [B,C]`` (nm), ``sensor``/``level [B]``
    (indices into ``vocab``), optionally ``valid [B,H,W]`` and ``gsd [B]``. The result holds a scalar
    ``loss``; anything else is for figures and logs (MAE: ``pred``, ``mask``). Random choices (masks,
    views) come from ``generator`` or, without one, torch's global generator.
``flops_per_sample(n_bands, image_size) -> float``
    Training FLOPs (forward + backward) of one sample, for the MFU the trainer logs.
``init_weights()``
    (Re)initialise every parameter, module by module, each module touching only its own parameters.
    Construction already initialises (each module in its own ``__init__``, PyTorch's ``reset_parameters``
    convention), and no module's ``__init__`` writes into a child: so building under
    ``deepspeed.zero.Init`` -- which broadcasts rank 0's values and partitions each module as its
    ``__init__`` returns -- gives, bitwise, the weights the whole model gets from the same seed, and ZeRO-3
    builds the shipped models partitioned (the builder says so with ``zero_init_safe = True``).
    ``init_weights()`` runs through ``Module.apply``, which ``zero.Init`` gathers per module, so it is
    exact partitioned too.
``vocab``
    The :class:`~pretrain.models.vocab.Vocabulary` the model embeds. The builder takes it (a resumed
    run's or a previous stage's), the export writes it, the loader is handed it. ``add_sensor(name)``
    appends a name before the engine is built.
``set_grad_checkpointing(enabled)``
    Activation checkpointing of the model's transformer stacks (:class:`~pretrain.models.layers.Blocks`);
    the engine turns it on for ``model.activation_checkpointing``.

An EMA model (JEPA) also satisfies :class:`EMAModel`: ``update_target(momentum, storage=None)`` moves its
target network after every optimizer step (the trainer calls ``pretrain.engine.update_target`` with
``pretrain.schedules.ema_momentum``). ``storage(target_param, context_param)`` names the tensors that hold
the two parameters' values on this process; under ZeRO-3 the engine passes the local partitions (and the
whole copies of gathered parameters), so the update is exact and needs no communication. Its target is
built equal to its encoder without a copy (the encoder's random draws replayed), so that holds under
``zero.Init`` too.

Model files import no distributed code; :class:`Objective` is the base the shipped objectives share.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from .args import ModelArgs
from .encoder import SpectralEncoder
from .layers import reset_parameters, set_grad_checkpointing
from .vocab import Vocabulary


@runtime_checkable
class PretrainModel(Protocol):
    """What every pretraining model provides (see the module docstring)."""

    encoder: nn.Module

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        ...

    def flops_per_sample(self, n_bands: int, image_size: int) -> float:
        ...

    def init_weights(self) -> None:
        ...


@runtime_checkable
class EMAModel(PretrainModel, Protocol):
    """A model with a target network that follows the trained one by an exponential moving average."""

    def update_target(self, momentum: float, storage: Any = None) -> None:
        ...


class Objective(nn.Module):
    """Base of the shipped objectives: the shared :class:`SpectralEncoder` and the contract's common parts."""

    objective: ClassVar[str] = ""

    def __init__(self, args: ModelArgs, vocab: Vocabulary | None = None, compute_text: bool = True) -> None:
        super().__init__()
        self.args = args
        self.encoder = SpectralEncoder(args, vocab, compute_text)

    @property
    def vocab(self) -> Vocabulary:
        return self.encoder.vocab

    def add_sensor(self, name: str, text: str | None = None) -> int:
        """Append a sensor name to every encoder of the model (see :meth:`SpectralEncoder.add_sensor`)."""
        idx = 0
        for m in self.modules():
            if isinstance(m, SpectralEncoder):
                idx = m.add_sensor(name, text)
        return idx

    def init_weights(self) -> None:
        reset_parameters(self)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        set_grad_checkpointing(self, enabled)

    def log_metrics(self, batch: dict[str, Any], out: dict[str, Any]) -> dict[str, float]:
        """The learning instruments of :mod:`pretrain.instruments` (band-condition similarity, band-to-token
        map rank, reconstruction skill), logged by the trainer every log step, with a warning on a collapse."""
        from pretrain.instruments import log_metrics

        return log_metrics(self, batch, out)

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def flops_per_sample(self, n_bands: int, image_size: int) -> float:
        raise NotImplementedError
