"""The simulator's writers (write_product) -> open_product -> read_rows for every sensor and level, and the layouts
they write (the real ones: see test_formats_layouts.py for fixtures written independently of these writers)."""

from __future__ import annotations

import datetime as dt

import h5netcdf
import h5py
import numpy as np
import pytest
import spectral.io.envi as envi
import tifffile

from data_prep.formats import detect_format, discover, find_products, open_product, write_product
from data_prep.formats.enmap import NODATA_WINDOW_NM
from data_prep.registry import get_sensor
from tests.data_prep.formats_cases import CASES, COLS, ROWS, TIME, geolocation, make_cube, tolerance

EXPECTED_FORMAT = {"envi": "envi", "emit-netcdf": "emit-netcdf", "enmap-geotiff": "enmap-geotiff",
                   "desis-geotiff": "desis-geotiff", "geotiff": "geotiff"}
DATE_ONLY = {"aviris-classic"}  # the name carries the date, not the time
#: raw-geometry products: the GSD is measured from the per-pixel lat/lon
RAW_GEOMETRY = {("emit", "L1"), ("emit", "L2"), ("aviris-ng", "L1")}


def _filled(sensor: str, level: str) -> np.ndarray:
    wl = get_sensor(sensor).wavelengths_nm
    if (sensor, level) == ("enmap", "L2"):
        return (wl >= NODATA_WINDOW_NM[0]) & (wl <= NODATA_WINDOW_NM[1])
    return np.zeros(wl.size, dtype=bool)


@pytest.mark.parametrize(("sensor", "level"), CASES)
def test_round_trip(tmp_path, sensor, level):
    s = get_sensor(sensor)
    cube = make_cube(sensor, level)
    gsd = s.gsd_m / 2  # not the registry default: must travel through the file
    heading = 0.0 if sensor in ("enmap", "desis") else 12.0
    lat, lon = geolocation(gsd, heading)
    entry = write_product(tmp_path, sensor=sensor, level=level, cube=cube, lat=lat, lon=lon, time=TIME,
                          wavelengths_nm=s.wavelengths_nm, fwhm_nm=s.fwhm_nm, gsd_m=gsd)
    assert detect_format(entry) == EXPECTED_FORMAT[s.format]
    assert find_products([tmp_path]) == [entry]  # the sidecars written beside it are not products
    g = open_product(entry)
    assert (g.sensor, g.level, g.shape) == (sensor, level, (s.n_bands, ROWS, COLS))
    assert g.acquisition_time == (TIME.replace(hour=0, minute=0, second=0) if sensor in DATE_ONLY else TIME)
    assert g.gsd_m == pytest.approx(gsd, rel=2e-3 if (sensor, level) in RAW_GEOMETRY else 1e-6)
    np.testing.assert_allclose(g.wavelengths_nm, s.wavelengths_nm, atol=1e-3)
    np.testing.assert_allclose(g.fwhm_nm, s.fwhm_nm, atol=1e-3)
    filled = _filled(sensor, level)
    np.testing.assert_array_equal(g.good_bands, s.good_band_mask() & ~filled)
    np.testing.assert_allclose(g.lat, lat, atol=1e-9)
    np.testing.assert_allclose(g.lon, lon, atol=1e-9)
    # read in two blocks of lines, as ingest does
    a, va = g.read_rows(0, 7)
    b, vb = g.read_rows(7, ROWS)
    got, valid = np.concatenate([a, b], axis=1), np.concatenate([va, vb], axis=0)
    assert got.dtype == np.float32 and got.shape == cube.shape and valid.shape == (ROWS, COLS)
    expect = cube.copy()
    expect[filled] = np.nan  # the product's no-data bands
    single = (sensor, level) == ("aviris-classic", "L1")
    if single:  # int16 DN with nodata only as -50 in every band: a lone NaN band is written, and read, as -50 DN
        lone = np.isnan(expect) & ~np.isnan(expect).all(axis=0)
        expect[lone] = (-50 / np.where(np.arange(s.n_bands) < 110, 300.0,
                                       np.where(np.arange(s.n_bands) < 160, 600.0, 1200.0)))[np.nonzero(lone)[0]]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expect))
    ok = ~np.isnan(expect)
    assert (np.abs(got - expect) <= tolerance(sensor, level, cube))[ok].all()
    expect_valid = ~np.isnan(expect[s.good_band_mask() & ~filled]).any(axis=0)
    np.testing.assert_array_equal(valid, expect_valid)
    assert not valid[0, :3].any() and valid[5, 5] == single
    if (~s.good_band_mask()).any():
        assert valid[6, 6]  # NaN only in a bad band keeps the pixel
    assert valid.sum() == ROWS * COLS - 4 + single
    # a second write of another time lands beside it with its own name
    e2 = write_product(tmp_path, sensor=sensor, level=level, cube=cube, time=TIME + dt.timedelta(days=1, minutes=7))
    assert e2 != entry and open_product(e2).granule_id != g.granule_id
    assert open_product(e2).lat is None
    assert sorted(find_products([tmp_path])) == sorted([entry, e2])


def test_envi_layouts_match_the_jpl_products(tmp_path):
    """AVIRIS-NG L1: float32 BIL LE with a loc file (lon, lat, elev); AVIRIS-Classic L1: int16 big-endian BIP
    DN = radiance x gain with the .gain file and -50 off-swath, no data ignore value; AV3: rotated UTM map info."""
    s = get_sensor("aviris-ng")
    cube = make_cube("aviris-ng", "L1")
    lat, lon = geolocation(s.gsd_m)
    hdr = write_product(tmp_path / "ng", sensor="aviris-ng", level="L1", cube=cube, lat=lat, lon=lon, time=TIME)
    assert hdr.name == "ang20210607t180910_rdn_v2p9_img.hdr"
    h = envi.read_envi_header(str(hdr))
    assert (h["interleave"], h["data type"], h["byte order"]) == ("bil", "4", "0")
    assert "acquisition time" not in h and "processing level" not in h and "map info" not in h
    assert float(h["data ignore value"]) == -9999 and len(h["wavelength"]) == len(h["fwhm"]) == s.n_bands
    raw = np.fromfile(hdr.with_suffix(""), dtype="<f4").reshape(ROWS, s.n_bands, COLS).transpose(1, 0, 2)
    np.testing.assert_array_equal(raw, np.where(np.isnan(cube), -9999, cube))
    loc = np.fromfile(tmp_path / "ng" / "ang20210607t180910_rdn_v2p9_loc", dtype="<f8").reshape(ROWS, 3, COLS)
    np.testing.assert_array_equal(loc[:, 0], lon)
    np.testing.assert_array_equal(loc[:, 1], lat)

    c = get_sensor("aviris-classic")
    cube = make_cube("aviris-classic", "L1")
    hdr = write_product(tmp_path / "c", sensor="aviris-classic", level="L1", cube=cube, lat=lat, lon=lon, time=TIME)
    assert hdr.name == "f210607t18p09r10rdn_e_sc01_ort_img.hdr"
    h = envi.read_envi_header(str(hdr))
    assert (h["interleave"], h["data type"], h["byte order"]) == ("bip", "2", "1")
    assert "data ignore value" not in h and h["map info"][0] == "UTM" and h["map info"][-1].startswith("rotation=")
    dn = np.fromfile(hdr.with_suffix(""), dtype=">i2").reshape(ROWS, COLS, c.n_bands).transpose(2, 0, 1)
    gain = np.loadtxt(tmp_path / "c" / "f210607t18p09r10rdn_e.gain")[:, 0]
    assert set(np.unique(gain)) == {300.0, 600.0, 1200.0}
    assert (dn[:, 0, :3] == -50).all()
    np.testing.assert_allclose(dn[:, 10, 10] / gain, cube[:, 10, 10], atol=0.5 / 300 + 1e-6)


def test_emit_layout_glt_sidecars_and_masks(tmp_path):
    s = get_sensor("emit")
    cube = make_cube("emit", "L2")
    lat, lon = geolocation(s.gsd_m)
    nc = write_product(tmp_path, sensor="emit", level="L2", cube=cube, lat=lat, lon=lon, time=TIME)
    assert nc.name.startswith("EMIT_L2A_RFL_001_20210607T180910_") and nc.suffix == ".nc"
    names = sorted(p.name.split("_001_")[0] for p in tmp_path.iterdir())
    assert names == ["EMIT_L2A_MASK", "EMIT_L2A_RFL", "EMIT_L2A_RFLUNCERT"]
    with h5netcdf.File(nc, "r") as f:
        v = f.variables["reflectance"]
        assert v.dimensions == ("downtrack", "crosstrack", "bands") and v.attrs["_FillValue"] == -9999
        assert np.asarray(v[0, 0, :] == -9999).all()
        gt = np.asarray(f.attrs["geotransform"])
        assert f.attrs["spatialResolution"] == pytest.approx(s.gsd_m / 111_320.0)  # degrees, as the SDS writes it
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
    assert open_product(nc).gsd_m == pytest.approx(s.gsd_m, rel=2e-3)  # metres, not the degrees of the GLT
    # product flags join the registry's bad bands; the MASK's band_mask and spacecraft flag are used
    with h5py.File(nc, "r+") as f:
        f["sensor_band_parameters/good_wavelengths"][10] = 0
    mask = next(tmp_path.glob("EMIT_L2A_MASK_*.nc"))
    with h5py.File(mask, "r+") as f:
        bm = f["band_mask"][:]
        bm[:, :, 2] = 0b00100000  # band 18 interpolated everywhere
        f["band_mask"][:] = bm
        m = f["mask"][:]
        m[3, 4, 3] = 1.0  # spacecraft flag at one pixel
        f["mask"][:] = m
    g = open_product(nc)
    assert not g.good_bands[10] and not g.good_bands[18]
    assert g.good_bands.sum() == s.good_band_mask().sum() - 2
    assert not g.read_rows(0, ROWS)[1][3, 4] and g.read_rows(0, ROWS)[1][3, 5]


def test_geotiff_layouts(tmp_path):
    """EnMAP: sorted bands, pixel-interleaved int16 x 10000 on UTM, no-data bands filled; DESIS: pixel-interleaved
    deflate with its .hdr; PlanetScope uint16 nodata 0."""
    cube = make_cube("enmap", "L2")
    lat, lon = geolocation(30.0, 0.0)
    tif = write_product(tmp_path, sensor="enmap", level="L2", cube=cube, time=TIME, lat=lat, lon=lon)
    d = tif.parent
    assert tif.name == f"{d.name}-SPECTRAL_IMAGE.TIF" and d.name.startswith("ENMAP01-____L2A-DT")
    assert (d / f"{d.name}-METADATA.XML").exists() and (d / f"{d.name}-QL_PIXELMASK.TIF").exists()
    with tifffile.TiffFile(tif) as t:
        assert t.pages[0].planarconfig == tifffile.PLANARCONFIG.CONTIG
        assert int(t.geotiff_metadata["ProjectedCSTypeGeoKey"]) == 32612  # UTM 12N at -110 E
        dn = t.asarray().transpose(2, 0, 1)
    filled = _filled("enmap", "L2")
    assert filled.sum() == 6 and (dn[filled] == -32768).all()
    assert dn.dtype == np.int16 and dn.shape == cube.shape and (dn[:, 0, :3] == -32768).all()
    np.testing.assert_array_equal(dn[~filled, 10, 10], np.round(cube[~filled, 10, 10] * 10000).astype(np.int16))
    assert open_product(d).granule_id == open_product(tif).granule_id == d.name  # the folder is an entry too
    des = write_product(tmp_path / "desis", sensor="desis", level="L2", cube=make_cube("desis", "L2"), time=TIME)
    with tifffile.TiffFile(des) as t:
        p = t.pages[0]
        assert p.planarconfig == tifffile.PLANARCONFIG.CONTIG and p.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    assert envi.read_envi_header(str(des.with_suffix(".hdr")))["data ignore value"] == "-32768"
    ps = write_product(tmp_path, sensor="planetscope", level="L2", cube=make_cube("planetscope", "L2"), time=TIME)
    assert ps.name == "20210607_180910_00_24a3_3B_AnalyticMS_SR_8b.tif"
    dn = tifffile.imread(ps)
    assert dn.dtype == np.uint16 and (dn[:, 0, :3] == 0).all() and (dn == 0).sum() == 8 * 3 + 1  # + one NaN


def test_desis_tiles_in_one_folder_are_granules_each(tmp_path):
    cube = make_cube("desis", "L2")
    a = write_product(tmp_path, sensor="desis", level="L2", cube=cube, time=TIME)
    b = write_product(tmp_path, sensor="desis", level="L2", cube=cube[:, ::-1], time=TIME + dt.timedelta(minutes=3))
    assert a.parent == b.parent and sorted(find_products([tmp_path])) == sorted([a, b])
    ga, gb = open_product(a), open_product(b)
    assert ga.granule_id != gb.granule_id
    np.testing.assert_allclose(gb.read_rows(0, ROWS)[0], ga.read_rows(0, ROWS)[0][:, ::-1], atol=1e-4,
                               equal_nan=True)
    with discover([tmp_path]) as found:
        assert found.products == sorted([a, b]) or sorted(found.products) == sorted([a, b])
        assert any("DESIS quicklook" in line and "6 " in line for line in found.summary_lines())


def test_detection_falls_back_to_content(tmp_path):
    """No mission name: ENVI sensor from the band table, level from the header; EMIT from its attributes."""
    s = get_sensor("aviris-3")
    cube = make_cube("aviris-3", "L2")
    hdr = write_product(tmp_path, sensor="aviris-3", level="L2", cube=cube, name="my_scene", time=TIME)
    g = open_product(hdr)
    assert (g.sensor, g.level, g.acquisition_time) == ("aviris-3", "L2", None)  # a plain name says no time
    assert open_product(tmp_path / "my_scene").granule_id == "my_scene"  # the data file works as well
    assert find_products([tmp_path]) == [hdr]  # its band table matches the registry: a product when walking
    nc = write_product(tmp_path, sensor="emit", level="L1", cube=make_cube("emit", "L1"), name="granule_a")
    g = open_product(nc)
    assert (g.sensor, g.level, g.shape[0]) == ("emit", "L1", get_sensor("emit").n_bands)
    ms = write_product(tmp_path, sensor="sentinel-2", level="L2", cube=make_cube("sentinel-2", "L2"), name="tile")
    assert open_product(ms).sensor == "sentinel-2"
    assert s.n_bands == open_product(hdr).n_bands
    for sensor, fmt in (("enmap", "enmap-geotiff"), ("desis", "desis-geotiff")):
        img = write_product(tmp_path / sensor, sensor=sensor, level="L1", cube=make_cube(sensor, "L1"),
                            name=f"prod_{sensor}", time=TIME)
        assert detect_format(img) == fmt  # from the XML root, not the name
        g = open_product(img)
        assert (g.sensor, g.level, g.acquisition_time) == (sensor, "L1", TIME)


def test_micrometre_wavelengths_become_nm(tmp_path):
    s = get_sensor("aviris-ng")
    hdr = write_product(tmp_path, sensor="aviris-ng", level="L1", cube=make_cube("aviris-ng", "L1"), time=TIME)
    h = envi.read_envi_header(str(hdr))
    h["wavelength"] = [f"{w / 1000:.6f}" for w in s.wavelengths_nm]
    h["fwhm"] = [f"{w / 1000:.6f}" for w in s.fwhm_nm]
    for units in ("Micrometers", None):  # declared, or recognised from the values when no units are given
        if units is None:
            h.pop("wavelength units")
        else:
            h["wavelength units"] = units
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
    assert find_products([b]) == [b] and find_products([b.with_name(b.name.replace("SPECTRAL_IMAGE.tif",
                                                                                   "METADATA.xml"))]) == [b]
    assert find_products([b.with_name(b.name.replace("SPECTRAL_IMAGE", "QL_IMAGE"))]) == []  # a sidecar given
    with discover([tmp_path]) as found:
        lines = found.summary_lines()
    assert any(line.startswith("skipped 1 AVIRIS geolocation (loc) file(s)") for line in lines), lines
    assert any("simulator material map" in line for line in lines) and any("other" in line for line in lines)


@pytest.mark.parametrize(("stem", "sensor", "level", "when"), [
    ("ang20170323t202244_rdn_7000-7010", "aviris-ng", "L1", "2017-03-23T20:22:44"),
    ("ang20191027t204454_corr_v2x1_img", "aviris-ng", "L2", "2019-10-27T20:44:54"),
    ("ang20231109t092617_027_L2A_OE_main_27577724_RFL_ORT", "aviris-ng", "L2", "2023-11-09T09:26:17"),
    ("AV320230821t173024_L1B_RDN_main_d71e8b07_RDN_ORT", "aviris-3", "L1", "2023-08-21T17:30:24"),
    ("AV320231008t173943_L2A_OE_main_98b13fff_RFL_ORT", "aviris-3", "L2", "2023-10-08T17:39:43"),
    ("AV320250111t195928_000_L2A_OE_f576f24d_RFL_ORT", "aviris-3", "L2", "2025-01-11T19:59:28"),
    ("AV320231010t173506_005_L1B_RDN_3f4aa1b1_RDN", "aviris-3", "L1", "2023-10-10T17:35:06"),
    ("f180820t01p00r09rdn_e_sc01_ort_img", "aviris-classic", "L1", "2018-08-20T00:00:00"),
    ("f111115t01p00r08rdn_c_sc01_ort_img", "aviris-classic", "L1", "2011-11-15T00:00:00"),
    ("f970619t01p02r02_rfl", "aviris-classic", "L2", "1997-06-19T00:00:00"),
])
def test_jpl_product_names(stem, sensor, level, when):
    from data_prep.formats.aviris import parse_name

    n = parse_name(stem)
    assert (n.sensor, n.level, n.time, n.sidecar) == (
        sensor, level, dt.datetime.fromisoformat(when).replace(tzinfo=dt.UTC), None)


@pytest.mark.parametrize(("stem", "kind"), [
    ("ang20170323t202244_loc_7000-7010", "loc"), ("ang20170323t202244_obs_7000-7010", "obs"),
    ("ang20191027t204454_rdn_v2x1_loc", "loc"), ("ang20191027t204454_rdn_v2x1_obs_ort", "obs"),
    ("ang20191027t204454_rdn_v2x1_ort_glt", "glt"), ("ang20191027t204454_rdn_v2x1_ort_igm", "igm"),
    ("ang20191027t204454_h2o_v2x1_img", "h2o"),
    ("AV320231008t173943_L2A_OE_main_98b13fff_UNC_ORT", "unc"),
    ("AV320231008t173943_L2A_OE_main_98b13fff_ATM_ORT", "atm"),
    ("AV320230821t173024_L1B_ORT_main_d71e8b07_GLT", "glt"),
    ("AV320230821t173024_L1B_ORT_main_d71e8b07_IGM", "igm"),
    ("AV320230821t173024_L1B_ORT_main_d71e8b07_LOC_ORT", "loc"),
    ("AV320230821t173024_L1B_ORT_main_d71e8b07_OBS_ORT", "obs"),
    ("f180820t01p00r09rdn_e_sc01_ort_glt", "glt"), ("f180820t01p00r09rdn_e_sc01_ort_igm", "igm"),
    ("f180820t01p00r09rdn_e_sc01_obs_ort", "obs"),
])
def test_jpl_sidecar_names(stem, kind):
    from data_prep.formats.aviris import parse_name

    assert parse_name(stem).sidecar == kind


def test_loc_file_names():
    from data_prep.formats.aviris import loc_candidates, parse_name

    for stem, loc in (("ang20170323t202244_rdn_7000-7010", "ang20170323t202244_loc_7000-7010"),
                      ("ang20191027t204454_rdn_v2x1_img", "ang20191027t204454_rdn_v2x1_loc"),
                      ("AV320231010t173506_005_L1B_RDN_3f4aa1b1_RDN", "AV320231010t173506_005_L1B_RDN_3f4aa1b1_LOC")):
        assert loc in loc_candidates(stem, parse_name(stem))
