"""A stand-in MAE for the training tests until pretrain.models lands (tests only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class TinyEncoder(nn.Module):
    def __init__(self, dim: int = 16, patch_size: int = 4):
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, dim
        self.proj = nn.Linear(patch_size * patch_size, dim)
        self.wl = nn.Linear(1, dim)
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim), nn.GELU())])

    def forward(self, pixels, wavelengths, fwhm=None, sensor=None, level=None, valid=None, gsd=None):
        b, c, h, w = pixels.shape
        p = self.patch_size
        x = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, -1, p * p)
        g = torch.tanh(self.wl(wavelengths[..., None] / 1000.0))  # b c d
        t = (self.proj(x) * g[:, :, None]).mean(1)  # b n d
        for blk in self.blocks:
            t = t + blk(t)
        return self.norm(t)


class TinyMAE(nn.Module):
    def __init__(self, dim: int = 16, patch_size: int = 4, mask_ratio: float = 0.5):
        super().__init__()
        self.encoder = TinyEncoder(dim, patch_size)
        self.head = nn.Linear(dim, patch_size * patch_size)
        self.band = nn.Linear(1, 1)
        self.mask_ratio = mask_ratio
        self.args = {"dim": dim, "patch_size": patch_size}

    def forward(self, batch):
        px, wl = batch["pixels"], batch["wavelengths"]
        b, c, h, w = px.shape
        p = self.encoder.patch_size
        tok = self.encoder(px, wl)
        n = tok.shape[1]
        mask = torch.rand(b, n) < self.mask_ratio
        rec = self.head(tok)  # b n pp
        gain = self.band(wl[..., None] / 1000.0)[..., 0]  # b c
        pred = rec[:, None] * gain[:, :, None, None]  # b c n pp
        pred = pred.reshape(b, c, h // p, w // p, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)
        pm = mask.reshape(b, h // p, w // p).repeat_interleave(p, 1).repeat_interleave(p, 2)
        err = ((pred - px) ** 2).mean(1)
        loss = (err * pm).sum() / pm.sum().clamp(min=1)
        return {"loss": loss, "pred": pred, "mask": mask.reshape(b, h // p, w // p)}

    def flops_per_sample(self, n_bands: int, image_size: int) -> float:
        n = (image_size // self.encoder.patch_size) ** 2
        return 6.0 * n * n_bands * (self.encoder.patch_size**2) * self.encoder.embed_dim


def build_model(name: str, objective: str = "mae", **overrides) -> TinyMAE:
    sizes = {"debug": 16, "wide": 24}
    return TinyMAE(dim=sizes[name], **overrides)


def save_encoder(model: TinyMAE, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
    save_file(sd, str(out / "encoder.safetensors"))
    (out / "model_args.json").write_text(json.dumps(model.args))
    return out
