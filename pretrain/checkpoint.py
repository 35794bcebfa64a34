"""DeepSpeed checkpoints that count only once fully written, with per-rank loader and RNG state.

Layout of one stage's checkpoints (``<checkpoint dir>/<stage>/``)::

    step_00000120/            DeepSpeed's files (model states, ZeRO optimizer shards of every rank)
        rank_00000.json       this rank's loader state and RNG states (plain JSON, no pickle)
        complete              written by rank 0 after every rank has finished (JSON: step, world size,
                              parameter shapes); a directory without it is ignored and pruned

A kill during a save leaves the tag without ``complete``; :func:`latest_complete` then picks the
previous one. The newest ``keep`` complete tags are kept.

:class:`CheckpointManager` is what the trainer uses: it is handed the objects to save, each reporting
its own state through ``state_dict()`` / ``load_state_dict()`` (torchtitan's shape): one object whose
state is the same on every rank (the stage counters; DeepSpeed's ``client_state`` and the marker's copy)
and named per-rank objects (the loader, the RNG; one ``rank_N.json`` with those names as keys).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from data_prep.errors import UserError
from data_prep.failpoints import failpoint

MARKER = "complete"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used for this run (another model shape, another world size, unreadable)."""


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(tag: str) -> int:
    return int(tag.split("_", 1)[1])


def complete_tags(stage_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a stage, oldest first."""
    d = Path(stage_dir)
    if not d.is_dir():
        return []
    tags = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / MARKER).is_file()]
    return sorted(tags, key=lambda p: _step_of(p.name))


def latest_complete(stage_dir: str | Path) -> Path | None:
    tags = complete_tags(stage_dir)
    return tags[-1] if tags else None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Stateful(Protocol):
    """An object that reports and restores its own state as JSON-safe values."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def rng_state() -> dict[str, Any]:
    """torch, numpy and python RNG states as JSON-safe values."""
    np_state = np.random.get_state()
    st = {"torch": torch.get_rng_state().tolist(),
          "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
          "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state().tolist()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(st["cuda"], dtype=torch.uint8))


class RNGState:
    """The process's torch, numpy and python RNGs as a :class:`Stateful` (per rank)."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


def param_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Full parameter shapes (also under ZeRO-3, where the local tensor is a partition)."""
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine: Any, stage_dir: str | Path, step: int, client_state: dict[str, Any],
         rank_state: dict[str, Any], keep: int, shapes: dict[str, list[int]]) -> Path:
    """Save on every rank (collective); mark complete once all ranks are done; prune old tags."""
    stage_dir = Path(stage_dir)
    tag = tag_name(step)
    path = stage_dir / tag
    if _rank() == 0 and path.exists():  # a leftover of an interrupted save of the same step
        shutil.rmtree(path)
    _barrier()
    engine.save_checkpoint(str(stage_dir), tag=tag, client_state=client_state, save_latest=False)
    path.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path / f"rank_{_rank():05d}.json", rank_state)
    _barrier()
    if _rank() == 0:
        failpoint("checkpoint.before_marker", tag)
        _write_json_atomic(path / MARKER, {"step": step, "world_size": _world(), "client_state": client_state,
                                           "param_shapes": shapes})
        prune(stage_dir, keep)
    _barrier()
    return path


def prune(stage_dir: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` complete tags, and incomplete tags older than the newest complete."""
    tags = complete_tags(stage_dir)
    if not tags:
        return
    newest = _step_of(tags[-1].name)
    for p in tags[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(stage_dir).iterdir():
        if p.is_dir() and p.name.startswith("step_") and not (p / MARKER).exists() and _step_of(p.name) < newest:
            shutil.rmtree(p, ignore_errors=True)


def check_compatible(tag_dir: Path, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Read the ``complete`` marker and fail clearly when the checkpoint is not for this model / world size."""
    meta = json.loads((tag_dir / MARKER).read_text())
    if meta["world_size"] != _world():
        raise CheckpointError(f"checkpoint {tag_dir} was written by {meta['world_size']} ranks, this run has "
                              f"{_world()}; resume with the same world size (or start a new run_dir)")
    saved = meta["param_shapes"]
    missing = sorted(set(shapes) - set(saved))
    extra = sorted(set(saved) - set(shapes))
    diff = [f"{n}: checkpoint {saved[n]} vs model {shapes[n]}" for n in shapes if n in saved and saved[n] != shapes[n]]
    if missing or extra or diff:
        parts = []
        if diff:
            parts.append("shape mismatch " + "; ".join(diff[:5]) + (" ..." if len(diff) > 5 else ""))
        if missing:
            parts.append(f"parameters not in the checkpoint: {missing[:5]}")
        if extra:
            parts.append(f"parameters only in the checkpoint: {extra[:5]}")
        raise CheckpointError(f"checkpoint {tag_dir} is of another model shape than model.name/overrides give: "
                              + "; ".join(parts))
    return meta


def load(engine: Any, tag_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a complete checkpoint into the engine (collective); return (client_state, this rank's state)."""
    rank_file = tag_dir / f"rank_{_rank():05d}.json"
    if not rank_file.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} has no state for rank {_rank()} ({rank_file.name})")
    load_path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
    return client_state or {}, json.loads(rank_file.read_text())


class CheckpointManager:
    """Saves and restores one stage's stateful parts in that stage's checkpoint directory.

    ``client``: the state every rank shares (saved as DeepSpeed's ``client_state`` and in the marker).
    ``per_rank``: name -> object, saved as ``rank_N.json`` ``{name: state}``. ``shapes``: the model's full
    parameter shapes, written into the marker and compared on resume (:func:`check_compatible`).
    """

    def __init__(self, stage_dir: str | Path, keep: int, shapes: dict[str, list[int]], client: Stateful,
                 per_rank: dict[str, Stateful]):
        self.stage_dir, self.keep, self.shapes = Path(stage_dir), keep, shapes
        self.client, self.per_rank = client, per_rank

    def latest(self) -> Path | None:
        """The newest complete checkpoint of the stage, or None."""
        return latest_complete(self.stage_dir)

    def check(self, tag_dir: Path) -> dict[str, Any]:
        """Fail clearly (before DeepSpeed loads anything) when ``tag_dir`` is not for this model / world size."""
        return check_compatible(tag_dir, self.shapes)

    def save(self, engine: Any, step: int) -> Path:
        """Save every part at ``step`` (collective; see :func:`save`)."""
        return save(engine, self.stage_dir, step, self.client.state_dict(),
                    {name: obj.state_dict() for name, obj in self.per_rank.items()}, self.keep, self.shapes)

    def load(self, engine: Any, tag_dir: Path) -> None:
        """Load ``tag_dir`` into the engine (collective) and every part, in the order they were given."""
        client, mine = load(engine, tag_dir)
        self.client.load_state_dict(client)
        for name, obj in self.per_rank.items():
            if name not in mine:
                raise CheckpointError(f"checkpoint {tag_dir} has no {name!r} state for rank {_rank()}")
            obj.load_state_dict(mine[name])
