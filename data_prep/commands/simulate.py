"""``python -m data_prep simulate``: write a seeded corpus of simulated products with material maps."""

from __future__ import annotations

import argparse
import logging
import time

from data_prep.registry import LEVELS
from data_prep.simulate.corpus import HYPERSPECTRAL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Simulate realistic products (real ECOSTRESS surface spectra arranged in scenes with regions, edges, "
        "texture and mixtures; Gaussian spectral responses; L1 radiance through a solar/atmosphere model; "
        "sensor noise; nodata along the swath edges), written in each sensor's own file format, with a "
        "material-map .npz beside every product, change pairs, HS+MS fusion pairs and OUT/manifest.json."
    )
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--sensors", nargs="+", default=None, metavar="SENSOR",
                        help="registry sensor names (default: the six imaging spectrometers; with --colocated: "
                             "EnMAP, EMIT, DESIS, AVIRIS-Classic, Sentinel-2, Landsat 8/9 OLI, PlanetScope)")
    parser.add_argument("--levels", nargs="+", default=["L1", "L2"], choices=list(LEVELS[1:]),
                        help="processing levels (L1 radiance, L2 reflectance)")
    parser.add_argument("--scenes", type=int, default=1, help="number of scenes")
    parser.add_argument("--size", type=int, default=64, help="pixels across track (and lines, unless --lines)")
    parser.add_argument("--lines", type=int, default=None, help="lines along track (flightline length)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--ratio", type=int, default=3, help="fusion: multispectral grid is RATIO x finer")
    parser.add_argument("--no-change-pairs", action="store_true", help="skip the two-date change pairs")
    parser.add_argument("--no-fusion", action="store_true", help="skip the HS + MS fusion pairs")
    parser.add_argument("--library", default=None, help="ECOSTRESS ENVI library .hdr (default: shared data)")
    parser.add_argument("--colocated", action="store_true",
                        help="co-located products instead of a corpus: per location (--scenes) the same ground seen "
                             "by every sensor at its own GSD and bands, partly overlapping, misregistered by about "
                             "a pixel, acquired within days (data_prep.simulate.colocated)")
    parser.add_argument("--extent-m", type=float, default=1920.0,
                        help="--colocated: side of each product's ground square in metres")
    parser.add_argument("--misregistration-px", type=float, default=1.0,
                        help="--colocated: std of each product's geolocation error, in its own pixels")
    parser.add_argument("--max-shift", type=float, default=0.1,
                        help="--colocated: products' centres differ by up to this fraction of --extent-m per axis")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from data_prep.simulate.corpus import simulate_corpus

    t0 = time.perf_counter()
    if args.colocated:
        from data_prep.simulate.colocated import COLOCATED_SENSORS, simulate_colocated

        manifest = simulate_colocated(
            args.out, sensors=args.sensors or list(COLOCATED_SENSORS), levels=args.levels, locations=args.scenes,
            extent_m=args.extent_m, seed=args.seed, max_shift=args.max_shift,
            misregistration_px=args.misregistration_px, progress=not args.no_progress, library=args.library)
        logging.getLogger(__name__).info("wrote %s in %.1f s", manifest, time.perf_counter() - t0)
        print(manifest)
        return 0
    manifest = simulate_corpus(
        args.out, sensors=args.sensors or list(HYPERSPECTRAL), levels=args.levels, scenes=args.scenes, size=args.size,
        lines=args.lines, seed=args.seed, ratio=args.ratio, change_pairs=not args.no_change_pairs,
        fusion=not args.no_fusion, progress=not args.no_progress, library=args.library,
    )
    logging.getLogger(__name__).info("wrote %s in %.1f s", manifest, time.perf_counter() - t0)
    print(manifest)
    return 0
