"""Whole-scene inference in bounded memory: peak RSS of ``launch/embed.py`` against the flightline's length.

Simulates AVIRIS-NG L2 flightlines (``python -m data_prep simulate --lines N``; 425 bands, float32 ENVI) of
each length in ``--lines`` (default 512 and 4096), exports an untrained encoder of ``--model`` size, and runs
``launch/embed.py`` on each in its own process (scene statistics pass, tiling, blending, Zarr output), printing
per run: product size, tiles, seconds, tiles/s, megapixels/s and the process's peak RSS, then the ratio of
the longest run's peak RSS to the shortest's (1.0 = independent of the length). With ``--json`` the last
line is one JSON object.

    python bench/embed.py [--lines 512 4096] [--cols 64] [--model debug] [--tile 64 --overlap 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, nargs="+", default=[512, 4096], help="flightline lengths (rows)")
    ap.add_argument("--cols", type=int, default=64, help="pixels across track")
    ap.add_argument("--model", default="debug", help="encoder size (pretrain.models MODEL_SIZES), untrained")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--output", choices=("tokens", "pixels"), default="tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from pretrain.models import build_model
    from pretrain.models.export import save_encoder

    tmp = tempfile.TemporaryDirectory(prefix="bench-embed-") if args.work is None else None
    work = Path(args.work or tmp.name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        torch.manual_seed(0)
        export = save_encoder(build_model(args.model), work / f"export_{args.model}")
        runs = []
        for n in args.lines:
            raw = work / f"raw_{n}"
            if not raw.exists():
                subprocess.run([sys.executable, "-m", "data_prep", "simulate", "--out", str(raw), "--sensors",
                                "aviris-ng", "--levels", "L2", "--size", str(args.cols), "--lines", str(n),
                                "--no-change-pairs", "--no-fusion", "--no-progress"], check=True, env=env,
                               stdout=subprocess.DEVNULL)
            hdr = next(raw.rglob("*_rfl_*.hdr"))
            product_mb = sum(f.stat().st_size for f in hdr.parent.iterdir() if f.is_file()) / 2**20
            out = work / f"emb_{n}.zarr"
            cmd = [sys.executable, str(REPO / "launch" / "embed.py"), "--checkpoint", str(export), str(hdr),
                   "--out", str(out), "--tile", str(args.tile), "--overlap", str(args.overlap), "--batch-size",
                   str(args.batch_size), "--output", args.output, "--device", args.device, "--overwrite",
                   "--no-progress", "--json"]
            res = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
            s = json.loads(res.stdout.strip().splitlines()[-1])
            px = n * args.cols
            run = {"lines": n, "cols": args.cols, "product_mb": round(product_mb, 1), "tiles": s["computed"],
                   "seconds": s["seconds"], "tiles_per_s": round(s["computed"] / s["seconds"], 2),
                   "mpix_per_s": round(px / s["seconds"] / 1e6, 4), "peak_rss_mb": s["peak_rss_mb"]}
            runs.append(run)
            print(f"{n:6d} lines x {args.cols} cols: product {run['product_mb']:8.1f} MB, {run['tiles']:4d} tiles in "
                  f"{run['seconds']:7.2f} s ({run['tiles_per_s']:.2f} tiles/s, {run['mpix_per_s']:.4f} Mpix/s), "
                  f"peak RSS {run['peak_rss_mb']:7.1f} MiB", flush=True)
        lo, hi = min(runs, key=lambda r: r["lines"]), max(runs, key=lambda r: r["lines"])
        ratio = hi["peak_rss_mb"] / lo["peak_rss_mb"]
        size_ratio = hi["product_mb"] / lo["product_mb"]
        print(f"peak RSS {hi['lines']} / {lo['lines']} lines: {ratio:.3f} (product size ratio {size_ratio:.1f})")
        if args.json:
            print(json.dumps({"model": args.model, "tile": args.tile, "overlap": args.overlap, "output": args.output,
                              "device": args.device, "runs": runs, "peak_rss_ratio": round(ratio, 4),
                              "product_size_ratio": round(size_ratio, 2)}))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
