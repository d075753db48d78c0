"""What ``hetconv train|evaluate|compare`` do with their parsed arguments.

The argument declarations live in :mod:`hetconv.cli`; these functions turn the
namespace into calls of :func:`fit`, :func:`evaluate` and :func:`compare` and print
the results.  Expected failures (bad options, missing data, existing run directory,
bad checkpoint, diverged loss) print one clear line and return exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict

from ..data import DatasetFormatError, DatasetNotFoundError
from .checkpoint import CheckpointError, atomic_write_json
from .config import load_config, resolve_config
from .engine import RESUME_MUTABLE, NonFiniteLossError, RunDirExistsError, _fmt, fit
from .evaluate import compare, evaluate, format_compare, plot_compare

__all__ = ["parse_model_arg", "run_compare", "run_evaluate", "run_train"]

_EXPECTED = (ValueError, TypeError, FileNotFoundError, FileExistsError, CheckpointError,
             DatasetNotFoundError, DatasetFormatError, NonFiniteLossError, RunDirExistsError)
# CLI option dest -> TrainConfig field, for the options that map one to one.
_FIELDS = ("model", "data", "data_dir", "preset", "epochs", "batch_size", "eval_batch_size", "lr",
           "momentum", "weight_decay", "schedule", "lr_step", "lr_gamma", "label_smoothing",
           "seed", "out", "name", "workers", "device", "channels_last", "compile",
           "absorb_permutations", "amp",
           "augment", "image_size", "train_subset", "val_subset", "limit_train_batches",
           "limit_val_batches")


def parse_model_arg(text: str):
    """``--model-arg KEY=VALUE``; VALUE is read as JSON when it parses (``4``, ``true``,
    ``0.5``), else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"model-arg must look like KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key, parsed


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    values = {f: getattr(args, f) for f in _FIELDS if getattr(args, f, None) is not None}
    kwargs = dict(args.model_arg or [])
    for key in ("part", "width", "se"):
        if getattr(args, key, None) is not None:
            kwargs[key] = getattr(args, key)
    if kwargs:
        values["model_kwargs"] = kwargs
    return values


def _fail(exc: BaseException) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def run_train(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    try:
        if args.resume:
            fixed = sorted(k for k in overrides if k not in RESUME_MUTABLE)
            if fixed:
                raise ValueError(f"--resume continues the saved config; these options cannot "
                                 f"change: {', '.join('--' + k.replace('_', '-') for k in fixed)}"
                                 f" (allowed: epochs, workers, data-dir, device, "
                                 f"eval-batch-size, compile)")
            values = load_config(args.resume).to_dict()
            values.update(overrides)
            config = resolve_config(**values)
            summary = fit(config, resume=args.resume)
        else:
            preset = overrides.pop("preset", None)
            summary = fit(resolve_config(preset, **overrides), force=args.force)
    except _EXPECTED as exc:
        return _fail(exc)
    if os.environ.get("RANK", "0") == "0":  # one line per job under torchrun
        best = summary["best"]
        print(f"{summary['run_dir']}: val top-1 {summary['val_top1']:.2f}% (best "
              f"{best['val_top1']:.2f}% at epoch {best['epoch']}), {_fmt(summary['macs'])} "
              f"MACs, {_fmt(summary['params'])} params")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    try:
        result = evaluate(args.path, data=args.data, data_dir=args.data_dir,
                          checkpoint=args.checkpoint, batch_size=args.batch_size,
                          workers=args.workers, limit_batches=args.limit_batches,
                          device=args.device)
    except _EXPECTED as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    top5 = "-" if result["top5"] is None else f"{result['top5']:.2f}%"
    print(f"{result['model']} on {result['data']} ({result['images']} images, "
          f"epoch {result['epoch']} of {result['checkpoint']})\n"
          f"  top-1     {result['top1']:.2f}%\n  top-5     {top5}\n"
          f"  loss      {result['loss']:.4f}\n  MACs      {_fmt(result['macs'])}\n"
          f"  params    {_fmt(result['params'])}\n"
          f"  images/s  {result['images_per_s']:.0f} (forward, batch {args.batch_size}, "
          f"{args.device})")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    try:
        rows = compare(args.runs)
    except _EXPECTED as exc:
        return _fail(exc)
    print(format_compare(rows))
    if args.json:
        atomic_write_json(args.json, rows)
    if args.plot:
        print(f"plot: {plot_compare(rows, args.plot)}")
    return 0
