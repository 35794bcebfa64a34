"""The demo's data bootstrap: when ``prepare.enabled`` and a store the plan reads is missing, make the data.

Rank 0 simulates a small corpus (:func:`data_prep.simulate.corpus.simulate_corpus`) into
``prepare.raw_dir`` and ingests it (:func:`data_prep.ingest.ingest`) into ``prepare.store_root``; the
other ranks wait at a barrier. With ``prepare.colocated`` it also simulates co-located products, ingests them
and builds their location index (:func:`data_prep.simulate.colocated.prepare_colocated`). Ingest commits each store with one attribute write, so a kill during the
bootstrap leaves stores that a re-run completes. The launcher calls this before training; the trainer
knows nothing of it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch.distributed as dist

from pretrain.plan import Plan, missing_stores

log = logging.getLogger("specfm.pretrain")


def prepare_data(plan: Plan, rank: int) -> None:
    """Simulate and ingest on rank 0 when enabled and needed; every rank returns once the data exists."""
    p = plan.cfg.prepare
    co = p.colocated
    missing = missing_stores(plan) if p.enabled and rank == 0 else []
    if co is not None and p.enabled and rank == 0 and (
            any(_under(co.store_root, u) for u in missing) or not Path(co.store_root, "locations.json").exists()):
        from data_prep.simulate.colocated import prepare_colocated

        prepare_colocated(co.raw_dir, co.store_root, sensors=co.sensors, levels=co.levels, locations=co.locations,
                          extent_m=co.extent_m, patch_m=co.patch_m, seed=co.seed)
        missing = [u for u in missing if not _under(co.store_root, u)]
    if p.enabled and rank == 0 and missing:
        from data_prep.ingest import ingest
        from data_prep.simulate.corpus import simulate_corpus

        kw = {"sensors": p.sensors} if p.sensors else {}
        log.info("stores missing: simulating a corpus into %s", p.raw_dir)
        simulate_corpus(p.raw_dir, levels=p.levels, scenes=p.scenes, size=p.size, seed=p.seed, **kw)
        log.info("ingesting into %s (patch size %d)", p.store_root, p.patch_size)
        ingest([p.raw_dir], p.store_root, patch_size=p.patch_size, progress=True)
    if dist.is_initialized():
        dist.barrier()


def _under(root: str, url: str) -> bool:
    """Whether the store ``url`` lives under the folder ``root``."""
    return os.path.normpath(url).startswith(os.path.normpath(root) + os.sep)
