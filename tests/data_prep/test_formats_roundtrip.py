"""Round trips write_product -> open_product -> read_rows for every sensor and level, and detection."""

from __future__ import annotations

import datetime as dt

import h5netcdf
import h5py
import numpy as np
import pytest
import spectral.io.envi as envi
import tifffile

from data_prep.formats import detect_format, find_products, open_product, write_product
from data_prep.registry import get_sensor
from tests.data_prep.formats_cases import CASES, COLS, ROWS, TIME, geolocation, make_cube, tolerance

EXPECTED_FORMAT = {"envi": "envi", "emit-netcdf": "emit-netcdf", "enmap-geotiff": "enmap-geotiff",
                   "desis-geotiff": "desis-geotiff", "geotiff": "geotiff"}


@pytest.mark.parametrize(("sensor", "level"), CASES)
def test_round_trip(tmp_path, sensor, level):
    s = get_sensor(sensor)
    cube = make_cube(sensor, level)
    gsd = s.gsd_m / 2  # not the registry default: must travel through the file
    lat, lon = geolocation(gsd)
    entry = write_product(tmp_path, sensor=sensor, level=level, cube=cube, lat=lat, lon=lon, time=TIME,
                          wavelengths_nm=s.wavelengths_nm, fwhm_nm=s.fwhm_nm, gsd_m=gsd)
    assert detect_format(entry) == EXPECTED_FORMAT[s.format]
    assert find_products([tmp_path]) == [entry]
    g = open_product(entry)
    assert (g.sensor, g.level, g.shape) == (sensor, level, (s.n_bands, ROWS, COLS))
    assert g.acquisition_time == TIME
    assert g.gsd_m == pytest.approx(gsd)
    np.testing.assert_allclose(g.wavelengths_nm, s.wavelengths_nm, atol=1e-3)
    np.testing.assert_allclose(g.fwhm_nm, s.fwhm_nm, atol=1e-3)
    np.testing.assert_array_equal(g.good_bands, s.good_band_mask())
    np.testing.assert_allclose(g.lat, lat, atol=1e-9)
    np.testing.assert_allclose(g.lon, lon, atol=1e-9)
    # read in two blocks of lines, as ingest does
    a, va = g.read_rows(0, 7)
    b, vb = g.read_rows(7, ROWS)
    got, valid = np.concatenate([a, b], axis=1), np.concatenate([va, vb], axis=0)
    assert got.dtype == np.float32 and got.shape == cube.shape and valid.shape == (ROWS, COLS)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(cube))
    ok = ~np.isnan(cube)
    assert (np.abs(got - cube) <= tolerance(sensor, level, cube))[ok].all()
    expect_valid = ~np.isnan(cube[s.good_band_mask()]).any(axis=0)
    np.testing.assert_array_equal(valid, expect_valid)
    assert not valid[0, :3].any() and not valid[5, 5]
    if (~s.good_band_mask()).any():
        assert valid[6, 6]  # NaN only in a bad band keeps the pixel
    assert valid.sum() == ROWS * COLS - 4
    # a second write of another time lands beside it with its own name
    e2 = write_product(tmp_path, sensor=sensor, level=level, cube=cube, time=TIME + dt.timedelta(minutes=7))
    assert e2 != entry and open_product(e2).granule_id != g.granule_id
    assert open_product(e2).lat is None


def test_envi_layout_matches_real_header(tmp_path):
    """BIL float32 little-endian with wavelength, fwhm and data ignore value; loc file = lon, lat, elev."""
    s = get_sensor("aviris-ng")
    cube = make_cube("aviris-ng", "L1")
    lat, lon = geolocation(s.gsd_m)
    hdr = write_product(tmp_path, sensor="aviris-ng", level="L1", cube=cube, lat=lat, lon=lon, time=TIME)
    assert hdr.name == "ang20210607t180910_rdn_v2p9.hdr"
    h = envi.read_envi_header(str(hdr))
    assert (h["interleave"], h["data type"], h["byte order"]) == ("bil", "4", "0")
    assert float(h["data ignore value"]) == -9999 and len(h["wavelength"]) == len(h["fwhm"]) == s.n_bands
    raw = np.fromfile(hdr.with_suffix(""), dtype="<f4").reshape(ROWS, s.n_bands, COLS).transpose(1, 0, 2)
    np.testing.assert_array_equal(raw, np.where(np.isnan(cube), -9999, cube))
    loc = np.fromfile(tmp_path / "ang20210607t180910_loc_v2p9", dtype="<f8").reshape(ROWS, 3, COLS)
    np.testing.assert_array_equal(loc[:, 0], lon)
    np.testing.assert_array_equal(loc[:, 1], lat)


def test_emit_layout_glt_and_good_wavelengths(tmp_path):
    s = get_sensor("emit")
    cube = make_cube("emit", "L2")
    lat, lon = geolocation(s.gsd_m)
    nc = write_product(tmp_path, sensor="emit", level="L2", cube=cube, lat=lat, lon=lon, time=TIME)
    assert nc.name.startswith("EMIT_L2A_RFL_001_20210607T180910_") and nc.suffix == ".nc"
    with h5netcdf.File(nc, "r") as f:
        v = f.variables["reflectance"]
        assert v.dimensions == ("downtrack", "crosstrack", "bands") and v.attrs["_FillValue"] == -9999
        assert np.asarray(v[0, 0, :] == -9999).all()
        gt = np.asarray(f.attrs["geotransform"])
        assert "WGS" in f.attrs["spatial_ref"] and str(f.attrs["time_coverage_start"]).startswith("2021-06-07T18:09:10")
        loc = f.groups["location"]
        gx, gy = np.asarray(loc.variables["glt_x"][:]), np.asarray(loc.variables["glt_y"][:])
    # nearly every raw pixel appears in the (nearest-neighbour) GLT, and each GLT cell's raw pixel lies near it
    used = {(int(y) - 1, int(x) - 1) for y, x in zip(gy[gx > 0], gx[gx > 0], strict=True)}
    assert len(used) >= 0.95 * ROWS * COLS and (gx > 0).sum() >= ROWS * COLS * 0.9
    oy, ox = np.nonzero(gx > 0)
    clon, clat = gt[0] + (ox + 0.5) * gt[1], gt[3] + (oy + 0.5) * gt[5]
    rlat, rlon = lat[gy[oy, ox] - 1, gx[oy, ox] - 1], lon[gy[oy, ox] - 1, gx[oy, ox] - 1]
    assert np.abs(rlat - clat).max() <= gt[1] and np.abs(rlon - clon).max() <= gt[1]
    # product flags join the registry's bad bands
    with h5py.File(nc, "r+") as f:
        f["sensor_band_parameters/good_wavelengths"][10] = 0
    g = open_product(nc)
    assert not g.good_bands[10] and g.good_bands.sum() == s.good_band_mask().sum() - 1


def test_geotiff_layouts(tmp_path):
    """EnMAP int16 x 10000 band-sequential with its XML gains; PlanetScope uint16 nodata 0."""
    cube = make_cube("enmap", "L2")
    d = write_product(tmp_path, sensor="enmap", level="L2", cube=cube, time=TIME)
    tif = d / f"{d.name}-SPECTRAL_IMAGE.TIF"
    assert (d / f"{d.name}-METADATA.XML").exists() and d.name.startswith("ENMAP01-____L2A-DT")
    with tifffile.TiffFile(tif) as t:
        assert t.pages[0].planarconfig == tifffile.PLANARCONFIG.SEPARATE
        dn = t.asarray()
    assert dn.dtype == np.int16 and dn.shape == cube.shape and (dn[:, 0, :3] == -32768).all()
    np.testing.assert_array_equal(dn[:, 10, 10], np.round(cube[:, 10, 10] * 10000).astype(np.int16))
    assert open_product(tif).granule_id == open_product(d).granule_id  # the image file is an entry too
    ps = write_product(tmp_path, sensor="planetscope", level="L2", cube=make_cube("planetscope", "L2"), time=TIME)
    assert ps.name == "20210607_180910_00_24a3_3B_AnalyticMS_SR_8b.tif"
    dn = tifffile.imread(ps)
    assert dn.dtype == np.uint16 and (dn[:, 0, :3] == 0).all() and (dn == 0).sum() == 8 * 3 + 1  # + one NaN


def test_detection_falls_back_to_content(tmp_path):
    """No mission name: ENVI sensor from the band table, level from the header; EMIT from its variables."""
    s = get_sensor("aviris-3")
    cube = make_cube("aviris-3", "L2")
    hdr = write_product(tmp_path, sensor="aviris-3", level="L2", cube=cube, name="my_scene", time=TIME)
    g = open_product(hdr)
    assert (g.sensor, g.level, g.acquisition_time) == ("aviris-3", "L2", TIME)
    assert open_product(tmp_path / "my_scene").granule_id == "my_scene"  # the data file works as well
    nc = write_product(tmp_path, sensor="emit", level="L1", cube=make_cube("emit", "L1"), name="granule_a")
    g = open_product(nc)
    assert (g.sensor, g.level, g.shape[0]) == ("emit", "L1", get_sensor("emit").n_bands)
    ms = write_product(tmp_path, sensor="sentinel-2", level="L2", cube=make_cube("sentinel-2", "L2"), name="tile")
    assert open_product(ms).sensor == "sentinel-2"
    assert s.n_bands == open_product(hdr).n_bands
    for sensor, fmt in (("enmap", "enmap-geotiff"), ("desis", "desis-geotiff")):
        d = write_product(tmp_path, sensor=sensor, level="L1", cube=make_cube(sensor, "L1"), name=f"prod_{sensor}",
                          time=TIME)
        assert detect_format(d) == fmt  # from the XML root, not the name
        g = open_product(d)
        assert (g.sensor, g.level, g.acquisition_time) == (sensor, "L1", TIME)


def test_micrometre_wavelengths_become_nm(tmp_path):
    s = get_sensor("aviris-ng")
    hdr = write_product(tmp_path, sensor="aviris-ng", level="L1", cube=make_cube("aviris-ng", "L1"), time=TIME)
    h = envi.read_envi_header(str(hdr))
    h["wavelength"] = [f"{w / 1000:.6f}" for w in s.wavelengths_nm]
    h["fwhm"] = [f"{w / 1000:.6f}" for w in s.fwhm_nm]
    h["wavelength units"] = "Micrometers"
    envi.write_envi_header(str(hdr), h)
    g = open_product(hdr)
    np.testing.assert_allclose(g.wavelengths_nm, s.wavelengths_nm, atol=1e-3)
    np.testing.assert_allclose(g.fwhm_nm, s.fwhm_nm, atol=1e-3)


def test_find_products_skips_sidecars(tmp_path):
    lat, lon = geolocation(4.0)
    a = write_product(tmp_path / "x", sensor="aviris-ng", level="L1", cube=make_cube("aviris-ng", "L1"),
                      lat=lat, lon=lon, time=TIME)
    b = write_product(tmp_path / "x" / "y", sensor="desis", level="L2", cube=make_cube("desis", "L2"), time=TIME)
    np.savez(tmp_path / "x" / f"{a.stem}_materials.npz", labels=np.zeros((2, 2)))
    (tmp_path / "x" / "notes.txt").write_text("hello")
    assert sorted(find_products([tmp_path])) == sorted([a, b])
    assert find_products([a.with_suffix("")]) == [a]  # the data file given directly -> its header
    assert find_products([b / f"{b.name}-SPECTRAL_IMAGE.tif"]) == [b]


@pytest.mark.parametrize(("stem", "sensor", "level", "when", "loc"), [
    ("ang20170323t202244_rdn_7000-7010", "aviris-ng", "L1", "2017-03-23T20:22:44", "ang20170323t202244_loc_7000-7010"),
    ("ang20191027t204454_corr_v2x1_img", "aviris-ng", "L2", "2019-10-27T20:44:54", "ang20191027t204454_loc_v2x1_img"),
    ("AV320231010t173506_005_L1B_RDN_3f4aa1b1_RDN", "aviris-3", "L1", "2023-10-10T17:35:06",
     "AV320231010t173506_005_L1B_RDN_3f4aa1b1_LOC"),
    ("AV320231010t173506_005_L2A_RFL", "aviris-3", "L2", "2023-10-10T17:35:06", "AV320231010t173506_005_L2A_LOC"),
    ("f180601t01p00r06_rfl", "aviris-classic", "L2", "2018-06-01T00:00:00", "f180601t01p00r06_loc"),
    ("f180601t01p00r06_rdn_e_img", "aviris-classic", "L1", "2018-06-01T00:00:00", "f180601t01p00r06_rdn_e_loc"),
])
def test_jpl_names(stem, sensor, level, when, loc):
    from data_prep.formats.envi import is_sidecar, loc_candidates, parse_name

    s, lev, t, m = parse_name(stem)
    assert (s, lev, t) == (sensor, level, dt.datetime.fromisoformat(when).replace(tzinfo=dt.UTC))
    assert loc in loc_candidates(stem, m) and is_sidecar(loc) and not is_sidecar(stem)
