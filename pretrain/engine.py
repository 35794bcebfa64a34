"""Everything distributed: process group, DeepSpeed config from the typed config, the engine, export.

Model files import nothing from here; the trainer calls these functions with the run's
:class:`~pretrain.plan.Plan` (the DeepSpeed config is generated once, by :func:`deepspeed_config`, into
``plan.deepspeed``).
"""

from __future__ import annotations

import inspect
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from data_prep.configtree import import_object
from data_prep.errors import UserError
from pretrain.config import ConfigError, TrainConfig
from pretrain.models.vocab import Vocabulary

if TYPE_CHECKING:
    from pretrain.plan import Plan, StagePlan

__all__ = ["import_object"]  # re-exported: ``"module:function"`` specs resolve through data_prep.configtree

NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding, nn.RMSNorm)
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "register_tokens")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
CPU_MMAP_THRESHOLD = 1 << 20


def bound_cpu_allocator(threshold: int = CPU_MMAP_THRESHOLD) -> bool:
    """Serve CPU allocations of ``threshold`` bytes or more with their own mmap (glibc ``mallopt``).

    glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped block is freed; afterwards
    blocks of that size come from the heap arenas, and ZeRO-3's per-layer gather/release of full parameters
    and its gradient partitions leave those arenas fragmented: measured at ViT-B on 2 CPU ranks, 1.4 GiB of
    freed-but-held heap after 4 steps, growing every step, making a ZeRO-3 rank bigger than a ZeRO-0 one.
    A fixed threshold returns every large tensor to the OS when freed. Skipped when the user set
    ``MALLOC_MMAP_THRESHOLD_`` or the C library is not glibc; returns whether it was applied.

    The price is a page fault per fresh page of every such tensor: measured +20-45% ZeRO-3 step time at
    ViT-B on CPU, so the trainer applies it to ZeRO-3 CPU runs only (where it saves ~1.3 GiB per rank);
    ZeRO-0/2 fragment little (~50 MiB) and keep glibc's default. Export ``MALLOC_MMAP_THRESHOLD_`` to choose.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


class BuildLockError(UserError):
    """An extension build lock is left by a killed build: the launch would wait for it forever."""


def extension_locks() -> list[Path]:
    """Build locks in the torch extensions cache (``TORCH_EXTENSIONS_DIR``, else torch's default root)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")}) if root.is_dir() else []


def _held_open(path: Path) -> bool:
    """A process of this machine has ``path`` open (torch's FileBaton keeps its lock open while it builds)."""
    target = os.path.realpath(path)
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:  # ended meanwhile, or not ours to look at
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    return True
            except OSError:
                continue
    return False


def check_build_locks(quiet_s: float = 120.0, poll_s: float = 1.0) -> None:
    """Report an extension build lock that no build holds any more, instead of waiting on it forever.

    torch's JIT extension build (DeepSpeed builds its CPU communication op that way at the first launch
    into an empty cache) holds a ``lock`` file in the op's build folder; other processes wait while it
    exists, and a killed build leaves it behind, so every later launch hangs without a word. Every JIT load
    takes that lock for a moment too (the other rank's, while this one checks): a lock that is released, or
    taken anew, while it is being judged is not stale. A lock that a
    process of this machine holds open is a build in progress: torch waits for it, and so does this. A lock
    nobody here holds may still be a build on another machine sharing the cache: it counts as stale once
    nothing in its folder has changed for ``quiet_s`` seconds (until then this waits, saying so once).
    Raises :class:`BuildLockError` naming the file.
    """
    warned: set[Path] = set()
    while True:
        pending = []
        for lock in extension_locks():
            try:
                if _held_open(lock):
                    continue
                # the lock's own stat first: a build that released it between the scan above and here (torch takes
                # the lock for a moment on every JIT load) must not leave only the op's old files to judge by
                seen = lock.stat()
                quiet = time.time() - max([seen.st_mtime, *(p.stat().st_mtime for p in lock.parent.iterdir())])
                now = lock.stat()  # the same file still there, untouched: not a lock released and taken again
                if (now.st_ino, now.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns) or _held_open(lock):
                    continue
            except FileNotFoundError:  # released meanwhile
                continue
            if quiet >= quiet_s:
                raise BuildLockError(
                    f"extension build lock {lock} was left by a killed build: no process holds it and its folder "
                    f"has not changed for {quiet:.0f} s, so the launch would wait for it forever; remove it "
                    f"(rm {lock}) and launch again")
            pending.append(lock)
            if lock not in warned:
                warned.add(lock)
                print(f"waiting on extension build lock {lock}: no process here holds it; it is reported as left "
                      f"by a killed build if its folder stays unchanged for {quiet_s:.0f} s", file=sys.stderr,
                      flush=True)
        if not pending:
            return
        time.sleep(poll_s)


def init_distributed() -> tuple[int, int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without torchrun's variables the run is one process (world size 1) on a fresh local port: explicit,
    not a fallback. Backend: nccl with CUDA, gloo otherwise. Returns (rank, world_size, local_rank).
    A stale extension build lock is reported first (:func:`check_build_locks`): DeepSpeed builds its CPU
    communication op here on the first launch.
    """
    check_build_locks()
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices; none on norms, biases, embeddings and 1-d parameters."""
    decay, no_decay, seen = [], [], set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            skip = (isinstance(mod, NO_DECAY_MODULES) or p.ndim < 2 or p_name == "bias"
                    or "norm" in full.lower() or full.split(".")[-1] in NO_DECAY_NAMES)
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config, generated from the typed config in one place."""
    accum, global_batch = cfg.parallel.resolve(world_size)
    ds: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": cfg.parallel.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": cfg.parallel.precision == "bf16"},
        "torch_autocast": {"enabled": cfg.parallel.precision == "bf16-autocast", "dtype": "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    b = cfg.parallel.bucket_elements
    if cfg.parallel.zero_stage in (1, 2):
        ds["zero_optimization"].update({"reduce_bucket_size": b, "allgather_bucket_size": b})
    if cfg.parallel.zero_stage == 3:
        # Bounded ZeRO-3 working set: at most ``b`` gathered parameter elements live at once (prefetch
        # b/2), parameters under 1e5 elements stay whole on every rank (norms, biases: cheap to keep, costly
        # to gather one by one), and the optimizer steps its partition in sub-groups of ``b`` elements so
        # AdamW's temporaries (a few copies of the sub-group) stay small; DeepSpeed's default sub-group is
        # 1e9 elements, i.e. the whole partition at once.
        ds["zero_optimization"].update({"reduce_bucket_size": b, "stage3_prefetch_bucket_size": b // 2,
                                        "stage3_max_live_parameters": b, "stage3_max_reuse_distance": b,
                                        "stage3_param_persistence_threshold": 100_000, "sub_group_size": b,
                                        "stage3_gather_16bit_weights_on_model_save": False})
    return ds


def is_partitioned(module: nn.Module) -> bool:
    """True when the module's parameters are ZeRO-3 partitions (built under ``deepspeed.zero.Init``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Any:
    """``deepspeed.zero.GatheredParameters(params, modifier_rank)`` when they are ZeRO-3 partitions (collective
    then), else a context that does nothing."""
    if not any(hasattr(p, "ds_id") for p in params):
        from contextlib import nullcontext

        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def objective_params(model: nn.Module) -> list[nn.Parameter]:
    """The objective's own parameters: every one outside ``model.encoder`` (cf. export.objective_state)."""
    return [p for n, p in model.named_parameters() if not n.startswith("encoder.")]


def construct_model(plan: Plan, vocab: Vocabulary | None = None, stage: StagePlan | None = None) -> nn.Module:
    """Build ``cfg.model`` with its builder; under ZeRO-3, inside ``deepspeed.zero.Init`` when the builder
    says its models support it (``zero_init_safe = True``: the shipped :func:`pretrain.models.build_model`).

    Under ``zero.Init`` each module's parameters are broadcast from rank 0 and partitioned as soon as that
    module's ``__init__`` returns, so no rank ever holds the whole model. That is exact for models that
    follow :mod:`pretrain.models.contract` (every module initialises only its own parameters, in its own
    ``__init__`` or through ``Module.apply``, which DeepSpeed gathers): rank 0 then draws exactly what
    the whole model draws from the same seed. A builder without the flag is built whole and
    ``deepspeed.initialize`` partitions it (a transient full copy per rank at build time).

    ``vocab`` (a :class:`~pretrain.models.vocab.Vocabulary`: a resumed run's or a previous stage's) is
    passed to builders that take a ``vocab`` argument.
    """
    cfg = plan.cfg
    build_model = import_object(cfg.model.builder)
    m = cfg.model
    kw = dict(m.overrides)
    if vocab is not None and "vocab" in inspect.signature(build_model).parameters:
        kw["vocab"] = vocab

    def build() -> nn.Module:  # the stage's objective (stages.N.objective), else model.objective
        return build_model(m.name, objective=stage.objective if stage is not None else m.objective, **kw)

    if cfg.parallel.zero_stage == 3 and getattr(build_model, "zero_init_safe", False):
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=plan.deepspeed):
            return build()
    return build()


def stage_vocabulary(resume_tag: Path | None, init_export: Path | None) -> tuple[Vocabulary, Vocabulary]:
    """``(build, run)`` vocabularies of a stage: the model is built with ``build`` (so a previous stage's
    export loads into it exactly), then extended to ``run`` (:func:`extend_vocabulary`) before the engine.

    ``build``: the init export's vocabulary, else the checkpoint's (a resumed first stage), else the
    registry's (a fresh run). ``run``: the checkpoint's when resuming (recorded by the trainer in the
    checkpoint's ``client_state["vocab"]``), else ``build`` with any registry sensor it lacks appended. So
    indices never move: a sensor YAML added or renamed later only ever appends, at a stage's start.
    A checkpoint whose vocabulary does not extend the export's is a :class:`CheckpointError`.
    """
    import json

    from pretrain.checkpoint import MARKER, CheckpointError
    from pretrain.models.export import read_vocab

    saved = None
    if resume_tag is not None:
        client = json.loads((Path(resume_tag) / MARKER).read_text()).get("client_state") or {}
        if "vocab" in client:
            saved = Vocabulary.from_json(client["vocab"], f"{resume_tag / MARKER}: client_state.vocab")
    exported = read_vocab(init_export) if init_export is not None else None
    registry = Vocabulary.from_registry()
    build = exported or saved or registry
    run = saved or build.extended(registry.sensors)
    if run.sensors[:len(build.sensors)] != build.sensors or run.levels != build.levels:
        raise CheckpointError(f"checkpoint {resume_tag}: its vocabulary {list(run.sensors)} does not extend the "
                              f"vocabulary {list(build.sensors)} of the export {init_export} it started from")
    return build, run


def extend_vocabulary(model: nn.Module, vocab: Vocabulary | None) -> None:
    """Append the names of ``vocab`` that ``model.vocab`` lacks (``model.add_sensor``; before the engine)."""
    have = getattr(model, "vocab", None)
    if have is None or vocab is None:
        return
    for name in vocab.sensors[len(have.sensors):]:
        model.add_sensor(name)
    if model.vocab != vocab:
        raise RuntimeError(f"model vocabulary {list(model.vocab.sensors)} did not extend to {list(vocab.sensors)}")


def update_target(model: nn.Module, momentum: float) -> None:
    """The EMA step of an EMA model (the contract's ``update_target``), exact under every ZeRO stage.

    Partitioned (ZeRO-3), each rank updates its own partition of every target parameter from the same
    partition of the context parameter (identical layouts: same shapes, same world size), plus the whole
    copy that DeepSpeed keeps of a gathered (persistent) parameter: no communication, and elementwise the
    arithmetic of the whole model, so the result is bitwise the ZeRO-0/1/2 one."""
    if not is_partitioned(model):
        model.update_target(momentum)
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    def partitions(t: nn.Parameter, o: nn.Parameter) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = [(t.ds_tensor.data, o.ds_tensor.data)]
        if t.ds_status == ZeroParamStatus.AVAILABLE:  # a whole copy is held (persistent): keep it in step
            if o.ds_status != ZeroParamStatus.AVAILABLE:
                raise RuntimeError(f"EMA: target parameter {t.ds_id} is gathered but its context parameter "
                                   f"{o.ds_id} is not")
            pairs.append((t.data, o.data))
        return pairs

    model.update_target(momentum, storage=partitions)


def encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A full copy of ``model.encoder``'s state (gathered first when it is partitioned; collective then)."""
    enc = model.encoder
    if not is_partitioned(enc):
        return {k: v.detach().clone() for k, v in enc.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(enc.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in enc.state_dict().items()}


def abs_sum(model: nn.Module, part: str | None = None) -> float:
    """Sum of |x| over ``model``'s floating state under ``part`` (a submodule's name, e.g. ``encoder`` or
    ``target_encoder``), or over the objective's own parts (everything outside ``encoder``) when None; gathered
    first when partitioned (collective then). The stage-start fingerprints that show what was carried over."""
    def mine(name: str) -> bool:
        return name.startswith(f"{part}.") if part is not None else not name.startswith("encoder.")

    with gathered([p for n, p in model.named_parameters() if mine(n)]):
        return float(sum(v.double().abs().sum() for k, v in model.state_dict().items()
                         if mine(k) and v.is_floating_point()))


def apply_activation_checkpointing(model: nn.Module, cfg: TrainConfig) -> None:
    """``model.activation_checkpointing``: the model's own switch (the contract's ``set_grad_checkpointing``,
    which recomputes each block of its transformer stacks in backward; parameter names do not change)."""
    if not cfg.model.activation_checkpointing:
        return
    fn = getattr(model, "set_grad_checkpointing", None)
    if not callable(fn):
        raise ConfigError(f"model.activation_checkpointing: the model built by {cfg.model.builder!r} "
                          f"({type(model).__name__}) has no set_grad_checkpointing(enabled) (see "
                          f"pretrain.models.contract)")
    fn(True)


def build_engine(model: nn.Module, plan: Plan) -> Any:
    """``deepspeed.initialize`` with a torch AdamW over :func:`param_groups` (torch's fused CUDA kernel when the
    parameters are on a GPU; no DeepSpeed op compile), then ``engine.compile()`` when ``parallel.compile``."""
    import deepspeed

    cfg = plan.cfg
    apply_activation_checkpointing(model, cfg)
    dev = device()
    if dev.type == "cuda" and not is_partitioned(model):
        model.to(dev)  # before the optimizer, so it can take the fused kernel
    fused = dev.type == "cuda" and all(p.is_cuda for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, **({"fused": True} if fused else {}))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=plan.deepspeed)
    if cfg.parallel.compile:
        engine.compile()
    return engine


def set_lr(engine: Any, lr: float) -> None:
    for g in engine.optimizer.param_groups:
        g["lr"] = lr


def export_encoder(engine: Any, plan: Plan, out_dir: Path, rank: int, extra: dict | None = None,
                   objective: str | None = None) -> None:
    """Write the consolidated encoder export (collective under ZeRO-3: parameters are gathered first).

    With ``objective`` (the stage's), the objective's own parts are written first, beside it
    (:func:`pretrain.models.export.save_objective`), so a finished export always has them."""
    import deepspeed

    from pretrain.models import export

    cfg = plan.cfg
    exporter = import_object(cfg.model.exporter)
    model = engine.module
    kw = {"extra": extra} if extra and "extra" in inspect.signature(exporter).parameters else {}
    if objective is not None and isinstance(getattr(model, "encoder", None), nn.Module):
        with gathered(objective_params(model)):
            if rank == 0:
                export.save_objective(model, out_dir, objective)
    if cfg.parallel.zero_stage == 3:
        # only the encoder is written: gather only its parameters (the decoder stays partitioned)
        part = model.encoder if isinstance(getattr(model, "encoder", None), nn.Module) else model
        with deepspeed.zero.GatheredParameters(list(part.parameters()), modifier_rank=None):
            if rank == 0:
                exporter(model, out_dir, **kw)
    elif rank == 0:
        exporter(model, out_dir, **kw)
    dist.barrier()


def load_export_into(model: nn.Module, export_dir: Path) -> None:
    """Initialise ``model.encoder`` from a previous stage's export (strict; :class:`ExportError` otherwise).

    Names and full shapes must match (:func:`pretrain.models.export.check_fits`), and, where both the export
    and the model carry a vocabulary, the vocabularies too. A partitioned encoder (built under
    ``zero.Init``) is gathered with ``modifier_rank=0``: every rank reads the same file and loads it
    (buffers are not partitioned, so each rank needs them), rank 0's parameters are then partitioned out to
    all. Collective in that case: call it on every rank.
    """
    from pretrain.models import export

    enc = model.encoder
    sd = export.read_weights(export_dir)
    export.check_fits(sd, export.state_shapes(enc), str(export_dir))
    export.check_vocab(enc, export_dir)
    if not is_partitioned(enc):
        enc.load_state_dict(sd, strict=True)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(enc.parameters()), modifier_rank=0):
        enc.load_state_dict(sd, strict=True)


def load_objective_into(model: nn.Module, export_dir: Path, objective: str) -> bool:
    """Initialise the objective's own parts (everything outside ``model.encoder``) from the export's
    ``objective.safetensors`` when it was written by a stage of ``objective``; False (they stay fresh) when the
    export has none or another objective wrote it. Strict otherwise (:class:`ExportError` on other names or
    shapes). Collective under ZeRO-3, as :func:`load_export_into`."""
    from pretrain.models import export

    found = export.read_objective(export_dir)
    if found is None or found[0] != objective:
        return False
    sd = found[1]
    shapes = {k: v for k, v in export.state_shapes(model).items() if not k.startswith("encoder.")}
    export.check_fits(sd, shapes, str(Path(export_dir) / export.OBJECTIVE_WEIGHTS), what=f"{objective} objective")
    with gathered(objective_params(model), modifier_rank=0):
        missing = model.load_state_dict(sd, strict=False).missing_keys
    left = [k for k in missing if not k.startswith("encoder.")]
    if left:  # check_fits saw every name: only a model whose state dict changed under us lands here
        raise export.ExportError(f"{export_dir}: {export.OBJECTIVE_WEIGHTS} left {left[:5]} unset")
    return True


def all_reduce_mean(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    t = torch.tensor([int(flag)], device=device() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_floats(x: float) -> list[float]:
    t = torch.tensor([x], dtype=torch.float64, device=device() if dist.get_backend() == "nccl" else "cpu")
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(o.item()) for o in out]


def to_device(batch: dict[str, Any], dev: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Move tensors to ``dev``; floating tensors to ``dtype`` when given (bf16 runs). A co-located group batch's
    ``views`` (a list of batch dicts, :mod:`pretrain.data.colocated`) are moved alike."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(dev, non_blocking=True)
            if dtype is not None and v.is_floating_point() and k not in ("ground", "footprint"):
                v = v.to(dtype)
        elif k == "views" and isinstance(v, list):
            v = [to_device(x, dev, dtype) for x in v]
        out[k] = v
    return out
