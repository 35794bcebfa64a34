"""What a reader gives the ingest: one granule (a product file or file set) of one sensor and level.

Readers open lazily: constructing a :class:`Granule` reads headers and metadata only, and
:meth:`Granule.read_rows` reads a block of lines, so a flightline of several GB is tiled a
row-block at a time without ever being held whole in memory.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from data_prep.errors import UserError


class ProductError(UserError):
    """A product file is malformed, truncated or inconsistent. The message names the file and field."""


@dataclass
class Granule:
    """A product opened by a reader.

    ``read_rows(r0, r1)`` returns ``(cube, valid)``: ``cube`` float32 ``(bands, r1 - r0, cols)`` in
    physical units (radiance in uW cm-2 sr-1 nm-1, or reflectance), scale and offset applied,
    nodata pixels set to NaN; ``valid`` bool ``(r1 - r0, cols)``, False where any good band is
    nodata, NaN or outside the product's coverage.
    """

    path: str
    """The product's primary file (what the user passed, or the file detection keyed on)."""
    granule_id: str
    """Stable identifier, unique within a sensor and level (ingest skips ids already committed)."""
    sensor: str
    """Registry name, e.g. ``aviris-ng``."""
    level: str
    """``L1`` or ``L2``."""
    shape: tuple[int, int, int]
    """(bands, rows, cols)."""
    wavelengths_nm: np.ndarray
    fwhm_nm: np.ndarray
    good_bands: np.ndarray
    """bool (bands,): False for bands in the registry's bad ranges or flagged bad by the product."""
    read_rows: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
    gsd_m: float
    acquisition_time: dt.datetime | None = None
    """UTC."""
    lat: np.ndarray | None = None
    """float64 (rows, cols) WGS-84 latitude of each pixel, or None where the product has none."""
    lon: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    """Reader-specific metadata worth keeping (e.g. the simulator's material-map path)."""

    @property
    def n_bands(self) -> int:
        return self.shape[0]

    @property
    def n_rows(self) -> int:
        return self.shape[1]

    @property
    def n_cols(self) -> int:
        return self.shape[2]
