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
from pathlib import Path
from typing import Any, Dict, List

from .._files import json_text
from ..data import DatasetFormatError, DatasetNotFoundError
from .checkpoint import CheckpointError, atomic_write_json
from .config import load_config, resolve_config
from .engine import RESUME_MUTABLE, NonFiniteLossError, RunDirExistsError, _fmt, fit
from .evaluate import compare, evaluate, format_compare, plot_compare, plot_format

__all__ = ["parse_model_arg", "run_compare", "run_evaluate", "run_train"]

_EXPECTED = (ValueError, TypeError, FileNotFoundError, FileExistsError, CheckpointError,
             DatasetNotFoundError, DatasetFormatError, NonFiniteLossError, RunDirExistsError)
# CLI option dest -> TrainConfig field, for the options that map one to one.
_FIELDS = ("model", "data", "data_dir", "preset", "epochs", "batch_size", "eval_batch_size", "lr",
           "momentum", "weight_decay", "schedule", "lr_step", "lr_gamma", "label_smoothing",
           "seed", "subset_seed", "out", "name", "workers", "device", "channels_last", "compile",
           "absorb_permutations", "amp",
           "augment", "image_size", "train_subset", "val_subset", "limit_train_batches",
           "limit_val_batches")


def parse_model_arg(text: str):
    """``--model-arg KEY=VALUE``; VALUE is read as JSON when it parses (``4``, ``true``,
    ``0.5``), Python's ``True`` / ``False`` / ``None`` as those, else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"model-arg must look like KEY=VALUE, got {text!r}")
    python = {"True": True, "False": False, "None": None}
    if value in python:  # "se=False" is no JSON, and the string "False" is truthy
        return key, python[value]
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
            if key in kwargs and kwargs[key] != getattr(args, key):
                raise ValueError(f"--{key} {getattr(args, key)} and --model-arg "
                                 f"{key}={kwargs[key]} disagree: give one of them")
            kwargs[key] = getattr(args, key)
    if kwargs:
        values["model_kwargs"] = kwargs
    return values


def _fail(exc: BaseException) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def _option(field: str) -> str:
    """The ``hetconv train`` option that sets config ``field``."""
    return "--no-augment" if field == "augment" else "--" + field.replace("_", "-")


def _fixed_options(args: argparse.Namespace, overrides: Dict[str, Any]) -> List[str]:
    """The options given that a resumed run cannot change (as typed on the command line)."""
    options = []
    for field in sorted(k for k in overrides if k not in RESUME_MUTABLE):
        if field == "model_kwargs":  # set by --part, --width, --se and --model-arg
            options += [f"--{k}" for k in ("part", "width", "se")
                        if getattr(args, k, None) is not None]
            options += ["--model-arg"] if args.model_arg else []
        else:
            options.append(_option(field))
    return options


def _check_output(path: str, option: str) -> None:
    """Refuse (``ValueError`` naming ``option``) an output file that cannot be written:
    an existing directory, or a path under something that is not a directory."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option} {path}: is a directory")
    for parent in target.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"{option} {path}: {parent} exists and is not a directory")
            break


def _write_error(option: str, path: str, exc: OSError) -> ValueError:
    return ValueError(f"{option} {path}: cannot write it ({exc.strerror or exc})")


def run_train(args: argparse.Namespace) -> int:
    try:
        overrides = _overrides(args)
    except ValueError as exc:
        return _fail(exc)
    try:
        if args.resume:
            moved = [o for o in ("out", "name") if o in overrides]
            if moved:
                raise ValueError(f"--resume continues {args.resume} in place; "
                                 f"{' and '.join('--' + o for o in moved)} cannot be given "
                                 f"with it (copy the run directory to continue it elsewhere)")
            fixed = _fixed_options(args, overrides)
            if fixed:
                raise ValueError(f"--resume continues the saved config; these options cannot "
                                 f"change: {', '.join(fixed)} (allowed: "
                                 f"{', '.join(_option(k) for k in RESUME_MUTABLE)})")
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
                          device=args.device, full_split=args.full_split,
                          optimize=args.optimize)
    except _EXPECTED as exc:
        return _fail(exc)
    if args.json:
        print(json_text(result, indent=2))
        return 0
    top5 = "-" if result["top5"] is None else f"{result['top5']:.2f}%"
    subset = "" if result["val_subset"] is None else ", the run's fixed validation subset"
    if result.get("val_limit") is not None:
        subset += ", those its --limit-val-batches validated on"
    print(f"{result['model']} on {result['data']} ({result['images']} images{subset}, "
          f"epoch {result['epoch']} of {result['checkpoint']})\n"
          f"  top-1     {result['top1']:.2f}%\n  top-5     {top5}\n"
          f"  loss      {result['loss']:.4f}\n  MACs      {_fmt(result['macs'])}\n"
          f"  params    {_fmt(result['params'])}\n"
          f"  images/s  {result['images_per_s']:.0f} (forward, batch {args.batch_size}, "
          f"{result['device']}{', optimized' if result['optimized'] else ''})")
    if result["optimized"]:
        plan = result["optimized"]
        layers = ", ".join(f"{n} on {k}" for k, n in plan["backends"].items()) or "none"
        kept = (" (the 'auto' rule's configuration, faster than the measured one)"
                if plan.get("kept") == "rule" else "")
        print(f"  optimized {plan['memory_format']}; layers: {layers}; "
              f"{plan.get('fused_native', 0)} with their ReLU/sum fused{kept}")
    return 0


DEFAULT_COMPARE_PLOT = "accuracy_vs_macs.png"


def _free_name(path: str) -> str:
    """``path``, or ``stem_2.ext``, ``stem_3.ext``, ... : the first name no file has."""
    stem, ext = os.path.splitext(path)
    n, candidate = 1, path
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{stem}_{n}{ext}"
    return candidate


def run_compare(args: argparse.Namespace) -> int:
    if args.plot is None:  # the default name: never replaces an earlier plot (or any file)
        args.plot = _free_name(DEFAULT_COMPARE_PLOT)
    try:  # the output paths are checked before the work
        if args.json:
            _check_output(args.json, "--json")
        if args.plot:
            _check_output(args.plot, "--plot")
            try:
                plot_format(args.plot)
            except ValueError as exc:
                raise ValueError(f"--plot {exc}") from None
        rows = compare(args.runs)
    except _EXPECTED as exc:
        return _fail(exc)
    print(format_compare(rows))
    try:
        if args.json:
            atomic_write_json(args.json, rows)
    except OSError as exc:  # e.g. permission denied
        return _fail(_write_error("--json", args.json, exc))
    if args.plot:
        try:
            path = plot_compare(rows, args.plot)
        except OSError as exc:
            return _fail(_write_error("--plot", args.plot, exc))
        print(f"plot: {path}")
    return 0
