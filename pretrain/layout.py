"""The run directory: the one place that knows where each file of a pretraining run lives.

``<run_dir>/``::

    config.yaml, git_sha.txt      resolved config and code version of the latest launch
    metrics.jsonl                 one record per log step (appended across resumes)
    summary.json                  per-rank peak memory and throughput of the latest launch
    wandb_id.txt, wandb/          the wandb run (resumed across launches)
    figures/<stage>/step_N.png    reconstruction figures
    checkpoints/<stage>/step_N/   DeepSpeed checkpoints (see pretrain.checkpoint); ``checkpoint.dir`` moves them
    export/<stage>/               encoder.safetensors + model_args.json (+ stage_done.json once final)
    export/<stage>/hf/            the release folder (Hugging Face layout + model card; pretrain/release.py)

A stage is finished when ``export/<stage>/stage_done.json`` exists; it is written last, after the export,
so a finished stage always has its export. Trainer, preflight, launcher and logger ask this object for
paths and never join them themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DONE_FILE = "stage_done.json"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run; ``checkpoints_root`` is ``<root>/checkpoints`` unless ``checkpoint.dir`` is set."""

    root: Path
    checkpoints_root: Path

    @classmethod
    def of(cls, run_dir: str | Path, checkpoint_dir: str | Path | None = None) -> RunLayout:
        root = Path(run_dir)
        return cls(root, Path(checkpoint_dir) if checkpoint_dir else root / "checkpoints")

    # ------------------------------------------------------------------ files of the run
    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def git_sha_file(self) -> Path:
        return self.root / "git_sha.txt"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.json"

    @property
    def wandb_id_file(self) -> Path:
        return self.root / "wandb_id.txt"

    @property
    def figures_root(self) -> Path:
        return self.root / "figures"

    # ------------------------------------------------------------------ per stage
    def figure(self, stage: str, step: int) -> Path:
        return self.figures_root / stage / f"step_{step:08d}.png"

    def checkpoints(self, stage: str) -> Path:
        return self.checkpoints_root / stage

    def export(self, stage: str) -> Path:
        return self.root / "export" / stage

    def done_file(self, stage: str) -> Path:
        return self.export(stage) / DONE_FILE

    def stage_done(self, stage: str) -> dict[str, Any] | None:
        """The record written when ``stage`` finished (its export complete), or None."""
        f = self.done_file(stage)
        return json.loads(f.read_text()) if f.is_file() else None

    def stage_started(self, stage: str) -> bool:
        """The stage has checkpoints or is finished."""
        return self.checkpoints(stage).is_dir() or self.done_file(stage).is_file()

    # ------------------------------------------------------------------ writing
    def write_provenance(self, config_yaml: str, git_sha: str) -> None:
        """The resolved config and code version of this launch (rank 0, before training)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(config_yaml)
        self.git_sha_file.write_text(git_sha + "\n")

    def git_sha(self) -> str:
        return self.git_sha_file.read_text().strip() if self.git_sha_file.is_file() else ""

    def mark_done(self, stage: str, record: dict[str, Any]) -> None:
        """Mark ``stage`` finished; call after its export is complete."""
        self.done_file(stage).write_text(json.dumps(record))
