"""The Trainer: an orchestrator of stateful parts that runs the stages of a :class:`~pretrain.plan.Plan`.

Per stage it builds the parts once (model, DeepSpeed engine, loader, a :class:`TrainState` of counters, a
:class:`~pretrain.checkpoint.CheckpointManager` handed the objects to save), resumes them from the newest
complete checkpoint, and runs a short loop of :meth:`Trainer.train_step`. Where files go is the run
layout's business (:mod:`pretrain.layout`); making missing demo data is the launcher's
(:mod:`pretrain.prepare`).

Re-running the same command skips finished stages (those with ``export/<stage>/stage_done.json``),
resumes the current one from its newest complete checkpoint, and goes on. SIGTERM: every rank learns of
it at the next step (an all-reduce of the flag), the checkpoint is saved, ``run()`` returns 143.

Metrics contributed per log step: every callable named in ``logging.instruments`` (``"module:function"``)
and the model's own ``log_metrics`` method, if it has one, are called on every rank at each log step as
``fn(model, batch, out)`` (the unwrapped module, the last micro-batch, its outputs; collectives are
allowed) and return ``{name: float}``; rank 0's values go into the record (console, JSONL, wandb).

An exception on one rank ends that rank at once (no end-of-run collective that the others would never
join); the launcher reports it and the process launcher stops the other ranks.
"""

from __future__ import annotations

import gc
import logging
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_prep.configtree import import_object
from pretrain import checkpoint as ckpt
from pretrain import engine as eng
from pretrain.data import build_loader
from pretrain.instruments import plot_curves
from pretrain.logging_utils import RunLogger, memory_figures, peak_rss_mb, throughput, write_summary
from pretrain.plan import Plan, StagePlan
from pretrain.schedules import ema_momentum, lr_at
from pretrain.viz import has_reconstruction, save_reconstruction

log = logging.getLogger("specfm.pretrain")

STOPPED_BY_SIGNAL = 143

MetricSource = Callable[[Any, dict, dict], dict[str, float]]


class TrainState:
    """Counters of the running stage; its ``state_dict`` is the checkpoint's ``client_state``.

    It also records the model's vocabulary (``vocab``), which a resumed stage is built with
    (``engine.stage_vocabulary`` reads it from the marker before the model exists)."""

    def __init__(self, stage: StagePlan, global_step: int = 0, vocab: Any = None):
        self.stage, self.stage_name = stage.index, stage.name
        self.step, self.samples_seen, self.global_step = 0, 0, global_step
        self.vocab = vocab

    def state_dict(self) -> dict[str, Any]:
        out = {"stage": self.stage, "stage_name": self.stage_name, "stage_step": self.step,
               "global_step": self.global_step, "samples_seen": self.samples_seen}
        if self.vocab is not None:
            out["vocab"] = self.vocab.to_json()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.samples_seen = int(state["stage_step"]), int(state["samples_seen"])
        self.global_step = int(state["global_step"])


@dataclass
class StageParts:
    """What one stage is built from (see :meth:`Trainer.build`)."""

    stage: StagePlan
    model: Any
    engine: Any
    loader: Any
    total: int
    state: TrainState
    checkpoints: ckpt.CheckpointManager
    resume_from: Path | None
    init_from: Path | None
    init_checksum: float
    objective_carried: bool = False
    """The objective's own parts (decoder, head, predictor) were started from ``init_from``'s export."""
    objective_checksum: float = 0.0
    target_checksum: float | None = None
    """An EMA model's target encoder (None for others)."""


class Trainer:
    """Runs the stages of ``plan`` on this rank; ``run()`` returns the process exit code."""

    def __init__(self, plan: Plan, rank: int):
        self.plan, self.cfg, self.rank, self.world_size = plan, plan.cfg, rank, plan.world_size
        self.layout = plan.layout
        self.device = eng.device()
        self.dtype = torch.bfloat16 if self.cfg.parallel.precision == "bf16" else None
        self.instruments: list[MetricSource] = [import_object(s) for s in self.cfg.logging.instruments]
        self.logger = RunLogger(self.cfg.logging, self.layout, rank, self.cfg.to_dict())
        self._stop = False
        self.figures: list[Path] = []
        self.peak_sps: list[float] = []
        self.train_rss = 0.0

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        global_step, code = 0, 0
        try:
            for stage in self.plan.stages:
                done = self.layout.stage_done(stage.name)
                if done is not None:
                    global_step = done["global_step"]
                    log.info("stage %s already finished (export %s); skipping", stage.name,
                             self.layout.export(stage.name))
                    continue
                stopped, global_step = self.run_stage(stage, global_step)
                if stopped is not None:
                    code = stopped
                    break
            # reached by every rank together (no exception): the end-of-launch collective is safe here
            self._write_summary()
            return code
        finally:
            self.logger.close()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop = True

    @property
    def stop_requested(self) -> bool:
        """SIGTERM has arrived (the run saves and stops at the end of the current step)."""
        return self._stop

    def build(self, stage: StagePlan, global_step: int) -> StageParts:
        """Model (initialised from the previous export), engine, loader, counters and checkpointer of a stage."""
        seed = self.cfg.seed + 1000 * stage.index + self.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        if self.cfg.parallel.zero_stage == 3 and self.device.type == "cpu":
            eng.bound_cpu_allocator()  # before the model exists: its tensors are the ones that fragment
        init = self.plan.init_export(stage)
        resume = ckpt.latest_complete(self.layout.checkpoints(stage.name)) if self.cfg.checkpoint.resume else None
        # the vocabulary travels with the weights (export, checkpoint), never re-derived from the registry
        build_vocab, run_vocab = eng.stage_vocabulary(resume, init)
        model = eng.construct_model(self.plan, build_vocab, stage)  # under zero.Init when ZeRO-3 and supported
        carried = False
        if init is not None:
            eng.load_export_into(model, init)
            if stage.carry_objective:
                carried = eng.load_objective_into(model, init, stage.objective)
        eng.extend_vocabulary(model, run_vocab)
        if init is not None and not carried and hasattr(model, "update_target"):
            # an EMA target starts as the encoder it follows (I-JEPA), not at its random draw: with momentum
            # 0.996 -> 1 it would move only ~12% of the way to a loaded encoder in a 60-step stage
            eng.update_target(model, 0.0)
        vocab = getattr(model, "vocab", None)
        checksum = eng.abs_sum(model, "encoder")
        objective_checksum = eng.abs_sum(model)
        target_checksum = eng.abs_sum(model, "target_encoder") if hasattr(model, "update_target") else None
        loader = build_loader(stage.data, self.rank, self.world_size, vocab=vocab,
                              device=self.device)  # on a GPU the batches are normalised there
        if stage.steps is not None:
            total = stage.steps
        else:
            total = self.plan.steps_from_batches(stage, int(min(eng.gather_floats(float(loader.num_batches)))))
        state = TrainState(stage, global_step, vocab)
        manager = ckpt.CheckpointManager(self.layout.checkpoints(stage.name), self.cfg.checkpoint.keep,
                                         ckpt.param_shapes(model), client=state,
                                         per_rank={"loader": loader, "rng": ckpt.RNGState()})
        if resume is not None:  # before DeepSpeed: another model shape fails here, clearly
            manager.check(resume)
        engine = eng.build_engine(model, self.plan)
        return StageParts(stage, model, engine, loader, total, state, manager, resume, init, checksum, carried,
                          objective_checksum, target_checksum)

    def run_stage(self, stage: StagePlan, global_step: int) -> tuple[int | None, int]:
        """Train one stage; returns (exit code to stop with or None to go on, global step)."""
        cfg = self.cfg
        parts = self.build(stage, global_step)
        engine, st, total = parts.engine, parts.state, parts.total
        self.model_ref = parts.model
        self.logger.log({"event": "stage_start", "stage": stage.name,
                         "init_from": str(parts.init_from) if parts.init_from is not None else None,
                         "objective_carried": parts.objective_carried, "encoder_abs_sum": parts.init_checksum,
                         "objective_abs_sum": parts.objective_checksum, "target_abs_sum": parts.target_checksum,
                         "total_steps": total, "global_step": global_step})
        if parts.resume_from is not None:
            parts.checkpoints.load(engine, parts.resume_from)
            log.info("stage %s: resumed from %s at step %d", stage.name, parts.resume_from, st.step)
        log.info("stage %s: %d steps of %d samples (micro %d x accum %d x %d ranks), ZeRO-%d, lr %.3g -> %.3g",
                 stage.name, total, self.plan.global_batch, cfg.parallel.micro_batch, self.plan.grad_accum,
                 self.world_size, cfg.parallel.zero_stage, stage.lr, stage.min_lr)
        sources = self._metric_sources(parts.model)
        it = iter(parts.loader)
        bar = None
        if self.rank == 0 and cfg.logging.progress:
            from data_prep.progress import progress

            # a bar on a terminal only; elsewhere its log records (every logging.every steps) are the lines
            bar = progress(total=total, initial=st.step, desc=f"stage {stage.name}")
            if bar.disable:
                bar = None
        saved_at = st.step if parts.resume_from is not None else -1
        last_t, last_samples, last_wait = time.perf_counter(), st.samples_seen, parts.loader.data_wait_s
        try:
            while st.step < total:
                if cfg.max_steps is not None and st.global_step >= cfg.max_steps:
                    if saved_at != st.step:
                        parts.checkpoints.save(engine, st.step)
                    log.info("max_steps=%d reached; checkpoint saved, re-run the command to go on", cfg.max_steps)
                    return 0, st.global_step
                lr = lr_at(st.step, total_steps=total, peak_lr=stage.lr, min_lr=stage.min_lr,
                           warmup_steps=stage.warmup_steps)
                eng.set_lr(engine, lr)
                metrics, batch, out = self.train_step(engine, it, st, total)
                st.step += 1
                st.global_step += 1
                st.samples_seen += self.plan.global_batch
                self.train_rss = max(self.train_rss, peak_rss_mb())  # before any save/export of this step
                if bar is not None:
                    bar.update(1)
                stop = eng.any_rank(self._stop)
                if st.step % cfg.logging.every == 0 or st.step == total:
                    now = time.perf_counter()
                    rec = {"stage": stage.name, "step": st.step, "global_step": st.global_step, "lr": lr,
                           **metrics, "samples_seen": st.samples_seen}
                    rec.update(self._speed(batch, st.samples_seen - last_samples, now - last_t))
                    # time blocked on the loader / time of the steps since the last record
                    rec["data_wait_fraction"] = (parts.loader.data_wait_s - last_wait) / max(now - last_t, 1e-9)
                    last_wait = parts.loader.data_wait_s
                    # reads of this stage that failed to decode (deleted, lost or corrupt chunks), each replaced by a
                    # substitute, summed over the ranks (each is logged by its rank; counted in the loader's state)
                    rec["bad_samples"] = round(eng.all_reduce_mean(float(parts.loader.bad_samples)) * self.world_size)
                    for source in sources:
                        rec.update(source(engine.module, batch, out))
                    last_t, last_samples = now, st.samples_seen
                    self.logger.log(rec, console=bar is None)
                    if bar is not None:
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
                v = cfg.logging.viz_every
                if v > 0 and st.step % v == 0 or v >= 0 and st.step == total:
                    self.visualise(batch, out, stage, st)
                if st.step % cfg.checkpoint.every == 0 or st.step == total or stop:
                    parts.checkpoints.save(engine, st.step)
                    saved_at = st.step
                if stop:
                    log.warning("SIGTERM: checkpoint saved at stage %s step %d; exiting", stage.name, st.step)
                    return STOPPED_BY_SIGNAL, st.global_step
        finally:
            if bar is not None:
                bar.close()
            close = getattr(parts.loader, "close", None)
            if callable(close):  # stop its decode threads and worker processes now, not when garbage-collected
                close()
        self.finish_stage(engine, stage, st, total)
        self.release(engine)
        return None, st.global_step

    def _metric_sources(self, model: Any) -> list[MetricSource]:
        own = getattr(model, "log_metrics", None)
        return ([lambda module, batch, out: module.log_metrics(batch, out)] if callable(own) else []) + \
            self.instruments

    def release(self, engine: Any) -> None:
        """Free a finished stage's engine (hooks, partitions, optimizer state) before the next one is built."""
        if hasattr(engine, "destroy"):
            engine.destroy()
        self.model_ref = None
        del engine
        gc.collect()

    def train_step(self, engine: Any, it: Any, st: TrainState, total: int) -> tuple[dict[str, float], dict, dict]:
        """One optimizer step: ``grad_accum`` micro-batches of forward/backward, then the (clipped) update."""
        losses = []
        for _ in range(self.plan.grad_accum):
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
        if hasattr(module, "update_target"):  # an EMA model (pretrain.models.contract.EMAModel)
            eng.update_target(module, ema_momentum(st.step, total_steps=total))
        gn = engine.get_global_grad_norm()
        loss = eng.all_reduce_mean(float(torch.stack(losses).mean()))
        return {"loss": loss, "grad_norm": float(gn) if gn is not None else float("nan")}, batch, out

    def _speed(self, batch: dict, samples: int, seconds: float) -> dict[str, float]:
        enc = getattr(self.model_ref, "encoder", None)
        p = getattr(enc, "patch_size", 1)
        px = batch["pixels"] if "pixels" in batch else batch["views"][0]["pixels"]  # a co-located group: view 0
        c, h, w = px.shape[1:]
        fps = None
        if hasattr(self.model_ref, "flops_per_sample"):
            fps = float(self.model_ref.flops_per_sample(int(c), int(h)))
        rec = throughput(samples=samples, seconds=seconds, tokens_per_sample=(h // p) * (w // p),
                         flops_per_sample=fps, world_size=self.world_size, peak_tflops=self.cfg.logging.peak_tflops)
        self.peak_sps.append(rec["samples_per_s"])
        rec.update(memory_figures())
        return rec

    def visualise(self, batch: dict, out: dict, stage: StagePlan, st: TrainState) -> None:
        if self.rank != 0 or not has_reconstruction(out):
            return
        p = getattr(getattr(self.model_ref, "encoder", None), "patch_size", 1)
        path = self.layout.figure(stage.name, st.step)
        save_reconstruction(batch, out, path, p, title=f"stage {stage.name}, step {st.step}")
        self.figures.append(path)
        self.logger.log_image(path, st.global_step)
        if self.layout.metrics_file.is_file():  # loss and instrument curves of the run so far
            curves = plot_curves(self.layout.metrics_file, self.layout.figures_root / "instruments.png",
                                 title=str(self.layout.root))
            if curves not in self.figures:
                self.figures.append(curves)

    def finish_stage(self, engine: Any, stage: StagePlan, st: TrainState, total: int) -> None:
        """Export the encoder, then mark the stage done (the marker is written last)."""
        out = self.layout.export(stage.name)
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        eng.export_encoder(engine, self.plan, out, self.rank,
                           extra={"stage": stage.name, "steps": total, "global_step": st.global_step,
                                  "samples_seen": st.samples_seen, "model": self.cfg.model.name,
                                  "git_sha": self.layout.git_sha()}, objective=stage.objective)
        if self.rank == 0:
            self._release(out, stage.name)
            self.layout.mark_done(stage.name, {"stage": stage.name, "steps": total, "global_step": st.global_step,
                                               "samples_seen": st.samples_seen})
            log.info("stage %s finished: export at %s", stage.name, out)
        dist.barrier()

    def _release(self, out: Path, stage: str) -> None:
        """The export's Hugging Face style release folder (``<export>/hf``, pretrain/release.py); a failure is
        logged, not fatal: the export is complete, and ``python -m pretrain.release EXPORT`` writes it later."""
        from pretrain.release import ReleaseError, hardware, write_release

        try:
            write_release(out, run_dir=self.layout.root, stage=stage,
                          hw=hardware(self.world_size, self.cfg.parallel.precision))
        except (ReleaseError, OSError) as e:
            log.warning("stage %s: release folder not written (%s); run `python -m pretrain.release %s`",
                        stage, e, out)

    def _write_summary(self) -> None:
        """Per-rank peak memory and the throughput of this launch (collective; rank 0 writes)."""
        rss = eng.gather_floats(peak_rss_mb())
        train_rss = eng.gather_floats(self.train_rss)
        if self.rank == 0:
            sps = self.peak_sps[1:] or self.peak_sps
            write_summary(self.layout, rss, train_rss, float(np.median(sps)) if sps else None, self.figures)
