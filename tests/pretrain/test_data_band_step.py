"""DataConfig.band_step: a window of every k-th good band, so a window can span a sensor's whole range (issue 11:
the quality evaluation shows the encoder spectra across the whole range, contiguous windows never do)."""

import numpy as np
import pytest

from pretrain.data import DataConfig, DataError, SourceConfig, build_loader

from .data_fixtures import make_store

GOOD = np.ones(48, bool)
GOOD[16:20] = False  # 44 good bands


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("band_step")
    return (make_store(str(d / "emit_L2.zarr"), n=6, bands=48, good=GOOD, patch=16),
            make_store(str(d / "enmap_L1.zarr"), sensor="enmap", level="L1", n=6, bands=12, patch=16, seed=1))


def _batches(st, **kw):
    cfg = DataConfig(sources=[SourceConfig(st["url"])], batch_size=2, crop=8, band_window=6, band_stride=4,
                     epochs=2, num_workers=0, sensor_dropout=0.0, seed=3, **kw)
    return list(build_loader(cfg))


def test_band_step_takes_every_kth_good_band_of_the_span(stores):
    st, _ = stores
    good = np.flatnonzero(st["good"])
    starts = set()
    for b in _batches(st, band_step=3):
        w0 = b["meta"]["band_start"][0]
        starts.add(w0)
        sel = good[w0:w0 + 16:3]  # 6 bands over a span of (6 - 1) * 3 + 1 = 16 good bands
        assert b["pixels"].shape[1] == 6
        np.testing.assert_allclose(b["wavelengths"][0].numpy(), st["wavelengths"][sel], rtol=1e-6)
        i, y0, x0 = (b["meta"][k][0] for k in ("index", "crop_y", "crop_x"))
        s = st["stats"]
        x = st["pixels"][i][sel][:, y0:y0 + 8, x0:x0 + 8].astype(np.float64)
        x = (np.clip(x, s.p01[sel, None, None], s.p99[sel, None, None]) - s.mean[sel, None, None]) / s.std[sel, None, None]
        x[:, ~st["valid"][i, y0:y0 + 8, x0:x0 + 8]] = 0
        np.testing.assert_allclose(b["pixels"][0].numpy(), x, atol=2e-4, rtol=1e-4)
    assert starts <= set(range(0, 44 - 16 + 1, 4)) and len(starts) > 1
    plain = _batches(st)  # band_step 1: contiguous windows, as before
    assert all(np.allclose(np.diff(b["wavelengths"][0].numpy()), np.diff(st["wavelengths"])[0]) for b in plain
               if b["meta"]["band_start"][0] + 6 <= 16)


def test_fewer_good_bands_than_the_span_take_every_kth_of_all(stores):
    _, small = stores  # 12 bands < span 16
    for b in _batches(small, band_step=3):
        assert b["meta"]["band_start"][0] == 0
        np.testing.assert_allclose(b["wavelengths"][0].numpy(), small["wavelengths"][0::3], rtol=1e-6)


def test_band_step_is_checked():
    with pytest.raises(DataError, match="band_step"):
        DataConfig(sources=[SourceConfig("x.zarr")], band_step=0)
