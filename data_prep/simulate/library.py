"""Surface reflectance spectra from the real ECOSTRESS spectral library (ENVI, read with ``spectral``).

The library file has no ``spectra names`` in its header, so each spectrum is named by the class its
spectral features put it in and its line index in the library (e.g. ``vegetation_0012``). Its
wavelengths come from overlapping spectrometer segments (not monotonic) and reach into the thermal
infrared: :func:`load_library` sorts them, drops duplicates, keeps 350-2550 nm and interpolates every
spectrum onto the simulator's 1 nm grid :data:`GRID_NM`.

Materials are split once, independently of any corpus seed, into a pretraining set and a held-out
evaluation set (:func:`split_materials`): near-duplicate spectra (spectral angle under
:data:`DUPLICATE_ANGLE` rad, chained) form one group and a group lies wholly on one side, and every class
keeps about :data:`HELDOUT_FRACTION` of its groups for evaluation. On the real library: 1941 usable spectra
in 1484 groups; 1418 for pretraining and 523 held out (every class on both
sides); no held-out spectrum lies within 0.02 rad of a pretraining one (median nearest: 0.03 rad).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.errors import UserError

#: The simulator's fine spectral grid: 350-2550 nm at 1 nm.
GRID_NM: np.ndarray = np.arange(350.0, 2551.0, 1.0)

LIBRARY_NAME = "ecostress_library_with_mixtures.hdr"


def default_library() -> Path:
    """``$SPECFM_REAL_DATA/<library>`` if set, else ``<repo>/../shared/data/real/<library>``."""
    real = os.environ.get("SPECFM_REAL_DATA")
    if real:
        return Path(real) / LIBRARY_NAME
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "real" / LIBRARY_NAME

#: Material classes in label order of preference; every class the library allows is used.
CLASSES: tuple[str, ...] = (
    "vegetation", "dry-vegetation", "soil", "rock-mineral", "man-made", "water", "snow-ice",
)


class LibraryError(UserError):
    """The spectral library is missing or malformed."""


@dataclass(frozen=True)
class SpectralLibrary:
    """Spectra on :data:`GRID_NM` with their class and library index."""

    spectra: np.ndarray
    """float64 (n, len(GRID_NM)) reflectance."""
    classes: tuple[str, ...]
    """Class of each spectrum (one of :data:`CLASSES`)."""
    index: np.ndarray
    """Line index of each spectrum in the library file."""
    source_wavelengths_nm: np.ndarray
    """The library's wavelengths after sorting, de-duplication and the 350-2550 nm cut."""

    def name(self, i: int) -> str:
        return f"{self.classes[i]}_{int(self.index[i]):04d}"


def clean_wavelengths(wavelengths: np.ndarray, spectra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort the wavelengths, drop duplicates and keep 350-2550 nm; reorder ``spectra`` (n, bands) alike."""
    wl = np.asarray(wavelengths, dtype=np.float64)
    order = np.argsort(wl, kind="stable")
    wl, sp = wl[order], np.asarray(spectra, dtype=np.float64)[:, order]
    keep = np.concatenate([[True], np.diff(wl) > 0])
    wl, sp = wl[keep], sp[:, keep]
    inside = (wl >= 350.0) & (wl <= 2550.0)
    return wl[inside], sp[:, inside]


def to_grid(wavelengths: np.ndarray, spectra: np.ndarray, grid: np.ndarray = GRID_NM) -> np.ndarray:
    """Linear interpolation of (n, bands) spectra onto ``grid`` (constant beyond the ends)."""
    return np.stack([np.interp(grid, wavelengths, s) for s in spectra])


def _band(spectra: np.ndarray, nm: float) -> np.ndarray:
    return spectra[:, int(round(nm - GRID_NM[0]))]


def _depth(spectra: np.ndarray, centre: float, left: float, right: float) -> np.ndarray:
    """Continuum-removed absorption depth at ``centre`` with a straight continuum between the shoulders."""
    lo, hi = _band(spectra, left), _band(spectra, right)
    cont = lo + (hi - lo) * (centre - left) / (right - left)
    return 1.0 - _band(spectra, centre) / np.maximum(cont, 1e-6)


def classify(spectra: np.ndarray) -> np.ndarray:
    """Class index into :data:`CLASSES` for each (n, grid) spectrum, from its spectral features.

    The library's water spectra are lab measurements: dark (mean < 0.06, not near zero), flat and
    falling slowly with wavelength like a Fresnel reflection. Snow/ice: bright visible, dark SWIR. Vegetation: NDVI > 0.5
    with a bright NIR plateau. Dry vegetation: weaker NDVI (0.15-0.5) or a cellulose/lignin feature at
    2100 nm. Rock/mineral: an Al-OH (2200 nm), carbonate/Mg-OH (2330 nm) or ferric (900 nm) absorption.
    Man-made: spectrally flat (coefficient of variation < 0.12) or very dark without water's shape.
    Soil: what remains (bright-ish, rising through the visible, no strong features).
    """
    r560, r670, r860 = _band(spectra, 560), _band(spectra, 670), _band(spectra, 860)
    r1650 = _band(spectra, 1650)
    ndvi = (r860 - r670) / np.maximum(r860 + r670, 1e-6)
    sl = slice(int(450 - GRID_NM[0]), int(2400 - GRID_NM[0]))
    alb = spectra[:, sl].mean(axis=1)
    cv = spectra[:, sl].std(axis=1) / np.maximum(alb, 1e-6)
    d2200 = _depth(spectra, 2205, 2120, 2280)
    d2330 = _depth(spectra, 2335, 2270, 2390)
    d900 = _depth(spectra, 900, 750, 1300)
    d2100 = _depth(spectra, 2100, 2030, 2210)
    cls = np.full(spectra.shape[0], CLASSES.index("soil"), dtype=np.int64)
    mineral = (d2200 > 0.12) | (d2330 > 0.12) | (d900 > 0.12)
    cls[mineral] = CLASSES.index("rock-mineral")
    manmade = ~mineral & ((cv < 0.12) | (alb < 0.08))
    cls[manmade] = CLASSES.index("man-made")
    dry = (ndvi > 0.15) & (ndvi <= 0.5) | ((d2100 > 0.08) & (ndvi > 0.05))
    cls[dry] = CLASSES.index("dry-vegetation")
    cls[(ndvi > 0.5) & (r860 > 0.2)] = CLASSES.index("vegetation")
    r500, r2200 = _band(spectra, 500), _band(spectra, 2200)
    water = (alb > 0.008) & (alb < 0.06) & (r860 < 0.06) & (r500 > 1.2 * r2200) & (ndvi < 0.1)
    cls[water] = CLASSES.index("water")
    cls[(r560 > 0.5) & (r1650 < 0.25 * r560)] = CLASSES.index("snow-ice")
    return cls


@functools.cache
def _load_cached(path: str) -> SpectralLibrary:
    import spectral

    p = Path(path)
    if not p.exists():
        raise LibraryError(f"{p}: spectral library not found (expected the ECOSTRESS ENVI library .hdr)")
    try:
        img = spectral.open_image(str(p))
        data = np.asarray(img.load(), dtype=np.float64)
    except Exception as e:  # spectral raises several types for malformed headers/data
        raise LibraryError(f"{p}: cannot read as an ENVI spectral library: {e}") from e
    wl = np.asarray(img.bands.centers if img.bands.centers is not None else [], dtype=np.float64)
    if wl.size != data.shape[-1]:
        raise LibraryError(f"{p}: field 'wavelength' has {wl.size} values for {data.shape[-1]} bands")
    spectra = data.reshape(-1, data.shape[-1])
    wl, spectra = clean_wavelengths(wl, spectra)
    if wl.size < 10:
        raise LibraryError(f"{p}: field 'wavelength' has fewer than 10 values inside 350-2550 nm")
    finite = np.isfinite(spectra).all(axis=1)
    grid = to_grid(wl, spectra[finite])
    cls = classify(grid)
    return SpectralLibrary(
        spectra=grid,
        classes=tuple(CLASSES[c] for c in cls),
        index=np.flatnonzero(finite),
        source_wavelengths_nm=wl,
    )


def load_library(path: str | Path | None = None) -> SpectralLibrary:
    """The real ECOSTRESS library on :data:`GRID_NM`, classified (cached per path)."""
    return _load_cached(str(Path(path) if path else default_library()))


def _sam(a: np.ndarray, b: np.ndarray) -> float:
    c = float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12)
    return float(np.arccos(np.clip(c, -1.0, 1.0)))


#: Spectra closer than this spectral angle (radians, chained) count as one material for the split.
DUPLICATE_ANGLE = 0.02
#: Fraction of each class's material groups held out for evaluation.
HELDOUT_FRACTION = 0.25
#: The split's own seed: every corpus, whatever its seed, holds out the same materials.
SPLIT_SEED = 20251
SUBSETS = ("pretrain", "heldout", "all")


def usable(lib: SpectralLibrary) -> np.ndarray:
    """Bool mask of physically plausible spectra (within -0.02..1.05 on the grid, mean over 0.008)."""
    return ((lib.spectra.min(axis=1) > -0.02) & (lib.spectra.max(axis=1) < 1.05)
            & (lib.spectra.mean(axis=1) > 0.008))


def duplicate_groups(spectra: np.ndarray, angle: float = DUPLICATE_ANGLE) -> np.ndarray:
    """Group id of each (n, grid) spectrum: connected components of the 'spectral angle < angle' graph."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    s = spectra[:, ::5]
    u = s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    close = np.arccos(np.clip(u @ u.T, -1.0, 1.0)) < angle
    return connected_components(csr_matrix(close), directed=False)[1]


_SPLITS: dict[tuple[int, float], tuple[SpectralLibrary, dict[str, list[int]]]] = {}


def _split(lib: SpectralLibrary, heldout_fraction: float) -> dict[str, list[int]]:
    hit = _SPLITS.get((id(lib), heldout_fraction))
    if hit is not None and hit[0] is lib:
        return hit[1]
    ok = np.flatnonzero(usable(lib))
    groups = duplicate_groups(lib.spectra[ok])
    classes = np.array([CLASSES.index(lib.classes[i]) for i in ok])
    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_SEED, int(round(heldout_fraction * 1e6))]))
    held: list[int] = []
    # a group's class is its most common member class; groups are held out per class, in a seeded order
    gclass = {int(g): int(np.bincount(classes[groups == g]).argmax()) for g in np.unique(groups)}
    for c in range(len(CLASSES)):
        gs = np.array(sorted(g for g, k in gclass.items() if k == c), dtype=np.int64)
        if gs.size < 2:
            continue  # a class with a single material group stays in pretraining
        k = max(1, int(round(heldout_fraction * gs.size)))
        held.extend(rng.permutation(gs)[:k].tolist())
    is_held = np.isin(groups, held)
    order = {"pretrain": ok[~is_held], "heldout": ok[is_held], "all": ok}
    out = {k: sorted((int(i) for i in v), key=lambda i: (CLASSES.index(lib.classes[i]), i)) for k, v in order.items()}
    _SPLITS[(id(lib), heldout_fraction)] = (lib, out)
    return out


def split_materials(lib: SpectralLibrary, subset: str = "pretrain", *,
                    heldout_fraction: float = HELDOUT_FRACTION) -> list[int]:
    """Library indices of the usable materials of ``subset`` ("pretrain", "heldout" or "all"), by class
    (in :data:`CLASSES` order) then library order; the position in the returned list is the label.

    The split depends only on the library and ``heldout_fraction`` (never on a corpus seed)."""
    if subset not in SUBSETS:
        raise LibraryError(f"material subset {subset!r}: expected one of {SUBSETS}")
    if not 0.0 < heldout_fraction < 1.0:
        raise LibraryError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    return list(_split(lib, float(heldout_fraction))[subset])


def select_materials(lib: SpectralLibrary, per_class: int = 3, seed: int = 0,
                     min_angle: float = 0.05) -> list[int]:
    """Pick up to ``per_class`` distinct spectra (spectral angle >= ``min_angle`` rad) of every class.

    Spectra with unphysical values (outside -0.02..1.05 on the grid, or a mean under 0.008) are skipped. Order: by class
    (in :data:`CLASSES` order), then as drawn; the position in the returned list is the label.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EC7]))
    ok = ((lib.spectra.min(axis=1) > -0.02) & (lib.spectra.max(axis=1) < 1.05)
          & (lib.spectra.mean(axis=1) > 0.008))
    chosen: list[int] = []
    for cname in CLASSES:
        members = [i for i in np.flatnonzero(ok) if lib.classes[i] == cname]
        picked: list[int] = []
        for i in rng.permutation(members):
            if all(_sam(lib.spectra[i], lib.spectra[j]) >= min_angle for j in chosen + picked):
                picked.append(int(i))
            if len(picked) == per_class:
                break
        chosen.extend(picked)
    return chosen
