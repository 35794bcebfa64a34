"""The release folder: an encoder export in the Hugging Face layout, with a model card.

``write_release(export_dir)`` writes ``<export_dir>/hf/`` (or ``out``), ready for ``huggingface-cli upload``:

- ``config.json``: the export's ``model_args.json`` fields unchanged (``format`` "specfm-encoder",
  ``version``, ``name``, ``args``, vocabularies, ``embed_dim``, ``patch_size``, ``extra``) so that the one
  export reader reads it, plus the Hugging Face keys (``model_type``, ``architectures``, ``hidden_size``,
  ``num_hidden_layers``, ``num_attention_heads``), ``normalisation`` (per ``<sensor>_<level>`` store the model
  was trained on: per band ``count``, ``mean``, ``std``, ``p01``, ``p99``, as the loader applied them),
  ``bands`` (each store's band centres, widths and good-band flags), ``training`` (stage, steps, samples,
  data mixture, hardware, throughput, code version) and ``benchmarks`` (when a benchmark report is given).
- ``model.safetensors``: the export's tensors, byte for byte (hard-linked when the file system allows).
- ``README.md``: the model card (front matter for the hub; model, data, training, throughput, benchmark
  figures, normalisation, usage).

Every value comes from files of the run (``config.yaml``, ``metrics.jsonl``, the stores' attributes) or is passed in; what is unknown is said to be unknown, never made up. ``finetune.load_encoder``
reads a release folder like an export folder; a hub id is resolved with ``huggingface_hub`` only when
it is installed, from its local cache unless ``download=True`` (nothing downloads by default).
Written atomically: files go to a temporary folder beside ``out`` that replaces it whole.

    python -m pretrain.release EXPORT_DIR [--out DIR] [--benchmark runs/bench/report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from data_prep.errors import UserError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CARD = "README.md"
RELEASE_FILES = (CONFIG, WEIGHTS)
RELEASE_DIR = "hf"
MODEL_TYPE = "specfm-spectral-encoder"
#: ``owner/name`` as the hub spells repository ids (a relative path of two parts that does not exist)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


class ReleaseError(UserError):
    """A release folder cannot be written or resolved: missing export, unreadable run files, unknown hub id."""


# ----------------------------------------------------------------------------------------------- gathering

def hardware(world_size: int | None = None, precision: str | None = None) -> dict[str, Any]:
    """What this process runs on: accelerator (name x count) or CPU model, ranks, precision."""
    import torch

    out: dict[str, Any] = {"world_size": world_size, "precision": precision, "torch": torch.__version__}
    if torch.cuda.is_available():
        out["accelerator"] = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()} per node"
    else:
        out["accelerator"] = "CPU only"
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out["cpu"] = f"{cpu} ({os.cpu_count()} logical cores)".strip()
    return out


def _stage_sources(run_dir: Path, stage: str) -> tuple[list[dict[str, Any]], dict | None]:
    """The stage's data sources (url, weight, subset) from the run's resolved ``config.yaml``, and the
    storage options to open them with."""
    from pretrain.config import load_config

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        return [], None
    cfg = load_config(cfg_file)
    for st in cfg.stages:
        if st.name == stage:
            return ([{"url": s.url, "weight": s.weight, "subset": s.subset} for s in cfg.stage_data(st).sources],
                    cfg.data.storage_options)
    return [], None


def _stage_settings(run_dir: Path, stage: str) -> dict[str, Any]:
    from pretrain.config import load_config

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        return {}
    cfg = load_config(cfg_file)
    st = next((s for s in cfg.stages if s.name == stage), None)
    d = cfg.data
    return {"objective": cfg.model.objective, "model": cfg.model.name, "zero_stage": cfg.parallel.zero_stage,
            "precision": cfg.parallel.precision, "global_batch": cfg.parallel.global_batch,
            "micro_batch": cfg.parallel.micro_batch, "crop": d.crop, "band_window": d.band_window,
            "lr": (st.lr if st is not None and st.lr is not None else cfg.optim.lr),
            "stages": [s.name for s in cfg.stages]}


def _store_entry(src: dict[str, Any], storage_options: dict | None = None) -> tuple[str, dict, dict, dict]:
    """(key, data row, normalisation, bands) of one source store."""
    from data_prep.store import PatchStore, StoreError

    try:
        s = PatchStore(src["url"], storage_options)
    except StoreError as e:
        raise ReleaseError(f"training store {src['url']} cannot be read for the release: {e}") from None
    key = f"{s.sensor}_{s.level}"
    st = s.attrs.get("stats") or {}
    row = {"store": src["url"], "sensor": s.sensor, "level": s.level, "patches": s.n_patches,
           "granules": len(s.attrs.get("granules", {})), "patch_size": s.patch_size, "bands": s.n_bands,
           "good_bands": int(s.good_bands.sum()), "weight": src.get("weight"), "subset": src.get("subset")}
    norm = {k: st[k] for k in ("count", "mean", "std", "p01", "p99") if k in st}
    bands = {"wavelengths_nm": s.wavelengths_nm.tolist(), "fwhm_nm": s.fwhm_nm.tolist(),
             "good_bands": [bool(b) for b in s.good_bands]}
    return key, row, norm, bands


def _throughput(run_dir: Path, stage: str) -> dict[str, Any]:
    """Median samples/s, tokens/s, MFU and peak RSS over the stage's logged steps (first one left out)."""
    f = run_dir / "metrics.jsonl"
    recs = []
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("stage") == stage and "samples_per_s" in r:
                recs.append(r)
    recs = recs[1:] or recs
    out: dict[str, Any] = {"logged_steps": len(recs)}
    for k in ("samples_per_s", "tokens_per_s", "mfu", "tflops_per_rank"):
        vals = [float(r[k]) for r in recs if isinstance(r.get(k), int | float)]
        if vals:
            out[k] = statistics.median(vals)
    rss = [float(r["peak_rss_mb"]) for r in recs if isinstance(r.get("peak_rss_mb"), int | float)]
    if rss:
        out["peak_rss_mb"] = max(rss)
    return out


def _benchmarks(report: dict[str, Any]) -> dict[str, Any]:
    """Headline figures of a ``launch/benchmark.py`` report.json: task -> metric, value, dataset, ..."""
    out = {}
    for name, t in (report.get("tasks") or {}).items():
        m = t.get("headline")
        out[name] = {"kind": t.get("kind"), "dataset": t.get("dataset"), "mode": t.get("mode"),
                     "protocol": t.get("protocol"), "metric": m, "value": (t.get("metrics") or {}).get(m),
                     "metrics": t.get("metrics"), "paper": (t.get("paper") or {}).get(m) if m else None}
    return {"suite": report.get("suite"), "checkpoint": report.get("checkpoint"), "tasks": out}


# ----------------------------------------------------------------------------------------------- writing

def release_config(meta: dict[str, Any], *, run_dir: Path | None, stage: str | None,
                   hw: dict[str, Any] | None = None, benchmark: dict[str, Any] | None = None,
                   previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` of a release from the export's ``model_args.json`` (``meta``) and the run's files."""
    args = meta.get("args", {})
    extra = meta.get("extra") or {}
    stage = stage or extra.get("stage")
    prev = previous or {}
    cfg: dict[str, Any] = {
        "model_type": MODEL_TYPE, "architectures": ["SpectralEncoder"], "library_name": "specfm",
        "hidden_size": meta.get("embed_dim"), "num_hidden_layers": args.get("depth"),
        "num_attention_heads": args.get("heads"), "torch_dtype": "float32",
        **meta,
    }
    normalisation, bands, data = dict(prev.get("normalisation") or {}), dict(prev.get("bands") or {}), []
    if run_dir is not None and stage:
        sources, options = _stage_sources(run_dir, stage)
        for src in sources:
            key, row, norm, tab = _store_entry(src, options)
            data.append(row)
            normalisation[key] = norm
            bands[key] = tab
    training = dict(prev.get("training") or {})
    training.update({k: extra[k] for k in ("stage", "steps", "global_step", "samples_seen", "git_sha", "model")
                     if k in extra})
    if run_dir is not None and stage:
        training.update({"settings": _stage_settings(run_dir, stage), "throughput": _throughput(run_dir, stage)})
    if data:
        training["data"] = data
    if hw:
        training["hardware"] = hw
    cfg.update({"normalisation": normalisation, "bands": bands, "training": training})
    if benchmark is not None:
        cfg["benchmarks"] = _benchmarks(benchmark)
    elif prev.get("benchmarks"):
        cfg["benchmarks"] = prev["benchmarks"]
    return cfg


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "unknown"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def model_card(cfg: dict[str, Any]) -> str:
    """The ``README.md`` of a release from its ``config.json``."""
    a = cfg.get("args", {})
    t = cfg.get("training", {})
    name, stage = cfg.get("name", "?"), t.get("stage", "?")
    lines = ["---", "library_name: specfm", "tags:", "- hyperspectral", "- remote-sensing", "- imaging-spectroscopy",
             "- foundation-model", "pipeline_tag: image-feature-extraction", "---", "",
             f"# specfm spectral encoder `{name}` (stage `{stage}`)", "",
             "An any-sensor hyperspectral encoder (SpecAware-style hypernetwork patch embedding, ViT blocks) "
             "pretrained with specfm. It takes any band table (centres and widths in nm) and the sensor and level "
             "names; it returns patch tokens.", "", "## Model", "",
             "| field | value |", "|---|---|"]
    for k, label in (("dim", "embedding dim"), ("depth", "blocks"), ("heads", "heads"), ("patch_size", "patch size"),
                     ("cond_dim", "condition dim"), ("rank", "hypernetwork rank")):
        if k in a:
            lines.append(f"| {label} | {a[k]} |")
    lines += [f"| objective | {_fmt((t.get('settings') or {}).get('objective'))} |",
              f"| sensors (vocabulary) | {', '.join(map(str, cfg.get('sensor_vocab', [])))} |",
              f"| levels | {', '.join(map(str, cfg.get('level_vocab', [])))} |", "", "## Training data", ""]
    data = t.get("data") or []
    if data:
        lines += ["| store | sensor | level | patches | granules | bands (good) | patch | weight | subset |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in data:
            lines.append(f"| `{r['store']}` | {r['sensor']} | {r['level']} | {r['patches']} | {r['granules']} | "
                         f"{r['bands']} ({r['good_bands']}) | {r['patch_size']} | {_fmt(r.get('weight'))} | "
                         f"{_fmt(r.get('subset'))} |")
    else:
        lines.append("Unknown (the release was written without the run's config and stores).")
    s, th, hw = t.get("settings") or {}, t.get("throughput") or {}, t.get("hardware") or {}
    lines += ["", "## Training", "", "| field | value |", "|---|---|",
              f"| stage | {_fmt(t.get('stage'))} of {', '.join(s.get('stages', [])) or 'unknown'} |",
              f"| optimizer steps (this stage) | {_fmt(t.get('steps'))} |",
              f"| global step | {_fmt(t.get('global_step'))} |", f"| samples seen | {_fmt(t.get('samples_seen'))} |",
              f"| global batch / micro-batch | {_fmt(s.get('global_batch'))} / {_fmt(s.get('micro_batch'))} |",
              f"| crop / band window | {_fmt(s.get('crop'))} px / {_fmt(s.get('band_window'))} bands |",
              f"| peak lr | {_fmt(s.get('lr'))} |",
              f"| ZeRO stage / precision | {_fmt(s.get('zero_stage'))} / {_fmt(s.get('precision'))} |",
              f"| hardware | {_fmt(hw.get('accelerator'))}; {_fmt(hw.get('cpu'))}; "
              f"{_fmt(hw.get('world_size'))} ranks |",
              f"| throughput (median over {_fmt(th.get('logged_steps'))} logged steps) | "
              f"{_fmt(th.get('samples_per_s'))} samples/s, {_fmt(th.get('tokens_per_s'))} tokens/s, "
              f"MFU {_fmt(th.get('mfu'))} |",
              f"| peak RSS per rank | {_fmt(th.get('peak_rss_mb'))} MiB |",
              f"| code version | `{_fmt(t.get('git_sha'))}` |", "", "## Benchmarks", ""]
    b = cfg.get("benchmarks")
    if b and b.get("tasks"):
        lines += [f"Suite `{b.get('suite')}` (`launch/benchmark.py`):", "",
                  "| task | kind | dataset | protocol | metric | value | SpecAware paper |", "|---|---|---|---|---|---|---|"]
        for n, r in b["tasks"].items():
            lines.append(f"| {n} | {r.get('kind')} | {r.get('dataset')} | {_fmt(r.get('protocol') or r.get('mode'))} | "
                         f"{r.get('metric')} | {_fmt(r.get('value'))} | {_fmt(r.get('paper')) if r.get('paper') else ''} |")
    else:
        lines.append("None recorded yet: run `python launch/benchmark.py ...` and then `python -m pretrain.release "
                     "EXPORT --benchmark OUT/report.json`.")
    lines += ["", "## Normalisation and band tables", "",
              "Inputs must be prepared as in pretraining: bad bands dropped (`bands.<sensor>_<level>.good_bands`), each "
              "band clipped to its `p01`/`p99` and standardised with `mean`/`std` of `normalisation.<sensor>_<level>` "
              "in `config.json` (statistics of the training store over its valid pixels), nodata pixels 0 after. "
              "`data_prep.spectral.normalise` applies them; `launch/embed.py --stats auto` uses them.", ""]
    for key, tab in (cfg.get("bands") or {}).items():
        wl = tab.get("wavelengths_nm", [])
        good = sum(bool(g) for g in tab.get("good_bands", []))
        if wl:
            lines.append(f"- `{key}`: {len(wl)} bands {min(wl):.1f}-{max(wl):.1f} nm, {good} good")
    lines += ["", "## Use", "", "```python", "import finetune", "", "enc = finetune.load_encoder(\"PATH_OR_HUB_ID\")  "
              "# this folder, or a hub id (huggingface_hub; local cache unless download=True)",
              "tokens = enc(pixels, wavelengths, fwhm, sensor=\"emit\", level=\"L2\")  # [B, N, D]", "```", "",
              "or `torch.hub.load(\"path/to/specfm\", \"encoder\", source=\"local\", path=\"PATH\")` with a local clone "
              "of specfm. Whole scenes: `python launch/embed.py --checkpoint PATH PRODUCT --out OUT.zarr`.", ""]
    return "\n".join(lines)


def write_release(export_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                  run_dir: str | os.PathLike | None = None, stage: str | None = None,
                  hw: dict[str, Any] | None = None, benchmark: str | os.PathLike | dict | None = None) -> Path:
    """Write the release folder of an export (default ``<export_dir>/hf``); returns it.

    ``run_dir`` defaults to the run holding the export (``<run_dir>/export/<stage>``) when it has a
    ``config.yaml``; ``stage`` to the export's recorded stage; ``hw`` to what an earlier release recorded;
    ``benchmark`` is a ``report.json`` (path or dict). An existing release's training record and benchmarks
    are kept unless replaced."""
    from pretrain.models.export import read_meta

    exp = Path(export_dir)
    meta = read_meta(exp)
    weights = exp / "encoder.safetensors"
    target = Path(out) if out is not None else exp / RELEASE_DIR
    if run_dir is None and (exp.parent.parent / "config.yaml").is_file() and exp.parent.name == "export":
        run_dir = exp.parent.parent
    previous = None
    if (target / CONFIG).is_file():
        try:
            previous = json.loads((target / CONFIG).read_text())
        except json.JSONDecodeError:
            previous = None
    report = None
    if benchmark is not None:
        if isinstance(benchmark, dict):
            report = benchmark
        else:
            try:
                report = json.loads(Path(benchmark).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ReleaseError(f"benchmark report {benchmark}: not a readable report.json: {e}") from None
    cfg = release_config(meta, run_dir=Path(run_dir) if run_dir is not None else None, stage=stage, hw=hw,
                         benchmark=report, previous=previous)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            os.link(weights, tmp / WEIGHTS)
        except OSError:
            shutil.copyfile(weights, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2))
        (tmp / CARD).write_text(model_card(cfg))
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------- reading

def is_release(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and all((p / f).is_file() for f in RELEASE_FILES)


def resolve(path: str | os.PathLike, *, download: bool = False, revision: str | None = None) -> Path:
    """A local folder for ``path``: itself when it exists, else a Hugging Face hub id (``owner/name``)
    resolved by ``huggingface_hub`` from its local cache, or downloaded when ``download`` is true."""
    p = Path(path)
    if p.exists() or not _HUB_ID.fullmatch(str(path)):
        return p
    repo_id = str(path)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise ReleaseError(f"{repo_id!r} is not a local folder, and huggingface_hub (to resolve it as a hub id) "
                           "is not installed: pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG, WEIGHTS, CARD],
                                      local_files_only=not download))
    except LocalEntryNotFoundError:
        raise ReleaseError(f"{repo_id!r} is not a local folder and not in the Hugging Face cache; pass "
                           "download=True (finetune.load_encoder) to fetch it from the hub") from None
    except Exception as e:  # noqa: BLE001 - hub errors (bad id, no network) become one clear line
        raise ReleaseError(f"{repo_id!r}: cannot be resolved on the Hugging Face hub: {type(e).__name__}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.release", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", help="export folder (encoder.safetensors + model_args.json)")
    ap.add_argument("--out", default=None, help="release folder (default: EXPORT/hf)")
    ap.add_argument("--run-dir", default=None, help="the pretraining run (default: the run holding EXPORT)")
    ap.add_argument("--stage", default=None, help="stage name (default: the export's)")
    ap.add_argument("--benchmark", default=None, help="report.json of launch/benchmark.py to put in the card")
    args = ap.parse_args(argv)
    from data_prep.errors import run_main

    def run() -> int:
        out = write_release(args.export, args.out, run_dir=args.run_dir, stage=args.stage, benchmark=args.benchmark)
        print(f"release folder: {out} ({', '.join(sorted(f.name for f in out.iterdir()))})")
        return 0

    return run_main(run)


if __name__ == "__main__":
    sys.exit(main())
