"""Fixtures of the finetune tests: a real debug-size encoder exported in-process, and a tiny simulated corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def debug_export(tmp_path_factory):
    """A real pretrain.models debug encoder, exported with save_encoder."""
    from pretrain.models import build_model
    from pretrain.models.export import save_encoder

    torch.manual_seed(0)
    model = build_model("debug")
    return save_encoder(model, tmp_path_factory.mktemp("export") / "debug")


@pytest.fixture()
def encoder(debug_export):
    import finetune

    torch.manual_seed(0)
    return finetune.load_encoder(debug_export)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """EMIT L2: one scene, one change pair, one EMIT + PlanetScope fusion pair, 32 x 32."""
    from data_prep.simulate.corpus import simulate_corpus

    return simulate_corpus(tmp_path_factory.mktemp("corpus"), sensors=("emit",), levels=("L2",), scenes=1, size=32,
                           seed=1, progress=False)


def band_table(c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.linspace(450, 2300, c), torch.full((c,), 12.0)


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one intra-op thread (and do not fight other CPU work)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
