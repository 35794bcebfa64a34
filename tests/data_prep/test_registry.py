import numpy as np
import pytest

from data_prep import registry
from data_prep.registry import RegistryError, get_sensor, load_registry, sensor_vocab

EXPECTED_BANDS = {
    "aviris-classic": 224, "aviris-ng": 425, "aviris-3": 285, "enmap": 224,
    "emit": 285, "desis": 235, "planetscope": 8, "sentinel-2": 13,
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


@pytest.mark.parametrize("bad, match", [
    ("wavelengths_nm: [300, 600]\nfwhm_nm: [10, 10]\n", "must lie in 350.0-2550.0"),
    ("wavelengths_nm: [500, 600]\nfwhm_nm: [10]\n", "must be equal"),
])
def test_bad_sensor_yaml_is_rejected(tmp_path, bad, match):
    (tmp_path / "bad.yaml").write_text(
        "name: bad\ndisplay_name: Bad\nkind: hyperspectral\nformat: envi\ngsd_m: 1\n"
        "levels: {L2: {quantity: reflectance, units: '1', scale_factor: 1, nodata: -9999, clip: [0, 1]}}\n" + bad)
    with pytest.raises(RegistryError, match=match):
        registry.load_registry(str(tmp_path))
