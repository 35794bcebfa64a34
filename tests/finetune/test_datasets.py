"""Every loader reads its distributed format from tiny files written here; bad input gives clear errors."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import tifffile

from finetune.datasets import (
    DatasetError,
    load_aerorit,
    load_bay_area,
    load_change_mat,
    load_dataset,
    load_fusion_pair,
    load_santa_barbara,
    load_scene_dir,
    load_scene_folders,
    synthetic_change,
    synthetic_classification,
    synthetic_fusion,
    synthetic_segmentation,
)

G = np.random.default_rng(0)


def write_gdal_tif(path: Path, cube_hwc: np.ndarray, interleave: str = "pixel") -> None:
    """A multi-band GeoTIFF-style file as GDAL writes it: pixel-interleaved (contig) or band-interleaved."""
    if interleave == "pixel":
        tifffile.imwrite(path, cube_hwc, photometric="minisblack", planarconfig="contig")
    else:
        tifffile.imwrite(path, np.moveaxis(cube_hwc, -1, 0), photometric="minisblack", planarconfig="separate")


def _labels(h=12, w=10, k=3):
    return G.integers(0, k, (h, w)).astype(np.uint8)


def write_mat73(path: Path, **arrays) -> None:
    """A MATLAB v7.3 file: HDF5 with the 512-byte MATLAB user block; arrays stored column-major (axes reversed)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=np.ascontiguousarray(np.asarray(v).T))
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .".ljust(116))


def test_aerorit_as_distributed(tmp_path):
    from tests.finetune.fixtures import write_aerorit

    f = write_aerorit(tmp_path)
    d = load_aerorit(tmp_path)
    assert d.image.shape == (51, 56 - 53, 2250 - 7) and np.allclose(d.image[:, 1, 4], f["cube"][:, 54, 11])
    assert d.class_names == ["buildings", "vegetation", "roads", "water", "cars"]
    idx = f["index"][53:, 7:]
    assert ((d.labels == -1) == (idx == 5)).all() and (d.labels[idx < 5] == idx[idx < 5]).all()
    assert d.spectral.wavelengths[0] == 400 and d.spectral.wavelengths[-1] == 900
    assert d.train_mask[:, :1728].all() and not d.train_mask[:, 1728:].any()
    assert d.test_mask[:, 2240:].all() and not d.test_mask[:, :2240].any()  # validation columns in neither


def test_labels_outside_class_list_error(tmp_path):
    write_gdal_tif(tmp_path / "scene.tif", G.random((12, 10, 51)).astype(np.float32), "band")
    lab = _labels(k=5)
    lab[2, 2] = 7
    tifffile.imwrite(tmp_path / "labels.tif", lab)
    with pytest.raises(DatasetError, match=r"label values \[7\] are outside the class list"):
        load_scene_dir(tmp_path, image="scene.tif", labels="labels.tif", class_names=list("abcde"),
                       wavelengths={"start": 400, "step": 10})


def test_whu_h2sr_envi_scene_with_header_wavelengths(tmp_path):
    import spectral.io.envi as envi

    cube = G.random((12, 10, 8)).astype(np.float32)
    wl = [500 + 50 * i for i in range(8)]
    envi.save_image(str(tmp_path / "scene.hdr"), cube, metadata={"wavelength": wl, "fwhm": [10] * 8}, force=True)
    tifffile.imwrite(tmp_path / "label.tif", (_labels() + 1).astype(np.uint8))
    d = load_dataset({"loader": "whu_h2sr", "root": str(tmp_path), "image": "scene.hdr", "labels": "label.tif",
                      "class_names": ["a", "b", "c"], "label_values": [1, 2, 3], "ignore_values": [0]})
    assert d.image.shape == (8, 12, 10) and list(d.spectral.wavelengths) == wl
    assert d.labels.min() == 0 and d.labels.max() == 2


def test_qingpu_mat_v5_and_band_indices(tmp_path):
    cube = G.random((12, 10, 20)).astype(np.float32)
    scipy.io.savemat(tmp_path / "Qingpu.mat", {"data": cube})
    scipy.io.savemat(tmp_path / "Qingpu_gt.mat", {"map": _labels()})
    d = load_scene_dir(tmp_path, image="Qingpu.mat", labels="Qingpu_gt.mat", class_names=["a", "b", "c"],
                       wavelengths={"start": 400, "step": 25}, band_indices=[0, 2, 4, 19])
    assert d.image.shape == (4, 12, 10) and np.allclose(d.image[3], cube[..., 19])
    assert list(d.spectral.wavelengths) == [400, 450, 500, 875]
    with pytest.raises(DatasetError, match="no band table"):
        load_scene_dir(tmp_path, image="Qingpu.mat", labels="Qingpu_gt.mat", class_names=["a", "b", "c"])
    with pytest.raises(DatasetError, match="not a directory"):
        load_scene_dir(tmp_path / "missing", image="Qingpu.mat", labels="Qingpu_gt.mat", class_names=["a"])


def _change_arrays(h=9, w=7, c=224):
    t1 = G.random((h, w, c)).astype(np.float32)
    t2 = G.random((h, w, c)).astype(np.float32)
    gt = G.integers(0, 3, (h, w)).astype(np.uint8)  # 0 unknown, 1 change, 2 no change
    return t1, t2, gt


def test_bay_area_as_distributed(tmp_path):
    from tests.finetune.fixtures import write_citius_change

    f = write_citius_change(tmp_path, "bay_area")
    d = load_bay_area(tmp_path, drop_bad_bands=False)
    assert d.t1.shape == (224, 9, 7) and np.allclose(d.t2[:, 4, 3], f["t2"][4, 3])
    gt = f["gt"]
    assert ((d.change == 1) == (gt == 1)).all() and ((d.change == 0) == (gt == 2)).all() and ((d.change == -1) == (gt == 0)).all()
    np.testing.assert_allclose(d.spectral.wavelengths, f["wavelengths"], atol=1e-3)  # from waves.txt
    assert d.spectral.sensor == "aviris-classic"
    dd = load_bay_area(tmp_path)  # bands pretraining never sees (AVIRIS-Classic's bad-band ranges) dropped
    assert dd.t1.shape[0] < 224 and not ((dd.spectral.wavelengths > 1340) & (dd.spectral.wavelengths < 1460)).any()
    s = load_dataset({"loader": "santa_barbara", "root": str(write_citius_change(tmp_path / "sb", "santa_barbara")["root"])})
    assert s.name == "santa_barbara" and s.t1.shape[1:] == (9, 7)


def test_santa_barbara_mat_v73_and_other_names(tmp_path):
    t1, t2, gt = _change_arrays()
    write_mat73(tmp_path / "barbara_2013.mat", imgh=t1)
    write_mat73(tmp_path / "barbara_2014.mat", imgh=t2)
    write_mat73(tmp_path / "barbara_gtChanges.mat", gt=gt)
    d = load_santa_barbara(tmp_path, drop_bad_bands=False)  # default key absent; single variable is taken
    assert d.t1.shape == (224, 9, 7) and np.allclose(d.t1[:, 2, 5], t1[2, 5])
    assert ((d.change == 1) == (gt == 1)).all()
    with pytest.raises(DatasetError, match="missing"):
        load_santa_barbara(tmp_path / "nowhere")


def test_hrssc_class_folders_tif_and_mat_with_band_subset(tmp_path):
    for k, cls in enumerate(("farmland", "urban")):
        (tmp_path / cls).mkdir()
        for i in range(2):
            patch = (G.random((16, 16, 24)) + k).astype(np.float32)
            if i == 0:
                write_gdal_tif(tmp_path / cls / f"{cls}_{i}.tif", patch, "band" if k else "pixel")
            else:
                scipy.io.savemat(tmp_path / cls / f"{cls}_{i}.mat", {"data": patch})
    idx = list(range(0, 24, 2))
    d = load_scene_folders(tmp_path, band_indices=idx, wavelengths={"start": 400, "step": 10})
    assert d.patches.shape == (4, 12, 16, 16) and d.class_names == ["farmland", "urban"]
    assert list(d.labels) == [0, 0, 1, 1] and d.spectral.wavelengths[1] == 420
    with pytest.raises(DatasetError, match="band index list has 30 entries but the image has only 24 bands"):
        load_scene_folders(tmp_path, band_indices=list(range(30)), wavelengths={"start": 400, "step": 10})
    with pytest.raises(DatasetError, match="one sub-folder per class"):
        load_scene_folders(tmp_path / "urban", wavelengths={"start": 400, "step": 10})


def test_emit_planetscope_pair_through_open_product(tmp_path):
    from data_prep.formats import write_product
    from data_prep.registry import get_sensor

    emit = get_sensor("emit")
    hs = (G.random((emit.n_bands, 6, 5)) * 0.5).astype(np.float32)
    ms = (G.random((get_sensor("planetscope").n_bands, 18, 15)) * 0.5).astype(np.float32)
    hp = write_product(tmp_path / "hs", sensor="emit", level="L2", cube=hs)
    mp = write_product(tmp_path / "ms", sensor="planetscope", level="L2", cube=ms)
    d = load_fusion_pair(hp, mp)
    assert d.ratio == 3 and d.ms.shape[1:] == (18, 15) and d.hs.shape[1:] == (6, 5)
    assert d.hs.shape[0] == d.hs_spectral.wavelengths.size < emit.n_bands  # bad bands dropped
    assert d.ms_spectral.sensor == "planetscope"


def test_synthetic_tasks_from_manifest(tiny_corpus):
    seg = synthetic_segmentation(tiny_corpus, band_stride=8)
    assert seg.image.shape[1:] == seg.labels.shape and seg.labels.max() == len(seg.class_names) - 1
    ch = synthetic_change(tiny_corpus, band_stride=8)
    assert ch.t1.shape == ch.t2.shape and set(np.unique(ch.change)) <= {-1, 0, 1} and (ch.change == 1).any()
    cls = synthetic_classification(tiny_corpus, tile=8, band_stride=8)
    assert cls.patches.shape[1:] == (seg.image.shape[0], 8, 8) and len(cls.class_names) >= 2
    fu = synthetic_fusion(tiny_corpus, band_stride=8)
    assert fu.ratio == 3 and fu.ms.shape[1] == fu.hs.shape[1] * 3
    with pytest.raises(DatasetError, match="manifest.json"):
        synthetic_segmentation(Path(tiny_corpus).parent / "nope")
    with pytest.raises(DatasetError, match="no 'scene' product of sensor=aviris-3"):
        synthetic_segmentation(tiny_corpus, sensor="aviris-3")


def test_wrong_layout_and_unknown_keys_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="image_hsi_reflectance.tif does not exist"):
        load_aerorit(tmp_path)
    with pytest.raises(DatasetError, match=r"unknown key\(s\) \['colour'\]"):
        load_dataset({"loader": "aerorit", "root": str(tmp_path), "colour": 1})
    with pytest.raises(DatasetError, match="unknown dataset loader"):
        load_dataset({"loader": "pavia"})
    (tmp_path / "x.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DatasetError, match="not a readable MATLAB file"):
        load_change_mat(tmp_path / "x.mat", tmp_path / "x.mat", tmp_path / "x.mat")


def test_qingpu_as_distributed_with_its_published_split(tmp_path):
    from tests.finetune.fixtures import write_qingpu

    f = write_qingpu(tmp_path)
    d = load_dataset({"loader": "qingpu", "root": str(tmp_path), "roi_size": f["roi"], "train_per_class": 2})
    gt = f["gt"].astype(np.int64)
    assert d.image.shape == (6, 40, 48) and np.allclose(d.image[:, 5, 7], f["cube"][:, 5, 7])
    np.testing.assert_allclose(d.spectral.wavelengths, f["wavelengths"], atol=1e-3)  # from the ENVI header
    assert len(d.class_names) == 20 and ((d.labels == -1) == (gt == 0)).all() and (d.labels[gt > 0] == gt[gt > 0] - 1).all()
    window = np.zeros(gt.shape, bool)
    for x, y in f["rois"]:
        window[y:y + 8, x:x + 8] = True
    assert (d.test_mask == ~window).all()  # test = everything outside the ROI windows
    assert (d.train_mask <= (window & (gt > 0))).all()  # training pixels only from labelled window pixels
    per_class = np.bincount(d.labels[d.train_mask], minlength=20)
    present = np.bincount(gt[window & (gt > 0)] - 1, minlength=20) > 0
    assert (per_class[present] == np.minimum(2, np.bincount(gt[window & (gt > 0)] - 1, minlength=20)[present])).all()
    again = load_dataset({"loader": "qingpu", "root": str(tmp_path), "roi_size": 8, "train_per_class": 2})
    assert (again.train_mask == d.train_mask).all()  # the draw is seeded
    (tmp_path / "Qingpu_HSI_rois.txt").unlink()  # without the file: PatchOut's 16 windows, outside this tiny scene
    with pytest.raises(DatasetError, match="ROI window at x=19877"):
        load_dataset({"loader": "qingpu", "root": str(tmp_path)})


def test_mshfnet_emit_planetscope_as_its_code_reads_it(tmp_path):
    from data_prep.registry import get_sensor
    from tests.finetune.fixtures import write_mshfnet

    f = write_mshfnet(tmp_path)
    d = load_dataset({"loader": "mshfnet", "root": str(tmp_path), "area": "1_SF", "split": "train"})
    good = get_sensor("emit").good_band_mask(f["wavelengths"], f["good"])  # the file's flags and the registry's ranges
    assert good.sum() < f["good"].sum()
    assert d.ratio == 15 and d.hs.shape == (int(good.sum()), 3, 4) and d.ms.shape == (8, 45, 60)
    assert np.allclose(d.hs[:, 1, 2], f["emit"][1, 2, good]) and np.allclose(d.ms[:, 7, 9], f["planet"][7, 9])
    np.testing.assert_allclose(d.hs_spectral.wavelengths, f["wavelengths"][good], rtol=1e-6)
    assert list(d.ms_spectral.wavelengths) == [443, 490, 531, 565, 610, 665, 705, 865]
    assert d.hs_spectral.sensor == "emit" and d.ms_spectral.sensor == "planetscope" and d.hs_valid.all()
    # PlanetScope at its native 3 m: resampled to the authors' 4 m grid (45 x 60 pixels over the same extent)
    g = write_mshfnet(tmp_path / "native", split="test", planet_pixel=3.0)
    e = load_dataset({"loader": "mshfnet", "root": str(tmp_path / "native"), "split": "test"})
    assert e.ratio == 15 and e.ms.shape == (8, 45, 60) and g["planet"].shape[:2] == (60, 80)
    assert abs(float(e.ms.mean()) - float(g["planet"].mean())) < 0.01
    with pytest.raises(DatasetError, match="3_validate_EMIT.tif"):
        load_dataset({"loader": "mshfnet", "root": str(tmp_path), "split": "validate"})
    with pytest.raises(DatasetError, match="integer ratio"):
        load_dataset({"loader": "mshfnet", "root": str(tmp_path), "hr_resolution": 7.0})


def test_whu_h2sr_without_a_layout_says_what_to_name(tmp_path):
    with pytest.raises(DatasetError, match=r"not known to this build; name \['image', 'labels', 'class_names'\]"):
        load_dataset({"loader": "whu_h2sr", "root": str(tmp_path)})
