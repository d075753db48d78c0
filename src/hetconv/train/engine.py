"""The training engine: :func:`fit` runs a :class:`TrainConfig` into a run directory.

A run directory (``out/name``) holds::

    config.json          the resolved configuration (+ data set, world size, versions)
    metrics.jsonl/.csv   one record per finished epoch
    checkpoints/last.pt  everything needed to continue (model, optimizer, scheduler,
                         epoch, RNG states of every rank, metrics history, config)
    checkpoints/best.pt  the model of the epoch with the best validation top-1
    summary.json         final (or failure) summary: accuracy, MACs, params, throughput
    train.log            the log

The epoch's data order depends only on ``(seed, epoch)``, each training image's random
augmentation only on ``(seed, epoch, index)`` (not on the number of loader workers), and
the RNG states are restored on resume, so a run interrupted at any moment and resumed
with ``resume=RUN_DIR`` ends with exactly the weights and metrics of an uninterrupted run
(CPU, same seed, same number of processes; any ``workers``).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import DatasetInfo, build_datasets
from .checkpoint import (CheckpointError, atomic_write_json, capture_rng_state, load_checkpoint,
                         load_model_state, restore_rng_state, save_checkpoint)
from .config import TrainConfig, saved_config
from .distributed import (DistContext, EvalShardSampler, SeededItems, TrainSampler,
                          setup_distributed)
from .metrics import topk_correct, write_metrics

__all__ = ["NonFiniteLossError", "RunDirExistsError", "build_model", "evaluate_model", "fit",
           "model_identity"]

log = logging.getLogger("hetconv.train")

# Fields that may differ when a run is resumed (they do not change what is computed,
# or - ``epochs`` - only extend it).  ``out`` and ``name`` are not among them: a resumed
# run continues in its own directory.
RESUME_MUTABLE = ("epochs", "workers", "data_dir", "device", "eval_batch_size", "compile",
                  "absorb_permutations")
# What a run directory holds (``checkpoints`` included); ``force`` replaces nothing else.
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "checkpoints", "summary.json",
             "train.log")
CHECKPOINT_FILES = ("last.pt", "best.pt")  # what RUN_FILES' checkpoints/ holds


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped, the last good checkpoint is kept."""


class RunDirExistsError(FileExistsError):
    """The run directory exists and holds files (use ``force`` or ``resume``)."""


# --------------------------------------------------------------------------- helpers

def model_identity(config: TrainConfig) -> Dict[str, Any]:
    """The architecture a config builds: ``{"arch", "part", "se", "conv", "width", ...}``
    (the registry name's suffixes and ``model_kwargs`` merged; ``part`` 1 means dense)."""
    from ..models.registry import parse_model_name

    base, kwargs = parse_model_name(config.model)
    merged = {**kwargs, **config.model_kwargs}
    part = merged.get("part")
    return {**merged, "arch": base, "part": 1 if part is None else part,
            "conv": merged.get("conv") or "hetconv"}


def build_model(config: TrainConfig, info: DatasetInfo) -> nn.Module:
    """``hetconv.create_model`` for ``config`` on data set ``info`` (classes, channels)."""
    from ..models.registry import build_model_checked

    model, warning = build_model_checked(config.model, num_classes=info.num_classes,
                                         in_chans=info.in_chans, **config.model_kwargs)
    if warning:  # (in the run's log, not as a Python warning)
        log.warning(warning)
    return model


def _progress(iterable: Iterable, total: Optional[int], desc: str, enabled: bool,
              leave: bool = True):
    """A tqdm bar on a terminal (rank 0 only); the bare iterable otherwise or without tqdm."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _fixed_subset(dataset: Dataset, size: Optional[int], seed: int) -> Dataset:
    """A fixed random subset of ``size`` items (the same for a given seed), or ``dataset``."""
    if size is None or size >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=g)[:size].tolist())


def val_subset(val_ds: Dataset, config: TrainConfig) -> Dataset:
    """The validation images a run with ``config`` validates on: its fixed ``val_subset``
    (drawn with ``subset_seed + 1``) or the whole split (evaluate takes the same)."""
    return _fixed_subset(val_ds, config.val_subset, config.subset_seed + 1)


def val_batch_size(config: TrainConfig, world_size: int) -> int:
    """Each process's validation batch in a run of ``world_size`` processes."""
    return config.eval_batch_size or (config.batch_size // world_size) * 2


def val_images_limit(config: TrainConfig, world_size: int) -> Optional[int]:
    """How many validation images a run with ``--limit-val-batches L`` validates on (None:
    no limit): every process takes L batches of its shard ``rank, rank + W, ...``
    (:class:`~hetconv.train.distributed.EvalShardSampler`), which together are the first
    ``W * batch * L`` images of the (subset) split, in one process or many."""
    if config.limit_val_batches is None:
        return None
    return world_size * val_batch_size(config, world_size) * config.limit_val_batches


def _labels(dataset: Dataset) -> Optional[torch.Tensor]:
    """The labels of ``dataset`` in index order (``None`` when it does not expose them)."""
    if isinstance(dataset, Subset):
        base = _labels(dataset.dataset)
        return None if base is None else base[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    return None if targets is None else torch.as_tensor(targets, dtype=torch.int64)


def _dataset_record(info: DatasetInfo, train_ds: Dataset, val_ds: Dataset) -> Dict[str, Any]:
    """What a run was trained and validated on: the data set, its classes, the image counts
    and a fingerprint of each split's labels in index order (after any fixed subset)."""
    record: Dict[str, Any] = {"name": info.name, "root": info.root,
                              "num_classes": info.num_classes, "in_chans": info.in_chans,
                              "image_size": info.image_size, "classes": list(info.classes),
                              "train_images": len(train_ds), "val_images": len(val_ds)}
    for split, ds in (("train", train_ds), ("val", val_ds)):
        labels = _labels(ds)
        record[f"{split}_labels_sha256"] = None if labels is None else \
            hashlib.sha256(labels.numpy().tobytes()).hexdigest()
    return record


# What must not change when a run is resumed (``root`` may: a moved copy of the same data).
_DATASET_KEYS = ("name", "num_classes", "in_chans", "image_size", "classes", "train_images",
                 "val_images", "train_labels_sha256", "val_labels_sha256")


def _check_same_data(saved: Optional[Mapping[str, Any]], now: Mapping[str, Any],
                     where: str) -> None:
    """Refuse to resume on data other than the run's (another --data-dir copy with other
    images, classes or order would silently change the data order and the val set)."""
    if not saved:
        return
    diffs = [f"{k}: run {_short(saved[k])} vs now {_short(now[k])}" for k in _DATASET_KEYS
             if k in saved and saved[k] is not None and now.get(k) is not None
             and saved[k] != now[k]]
    if diffs:
        raise CheckpointError(
            f"{where}: the data set at {now['root']} is not the one this run was trained on "
            f"({saved.get('root')}): " + "; ".join(diffs) + " (resume with --data-dir "
            f"pointing to the run's data)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _autocast(config: TrainConfig, device: torch.device):
    if config.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _workers(config: TrainConfig) -> int:
    if config.workers is not None:
        return config.workers
    return 0 if config.data in ("fashion-mnist", "cifar10") else 8


def _lr_factor(config: TrainConfig, epoch: int) -> float:
    """The learning rate of (0-based) ``epoch`` over ``config.lr``, in closed form.

    A function of the epoch number and ``config.epochs`` only, so a resumed run - also
    one extended to more epochs - follows the schedule of its (new) total epochs.
    """
    if config.schedule == "step":
        return config.lr_gamma ** (epoch // config.lr_step)
    if config.schedule == "cosine":  # to 0 over config.epochs
        return (1.0 + math.cos(math.pi * epoch / config.epochs)) / 2.0
    return 1.0


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, start_epoch: int = 0):
    """The per-epoch schedule, its next ``step`` at the end of epoch ``start_epoch``; sets the
    optimizer's learning rate to that of ``start_epoch`` (a resumed run's saved scheduler
    state is not needed: the rate is computed from the epoch number)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: _lr_factor(config, epoch), last_epoch=start_epoch - 1)


# --------------------------------------------------------------------------- loops

def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                 config: TrainConfig, ctx: DistContext, epoch: int) -> Dict[str, float]:
    model.train()
    total = len(loader) if config.limit_train_batches is None else \
        min(len(loader), config.limit_train_batches)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    seen = 0
    start = time.perf_counter()
    bar = _progress(loader, total, f"epoch {epoch + 1}/{config.epochs}", ctx.is_main,
                    leave=False)
    # (zip takes the step first: no batch beyond the limit is asked for; loader workers
    # may still have prefetched some)
    for step, (x, y) in zip(range(total), bar):
        x, y = _to_device(x, y, ctx.device, config.channels_last)
        with _autocast(config, ctx.device):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        if not ctx.all_true(bool(torch.isfinite(loss))):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, batch {step + 1}; "
                f"the run stopped (lower --lr?); the last good checkpoint is kept")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * y.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.shape[0]
        if hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    elapsed = time.perf_counter() - start
    loss_total, correct_total, seen_total = ctx.all_sum([loss_sum.item(), correct.item(), seen])
    return {"train_loss": loss_total / max(seen_total, 1),
            "train_top1": 100.0 * correct_total / max(seen_total, 1),
            "train_images_per_s": seen_total / elapsed if elapsed > 0 else 0.0}


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, *, device: torch.device,
                   num_classes: int, ctx: Optional[DistContext] = None,
                   limit_batches: Optional[int] = None, channels_last: bool = False,
                   amp: Optional[str] = None, desc: str = "eval") -> Dict[str, Any]:
    """Loss, top-1 and (10+ classes) top-5 accuracy in %, images and images/s of ``model``.

    Metrics are summed over ranks when ``ctx`` is distributed; ``images_per_s`` is the
    forward-pass throughput (data loading excluded).
    """
    ctx = ctx or DistContext(device=device)
    cfg_amp = TrainConfig(amp=amp)
    was_training = model.training
    model.eval()
    total = len(loader) if limit_batches is None else min(len(loader), limit_batches)
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, images
    forward_time = 0.0
    for step, (x, y) in zip(range(total), _progress(loader, total, desc, ctx.is_main,
                                                     leave=False)):
        x, y = _to_device(x, y, device, channels_last)
        start = time.perf_counter()
        with _autocast(cfg_amp, device):
            logits = model(x).float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        forward_time += time.perf_counter() - start
        top1, top5 = topk_correct(logits, y, (1, 5))
        loss = F.cross_entropy(logits, y, reduction="sum").item()
        sums += torch.tensor([loss, top1, top5, y.shape[0]], dtype=torch.float64)
    model.train(was_training)
    loss, top1, top5, images = ctx.all_sum(sums.tolist())
    forward_time = ctx.all_sum([forward_time])[0] / ctx.world_size
    n = max(images, 1)
    return {"loss": loss / n, "top1": 100.0 * top1 / n,
            "top5": 100.0 * top5 / n if num_classes >= 10 else None,
            "images": int(images),
            "images_per_s": images / forward_time if forward_time > 0 else 0.0}


# --------------------------------------------------------------------------- run directory

def _foreign_entries(run_dir: Path) -> Optional[List[str]]:
    """What in the existing directory ``run_dir`` hetconv did not write (``None`` when it
    has no ``config.json``: not a run directory); half-written ``.*.tmp`` files are ours."""
    def ours(name: str) -> bool:
        return name.startswith(".") and name.endswith(".tmp")  # a half-written file

    entries = sorted(p.name for p in run_dir.iterdir())
    if entries and "config.json" not in entries:
        return None
    foreign = [e for e in entries if e not in RUN_FILES and not ours(e)]
    ckpts = run_dir / "checkpoints"
    if ckpts.is_symlink() or (ckpts.exists() and not ckpts.is_dir()):
        foreign.append("checkpoints (not a directory)")
    elif ckpts.is_dir():  # the checkpoints are replaced too: only ours
        foreign += [f"checkpoints/{p.name}" for p in sorted(ckpts.iterdir())
                    if p.name not in CHECKPOINT_FILES and not ours(p.name)]
    return foreign


def _clear_run_dir(run_dir: Path) -> None:
    """Delete a run directory's files, ``config.json`` last: interrupted half way, what is
    left is still a run directory, which the next ``--force`` replaces (deleted first, the
    rest would be refused as "not a hetconv run directory")."""
    entries = sorted(run_dir.iterdir(), key=lambda e: e.name == "config.json")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _prepare_run_dir(run_dir: Path, force: bool) -> Optional[str]:
    """Create ``run_dir``; refuse (returns the message) to reuse a non-empty one without force,
    and, with force, to replace anything but an empty directory or a run directory."""
    for parent in run_dir.parents:  # --out, or one of its parents, is a file
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                return (f"cannot create run directory {run_dir}: {parent} exists and is not "
                        f"a directory (check --out)")
            break
    if run_dir.exists() and not run_dir.is_dir():
        return f"{run_dir} exists and is not a directory"
    if force and run_dir.is_symlink():
        return (f"{run_dir} is a symbolic link; --force does not replace it: remove the link "
                f"or choose another --name/--out")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not force:
            return (f"run directory {run_dir} already exists; pass --force (force=True) to "
                    f"overwrite it, --resume {run_dir} to continue it, or choose another "
                    f"--name/--out")
        foreign = _foreign_entries(run_dir)
        if foreign is None or foreign:
            what = ("has no config.json" if foreign is None else
                    "holds files hetconv did not write: " + ", ".join(foreign[:5])
                    + (", ..." if len(foreign) > 5 else ""))
            return (f"{run_dir} is not a hetconv run directory ({what}); --force only "
                    f"replaces run directories: move its files away or choose another "
                    f"--name/--out")
        log.warning("overwriting run directory %s (--force)", run_dir)
        _clear_run_dir(run_dir)
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create run directory {run_dir}: {exc.strerror or exc}"
    return None


def _check_resumable(config: TrainConfig, ckpt: Mapping[str, Any]) -> None:
    saved = saved_config(ckpt["config"])
    current = config.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current[k]!r}" for k in current
             if k not in RESUME_MUTABLE and saved.get(k) != current[k]]
    if diffs:
        raise CheckpointError(f"{ckpt.get('path')}: does not match this run's config ("
                              + "; ".join(diffs) + ")")
    if ckpt["epoch"] > config.epochs:
        raise ValueError(f"epochs ({config.epochs}) is smaller than the {ckpt['epoch']} "
                         f"epochs the checkpoint has already done")


def _file_logging(run_dir: Path, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def attach():
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("hetconv")
        root.addHandler(handler)
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)
        try:
            yield
        finally:
            root.removeHandler(handler)
            handler.close()

    return attach()


def _profile(model: nn.Module, info: DatasetInfo) -> Dict[str, float]:
    from ..complexity import profile

    p = profile(model, info.input_size)
    return {"macs": float(p.macs), "params": int(p.params)}


# --------------------------------------------------------------------------- fit

def fit(config: Union[TrainConfig, Mapping[str, Any]], *, resume: Union[str, Path, None] = None,
        force: bool = False, model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Train ``config`` and return the run's summary (also written to ``summary.json``).

    Args:
        config: a :class:`TrainConfig` or a dict of its fields.
        resume: a run directory to continue from its last complete checkpoint; ``config``
            must match the saved one except for :data:`RESUME_MUTABLE` fields (typically
            pass ``load_config(run_dir)``).
        force: replace an existing, non-empty run directory (only a run directory: one
            with ``config.json`` and nothing but the files hetconv writes).
        model: use this module instead of ``create_model(config.model, ...)`` (it must be
            freshly initialised; the config still names the run).

    Under ``torchrun`` every process calls ``fit``; rank 0 writes the files.
    Raises :class:`RunDirExistsError`, :class:`NonFiniteLossError`,
    :class:`~hetconv.train.checkpoint.CheckpointError`, data set errors.
    """
    if isinstance(config, Mapping):
        config = TrainConfig.from_dict(config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or a dict, got {type(config).__name__}")
    config.validate()
    ctx = setup_distributed(config.device)
    try:
        return _fit(config, ctx, resume, force, model)
    finally:
        ctx.close()


def _absorbed(net: nn.Module, info, ctx: DistContext) -> nn.Module:
    """``net`` run through :func:`hetconv.absorb_permutations` on its own parameters.

    The state_dict, optimizer and checkpoints stay ``net``'s; only the forward
    runs shifted HetConv layers as blocked ones on class-sorted activations.
    The example input for shape propagation is zeros (no random draw: resumed
    runs must see the same random streams).
    """
    from ..permute import absorb_permutations, has_shifted_layers

    if not has_shifted_layers(net):  # nothing to absorb: no trace, no graph module
        if ctx.is_main:
            log.info("absorb_permutations: no shifted HetConv layer, model kept as it is")
        return net
    example = torch.zeros(1, info.in_chans, info.image_size, info.image_size, device=ctx.device)
    try:
        gm = absorb_permutations(net, example, share_parameters=True)
    except TypeError as exc:
        log.warning("absorb_permutations: model kept as it is (%s)", exc)
        return net
    if ctx.is_main:
        log.info("absorbed the channel permutations of %d shifted HetConv layer(s); %d gather(s) "
                 "left", gm.hetconv_permutations["rewritten_layers"],
                 gm.hetconv_permutations["gathers"])
    return gm


def _fit(config: TrainConfig, ctx: DistContext, resume, force: bool,
         model: Optional[nn.Module]) -> Dict[str, Any]:
    if config.batch_size % ctx.world_size:
        raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the number of "
                         f"processes ({ctx.world_size})")
    _seed_everything(config.seed)
    train_ds, val_ds, info = build_datasets(config.data, config.data_dir, augment=config.augment,
                                            image_size=config.image_size)
    train_ds = _fixed_subset(train_ds, config.train_subset, config.subset_seed)
    val_ds = val_subset(val_ds, config)
    dataset = _dataset_record(info, train_ds, val_ds)
    net = model if model is not None else build_model(config, info)
    identity = model_identity(config) if model is None else {"arch": config.model,
                                                             "conv": "custom"}
    torch.manual_seed(config.seed + ctx.rank)  # per-rank dropout streams
    net.to(ctx.device)
    if config.channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)

    # Run directory and starting point.
    history: List[Dict[str, Any]] = []
    best: Optional[Dict[str, Any]] = None
    start_epoch = 0
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise CheckpointError(f"{run_dir}: no complete checkpoint to resume from (the run "
                                  f"stopped during its first epoch, or this is not a run "
                                  f"directory); start it again with --force")
        ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        _check_resumable(config, ckpt)
        _check_same_data(ckpt.get("dataset") or _saved_dataset(run_dir), dataset,
                         ckpt["path"])
        load_model_state(net, ckpt, f"{config.model} {config.model_kwargs}")
        optimizer.load_state_dict(ckpt["optimizer"])
        rng = ckpt["rng"]
        if len(rng) != ctx.world_size:
            log.warning("checkpoint written by %d process(es), resuming with %d: the data "
                        "order and augmentation are kept, dropout streams are not", len(rng),
                        ctx.world_size)
        restore_rng_state(rng[ctx.rank % len(rng)])
        history, best, start_epoch = list(ckpt["history"]), ckpt["best"], ckpt["epoch"]
        if ctx.is_main:
            for stale in run_dir.glob("**/.*.tmp"):  # half-written files of a killed run
                stale.unlink()
            _repair_best(run_dir, ckpt)
            write_metrics(run_dir, history)  # drop records newer than the checkpoint
            _update_config_file(run_dir, config)  # e.g. a longer --epochs
    else:
        run_dir = Path(config.out) / config.run_name
        error = _prepare_run_dir(run_dir, force) if ctx.is_main else None
        error = ctx.broadcast(error)
        if error:
            raise RunDirExistsError(error)
        if ctx.is_main:
            atomic_write_json(run_dir / "config.json", {
                "config": config.to_dict(), "model": identity,
                "dataset": dataset,
                "world_size": ctx.world_size, "torch": torch.__version__,
                "hetconv": _version()})
    scheduler = _make_scheduler(optimizer, config, start_epoch)

    per_rank = config.batch_size // ctx.world_size
    # With augmentation every image's random draws come from (seed, epoch, index): the
    # same with any number of loader workers or processes (--workers may change on resume).
    train_sampler = TrainSampler(len(train_ds), config.seed, ctx.rank, ctx.world_size,
                                 item_seeds=config.augment)
    loader_gen = torch.Generator()
    workers = _workers(config)
    pin = ctx.device.type == "cuda"
    train_loader = DataLoader(SeededItems(train_ds) if config.augment else train_ds,
                              batch_size=per_rank, sampler=train_sampler,
                              num_workers=workers, generator=loader_gen, pin_memory=pin,
                              drop_last=len(train_sampler) >= per_rank)
    val_loader = DataLoader(val_ds, batch_size=val_batch_size(config, ctx.world_size),
                            sampler=EvalShardSampler(len(val_ds), ctx.rank, ctx.world_size),
                            num_workers=workers, pin_memory=pin,
                            generator=torch.Generator().manual_seed(config.seed))
    if len(train_loader) == 0:
        raise ValueError(f"no training batch: {len(train_ds)} images for batch size "
                         f"{config.batch_size}")

    wrapped: nn.Module = net
    if config.absorb_permutations:
        wrapped = _absorbed(net, info, ctx)
    # Validation under torchrun runs the module without DDP, on rank 0's BatchNorm
    # statistics (broadcast first): DDP's own buffer sync at the first forward after
    # training is a collective, which hung every rank when one had no validation image.
    validated = wrapped
    if ctx.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    if config.compile:
        wrapped = torch.compile(wrapped)
        validated = wrapped if not ctx.distributed else validated

    ckpt_dir = run_dir / "checkpoints"
    with _file_logging(run_dir, ctx.is_main):
        if ctx.is_main:
            log.info("%s %s: %s on %s (%d train / %d val images), %d process(es), run dir %s",
                     "resuming" if resume else "training", config.run_name, config.model,
                     info.name, len(train_ds), len(val_ds), ctx.world_size, run_dir)
        epochs = _progress(range(start_epoch, config.epochs), config.epochs - start_epoch,
                           "epochs", ctx.is_main)
        try:
            for epoch in epochs:
                start = time.perf_counter()
                train_sampler.set_epoch(epoch)
                loader_gen.manual_seed(config.seed * 100_003 + epoch * 1_009 + ctx.rank)
                lr = optimizer.param_groups[0]["lr"]
                train = _train_epoch(wrapped, train_loader, optimizer, config, ctx, epoch)
                ctx.broadcast_buffers(net)
                val = evaluate_model(validated, val_loader, device=ctx.device,
                                     num_classes=info.num_classes, ctx=ctx,
                                     limit_batches=config.limit_val_batches,
                                     channels_last=config.channels_last, amp=config.amp,
                                     desc="validate")
                scheduler.step()
                record = {"epoch": epoch + 1, "lr": lr, **train,
                          "val_loss": val["loss"], "val_top1": val["top1"],
                          "val_top5": val["top5"], "val_images": val["images"],
                          "val_images_per_s": val["images_per_s"],
                          "time_s": time.perf_counter() - start}
                history.append(record)
                improved = best is None or record["val_top1"] > best["val_top1"]
                if improved:
                    best = {"epoch": epoch + 1, "val_top1": record["val_top1"],
                            "val_top5": record["val_top5"], "val_loss": record["val_loss"]}
                rng_states = ctx.all_gather(capture_rng_state())
                if ctx.is_main:
                    _save_epoch(ckpt_dir, net, optimizer, scheduler, config, identity, epoch + 1,
                                rng_states, history, best, improved, ctx.world_size, dataset)
                    write_metrics(run_dir, history)
                    log.info("epoch %d/%d: train loss %.4f top-1 %.2f%% | val loss %.4f "
                             "top-1 %.2f%% | lr %.4g | %.1fs", epoch + 1, config.epochs,
                             record["train_loss"], record["train_top1"], record["val_loss"],
                             record["val_top1"], lr, record["time_s"])
        except NonFiniteLossError as exc:
            if ctx.is_main:
                log.error("%s", exc)
                atomic_write_json(run_dir / "summary.json", {
                    "status": "diverged", "error": str(exc), "run_dir": str(run_dir),
                    "epochs_completed": len(history), "config": config.to_dict()})
            raise
        summary = _summary(config, identity, info, net, run_dir, history, best, ctx)
        if ctx.is_main:
            atomic_write_json(run_dir / "summary.json", summary)
            log.info("done: val top-1 %.2f%% (best %.2f%% at epoch %d), %s MACs, %s params; %s",
                     summary["val_top1"], best["val_top1"], best["epoch"],
                     _fmt(summary["macs"]), _fmt(summary["params"]), run_dir)
    return summary


def _version() -> str:
    from .. import __version__  # imported late: hetconv/__init__ imports this package

    return __version__


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _save_epoch(ckpt_dir: Path, net: nn.Module, optimizer, scheduler, config: TrainConfig,
                identity: Dict[str, Any], epoch: int, rng_states: List[Dict[str, Any]],
                history: List[Dict[str, Any]], best: Dict[str, Any], improved: bool,
                world_size: int, dataset: Dict[str, Any]) -> None:
    """``last.pt`` first, then (if the epoch improved) ``best.pt``; both atomic."""
    state = net.state_dict()
    model_state = collections.OrderedDict((k, v.detach().cpu()) for k, v in state.items())
    # the metadata too: it records each HetConv2d's pattern, checked when loaded
    model_state._metadata = getattr(state, "_metadata", None)
    # (world_size in best.pt too: evaluate needs it for a --limit-val-batches run's images)
    common = {"model": model_state, "config": config.to_dict(), "identity": identity,
              "epoch": epoch, "dataset": dataset, "world_size": world_size}
    save_checkpoint(ckpt_dir / "last.pt", {
        **common, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": rng_states, "history": history, "best": best})
    if improved:
        save_checkpoint(ckpt_dir / "best.pt", {**common, "metrics": history[-1]})


def saved_run_record(run_dir: Path, key: str) -> Any:
    """``key`` of ``run_dir/config.json`` (None where the file or the key is missing or
    unreadable): what checkpoints older than a record lack."""
    try:
        return json.loads((run_dir / "config.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _saved_dataset(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The ``dataset`` record of ``run_dir/config.json`` (checkpoints older than the record)."""
    saved = saved_run_record(run_dir, "dataset")
    return saved if isinstance(saved, dict) else None


def _update_config_file(run_dir: Path, config: TrainConfig) -> None:
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    if saved.get("config") != config.to_dict():
        atomic_write_json(path, {**saved, "config": config.to_dict()})


def _repair_best(run_dir: Path, last: Mapping[str, Any]) -> None:
    """A kill between writing ``last.pt`` and ``best.pt`` leaves a stale ``best.pt``: the
    best epoch is then the last one, whose weights ``last.pt`` holds."""
    best = last.get("best")
    path = run_dir / "checkpoints" / "best.pt"
    try:
        current = load_checkpoint(path)["epoch"] if path.exists() else None
    except CheckpointError:
        current = None
    if best and current != best["epoch"] and best["epoch"] == last["epoch"]:
        log.warning("best.pt is older than last.pt (interrupted write); rewriting it")
        save_checkpoint(path, {k: last[k] for k in ("model", "config", "identity", "epoch",
                                                    "dataset", "world_size") if k in last}
                        | {"metrics": last["history"][-1]})


def _summary(config: TrainConfig, identity: Dict[str, Any], info: DatasetInfo, net: nn.Module,
             run_dir: Path, history: List[Dict[str, Any]], best: Optional[Dict[str, Any]],
             ctx: DistContext) -> Dict[str, Any]:
    final = history[-1]
    cost = _profile(net, info)
    return {"status": "completed", "run_dir": str(run_dir), "model": config.model,
            "identity": identity, "data": info.name, "num_classes": info.num_classes,
            "epochs": len(history), "val_top1": final["val_top1"], "val_top5": final["val_top5"],
            "val_loss": final["val_loss"], "best": best, "macs": cost["macs"],
            "params": cost["params"], "images_per_s": final["val_images_per_s"],
            "world_size": ctx.world_size,
            "train_time_s": sum(r["time_s"] for r in history),
            "config": config.to_dict()}
