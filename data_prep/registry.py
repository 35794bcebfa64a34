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
#: a band's FWHM must lie in this range (nm); below it the widths are almost surely micrometres
FWHM_RANGE_NM = (0.5, 500.0)
MICROMETRE_UNITS = frozenset({"micrometers", "micrometer", "micrometres", "micrometre", "microns", "micron", "um",
                              "µm", "μm"})
NANOMETRE_UNITS = frozenset({"nanometers", "nanometer", "nanometres", "nanometre", "nm"})
#: a step back between adjacent centres at a declared spectrometer start may be at most this (nm)
MAX_OVERLAP_NM = 100.0


class RegistryError(UserError):
    """A sensor YAML is malformed or a sensor/level is not in the registry."""


def _fail(error, path, field: str, msg: str) -> Exception:
    return error(f"{path}: field {field}: {msg}")


def check_band_table(path, centres, widths=None, *, field: str = "wavelength", width_field: str = "fwhm",
                     units: str | None = None, units_field: str = "wavelength units", n_bands: int | None = None,
                     hyperspectral: bool = True, error: type[Exception] = UserError
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """A band table checked and in nanometres: ``(centres_nm, widths_nm or None)``.

    The one implementation of the spectral-metadata checks (sensor YAMLs and every product reader use it); each
    failure is ``error("<path>: field <field>: ...")``:

    - one finite centre per band (``n_bands``: the file's band count) and, when given, one width per centre;
    - units: ``units`` naming micrometres converts centres and widths x 1000; nanometres must look like
      nanometres (a maximum centre under 100 is micrometres mislabelled: an error); no units (or "unknown"):
      micrometres when the largest centre is under 100, else nanometres; any other unit is an error;
    - hyperspectral centres within :data:`WAVELENGTH_RANGE_NM` (the reflective range);
    - no duplicated centre;
    - widths finite and within :data:`FWHM_RANGE_NM` (narrower than 0.5 nm is micrometres next to nm centres).

    The order of the centres is checked separately by :func:`check_band_order` once the sensor is known.
    """
    wl = np.asarray(centres, dtype=np.float64).ravel()
    if wl.size == 0:
        raise _fail(error, path, field, "no band centres; expected one per band")
    if n_bands is not None and wl.size != n_bands:
        raise _fail(error, path, field, f"{wl.size} centres for {n_bands} bands (the file's band count); expected "
                                        "one centre per band")
    fw = None if widths is None else np.asarray(widths, dtype=np.float64).ravel()
    if fw is not None and fw.size != wl.size:
        raise _fail(error, path, width_field, f"{fw.size} widths for {wl.size} band centres; expected one per band")
    bad = ~np.isfinite(wl)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _fail(error, path, field, f"band {i} centre is {float(wl[i])!r}; expected a finite wavelength")
    u = (units or "").strip().strip('"').strip().lower()
    u = "" if u in ("unknown", "none") else u
    if u in MICROMETRE_UNITS:
        factor = 1000.0
    elif u in NANOMETRE_UNITS:
        if wl.max() < 100.0:
            raise _fail(error, path, units_field, f"says {units!r} but the centres span {wl.min():g}-{wl.max():g} "
                                                  "(micrometres?); fix the units or the values")
        factor = 1.0
    elif u == "":
        factor = 1000.0 if wl.max() < 100.0 else 1.0
    else:
        raise _fail(error, path, units_field, f"{units!r}; expected nanometers or micrometers")
    wl = wl * factor
    lo, hi = WAVELENGTH_RANGE_NM
    if hyperspectral and (wl.min() < lo or wl.max() > hi):
        raise _fail(error, path, field, f"centres span {wl.min():.2f}-{wl.max():.2f} nm; expected within "
                                        f"{lo:g}-{hi:g} nm (reflective range of an imaging spectrometer)")
    if np.unique(wl).size != wl.size:
        order = np.argsort(wl, kind="stable")
        k = int(np.flatnonzero(np.diff(wl[order]) == 0)[0])
        i, j = sorted((int(order[k]), int(order[k + 1])))
        raise _fail(error, path, field, f"bands {i} and {j} have the same centre {wl[i]:g} nm; expected each band "
                                        "at its own wavelength (duplicated centre)")
    if fw is not None:
        fw = fw * factor
        flo, fhi = FWHM_RANGE_NM
        ok = np.isfinite(fw) & (fw >= flo) & (fw <= fhi)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            hint = " (micrometres next to nm centres?)" if np.isfinite(fw[i]) and 0 < fw[i] < flo else ""
            raise _fail(error, path, width_field, f"band {i} width is {float(fw[i])!r} nm; expected a finite FWHM in "
                                                  f"{flo:g}-{fhi:g} nm{hint}")
    return wl, fw


def check_band_order(path, wl: np.ndarray, spectrometer_starts=(), *, field: str = "wavelength",
                     what: str = "", error: type[Exception] = UserError) -> None:
    """Centres strictly increasing, except that a spectrometer's first band (an index in ``spectrometer_starts``)
    may step back by up to :data:`MAX_OVERLAP_NM` (the VNIR/SWIR overlaps of AVIRIS-Classic)."""
    wl = np.asarray(wl, dtype=np.float64)
    starts = {int(i) for i in spectrometer_starts or ()}
    d = np.diff(wl)
    for i in np.flatnonzero(d <= 0):
        if int(i) + 1 in starts and -MAX_OVERLAP_NM < d[i] < 0:
            continue
        where = (f"; {what} declares spectrometer starts at bands {sorted(starts)}" if starts else
                 f"; {what} has no spectrometer overlap" if what else "")
        raise _fail(error, path, field, f"centres not strictly increasing at band {i + 1} ({wl[i]:.3f} -> "
                                        f"{wl[i + 1]:.3f} nm){where}; expected ascending band centres")


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
    spectrometer_starts: tuple[int, ...] = ()
    """0-based band indices where a new spectrometer begins and the centres may step back (AVIRIS-Classic)."""
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
    try:
        wl = np.asarray(doc["wavelengths_nm"], dtype=np.float64)
        fw = np.asarray(doc["fwhm_nm"], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise RegistryError(f"{path}: field wavelengths_nm/fwhm_nm: not lists of numbers: {e}") from None
    if wl.ndim != 1 or fw.ndim != 1:
        raise RegistryError(f"{path}: field wavelengths_nm/fwhm_nm: expected flat lists of numbers")
    kind = str(doc["kind"])
    wl, fw = check_band_table(path, wl, fw, field="wavelengths_nm", width_field="fwhm_nm", units="nm",
                              units_field="wavelengths_nm", hyperspectral=True, error=RegistryError)
    starts = doc.get("spectrometer_starts") or []
    if not isinstance(starts, list) or not all(isinstance(i, int) and 0 < i < wl.size for i in starts):
        raise RegistryError(f"{path}: field spectrometer_starts: {starts!r}; expected a list of band indices in "
                            f"1..{wl.size - 1} (0-based first band of each further spectrometer)")
    check_band_order(path, wl, starts, field="wavelengths_nm", what="the YAML", error=RegistryError)
    try:
        gsd = float(doc["gsd_m"])
    except (TypeError, ValueError):
        gsd = float("nan")
    if not np.isfinite(gsd) or gsd <= 0:
        raise RegistryError(f"{path}: field gsd_m: {doc['gsd_m']!r}; expected a positive number of metres")
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
        kind=kind,
        format=str(doc["format"]),
        gsd_m=gsd,
        levels=levels,
        wavelengths_nm=wl,
        fwhm_nm=fw,
        bad_band_ranges_nm=tuple((float(a), float(b)) for a, b in doc.get("bad_band_ranges_nm") or []),
        platform=str(doc.get("platform", "")),
        spectrometer_starts=tuple(int(i) for i in starts),
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
