"""The Trainer: progressive stages, a small ``train_step``, checkpoints, exports, SIGTERM handling.

State of a run on disk (``run_dir``)::

    config.yaml, git_sha.txt      resolved config and code version of the latest launch
    metrics.jsonl                 one record per log step (appended across resumes)
    figures/<stage>/step_N.png    reconstruction figures
    checkpoints/<stage>/step_N/   DeepSpeed checkpoints (see pretrain.checkpoint)
    export/<stage>/               encoder.safetensors + model_args.json (+ stage_done.json once final)

Re-running the same command skips finished stages (those with ``export/<stage>/stage_done.json``),
resumes the current one from its newest complete checkpoint, and goes on.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain import checkpoint as ckpt
from pretrain import engine as eng
from pretrain.config import ConfigError, StageConfig, TrainConfig
from pretrain.data import build_loader
from pretrain.logging_utils import RunLogger, memory_figures, peak_rss_mb, throughput
from pretrain.schedules import ema_momentum, lr_at
from pretrain.viz import has_reconstruction, save_reconstruction

log = logging.getLogger("specfm.pretrain")

STOPPED_BY_SIGNAL = 143
DONE_FILE = "stage_done.json"


@dataclass
class StageState:
    """Counters of the running stage (saved in every checkpoint's client_state)."""

    stage: int
    step: int = 0
    samples_seen: int = 0
    global_step: int = 0


class Trainer:
    """Builds model, engine and loader per stage and trains; ``run()`` returns the process exit code."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.run_dir = Path(cfg.run_dir)
        self.accum, self.global_batch = cfg.parallel.resolve(world_size)
        self.device = eng.device()
        self.dtype = torch.bfloat16 if cfg.parallel.precision == "bf16" else None
        self.logger = RunLogger(cfg.logging, self.run_dir, rank, cfg.to_dict())
        self._stop = False
        self.figures: list[Path] = []
        self.peak_sps: list[float] = []
        self.train_rss = 0.0

    # ------------------------------------------------------------------ paths
    def export_dir(self, stage: StageConfig) -> Path:
        return self.run_dir / "export" / stage.name

    def stage_done(self, stage: StageConfig) -> dict | None:
        f = self.export_dir(stage) / DONE_FILE
        return json.loads(f.read_text()) if f.is_file() else None

    def init_export(self, k: int) -> Path | None:
        stage = self.cfg.stages[k]
        if stage.init_from == "none":
            return None
        if stage.init_from == "previous":
            prev = self.cfg.stages[k - 1]
            if self.stage_done(prev) is None:
                raise ConfigError(f"stage {stage.name!r} starts from the export of stage {prev.name!r}, but "
                                  f"{self.export_dir(prev)} has no finished export ({DONE_FILE} missing)")
            return self.export_dir(prev)
        return Path(stage.init_from)

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        global_step = 0
        try:
            for k, stage in enumerate(self.cfg.stages):
                done = self.stage_done(stage)
                if done is not None:
                    global_step = done["global_step"]
                    log.info("stage %s already finished (export %s); skipping", stage.name, self.export_dir(stage))
                    continue
                code, global_step = self.run_stage(k, global_step)
                if code is not None:
                    return code
            return 0
        finally:
            self._write_summary()
            self.logger.close()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop = True

    def build(self, k: int) -> tuple[Any, Any, int]:
        """Model (initialised from the previous export), engine, loader and the stage's step count."""
        stage = self.cfg.stages[k]
        seed = self.cfg.seed + 1000 * k + self.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        if self.cfg.parallel.zero_stage == 3 and self.device.type == "cpu":
            eng.bound_cpu_allocator()  # before the model exists: its tensors are the ones that fragment
        model = eng.construct_model(self.cfg, self.world_size)  # under zero.Init when ZeRO-3 and supported
        init = self.init_export(k)
        if init is not None:
            eng.load_export_into(model, init)
        self.init_checksum = float(sum(v.double().abs().sum() for v in eng.encoder_state(model).values()
                                         if v.is_floating_point()))
        self.init_from = str(init) if init is not None else None
        self.shapes = ckpt.param_shapes(model)
        self.model_ref = model
        loader = build_loader(self.cfg.stage_data(stage), self.rank, self.world_size)
        if stage.steps is not None:
            total = stage.steps
        else:
            total = int(min(eng.gather_floats(float(loader.num_batches)))) // self.accum
            if total < 1:
                raise ConfigError(f"stage {stage.name!r}: {stage.epochs} epoch(s) give {loader.num_batches} batches "
                                  f"per rank, fewer than one optimizer step of {self.accum} micro-batches")
        stage_ckpt = self.cfg.checkpoint_dir / stage.name
        self.resume_tag = ckpt.latest_complete(stage_ckpt) if self.cfg.checkpoint.resume else None
        if self.resume_tag is not None:  # before DeepSpeed: another model shape fails here, clearly
            ckpt.check_compatible(self.resume_tag, self.shapes)
        engine = eng.build_engine(model, self.cfg, self.world_size)
        return engine, loader, total

    def run_stage(self, k: int, global_step: int) -> tuple[int | None, int]:
        """Train stage ``k``; returns (exit code to stop with or None to go on, global step)."""
        cfg, stage = self.cfg, self.cfg.stages[k]
        engine, loader, total = self.build(k)
        st = StageState(stage=k, global_step=global_step)
        self.logger.log({"event": "stage_start", "stage": stage.name, "init_from": self.init_from,
                         "encoder_abs_sum": self.init_checksum, "total_steps": total, "global_step": global_step})
        stage_ckpt = cfg.checkpoint_dir / stage.name
        tag = self.resume_tag
        if tag is not None:
            client, mine = ckpt.load(engine, tag)
            st = StageState(stage=k, step=client["stage_step"], samples_seen=client["samples_seen"],
                            global_step=client["global_step"])
            loader.load_state_dict(mine["loader"])
            ckpt.set_rng_state(mine["rng"])
            log.info("stage %s: resumed from %s at step %d", stage.name, tag, st.step)
        peak = stage.lr if stage.lr is not None else cfg.optim.lr
        floor = stage.min_lr if stage.min_lr is not None else cfg.optim.min_lr
        warm = stage.warmup_steps if stage.warmup_steps is not None else cfg.optim.warmup_steps
        log.info("stage %s: %d steps of %d samples (micro %d x accum %d x %d ranks), ZeRO-%d, lr %.3g -> %.3g",
                 stage.name, total, self.global_batch, cfg.parallel.micro_batch, self.accum, self.world_size,
                 cfg.parallel.zero_stage, peak, floor)
        it = iter(loader)
        bar = None
        if self.rank == 0 and cfg.logging.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=st.step, desc=f"stage {stage.name}", dynamic_ncols=True)
        saved_at = st.step if tag is not None else -1
        last_t, last_samples = time.perf_counter(), st.samples_seen
        try:
            while st.step < total:
                if cfg.max_steps is not None and st.global_step >= cfg.max_steps:
                    if saved_at != st.step:
                        self.save(engine, loader, st, stage_ckpt)
                    log.info("max_steps=%d reached; checkpoint saved, re-run the command to go on", cfg.max_steps)
                    return 0, st.global_step
                lr = lr_at(st.step, total_steps=total, peak_lr=peak, min_lr=floor, warmup_steps=warm)
                eng.set_lr(engine, lr)
                metrics, batch, out = self.train_step(engine, it, st, total)
                st.step += 1
                st.global_step += 1
                st.samples_seen += self.global_batch
                self.train_rss = max(self.train_rss, peak_rss_mb())  # before any save/export of this step
                if bar is not None:
                    bar.update(1)
                stop = eng.any_rank(self._stop)
                if st.step % cfg.logging.every == 0 or st.step == total:
                    now = time.perf_counter()
                    rec = {"stage": stage.name, "step": st.step, "global_step": st.global_step, "lr": lr,
                           **metrics, "samples_seen": st.samples_seen}
                    rec.update(self._speed(batch, st.samples_seen - last_samples, now - last_t))
                    last_t, last_samples = now, st.samples_seen
                    self.logger.log(rec, console=bar is None)
                    if bar is not None:
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
                v = cfg.logging.viz_every
                if v > 0 and st.step % v == 0 or v >= 0 and st.step == total:
                    self.visualise(batch, out, stage, st)
                if st.step % cfg.checkpoint.every == 0 or st.step == total or stop:
                    self.save(engine, loader, st, stage_ckpt)
                    saved_at = st.step
                if stop:
                    log.warning("SIGTERM: checkpoint saved at stage %s step %d; exiting", stage.name, st.step)
                    return STOPPED_BY_SIGNAL, st.global_step
        finally:
            if bar is not None:
                bar.close()
        self.finish_stage(engine, stage, st, total)
        self.release(engine)
        return None, st.global_step

    def release(self, engine: Any) -> None:
        """Free a finished stage's engine (hooks, partitions, optimizer state) before the next one is built."""
        if hasattr(engine, "destroy"):
            engine.destroy()
        self.model_ref = None
        del engine
        gc.collect()

    def train_step(self, engine: Any, it: Any, st: StageState, total: int) -> tuple[dict[str, float], dict, dict]:
        """One optimizer step: ``accum`` micro-batches of forward/backward, then the (clipped) update."""
        losses = []
        for _ in range(self.accum):
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(f"the loader ran out at stage step {st.step} of {total}") from None
            batch = eng.to_device(batch, self.device, self.dtype)
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            losses.append(out["loss"].detach().float())
        module = engine.module
        if hasattr(module, "update_target"):
            module.update_target(ema_momentum(st.step, total_steps=total))
        gn = engine.get_global_grad_norm()
        loss = eng.all_reduce_mean(float(torch.stack(losses).mean()))
        return {"loss": loss, "grad_norm": float(gn) if gn is not None else float("nan")}, batch, out

    def _speed(self, batch: dict, samples: int, seconds: float) -> dict[str, float]:
        enc = getattr(self.model_ref, "encoder", None)
        p = getattr(enc, "patch_size", 1)
        c, h, w = batch["pixels"].shape[1:]
        fps = None
        if hasattr(self.model_ref, "flops_per_sample"):
            fps = float(self.model_ref.flops_per_sample(int(c), int(h)))
        rec = throughput(samples=samples, seconds=seconds, tokens_per_sample=(h // p) * (w // p),
                         flops_per_sample=fps, world_size=self.world_size, peak_tflops=self.cfg.logging.peak_tflops)
        self.peak_sps.append(rec["samples_per_s"])
        rec.update(memory_figures())
        return rec

    def visualise(self, batch: dict, out: dict, stage: StageConfig, st: StageState) -> None:
        if self.rank != 0 or not has_reconstruction(out):
            return
        p = getattr(getattr(self.model_ref, "encoder", None), "patch_size", 1)
        path = self.run_dir / "figures" / stage.name / f"step_{st.step:08d}.png"
        save_reconstruction(batch, out, path, p, title=f"stage {stage.name}, step {st.step}")
        self.figures.append(path)
        self.logger.log_image(path, st.global_step)

    def save(self, engine: Any, loader: Any, st: StageState, stage_ckpt: Path) -> None:
        client = {"stage": st.stage, "stage_name": self.cfg.stages[st.stage].name, "stage_step": st.step,
                  "global_step": st.global_step, "samples_seen": st.samples_seen}
        mine = {"loader": loader.state_dict(), "rng": ckpt.rng_state()}
        ckpt.save(engine, stage_ckpt, st.step, client, mine, self.cfg.checkpoint.keep, self.shapes)

    def finish_stage(self, engine: Any, stage: StageConfig, st: StageState, total: int) -> None:
        """Export the encoder, then mark the stage done (the marker is written last)."""
        out = self.export_dir(stage)
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        eng.export_encoder(engine, self.cfg, out, self.rank,
                          extra={"stage": stage.name, "steps": total, "global_step": st.global_step,
                                 "samples_seen": st.samples_seen, "model": self.cfg.model.name,
                                 "git_sha": _read(self.run_dir / "git_sha.txt")})
        if self.rank == 0:
            (out / DONE_FILE).write_text(json.dumps({"stage": stage.name, "steps": total, "global_step":
                                                     st.global_step, "samples_seen": st.samples_seen}))
            log.info("stage %s finished: export at %s", stage.name, out)
        dist.barrier()

    def _write_summary(self) -> None:
        """Per-rank peak memory and the throughput of this launch, in ``<run_dir>/summary.json`` (rank 0)."""
        try:
            rss = eng.gather_floats(peak_rss_mb())
            train_rss = eng.gather_floats(self.train_rss)
        except Exception:  # the process group is gone (an error on another rank): nothing to gather
            return
        if self.rank == 0:
            sps = self.peak_sps[1:] or self.peak_sps
            (self.run_dir / "summary.json").write_text(json.dumps({
                "peak_rss_mb_per_rank": [round(r, 1) for r in rss],
                "train_peak_rss_mb_per_rank": [round(r, 1) for r in train_rss],
                "samples_per_s": float(np.median(sps)) if sps else None,
                "figures": [str(f) for f in self.figures]}))


# ---------------------------------------------------------------------- before training

def _read(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


def _missing_stores(cfg: TrainConfig) -> list[str]:
    from data_prep.store import PatchStore, StoreError

    missing = []
    urls = dict.fromkeys(s.url for st in cfg.stages for s in cfg.stage_data(st).sources if s.weight > 0)
    for url in urls:
        try:
            PatchStore(url, cfg.data.storage_options)
        except StoreError:
            missing.append(url)
    return missing


def prepare_data(cfg: TrainConfig, rank: int) -> None:
    """When ``prepare.enabled`` and a store is missing: simulate and ingest on rank 0; the others wait."""
    p = cfg.prepare
    if p.enabled and rank == 0 and _missing_stores(cfg):
        from data_prep.ingest import ingest
        from data_prep.simulate.corpus import simulate_corpus

        kw = {"sensors": p.sensors} if p.sensors else {}
        log.info("stores missing: simulating a corpus into %s", p.raw_dir)
        simulate_corpus(p.raw_dir, levels=p.levels, scenes=p.scenes, size=p.size, seed=p.seed, **kw)
        log.info("ingesting into %s (patch size %d)", p.store_root, p.patch_size)
        ingest([p.raw_dir], p.store_root, patch_size=p.patch_size, progress=True)
    if dist.is_initialized():
        dist.barrier()


def preflight(cfg: TrainConfig, world_size: int) -> None:
    """Every check that can fail before training starts (run on every rank): ConfigError with the reason."""
    cfg.parallel.resolve(world_size)
    eng.check_zero_support(cfg)
    eng.import_object(cfg.model.builder)
    eng.import_object(cfg.model.exporter)
    missing = _missing_stores(cfg)
    if missing:
        raise ConfigError(f"patch store(s) not found: {missing}; create them with `python -m data_prep ingest` "
                          f"(or set prepare.enabled=true to simulate a small corpus)")
    for k, st in enumerate(cfg.stages):
        if st.init_from not in ("previous", "none") and not (Path(st.init_from) / "encoder.safetensors").is_file():
            raise ConfigError(f"stages.{k} ({st.name}): init_from={st.init_from!r} is not an export directory "
                              f"(no encoder.safetensors there)")
        if st.init_from == "previous" and k > 0:
            run = Path(cfg.run_dir)
            prev = cfg.stages[k - 1].name
            started = (cfg.checkpoint_dir / st.name).is_dir() or (run / "export" / st.name / DONE_FILE).is_file()
            if started and not (run / "export" / prev / DONE_FILE).is_file():
                raise ConfigError(f"stages.{k} ({st.name}) has started but the export of the stage before it, "
                                  f"{run / 'export' / prev}, is missing")
