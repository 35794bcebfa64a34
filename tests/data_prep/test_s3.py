"""Object storage for real: ingest into, verify, shard and train from an S3 endpoint on localhost.

moto's server mode serves a real HTTP S3 API; s3fs (through fsspec and zarr) talks to it with the credentials
and endpoint from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), as on a
cluster. The commands run as subprocesses, so nothing is shared with the test process but the server.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import moto.server as moto_server  # the test extra installs moto[server] and s3fs: never skipped
import numpy as np
import pytest
import s3fs  # noqa: F401
import yaml

from data_prep import store as st
from data_prep.dataset import dataset_url, open_store
from pretrain.data import DataConfig, SourceConfig, build_loader
from tests import watch
from tests.data_prep.test_ingest import make_cube
from tests.launching import EXTENSIONS_DIR, torchrun_cmd

REPO = Path(__file__).resolve().parents[2]
BUCKET = "specfm-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free localhost port, its bucket, and the environment that points clients at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    d = tmp_path_factory.mktemp("s3")
    formats = pytest.importorskip("data_prep.formats")
    for k in range(3):
        formats.write_product(d / "in", sensor="aviris-ng", level="L1", name=f"ang2024010{k}t000000_rdn",
                              cube=make_cube(rows=32, cols=32, sensor="aviris-ng", seed=70 + k) * 10)
    try:
        yield {"env": {**os.environ, **env}, "dir": d, "root": f"s3://{BUCKET}/root"}
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cli(s3, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in s3["env"].items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def ingested(s3):
    r = _cli(s3, "ingest", str(s3["dir"] / "in"), "--out", s3["root"], "--patch-size", "16", "--workers", "2",
             "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    local = str(s3["dir"] / "local")
    r2 = _cli(s3, "ingest", str(s3["dir"] / "in"), "--out", local, "--patch-size", "16", "--no-progress")
    assert r2.returncode == 0, r2.stderr
    return st.store_url(s3["root"], "aviris-ng", "L1"), st.store_url(local, "aviris-ng", "L1")


def test_ingest_into_s3_equals_local_and_inspect_verify_see_it(s3, ingested):
    url, local = ingested
    a, b = st.PatchStore(url), st.PatchStore(local)
    assert a.n_patches == b.n_patches == 12 and a.attrs["stats"] == b.attrs["stats"]
    for x, y in zip(a.read_range(0, 12), b.read_range(0, 12)):
        np.testing.assert_array_equal(x, y)
    r = _cli(s3, "inspect", s3["root"], "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])["stores"][0]
    assert d["url"] == url and d["patches"] == 12 and d["shard_objects"] == {"patches": 12, "valid": 12}
    r = _cli(s3, "verify", url, "--json", "--no-progress")
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["whole"]


def test_a_lost_object_in_s3_is_found_and_never_trained_on(s3, ingested, tmp_path, caplog):
    import boto3

    url, _ = ingested
    copy = f"s3://{BUCKET}/lossy/aviris-ng_L1.zarr"
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.copy(url.removeprefix("s3://"), copy.removeprefix("s3://"), recursive=True)
    boto3.client("s3").delete_object(Bucket=BUCKET, Key="lossy/aviris-ng_L1.zarr/patches/c/4/0/0/0")
    r = _cli(s3, "verify", copy, "--json", "--no-progress")
    assert r.returncode == 1
    assert json.loads(r.stdout.strip().splitlines()[-1])["missing"] == [4]
    cfg = DataConfig(sources=[SourceConfig(copy)], batch_size=4, crop=16, band_window=32, band_stride=16, epochs=1,
                     num_workers=2, max_bad_fraction=1.0, sensor_dropout=0.0)
    with caplog.at_level(logging.WARNING, logger="pretrain.data.loader"):
        loader = build_loader(cfg)
        batches = list(loader)
        loader.close()  # its reader processes stop now, not after pytest exits
    assert len(batches) == 3 and all(4 not in b["meta"]["index"] for b in batches)
    assert any("patch 4 " in m.getMessage() and "MissingDataError" in m.getMessage() for m in caplog.records)


def test_sharded_ingest_into_s3_is_one_logical_dataset(s3, ingested):
    root = f"s3://{BUCKET}/sharded"
    for k in range(2):
        r = _cli(s3, "ingest", str(s3["dir"] / "in"), "--out", root, "--patch-size", "16", "--shard", f"{k}/2",
                 "--no-progress")
        assert r.returncode == 0, r.stderr
    ds = open_store(dataset_url(root, "aviris-ng", "L1"))
    one = st.PatchStore(ingested[1])
    assert ds.n_patches == one.n_patches
    np.testing.assert_array_equal(ds.stats.count, one.stats.count)
    np.testing.assert_allclose(ds.stats.mean, one.stats.mean, rtol=1e-12)


def test_train_from_s3(s3, ingested, tmp_path):
    """Two steps of the debug model under torchrun, its data read from the S3 store by process workers."""
    url, _ = ingested
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"sources": [{"url": url}], "crop": 16, "band_window": 16, "band_stride": 8, "num_workers": 1,
                 "worker_type": "process"},
        "model": {"name": "debug"},
        "parallel": {"zero_stage": 0, "micro_batch": 2, "grad_accum": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "checkpoint": {"every": 2, "keep": 1},
        "logging": {"wandb": "disabled", "every": 1, "viz_every": 0, "progress": False},
        "stages": [{"name": "s3", "steps": 2}],
    }
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in s3["env"].items() if k != "PYTHONPATH"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               TORCH_EXTENSIONS_DIR=EXTENSIONS_DIR)
    r = watch.run(torchrun_cmd(REPO / "launch/pretrain.py", "--config", path, nproc=1), cwd=REPO, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(np.isfinite(losses))
