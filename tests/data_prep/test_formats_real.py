"""The real AVIRIS-NG radiance cube (isofit sample) reads with the figures of its README."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from data_prep.formats import detect_format, find_products, open_product

STEM = "ang20170323t202244_rdn_7000-7010"


def _bil(path, bands, dtype):
    """Independent parse of a 10 x 10 BIL little-endian file -> (bands, rows, cols)."""
    return np.fromfile(path, dtype=dtype).reshape(10, bands, 10).transpose(1, 0, 2)


@pytest.mark.parametrize("entry", [f"{STEM}.hdr", STEM])
def test_real_aviris_ng_cube(real_data, entry):
    p = real_data / entry
    assert detect_format(p) == "envi"
    g = open_product(p)
    assert (g.sensor, g.level, g.shape) == ("aviris-ng", "L1", (425, 10, 10))
    assert g.granule_id == STEM
    assert g.acquisition_time == dt.datetime(2017, 3, 23, 20, 22, 44, tzinfo=dt.UTC)
    assert g.wavelengths_nm[0] == pytest.approx(376.86) and g.wavelengths_nm[-1] == pytest.approx(2500.54)
    assert g.wavelengths_nm[50] == pytest.approx(627.29) and g.fwhm_nm.shape == (425,)
    cube, valid = g.read_rows(0, 10)
    assert cube.shape == (425, 10, 10) and cube.dtype == np.float32
    assert not np.isnan(cube).any() and not (cube == -9999).any() and valid.all()
    assert cube.min() == pytest.approx(-0.018, abs=5e-4)
    assert cube.max() == pytest.approx(12.79, abs=5e-3)
    assert cube[50].mean() == pytest.approx(5.377, abs=5e-4)
    np.testing.assert_array_equal(cube, _bil(real_data / STEM, 425, "<f4"))
    top, _ = g.read_rows(0, 4)
    bottom, _ = g.read_rows(4, 10)
    np.testing.assert_array_equal(np.concatenate([top, bottom], axis=1), cube)
    # geolocation from the _loc file beside it: band 0 longitude, band 1 latitude
    loc = _bil(real_data / "ang20170323t202244_loc_7000-7010", 3, "<f8")
    np.testing.assert_array_equal(g.lon, loc[0])
    np.testing.assert_array_equal(g.lat, loc[1])
    assert 32 < g.lat.mean() < 33.5 and -115.5 < g.lon.mean() < -114
    # water-vapour bands are not good bands; visible ones are
    assert not g.good_bands[np.argmin(np.abs(g.wavelengths_nm - 1400))] and g.good_bands[50]


def test_real_folder_lists_the_radiance_not_its_sidecars(real_data):
    found = find_products([real_data])
    names = [p.name for p in found]
    assert f"{STEM}.hdr" in names
    assert not any("_loc_" in n or "_obs_" in n for n in names)
