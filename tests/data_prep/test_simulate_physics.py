"""Simulator physics on the real ECOSTRESS library: wavelengths, SRFs, radiance, scene structure."""

import numpy as np
import pytest

from data_prep.registry import get_sensor
from data_prep.simulate.atmosphere import Atmosphere, solar_irradiance
from data_prep.simulate.library import CLASSES, GRID_NM, clean_wavelengths, load_library, select_materials
from data_prep.simulate.render import raster_blocks, render_cube, sensor_model
from data_prep.simulate.scene import make_scene
from data_prep.simulate.srf import sensor_srf, srf_matrix


@pytest.fixture(scope="module")
def lib(real_data):
    return load_library(real_data / "ecostress_library_with_mixtures.hdr")


@pytest.fixture(scope="module")
def materials(lib):
    sel = select_materials(lib, seed=0)
    return lib.spectra[sel], [lib.classes[i] for i in sel]


def test_clean_wavelengths_sorts_dedups_and_cuts():
    wl = np.array([400.0, 500.0, 450.0, 450.0, 300.0, 12000.0, 2500.0])
    sp = np.arange(7.0)[None, :]
    w, s = clean_wavelengths(wl, sp)
    np.testing.assert_array_equal(w, [400.0, 450.0, 500.0, 2500.0])
    np.testing.assert_array_equal(s[0], [0.0, 2.0, 1.0, 6.0])  # first of the duplicates kept


def test_real_library_wavelengths_sorted_and_in_range(lib):
    w = lib.source_wavelengths_nm
    assert (np.diff(w) > 0).all()
    assert w[0] >= 350 and w[-1] <= 2550
    assert w[0] == pytest.approx(375.594, abs=1e-3) and w[-1] == pytest.approx(2495.336, abs=1e-3)
    assert lib.spectra.shape == (2041, GRID_NM.size) and np.isfinite(lib.spectra).all()
    # the library's non-monotonic overlap near 660 nm is resolved: the grid value lies between neighbours
    assert set(lib.classes) >= {"vegetation", "soil", "rock-mineral", "man-made", "water"}


def test_classes_match_spectral_features(lib, materials):
    spectra, classes = materials
    assert len(set(classes)) >= 5 and all(c in CLASSES for c in classes)
    band = {nm: int(nm - GRID_NM[0]) for nm in (560, 670, 860, 1650)}
    for s, c in zip(spectra, classes):
        ndvi = (s[band[860]] - s[band[670]]) / (s[band[860]] + s[band[670]])
        if c == "vegetation":
            assert ndvi > 0.5
        if c == "water":
            assert s.mean() < 0.06
        if c == "snow-ice":
            assert s[band[560]] > 4 * s[band[1650]]


def test_gaussian_srf_of_linear_spectrum_returns_linear_value():
    centres = np.array([500.0, 1000.0, 2000.0])
    for order in (2.0, 8.0):
        m = srf_matrix(centres, np.array([10.0, 30.0, 100.0]), order=order)
        np.testing.assert_allclose(m.sum(axis=1), 1.0)
        lin = 0.1 + 2e-4 * GRID_NM
        np.testing.assert_allclose(m @ lin, 0.1 + 2e-4 * centres, rtol=1e-9)
    # a narrow response samples a curved spectrum at its centre
    narrow = srf_matrix(centres, np.full(3, 1.0))
    curved = np.sin(GRID_NM / 300.0)
    np.testing.assert_allclose(narrow @ curved, np.sin(centres / 300.0), atol=1e-4)
    with pytest.raises(ValueError, match="fwhm"):
        srf_matrix(centres, np.array([1.0, 0.0, 1.0]))


def test_sensor_srf_shapes_and_resampled_library(lib):
    for name in ("aviris-ng", "desis", "sentinel-2"):
        s = get_sensor(name)
        m = sensor_srf(s)
        assert m.shape == (s.n_bands, GRID_NM.size)
        res = lib.spectra[:5] @ m.T
        assert res.shape == (5, s.n_bands)
        # each band lies within the range of the spectrum it averages
        assert (res <= lib.spectra[:5].max(axis=1, keepdims=True) + 1e-9).all()


def test_solar_irradiance_units():
    e0 = solar_irradiance()
    assert e0.max() == pytest.approx(190.0)  # 1.9e3 W m-2 um-1 = 190 uW cm-2 nm-1
    assert 450 <= GRID_NM[e0.argmax()] <= 520
    assert e0[int(2200 - GRID_NM[0])] < 0.1 * e0.max()


def _render(sensor, level, spectra, classes, *, seed=0, size=32, noise=True, texture=0.3):
    scene = make_scene(np.random.default_rng(seed), classes, texture=texture)
    model = sensor_model(get_sensor(sensor), level, spectra, Atmosphere())
    rng = np.random.default_rng(seed + 1) if noise else None
    cube, labels, valid = render_cube(model, raster_blocks(scene, len(classes), size, size), size, size, rng)
    return scene, cube, labels, valid


def test_l1_radiance_magnitude_and_absorption_dips(materials, real_data):
    import spectral

    spectra, classes = materials
    _, cube, _, valid = _render("aviris-ng", "L1", spectra, classes)
    wl = get_sensor("aviris-ng").wavelengths_nm
    mean = np.nanmean(cube[:, valid], axis=1)
    real = np.asarray(spectral.open_image(str(real_data / "ang20170323t202244_rdn_7000-7010.hdr")).load())
    real_mean = real.reshape(-1, 425).mean(axis=0)
    b = {nm: int(np.argmin(np.abs(wl - nm))) for nm in (627, 745, 760, 780, 865, 940, 1040, 1380, 1650, 1880)}
    # the real AVIRIS-NG cube gives the magnitude: 627 nm averages 5.4 uW cm-2 sr-1 nm-1
    assert 0.3 * real_mean[b[627]] < mean[b[627]] < 4 * real_mean[b[627]]
    assert 0.5 < np.nanmax(cube) < 80.0
    # water vapour and O2 dips against their shoulders
    assert mean[b[940]] < 0.7 * min(mean[b[865]], mean[b[1040]])
    assert mean[b[760]] < 0.6 * min(mean[b[745]], mean[b[780]])
    assert mean[b[1380]] < 0.02 * mean[b[1650]] and mean[b[1880]] < 0.05 * mean[b[1650]]


def test_pure_pixels_of_a_material_match_its_spectrum(materials):
    spectra, classes = materials
    scene, cube, labels, valid = _render("emit", "L2", spectra, classes, texture=0.0, size=48)
    res = spectra @ sensor_srf(get_sensor("emit")).T  # (K, bands)
    wl = get_sensor("emit").wavelengths_nm
    # atmospheric windows only: in the absorption wings L2 noise is (realistically) large
    good = (wl > 450) & (wl < 2350) & ~((wl > 1300) & (wl < 1500)) & ~((wl > 1750) & (wl < 2000))
    eff = next(raster_blocks(scene, len(classes), 48, 48, block_rows=48)).eff
    pure = (eff.max(axis=0) / eff.sum(axis=0) > 0.999) & valid
    checked = 0
    for k in np.unique(labels[pure]):
        px = cube[:, pure & (labels == k)][good].T  # (n, good bands)
        ref = res[k, good]
        scale = px @ ref / (ref @ ref)  # per-pixel shading
        assert (scale > 0.5).all() and (scale < 1.5).all()
        rms = np.sqrt(np.mean((px - scale[:, None] * ref) ** 2, axis=1))
        assert rms.max() < 0.01, k  # same spectrum up to shading and sensor noise
        checked += 1
    assert checked >= 3


def test_scene_has_regions_edges_mixtures_and_slanted_nodata(materials):
    spectra, classes = materials
    scene, cube, labels, valid = _render("aviris-3", "L2", spectra, classes, size=64)
    assert len(np.unique(labels[valid])) >= 3
    assert 0.6 < valid.mean() < 1.0
    assert np.isnan(cube[:, ~valid]).all() and np.isfinite(cube[:, valid]).all()
    # the swath edge is slanted: the first valid column moves along track
    first = np.array([np.argmax(r) if r.any() else -1 for r in valid])
    assert len(set(first.tolist())) > 1 or len({int(np.flatnonzero(r)[-1]) for r in valid if r.any()}) > 1
    eff = np.concatenate([b.eff for b in raster_blocks(scene, len(classes), 64, 64)], axis=1)
    frac = eff / eff.sum(axis=0)
    mixed = (frac.max(axis=0) < 0.9) & valid
    assert mixed.any()


def test_noise_follows_snr_and_seed(materials):
    spectra, classes = materials
    _, clean, _, valid = _render("enmap", "L1", spectra, classes, noise=False)
    _, noisy, _, _ = _render("enmap", "L1", spectra, classes, noise=True)
    _, noisy2, _, _ = _render("enmap", "L1", spectra, classes, noise=True)
    np.testing.assert_array_equal(noisy[:, valid], noisy2[:, valid])
    d = (noisy - clean)[:, valid]
    rel = np.std(d, axis=1) / np.maximum(np.mean(clean[:, valid], axis=1), 1e-3)
    wl = get_sensor("enmap").wavelengths_nm
    vnir = (wl > 500) & (wl < 900)
    assert 1e-4 < np.median(rel[vnir]) < 0.02  # SNR of a few hundred
