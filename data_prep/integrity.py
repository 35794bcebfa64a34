"""Is a store whole? ``verify`` reads every chunk; ``repair`` re-ingests damaged granules; ``migrate`` rewrites old stores.

:func:`verify` reads every committed patch (``patches`` and ``valid``), every per-patch metadata
field and the statistics accumulator, and lists each patch that is

- **missing**: its shard object is not in storage (one listing of the store), or its data reads as
  the fill value throughout (:mod:`data_prep.store`: NaN / 255, which stored data never holds);
- **corrupt**: a chunk fails to read or decode (CRC-32C or shard-index checksum mismatch, a
  truncated shard, an unreadable object);
- **nan**: part of it reads NaN / inf (``patches``) or 255 (``valid``): a chunk inside its shard is
  gone, or non-finite values were written by something other than :class:`~data_prep.store.StoreWriter`;

with the granule it belongs to (from the manifest's ranges, so even lost metadata is attributed).
Reads go a batch of patches at a time (Zarr fetches their chunks concurrently); a batch that
fails is read patch by patch to tell which. Schema 1 stores are checked too, but there a lost
chunk reads as zeros: only a missing shard object (the listing) reveals it.

:func:`repair` re-tiles the damaged granules from their products (the same tiling and
``max_invalid`` that ingest recorded for the granule, so the same bytes) and rewrites their patches
in place through :meth:`StoreWriter.rewrite`; the committed view (``n_patches``, manifest,
statistics) does not change. A product whose re-tiling gives other patch positions than the store
holds is refused (:class:`StoreError`), the store untouched.

:func:`migrate` copies a store of an older schema into a new one granule by granule (the
statistics accumulated again from the same float16 values, so they come out identical).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import store as st

log = logging.getLogger(__name__)

KINDS = ("missing", "corrupt", "nan")


def _granule_of(store: st.PatchStore) -> tuple[list[str], np.ndarray]:
    """(granule ids in manifest order, start of each) for attributing patch indices to granules."""
    ids = list(store.attrs["granules"])
    starts = np.asarray([int(store.attrs["granules"][g]["start"]) for g in ids], dtype=np.int64)
    return ids, starts


def _classify_read(store: st.PatchStore, i: int) -> tuple[str, str] | None:
    """(kind, detail) for patch ``i``, or None when it reads whole."""
    try:
        px = store.patches[i]
        va = store.valid[i]
    except Exception as e:  # noqa: BLE001 - whatever the codecs raise for damaged bytes
        return "corrupt", f"{type(e).__name__}: {e}"
    if not store.detects_missing:
        return None
    bits = np.ascontiguousarray(px).view(np.uint16) & 0x7C00
    bad_px = bits == 0x7C00
    bad_va = va > 1
    for name, bad in (("patches", bad_px), ("valid", bad_va)):
        if bad.all():
            return "missing", f"'{name}' reads the fill value throughout (its shard object is gone)"
    for name, bad in (("patches", bad_px), ("valid", bad_va)):
        if bad.any():
            return "nan", f"'{name}': {int(bad.sum())} of {bad.size} values read as the fill value / non-finite"
    return None


def verify(url: str, storage_options: dict | None = None, *, progress: bool = False, batch: int = 8) -> dict:
    """Read every chunk of the store at ``url``; return the report described in the module docstring.

    ``{"url", "schema_version", "patches", "whole", "missing", "corrupt", "nan": [indices],
    "problems": [{"index", "kind", "detail", "granule"}], "meta": [{"field", "kind", "detail"}],
    "granules": {granule id: [indices]}, "objects": {"patches": n, "valid": n}}``.
    """
    s = st.PatchStore(url, storage_options)
    n = s.n_patches
    found: dict[int, tuple[str, str]] = {}
    for array, idx in s.missing_objects().items():
        for i in idx:
            found[i] = ("missing", f"no '{array}' shard object in storage")
    it = range(0, n, batch)
    if progress:
        from data_prep.progress import progress as bar

        it = bar(it, total=len(it), desc="verify", unit="batch", every=100)
    for i0 in it:
        i1 = min(i0 + batch, n)
        todo = [i for i in range(i0, i1) if i not in found]
        if not todo:
            continue
        try:
            s.read_range(i0, i1)
            continue
        except Exception:  # noqa: BLE001 - classify patch by patch below
            pass
        for i in todo:
            r = _classify_read(s, i)
            if r is not None:
                found[i] = r
    meta_problems = []
    for name in st.META_FIELDS:
        try:
            s.meta(name)
        except st.MissingDataError as e:
            meta_problems.append({"field": name, "kind": "missing", "detail": str(e)})
        except st.CorruptDataError as e:
            meta_problems.append({"field": name, "kind": "corrupt", "detail": str(e)})
    if s.has_accumulator:
        try:
            s.partials()
        except (st.MissingDataError, st.CorruptDataError) as e:
            meta_problems.append({"field": "stats_acc", "kind": "missing" if isinstance(e, st.MissingDataError)
                                  else "corrupt", "detail": str(e)})
    ids, starts = _granule_of(s)
    problems, by_granule = [], {}
    for i in sorted(found):
        kind, detail = found[i]
        gid = ids[int(np.searchsorted(starts, i, side="right")) - 1] if ids else None
        problems.append({"index": i, "kind": kind, "detail": detail, "granule": gid})
        by_granule.setdefault(gid, []).append(i)
    report: dict[str, Any] = {
        "url": url, "schema_version": s.schema_version, "patches": n,
        "whole": not problems and not meta_problems,
        **{k: [p["index"] for p in problems if p["kind"] == k] for k in KINDS},
        "problems": problems, "meta": meta_problems, "granules": by_granule,
        "objects": {a: int(np.count_nonzero(s.stored_patches(a) < n)) for a in ("patches", "valid")},
    }
    if not s.detects_missing:
        report["note"] = ("schema 1 store: a lost chunk inside a shard reads as zeros and cannot be told from data; "
                          f"only missing shard objects are found. Rewrite it with `python -m data_prep migrate {url} NEW`")
    return report


def repair(url: str, inputs: Sequence[str | Path], report: dict, storage_options: dict | None = None) -> dict:
    """Re-ingest the granules that ``report`` (from :func:`verify`) names, from the products in ``inputs``.

    Returns ``{"repaired": [granule ids], "not_given": [{"granule", "source"}]}``. Granules whose
    metadata is lost (``report["meta"]``) are repaired whole too when every granule's product is given.
    """
    from data_prep.formats import find_products, open_product
    from data_prep.ingest import retile_granule

    w = st.StoreWriter.open(url, storage_options)
    manifest = w.granules
    wanted = {g for g in report["granules"] if g is not None}
    if report["meta"]:
        wanted |= set(manifest)
    by_id: dict[str, Any] = {}
    for p in find_products(list(inputs)):
        g = open_product(p)
        if g.granule_id in wanted:
            by_id[g.granule_id] = g
    repaired = []
    for gid in [g for g in manifest if g in wanted and g in by_id]:
        retile_granule(w, by_id[gid], gid)
        repaired.append(gid)
        log.info("%s: rewrote granule %s from %s", url, gid, by_id[gid].path)
    not_given = [{"granule": g, "source": manifest[g]["source"]} for g in manifest if g in wanted and g not in by_id]
    return {"repaired": repaired, "not_given": not_given}


def migrate(src: str, dst: str, storage_options: dict | None = None, *, progress: bool = False,
            batch: int = 8) -> dict:
    """Copy the store at ``src`` (any readable schema) into a new store of the current schema at ``dst``.

    Refuses a source with missing shard objects (they would be copied as zeros): repair it first.
    Returns ``{"src", "dst", "patches", "granules"}``.
    """
    from data_prep.stats import PartialStats

    s = st.PatchStore(src, storage_options)
    lost = {a: v for a, v in s.missing_objects().items() if v}
    if lost:
        raise st.StoreError(f"{src}: committed patches without a shard object {lost}: their data is lost; "
                            "re-ingest those granules (`python -m data_prep verify --repair`) before migrating")
    h = s.attrs.get("stats_hist")
    extra = {k: s.attrs[k] for k in ("read_amplification",) if k in s.attrs}
    w = st.StoreWriter.create(dst, sensor=s.sensor, level=s.level, wavelengths_nm=s.wavelengths_nm,
                              fwhm_nm=s.fwhm_nm, good_bands=s.good_bands, patch_size=s.patch_size,
                              band_chunk=s.chunks[1], spatial_chunk=s.chunks[2], storage_options=storage_options,
                              hist_range=(h["lo"], h["hi"]) if h else None,
                              hist_bins=int(h["bins"]) if h else 4096, attrs=extra)
    meta = {k: s.meta(k) for k in st.META_FIELDS}
    items = list(s.attrs["granules"].items())
    if progress:
        from data_prep.progress import progress as bar

        items = bar(items, desc="migrate", unit="granule", every=10)
    for gid, e in items:
        start, count = int(e["start"]), int(e["count"])
        partial = PartialStats.empty(s.n_bands, h["lo"], h["hi"], int(h["bins"])) if h else None
        off = w.begin()
        for i0 in range(start, start + count, batch):
            px, va = s.read_range(i0, min(i0 + batch, start + count))
            if partial is not None:
                for p, v in zip(px, va, strict=True):
                    partial.add_patch(p, v)
            off = w.write(off, px, va)
        w.commit(granule_id=gid, source=e["source"], start=start, count=count,
                 meta={k: v[start:start + count] for k, v in meta.items() if k != "granule"}, partial=partial,
                 entry={k: v for k, v in e.items() if k not in ("start", "count", "source")})
    if not h and s.attrs.get("stats"):
        w.write_stats(s.stats)
    return {"src": src, "dst": dst, "patches": s.n_patches, "granules": len(s.attrs["granules"])}
