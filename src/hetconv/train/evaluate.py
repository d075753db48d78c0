"""Evaluate a trained checkpoint; compare finished runs (table + accuracy-vs-MACs plot)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Subset

from ..data import build_datasets
from ..deploy import optimize_for_inference, plan_summary
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, load_model_state
from .config import TrainConfig
from .engine import (_fmt, _profile, build_model, evaluate_model, model_identity,
                     saved_run_record, val_images_limit, val_subset)

__all__ = ["compare", "evaluate", "format_compare", "load_summary", "plot_compare",
           "plot_format"]

PathLike = Union[str, Path]
log = logging.getLogger("hetconv.train")


def _resolve_checkpoint(path: Path, which: str) -> Path:
    if path.is_dir():
        if which not in ("last", "best"):
            raise ValueError(f"checkpoint must be 'last' or 'best', got {which!r}")
        candidate = path / "checkpoints" / f"{which}.pt"
        if not candidate.is_file():
            raise CheckpointError(f"{path}: no checkpoints/{which}.pt (is this a run directory?)")
        return candidate
    return path


def _device(device: str) -> torch.device:
    """``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``) checked, like ``train``'s."""
    allowed = "'auto', 'cpu', 'cuda' or 'cuda:N'"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be {allowed}, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but there are "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def evaluate(path: PathLike, *, data: Optional[str] = None, data_dir: Optional[str] = None,
             checkpoint: str = "last", batch_size: int = 256, workers: int = 0,
             limit_batches: Optional[int] = None, device: str = "cpu",
             full_split: bool = False, optimize: bool = False) -> Dict[str, Any]:
    """Evaluate a run directory's ``last``/``best`` checkpoint, or a checkpoint file.

    The model is rebuilt from the config stored in the checkpoint and evaluated on the
    validation split of its data set (or ``data``/``data_dir``, which must have the same
    classes and channels): a run trained with ``val_subset`` on the same fixed subset its
    recorded accuracy is from, unless ``full_split`` (``images`` says how many;
    ``val_subset`` in the result which subset, ``None`` for the whole split); a run trained
    with ``limit_val_batches`` on the images those batches held (``val_limit``: how many;
    ``None`` when ``full_split``, ``limit_batches``, another data set, or when the batches
    held the whole split).  Returns ``top1``, ``top5`` (10+ classes, else ``None``),
    ``loss``, ``macs``, ``params``, ``images_per_s`` (forward passes at ``batch_size``),
    ``images``, ``epoch``, ``model``, ``checkpoint`` and ``device``.  ``device``: ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available).

    ``optimize``: evaluate the model :func:`hetconv.optimize_for_inference` makes of it
    (BatchNorm folded, each layer's backend and the memory format measured on the first
    batch, its outputs checked against the model's there): what a deployed model scores
    and how fast it runs.  CPU only, in float32 (a run trained with ``amp`` is evaluated
    without autocast); ``optimized`` in the result is its plan in short
    (:func:`hetconv.deploy.plan_summary`), ``None`` without ``optimize``.  MACs and
    params are the trained model's either way.
    """
    if not isinstance(optimize, bool):
        raise TypeError(f"optimize must be a bool, got {optimize!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if limit_batches is not None and (not isinstance(limit_batches, int)
                                      or isinstance(limit_batches, bool) or limit_batches < 1):
        raise ValueError(f"limit_batches must be an int >= 1 or None, got {limit_batches!r}")
    dev = _device(device)
    if optimize and dev.type != "cpu":
        raise ValueError(f"optimize runs on the CPU (the kernels it picks are CPU kernels): "
                         f"pass device='cpu', got device={device!r}")
    ckpt_path = _resolve_checkpoint(Path(path), checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    try:
        config = TrainConfig.from_saved(ckpt["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt_path}: invalid config in checkpoint ({exc})") from exc
    name = data or config.data
    # An explicit other data set is looked up afresh, not in the training data_dir.
    where = data_dir if (data_dir is not None or data is not None) else config.data_dir
    # image_size is imagefolder's (runs from before that was checked may hold another).
    size = config.image_size if name == "imagefolder" else None
    _, val_ds, info = build_datasets(name, where, augment=False, image_size=size)
    _check_data(ckpt_path, ckpt.get("dataset"), info)
    subset = None if full_split or name != config.data else config.val_subset
    if subset is not None and subset < len(val_ds):  # what training validated on
        val_ds = val_subset(val_ds, config)
    else:
        subset = None
    # a run validated with --limit-val-batches: the images it validated on (unless the
    # caller limits the batches itself)
    limited = None if full_split or name != config.data or limit_batches is not None else \
        val_images_limit(config, _world_size(ckpt, ckpt_path))
    if limited is not None and limited < len(val_ds):
        val_ds = Subset(val_ds, range(limited))
    else:
        limited = None
    model = build_model(config, info)
    load_model_state(model, ckpt, f"{config.model} {config.model_kwargs}")
    model.to(dev)
    loader = DataLoader(val_ds, batch_size=batch_size, num_workers=workers,
                        pin_memory=dev.type == "cuda")
    runs, plan = model, None
    if optimize:
        runs = _optimized(model, loader)
        plan = plan_summary(runs.hetconv_plan)
    metrics = evaluate_model(runs, loader, device=dev, num_classes=info.num_classes,
                             limit_batches=limit_batches, channels_last=config.channels_last,
                             amp=None if optimize else config.amp)
    return {"model": config.model, "identity": model_identity(config), "data": info.name,
            "checkpoint": str(ckpt_path), "epoch": int(ckpt["epoch"]), "device": str(dev),
            "val_subset": subset, "val_limit": limited, "optimized": plan,
            **metrics, **_profile(model, info)}


def _optimized(model: torch.nn.Module, loader: DataLoader) -> torch.nn.Module:
    """``optimize_for_inference(model)`` measured and checked on the loader's first batch."""
    try:
        example, _ = next(iter(loader))
    except StopIteration:
        raise ValueError("no image to optimize the model on: the validation set is empty") \
            from None
    log.info("optimizing the model for inference on a batch of %d images (each layer's "
             "backends timed: can take a minute)", example.shape[0])
    return optimize_for_inference(model, example.float())


def _world_size(ckpt: Dict[str, Any], ckpt_path: Path) -> int:
    """The number of processes the checkpoint's run validated with: the checkpoint's record,
    else (a best.pt from before it had one) its run directory's ``config.json``, else 1."""
    world = ckpt.get("world_size")
    if world is None and ckpt_path.parent.name == "checkpoints":
        world = saved_run_record(ckpt_path.parent.parent, "world_size")
    return world if isinstance(world, int) and world >= 1 else 1


def _check_data(ckpt_path: Path, saved: Optional[Dict[str, Any]], info) -> None:
    """The data set evaluated on has the classes and channels the model was trained on
    (checkpoints that record them): a clear error rather than a state-dict shape mismatch,
    a warning when the class names differ (the labels may mean other classes)."""
    if not isinstance(saved, dict):
        return
    want = (saved.get("num_classes"), saved.get("in_chans"))
    if None not in want and want != (info.num_classes, info.in_chans):
        raise ValueError(f"{ckpt_path}: the model was trained on {saved.get('name')} "
                         f"({want[0]} classes, {want[1]} channel(s)); {info.name} at "
                         f"{info.root} has {info.num_classes} classes, {info.in_chans} "
                         f"channel(s)")
    classes = saved.get("classes")
    if classes and info.classes and list(classes) != list(info.classes):
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(classes, info.classes))
                if a != b]
        log.warning("%s: class names differ from the training data's (label %s); the "
                    "accuracy assumes label i means the same class in both", ckpt_path,
                    ", ".join(diff[:3]))


def load_summary(run_dir: PathLike) -> Dict[str, Any]:
    """A finished run's ``summary.json`` (clear errors when missing, unfinished or corrupt)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no summary.json (not a run directory, or the run "
                                f"has not finished; `hetconv train --resume {run_dir}`)")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt JSON ({exc})") from None
    if summary.get("status") != "completed":
        raise ValueError(f"{run_dir}: the run did not complete (status "
                         f"{summary.get('status')!r}: {summary.get('error', '')})")
    return summary


def _is_dense(summary: Dict[str, Any]) -> bool:
    ident = summary.get("identity", {})
    return ident.get("part") == 1 and ident.get("conv") == "hetconv"


def _dense_counterpart(summary: Dict[str, Any]) -> tuple:
    """What a run's dense reference must share with it: data set, architecture, width
    multiplier and squeeze-excitation (the builders' defaults 1.0 and False when unset);
    the HetConv options (part, conv, groups, pattern, ...) are what the reduction measures."""
    ident = summary.get("identity", {})
    return (summary.get("data"), ident.get("arch"), float(ident.get("width", 1.0)),
            bool(ident.get("se", False)))


def compare(run_dirs: Sequence[PathLike]) -> List[Dict[str, Any]]:
    """One row per run: accuracy, MACs, params, reduction vs the dense run, throughput.

    The dense reference of a run is the first run with ``part`` 1 (plain convolutions)
    of the same data set, architecture, width and squeeze-excitation (a dense run of
    another width or architecture has other MACs and params: no reduction against it);
    without one the reductions are ``None``.  ``reference`` names the reference run.
    """
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    summaries = [(str(d), load_summary(d)) for d in run_dirs]
    rows = []
    for run_dir, s in summaries:
        key = _dense_counterpart(s)
        ref_dir, ref = next(((d, r) for d, r in summaries
                             if _is_dense(r) and _dense_counterpart(r) == key), (None, None))
        rows.append({
            "run": Path(run_dir).name, "run_dir": run_dir, "model": s["model"],
            "part": s["identity"].get("part"), "data": s["data"], "top1": s["val_top1"],
            "top5": s["val_top5"], "macs": s["macs"], "params": s["params"],
            "macs_reduction": None if ref is None else 100.0 * (1 - s["macs"] / ref["macs"]),
            "params_reduction": None if ref is None else 100.0 * (1 - s["params"] / ref["params"]),
            "reference": None if ref_dir is None else Path(ref_dir).name,
            "images_per_s": s["images_per_s"], "epochs": s["epochs"]})
    return rows


def format_compare(rows: Sequence[Dict[str, Any]]) -> str:
    """The rows of :func:`compare` as an aligned text table."""
    def pct(v):
        return "-" if v is None else f"{v:.1f}%"

    header = ("run", "model", "P", "top-1", "top-5", "MACs", "params", "MACs red.",
              "params red.", "images/s")
    lines = [header] + [(r["run"], r["model"], str(r["part"]), f"{r['top1']:.2f}",
                         "-" if r["top5"] is None else f"{r['top5']:.2f}", _fmt(r["macs"]),
                         _fmt(r["params"]), pct(r["macs_reduction"]),
                         pct(r["params_reduction"]), f"{r['images_per_s']:.0f}")
                        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return ("\n".join(out) + "\nreductions are relative to the dense (P=1) run of the same "
            "data, architecture, width and SE (\"-\": none among these runs)")


def plot_format(path: PathLike) -> str:
    """The image format ``path``'s extension names (``"png"`` without one); a ``ValueError``
    listing the formats when matplotlib cannot write it (or is not installed)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ValueError(f"{path}: writing a plot needs matplotlib (pip install "
                         f"matplotlib)") from None

    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    formats = sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"})  # pgf: LaTeX
    if suffix not in formats:
        raise ValueError(f"{path}: cannot write a plot in format '.{suffix}' (the extension "
                         f"names the format: {', '.join('.' + f for f in formats)})")
    return suffix


def plot_compare(rows: Sequence[Dict[str, Any]], path: PathLike) -> Path:
    """Accuracy (top-1) against MACs, one labelled point per run, saved in the format of
    ``path``'s extension (:func:`plot_format`: PNG, PDF, SVG, ...; PNG without one)."""
    fmt = plot_format(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        ax.scatter(r["macs"] / 1e6, r["top1"], s=36, zorder=3)
        ax.annotate(f"{r['model']} (P={r['part']})", (r["macs"] / 1e6, r["top1"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel("validation top-1 accuracy (%)")
    ax.set_title("Accuracy vs cost")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.2, y=0.15)  # room for the labels
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=120)
    plt.close(fig)
    path = Path(path)
    atomic_write(path, buffer.getvalue())
    return path
