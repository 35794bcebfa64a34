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
