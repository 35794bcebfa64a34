"""Loud spectral metadata: each defect of a product's band table is a clear error naming the file and the field,
``ingest`` exits 2 and writes nothing; micrometres are recognised and converted. Products from the independent
real-layout fixtures, then edited the way broken files come."""

from __future__ import annotations

import re
from pathlib import Path

import h5netcdf
import h5py
import numpy as np
import pytest
import zarr

from data_prep.cli import main
from tests.data_prep.fixtures import real_layouts as fx

NG = "ang20231109t092617_027_L2A_OE_main_27577724"


@pytest.fixture(scope="module")
def written(tmp_path_factory, real_data):
    root = tmp_path_factory.mktemp("meta")
    return root, {k: f(root) for k, f in fx.LAYOUTS.items() if k in ("aviris-ng", "emit", "enmap", "desis")}


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_header(hdr: Path, key: str, fn) -> None:
    text = hdr.read_text()
    m = re.search(rf"^{key} = \{{([^}}]*)\}}$", text, re.M)
    vals = [v.strip() for v in m.group(1).split(",")]
    text = text[: m.start()] + f"{key} = {{{', '.join(fn(vals))}}}" + text[m.end():]
    hdr.write_text(text)


def _ingest_fails(folder: Path, out: Path, capsys, *needles: str) -> str:
    rc = main(["ingest", str(folder), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    for n in needles:
        assert n in err, err
    assert not out.exists()  # nothing written
    return err


def _swap(vals):
    vals = list(vals)
    vals[100], vals[101] = vals[101], vals[100]
    return vals


@pytest.mark.parametrize(("key", "edit", "needles"), [
    ("wavelength", _swap, ["field wavelength: centres not strictly increasing at band 101"]),
    ("wavelength", lambda v: v[:101] + [v[100]] + v[102:], ["field wavelength: bands 100 and 101 have the same centre"]),
    ("wavelength", lambda v: v[:-1], ["field wavelength: 424 centres for 425 bands"]),
    ("fwhm", lambda v: v[:-1], ["field fwhm: 424 widths for 425 band centres"]),
    ("wavelength", lambda v: [f"{float(x) / 1000:.6f}" for x in v],
     ["field wavelength units: says 'Nanometers' but the centres span 0.37686-2.50054 (micrometres?)"]),
])
def test_envi_band_table_defects(written, tmp_path, capsys, key, edit, needles):
    root, _ = written
    d = _copy(root / "aviris-ng" / NG, tmp_path / NG)
    hdr = d / f"{NG}_RFL_ORT.hdr"
    _edit_header(hdr, key, edit)
    err = _ingest_fails(d, tmp_path / "out", capsys, *needles)
    assert f"{NG}_RFL_ORT.hdr" in err


def test_envi_micrometres_without_units_are_converted(written, tmp_path, capsys):
    root, exps = written
    d = _copy(root / "aviris-ng" / NG, tmp_path / NG)
    hdr = d / f"{NG}_RFL_ORT.hdr"
    _edit_header(hdr, "wavelength", lambda v: [f"{float(x) / 1000:.7f}" for x in v])
    _edit_header(hdr, "fwhm", lambda v: [f"{float(x) / 1000:.7f}" for x in v])
    hdr.write_text(hdr.read_text().replace("wavelength units = Nanometers\n", ""))
    assert main(["ingest", str(d), "--out", str(tmp_path / "out"), "--patch-size", "8", "--no-progress"]) == 0
    a = dict(zarr.open_group(str(tmp_path / "out" / "aviris-ng_L2.zarr"), mode="r").attrs)
    e = next(x for x in exps["aviris-ng"] if x.granule_id == f"{NG}_RFL_ORT")
    np.testing.assert_allclose(a["wavelengths_nm"], e.wavelengths, atol=1e-3)
    np.testing.assert_allclose(a["fwhm_nm"], e.fwhm, atol=1e-3)


def test_emit_band_table_defects(written, tmp_path, capsys):
    root, exps = written
    e = exps["emit"][0]
    d = _copy(root / "emit", tmp_path / "emit")
    nc = d / f"{e.granule_id}.nc"
    with h5py.File(nc, "r+") as f:  # micrometre values under a units attribute that says nm
        f["sensor_band_parameters/wavelengths"][:] = f["sensor_band_parameters/wavelengths"][:] / 1000
    _ingest_fails(d, tmp_path / "out", capsys, nc.name,
                  "field sensor_band_parameters/wavelengths units: says 'nm' but the centres span 0.381006")
    d2 = _copy(root / "emit", tmp_path / "emit2")
    nc2 = d2 / f"{e.granule_id}.nc"
    with h5netcdf.File(nc2, "r+") as f:  # an FWHM table of another length
        g = f.groups["sensor_band_parameters"]
        fw = np.asarray(g.variables["fwhm"][:])
        g.dimensions["fwhm_bands"] = fw.size - 1
        g.create_variable("fwhm_short", ("fwhm_bands",), "f4", data=fw[:-1])
    with h5py.File(nc2, "r+") as f:
        g = f["sensor_band_parameters"]
        del g["fwhm"]
        g.move("fwhm_short", "fwhm")
    _ingest_fails(d2, tmp_path / "out", capsys, nc2.name,
                  "field sensor_band_parameters/fwhm: 284 widths for 285 band centres")


def _xml_edit(xml: Path, band_path: str, centre: str, fn) -> None:
    import xml.etree.ElementTree as ET

    tree = ET.parse(xml)
    bands = tree.getroot().findall(band_path)
    vals = fn([float(b.findtext(centre)) for b in bands])
    for b, v in zip(bands, vals, strict=True):
        b.find(centre).text = f"{v:.6f}"
    tree.write(xml)


def test_enmap_xml_band_table_defects(written, tmp_path, capsys):
    root, exps = written
    e = exps["enmap"][0]
    band, centre = "specific/bandCharacterisation/bandID", "wavelengthCenterOfBand"
    for name, fn, needle in (
            ("dup", lambda v: v[:50] + [v[49]] + v[51:], "bands 49 and 50 have the same centre"),
            ("order", lambda v: v[:50] + [v[60]] + v[51:60] + [v[50]] + v[61:],
             "centres not ascending at band 52")):
        d = _copy(root / "enmap" / e.granule_id, tmp_path / name / e.granule_id)
        xml = d / f"{e.granule_id}-METADATA.XML"
        _xml_edit(xml, band, centre, fn)
        err = _ingest_fails(d, tmp_path / f"out-{name}", capsys, xml.name, f"field {band}/{centre}", needle)
        assert "expected" in err


def test_desis_micrometre_centres_are_recognised(written, tmp_path, capsys):
    root, exps = written
    e = exps["desis"][0]
    d = tmp_path / "desis"
    d.mkdir()
    import shutil

    for p in (root / "desis").iterdir():
        if p.name.startswith(e.granule_id):
            shutil.copy(p, d / p.name)
    xml = d / f"{e.granule_id}-METADATA.xml"
    band = "specific/bandCharacterisation/band"
    _xml_edit(xml, band, "wavelengthCenterOfBand", lambda v: [x / 1000 for x in v])
    _xml_edit(xml, band, "wavelengthWidthOfBand", lambda v: [x / 1000 for x in v])
    assert main(["ingest", str(d), "--out", str(tmp_path / "out"), "--patch-size", "8", "--no-progress"]) == 0
    a = dict(zarr.open_group(str(tmp_path / "out" / "desis_L2.zarr"), mode="r").attrs)
    np.testing.assert_allclose(a["wavelengths_nm"], e.wavelengths, atol=1e-3)
    np.testing.assert_allclose(a["fwhm_nm"], e.fwhm, atol=1e-3)
