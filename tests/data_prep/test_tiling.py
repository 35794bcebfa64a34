"""Tiling rules: invalid pixels, clipping, float16 overflow, drop threshold, edge padding."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.granule import ProductError
from data_prep.tiling import FP16_MAX, prepare_block, tile_strip
from tests.data_prep.test_ingest import make_cube, make_granule


def test_prepare_block_clips_zeroes_invalid_and_marks_nan_good_bands_invalid():
    good = np.array([True, True, False])
    cube = np.array([[[0.5, 2.0, 0.1]], [[-1.0, 0.3, np.nan]], [[np.nan, 0.2, np.inf]]], dtype=np.float32)
    valid = np.array([[True, True, True]])
    x, v = prepare_block(cube.copy(), valid, good, (-0.05, 1.5), path="p", row0=0)
    assert x.dtype == np.float16
    assert v.tolist() == [[True, True, False]]  # NaN in good band 1 -> pixel 2 invalid
    np.testing.assert_array_equal(x[:, 0, 0], np.float16([0.5, -0.05, 0.0]))  # clipped; NaN in bad band -> 0
    np.testing.assert_array_equal(x[:, 0, 1], np.float16([1.5, 0.3, 0.2]))
    assert (x[:, 0, 2] == 0).all()


def test_inf_in_a_valid_good_pixel_is_an_error_but_not_in_a_bad_band_or_invalid_pixel():
    good = np.array([True, False])
    cube = np.zeros((2, 2, 2), np.float32)
    cube[1, 0, 0] = np.inf  # bad band
    cube[0, 1, 1] = -np.inf  # good band, but the reader says invalid
    valid = np.array([[True, True], [True, False]])
    x, v = prepare_block(cube.copy(), valid, good, (0.0, 1.0), path="p", row0=0)
    assert np.isfinite(x).all() and not v[1, 1]
    cube[0, 0, 1] = np.inf
    with pytest.raises(ProductError, match=r"p: band 0 .*infinite.*row 10, col 1"):
        prepare_block(cube.copy(), valid, good, (0.0, 1.0), path="p", row0=10)


def test_float16_overflow_is_an_error_naming_file_band_and_value():
    good = np.ones(2, bool)
    cube = np.full((2, 1, 3), 100.0, np.float32)
    cube[1, 0, 2] = 70000.0
    with pytest.raises(ProductError, match=r"rdn\.hdr: band 1 value 70000 at row 4, col 2 overflows float16"):
        prepare_block(cube.copy(), np.ones((1, 3), bool), good, (-1.0, 1e6), path="rdn.hdr", row0=4)
    # within float16 range (or clipped into it) is fine
    x, _ = prepare_block(cube.copy(), np.ones((1, 3), bool), good, (-1.0, FP16_MAX), path="rdn.hdr", row0=4)
    assert np.isfinite(x).all() and x.max() == np.float16(FP16_MAX)


def test_strip_drop_threshold_edges_and_metadata():
    cube = make_cube(rows=40, cols=40)
    cube[:, 0:2, 0:16] = np.nan  # 32 of 256 pixels of patch (0, 0): 12.5% invalid
    g = make_granule(cube)
    t = tile_strip(g, 0, patch_size=16, max_invalid=0.1, clip=(-0.05, 1.5))
    # columns 0, 16 full; column 32 is 8 wide -> 50% padded invalid -> dropped; patch 0 is 12.5% invalid
    assert t.candidates == 3 and t.meta["col"].tolist() == [16]
    t = tile_strip(g, 0, patch_size=16, max_invalid=0.2, clip=(-0.05, 1.5))
    assert t.meta["col"].tolist() == [0, 16]
    assert t.meta["valid_fraction"].tolist() == [0.875, 1.0]
    assert not t.valid[0, :2].any() and (t.patches[0][:, :2] == 0).all()
    # max_invalid = 1 keeps the padded edge patch, with the padding invalid and zero
    t = tile_strip(g, 32, patch_size=16, max_invalid=1.0, clip=(-0.05, 1.5))
    assert t.meta["row"].tolist() == [32, 32, 32] and t.patches.shape == (3, 224, 16, 16)
    assert not t.valid[:, 8:].any() and (t.patches[:, :, 8:] == 0).all()
    assert t.valid_pixels == 8 * 40 and t.partial.count.max() == 8 * 40


def test_read_rows_with_the_wrong_shape_is_a_product_error():
    g = make_granule(make_cube(rows=16, cols=16))
    g.shape = (224, 16, 17)
    with pytest.raises(ProductError, match=r"g0\.tif: read_rows\(0, 16\) gave shape"):
        tile_strip(g, 0, patch_size=16, max_invalid=0.2, clip=(-0.05, 1.5))
