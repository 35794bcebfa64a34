"""Settings of the co-located group loader (``data.colocated``; see :mod:`pretrain.data.colocated`).

Kept apart from the loader so that :mod:`pretrain.data.config` can type its ``colocated`` field without importing
the pipeline."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class ColocatedConfig:
    """Which views a co-located group holds (``/work/coord/COLOCATED.md``, section 3).

    index: URL of the location index written by ``python -m data_prep colocate ROOT`` (None =
        ``<folder of the first source>/locations.json``).
    global_sensors: the sensors whose views are fused into the global (target) view, in this order.
    local_views: how many single-sensor local (context) views each group holds.
    local_sensors: sensors a local view is drawn from (per batch and slot); None = ``global_sensors``.
    min_overlap: a location is used when its members' common footprint covers at least this fraction of its
        smallest member.
    footprint_m: side in metres of the common ground square every global view covers.
    local_frac: side of a local crop as a fraction of its sensor's global crop side.
    pixel_multiple: crop sides and local crop corners are multiples of this many pixels (the model's patch size).
    """

    global_sensors: list[str] = field(default_factory=list)
    index: str | None = None
    local_views: int = 2
    local_sensors: list[str] | None = None
    min_overlap: float = 0.5
    footprint_m: float = 960.0
    local_frac: float = 0.5
    pixel_multiple: int = 8

    def __post_init__(self) -> None:
        from .config import DataError  # here, not at import: config imports this module

        if not self.global_sensors or not all(isinstance(s, str) and s for s in self.global_sensors):
            raise DataError(f"data.colocated.global_sensors must list at least one sensor name, "
                            f"got {self.global_sensors!r}")
        if len(set(self.global_sensors)) != len(self.global_sensors):
            raise DataError(f"data.colocated.global_sensors lists a sensor twice: {self.global_sensors}")
        if self.local_sensors is not None and not self.local_sensors:
            raise DataError("data.colocated.local_sensors must be a non-empty list or null (= global_sensors)")
        if not isinstance(self.local_views, int) or self.local_views < 1:
            raise DataError(f"data.colocated.local_views must be an integer >= 1, got {self.local_views!r}")
        if not 0.0 < float(self.min_overlap) <= 1.0:
            raise DataError(f"data.colocated.min_overlap must be in (0, 1], got {self.min_overlap!r}")
        if not (math.isfinite(float(self.footprint_m)) and self.footprint_m > 0):
            raise DataError(f"data.colocated.footprint_m must be a positive number of metres, got {self.footprint_m!r}")
        if not 0.0 < float(self.local_frac) <= 1.0:
            raise DataError(f"data.colocated.local_frac must be in (0, 1], got {self.local_frac!r}")
        if not isinstance(self.pixel_multiple, int) or self.pixel_multiple < 1:
            raise DataError(f"data.colocated.pixel_multiple must be an integer >= 1, got {self.pixel_multiple!r}")

    @property
    def sensors(self) -> list[str]:
        """Every sensor a qualifying location must have: the global ones, then the local ones."""
        return list(dict.fromkeys([*self.global_sensors, *(self.local_sensors or [])]))

    @property
    def local(self) -> list[str]:
        return list(self.local_sensors or self.global_sensors)


@dataclass
class ColocatedPrepareConfig:
    """The demo's co-located data (``prepare.colocated``): simulated, ingested and indexed when missing.

    raw_dir / store_root: where the products and the stores (and ``locations.json``) go. sensors: registry names;
    levels: processing levels (multispectral sensors have L2 only); locations, extent_m, seed: passed to
    :func:`data_prep.simulate.colocated.simulate_colocated`. patch_m: ground side of a patch in metres (each
    sensor's patch side is ``patch_m / gsd`` pixels, rounded to a multiple of 8).
    """

    raw_dir: str = "data/demo/colocated_raw"
    store_root: str = "data/demo/colocated"
    sensors: list[str] = field(default_factory=lambda: ["enmap", "emit", "sentinel-2", "landsat-8-9-oli"])
    levels: list[str] = field(default_factory=lambda: ["L2"])
    locations: int = 4
    extent_m: float = 960.0
    patch_m: float = 960.0
    seed: int = 0
