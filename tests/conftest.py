import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("SPECFM_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real files of ../shared/data/real (CI has shared/ beside the checkout)."""
    if not (REAL_DATA / "ang20170323t202244_rdn_7000-7010.hdr").exists():
        pytest.fail(f"real data not found at {REAL_DATA}; set SPECFM_REAL_DATA")
    return REAL_DATA


@pytest.fixture(scope="session")
def colocated_root(tmp_path_factory) -> dict:
    """Co-located products of 3 locations seen by EnMAP, EMIT, Sentinel-2, PlanetScope and Landsat 9 OLI (960 m
    squares, each in its real product layout), made
    through the command line: ``simulate --colocated``, ``ingest --patch-size-for``, ``colocate``. Shared by the
    data_prep and pretrain co-location tests (one simulation per session)."""
    from data_prep.cli import main

    d = tmp_path_factory.mktemp("colocated")
    raw, stores = d / "raw", d / "stores"
    assert main(["simulate", "--colocated", "--out", str(raw), "--sensors", "enmap", "emit", "sentinel-2",
                 "planetscope", "landsat-8-9-oli", "--levels", "L2", "--scenes", "3", "--extent-m", "960", "--seed", "3",
                 "--no-progress"]) == 0
    assert main(["ingest", str(raw), "--out", str(stores), "--patch-size", "32", "--patch-size-for", "emit=16",
                 "sentinel-2=96", "planetscope=320", "--no-progress"]) == 0
    assert main(["colocate", str(stores), "--no-progress"]) == 0
    return {"raw": raw, "stores": stores, "sensors": ("enmap", "emit", "sentinel-2", "planetscope", "landsat-8-9-oli"),
            "manifest": json.loads((raw / "manifest.json").read_text())}
