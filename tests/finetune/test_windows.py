"""finetune.windows: the one tile grid + blend weights of whole-scene prediction (tasks in memory, embed streamed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.windows import Axis, WindowError, blend, check_tiling


@pytest.mark.parametrize("size,tile,stride", [(100, 32, 24), (48, 32, 16), (20, 16, 8), (7, 16, 8), (33, 5, 3)])
def test_weights_of_the_tiles_over_a_cell_sum_to_one(size, tile, stride):
    a = Axis(size, tile, stride)
    total = np.zeros(a.padded)
    for k in range(a.n):
        total[a.start(k):a.start(k) + tile] += a.weights(k)
    assert a.padded >= size and a.start(a.n - 1) < size  # the last tile reaches the edge, none starts past it
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-6)


def test_blend_holds_one_tiles_output_where_it_alone_covers_and_cross_fades_in_overlaps():
    size, tile, stride = (20, 30), 8, 6  # overlap 2: ramps (0.25, 0.75)
    seen = []

    def fn(origins):
        seen.extend(origins)
        return torch.stack([torch.full((1, tile, tile), float(y * 100 + x)) for y, x in origins])

    out = blend(fn, size, tile, stride, batch_size=3)
    assert out.shape == (1, 20, 30)
    assert sorted(seen) == [(y, x) for y in (0, 6, 12) for x in (0, 6, 12, 18, 24)]
    assert out[0, 0, 0] == 0 and out[0, 10, 10] == 606  # inside one tile only
    # rows 6..7 are the overlap of tile rows 0 and 6: 0.75 / 0.25 then 0.25 / 0.75 (columns 2..5 in one tile)
    np.testing.assert_allclose(out[0, 6:8, 3].numpy(), [0.75 * 0 + 0.25 * 600, 0.25 * 0 + 0.75 * 600])


def test_tiling_with_more_than_half_a_tile_of_overlap_or_gaps_is_refused():
    check_tiling(32, 16)
    for stride in (15, 33, 0):
        with pytest.raises(WindowError, match=f"eval.stride {stride} must lie between"):
            check_tiling(32, stride, ("eval.window", "eval.stride"))
