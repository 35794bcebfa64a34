"""Fault injection, data side: deleted and truncated chunks, kill -9 of a parallel ingest.

(Kept here until helper ``seams``'s tests/test_faults.py is on main; then these cases move there.)

- Delete and truncate chunk objects: ``verify`` names them by index (exit 1); the loader logs each
  one, substitutes it and never feeds its zeros.
- kill -9 of ``ingest --workers 2`` mid-run: its worker processes exit (no orphans), and a rerun
  gives a store identical to an uninterrupted ingest (same files, same bytes decoded, same attributes).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr

from data_prep import store as st
from data_prep.cli import main
from data_prep.store import PatchStore
from pretrain.data import DataConfig, SourceConfig, build_loader
from tests.data_prep.test_ingest import make_cube, make_granule
from tests.pretrain.data_fixtures import make_store

REPO = Path(__file__).resolve().parents[2]


def _shard(url, array, i) -> Path:
    return Path(url, array, "c", str(i), *(["0"] * (3 if array == "patches" else 2)))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_verify_finds_deleted_and_truncated_chunks_by_index(tmp_path, capsys):
    from data_prep.ingest import ingest_granules

    root = str(tmp_path / "root")
    ingest_granules([make_granule(make_cube(rows=64, cols=64, seed=k), f"g{k}") for k in range(2)], root,
                    patch_size=32, progress=False)
    url = st.store_url(root, "enmap", "L2")
    assert main(["verify", url, "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["whole"]
    _shard(url, "patches", 2).unlink()
    _truncate(_shard(url, "patches", 5))
    _shard(url, "valid", 7).unlink()
    assert main(["verify", url, "--json", "--no-progress"]) == 1
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (rep["missing"], rep["corrupt"], rep["nan"]) == ([2, 7], [5], [])
    assert {p["index"]: p["granule"] for p in rep["problems"]} == {2: "g0", 5: "g1", 7: "g1"}
    assert rep["objects"] == {"patches": 7, "valid": 7}
    assert main(["verify", url, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "missing: 2 patch(es): [2, 7]" in out and "corrupt: 1 patch(es): [5]" in out


def _loader_cfg(url: str) -> DataConfig:
    return DataConfig(sources=[SourceConfig(url)], batch_size=4, crop=16, band_window=24, band_stride=8, epochs=1,
                      num_workers=2, max_bad_fraction=1.0, max_bad_batch_fraction=1.0, sensor_dropout=0.0)


def test_loader_logs_a_deleted_chunk_substitutes_it_and_never_feeds_zeros(tmp_path, caplog):
    url = str(tmp_path / "emit_L2.zarr")
    make_store(url, n=24, seed=4)
    clean = list(build_loader(_loader_cfg(url)))
    lost = clean[0]["meta"]["index"][1]  # a patch the first batch draws
    _shard(url, "patches", lost).unlink()
    with caplog.at_level(logging.WARNING, logger="pretrain.data.loader"):
        loader = build_loader(_loader_cfg(url))
        got = list(loader)
    assert len(got) == len(clean) and loader.bad_samples == 1
    msgs = [r.getMessage() for r in caplog.records if f"patch {lost} " in r.getMessage()]
    assert len(msgs) == 1 and "MissingDataError" in msgs[0] and "reads NaN" in msgs[0], caplog.text
    for c, g in zip(clean, got):
        for j, (ci, gi) in enumerate(zip(c["meta"]["index"], g["meta"]["index"])):
            px = g["pixels"][j]
            assert gi != lost and float(px.abs().sum()) > 0  # never the lost patch, never a black sample
            if ci == lost:
                assert g["meta"]["replaces"][j] == lost
            else:
                assert np.array_equal(px.numpy(), c["pixels"][j].numpy())


def _products(d: Path, n: int = 4, size: int = 64) -> None:
    from data_prep.formats import write_product

    for k in range(n):
        write_product(d, sensor="aviris-ng", level="L1", name=f"ang2021010{k}t000000_rdn",
                      cube=make_cube(rows=size, cols=size, sensor="aviris-ng", seed=30 + k) * 10)


def _is_worker(p: psutil.Process) -> bool:
    """An ingest worker (not multiprocessing's resource tracker); a process that exits while it is looked at
    (zombie or gone: the poll races the workers' own lifetimes) is not counted."""
    try:
        return "resource_tracker" not in " ".join(p.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _ingest_cmd(inp: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "data_prep", "ingest", str(inp), "--out", str(out), "--patch-size", "32",
            "--workers", str(workers), "--no-progress"]


def _committed(url: str) -> int:
    try:
        return int(json.loads(Path(url, "zarr.json").read_text())["attributes"]["n_patches"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _files(url: str) -> dict[str, bytes]:
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_kill9_of_a_parallel_ingest_leaves_no_orphans_and_rerun_gives_the_same_store(tmp_path):
    pytest.importorskip("data_prep.formats")
    from data_prep.ingest import ingest

    inp = tmp_path / "in"
    _products(inp)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    ingest([str(inp)], str(ref), patch_size=32, progress=False)  # uninterrupted, serial, in this process
    out = tmp_path / "out"
    url = st.store_url(str(out), "aviris-ng", "L1")
    proc = subprocess.Popen(_ingest_cmd(inp, out, 2), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        parent = psutil.Process(proc.pid)
        workers: list[psutil.Process] = []
        # kill once a granule is committed and the workers are up (progress, not a clock, decides when)
        while proc.poll() is None and not (_committed(url) > 0 and len(workers) >= 2):
            workers = [c for c in parent.children(recursive=True) if _is_worker(c)]
            time.sleep(0.02)
        assert proc.poll() is None, "the ingest finished before it could be killed: make the input larger"
        children = parent.children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(workers) >= 2
    # every process the ingest started exits on its own (a generous bound: a loaded box is slow, a leak is forever)
    _, alive = psutil.wait_procs(children, timeout=120)
    for p in alive:  # do not leave them behind when the check fails
        p.kill()
    assert not alive, f"orphans after kill -9 of the ingest: {[p.pid for p in alive]}"
    killed_at = _committed(url)
    assert 0 < killed_at < _committed(st.store_url(str(ref), "aviris-ng", "L1"))
    done = subprocess.run(_ingest_cmd(inp, out, 2), cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = _files(url), _files(st.store_url(str(ref), "aviris-ng", "L1"))
    assert sorted(a) == sorted(b)  # no orphan chunk, no temporary file
    ga, gb = zarr.open_group(url, mode="r"), zarr.open_group(st.store_url(str(ref), "aviris-ng", "L1"), mode="r")
    assert dict(ga.attrs) == dict(gb.attrs)
    for name in ["patches", "valid", *(f"meta/{k}" for k in st.META_FIELDS)]:
        np.testing.assert_array_equal(ga[name][:], gb[name][:])
    sa, sb = PatchStore(url), PatchStore(st.store_url(str(ref), "aviris-ng", "L1"))
    np.testing.assert_array_equal(sa.partials().hist, sb.partials().hist)
