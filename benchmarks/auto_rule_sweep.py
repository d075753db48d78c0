#!/usr/bin/env python
"""Sweep the per-layer benchmark shapes: dense ``nn.Conv2d`` against the HetConv backends.

The data behind ``hetconv.functional.select_backend`` (docs/performance.md,
"auto rule (re-derived)").  For every shape of ``hetconv.bench.LAYER_SUITES``,
mode (``infer`` = forward under ``no_grad``, ``train`` = forward + backward)
and part P it times, interleaved (``hetconv._timing.time_interleaved``):

* ``dense_nchw`` / ``dense_cl``: ``F.conv2d`` with a dense kernel on NCHW /
  channels_last input, the baselines of ``hetconv bench``;
* ``het_dense`` / ``het_fused`` / ``het_auto``: ``het_conv2d`` on the
  channels_last input;
* ``het_native`` / ``het_auto_nchw``: ``het_conv2d`` on the NCHW input (the
  C kernel's layout; ``"auto"`` picks ``"native"`` only for NCHW input);

each item twice, in opposite orders (:func:`timed`), and prints one
markdown row per item: the best dense baseline in ms, each
HetConv candidate as a speedup over it, the faster of dense/fused and what
``select_backend`` picks.  Run it a few suites at a time (each run stops
starting items after ``--max-seconds``), then summarise per rule branch::

    nice -n 10 python benchmarks/auto_rule_sweep.py --suites vgg16_cifar --modes infer --json s.jsonl
    nice -n 10 python benchmarks/auto_rule_sweep.py --suites resnet50_224 --batches 1 --json s.jsonl
    python benchmarks/auto_rule_sweep.py --summary s.jsonl

On a shared machine use ``--threads 1``: two OpenMP threads wait for each
other whenever one is preempted, which distorts every ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from hetconv import functional as HF
from hetconv._files import json_text
from hetconv._timing import time_interleaved
from hetconv.bench.layers import ALL_PARTS, LAYER_SUITES, _runner, layer_shapes, parts_for

HET = ("dense", "fused", "auto")  # on channels_last input
HET_NCHW = ("native", "auto")  # on NCHW input (key het_native, het_auto_nchw)


def candidates(shape, part, train):
    """Zero-argument callables for one shape at P = ``part`` (P = 1: the dense baselines only)."""
    m, n, s = shape.in_ch, shape.out_ch, shape.stride
    x = torch.randn(shape.batch, m, shape.size, shape.size, requires_grad=train)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(train)

    def param(*size):
        return (torch.randn(*size) / (size[1] * 3) ** 0.5).requires_grad_(train)

    if part == 1:
        w = param(n, m, 3, 3)
        # channels_last weights too, as nn.Conv2d has them in a channels_last model (NCHW
        # weights are reordered on every call: a slower baseline than PyTorch offers)
        w_cl = w.detach().contiguous(memory_format=torch.channels_last).requires_grad_(train)
        return {"dense_nchw": _runner(lambda: F.conv2d(x, w, None, s, 1), train, (x, w)),
                "dense_cl": _runner(lambda: F.conv2d(x_cl, w_cl, None, s, 1), train,
                                    (x_cl, w_cl))}
    wk, w1 = param(n, m // part, 3, 3), param(n, m - m // part)
    out = {f"het_{b}": _runner(lambda b=b: HF.het_conv2d(x_cl, wk, w1, None, s, 1, 1, "shifted", b),
                               train, (x_cl, wk, w1)) for b in HET}
    for b in HET_NCHW:
        out[_nchw_key(b)] = _runner(lambda b=b: HF.het_conv2d(x, wk, w1, None, s, 1, 1, "shifted", b),
                                    train, (x, wk, w1))
    return out


def _nchw_key(backend: str) -> str:
    return "het_native" if backend == "native" else f"het_{backend}_nchw"


def timed(cands, repeats, warmup):
    """Median ms per candidate over two interleaved passes, in the given and reversed order.

    A call is slowed by the one before it (a dense conv of another layout leaves
    the caches cold: up to 2x on ~3 ms calls), so each order alone is biased.
    """
    fwd = time_interleaved(cands, repeats=repeats, warmup=warmup)
    rev = time_interleaved(dict(reversed(list(cands.items()))), repeats=repeats, warmup=0)
    return {k: statistics.median(fwd[k].samples + rev[k].samples) * 1e3 for k in cands}


def choice(shape, part, train=False, layout=torch.contiguous_format):
    """What ``select_backend`` picks for the shape (input of the shape's size and layout)."""
    x = torch.empty(1, shape.in_ch, shape.size, shape.size).contiguous(memory_format=layout)
    wk = torch.empty(shape.out_ch, shape.in_ch // part, 3, 3, requires_grad=train)
    w1 = torch.empty(shape.out_ch, shape.in_ch - shape.in_ch // part, requires_grad=train)
    with torch.set_grad_enabled(train):
        return HF.select_backend(x, wk, w1, (shape.stride, shape.stride), padding=(1, 1))


def bucket(row) -> str:
    """The branch of the auto rule a row falls in (for the summary table)."""
    m, n, p = row["in_ch"], row["out_ch"], row["part"]
    if m >= HF.FUSED_MIN_IN and n >= HF.FUSED_MIN_OUT:
        return f"M >= {HF.FUSED_MIN_IN}, N >= {HF.FUSED_MIN_OUT}, P " + ("= 2" if p == 2 else ">= 4")
    if p == m == n:
        return "depthwise (P = M = N), M %s %d" % (
            ">=" if m >= HF.DEPTHWISE_MIN_CHANNELS else "<", HF.DEPTHWISE_MIN_CHANNELS)
    return "other (M < 64 or N < 128)"


def summary(paths) -> None:
    """Markdown table of JSON-lines rows per rule branch and mode: speedups vs the best dense."""
    rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    groups = {}
    for r in rows:
        groups.setdefault((bucket(r), r["mode"]), []).append(r)
    print("| rule branch | mode | cases | fused: min / median / max | dense path: median "
          "| native: min / median / max | auto (NCHW): min / median | auto < 0.9x | auto picks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, mode), rs in sorted(groups.items()):
        def ratios(key):
            return sorted(min(r["ms"]["dense_nchw"], r["ms"]["dense_cl"]) / r["ms"][key] for r in rs)
        fused, dense, auto = ratios("het_fused"), ratios("het_dense"), ratios("het_auto_nchw")
        native = ratios("het_native")
        med = lambda v: v[len(v) // 2]  # noqa: E731
        picks = "/".join(sorted({r["rule"] for r in rs}))
        print(f"| {name} | {mode} | {len(rs)} | {fused[0]:.2f} / {med(fused):.2f} / {fused[-1]:.2f} "
              f"| {med(dense):.2f} | {native[0]:.2f} / {med(native):.2f} / {native[-1]:.2f} "
              f"| {auto[0]:.2f} / {med(auto):.2f} | {sum(a < 0.9 for a in auto)} | {picks} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suites", nargs="+", default=list(LAYER_SUITES), choices=list(LAYER_SUITES))
    ap.add_argument("--batches", nargs="+", type=int, help="only these batch sizes")
    ap.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    ap.add_argument("--parts", nargs="+", default=[str(p) for p in ALL_PARTS[1:]])
    ap.add_argument("--shapes", nargs="+", type=int, help="indices into layer_shapes(suites)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=110.0,
                    help="no new item starts after this many seconds")
    ap.add_argument("--json", help="append the rows to this JSON-lines file")
    ap.add_argument("--summary", nargs="+", metavar="JSONL",
                    help="measure nothing: print the per-branch table of these --json files")
    args = ap.parse_args(argv)
    if args.summary:
        missing = [p for p in args.summary if not os.path.isfile(p)]
        if missing:
            ap.error(f"--summary: no such file: {', '.join(missing)}")
        summary(args.summary)
        return 0
    for name in ("repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    bad = [p for p in args.parts if p != "C" and not (p.isdigit() and int(p) >= 1)]
    if bad:
        ap.error(f"--parts: each must be an int >= 1 or C, got {', '.join(bad)}")
    torch.set_num_threads(args.threads)
    parts = [p if p == "C" else int(p) for p in args.parts]
    every = layer_shapes(args.suites)
    if args.shapes and not all(0 <= i < len(every) for i in args.shapes):
        ap.error(f"--shapes: indices must be 0..{len(every) - 1} for these suites, "
                 f"got {args.shapes}")
    shapes = [s for i, s in enumerate(every)
              if (args.shapes is None or i in args.shapes)
              and (not args.batches or s.batch in args.batches)]
    if not shapes:
        ap.error(f"no layer of {', '.join(args.suites)} has batch {args.batches} "
                 f"(batches there: {sorted({s.batch for s in every})})")
    deadline = time.perf_counter() + args.max_seconds
    print("| suite | layer | B | mode | P | dense ms | best dense | het_dense | het_fused | het_auto "
          "| het_native | het_auto (NCHW) | fastest | rule (NCHW) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = open(args.json, "a") if args.json else None
    for shape in shapes:
        for mode in args.modes:
            train = mode == "train"
            torch.manual_seed(0)
            base = candidates(shape, 1, train)
            for part in parts_for(shape.in_ch, parts):
                if part == 1:
                    continue
                if time.perf_counter() > deadline:
                    print("# deadline reached", file=sys.stderr)
                    return 0
                cands = dict(base, **candidates(shape, part, train))
                t = timed(cands, args.repeats, args.warmup)
                best_name = min(("dense_nchw", "dense_cl"), key=t.get)
                best = t[best_name]
                r = {b: best / t[f"het_{b}"] for b in HET}
                r["native"], r["auto_nchw"] = (best / t[_nchw_key(b)] for b in HET_NCHW)
                faster = max(("dense", "fused", "native"), key=r.get)
                rule = choice(shape, part, train)
                print(f"| {shape.suite} | {shape.name} | {shape.batch} | {mode} | {part} | {best:.2f} "
                      f"| {best_name[6:]} | {r['dense']:.2f} | {r['fused']:.2f} | {r['auto']:.2f} "
                      f"| {r['native']:.2f} | {r['auto_nchw']:.2f} | {faster} | {rule} |", flush=True)
                if out:
                    out.write(json_text({"suite": shape.suite, "layer": shape.name,
                                          "batch": shape.batch, "in_ch": shape.in_ch,
                                          "out_ch": shape.out_ch, "size": shape.size,
                                          "stride": shape.stride, "mode": mode, "part": part,
                                          "ms": t, "rule": rule}) + "\n")
                    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
