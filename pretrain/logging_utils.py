"""Run logging: console, one JSONL file per run, wandb (offline by default), throughput and memory figures."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import uuid
from pathlib import Path
from typing import Any

import torch

from pretrain.config import LoggingConfig
from pretrain.layout import RunLayout

log = logging.getLogger("specfm.pretrain")


def setup_console(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere, one line per record with the rank."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_figures() -> dict[str, float]:
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def throughput(*, samples: int, seconds: float, tokens_per_sample: int, flops_per_sample: float | None,
               world_size: int, peak_tflops: float) -> dict[str, float]:
    """samples/s, tokens/s (over all ranks) and model FLOP utilisation per rank against ``peak_tflops``.

    ``flops_per_sample`` is the training cost of one sample (forward + backward), as the models report it.
    """
    sps = samples / seconds if seconds > 0 else float("nan")
    out = {"samples_per_s": sps, "tokens_per_s": sps * tokens_per_sample}
    if flops_per_sample:
        out["tflops_per_rank"] = flops_per_sample * sps / world_size / 1e12
        out["mfu"] = out["tflops_per_rank"] / peak_tflops
    return out


def write_summary(layout: RunLayout, rss_mb: list[float], train_rss_mb: list[float], samples_per_s: float | None,
                  figures: list[Path]) -> None:
    """``summary.json`` of this launch: per-rank peak memory (whole launch, and training before any save or
    export), median samples/s, the figures written."""
    layout.summary_file.write_text(json.dumps({
        "peak_rss_mb_per_rank": [round(r, 1) for r in rss_mb],
        "train_peak_rss_mb_per_rank": [round(r, 1) for r in train_rss_mb],
        "samples_per_s": samples_per_s,
        "figures": [str(f) for f in figures]}))


class RunLogger:
    """Writes records to the console (rank 0), ``metrics.jsonl`` (rank 0) and wandb (rank 0).

    The JSONL file is appended to, so a resumed run continues the same file; each record holds ``stage``,
    ``step`` (within the stage) and ``global_step``.
    """

    def __init__(self, cfg: LoggingConfig, layout: RunLayout, rank: int, config_dict: dict[str, Any]):
        self.cfg, self.layout, self.rank = cfg, layout, rank
        self.jsonl = layout.metrics_file if cfg.jsonl and rank == 0 else None
        self.wandb = None
        if rank == 0 and cfg.wandb != "disabled":
            self._init_wandb(config_dict)

    def _init_wandb(self, config_dict: dict[str, Any]) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        id_file = self.layout.wandb_id_file
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.wandb = wandb.init(project=self.cfg.project, dir=str(self.layout.root), mode=self.cfg.wandb,
                                id=run_id, resume="allow", config=config_dict, name=self.layout.root.name)

    def log(self, record: dict[str, Any], console: bool = False) -> None:
        if self.rank != 0:
            return
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, int | float)},
                           step=int(record.get("global_step", 0)))
        if console:
            parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()]
            log.info(" ".join(parts))

    def log_image(self, path: Path, global_step: int, key: str = "reconstruction") -> None:
        if self.rank == 0 and self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=global_step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
