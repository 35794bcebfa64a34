"""Scene classification: mean-pooled tokens -> (non-affine BatchNorm) -> Linear."""

from __future__ import annotations

import torch
from torch import nn


class SceneClassifier(nn.Module):
    """Linear probe (``encoder.freeze()`` first) or full fine-tuning (encoder trainable).

    The head is a parameter-free BatchNorm (MAE's linear-probe recipe) and one Linear layer, so a
    frozen encoder plus this head is a true linear probe: only ``head.fc`` has trainable parameters.
    """

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        d = encoder.embed_dim
        self.head = nn.Sequential()
        self.head.add_module("norm", nn.BatchNorm1d(d, affine=False))
        self.head.add_module("fc", nn.Linear(d, n_classes))
        nn.init.trunc_normal_(self.head.fc.weight, std=0.01)
        nn.init.zeros_(self.head.fc.bias)

    def forward(self, pixels: torch.Tensor, wavelengths: torch.Tensor, fwhm: torch.Tensor,
                sensor=None, level=None) -> torch.Tensor:
        """Class logits ``[B, n_classes]``."""
        frozen = getattr(self.encoder, "frozen", False)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            tokens = self.encoder(pixels, wavelengths, fwhm, sensor=sensor, level=level)
        return self.head(tokens.mean(1))
