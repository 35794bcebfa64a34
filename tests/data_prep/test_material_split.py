"""The pretraining / held-out material split and scenes over a large pool (issue 11: a simulator worth
pretraining on)."""

import json

import numpy as np
import pytest

from data_prep.simulate.library import (
    CLASSES,
    DUPLICATE_ANGLE,
    LibraryError,
    duplicate_groups,
    load_library,
    split_materials,
    usable,
)
from data_prep.simulate.scene import abundances, labels_of, make_scene, render_block, swap_regions


@pytest.fixture(scope="module")
def lib(real_data):
    return load_library(real_data / "ecostress_library_with_mixtures.hdr")


def _angles(lib, a, b):
    s = lib.spectra[:, ::5]
    u = s / np.linalg.norm(s, axis=1, keepdims=True)
    return np.arccos(np.clip(u[a] @ u[b].T, -1, 1))


def test_split_is_disjoint_complete_fixed_and_far_from_pretraining(lib):
    pre, held, every = (split_materials(lib, s) for s in ("pretrain", "heldout", "all"))
    assert not set(pre) & set(held)
    assert set(pre) | set(held) == set(every) == set(np.flatnonzero(usable(lib)).tolist())
    assert len(every) > 1900 and 0.2 < len(held) / len(every) < 0.35  # every usable material, not 3 per class
    assert split_materials(lib, "heldout") == held  # no seed: every corpus holds out the same materials
    for c in CLASSES:
        if sum(lib.classes[i] == c for i in every) >= 3:
            assert any(lib.classes[i] == c for i in pre) and any(lib.classes[i] == c for i in held), c
    # no held-out spectrum is a near-duplicate of a pretraining one
    assert _angles(lib, held, pre).min() >= DUPLICATE_ANGLE
    # ordered by class, then library order
    keys = [(CLASSES.index(lib.classes[i]), i) for i in held]
    assert keys == sorted(keys)
    with pytest.raises(LibraryError, match="subset"):
        split_materials(lib, "test")


def test_duplicate_groups_chain_close_spectra():
    base = np.ones((1, 100))
    tilt = np.linspace(0, 1, 100)[None]
    spectra = np.concatenate([base, base + 0.01 * tilt, base + 0.02 * tilt, base + 2.0 * tilt])
    g = duplicate_groups(spectra, angle=0.01)
    assert g[0] == g[1] == g[2] != g[3]


def test_scene_over_a_large_pool_uses_its_own_few_materials(lib):
    pool = split_materials(lib, "pretrain")
    classes = [lib.classes[i] for i in pool]
    seen_classes = []
    for seed in range(6):
        sc = make_scene(np.random.default_rng(seed), classes, materials_per_scene=24)
        k = sc.material_count(len(pool))
        assert k == 24 and sc.materials.min() >= 0 and sc.materials.max() < len(pool)
        assert sc.spectra_of(lib.spectra[pool]).shape[0] == 24
        blk = render_block(sc, 48, 48, 0, 48)
        ab = abundances(sc, blk, k)
        assert ab.shape == (24, 48, 48) and (ab >= -1e-12).all()
        np.testing.assert_allclose(ab.sum(0), 1.0, atol=1e-9)
        lab = labels_of(sc, blk)
        assert set(np.unique(lab[lab >= 0])) <= set(sc.materials.tolist())
        with pytest.raises(ValueError, match="local materials"):
            abundances(sc, blk, len(pool))
        seen_classes.append(classes[int(np.bincount(lab[lab >= 0]).argmax())])
        # mixing across classes: some pixels hold a real fraction of another class than their label's
        local_cls = np.array([classes[int(i)] for i in sc.materials])
        own = np.array([[ab[local_cls == classes[int(lab[y, x])], y, x].sum() if lab[y, x] >= 0 else 1.0
                         for x in range(48)] for y in range(48)])
        if (sc.other >= 0).any():
            assert (own < 0.9).mean() > 0.01
    assert len(set(seen_classes)) >= 3  # scenes differ in what dominates them


def test_scene_variety_and_change_pairs_stay_local(lib):
    pool = split_materials(lib, "heldout")
    classes = [lib.classes[i] for i in pool]
    scenes = [make_scene(np.random.default_rng(s), classes, materials_per_scene=12) for s in range(8)]
    for attr in ("mix_width", "illum_amp", "warp_amp", "brightness", "n_regions"):
        assert len({round(float(getattr(s, attr)), 6) for s in scenes}) >= 6, attr
    sc = scenes[0]
    changed, swapped = swap_regions(sc, np.random.default_rng(1), classes)
    assert changed.materials is sc.materials and swapped.size >= 1
    for r in swapped:
        assert classes[int(sc.materials[changed.primary[r]])] != classes[int(sc.materials[sc.primary[r]])]
        assert changed.other[r] == -1


def test_heldout_corpus_labels_only_heldout_materials(tmp_path, lib):
    from data_prep.simulate.corpus import simulate_corpus

    man = simulate_corpus(tmp_path, sensors=("emit",), levels=("L2",), size=16, change_pairs=False, fusion=False,
                          progress=False, materials="heldout")
    m = json.loads(man.read_text())
    held = split_materials(lib, "heldout")
    assert m["materials"] == [lib.name(i) for i in held] and m["material_subset"] == "heldout"
    (p,) = m["products"]
    labels = np.load(tmp_path / p["materials"])["labels"]
    assert labels.max() < len(held) and (labels >= 0).any()
