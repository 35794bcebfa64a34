"""Bad input: each a ProductError naming the file and the field."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest
import spectral.io.envi as envi

from data_prep.formats import ProductError, detect_format, find_products, open_product, write_product
from data_prep.registry import get_sensor
from tests.data_prep.formats_cases import TIME, make_cube


def _envi(tmp_path, sensor="aviris-ng", name=None):
    return write_product(tmp_path, sensor=sensor, level="L1", cube=make_cube(sensor, "L1"), time=TIME, name=name)


def _edit_header(hdr, **changes):
    h = envi.read_envi_header(str(hdr))
    for k, v in changes.items():
        k = k.replace("_", " ")
        if v is None:
            h.pop(k, None)
        else:
            h[k] = v
    envi.write_envi_header(str(hdr), h)


def _raises(path_part: str, *fields: str):
    """pytest.raises(ProductError) whose message names ``path_part`` and every field."""
    class _Check:
        def __enter__(self):
            self.cm = pytest.raises(ProductError)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self.cm.__exit__(*exc)
            msg = str(self.info.value)
            assert path_part in msg, msg
            for f in fields:
                assert f in msg, msg
            return out
    return _Check()


def test_envi_truncated(tmp_path):
    hdr = _envi(tmp_path)
    data = hdr.with_suffix("")
    data.write_bytes(data.read_bytes()[:-4000])
    with _raises(hdr.name, "field bands", "truncated"):
        open_product(hdr)


def test_envi_band_count_not_matching_file_size(tmp_path):
    hdr = _envi(tmp_path)
    _edit_header(hdr, bands="424")
    with _raises(hdr.name, "field bands", "424 bands"):
        open_product(hdr)


def test_envi_missing_wavelength(tmp_path):
    hdr = _envi(tmp_path)
    _edit_header(hdr, wavelength=None)
    with _raises(hdr.name, "field wavelength", "missing"):
        open_product(hdr)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_envi_nonfinite_wavelength(tmp_path, bad):
    hdr = _envi(tmp_path)
    wl = [f"{w:.3f}" for w in get_sensor("aviris-ng").wavelengths_nm]
    wl[7] = bad
    _edit_header(hdr, wavelength=wl)
    with _raises(hdr.name, "field wavelength", "band 7"):
        open_product(hdr)


def test_envi_thermal_wavelengths_out_of_range(tmp_path):
    hdr = _envi(tmp_path)
    _edit_header(hdr, wavelength=[f"{w:.2f}" for w in np.linspace(8000, 12000, 425)])
    with _raises(hdr.name, "field wavelength", "350-2550"):
        open_product(hdr)


def test_envi_wavelengths_not_increasing(tmp_path):
    hdr = _envi(tmp_path)
    wl = get_sensor("aviris-ng").wavelengths_nm.copy()
    wl[[100, 101]] = wl[[101, 100]]
    _edit_header(hdr, wavelength=[f"{w:.3f}" for w in wl])
    with _raises(hdr.name, "field wavelength", "not strictly increasing at band 101"):
        open_product(hdr)


def test_envi_unknown_sensor(tmp_path):
    """A plain name and a band table no registry sensor has."""
    cube = np.random.default_rng(0).uniform(0, 1, (100, 8, 8)).astype(np.float32)
    hdr = tmp_path / "scene.hdr"
    envi.save_image(str(hdr), cube.transpose(1, 2, 0), interleave="bil", dtype=np.float32, ext="", metadata={
        "wavelength": [f"{w:.2f}" for w in np.linspace(400, 2400, 100)], "description": "reflectance"})
    with _raises("scene.hdr", "field sensor", "unknown sensor"):
        open_product(hdr)


def test_envi_level_unknown(tmp_path):
    hdr = _envi(tmp_path, name="scene")
    _edit_header(hdr, processing_level=None, description="something")
    with _raises("scene.hdr", "field level"):
        open_product(hdr)


def _emit(tmp_path):
    from tests.data_prep.formats_cases import geolocation
    lat, lon = geolocation(60.0)
    return write_product(tmp_path, sensor="emit", level="L2", cube=make_cube("emit", "L2"), lat=lat, lon=lon,
                         time=TIME)


@pytest.mark.parametrize(("victim", "field"), [("sensor_band_parameters", "field sensor_band_parameters"),
                                               ("reflectance", "field reflectance"),
                                               ("sensor_band_parameters/fwhm", "field sensor_band_parameters/fwhm"),
                                               ("location/lat", "field location/lat")])
def test_netcdf_missing_group_or_variable(tmp_path, victim, field):
    nc = _emit(tmp_path)
    with h5py.File(nc, "r+") as f:
        del f[victim]
    with _raises(nc.name, field, "missing"):
        open_product(nc)


def test_netcdf_inf_wavelength(tmp_path):
    nc = _emit(tmp_path)
    with h5py.File(nc, "r+") as f:
        f["sensor_band_parameters/wavelengths"][3] = np.inf
    with _raises(nc.name, "field sensor_band_parameters/wavelengths", "band 3"):
        open_product(nc)


def _xml_product(tmp_path, sensor):
    img = write_product(tmp_path, sensor=sensor, level="L2", cube=make_cube(sensor, "L2"), time=TIME)
    xml = next(p for p in img.parent.iterdir() if p.name.upper().endswith("-METADATA.XML"))
    return img, xml


@pytest.mark.parametrize(("sensor", "band"), [("enmap", "bandID"), ("desis", "band")])
def test_xml_missing_bands(tmp_path, sensor, band):
    d, xml = _xml_product(tmp_path, sensor)
    tree = ET.parse(xml)
    bc = tree.getroot().find("specific/bandCharacterisation")
    for b in list(bc):
        bc.remove(b)
    tree.write(xml)
    with _raises(xml.name, f"field specific/bandCharacterisation/{band}", "no band elements"):
        open_product(d)


@pytest.mark.parametrize(("sensor", "band"), [("enmap", "bandID"), ("desis", "band")])
def test_xml_band_count_mismatch(tmp_path, sensor, band):
    d, xml = _xml_product(tmp_path, sensor)
    tree = ET.parse(xml)
    bc = tree.getroot().find("specific/bandCharacterisation")
    bc.remove(list(bc)[-1])
    tree.write(xml)
    n = get_sensor(sensor).n_bands
    with _raises(xml.name, f"field specific/bandCharacterisation/{band}", f"{n - 1} bands described but"):
        open_product(d)


def test_xml_band_missing_gain(tmp_path):
    d, xml = _xml_product(tmp_path, "enmap")
    tree = ET.parse(xml)
    b = tree.getroot().find("specific/bandCharacterisation/bandID[@number='5']")
    b.remove(b.find("GainOfBand"))
    tree.write(xml)
    with _raises(xml.name, "bandID[@number=5]/GainOfBand", "missing"):
        open_product(d)


def test_xml_wavelengths_out_of_range(tmp_path):
    d, xml = _xml_product(tmp_path, "desis")
    tree = ET.parse(xml)
    for i, b in enumerate(tree.getroot().iterfind("specific/bandCharacterisation/band")):
        b.find("wavelengthCenterOfBand").text = f"{8000 + 10 * i}"
    tree.write(xml)
    with _raises(xml.name, "wavelengthCenterOfBand", "350-2550"):
        open_product(d)


def test_unknown_format(tmp_path):
    junk = tmp_path / "picture.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with _raises("picture.png", "field format", "unknown format"):
        detect_format(junk)
    with _raises("picture.png", "field format", "unknown format"):
        open_product(junk)
    with _raises(str(tmp_path), "field format"):
        open_product(tmp_path)  # a plain folder is not a product


def test_missing_input(tmp_path):
    with _raises("nope", "field path", "does not exist"):
        find_products([tmp_path / "nope"])
    with _raises("nope", "field path"):
        open_product(tmp_path / "nope")


def test_corrupt_netcdf_and_tiff(tmp_path):
    nc = tmp_path / "EMIT_L2A_RFL_001_20230405T123456_2309512_004.nc"
    nc.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(50))
    with _raises(nc.name, "field netcdf"):
        open_product(nc)
    tif = tmp_path / "20230405_123456_00_24a3_3B_AnalyticMS_SR_8b.tif"
    tif.write_bytes(b"II*\x00" + bytes(50))
    with _raises(tif.name, "field tiff"):
        open_product(tif)


def test_netcdf_that_is_not_emit_is_refused(tmp_path):
    """The EMIT reader only takes EMIT files: an EMIT-shaped NetCDF without the EMIT name or instrument attribute
    is no product (named as such), and is skipped, not ingested, when a folder is walked."""
    nc = _emit(tmp_path)
    other = tmp_path / "sub" / "granule.nc"
    other.parent.mkdir()
    with h5py.File(nc, "r") as src, h5py.File(other, "w") as dst:
        for k in src:
            src.copy(k, dst)
        for k, v in src.attrs.items():
            if k not in ("instrument", "title"):
                dst.attrs[k] = v
    with _raises("granule.nc", "field format", "NetCDF of no known product"):
        open_product(other)
    assert find_products([tmp_path / "sub"]) == []
    from data_prep.formats.emit import open_emit

    with _raises("granule.nc", "field instrument", "not an EMIT file"):
        open_emit(other)
