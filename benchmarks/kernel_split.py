#!/usr/bin/env python
"""Each kernel of a HetConv training step alone: forward, input gradient, weight gradient.

For every layer shape of the per-layer benchmark with at least ``--min-channels`` channels
(``hetconv.bench.layer_shapes``) and every ``--parts`` P, this times, interleaved in one
process (``hetconv._timing.time_interleaved``, medians after warm-up):

* ``forward``: the channels-last kernel's forward (``hetconv.native._run_nhwc``);
* ``input_grad``: the input gradient as HetConv2d's backward computes it
  (``hetconv.native._input_grad``: the channels-last kernel on the transposed weights, in
  residue order at stride 2);
* ``weight_grad``: both weight gradients as the backward computes them
  (``hetconv.native._weight_grad``: the channels-last weight-gradient kernel);

and the same three parts of the dense convolution (``F.conv2d`` and
``torch.ops.aten.convolution_backward`` with one output each, oneDNN on this CPU), NCHW and
channels_last, and for the forward also ``hetconv.deploy.PackedConv2d`` in both layouts (the
weights packed for oneDNN once, not reordered on every call), reporting the fastest per
part: the best baseline PyTorch offers for that part.  Each HetConv kernel's result is
first checked against the dense reference (autograd through ``F.conv2d`` with the
assembled kernel); a mismatch stops the run.

Per row: both times, the speedup against the theoretical one (Eq. 5, from the counted
multiply-adds of ``hetconv.profile``), and each side's rate in counted GFLOP/s and as a
share of the machine's FMA rate (``hetconv.native.fma_rate``, measured at the start and the
end; shares against the higher reading): on a shared host the absolute times move with the
host, the shares much less.

docs/performance.md quotes it, e.g.::

    python benchmarks/kernel_split.py --suites resnet50_224 --parts 8
    python benchmarks/kernel_split.py --suites vgg16_cifar --parts 4 8 --out split.md

A training step is more than these three calls (autograd, the output-gradient's layout,
allocation); ``hetconv bench`` times whole steps against each other.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

KERNELS = ("forward", "input_grad", "weight_grad")


def _dense_parts(x: torch.Tensor, gy: torch.Tensor, wd: torch.Tensor,
                 stride: int) -> Dict[str, Callable[[], object]]:
    """The dense convolution's forward, input gradient and weight gradient on ``x`` / ``gy``
    (in their layout) as zero-argument calls."""
    kh, kw = wd.shape[2:]
    pad = (kh // 2, kw // 2)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            gy, x, wd, None, (stride, stride), pad, (1, 1), False, (0, 0), 1, mask)

    def forward():
        with torch.no_grad():
            return F.conv2d(x, wd, None, stride, pad)
    return {"forward": forward, "input_grad": backward((True, False, False)),
            "weight_grad": backward((False, True, False))}


def _check(name: str, got, want, tol: float = 1e-3) -> None:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    if len(got) != len(want):  # zip would compare the first ones only
        raise RuntimeError(f"hetconv {name} kernel returned {len(got)} tensors, the dense "
                           f"reference {len(want)}")
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise RuntimeError(f"hetconv {name} kernel disagrees with the dense reference "
                               f"(shape {tuple(g.shape)}, expected {tuple(w.shape)})")
        if not torch.allclose(g, w, rtol=tol, atol=tol):
            raise RuntimeError(f"hetconv {name} kernel disagrees with the dense reference "
                               f"(max abs error {(g - w).abs().max().item():.3g})")


def split(shape, part: int, pattern: str = "shifted", repeats: int = 5,
          check: bool = True) -> List[Dict[str, object]]:
    """One row per kernel (``KERNELS``) of ``shape`` (a ``hetconv.bench.LayerShape``) at
    ``part``: ``het_ms``, ``dense_ms`` (the faster layout, named in ``dense_layout``),
    ``speedup``, ``theory``, ``het_macs`` / ``dense_macs`` (counted, per call)."""
    import hetconv
    from hetconv import deploy
    from hetconv import functional as HF
    from hetconv import native
    from hetconv._timing import time_interleaved

    if not native.available():
        raise RuntimeError(f"hetconv native kernel unavailable ({native.build_error()})")
    torch.manual_seed(0)
    b, m, n, size, s = shape.batch, shape.in_ch, shape.out_ch, shape.size, shape.stride
    layer = hetconv.HetConv2d(m, n, 3, stride=s, part=part, pattern=pattern)
    if native._nhwc_step(n, m, part, pattern) is None:
        raise ValueError(f"the channels-last kernel does not run {shape.name} at P = {part} "
                         f"({pattern})")
    wk, w1 = layer.weight_k.detach(), layer.weight_1.detach()
    wd = HF.dense_weight(wk, w1, pattern)
    cl = torch.channels_last
    x = torch.randn(b, m, size, size).contiguous(memory_format=cl)
    gy = torch.randn(b, n, shape.out_size, shape.out_size).contiguous(memory_format=cl)
    pk = native._nhwc_packed(wk, w1, None, pattern, n, m, part)
    het = {"forward": lambda: native._run_nhwc(x, pk, n, stride=s),
           "input_grad": lambda: native._input_grad(gy, wk, w1, pattern, s, size, size),
           "weight_grad": lambda: native._weight_grad(x, gy, wk, w1, pattern, s)}
    if check:
        xr, wkr, w1r = (t.clone().requires_grad_(True) for t in (x, wk, w1))
        ref = F.conv2d(xr, HF.dense_weight(wkr, w1r, pattern), None, s, 1)
        gx, gwk, gw1 = torch.autograd.grad(ref, (xr, wkr, w1r), gy)
        _check("forward", het["forward"](), ref.detach())
        _check("input_grad", het["input_grad"](), gx)
        _check("weight_grad", het["weight_grad"](), (gwk, gw1))
    dense = {"nchw": _dense_parts(x.contiguous(), gy.contiguous(), wd, s),
             "channels_last": _dense_parts(x, gy, wd.contiguous(memory_format=cl), s)}
    if deploy._packing_available():  # inference's baseline: the weights packed for oneDNN once
        packed = deploy.PackedConv2d.from_weight(wd, stride=s, padding=1)
        for layout, xx in (("nchw", x.contiguous()), ("channels_last", x)):
            dense[f"{layout}_packed"] = {"forward": lambda xx=xx: packed(xx)}
    candidates = {f"het {k}": het[k] for k in KERNELS}
    for layout, parts in dense.items():
        candidates.update({f"dense_{layout} {k}": fn for k, fn in parts.items()})
    times = time_interleaved(candidates, repeats=repeats, warmup=2, min_seconds=0.05,
                             settle=1, settle_seconds=0.01)
    het_macs = b * hetconv.profile(layer, (m, size, size)).macs
    dense_macs = b * hetconv.profile(torch.nn.Conv2d(m, n, 3, s, 1, bias=False),
                                     (m, size, size)).macs
    rows = []
    for k in KERNELS:
        layout = min((lay for lay in dense if k in dense[lay]),
                     key=lambda lay: times[f"dense_{lay} {k}"].median)
        het_ms = times[f"het {k}"].median * 1e3
        dense_ms = times[f"dense_{layout} {k}"].median * 1e3
        rows.append({"suite": shape.suite, "layer": shape.name, "batch": b, "part": part,
                     "kernel": k, "het_ms": het_ms, "dense_ms": dense_ms,
                     "dense_layout": layout, "speedup": dense_ms / het_ms,
                     "theory": dense_macs / het_macs, "het_macs": het_macs,
                     "dense_macs": dense_macs})
    return rows


def format_rows(rows: Sequence[Dict[str, object]], fma_gflops: Optional[float]) -> str:
    """A markdown table of ``split``'s rows; rates against ``fma_gflops`` when given."""
    head = ("| suite | layer | batch | P | kernel | HetConv ms | dense ms (layout) | speedup "
            "| theory | % of theory | HetConv GFLOP/s | dense GFLOP/s |")
    out = [head, "|" + "---|" * head.count(" | ") + "---|"]

    def rate(macs, ms):
        g = 2 * macs / ms / 1e6
        return f"{g:.0f}" + (f" ({g / fma_gflops:.0%})" if fma_gflops else "")

    for r in rows:
        out.append(
            f"| {r['suite']} | {r['layer']} | {r['batch']} | {r['part']} | {r['kernel']} | "
            f"{r['het_ms']:.3f} | {r['dense_ms']:.3f} ({r['dense_layout']}) | "
            f"{r['speedup']:.2f} | {r['theory']:.2f} | {r['speedup'] / r['theory']:.0%} | "
            f"{rate(r['het_macs'], r['het_ms'])} | {rate(r['dense_macs'], r['dense_ms'])} |")
    return "\n".join(out) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from hetconv import native
    from hetconv._timing import retain_freed_memory
    from hetconv.bench import LAYER_SUITES, layer_shapes
    from hetconv.bench.report import atomic_write, environment
    from hetconv.cli import _number_arg

    positive_int = _number_arg(int, 1)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=(
        "Rates are counted multiply-adds (2 flops each) per second, and in brackets the "
        "share of the machine's FMA rate (the higher of its readings at the start and the "
        "end)."))
    ap.add_argument("--suites", nargs="+", default=list(LAYER_SUITES),
                    choices=list(LAYER_SUITES), help="layer suites (default: all)")
    ap.add_argument("--min-channels", type=positive_int, default=128,
                    help="only layers with at least this many input and output channels "
                         "(default: 128, the issue's per-layer target)")
    ap.add_argument("--parts", type=positive_int, nargs="+", default=[4, 8],
                    help="HetConv parts P (default: 4 8)")
    ap.add_argument("--pattern", choices=("shifted", "blocked"), default="shifted",
                    help="HetConv pattern (default: shifted)")
    ap.add_argument("--batch-scale", type=_number_arg(float, 0, inclusive=False), default=1.0,
                    help="scale the suites' batches (default: 1, the benchmark's)")
    ap.add_argument("--repeats", type=positive_int, default=5,
                    help="timed repeats per call (default: 5)")
    ap.add_argument("--threads", type=positive_int, default=2,
                    help="torch intra-op threads (default: 2, the target machine)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip checking each kernel against the dense reference first")
    ap.add_argument("--out", help="also write the table to this markdown file")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if not native.available():
        print(f"hetconv native kernel unavailable ({native.build_error()})", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    shapes = [sh for sh in layer_shapes(args.suites, args.batch_scale)
              if min(sh.in_ch, sh.out_ch) >= args.min_channels]
    if not shapes:
        ap.error(f"no layer of {args.suites} has >= {args.min_channels} channels")
    native.fma_rate(args.threads, seconds=0.02, repeats=3)  # out of a cold start first
    start = native.fma_rate(args.threads)
    rows = []
    try:
        from tqdm import tqdm
        items = tqdm([(sh, p) for sh in shapes for p in args.parts], desc="layers",
                     file=sys.stderr)
    except ImportError:
        items = [(sh, p) for sh in shapes for p in args.parts]
    for sh, p in items:
        try:
            rows += split(sh, p, args.pattern, args.repeats, check=not args.no_check)
        except ValueError as err:  # a P the layer or the kernel does not take
            print(f"skipped: {err}", file=sys.stderr)
    end = native.fma_rate(args.threads)
    # the shares against the higher reading: the machine's rate when no other guest slowed it
    text = format_rows(rows, max(start, end))
    text += (f"\nFMA rate: {start:.0f} GFLOP/s at the start, {end:.0f} at the end; shares "
             f"against {max(start, end):.0f} ({args.threads} threads; torch "
             f"{torch.__version__}).\n")
    text += (f"Command: `python benchmarks/kernel_split.py {' '.join(argv)}`, "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {environment()['cpu']}"
             f".\n")
    print(text, end="")
    if args.out:
        atomic_write(args.out, text)  # an interrupted run leaves the old file whole
    return 0


if __name__ == "__main__":
    sys.exit(main())
