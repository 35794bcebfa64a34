"""Benchmark runner: every task of a suite on one encoder export, then report.md / .json / .csv and figures.

Reports are written into a temporary folder and moved into place at the end, so a failed run leaves
no half-written report.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from data_prep.progress import progress as bar
from finetune.config import ConfigError, SuiteConfig, TaskConfig
from finetune.datasets import load_dataset
from finetune.encoder_api import Encoder, load_encoder
from finetune.figures import task_figure
from finetune.tasks import TaskResult, run_task, seed_everything, task_class

log = logging.getLogger(__name__)

PAPER_NOTE = ("SpecAware (arXiv 2510.27219) figures: not available offline to this build, so the column is "
              "left empty rather than guessed; fill `paper:` in the suite YAML from the paper's tables.")


def substitute(obj, variables: dict[str, str | None]):
    """Replace ``${name}`` in every string of a config block (``corpus``: the manifest; ``root``: --data-root)."""
    if isinstance(obj, str):
        for k, v in variables.items():
            if "${" + k + "}" in obj:
                if v is None:
                    raise ConfigError(f"the config refers to ${{{k}}} but it was not given "
                                     f"({'--data or a simulate block' if k == 'corpus' else '--data-root'})")
                obj = obj.replace("${" + k + "}", str(v))
        return obj
    if isinstance(obj, dict):
        return {k: substitute(v, variables) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, variables) for v in obj]
    return obj


def prepare_corpus(suite: SuiteConfig, work: Path, data: str | None = None) -> str | None:
    """The manifest path the suite's ``${corpus}`` refers to: ``data`` if given, else simulate one."""
    if data is not None:
        return str(data)
    if suite.simulate is None:
        return None
    from data_prep.simulate.corpus import simulate_corpus

    kw = dict(suite.simulate)
    kw.setdefault("progress", False)
    return str(simulate_corpus(work / "corpus", **kw))


def prepare_colocated(suite: SuiteConfig, work: Path) -> str | None:
    """The manifest path ``${colocated}`` refers to: co-located products simulated for the suite, or None."""
    if suite.simulate_colocated is None:
        return None
    from data_prep.simulate.colocated import simulate_colocated

    kw = dict(suite.simulate_colocated)
    kw.setdefault("progress", False)
    return str(simulate_colocated(work / "colocated", **kw))


def run_suite(suite: SuiteConfig, encoder: Encoder | Callable[[], Encoder], out: str | Path, *,
              checkpoint: str = "", data: str | None = None, data_root: str | None = None,
              progress: bool = True, on_task: Callable[[TaskConfig, TaskResult], None] | None = None) -> dict:
    """Run every task; write ``report.md``, ``report.json``, ``report.csv`` and ``figures/<task>.png`` to ``out``.

    ``encoder`` is an :class:`Encoder` or a factory; each task starts from a fresh copy of the weights, and the
    caller's encoder has its own weights back when the suite ends (else a suite whose last task fine-tunes left
    them fine-tuned, and the next suite run on it, e.g. bench/downstream.py's next seed, started from those).
    ``on_task(task, result)`` is called after each task while ``result.model`` (the trained model) is still
    valid: the next task resets the shared encoder's weights, so the runner drops the model after the call."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-", dir=out.parent))
    make = encoder if callable(encoder) and not isinstance(encoder, Encoder) else None
    state = None if make else {k: v.clone() for k, v in encoder.state_dict().items()}
    try:
        corpus = prepare_corpus(suite, tmp, data)
        colocated = prepare_colocated(suite, tmp)
        results: list[tuple[TaskConfig, TaskResult, float, str]] = []
        for task in bar(suite.tasks, desc=f"suite {suite.name}", unit="task", enabled=progress, every=1):
            t0 = time.time()
            if make:
                enc = make()
            else:
                encoder.load_state_dict(state)
                enc = encoder
            seed_everything(task.train.seed)  # nothing a task draws depends on what ran before it
            ds = load_dataset(substitute(task.data, {"corpus": corpus, "root": data_root, "colocated": colocated}))
            res = run_task(enc, ds, task)
            fig = task_figure(res, tmp / "figures" / f"{task.name}.png")
            if on_task is not None:
                on_task(task, res)
            res.model = None
            results.append((task, res, time.time() - t0, f"figures/{fig.name}"))
        report = build_report(suite, results, checkpoint)
        write_reports(report, tmp)
        shutil.rmtree(tmp / "corpus", ignore_errors=True)
        shutil.rmtree(tmp / "colocated", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "figures").mkdir(exist_ok=True)
        for f in (tmp / "figures").iterdir():
            os.replace(f, out / "figures" / f.name)
        for name in ("report.json", "report.csv", "report.md"):
            os.replace(tmp / name, out / name)
        return report
    finally:
        if state is not None:
            encoder.load_state_dict(state)
        shutil.rmtree(tmp, ignore_errors=True)


def build_report(suite: SuiteConfig, results, checkpoint: str) -> dict:
    tasks = {}
    for task, res, secs, fig in results:
        metric = task_class(task.kind).headline
        tasks[task.name] = {
            "kind": task.kind, "dataset": res.dataset, "mode": task.train.mode,
            "protocol": task.protocol, "headline": metric,
            "metrics": res.metrics, "details": res.details, "paper": task.paper,
            "paper_note": task.paper_note or ("" if task.paper else PAPER_NOTE), "figure": fig,
            "seconds": round(secs, 1),
        }
    return {"suite": suite.name, "checkpoint": checkpoint, "note": suite.note, "tasks": tasks}


def write_reports(report: dict, folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=float))
    with open(folder / "report.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "kind", "dataset", "metric", "value", "specaware_paper"])
        for name, t in report["tasks"].items():
            for m, v in t["metrics"].items():
                paper = (t["paper"] or {}).get(m, "")
                w.writerow([name, t["kind"], t["dataset"], m, f"{v:.6g}", paper])
    lines = [f"# Benchmark: {report['suite']}", "", f"Encoder export: `{report['checkpoint']}`", ""]
    if report.get("note"):
        lines += [report["note"], ""]
    for name, t in report["tasks"].items():
        lines += [f"## {name} ({t['kind']}, protocol {t['protocol']}, {t['mode']}, {t['dataset']}, {t['seconds']} s)", "",
                  "| metric | ours | SpecAware paper |", "|---|---|---|"]
        for m, v in t["metrics"].items():
            lines.append(f"| {m} | {v:.4f} | {(t['paper'] or {}).get(m, '')} |")
        base = t["details"].get("baselines")
        if base:
            lines += ["", "| baseline | " + " | ".join(t["metrics"]) + " |",
                      "|---|" + "---|" * len(t["metrics"])]
            for b, mv in base.items():
                lines.append(f"| {b} | " + " | ".join(f"{mv[m]:.4f}" for m in t["metrics"]) + " |")
        for key in ("per_class_F1", "per_class_IoU"):
            if key in t["details"]:
                lines += ["", f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in t["details"][key].items())]
        if t["paper_note"]:
            lines += ["", f"_{t['paper_note']}_"]
        lines += ["", f"![{name}]({t['figure']})", ""]
    (folder / "report.md").write_text("\n".join(lines))


def headline(report: dict) -> dict[str, float]:
    """task -> headline metric value."""
    return {n: float(t["metrics"][t["headline"]]) for n, t in report["tasks"].items()}


def open_encoder(checkpoint: str) -> Encoder:
    return load_encoder(checkpoint)
