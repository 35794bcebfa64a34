"""Learning instruments: does the encoder keep spectral shape, and does the objective ask it to?

Measured on a training batch at every log step (``record``), written into the metrics record, plotted over
the run (``plot_curves``) and checked for a collapse (``collapse_warnings``):

- ``cond_similarity``: mean pairwise cosine similarity between the band conditions ``cond [B, C, d]`` of one
  sample (off-diagonal pairs), averaged over the batch. 1 when every band gets the same condition, so the
  hypernetwork gives every band the same patch weights (a panchromatic encoder).
- ``band_map_rank``: effective rank (exp of the entropy of the normalised singular values, Roy & Vetterli
  2007) of the band-to-token map ``M [C, D]``: row c is the token the patch embedding makes (bias removed)
  of a patch that is 1 in band c and 0 elsewhere, spatially uniform. Rank 1 when every band maps to the
  same direction; at most min(C, D).
- ``band_map_mean_energy``: the share of ``||M||^2`` in the band-average direction (``C ||mean_c M_c||^2 /
  ||M||^2``); 1 for a panchromatic map, about 1/C for unrelated rows.
- ``skill_vs_band_mean`` and ``skill_vs_interp``: ``1 - loss(model) / loss(baseline)`` on the masked
  patches, with the model's own loss (Charbonnier + spectral angle, same weights), against copying each
  band's visible mean into every masked pixel, and against filling each masked patch with the
  inverse-squared-distance weighted mean spectrum of the visible patches. 0: no better than the trivial
  predictor; negative: worse. Only for objectives that return ``pred`` and ``mask`` (MAE); with spectral
  masking the baselines still see every band's visible pixels, so they are stronger there than the model.

Measured on the first slice (debug MAE, 3 x 150 steps, the old simulator): similarity 0.52-0.58 at init
rising to 0.93-0.97, effective rank 5.5-8.6 falling to 1.2-1.6 (75-96% band-average energy), skill vs
band mean 0.04-0.07. :data:`COLLAPSE_SIMILARITY` and :data:`COLLAPSE_RANK` mark that regime.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pretrain.losses import reconstruction_loss

log = logging.getLogger("specfm.pretrain")

COLLAPSE_SIMILARITY = 0.9
"""cond_similarity above this is reported as a collapse of the band conditions."""
COLLAPSE_RANK = 2.0
"""band_map_rank below this is reported as a panchromatic band-to-token map."""
KEYS = ("cond_similarity", "band_map_rank", "band_map_mean_energy", "skill_vs_band_mean", "skill_vs_interp")


# ------------------------------------------------------------------------------------------ pure measures

def condition_similarity(cond: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal cosine similarity of ``cond [B, C, d]`` over band pairs, averaged over B (scalar)."""
    if cond.dim() != 3 or cond.shape[1] < 2:
        raise ValueError(f"cond must be [B, C >= 2, d], got {tuple(cond.shape)}")
    u = F.normalize(cond.float(), dim=-1)
    g = u @ u.transpose(1, 2)  # [B, C, C]
    c = cond.shape[1]
    off = g.sum((1, 2)) - g.diagonal(dim1=1, dim2=2).sum(1)
    return (off / (c * (c - 1))).mean()


def effective_rank(m: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Effective rank ``exp(H(s / sum s))`` of each matrix ``m [..., C, D]`` (its singular values s)."""
    s = torch.linalg.svdvals(m.double())
    p = s / s.sum(-1, keepdim=True).clamp_min(eps)
    h = -(p * torch.log(p.clamp_min(eps))).sum(-1)
    return torch.exp(h).to(m.dtype)


def mean_direction_energy(m: torch.Tensor) -> torch.Tensor:
    """Share of ``||m||_F^2`` in the row-average direction, per matrix ``m [..., C, D]``."""
    c = m.shape[-2]
    mean = m.mean(-2)
    return c * (mean * mean).sum(-1) / (m * m).sum((-2, -1)).clamp_min(1e-30)


def band_token_map(hyper: torch.nn.Module, cond: torch.Tensor) -> torch.Tensor:
    """``M [B, C, D]``: the token a HyperEmbedding makes of a uniform unit patch in each band, bias removed.

    Computed through the module's own forward (so ZeRO-3 gathers its weights as in training): C probe
    tokens per sample, probe token c is 1 in band c over the whole patch and 0 in the others."""
    b, c, _ = cond.shape
    p2 = hyper.P
    probe = torch.eye(c, dtype=cond.dtype, device=cond.device)  # [C (band), C (token)]
    patches = probe[None, :, :, None].expand(b, c, c, p2)  # [B, C, N = C, P]
    tok = hyper(patches, cond)
    zero = hyper(torch.zeros_like(patches[:, :, :1]), cond)  # the bias token
    return tok - zero


def band_mean_baseline(pixels: torch.Tensor, mask: torch.Tensor, p: int, valid: torch.Tensor | None = None,
                       ) -> torch.Tensor:
    """Prediction ``[B, C, H, W]``: each band's mean over the visible (unmasked, valid) pixels, everywhere."""
    b, c, hh, ww = pixels.shape
    vis = (~mask).float().repeat_interleave(p, 1).repeat_interleave(p, 2)  # [B, H, W]
    if valid is not None:
        vis = vis * valid.float()
    w = vis.unsqueeze(1)
    mean = (pixels.float() * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1.0)
    return mean[:, :, None, None].expand(b, c, hh, ww)


def interpolation_baseline(pixels: torch.Tensor, mask: torch.Tensor, p: int, valid: torch.Tensor | None = None,
                           power: float = 2.0) -> torch.Tensor:
    """Prediction ``[B, C, H, W]``: visible patches as they are; each masked patch filled with the
    inverse-distance (``power``) weighted mean of the visible patches' mean spectra (token-grid distance)."""
    b, c, hh, ww = pixels.shape
    h, w = hh // p, ww // p
    x = pixels.float()
    v = torch.ones(b, hh, ww, device=x.device) if valid is None else valid.float()
    vsum = F.avg_pool2d(v.unsqueeze(1), p).flatten(1)  # [B, N] valid fraction per patch
    means = F.avg_pool2d(x * v.unsqueeze(1), p).flatten(2) / vsum.unsqueeze(1).clamp_min(1e-6)  # [B, C, N]
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], -1).float()
    d2 = torch.cdist(pos, pos) ** 2  # [N, N]
    known = (~mask.flatten(1)) & (vsum > 0)  # [B, N]
    wgt = known.float().unsqueeze(1) / (d2.unsqueeze(0) + 1e-6) ** (power / 2)  # [B, N(target), N(source)]
    wgt = wgt / wgt.sum(-1, keepdim=True).clamp_min(1e-12)
    filled = torch.einsum("bts,bcs->bct", wgt, means).view(b, c, h, w)
    up = filled.repeat_interleave(p, 2).repeat_interleave(p, 3)
    m = mask.float().repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
    return x * (1 - m) + up * m


def skill(model_loss: float, baseline_loss: float) -> float:
    """``1 - model / baseline`` (nan when the baseline loss is 0)."""
    return 1.0 - model_loss / baseline_loss if baseline_loss > 0 else float("nan")


# ------------------------------------------------------------------------------------------ on a model

def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


@torch.no_grad()
def record(model: Any, batch: dict, out: dict) -> dict[str, float]:
    """The instruments of one training batch (``out``: the model's outputs on it); {} for a model without
    hypernetwork conditions. Call on every rank (under ZeRO-3 the forward calls here gather weights)."""
    m = _unwrap(model)
    enc = getattr(m, "encoder", None)
    if enc is None or not hasattr(enc, "hyper"):
        return {}
    if "views" in batch:  # a co-located group batch: the conditions of its first (global) view
        batch = batch["views"][0]
    band_mask = batch.get("band_mask")  # a mixed batch: each sample's instruments over its own real bands
    was = enc.training
    enc.eval()
    try:
        pixels, valid = batch["pixels"], batch.get("valid")
        x = pixels * valid.unsqueeze(1).to(pixels.dtype) if valid is not None else pixels
        cond = enc.condition(x, batch["wavelengths"], batch["fwhm"], batch.get("sensor"), batch.get("level"), valid,
                             band_mask=band_mask)
        if band_mask is None:
            rec = {"cond_similarity": float(condition_similarity(cond))}
            bm = band_token_map(enc.hyper, cond).float()
            rec["band_map_rank"] = float(effective_rank(bm).mean())
            rec["band_map_mean_energy"] = float(mean_direction_energy(bm).mean())
        else:
            sims, ranks, energies = [], [], []
            for i, n in enumerate(band_mask.sum(1).tolist()):
                ci = cond[i:i + 1, :max(int(n), 1)]
                if ci.shape[1] >= 2:
                    sims.append(float(condition_similarity(ci)))
                bm = band_token_map(enc.hyper, ci).float()
                ranks.append(float(effective_rank(bm).mean()))
                energies.append(float(mean_direction_energy(bm).mean()))
            rec = {"band_map_rank": sum(ranks) / len(ranks), "band_map_mean_energy": sum(energies) / len(energies)}
            if sims:
                rec["cond_similarity"] = sum(sims) / len(sims)
    finally:
        enc.train(was)
    if "pred" in out and "mask" in out:
        rec.update(reconstruction_skill(m, batch, out))
    return rec


def reconstruction_skill(model: Any, batch: dict, out: dict) -> dict[str, float]:
    """Model vs trivial predictors on the masked patches, every band (see the module docstring)."""
    a = model.args
    p = a.patch_size
    pixels, valid, mask = batch["pixels"].float(), batch.get("valid"), out["mask"].bool()
    b, c, hh, ww = pixels.shape
    h, w = hh // p, ww // p
    weight = mask.view(b, h * w).unsqueeze(-1).float().expand(-1, -1, p * p)
    if valid is not None:
        weight = weight * _patches(valid.unsqueeze(1).float(), p)[:, 0]
    target = _patches(pixels, p)

    def loss(pred: torch.Tensor) -> float:
        r = reconstruction_loss(_patches(pred.float(), p), target, weight, a.charbonnier_weight, a.sam_weight,
                                a.charbonnier_eps, batch.get("band_mask"))
        return float(r["loss"])

    lm = loss(out["pred"])
    lb = loss(band_mean_baseline(pixels, mask, p, valid))
    li = loss(interpolation_baseline(pixels, mask, p, valid))
    return {"recon_loss": lm, "loss_band_mean": lb, "loss_interp": li,
            "skill_vs_band_mean": skill(lm, lb), "skill_vs_interp": skill(lm, li)}


def _patches(x: torch.Tensor, p: int) -> torch.Tensor:
    from pretrain.models.layers import to_patches

    return to_patches(x, p)


def collapse_warnings(rec: dict[str, Any], similarity_max: float = COLLAPSE_SIMILARITY,
                      rank_min: float = COLLAPSE_RANK) -> list[str]:
    """Messages for a collapse seen in one record (empty when none)."""
    out = []
    where = f"stage {rec['stage']} step {rec['step']}" if "step" in rec else "instruments"
    s, r = rec.get("cond_similarity"), rec.get("band_map_rank")
    if s is not None and s > similarity_max:
        out.append(f"{where}: band conditions are collapsing (mean pairwise cosine similarity {s:.3f} > "
                   f"{similarity_max}): the hypernetwork gives every band nearly the same weights")
    if r is not None and r < rank_min:
        out.append(f"{where}: the band-to-token map is nearly panchromatic (effective rank {r:.2f} < {rank_min}, "
                   f"{100 * rec.get('band_map_mean_energy', float('nan')):.0f}% of its energy on the band average)")
    k = rec.get("skill_vs_band_mean")
    if k is not None and k < 0.02:
        out.append(f"{where}: reconstruction is no better than copying each band's visible mean "
                   f"(skill {k:+.3f})")
    return out


def log_metrics(model: Any, batch: dict, out: dict) -> dict[str, float]:
    """The trainer's per-log-step hook (``logging.instruments: [pretrain.instruments:log_metrics]``, or a
    model's ``log_metrics``): :func:`record`, and a warning in the log for each collapse it shows."""
    rec = record(model, batch, out)
    for msg in collapse_warnings(rec):
        log.warning(msg)
    return rec


# ------------------------------------------------------------------------------------------ figures

def read_records(path: str | Path) -> list[dict]:
    """Training records (those with a ``step``) of a metrics.jsonl."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if "step" in r and "loss" in r:
                out.append(r)
    return out


def plot_curves(records: Iterable[dict] | str | Path, path: str | Path, title: str = "") -> Path:
    """One PNG of the loss and every instrument over the global step (stage boundaries marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pretrain.viz import save_figure

    recs = read_records(records) if isinstance(records, str | Path) else list(records)
    panels = [("loss", "loss"), ("cond_similarity", "band-condition cosine similarity"),
              ("band_map_rank", "band-to-token map effective rank"),
              ("band_map_mean_energy", "band-average energy share"),
              (("skill_vs_band_mean", "skill_vs_interp"), "reconstruction skill vs baselines")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    xs = [r.get("global_step", r["step"]) for r in recs]
    for ax, (keys, name) in zip(axes, panels):
        for k in (keys,) if isinstance(keys, str) else keys:
            ys = [r.get(k, math.nan) for r in recs]
            if any(math.isfinite(y) for y in ys):
                ax.plot(xs, ys, label=k.replace("skill_vs_", "vs "))
        if name.startswith("band-condition"):
            ax.axhline(COLLAPSE_SIMILARITY, color="r", ls=":", lw=1)
            ax.set_ylim(0, 1)
        if name.startswith("band-to-token"):
            ax.axhline(COLLAPSE_RANK, color="r", ls=":", lw=1)
        if name.startswith("reconstruction"):
            ax.axhline(0, color="k", lw=0.5)
            ax.legend(fontsize=7)
        stages = {}
        for r, x in zip(recs, xs):
            stages.setdefault(r.get("stage"), x)
        for x in list(stages.values())[1:]:
            ax.axvline(x, color="grey", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    fig.suptitle(title)
    return save_figure(fig, path)
