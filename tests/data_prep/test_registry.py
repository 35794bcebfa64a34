import numpy as np
import pytest

from data_prep import registry
from data_prep.registry import RegistryError, get_sensor, load_registry, sensor_vocab
from tests.conftest import REAL_DATA

REAL_BANDS = REAL_DATA / "bands"

EXPECTED_BANDS = {
    "aviris-classic": 224, "aviris-ng": 425, "aviris-3": 285, "enmap": 224,
    "emit": 285, "desis": 235, "planetscope": 8, "sentinel-2": 13, "landsat-8-9-oli": 7,
}


def test_every_shipped_sensor_parses_with_its_band_count():
    reg = load_registry()
    assert {k: s.n_bands for k, s in reg.items()} == EXPECTED_BANDS
    for s in reg.values():
        assert s.fwhm_nm.shape == s.wavelengths_nm.shape
        assert set(s.levels) <= {"L1", "L2"} and s.levels
        for lv in s.levels.values():
            assert lv.clip[0] < lv.clip[1]


def test_aviris_ng_matches_real_header(real_data):
    import re
    hdr = (real_data / "ang20170323t202244_rdn_7000-7010.hdr").read_text()
    wl = [float(x) for x in re.search(r"wavelength\s*=\s*\{([^}]*)\}", hdr).group(1).split(",")]
    s = get_sensor("aviris-ng")
    np.testing.assert_allclose(s.wavelengths_nm, wl)
    assert s.wavelengths_nm[0] == pytest.approx(376.86) and s.wavelengths_nm[-1] == pytest.approx(2500.54)


def test_good_band_mask_drops_water_vapour():
    s = get_sensor("emit")
    good = s.good_band_mask()
    wl = s.wavelengths_nm
    assert not good[(wl > 1360) & (wl < 1440)].any()
    assert not good[(wl > 1810) & (wl < 1950)].any()
    assert good[(wl > 500) & (wl < 1000)].all()


def test_vocab_unknown_is_zero_then_sorted_names():
    vocab = sensor_vocab()
    assert vocab[0] == "unknown" and list(vocab[1:]) == sorted(load_registry()) and "emit" in vocab


def test_unknown_sensor_error_lists_known():
    with pytest.raises(RegistryError, match="unknown sensor 'foo'.*aviris-ng"):
        get_sensor("foo")


def test_new_sensor_is_a_yaml_file(tmp_path):
    (tmp_path / "toy.yaml").write_text(
        "name: toy\ndisplay_name: Toy\nkind: hyperspectral\nformat: envi\ngsd_m: 1\n"
        "levels: {L2: {quantity: reflectance, units: '1', scale_factor: 1, nodata: -9999, clip: [0, 1]}}\n"
        "wavelengths_nm: [500, 600]\nfwhm_nm: [10, 10]\n")
    reg = registry.load_registry(str(tmp_path))
    assert reg["toy"].n_bands == 2 and reg["toy"].level("L2").clip == (0.0, 1.0)


HEAD = ("name: bad\ndisplay_name: Bad\nkind: hyperspectral\nformat: envi\ngsd_m: 1\n"
        "levels: {L2: {quantity: reflectance, units: '1', scale_factor: 1, nodata: -9999, clip: [0, 1]}}\n")


@pytest.mark.parametrize("bad, match", [
    ("wavelengths_nm: [300, 600]\nfwhm_nm: [10, 10]\n", "field wavelengths_nm: centres span 300.00-600.00 nm"),
    ("wavelengths_nm: [500, 600]\nfwhm_nm: [10]\n", "field fwhm_nm: 1 widths for 2 band centres"),
    ("wavelengths_nm: [500, 600, 550]\nfwhm_nm: [10, 10, 10]\n",
     "field wavelengths_nm: centres not strictly increasing at band 2 \\(600.000 -> 550.000 nm\\)"),
    ("wavelengths_nm: [500, 600, 600]\nfwhm_nm: [10, 10, 10]\n", "bands 1 and 2 have the same centre 600"),
    ("wavelengths_nm: [0.5, 0.6]\nfwhm_nm: [0.01, 0.01]\n", "field wavelengths_nm: says 'nm'.*micrometres"),
    ("wavelengths_nm: [500, 600]\nfwhm_nm: [10, 0]\n", "field fwhm_nm: band 1 width is 0.0 nm"),
    ("wavelengths_nm: [500, 600]\nfwhm_nm: [10, -3]\n", "field fwhm_nm: band 1 width is -3.0"),
    ("wavelengths_nm: [500, 600]\nfwhm_nm: [10, 0.01]\n", "micrometres next to nm centres"),
    ("wavelengths_nm: [500, .nan]\nfwhm_nm: [10, 10]\n", "band 1 centre is nan"),
    ("wavelengths_nm: [500, 600]\nfwhm_nm: [10, 10]\nspectrometer_starts: [5]\n", "field spectrometer_starts"),
])
def test_bad_sensor_yaml_is_rejected(tmp_path, bad, match):
    """Every band-table defect is an error naming the YAML and the field, at load (simulate and ingest load it)."""
    (tmp_path / "bad.yaml").write_text(HEAD + bad)
    with pytest.raises(RegistryError, match=match) as e:
        registry.load_registry(str(tmp_path))
    assert str(tmp_path / "bad.yaml") in str(e.value)


def test_spectrometer_overlap_is_allowed_only_where_declared(tmp_path):
    (tmp_path / "ok.yaml").write_text(HEAD + "wavelengths_nm: [500, 600, 580, 700]\nfwhm_nm: [10, 10, 10, 10]\n"
                                             "spectrometer_starts: [2]\n")
    s = registry.load_registry(str(tmp_path))["bad"]
    assert s.spectrometer_starts == (2,) and s.n_bands == 4
    (tmp_path / "ok.yaml").write_text(HEAD + "wavelengths_nm: [500, 600, 580, 700]\nfwhm_nm: [10, 10, 10, 10]\n"
                                             "spectrometer_starts: [1]\n")
    registry.load_registry.cache_clear()
    with pytest.raises(RegistryError, match="not strictly increasing at band 2.*declares spectrometer starts"):
        registry.load_registry(str(tmp_path))


def test_shipped_tables_ascending_except_classic_spectrometers():
    """EnMAP is listed sorted, as DLR delivers L2A; AVIRIS-Classic steps back at its three spectrometer starts."""
    for s in load_registry().values():
        d = np.diff(s.wavelengths_nm)
        assert set(np.flatnonzero(d <= 0) + 1) == set(s.spectrometer_starts), s.name
    assert get_sensor("aviris-classic").spectrometer_starts == (32, 96, 160)
    enmap = get_sensor("enmap")
    assert (np.diff(enmap.wavelengths_nm) > 0).all()
    csv = np.loadtxt(REAL_BANDS / "enmap.csv", delimiter=",", skiprows=1)[:, 1]
    np.testing.assert_allclose(enmap.wavelengths_nm, np.sort(csv))
    assert enmap.fwhm_nm[np.argmin(np.abs(enmap.wavelengths_nm - 993.338))] == 6.5  # VNIR band kept its width
    assert enmap.fwhm_nm[np.argmin(np.abs(enmap.wavelengths_nm - 993.144))] == 10.0


def test_bad_sensor_yaml_stops_simulate_and_ingest_with_exit_2(tmp_path, monkeypatch, capsys, real_data):
    import shutil

    from data_prep.cli import main

    (tmp_path / "sensors").mkdir()
    (tmp_path / "sensors" / "bad.yaml").write_text(HEAD + "wavelengths_nm: [500, 600, 600]\nfwhm_nm: [10, 10, 10]\n")
    monkeypatch.setenv("SPECFM_SENSORS", str(tmp_path / "sensors"))
    registry.load_registry.cache_clear()
    try:
        assert main(["simulate", "--out", str(tmp_path / "c"), "--sensors", "bad", "--no-progress"]) == 2
        assert "bad.yaml: field wavelengths_nm: bands 1 and 2 have the same centre" in capsys.readouterr().err
        (tmp_path / "in").mkdir()
        for f in ("ang20170323t202244_rdn_7000-7010", "ang20170323t202244_rdn_7000-7010.hdr"):
            shutil.copy(real_data / f, tmp_path / "in" / f)
        assert main(["ingest", str(tmp_path / "in"), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
        assert "bad.yaml: field wavelengths_nm" in capsys.readouterr().err
        assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()
    finally:
        monkeypatch.delenv("SPECFM_SENSORS")
        registry.load_registry.cache_clear()
