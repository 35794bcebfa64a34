"""data_prep.spectral: the one bad-band rule and the one standardisation, as pretraining and finetune use them."""

import subprocess
import sys

import numpy as np
import pytest

from data_prep.registry import get_sensor
from data_prep.spectral import (
    WATER_VAPOUR_NM,
    BandScaling,
    bad_band_ranges,
    good_band_mask,
    image_stats,
    normalise,
)
from data_prep.stats import DEFAULT_BINS


def _cube_with_nodata(c=6, h=10, w=12, seed=0):
    g = np.random.default_rng(seed)
    cube = (g.random((c, h, w)) * np.arange(1, c + 1)[:, None, None] + 0.2).astype(np.float32)
    cube[:, 0, :5] = 40.0  # a bright outlier row: clipped at the 99th percentile
    valid = np.ones((h, w), bool)
    valid[6:, 8:] = False
    cube[:, ~valid] = 0.0  # nodata as readers deliver it after NaN -> 0
    return cube, valid


def test_good_band_mask_ranges_inclusive_and_product_flags():
    wl = np.array([1000.0, 1340.0, 1400.0, 1460.0, 1500.0, 1800.0])
    assert good_band_mask(wl, WATER_VAPOUR_NM).tolist() == [True, False, False, False, True, False]
    flags = np.array([1, 1, 1, 1, 0, 1], np.uint8)
    assert good_band_mask(wl, WATER_VAPOUR_NM, flags).tolist() == [True, False, False, False, False, False]
    s = get_sensor("aviris-classic")
    np.testing.assert_array_equal(s.good_band_mask(), good_band_mask(s.wavelengths_nm, s.bad_band_ranges_nm))


def test_bad_band_ranges_of_a_named_sensor_else_water_vapour():
    assert bad_band_ranges("EMIT") == tuple(get_sensor("emit").bad_band_ranges_nm)
    assert bad_band_ranges(None, "aviris-classic") == tuple(get_sensor("aviris-classic").bad_band_ranges_nm)
    assert bad_band_ranges("no-such-sensor") == WATER_VAPOUR_NM


def test_image_statistics_are_the_store_accumulators_over_valid_pixels():
    cube, valid = _cube_with_nodata()
    st = image_stats(cube, valid)
    v = cube[:, valid].astype(np.float64)
    np.testing.assert_allclose(st.mean, v.mean(1), rtol=1e-9)
    np.testing.assert_allclose(st.std, v.std(1), rtol=1e-9)
    width = (v.max() - v.min()) / DEFAULT_BINS  # the histogram's bin width
    for q, got in ((0.01, st.p01), (0.99, st.p99)):
        ref = np.quantile(v, q, axis=1, method="inverted_cdf")
        assert np.all(np.abs(got - ref) <= width + 1e-9), (q, got, ref)


def test_normalise_clips_standardises_and_zeroes_nodata():
    cube, valid = _cube_with_nodata()
    out, sc = normalise(cube, valid)
    st = image_stats(cube, valid)
    ref = (np.clip(cube, st.p01[:, None, None], st.p99[:, None, None]) - st.mean[:, None, None]) / st.std[:, None, None]
    np.testing.assert_allclose(out[:, valid], ref[:, valid], atol=1e-5)
    assert (out[:, ~valid] == 0).all() and out.dtype == np.float32
    assert (out[:, 0, :5] <= ((st.p99 - st.mean) / st.std)[:, None] + 1e-5).all()  # outliers clipped to p99
    # a second image (the second date of a pair) scaled with the first one's statistics
    out2, _ = normalise(cube * 2, valid, sc)
    np.testing.assert_allclose(out2[:, valid], ((np.clip(cube * 2, sc.lo[:, None, None], sc.hi[:, None, None])
                                                 - sc.mean[:, None, None]) * sc.inv_std[:, None, None])[:, valid],
                               atol=1e-5)


def test_batch_form_uses_one_set_of_statistics():
    cube, valid = _cube_with_nodata()
    both, sc = normalise(np.stack([cube, cube * 3]), np.stack([valid, valid]))
    st = image_stats(np.concatenate([cube, cube * 3], axis=2), np.concatenate([valid, valid], axis=1))
    np.testing.assert_allclose(sc.mean, st.mean, rtol=1e-6)
    assert both.shape == (2,) + cube.shape and (both[1][:, ~valid] == 0).all()


def test_nan_inf_and_all_nodata_bands_are_harmless():
    cube, valid = _cube_with_nodata(c=3)
    cube[1] = np.nan
    cube[2, 3, 3] = np.inf
    out, sc = normalise(cube, valid)
    assert np.isfinite(out).all() and (out[1] == 0).all() and out[2, 3, 3] == 0
    st = image_stats(cube, valid)
    assert st.count[0] == 0 or np.isfinite(sc.mean).all()  # pixels with a NaN band are out of the statistics
    assert np.isfinite(sc.inv_std).all()


def test_store_statistics_give_the_loader_tables(tmp_path):
    from data_prep.store import PatchStore
    from pretrain.data.reader import tables_from_store
    from tests.pretrain.data_fixtures import make_store

    info = make_store(str(tmp_path / "s.zarr"), n=4, bands=6, patch=8)
    t = tables_from_store(PatchStore(info["url"]))
    sc = BandScaling.from_stats(info["stats"])
    for k in ("lo", "hi", "mean", "inv_std"):
        np.testing.assert_allclose(getattr(t, k), getattr(sc, k), rtol=1e-6)


def test_data_prep_does_not_import_torch():
    code = "import sys, data_prep.registry, data_prep.spectral; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(N, C, H, W\)"):
        image_stats(np.zeros(5))
