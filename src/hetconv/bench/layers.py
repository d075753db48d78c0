"""Per-layer benchmark: one 3x3 conv shape, every way of computing it, timed side by side.

Candidates for a shape (M -> N, HxW input, stride) and part P:

* ``dense_nchw`` / ``dense_cl``: ``nn.Conv2d`` in NCHW and channels_last (input and
  weights, as a model converted with ``.to(memory_format=torch.channels_last)`` runs it)
  (and ``*_compiled`` with ``torch.compile`` when asked; for inference also
  ``dense_packed`` / ``dense_cl_packed``: :class:`hetconv.deploy.PackedConv2d`, the
  weights packed for oneDNN once instead of reordered on every call); the fastest of
  them is the baseline every ratio is taken against.
* public designs: ``masked_dense`` (a dense kernel multiplied by the 0/1 mask
  each call, what most public code does), ``grouped_plus_pw`` (grouped conv +
  unmasked full pointwise conv, two convs summed), ``branches`` (P per-class
  gathers, one dense conv each, scattered back).
* paper baselines: ``gwc_pwc`` (GWC with G=P, then PWC) and ``dwc_pwc``.
* every hetconv backend (``het_<name>``: ``"native"`` on NCHW input, the
  others on channels_last), ``het_native_cl`` (``"native"`` on channels_last
  input: its channels-last kernel where that applies), ``het_auto`` (NCHW
  input) and ``het_auto_cl`` (channels_last input), and the fused and native
  backends with the other pattern (``het_fused_blocked``,
  ``het_native_blocked``, ``het_native_cl_blocked``).

Inference calls run under ``no_grad``; a training call is forward + backward from a fixed
output gradient (see ``_runner``), with the leaves' gradients reset each call.

Before an item is timed, :func:`check_candidates` compares each candidate that has a
reference with it (output, and in training the inputs' and weights' gradients): every
``het_*`` with ``F.conv2d`` on the layer's dense kernel (:func:`hetconv.dense_weight`), the
dense variants with ``dense_nchw``, ``branches`` with the masked dense kernel.  A candidate
that computes something else raises instead of being timed (a broken path looks fast).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import functional as HF
from .. import pattern as _pattern
from .._timing import SETTLE_MS, time_interleaved
from ..deploy import PackedConv2d, _packing_available

__all__ = ["LayerShape", "LAYER_SUITES", "layer_shapes", "parts_for", "layer_candidates",
           "check_candidates", "run_layers"]


@dataclass(frozen=True)
class LayerShape:
    """A 3x3 convolution of a network: ``in_ch -> out_ch`` on ``size x size`` at ``stride``."""

    suite: str
    name: str
    batch: int
    in_ch: int
    out_ch: int
    size: int
    stride: int = 1

    @property
    def out_size(self) -> int:
        return (self.size - 1) // self.stride + 1


def _unique(convs: Iterable[tuple]) -> List[tuple]:
    seen, out = set(), []
    for c in convs:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


# (in, out, input size, stride) of the 3x3 convs HetConv replaces (all but CONV_1).
_VGG16 = _unique([(64, 64, 32, 1), (64, 128, 16, 1), (128, 128, 16, 1), (128, 256, 8, 1),
                  (256, 256, 8, 1), (256, 512, 4, 1), (512, 512, 4, 1), (512, 512, 2, 1)])
_RESNET56 = [(16, 16, 32, 1), (16, 32, 32, 2), (32, 32, 16, 1), (32, 64, 16, 2), (64, 64, 8, 1)]
_RESNET50 = [(64, 64, 56, 1), (128, 128, 56, 2), (128, 128, 28, 1), (256, 256, 28, 2),
             (256, 256, 14, 1), (512, 512, 14, 2), (512, 512, 7, 1)]

LAYER_SUITES: Dict[str, tuple] = {
    "vgg16_cifar": ((64,), _VGG16),
    "resnet56_cifar": ((128,), _RESNET56),
    "resnet50_224": ((1, 16), _RESNET50),
}

ALL_PARTS: tuple = (1, 2, 4, 8, 16, 32, 64, "C")


def layer_shapes(suites: Sequence[str] = tuple(LAYER_SUITES), batch_scale: float = 1.0,
                 max_shapes: Optional[int] = None) -> List[LayerShape]:
    """The benchmark shapes of ``suites``; ``batch_scale`` shrinks batches (quick runs)."""
    out = []
    for suite in suites:
        if suite not in LAYER_SUITES:
            raise ValueError(f"suite must be one of {tuple(LAYER_SUITES)}, got {suite!r}")
        batches, convs = LAYER_SUITES[suite]
        for batch in batches:
            for m, n, size, stride in convs[:max_shapes]:
                b = max(1, int(round(batch * batch_scale)))
                name = f"{m}->{n} {size}x{size}" + (f" s{stride}" if stride > 1 else "")
                out.append(LayerShape(suite, name, b, m, n, size, stride))
    return out


def parts_for(in_ch: int, parts: Sequence[Union[int, str]] = ALL_PARTS) -> List[int]:
    """The integer parts of ``parts`` that divide ``in_ch`` ("C" = in_ch), without repeats."""
    out: List[int] = []
    for p in parts:
        q = in_ch if p == "C" else p
        if in_ch % q == 0 and q not in out:
            out.append(q)
    return out


def _runner(fn: Callable[[], torch.Tensor], train: bool, leaves: Sequence[torch.Tensor],
            reference: Optional[tuple] = None):
    """A zero-argument call: forward under no_grad, or forward + backward.

    The call keeps ``fn`` (``.forward``), ``leaves`` and ``reference``: ``(key, callable)``,
    what ``fn`` must compute from the same leaves (same gradients too), or None;
    :func:`check_candidates` compares them before anything is timed.

    The backward starts from a fixed output gradient (ones, in the layout of the first
    call's output, made once), as a layer inside a network receives a materialised
    gradient from the layer after it.  (Runs up to 36 used ``fn().sum().backward()``, whose
    broadcast gradient every candidate first copied into a full tensor: 1.3 ms of a 10 ms
    HetConv step at 128 channels 28x28 batch 16, a cost no network pays.)
    """
    if not train:
        def infer():
            with torch.no_grad():
                fn()
        infer.forward, infer.leaves, infer.reference = fn, tuple(leaves), reference
        return infer

    grad: List[torch.Tensor] = []

    def step():
        for t in leaves:
            t.grad = None
        y = fn()
        if not grad or grad[0].shape != y.shape or grad[0].stride() != y.stride():
            grad[:] = [torch.ones_like(y)]
        y.backward(grad[0])
    step.forward, step.leaves, step.reference = fn, tuple(leaves), reference
    return step


def layer_candidates(shape: LayerShape, part: int, train: bool = False,
                     compile: bool = False, pattern: str = "shifted",
                     baselines: bool = True) -> Dict[str, Callable[[], None]]:
    """Zero-argument callables computing ``shape`` at ``part`` in every way (see module doc).

    ``baselines=False`` leaves out the P-independent ones (dense, DWC+PWC), so
    a caller can time them once per shape.  With ``compile`` (and ``baselines``) it
    resets ``torch._dynamo`` first: every compiled function of the process is compiled
    anew on its next call (the benchmark times its items one after the other).
    """
    m, n, s, k = shape.in_ch, shape.out_ch, shape.stride, 3
    cl = torch.channels_last
    x = torch.randn(shape.batch, m, shape.size, shape.size, requires_grad=train)
    x_cl = x.detach().contiguous(memory_format=cl).requires_grad_(train)

    def param(*size):
        return (torch.randn(*size) / (size[1] * 3) ** 0.5).requires_grad_(train)

    def param_cl(*size):  # for channels_last input: channels_last weights (see w_cl below)
        return param(*size).detach().contiguous(memory_format=cl).requires_grad_(train)

    cands: Dict[str, Callable[[], None]] = {}
    if baselines:
        w = param(n, m, k, k)
        # channels_last: the weights too, as nn.Conv2d(...).to(memory_format=channels_last)
        # has them (NCHW weights on channels_last input get reordered in every call: up to
        # 3x slower training steps on 512-channel 4x4 layers, a weak baseline)
        w_cl = w.detach().contiguous(memory_format=cl).requires_grad_(train)
        dense = lambda xx, ww: F.conv2d(xx, ww, None, s, 1)  # noqa: E731
        # every dense variant must compute nn.Conv2d's NCHW result (gradients too)
        ref = ("dense", lambda: dense(x, w))
        # (computed in NCHW: the reference must not be the expression dense_cl times)
        ref_cl = ("dense", lambda: dense(x_cl.contiguous(), w_cl.contiguous()))
        cands["dense_nchw"] = _runner(lambda: dense(x, w), train, (x, w))
        cands["dense_cl"] = _runner(lambda: dense(x_cl, w_cl), train, (x_cl, w_cl), ref_cl)
        if not train and _packing_available():  # the weights in oneDNN's layout once
            packed = PackedConv2d.from_weight(w.detach(), stride=s, padding=1)
            cands["dense_packed"] = _runner(lambda: packed(x), train, (), ref)
            cands["dense_cl_packed"] = _runner(lambda: packed(x_cl), train, (), ref)
        if compile:
            # One code object (this lambda) for every shape: dynamo recompiles it per shape,
            # layout and grad mode, and after its recompile limit (8) runs it eagerly, so
            # from the fifth item on the "compiled" baseline was eager.  Earlier items are
            # timed already: their compiled code may go (the docstring says so).
            torch._dynamo.reset()
            cdense = torch.compile(dense, dynamic=False)
            cands["dense_nchw_compiled"] = _runner(lambda: cdense(x, w), train, (x, w), ref)
            cands["dense_cl_compiled"] = _runner(lambda: cdense(x_cl, w_cl), train,
                                                 (x_cl, w_cl), ref_cl)
        wd, wp = param_cl(m, 1, k, k), param_cl(n, m, 1, 1)
        cands["dwc_pwc"] = _runner(
            lambda: F.conv2d(F.conv2d(x_cl, wd, None, s, 1, 1, m), wp), train, (x_cl, wd, wp))
    if part == 1:
        return cands

    wk, w1 = param(n, m // part, k, k), param(n, m - m // part)
    mask = _pattern.kernel_mask(m, n, part, pattern)
    w_full, mask4 = param(n, m, k, k), _mask4(mask, k)
    w_full_cl = w_full.detach().contiguous(memory_format=cl).requires_grad_(train)
    mask4_cl = mask4.contiguous(memory_format=cl)
    # (its reference: the same leaves in NCHW, so a conv wrong only on channels_last
    # memory, or a mask in the wrong layout, is caught)
    cands["masked_dense"] = _runner(
        lambda: F.conv2d(x_cl, w_full_cl * mask4_cl, None, s, 1), train, (x_cl, w_full_cl),
        ("masked_cl", lambda: F.conv2d(x_cl.contiguous(), w_full_cl.contiguous() * mask4,
                                       None, s, 1)))
    masked_ref = ("masked", lambda: F.conv2d(x, w_full * mask4, None, s, 1))
    if n % part == 0:
        wg, wpw = param(n, m // part, k, k), param(n, m, 1, 1)
        cands["grouped_plus_pw"] = _runner(
            lambda: F.conv2d(x, wg, None, s, 1, 1, part) + F.conv2d(x, wpw, None, s),
            train, (x, wg, wpw))
        if m % part == 0:
            wgw, wpp = param_cl(m, m // part, k, k), param_cl(n, m, 1, 1)
            cands["gwc_pwc"] = _runner(
                lambda: F.conv2d(F.conv2d(x_cl, wgw, None, s, 1, 1, part), wpp),
                train, (x_cl, wgw, wpp))
    if part <= 8:  # P dense convs per call: the loop is the point, and it gets slow
        cands["branches"] = _runner(lambda: _branches(x, w_full, mask, part, s, pattern),
                                    train, (x, w_full), masked_ref)
    # Each backend gets the layout it is built for: "native" NCHW, the others channels_last;
    # "auto" runs on both (het_auto: NCHW, PyTorch's default; het_auto_cl: channels_last).
    # ... each checked against the definition: one F.conv2d with the scattered dense kernel
    def het(xx, backend, pat=pattern):
        ref = (("het", pat), lambda: F.conv2d(xx, HF.dense_weight(wk, w1, pat), None, s, 1))
        return _runner(lambda: HF.het_conv2d(xx, wk, w1, None, s, 1, 1, pat, backend),
                       train, (xx, wk, w1), ref)
    for backend in HF.BACKENDS:
        cands[f"het_{backend}"] = het(x if backend == "native" else x_cl, backend)
    cands["het_native_cl"] = het(x_cl, "native")  # the channels-last kernel where it applies
    cands["het_auto"] = het(x, "auto")
    cands["het_auto_cl"] = het(x_cl, "auto")
    other = "blocked" if pattern == "shifted" else "shifted"
    cands[f"het_fused_{other}"] = het(x_cl, "fused", other)
    cands[f"het_native_{other}"] = het(x, "native", other)
    cands[f"het_native_cl_{other}"] = het(x_cl, "native", other)
    return cands


#: relative tolerance of :func:`check_candidates` (of the reference's largest magnitude):
#: fp32 sums of up to 512 x 9 products in another order agree to ~1e-6 of it; a wrong
#: pattern, tap or channel is off by the order of the values themselves
CHECK_RTOL: float = 1e-3


def _results(fn: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor],
             train: bool) -> List[Optional[torch.Tensor]]:
    """The output of ``fn`` and, for ``train``, the gradients of ``leaves`` from a
    gradient of ones."""
    if not train or not leaves:
        with torch.no_grad():
            return [fn().detach()]
    y = fn()
    if not y.requires_grad:  # no gradient reaches the leaves: "missing", named by the caller
        return [y.detach()] + [None] * len(leaves)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True)
    return [y.detach()] + [None if g is None else g.detach() for g in grads]


def _mismatch(got: List[torch.Tensor], want: List[torch.Tensor], rtol: float = CHECK_RTOL,
              pooled: bool = False) -> Optional[str]:
    """Why ``got`` does not match ``want`` (output, then gradients), or None.  Each tensor
    is compared within ``rtol`` of its reference's largest magnitude; ``pooled``: the
    gradients within ``rtol`` of the largest of all of them (a network's parameters include
    some whose gradient is 0 up to rounding, e.g. a bias before BatchNorm)."""
    what = ["output"] + [f"gradient of leaf {i}" for i in range(len(want) - 1)]
    if len(got) != len(want):
        return f"{len(got)} results, expected {len(want)}"
    pool = max((b.abs().max().item() for b in want[1:] if b is not None and b.numel()),
               default=0.0) if pooled else 0.0
    for i, (name, a, b) in enumerate(zip(what, got, want)):
        if a is None or b is None:
            if a is not b:
                return f"{name}: missing"
            continue
        if a.shape != b.shape:
            return f"{name}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        if not torch.isfinite(a).all():
            return f"{name}: not finite"
        err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        scale = max(b.abs().max().item() if b.numel() else 0.0, pool if i else 0.0)
        if err > rtol * max(scale, 1e-6):
            return f"{name}: max error {err:.3g} (largest value {scale:.3g})"
    return None


def check_candidates(cands: Dict[str, Callable[[], None]], train: bool = False,
                     rtol: float = CHECK_RTOL) -> None:
    """Raise RuntimeError unless every candidate of :func:`layer_candidates` that has a
    reference computes it: output and (``train``) its leaves' gradients, within ``rtol``
    of the reference's largest magnitude.  A broken fast path must not be timed (it would
    look fast); the benchmark runs this before each item's timings."""
    refs: Dict[object, List[torch.Tensor]] = {}
    bad = []
    for name, call in cands.items():
        reference = getattr(call, "reference", None)
        if reference is None:
            continue
        key, ref_fn = reference
        key = (key, tuple(map(id, call.leaves)))  # gradients are with respect to the leaves
        if key not in refs:
            refs[key] = _results(ref_fn, call.leaves, train)
        why = _mismatch(_results(call.forward, call.leaves, train), refs[key], rtol)
        if why:
            bad.append(f"{name} ({why})")
    if bad:
        raise RuntimeError("benchmark candidates compute a different result than their "
                           "reference: " + "; ".join(bad))


def _mask4(mask: torch.Tensor, k: int) -> torch.Tensor:
    """(N, M, k, k) 0/1 kernel mask: all taps where KxK, the centre only elsewhere."""
    out = torch.zeros(mask.shape + (k, k))
    out[mask] = 1.0
    out[:, :, k // 2, k // 2] = 1.0
    return out


def _branches(x, w_full, mask, part, stride, pattern):
    """Per-class loop of public implementations: gather, dense conv, scatter back."""
    cls_f = _pattern.class_of_filter(w_full.shape[0], part, pattern)
    k = w_full.shape[-1]
    outs, order = [], []
    for c in range(part):
        f = (cls_f == c).nonzero().squeeze(1)
        w = w_full.index_select(0, f) * _mask4(mask.index_select(0, f), k)
        outs.append(F.conv2d(x, w, None, stride, 1))
        order.append(f)
    y = torch.cat(outs, 1)
    return y.index_select(1, torch.argsort(torch.cat(order)))


def run_layers(shapes: Sequence[LayerShape], parts: Sequence[Union[int, str]] = ALL_PARTS,
               modes: Sequence[str] = ("infer", "train"), repeats: int = 5, warmup: int = 1,
               compile: bool = False, pattern: str = "shifted", progress=None,
               deadline: Optional[float] = None, settle: int = 1,
               settle_seconds: float = SETTLE_MS / 1000) -> List[dict]:
    """Time every candidate of every shape x part x mode; one row per (shape, P, mode, candidate).

    No new item starts after ``deadline`` (a ``time.perf_counter()`` value).
    Each row holds the median in milliseconds, ``speedup`` against the
    fastest dense baseline of the same shape and mode (timed in the same
    interleaved batch) and ``theory`` = Eq. 5 for that P.  Before an item is timed, its
    candidates' outputs (and, training, gradients) are checked against their references
    (:func:`check_candidates`: RuntimeError if one differs).  ``settle`` untimed calls of a
    candidate precede each timed one, more of them up to ``settle_seconds`` (steady state;
    see :func:`hetconv._timing.time_interleaved`).
    """
    rows: List[dict] = []
    for shape in shapes:
        for mode in modes:
            train = mode == "train"
            torch.manual_seed(0)
            base = layer_candidates(shape, 1, train, compile, pattern)
            checked = False  # the baselines: checked with the first part
            for part in parts_for(shape.in_ch, parts):
                if deadline is not None and time.perf_counter() > deadline:
                    return rows
                cands = dict(base)
                if part > 1:
                    cands.update(layer_candidates(shape, part, train, compile, pattern,
                                                  baselines=False))
                # nothing is timed that does not compute the layer (a broken path looks fast)
                check_candidates(cands if not checked else
                                 {k: v for k, v in cands.items() if k not in base}, train)
                checked = True
                times = time_interleaved(cands, repeats=repeats, warmup=warmup, settle=settle,
                                         settle_seconds=settle_seconds)
                best = min(v.median for k, v in times.items() if k.startswith("dense_"))
                for name, t in times.items():
                    rows.append({
                        "suite": shape.suite, "layer": shape.name, "batch": shape.batch,
                        "in_ch": shape.in_ch, "out_ch": shape.out_ch, "size": shape.size,
                        "stride": shape.stride, "part": part, "mode": mode,
                        "candidate": name, "ms": t.median * 1e3,
                        "speedup": best / t.median, "theory": _pattern.speedup(part),
                        "pattern": pattern})
                if progress is not None:
                    progress(f"{shape.suite} {shape.name} b{shape.batch} P{part} {mode}")
    return rows
