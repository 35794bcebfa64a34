"""The vocabulary of a model: which sensor and processing-level names it embeds, at which index.

One name-to-index map for the whole project. A model holds its :class:`Vocabulary` (``model.vocab``,
``encoder.vocab``); the export writes it (``model_args.json``: ``sensor_vocab``, ``level_vocab``); a
checkpoint records it; the data loader is handed it and writes batch indices with it; the finetuning API
maps user-given names with it. The registry only supplies the *initial* vocabulary of a fresh run
(:meth:`Vocabulary.from_registry`): after that the run's vocabulary travels with its weights, so adding
or renaming a sensor YAML never re-maps an existing run's indices (an added sensor is appended at the end
when a new stage starts, see :meth:`Vocabulary.extended`).

Guarantees:

- Index 0 of both lists is ``"unknown"`` (sensor-name dropout, unseen names); names are unique.
- Indices only ever grow: :meth:`extended` appends, never reorders.
- Matching (:meth:`lookup`): the exact name, else case-insensitively ("EMIT" is "emit"), else, for levels,
  the product-level family ("L2A", "l2b" are "L2"; "L1B", "L1C" are "L1"). An unseen name or None is 0.
- Plain data (two tuples of strings): picklable for loader worker processes, JSON for exports/checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .args import ModelError

UNKNOWN = "unknown"


def _match(name: str, names: Sequence[str], family: bool) -> str | None:
    if name in names:
        return name
    low = {v.lower(): v for v in names}
    key = str(name).strip().lower()
    if key in low:
        return low[key]
    if family and len(key) >= 3 and key[0] == "l" and key[1].isdigit() and key[2:].isalpha() and key[:2] in low:
        return low[key[:2]]
    return None


@dataclass(frozen=True)
class Vocabulary:
    """Sensor and level names in index order (index 0 ``unknown``)."""

    sensors: tuple[str, ...]
    levels: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "sensors", tuple(str(s) for s in self.sensors))
        object.__setattr__(self, "levels", tuple(str(s) for s in self.levels))
        for what, names in (("sensor", self.sensors), ("level", self.levels)):
            if not names or names[0] != UNKNOWN:
                raise ModelError(f"{what} vocabulary must start with {UNKNOWN!r} (index 0), got {list(names)[:3]}")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ModelError(f"{what} vocabulary names must be unique; repeated: {dup}")

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_registry(cls) -> Vocabulary:
        """The initial vocabulary of a fresh run: ``unknown``, the registry's sensors sorted; the levels."""
        from data_prep.registry import LEVELS, sensor_vocab

        return cls(tuple(sensor_vocab()), tuple(LEVELS))

    @classmethod
    def from_json(cls, meta: Mapping[str, Any], source: str = "vocabulary") -> Vocabulary:
        """From the ``sensor_vocab`` / ``level_vocab`` fields of an export's or a checkpoint's JSON."""
        missing = [k for k in ("sensor_vocab", "level_vocab") if not isinstance(meta.get(k), list)]
        if missing:
            raise ModelError(f"{source}: field(s) {missing} missing or not a list of names")
        return cls(tuple(meta["sensor_vocab"]), tuple(meta["level_vocab"]))

    def to_json(self) -> dict[str, list[str]]:
        return {"sensor_vocab": list(self.sensors), "level_vocab": list(self.levels)}

    def extended(self, sensors: Iterable[str]) -> Vocabulary:
        """This vocabulary with the given sensor names that it lacks appended (existing indices kept)."""
        new = [s for s in dict.fromkeys(sensors) if s not in self.sensors]
        return self if not new else Vocabulary((*self.sensors, *new), self.levels)

    # ---------------------------------------------------------------------------------------- lookups
    def lookup(self, name: str | None, kind: str = "sensor") -> int | None:
        """Index of ``name`` (matched as the module docstring says); None when the vocabulary lacks it."""
        if name is None:
            return None
        names = self.sensors if kind == "sensor" else self.levels
        m = _match(name, names, family=kind == "level")
        return None if m is None else names.index(m)

    def sensor_index(self, name: str | None) -> int:
        """Index of a sensor name; None or an unseen name gives 0 (unknown)."""
        return self.lookup(name, "sensor") or 0

    def level_index(self, name: str | None) -> int:
        """Index of a processing level; None or an unseen level gives 0 (unknown)."""
        return self.lookup(name, "level") or 0
