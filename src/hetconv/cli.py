"""``hetconv`` command line: argument parsing only, the work lives in the package.

Each subcommand is one ``_add_<name>`` function that declares its arguments
and sets ``func`` to a handler taking the parsed namespace.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, List, Optional


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="short end-to-end showcase of the HetConv layer",
        description="Build HetConv layers, check every backend against the dense reference "
                    "and print what they cost.")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    import torch

    from . import functional as HF
    from . import pattern
    from .layers import HetConv2d

    torch.manual_seed(args.seed)
    x = torch.randn(8, 64, 32, 32)
    print(f"{'part':>5} {'params':>8} {'MACs':>12} {'theory x':>9}  max |backend - dense|")
    for part in (1, 2, 4, 8, 16, 32, "C"):
        layer = HetConv2d(64, 64, 3, part=part)
        ref = torch.nn.functional.conv2d(x, layer.dense_weight(), None, 1, 1)
        errs = []
        for backend in HF.BACKENDS:
            layer.backend = backend
            errs.append(f"{backend}={(layer(x) - ref).abs().max().item():.1e}")
        params = sum(p.numel() for p in layer.parameters())
        macs = pattern.hetconv_macs(64, 64, 3, 32, part)
        print(f"{str(part):>5} {params:>8,} {macs:>12,} {pattern.speedup(layer.part):>9.2f}  "
              + " ".join(errs))
    return 0


def _part_arg(text: str):
    """``--part``: a positive int or C."""
    if text.upper() == "C":
        return "C"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"part must be a positive int or C, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"part must be >= 1, got {value}")
    return value


def _size_arg(text: str):
    """``--input``: CxHxW, e.g. 3x32x32."""
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"input must be CxHxW with positive ints, e.g. 3x32x32, got {text!r}")
    return size


def _add_profile(sub) -> None:
    p = sub.add_parser(
        "profile", help="count a model's MACs and parameters, layer by layer",
        description="Build a registered model and count the multiply-accumulates of its conv "
                    "and linear layers (the paper's FLOPs) and its parameters, per module. "
                    "Weights are never allocated (the model is built on the meta device).")
    p.add_argument("model", help="model name: an architecture (vgg16_cifar, resnet56_cifar, "
                                 "mobilenet_cifar, vgg16, resnet34, resnet50) optionally with the "
                                 "paper's suffixes (_p4, _pc, _se, _gwc4_pwc, _dwc_pwc); "
                                 "`hetconv models` lists them")
    p.add_argument("--part", type=_part_arg, default=None,
                   help="P of the HetConv layers: a positive int or C (P = in_channels); "
                        "default: as the name says (standard convolutions without a _pN suffix)")
    p.add_argument("--input", type=_size_arg, default=None, metavar="CxHxW",
                   help="input size without batch, e.g. 1x28x28 (sets in_chans); default: the "
                        "model's own (3x32x32 for CIFAR models, 3x224x224 for ImageNet ones)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier outputs (default: the architecture's, 10 or 1000)")
    p.add_argument("--all", action="store_true",
                   help="also list modules without MACs or parameters (BN, ReLU, pooling)")
    p.add_argument("--total", action="store_true", help="print only the totals")
    p.set_defaults(func=_run_profile)


def _run_profile(args) -> int:
    from .models import profile_model

    kwargs = {} if args.part is None else {"part": args.part}
    try:
        result = profile_model(args.model, input_size=args.input, num_classes=args.num_classes,
                               **kwargs)
    except (ValueError, TypeError) as err:
        print(f"hetconv profile: error: {err}", file=sys.stderr)
        return 2
    if args.total:
        print(f"{args.model}: {result.macs:,} MACs, {result.params:,} params")
    else:
        print(result.table(all_rows=args.all))
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the registered models",
                       description="List registered model names (with the paper's variants).")
    p.add_argument("filter", nargs="?", default="*",
                   help="glob on the names, e.g. 'vgg16_cifar*' (default: all)")
    p.set_defaults(func=_run_models)


def _run_models(args) -> int:
    from .models import list_models

    for name in list_models(args.filter):
        print(name)
    return 0


def _add_paper_tables(sub) -> None:
    p = sub.add_parser(
        "paper-tables", help="recompute the paper's FLOPs / params / reduction columns",
        description="Build every model of Tables 1, 3, 4, 5, 6 and 7 of the HetConv paper, "
                    "count it, and print the paper's figure beside the computed one and the "
                    "difference (percent for FLOPs and params, points for reductions).")
    p.add_argument("--table", type=int, action="append", choices=(1, 3, 4, 5, 6, 7),
                   help="only this table (repeatable; default: all)")
    p.set_defaults(func=_run_paper_tables)


def _run_paper_tables(args) -> int:
    from . import paper

    rows = [r for r in paper.PAPER_ROWS if not args.table or r.table in args.table]
    print(paper.format_reproduction(paper.reproduce(rows, progress=True)))
    return 0


_COMMANDS: List[Callable] = [_add_demo]
_COMMANDS += [_add_profile, _add_models, _add_paper_tables]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetconv",
        description="HetConv (heterogeneous kernel-based convolution): layers, models, "
                    "training, cost accounting and benchmarks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
