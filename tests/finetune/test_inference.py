"""Whole-scene inference (finetune.inference, launch/embed.py) on a simulated AVIRIS-NG flightline.

The expected outputs are rebuilt here from the encoder run directly on each tile's crop of the scene,
normalised by pretraining's own function from statistics computed here over the whole cube."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from finetune.inference import EmbedError, embed, load_head, open_embeddings, save_head

REPO = Path(__file__).resolve().parents[2]
TILE, OVERLAP = 32, 8  # debug encoder: patch 8 -> stride 24, ramps of 1 token
ROWS, COLS = 100, 40


@pytest.fixture(scope="module")
def flightline(tmp_path_factory) -> Path:
    from data_prep.simulate.corpus import simulate_corpus

    root = tmp_path_factory.mktemp("flightline")
    manifest = simulate_corpus(root, sensors=("aviris-ng",), levels=("L2",), scenes=1, size=COLS, lines=ROWS, seed=3,
                               change_pairs=False, fusion=False, progress=False)
    return root / json.loads(manifest.read_text())["products"][0]["path"]


def _scene(path: Path):
    """(granule, normalised float32 (C_good, H, W), valid (H, W), stats) computed here over the whole cube."""
    from data_prep.formats import open_product
    from data_prep.registry import get_sensor
    from data_prep.spectral import BandScaling, inverse_std, normalise
    from data_prep.stats import PartialStats
    from data_prep.tiling import prepare_block

    g = open_product(path)
    clip = get_sensor(g.sensor).level(g.level).clip
    cube, valid = g.read_rows(0, g.n_rows)
    c16, v = prepare_block(np.array(cube), np.asarray(valid), g.good_bands, clip, path=g.path, row0=0)
    acc = PartialStats.empty(g.n_bands, *clip)
    acc.add_patch(c16, v)
    st = acc.band_stats()
    good = g.good_bands
    f = np.float32
    scaling = BandScaling(st.p01[good].astype(f), st.p99[good].astype(f), st.mean[good].astype(f),
                          inverse_std(st.std[good]))
    x, _ = normalise(c16[good], v, scaling)
    return g, x, v, st


def _ramp(n_tiles: int, k: int, m: int, o: int) -> np.ndarray:
    """The documented weights: (k + 0.5) / o over the overlap facing a neighbour, 1 elsewhere."""
    w = np.ones(m)
    for t in range(o):
        if k > 0:
            w[t] = (t + 0.5) / o
        if k < n_tiles - 1:
            w[m - 1 - t] = (t + 0.5) / o
    return w


def _expected(g, x, v, fn, unit: int):
    """Blend of ``fn(tile [1, C, T, T], valid [1, T, T])`` -> [D, T/unit, T/unit] over the tile grid."""
    stride = TILE - OVERLAP
    ny = 1 if g.n_rows <= TILE else -(-(g.n_rows - TILE) // stride) + 1
    nx = 1 if g.n_cols <= TILE else -(-(g.n_cols - TILE) // stride) + 1
    hp, wp = (ny - 1) * stride + TILE, (nx - 1) * stride + TILE
    xp = np.zeros((x.shape[0], hp, wp), np.float32)
    vp = np.zeros((hp, wp), bool)
    xp[:, : g.n_rows, : g.n_cols], vp[: g.n_rows, : g.n_cols] = x, v
    m, o, s = TILE // unit, OVERLAP // unit, stride // unit
    out = None
    for i in range(ny):
        for j in range(nx):
            crop = torch.from_numpy(xp[None, :, i * stride:i * stride + TILE, j * stride:j * stride + TILE].copy())
            vc = torch.from_numpy(vp[None, i * stride:i * stride + TILE, j * stride:j * stride + TILE].copy())
            y = fn(crop, vc)
            if out is None:
                out = np.zeros((y.shape[0], hp // unit, wp // unit))
            w = _ramp(ny, i, m, o)[:, None] * _ramp(nx, j, m, o)[None, :]
            out[:, i * s:i * s + m, j * s:j * s + m] += y * w
    return out[:, : -(-g.n_rows // unit), : -(-g.n_cols // unit)], (ny, nx)


def _tokens(enc, g):
    wl = torch.tensor(g.wavelengths_nm[g.good_bands], dtype=torch.float32)
    fw = torch.tensor(g.fwhm_nm[g.good_bands], dtype=torch.float32)

    def fn(crop, vc):
        with torch.no_grad():
            t = enc(crop, wl, fw, sensor=g.sensor, level=g.level, valid=vc, gsd=g.gsd_m)
        gh = TILE // enc.patch_size
        return t[0].T.reshape(-1, gh, gh).numpy()
    return fn, wl, fw


def test_tokens_agree_with_the_encoder_on_each_tile(flightline, encoder, tmp_path):
    g, x, v, st = _scene(flightline)
    out = tmp_path / "emb.zarr"
    s = embed(encoder, flightline, out, tile=TILE, overlap=OVERLAP, batch_size=3, dtype="float32", progress=False)
    fn, _, _ = _tokens(encoder, g)
    want, (ny, nx) = _expected(g, x, v, fn, encoder.patch_size)
    grp = open_embeddings(str(out))
    got = grp["embeddings"][:]
    assert s["computed"] == ny * nx == 4 * 2 and s["normalisation"] == "scene"
    assert got.shape == (encoder.embed_dim, 13, 5) == want.shape
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # a cell covered by one tile is exactly that tile's output; the scene's statistics are the ones computed here
    n = grp.attrs["normalisation"]
    good = g.good_bands
    np.testing.assert_allclose(n["mean"], st.mean[good], rtol=1e-5)
    np.testing.assert_allclose(n["lo"], st.p01[good], rtol=1e-5)
    # per-token geolocation: mean of the token's pixels; valid fraction of the token's pixels
    lat = np.asarray(g.lat)
    assert grp["lat"][1, 2] == pytest.approx(lat[8:16, 16:24].mean(), abs=1e-9)
    assert grp["lat"][12, 4] == pytest.approx(lat[96:100, 32:40].mean(), abs=1e-9)
    assert grp["valid"][3, 1] == pytest.approx(v[24:32, 8:16].mean())
    assert grp.attrs["geotransform"] is not None and grp.attrs["sensor"] == "aviris-ng"
    assert grp["done"][:].all() and grp.attrs["complete"] is True


def test_pixels_are_each_tiles_tokens_upsampled_and_blended(flightline, encoder, tmp_path):
    g, x, v, _ = _scene(flightline)
    fn_t, _, _ = _tokens(encoder, g)

    def fn(crop, vc):
        t = torch.from_numpy(fn_t(crop, vc))[None]
        return F.interpolate(t, size=(TILE, TILE), mode="bilinear", align_corners=False)[0].numpy()

    out = tmp_path / "px.zarr"
    embed(encoder, flightline, out, output="pixels", tile=TILE, overlap=OVERLAP, batch_size=8, dtype="float32",
          progress=False)
    want, _ = _expected(g, x, v, fn, 1)
    got = zarr.open_group(str(out), mode="r")["embeddings"][:]
    assert got.shape == (encoder.embed_dim, ROWS, COLS)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_interrupted_run_resumes_by_tile_to_the_same_output(flightline, encoder, tmp_path):
    full = tmp_path / "full.zarr"
    embed(encoder, flightline, full, tile=TILE, overlap=OVERLAP, batch_size=2, dtype="float32", progress=False)
    out = tmp_path / "part.zarr"

    def stop(n):
        if n == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed(encoder, flightline, out, tile=TILE, overlap=OVERLAP, batch_size=2, dtype="float32", progress=False,
              on_batch=stop)
    grp = zarr.open_group(str(out), mode="r")
    assert grp.attrs["complete"] is False
    done = grp["done"][:]
    assert 0 < done.sum() < done.size  # the first row of tile cells is final after two strips' tiles
    with pytest.raises(EmbedError, match="incomplete"):
        open_embeddings(str(out))
    s = embed(encoder, flightline, out, tile=TILE, overlap=OVERLAP, batch_size=2, dtype="float32", progress=False)
    assert s["skipped"] > 0 and s["computed"] + s["skipped"] == 8
    np.testing.assert_allclose(open_embeddings(str(out))["embeddings"][:], zarr.open_group(str(full))["embeddings"][:],
                               atol=1e-5)
    again = embed(encoder, flightline, out, tile=TILE, overlap=OVERLAP, batch_size=2, dtype="float32", progress=False)
    assert again["computed"] == 0
    with pytest.raises(EmbedError, match="other settings.*overlap"):
        embed(encoder, flightline, out, tile=TILE, overlap=0, dtype="float32", progress=False)


def test_class_map_and_geotiff_from_a_saved_head(flightline, encoder, tmp_path):
    import tifffile

    from data_prep.formats._common import affine_from_latlon
    from data_prep.formats._geotiff import GeoTiff
    from finetune.heads import UperNet

    torch.manual_seed(1)
    enc = encoder.freeze()
    model = UperNet(enc, 3, channels=16)
    save_head(model, tmp_path / "head", ["water", "soil", "vegetation"])
    assert not (tmp_path / "head" / "encoder").exists()  # frozen encoder: not copied
    head, meta = load_head(tmp_path / "head", encoder)
    g, x, v, _ = _scene(flightline)
    _, wl, fw = _tokens(encoder, g)

    def fn(crop, vc):
        with torch.no_grad():
            return model.eval()(crop, wl, fw, sensor=g.sensor, level=g.level).softmax(1)[0].numpy()

    out = tmp_path / "cls.zarr"
    s = embed(None, flightline, out, head=head, tile=TILE, overlap=OVERLAP, batch_size=4, progress=False)
    prob, _ = _expected(g, x, v, fn, 1)
    want = np.where(v, prob.argmax(0), -1)
    got = open_embeddings(str(out))["classes"][:]
    top2 = np.sort(prob, 0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4  # ties may go either way
    np.testing.assert_array_equal(got[clear], want[clear])
    tif = Path(s["geotiff"])
    assert tif == tmp_path / "cls.tif"
    np.testing.assert_array_equal(tifffile.imread(tif), got)
    gt = GeoTiff(tif).geotransform
    np.testing.assert_allclose(gt, affine_from_latlon(g.lat, g.lon), rtol=0, atol=1e-9)
    assert json.loads(GeoTiff(tif).metadata["class_names"]) == ["water", "soil", "vegetation"]
    # an unfrozen (fine-tuned) encoder travels with the head
    save_head(UperNet(encoder.unfreeze(), 3, channels=16), tmp_path / "head2")
    assert (tmp_path / "head2" / "encoder" / "encoder.safetensors").is_file()
    h2, _ = load_head(tmp_path / "head2")
    assert h2.encoder is not encoder
    save_head(UperNet(encoder, 3, channels=16, pixel_skip=False), tmp_path / "head3")  # the head's options kept
    assert load_head(tmp_path / "head3")[0].pixel_skip is False


def test_patch_store_input_embeds_each_patch_as_pretraining_reads_it(flightline, encoder, tmp_path):
    from data_prep.ingest import ingest
    from data_prep.store import PatchStore
    from pretrain.data.reader import tables_from_store

    res = ingest([flightline], tmp_path / "stores", patch_size=16, progress=False)  # a swath 40 px wide
    url = next(iter(res["stores"]))
    store = PatchStore(url)
    out = tmp_path / "store_emb.zarr"
    s = embed(encoder, url, out, batch_size=3, dtype="float32", progress=False)
    assert s["computed"] == store.n_patches > 1
    from data_prep.spectral import BandScaling, normalise

    t = tables_from_store(store)  # what the pretraining loader normalises with
    gi = t.good_idx
    k = store.n_patches - 1
    px, va = store.read(k)
    xk, _ = normalise(px[gi], va, BandScaling(t.lo[gi], t.hi[gi], t.mean[gi], t.inv_std[gi]))
    with torch.no_grad():
        tok = encoder(torch.from_numpy(xk)[None], torch.from_numpy(t.wavelengths[t.good_idx]),
                      torch.from_numpy(t.fwhm[t.good_idx]), sensor=store.sensor, level=store.level,
                      valid=torch.from_numpy(va)[None], gsd=float(t.gsd[k]))
    grp = open_embeddings(str(out))
    np.testing.assert_allclose(grp["embeddings"][k], tok[0].T.reshape(-1, 2, 2).numpy(), atol=1e-5)
    np.testing.assert_array_equal(grp["meta/row"][:], store.meta("row"))


def test_cli_embeds_and_reports_bad_input_with_exit_2(flightline, debug_export, tmp_path, capsys):
    cli = _launch("embed")
    out = tmp_path / "cli.zarr"
    assert cli.main(["--checkpoint", str(debug_export), str(flightline), "--out", str(out), "--tile", "32",
                     "--overlap", "8", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["complete"] and summary["peak_rss_mb"] > 0
    assert zarr.open_group(str(out), mode="r")["embeddings"].dtype == np.float16
    assert cli.main(["--checkpoint", str(debug_export), str(flightline), "--out", str(tmp_path / "x.zarr"),
                     "--tile", "30"]) == 2
    assert "tile 30 must be a positive multiple of the encoder's patch size 8" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(debug_export), str(tmp_path / "missing.hdr"), "--out",
                     str(tmp_path / "y.zarr")]) == 2
    assert "missing.hdr" in capsys.readouterr().err
    assert not (tmp_path / "y.zarr").exists()


def test_finetune_cli_saves_a_head_that_embed_cli_applies(flightline, debug_export, tiny_corpus, tmp_path, capsys):
    """launch/finetune.py --save-head -> launch/embed.py --head: the class map is the saved head's own output
    on each tile (the fine-tuned encoder travels in the head folder, so embed needs no --checkpoint)."""
    ft, cli = _launch("finetune"), _launch("embed")
    head_dir = tmp_path / "head"
    assert ft.main(["--config", str(REPO / "configs/finetune/synthetic_segmentation.yaml"), "--checkpoint",
                    str(debug_export), "--out", str(tmp_path / "ft"), "--data", str(tiny_corpus), "--save-head",
                    str(head_dir), "train.steps=2", "data.band_stride=16", "head.channels=8"]) == 0
    meta = json.loads((head_dir / "head.json").read_text())
    assert (head_dir / "encoder" / "encoder.safetensors").is_file()  # train.mode finetune: the encoder changed
    assert meta["class_names"] and meta["n_classes"] == len(meta["class_names"]) and meta["channels"] == 8
    out = tmp_path / "cls.zarr"
    assert cli.main([str(flightline), "--head", str(head_dir), "--out", str(out), "--tile", str(TILE), "--overlap",
                     str(OVERLAP), "--no-progress"]) == 0
    head, _ = load_head(head_dir)
    g, x, v, _ = _scene(flightline)
    _, wl, fw = _tokens(head.encoder, g)

    def fn(crop, vc):
        with torch.no_grad():
            return head(crop, wl, fw, sensor=g.sensor, level=g.level).softmax(1)[0].numpy()

    prob, _ = _expected(g, x, v, fn, 1)
    got = open_embeddings(str(out))["classes"][:]
    top2 = np.sort(prob, 0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4  # ties may go either way
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(got[clear], np.where(v, prob.argmax(0), -1)[clear])
    # a head needs a segmentation task
    assert ft.main(["--config", str(REPO / "configs/finetune/synthetic_linear_probe.yaml"), "--checkpoint",
                    str(debug_export), "--out", str(tmp_path / "ft2"), "--data", str(tiny_corpus), "--save-head",
                    str(tmp_path / "h2")]) == 2
    assert "--save-head writes segmentation heads" in capsys.readouterr().err
    assert not (tmp_path / "h2").exists() and not (tmp_path / "ft2").exists()


def _launch(name: str):
    """Import launch/<name>.py by path (launch/ on sys.path would shadow the packages)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
