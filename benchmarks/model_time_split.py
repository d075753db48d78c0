#!/usr/bin/env python
"""Where an optimized model's inference time goes: the native kernel calls, layer by layer,
and everything else.

Builds ``--model`` at ``--part`` (``hetconv.create_model``), runs
``hetconv.optimize_for_inference`` on a random batch and times, in this process (the
benchmark's memory setting applied, as ``hetconv bench`` does):

1. the whole forward pass (median of ``--repeats`` calls);
2. every kernel launch inside it (``hetconv.native._launch`` timed in place), summed per
   layer signature: input shape, output channels, with or without a fused residual (the
   model's native chains and sequences run layer by layer; with ``--chains`` they stay,
   one row each);
3. the forward pass with the kernels skipped (the launches allocate their outputs but do
   not call C): the stem, gathers, pooling, classifier and Python;
4. the machine's FMA rate right after (``hetconv.native.fma_rate``), and the model's rate
   in counted multiply-adds (``hetconv.profile``: HetConv by its definition) against it:
   on a shared host the first number moves, the second is the kernels' efficiency.

docs/performance.md ("What was tried", eighth session) quotes its ResNet-56 numbers::

    python benchmarks/model_time_split.py --model resnet56_cifar --part 4 --batch 64
    python benchmarks/model_time_split.py --model vgg16_cifar --part 8 --batch 1

Numbers from one process are steadier than interleaved ones but not comparable with
another model's; ``hetconv bench`` is the comparison.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from typing import Callable, Dict, List, Optional

import torch


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    from hetconv._timing import time_interleaved

    return time_interleaved({"f": fn}, repeats=repeats, warmup=warmup)["f"].median * 1e3


def split(model_name: str, part, batch: int, width: float = 1.0, repeats: int = 25,
          memory_format: str = "auto", backend: str = "measure",
          chains: bool = False) -> Dict[str, object]:
    """``{"total_ms", "kernels_ms", "pass_ms", "outside_ms", "layers": [(signature, calls,
    ms), ...]}`` per forward pass of the optimized model (``layers``: kernel time per
    signature; ``pass_ms``: the mean forward pass of the same calls the kernel times come
    from, so it contains them). ``chains``: keep the model's native chains and sequences
    (one entry per chain or sequence, signature ``("native chain" or "native sequence",
    input shape, output channels, False)``); by default they run layer by layer, so every
    layer's kernel call is seen."""
    import hetconv
    from hetconv import deploy, native
    from hetconv._timing import retain_freed_memory

    retain_freed_memory()
    torch.manual_seed(0)
    kwargs = {"width": width} if part in (None, 1) else {"width": width, "part": part}
    if "part" in hetconv.models.parse_model_name(model_name)[1]:
        kwargs.pop("part", None)  # the name's own _p<P> suffix
    model = hetconv.create_model(model_name, **kwargs).eval()
    x = torch.randn(batch, 3, 32, 32)
    opt = hetconv.optimize_for_inference(model, x, memory_format=memory_format,
                                         backend=backend, check=False)
    if opt.hetconv_plan["memory_format"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for module in opt.modules():
        if isinstance(module, deploy.NativeChain):
            module.enabled = chains
        elif isinstance(module, deploy.NativeSequence) and not chains:
            module._sequenced = lambda x_: None  # its layers run as modules, one launch each

    def forward():
        with torch.no_grad():
            opt(x)

    total = _median_ms(forward, repeats)
    spent: Dict[tuple, float] = collections.defaultdict(float)
    calls: Dict[tuple, int] = collections.Counter()
    real, real_chain, real_seq = native._launch, native.run_chain, native.SequencePlan.run

    def timed(x_, shape, fmt, call, residual, what):
        t0 = time.perf_counter()
        y = real(x_, shape, fmt, call, residual, what)
        key = (what, tuple(x_.shape[1:]), shape[1], residual is not None)
        spent[key] += time.perf_counter() - t0
        calls[key] += 1
        return y

    def timed_whole(what, run):
        """``run(unit, x, extra)`` (a chain's or a sequence's) timed as one row"""
        def timed_run(unit, x_, extra=None):
            t0 = time.perf_counter()
            y = run(unit, x_, extra)
            key = (what, tuple(x_.shape[1:]), y.shape[1], False)
            spent[key] += time.perf_counter() - t0
            calls[key] += 1
            return y
        return timed_run

    timed_chain = timed_whole("native chain", real_chain)
    timed_seq = timed_whole("native sequence", real_seq)

    def skipped(x_, shape, fmt, call, residual, what):
        return real(x_, shape, fmt, lambda *args: 0, residual, what)

    def skipped_chain(chain, x_, x2=None):
        return torch.empty((x_.shape[0],) + chain.out_shape)

    def skipped_seq(seq, x_, scratch=None):
        return torch.empty(seq.shape, memory_format=torch.channels_last)

    try:
        native._launch, native.run_chain = timed, timed_chain
        native.SequencePlan.run = timed_seq
        forward()  # warm
        spent.clear()
        calls.clear()
        t0 = time.perf_counter()
        for _ in range(repeats):
            forward()
        pass_ms = (time.perf_counter() - t0) / repeats * 1e3
        native._launch, native.run_chain = skipped, skipped_chain
        native.SequencePlan.run = skipped_seq
        outside = _median_ms(forward, repeats)
    finally:
        native._launch, native.run_chain = real, real_chain
        native.SequencePlan.run = real_seq
    layers = [(key, calls[key] // repeats, spent[key] / repeats * 1e3) for key in sorted(spent)]
    macs = hetconv.profile(model, tuple(x.shape[1:])).macs
    return {"total_ms": total, "kernels_ms": sum(ms for _, _, ms in layers), "pass_ms": pass_ms,
            "outside_ms": outside, "layers": layers, "macs_per_image": macs,
            "gflops": 2 * macs * batch / total / 1e6, "fma_gflops": native.fma_rate(),
            "memory_format": opt.hetconv_plan["memory_format"],
            "native_dense": opt.hetconv_plan.get("native_dense", 0)}


def _part(text: str):
    """``--part``: an int >= 1 or C."""
    if text in ("C", "c"):
        return "C"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1 or C, got {text!r}")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56_cifar",
                    help="a hetconv.create_model name (default: resnet56_cifar)")
    ap.add_argument("--part", type=_part, default=None,
                    help="P, or C (default: 4, or the model name's own _p<P> suffix)")
    ap.add_argument("--batch", type=int, default=64, help="images per call (default: 64)")
    ap.add_argument("--width", type=float, default=1.0, help="width multiplier (default: 1)")
    ap.add_argument("--repeats", type=int, default=25, help="timed calls (default: 25)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--memory-format", choices=("auto", "contiguous", "channels_last"),
                    default="auto", help="as optimize_for_inference's (default: auto)")
    ap.add_argument("--backend", default="measure",
                    help="optimize_for_inference's backend: measure (default), auto or one of "
                         "hetconv.BACKENDS")
    ap.add_argument("--chains", action="store_true",
                    help="keep the model's native chains and sequences (one row per chain or "
                         "sequence); by default they run layer by layer, one row per layer "
                         "signature")
    args = ap.parse_args(argv)
    for name in ("batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.width <= 0:
        ap.error(f"--width must be > 0, got {args.width}")
    import hetconv

    if not hetconv.models.is_model(args.model):
        ap.error(f"--model: unknown model {args.model!r} (see hetconv.list_models())")
    if args.backend not in ("measure", "auto") + tuple(hetconv.BACKENDS):
        ap.error(f"--backend must be measure, auto or one of {', '.join(hetconv.BACKENDS)}, "
                 f"got {args.backend!r}")
    named = hetconv.models.parse_model_name(args.model)[1].get("part")
    if named is not None and args.part is not None:
        ap.error(f"--part: the model name {args.model!r} sets P already")
    if args.part is None:
        args.part = named if named is not None else 4
    torch.set_num_threads(args.threads)
    out = split(args.model, args.part, args.batch, args.width, args.repeats,
                args.memory_format, args.backend, args.chains)
    print(f"{args.model} P{args.part} batch {args.batch} ({out['memory_format']}): "
          f"{out['total_ms']:.2f} ms per call; kernel calls {out['kernels_ms']:.2f} ms; "
          f"with the kernels skipped {out['outside_ms']:.2f} ms")
    rate = (f", {out['gflops'] / out['fma_gflops']:.0%} of the machine's FMA rate now "
            f"({out['fma_gflops']:.0f} GFLOP/s)" if out["fma_gflops"] else "")
    print(f"{out['macs_per_image'] / 1e6:.1f}M multiply-adds per image: "
          f"{out['gflops']:.0f} GFLOP/s{rate}")
    print("| kernel | input (C, H, W) | out ch | residual | calls | ms per call | ms |")
    print("|---|---|---|---|---|---|---|")
    for (what, shape, n, res), count, ms in out["layers"]:
        per = ms / count if count else 0.0
        print(f"| {what} | {shape} | {n} | {'yes' if res else 'no'} | {count} | {per:.3f} "
              f"| {ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
