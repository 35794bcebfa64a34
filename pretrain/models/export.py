"""The encoder export: ``encoder.safetensors`` + ``model_args.json``, written and read here only.

``save_encoder`` writes both files atomically (temporary file + ``os.replace``). Reading has one
implementation for every reader -- ``load_encoder`` (a standalone encoder: ``finetune.load_encoder``,
benchmarks), ``pretrain.engine.load_export_into`` (the next stage, also partitioned) -- and one error type,
:class:`ExportError`, whose message names the folder or file, the field or tensor, and what was expected.
No pickle, no DeepSpeed and no text model are needed to load (the sensor/level text-embedding table is
part of the weights; the vocabulary it is indexed by is in ``model_args.json``).

Beside them a pretraining stage writes ``objective.safetensors``: the objective's own parts (every tensor of the
model outside ``encoder.``: an MAE's decoder and output head, a JEPA's predictor and target encoder), with the
objective's name in its metadata, so that a following stage of the same objective continues them instead of
starting them fresh (``stages.N.carry_objective``). Downstream readers never need it.

``model_args.json``: ``format`` ("specfm-encoder"), ``version`` (1), ``name``, ``args`` (every
:class:`~pretrain.models.args.ModelArgs` field), ``sensor_vocab`` / ``level_vocab`` (the
:class:`~pretrain.models.vocab.Vocabulary`), ``embed_dim``, ``patch_size``, ``extra`` (provenance).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .args import ModelArgs, ModelError
from .encoder import SpectralEncoder
from .vocab import Vocabulary

FORMAT = "specfm-encoder"
VERSION = 1
WEIGHTS = "encoder.safetensors"
ARGS = "model_args.json"
EXPORT_FILES = (WEIGHTS, ARGS)
OBJECTIVE_WEIGHTS = "objective.safetensors"
#: the same export in the Hugging Face layout (``pretrain/release.py``): ``config.json`` holds every
#: ``model_args.json`` field, ``model.safetensors`` the same tensors; read wherever an export is read
RELEASE_WEIGHTS, RELEASE_ARGS = "model.safetensors", "config.json"
_WRITER = "written by pretrain.models.export.save_encoder at the end of a pretraining stage"


class ExportError(ModelError):
    """An encoder export is missing, incomplete, of another format, or does not fit the model."""


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
            **enc.vocab.to_json(), "embed_dim": enc.embed_dim, "patch_size": enc.patch_size,
            "extra": extra or {}}
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


def objective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The objective's own tensors: every entry of ``model.state_dict()`` outside its ``encoder``."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}


def save_objective(model: nn.Module, out_dir: str | os.PathLike, objective: str) -> Path | None:
    """Write :data:`OBJECTIVE_WEIGHTS` (the objective's own tensors, ``objective`` in the metadata) into
    ``out_dir`` atomically; nothing (None) when the model has no tensors outside its encoder."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in objective_state(model).items()}
    if not tensors:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp, metadata={"format": FORMAT, "objective": objective})
    os.replace(tmp, out / OBJECTIVE_WEIGHTS)
    return out / OBJECTIVE_WEIGHTS


def read_objective(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]] | None:
    """``(objective, tensors)`` of the export's :data:`OBJECTIVE_WEIGHTS`, or None when it has none (an export
    of an older version, or of a custom exporter)."""
    f = Path(path) / OBJECTIVE_WEIGHTS
    if not f.is_file():
        return None
    meta, tensors = _read_safetensors(f)
    objective = meta.get("objective")
    if not objective:
        raise ExportError(f"{f}: its metadata names no 'objective' ({_WRITER})")
    return objective, tensors


# ------------------------------------------------------------------------------------------------ reading
def _names(p: Path) -> dict[str, str]:
    """The export's file names in folder ``p``: its own, or the release layout's where only that is there."""
    if not (p / WEIGHTS).is_file() and (p / RELEASE_WEIGHTS).is_file():
        return {WEIGHTS: RELEASE_WEIGHTS, ARGS: RELEASE_ARGS}
    return {WEIGHTS: WEIGHTS, ARGS: ARGS}


def export_dir(path: str | os.PathLike, need: Sequence[str] = EXPORT_FILES) -> Path:
    """The export folder (a path to one of its files is taken as its folder) holding the ``need`` files
    (named as in :data:`EXPORT_FILES`; a release folder's ``model.safetensors`` / ``config.json`` count)."""
    p = Path(path)
    if p.is_file() and p.name in (*EXPORT_FILES, RELEASE_WEIGHTS, RELEASE_ARGS):
        p = p.parent
    if not p.is_dir():
        raise ExportError(f"encoder export {p} does not exist; expected a directory holding "
                          f"{', '.join(EXPORT_FILES)} ({_WRITER}), or a release folder's "
                          f"{RELEASE_ARGS} + {RELEASE_WEIGHTS}")
    names = _names(p)
    missing = [names[f] for f in need if not (p / names[f]).is_file()]
    if missing:
        raise ExportError(f"encoder export {p} lacks {', '.join(missing)}; expected {', '.join(EXPORT_FILES)} "
                          f"({_WRITER}), or a release folder's {RELEASE_ARGS} + {RELEASE_WEIGHTS}")
    return p


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``model_args.json`` of an export, checked: valid JSON, this format and version, the vocabulary."""
    p = export_dir(path)
    jpath = p / _names(p)[ARGS]
    try:
        meta = json.loads(jpath.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{jpath}: not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ExportError(f"{jpath}: expected a JSON object at the top level")
    if meta.get("format") != FORMAT:
        raise ExportError(f"{jpath}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ExportError(f"{jpath}: field 'version' is {meta.get('version')!r}, this code reads {VERSION}")
    if not isinstance(meta.get("args"), dict):
        raise ExportError(f"{jpath}: field 'args' (the model arguments) missing or not an object")
    return meta


def read_vocab(path: str | os.PathLike) -> Vocabulary | None:
    """The vocabulary an export was trained with (None for an export without ``model_args.json``)."""
    p = export_dir(path, need=(WEIGHTS,))
    if not (p / _names(p)[ARGS]).is_file():
        return None
    try:
        return Vocabulary.from_json(read_meta(p), str(p / _names(p)[ARGS]))
    except ExportError:
        raise
    except ModelError as e:
        raise ExportError(str(e)) from e


def read_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of ``encoder.safetensors`` (only that file is needed: custom exporters may write no JSON)."""
    p = export_dir(path, need=(WEIGHTS,))
    return _read_safetensors(p / _names(p)[WEIGHTS], device)[1]


def _read_safetensors(f: Path, device: str | torch.device = "cpu") -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of one of an export's safetensors files; ExportError when it cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), framework="pt", device=str(device)) as h:
            return h.metadata() or {}, {k: h.get_tensor(k) for k in h.keys()}
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{f}: not a readable safetensors file ({e}); the export is truncated or overwritten, "
                          f"export it again") from None


def check_fits(weights: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]], where: str,
               what: str = "encoder export") -> None:
    """ExportError unless ``weights`` has exactly the names of ``shapes`` (full shapes) with those shapes."""
    bad = [f"{k}: export {list(v.shape)} vs model {list(shapes[k])}" for k, v in weights.items()
           if k in shapes and tuple(shapes[k]) != tuple(v.shape)]
    missing, extra = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    if bad or missing or extra:
        parts = ["; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")] if bad else []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        raise ExportError(f"{what} {where} does not fit the model it is loaded into (model name, "
                          f"overrides or model_args.json): {'; '.join(parts)}")


def state_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Full shapes of ``module.state_dict()``'s entries (ZeRO-3 partitions report their full ``ds_shape``)."""
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
    keys = set(module.state_dict(keep_vars=True))
    shapes.update({n: tuple(b.shape) for n, b in module.named_buffers() if n in keys})
    return shapes


def check_vocab(encoder: nn.Module, path: str | os.PathLike) -> None:
    """ExportError when the export's vocabulary differs from the one ``encoder`` embeds (indices would move)."""
    want = getattr(encoder, "vocab", None)
    have = read_vocab(path)
    if want is not None and have is not None and want != have:
        raise ExportError(f"encoder export {path}: its vocabulary (sensor_vocab {list(have.sensors)}, level_vocab "
                          f"{list(have.levels)}) differs from the model's ({list(want.sensors)}, "
                          f"{list(want.levels)}); build the model with the export's vocabulary")


def load_encoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SpectralEncoder:
    """Rebuild the encoder of an export folder (eval mode) with the export's arguments and vocabulary."""
    p = export_dir(path)
    meta = read_meta(p)
    try:
        args = ModelArgs.from_dict(meta["args"])
        vocab = Vocabulary.from_json(meta, str(p / _names(p)[ARGS]))
    except ModelError as e:
        raise ExportError(f"{p / _names(p)[ARGS]}: {e}") from e
    enc = SpectralEncoder(args, vocab, compute_text=False)
    sd = read_weights(p, map_location)
    check_fits(sd, state_shapes(enc), str(p))
    enc.load_state_dict(sd, strict=True)
    return enc.to(map_location).eval()
