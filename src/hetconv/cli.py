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


_COMMANDS: List[Callable] = [_add_demo]


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
