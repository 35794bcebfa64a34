"""Export the encoder as ``encoder.safetensors`` + ``model_args.json``; load it back with no pickle, no
DeepSpeed and no text model (the sensor/level text-embedding table is part of the weights)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .args import ModelArgs, ModelError
from .encoder import SpectralEncoder

FORMAT = "specfm-encoder"
VERSION = 1
WEIGHTS = "encoder.safetensors"
ARGS = "model_args.json"


def _encoder_of(model: nn.Module) -> SpectralEncoder:
    enc = model if isinstance(model, SpectralEncoder) else getattr(model, "encoder", None)
    if enc is None:  # e.g. a DeepSpeed engine: .module holds the model
        enc = getattr(getattr(model, "module", None), "encoder", None)
    if not isinstance(enc, SpectralEncoder):
        raise ModelError(f"save_encoder needs a SpectralEncoder or a model with .encoder, got {type(model).__name__}")
    return enc


def save_encoder(model: nn.Module, out_dir: str | os.PathLike, state_dict: dict | None = None,
                 extra: dict | None = None) -> Path:
    """Write ``encoder.safetensors`` and ``model_args.json`` into ``out_dir``; returns ``out_dir``.

    ``state_dict`` (optional) supplies consolidated encoder weights (keys as in ``encoder.state_dict()``), e.g.
    gathered from a ZeRO-3 engine; by default the encoder's own weights are written. ``extra`` is stored
    under ``"extra"`` in the JSON (provenance: step, config, git SHA...). Files appear atomically."""
    from safetensors.torch import save_file

    enc = _encoder_of(model)
    sd = state_dict if state_dict is not None else enc.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    meta = {"format": FORMAT, "version": VERSION, "name": enc.args.name, "args": enc.args.to_dict(),
            "sensor_vocab": list(enc.sensor_names), "level_vocab": list(enc.level_names),
            "embed_dim": enc.embed_dim, "patch_size": enc.patch_size, "extra": extra or {}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp_w = tempfile.mkstemp(dir=out, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp_w, metadata={"format": FORMAT})
    fd, tmp_j = tempfile.mkstemp(dir=out, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp_w, out / WEIGHTS)
    os.replace(tmp_j, out / ARGS)
    return out


def read_weights(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file; ModelError naming the file when it is truncated or not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e}); the export is truncated or "
                         f"overwritten, export it again") from None


def load_encoder(out_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> SpectralEncoder:
    """Rebuild the encoder from an export folder (eval mode). Clear errors for missing files, another format,
    or weights whose names/shapes do not match the arguments."""
    folder = Path(out_dir)
    jpath, wpath = folder / ARGS, folder / WEIGHTS
    for pth in (jpath, wpath):
        if not pth.is_file():
            raise ModelError(f"{pth}: missing; an encoder export needs {ARGS} and {WEIGHTS}")
    try:
        meta = json.loads(jpath.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{jpath}: not valid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise ModelError(f"{jpath}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ModelError(f"{jpath}: field 'version' is {meta.get('version')!r}, this code reads {VERSION}")
    args = ModelArgs.from_dict(meta["args"])
    enc = SpectralEncoder(args, meta["sensor_vocab"], meta["level_vocab"], compute_text=False)
    sd = read_weights(wpath, device=str(map_location) if not isinstance(map_location, str) else map_location)
    own = enc.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ModelError(f"{wpath}: weights do not match {jpath} (args {args.name}): missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ModelError(f"{wpath}: tensor {k!r} has shape {tuple(sd[k].shape)}, but the arguments in "
                             f"{jpath} give {tuple(v.shape)}")
    enc.load_state_dict(sd, strict=True)
    return enc.to(map_location).eval()
