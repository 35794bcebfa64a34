"""The sensor registry: one YAML file per sensor under ``configs/sensors/``.

Adding a sensor is a YAML file, no code. Every part of specfm that needs to know a sensor's
bands, levels, nodata or clipping reads them from here.

A fresh run's vocabulary (``pretrain.models.vocab.Vocabulary.from_registry``) comes from the registry:
index 0 is always ``"unknown"`` (sensor-name dropout, unseen sensors), then the registry's sensor names in
sorted order; levels are ``("unknown", "L1", "L2")``. After that the vocabulary travels with the model
(checkpoint, export), so editing the registry never re-maps an existing run's indices.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from data_prep.errors import UserError
from data_prep.spectral import good_band_mask

#: Where the shipped sensor YAMLs live. ``SPECFM_SENSORS`` overrides it (a folder of YAMLs).
DEFAULT_SENSOR_DIR = Path(__file__).resolve().parent.parent / "configs" / "sensors"

UNKNOWN = "unknown"
LEVELS: tuple[str, ...] = (UNKNOWN, "L1", "L2")
WAVELENGTH_RANGE_NM = (350.0, 2550.0)


class RegistryError(UserError):
    """A sensor YAML is malformed or a sensor/level is not in the registry."""


@dataclass(frozen=True)
class LevelSpec:
    """One processing level of a sensor."""

    name: str
    """``L1`` (at-sensor radiance) or ``L2`` (surface reflectance)."""
    quantity: str
    """``radiance`` or ``reflectance``."""
    units: str
    """Physical units after the reader has applied scale and offset."""
    scale_factor: float
    """Stored integer value x scale_factor = physical value (1.0 for float products)."""
    nodata: float
    """The product's fill value, as stored in the file."""
    clip: tuple[float, float]
    """Physical values are clipped to [lo, hi] at ingest."""


@dataclass(frozen=True)
class Sensor:
    """A sensor's registry entry."""

    name: str
    display_name: str
    kind: str
    format: str
    gsd_m: float
    levels: dict[str, LevelSpec]
    wavelengths_nm: np.ndarray
    fwhm_nm: np.ndarray
    bad_band_ranges_nm: tuple[tuple[float, float], ...]
    platform: str = ""
    source_file: str = field(default="", compare=False)

    @property
    def n_bands(self) -> int:
        return int(self.wavelengths_nm.shape[0])

    def level(self, level: str) -> LevelSpec:
        try:
            return self.levels[level]
        except KeyError:
            raise RegistryError(
                f"sensor {self.name!r} has no level {level!r}; it has {sorted(self.levels)}"
            ) from None

    def good_band_mask(self, wavelengths_nm: np.ndarray | None = None, flags=None) -> np.ndarray:
        """True for bands outside every bad-band range (of the given centres, else the registry's) and where the
        product's own ``flags`` (if any) are set: :func:`data_prep.spectral.good_band_mask`."""
        return good_band_mask(self.wavelengths_nm if wavelengths_nm is None else wavelengths_nm,
                              self.bad_band_ranges_nm, flags)


# libyaml's loader when present: the band tables (hundreds of floats per sensor) parse ~10x faster.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse(path: Path) -> Sensor:
    try:
        doc = yaml.load(path.read_text(), Loader=_YAML_LOADER)
    except yaml.YAMLError as e:
        raise RegistryError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise RegistryError(f"{path}: expected a mapping at the top level")
    required = ("name", "display_name", "kind", "format", "gsd_m", "levels", "wavelengths_nm", "fwhm_nm")
    missing = [k for k in required if k not in doc]
    if missing:
        raise RegistryError(f"{path}: missing field(s) {missing}")
    wl = np.asarray(doc["wavelengths_nm"], dtype=np.float64)
    fw = np.asarray(doc["fwhm_nm"], dtype=np.float64)
    if wl.ndim != 1 or wl.shape != fw.shape or wl.size == 0:
        raise RegistryError(f"{path}: wavelengths_nm ({wl.size}) and fwhm_nm ({fw.size}) must be equal, non-empty lists")
    lo, hi = WAVELENGTH_RANGE_NM
    if wl.min() < lo or wl.max() > hi:
        raise RegistryError(f"{path}: wavelengths_nm must lie in {lo}-{hi} nm, got {wl.min()}-{wl.max()}")
    if (fw <= 0).any():
        raise RegistryError(f"{path}: fwhm_nm must be positive")
    levels = {}
    for lname, spec in doc["levels"].items():
        if lname not in LEVELS[1:]:
            raise RegistryError(f"{path}: level {lname!r} is not one of {LEVELS[1:]}")
        try:
            levels[lname] = LevelSpec(
                name=lname,
                quantity=str(spec["quantity"]),
                units=str(spec["units"]),
                scale_factor=float(spec["scale_factor"]),
                nodata=float(spec["nodata"]),
                clip=(float(spec["clip"][0]), float(spec["clip"][1])),
            )
        except (KeyError, TypeError, IndexError) as e:
            raise RegistryError(f"{path}: level {lname!r} needs quantity, units, scale_factor, nodata, clip: {e}") from e
    return Sensor(
        name=str(doc["name"]),
        display_name=str(doc["display_name"]),
        kind=str(doc["kind"]),
        format=str(doc["format"]),
        gsd_m=float(doc["gsd_m"]),
        levels=levels,
        wavelengths_nm=wl,
        fwhm_nm=fw,
        bad_band_ranges_nm=tuple((float(a), float(b)) for a, b in doc.get("bad_band_ranges_nm") or []),
        platform=str(doc.get("platform", "")),
        source_file=str(path),
    )


@functools.cache
def load_registry(sensor_dir: str | None = None) -> dict[str, Sensor]:
    """All sensors, keyed by name. ``sensor_dir`` defaults to ``$SPECFM_SENSORS`` or the shipped folder."""
    folder = Path(sensor_dir or os.environ.get("SPECFM_SENSORS") or DEFAULT_SENSOR_DIR)
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise RegistryError(f"no sensor YAML files in {folder}")
    sensors: dict[str, Sensor] = {}
    for f in files:
        s = _parse(f)
        if s.name in sensors:
            raise RegistryError(f"{f}: sensor name {s.name!r} already defined in {sensors[s.name].source_file}")
        sensors[s.name] = s
    return sensors


def get_sensor(name: str) -> Sensor:
    """The registry entry for ``name``, or a RegistryError that lists the known sensors."""
    reg = load_registry()
    try:
        return reg[name]
    except KeyError:
        raise RegistryError(f"unknown sensor {name!r}; the registry has {sorted(reg)}") from None


def sensor_vocab() -> tuple[str, ...]:
    """Index 0 is ``unknown``; then the registry's sensor names, sorted."""
    return (UNKNOWN, *sorted(load_registry()))
