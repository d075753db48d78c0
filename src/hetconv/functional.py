"""``het_conv2d``: the heterogeneous convolution as a function, with its backends.

One semantics, several ways to execute it.  ``"dense"`` is the definition:
scatter the non-redundant weights into an (N, M, Kh, Kw) kernel that is zero
off the KxK/centre positions and run one ``F.conv2d``.  Every other backend
computes the same function (tested forward and backward against ``"dense"``)
while spending less than the dense cost.

Backends
--------
``"dense"``
    Reference.  Costs as much as a standard convolution, plus assembling the
    dense kernel: one scatter under autograd, cached outside it.
``"grouped"``
    One grouped KxK convolution with ``groups=P`` (group ``c`` = the input
    channels of class ``c`` and the filters of class ``c``) plus one pointwise
    convolution over all input channels whose weight is zero on each filter's
    KxK channels; the two are summed inside the layer.  Costs
    ``FL_K + Do*Do*N*M`` MACs: within ``Do*Do*N*M/P`` of the paper's
    ``FL_HC``.  With ``pattern="shifted"`` the input is copied into class
    order and the output back into filter order (one copy each); with
    ``pattern="blocked"`` and ``P | N`` no activation is permuted.
``"fused"``
    The fast CPU path: the same two parts, run as a channels_last grouped
    convolution followed by one GEMM that accumulates the pointwise part
    into the convolution's output buffer; the ``"shifted"`` permutation is
    carried by the weights (input copied into class order once, for the KxK
    part only, by a strided transpose); assembled weights are cached outside
    autograd.  Returns channels_last memory.  See docs/performance.md for
    what it gains and what was tried.
``"native"``
    One direct convolution in C with exactly ``FL_HC`` multiply-adds
    (:mod:`hetconv.native`: centre taps as one dense pointwise matrix, the
    other taps on each filter's class channels only, vectorised over output
    pixels so narrow groups waste nothing; "shifted" costs no permutation).
    CPU float32 NCHW, stride 1 or 2, dilation 1, padding ``kernel // 2``, odd
    kernels; backward in C too (the input gradient of a stride-2 layer, or of
    a layer with P not dividing N, is the dense reference's).  Where it does not apply (or the
    kernel could not be compiled) the call runs what ``"auto"`` would pick
    among the other backends.  Returns NCHW memory.
``"auto"``
    Resolves to a concrete backend per call with :func:`select_backend`.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import native as _native
from . import pattern as _pattern

__all__ = ["BACKENDS", "het_conv2d", "dense_weight", "select_backend", "IntPair"]

BACKENDS: Tuple[str, ...] = ("dense", "grouped", "fused", "native")

IntPair = Union[int, Sequence[int]]

#: ``"auto"`` picks ``"fused"`` when M >= FUSED_MIN_IN and N >= FUSED_MIN_OUT, or when
#: the KxK part is a true depthwise convolution (P = M = N) with M >=
#: DEPTHWISE_MIN_CHANNELS.  See :func:`select_backend`.
FUSED_MIN_IN: int = 64
FUSED_MIN_OUT: int = 128
DEPTHWISE_MIN_CHANNELS: int = 32

#: ``"auto"`` picks ``"native"`` (NCHW float32 input, stride 1, the kernel built with
#: AVX-512) when the output has at least NATIVE_MIN_AREA pixels, or at least
#: NATIVE_MIN_AREA_NARROW on layers ``"fused"`` does not take.  See :func:`select_backend`.
NATIVE_MIN_AREA: int = 256
NATIVE_MIN_AREA_NARROW: int = 64
#: ... and, under autograd, on those narrow layers with small outputs only from this P on.
NATIVE_MIN_PART_NARROW_TRAINING: int = 4
#: Stride 2: ``"native"`` only outside autograd, for M >= FUSED_MIN_IN and outputs of at
#: least this many pixels (ResNet-50's 128- and 256-channel stride-2 layers), for M <
#: FUSED_MIN_IN from NATIVE_MIN_AREA_NARROW pixels (ResNet-56's stride-2 layers).
NATIVE_MIN_AREA_STRIDED: int = 196

#: ``"auto"`` picks the channels-last native kernel (:func:`hetconv.native.nhwc_supported`
#: layers: "shifted" with P in {2, 4, 8, 16} or a multiple of 16 (see
#: NATIVE_NHWC_BROADCAST_MAX_PART), "blocked" with 16 | N/P) when M and N are at
#: least NATIVE_NHWC_MIN_CHANNELS on channels_last input, NATIVE_NHWC_MIN_CHANNELS_NCHW on
#: NCHW input (copied to channels_last, as for ``"fused"``; on 64-channel layers the NCHW
#: kernel is as fast without the copy).  See :func:`select_backend`.
NATIVE_NHWC_MIN_CHANNELS: int = 32
NATIVE_NHWC_MIN_CHANNELS_NCHW: int = 128
#: ... and on channels_last input from this many channels on at stride 2, and outside
#: autograd when P >= NATIVE_MIN_PART_NARROW_TRAINING (ResNet-56's 16-channel layers).
NATIVE_NHWC_MIN_CHANNELS_INFERENCE: int = 16
#: ... and under autograd too on 16 -> 16 "shifted" 3x3 layers at stride 1 (padding 1) with
#: P >= NATIVE_MIN_PART_NARROW_TRAINING and outputs at least this wide: the kernel's
#: 16-channel tiles (24 pixels of a row in the forward and the input gradient, a pixel's
#: taps in few passes in the weight gradient) need rows with 24 interior pixels.
NATIVE_NHWC_NARROW_MIN_WIDTH: int = 26

#: From this P on (below depthwise), ``"auto"`` picks the NCHW native kernel at stride 1
#: when the output has at least NATIVE_MIN_AREA_HIGH_PART pixels
#: (NATIVE_MIN_AREA_HIGH_PART_INFERENCE outside autograd), whatever the channel count: the
#: KxK part is small there and the kernel's pointwise GEMM beats both oneDNN and
#: ``"fused"``.  On channels_last input it does so where the channels-last kernel does not
#: apply ("blocked" with N/P not a multiple of 16, N not a multiple of 16), copying the
#: input to NCHW, when M <= NATIVE_HIGH_PART_MAX_CHANNELS_CL, or outside autograd when
#: B*Ho*Wo <= NATIVE_HIGH_PART_MAX_ROWS_CL (the copy is cheap there).
NATIVE_HIGH_PART: int = 32
NATIVE_MIN_AREA_HIGH_PART: int = 64
NATIVE_MIN_AREA_HIGH_PART_INFERENCE: int = 49
NATIVE_HIGH_PART_MAX_CHANNELS_CL: int = 128
NATIVE_HIGH_PART_MAX_ROWS_CL: int = 256

#: "shifted" with P above this: the channels-last kernel loads 16 consecutive classes per
#: vector instead of broadcasting P floats, and a filter block's vectors are P filters apart
#: (the classes repeat every P filters), so a block has min(4, N/P) vectors.  With full
#: blocks (N >= NATIVE_NHWC_FULL_BLOCKS * P) ``"auto"`` takes it as for smaller P, except on
#: NCHW input where the NCHW kernel runs the layer (it is faster there without the copy).
#: With narrower blocks it takes it at stride 2 (channels_last input, or under autograd),
#: and at stride 1 on channels_last input under the NATIVE_HIGH_PART_* conditions (where it
#: beats the NCHW kernel and its copy); not for depthwise layers.
NATIVE_NHWC_BROADCAST_MAX_PART: int = 16
NATIVE_NHWC_FULL_BLOCKS: int = 4

#: ``"auto"``'s dense path runs NCHW (copying channels_last input) when the GEMM the
#: convolution amounts to has at most this many rows (B*Ho*Wo) per input channel:
#: oneDNN's dense convolution is up to 2x faster in NCHW there (many channels, small
#: outputs: 512 channels at 7x7 or 14x14, 256 at 4x4) and the copy is cheap.  Otherwise
#: the input's layout is kept (channels_last is faster for those shapes; NCHW input is
#: not converted, that was not measured to pay).
DENSE_NCHW_MAX_ROWS_PER_CHANNEL: int = 4

_INDEX_CACHE: dict = {}


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return int(value[0]), int(value[1])
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return value, value


def _split_shapes(weight_k: torch.Tensor, weight_1: torch.Tensor) -> Tuple[int, int, int]:
    """(N, M, P) from the two weight tensors, validating their shapes."""
    if weight_k.dim() != 4:
        raise ValueError(f"weight_k must have shape (N, M/P, Kh, Kw), got {tuple(weight_k.shape)}")
    n, m_k = weight_k.shape[:2]
    if weight_1.dim() != 2 or weight_1.shape[0] != n:
        raise ValueError(
            f"weight_1 must have shape (N, M - M/P) = ({n}, ...), got {tuple(weight_1.shape)}")
    m = m_k + weight_1.shape[1]
    if m_k < 1 or m % m_k:
        raise ValueError(
            f"weight_k has {m_k} KxK kernels per filter and weight_1 {weight_1.shape[1]} 1x1 "
            f"kernels: M/P must divide M = {m}")
    kh, kw = weight_k.shape[2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel sizes must be odd (the 1x1 kernels sit on the centre), got {(kh, kw)}")
    return n, m, m // m_k


def _memo_index(key: tuple, build):
    """``build()`` cached in ``_INDEX_CACHE`` under ``key`` (built fresh while compiling)."""
    if torch.compiler.is_compiling():
        return build()
    if key not in _INDEX_CACHE:
        # Cached index tensors are reused under autograd later: never inference tensors.
        with torch.inference_mode(False):
            _INDEX_CACHE[key] = build()
    return _INDEX_CACHE[key]


def _indices(m: int, n: int, p: int, pattern: str, device: torch.device) -> dict:
    """Index tensors for a layer shape, cached per device (fresh while compiling)."""
    return _memo_index((m, n, p, pattern, device),
                       lambda: _build_indices(m, n, p, pattern, device))


def _build_indices(m: int, n: int, p: int, pattern: str, device: torch.device) -> dict:
    cls = _pattern.class_of_filter(n, p, pattern)
    # Slot of each filter in the grouped conv's output: class-major, ceil(N/P) per group.
    per_group = -(-n // p)
    # Rank of each filter within its class, in tensor ops (no .tolist(): traceable by
    # torch.compile with fullgraph=True).
    rank = (F.one_hot(cls, p).cumsum(0) - 1).gather(1, cls[:, None]).squeeze(1)
    slot = cls * per_group + rank
    out = {
        "kxk": _pattern.kxk_channels(m, n, p, pattern).to(device),
        "pw": _pattern.pointwise_channels(m, n, p, pattern).to(device),
        "slot": slot.to(device),
        "slots": per_group * p,
        # slot == arange(N) exactly when classes are equal and already contiguous.
        "identity_slots": n % p == 0 and (pattern == "blocked" or p == 1 or p == n),
        "channel_order": _pattern.channel_order(m, p, pattern).to(device),
        "identity_channels": pattern == "blocked" or p == 1 or p == m,
        # "shifted": channel j*P + c sits at class-order position c*(M/P) + j, a transpose
        # of the (M/P, P) view of the channels; with P | N the same holds for filter
        # r*P + c and slot c*(N/P) + r.  Strided copies instead of index_select gathers.
        "channel_split": (m // p, p) if pattern == "shifted" else None,
        "slot_split": (p, n // p) if pattern == "shifted" and n % p == 0 else None,
    }
    return out


def _padding(padding: Optional[IntPair], kernel: Tuple[int, int],
             dilation: Tuple[int, int]) -> Tuple[int, int]:
    if padding is None:
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return ph, pw


def _pointwise_matrix(weight_1: torch.Tensor, m: int, idx: dict) -> torch.Tensor:
    """(N, M) 1x1 weights in natural channel order, zero on each filter's KxK channels."""
    return weight_1.new_zeros(weight_1.shape[0], m).scatter(1, idx["pw"], weight_1)


def _to_slots(t: Optional[torch.Tensor], idx: dict) -> Optional[torch.Tensor]:
    """Rows of ``t`` (one per filter) moved to their slots in the grouped conv's output."""
    if t is None or idx["identity_slots"]:
        return t
    return t.new_zeros((idx["slots"],) + tuple(t.shape[1:])).index_copy(0, idx["slot"], t)


def _dense_index(m: int, n: int, p: int, pattern: str, kernel: Tuple[int, int],
                 device: torch.device) -> torch.Tensor:
    """(N, M/P*Kh*Kw + M - M/P) positions in the flattened (N, M*Kh*Kw) dense kernel.

    Of ``cat([weight_k.flatten(1), weight_1], 1)``: each KxK tap at its channel
    and tap, each 1x1 kernel at its channel's centre tap.  Cached like :func:`_indices`.
    """
    def build():
        idx = _indices(m, n, p, pattern, device)
        kh, kw = kernel
        kk = kh * kw
        taps = torch.arange(kk, device=device)
        kxk = (idx["kxk"][:, :, None] * kk + taps).flatten(1)
        return torch.cat([kxk, idx["pw"] * kk + (kh // 2) * kw + kw // 2], 1)
    return _memo_index(("dense", m, n, p, pattern, kernel, device), build)


def _swap_split(t: torch.Tensor, split: Tuple[int, int]) -> torch.Tensor:
    """Dim 1 of ``t`` viewed as ``split = (a, b)``, transposed to (b, a): one strided copy."""
    return t.unflatten(1, split).transpose(1, 2).flatten(1, 2)


def _class_order(t: torch.Tensor, idx: dict) -> torch.Tensor:
    """Channels (dim 1) of ``t`` in class order (the grouped conv's input order)."""
    if idx["channel_split"] is not None:
        return _swap_split(t, idx["channel_split"])
    return t.index_select(1, idx["channel_order"])


def _filter_order(t: torch.Tensor, idx: dict) -> torch.Tensor:
    """Grouped-conv slots (dim 1) of ``t`` back in filter order (a copy)."""
    if idx["slot_split"] is not None:
        return _swap_split(t, idx["slot_split"])
    return t.index_select(1, idx["slot"])


def dense_weight(weight_k: torch.Tensor, weight_1: torch.Tensor,
                 pattern: str = "shifted") -> torch.Tensor:
    """The (N, M, Kh, Kw) kernel of the layer: differentiable, zero off the pattern."""
    n, m, p = _split_shapes(weight_k, weight_1)
    _pattern.validate_pattern(pattern)
    return _assemble_dense(weight_k, weight_1, pattern, n, m, p)


def _assemble_dense(weight_k, weight_1, pattern, n, m, p):
    """One scatter of all weights into a zero (N, M*Kh*Kw) buffer (backward: one gather)."""
    kh, kw = weight_k.shape[2:]
    index = _dense_index(m, n, p, pattern, (kh, kw), weight_k.device)
    src = torch.cat([weight_k.flatten(1), weight_1], 1)
    return weight_k.new_zeros(n, m * kh * kw).scatter(1, index, src).view(n, m, kh, kw)


def _dense_kernel(weight_k, weight_1, pattern, n, m, p):
    """The dense kernel for ``F.conv2d``: cached outside autograd (:func:`_cached`)."""
    if p == 1:
        if torch.is_grad_enabled() and weight_1.requires_grad:
            # weight_1 is empty, but it must still reach the graph (adding its empty sum,
            # an exact 0) so it gets a gradient: DDP fails on parameters that get none.
            return weight_k + weight_1.sum()
        return weight_k
    return _cached(_DENSE_CACHE, (weight_k, weight_1), (pattern, weight_k.device, weight_k.dtype),
                   lambda wk, w1: _assemble_dense(wk, w1, pattern, n, m, p))


def select_backend(x: torch.Tensor, weight_k: torch.Tensor, weight_1: torch.Tensor,
                   stride: Tuple[int, int] = (1, 1), dilation: Tuple[int, int] = (1, 1),
                   pattern: str = "shifted", padding: Optional[Tuple[int, int]] = None,
                   native: bool = True) -> str:
    """The concrete backend ``"auto"`` runs for this call (a documented rule).

    A pure function of the shapes, dtype, stride and pattern (no timing at run
    time, so a layer always runs the same backend).  Re-derived from
    ``benchmarks/auto_rule_sweep.py`` over the benchmark layer shapes
    (docs/performance.md, "auto rule (re-derived)"):

    * P = 1, a 1x1 kernel: ``"dense"``.
    * ``"native"`` with its channels-last kernel (vectorised over output
      channels) on the layers it supports (:func:`hetconv.native.nhwc_supported`:
      "shifted" with P in {2, 4, 8, 16} or a multiple of 16, "blocked" with
      16 | N/P) when M and N are >= :data:`NATIVE_NHWC_MIN_CHANNELS` (32) on
      channels_last input (>= :data:`NATIVE_NHWC_MIN_CHANNELS_INFERENCE` (16)
      at stride 2, or at P >= 4 outside autograd, or under autograd on 16 -> 16
      "shifted" 3x3 layers at stride 1 with outputs at least
      :data:`NATIVE_NHWC_NARROW_MIN_WIDTH` (26) wide: ResNet-56's first stage)
      or >= :data:`NATIVE_NHWC_MIN_CHANNELS_NCHW`
      (128) on NCHW input (made channels_last for it), under the kernel's
      own conditions below (stride 1 or 2 included: its input gradient is a
      transposed strided convolution in the same kernel).  Measured:
      2.0-2.9x of the best ``nn.Conv2d`` at P = 4 (theory 3x) on the wide
      VGG-16 and ResNet-50 layers in inference, 1.5-2.7x forward+backward;
      more where the padding is a large part (2x2 outputs); on ResNet-56's
      32-channel layers 1.1-2.5x in both modes, on its 16-channel layers in
      inference 1.0-1.85x (forward+backward there: 0.75-1.05x at stride 1, so
      not; on its 16->32 stride-2 layer 1.1-1.5x in the benchmark's runs 21-24,
      and 0.97-1.06x / 1.08-1.35x of the dense path at P = 2 / P >= 4 in A/Bs).
    * ... but "shifted" with P > :data:`NATIVE_NHWC_BROADCAST_MAX_PART` (16),
      not depthwise: with N >= 4P (filter blocks of 4 vectors P filters apart)
      as above, except on NCHW input that the NCHW kernel runs (next rules;
      then it does, without the copy): 3.0-6.1x on channels_last input where
      the previous rule ran ``"fused"`` (1.6-4.0x), and on NCHW input the
      kernel with the copy 3.1-8.7x where it ran ``"fused"`` (2.0-4.2x; 4x4
      and 2x2 outputs, 7x7 under autograd, 14x14 stride 2): the benchmark's
      layer shapes at P = 32 and 64.  With N < 4P (narrower blocks):
      at stride 2 on channels_last input, or under autograd (NCHW input copied,
      M, N >= 128), 1.75-3.3x where the other backends measured 0.75-2.5x;
      at stride 1 only on channels_last input where the NCHW kernel's copy
      would pay (below), which it beats there (1.2-5.1x).
    * ``"native"`` with the NCHW kernel at P >= :data:`NATIVE_HIGH_PART`
      (32) below depthwise (P < M; on channels_last input where the
      channels-last kernel does not apply), stride 1, outputs of >=
      :data:`NATIVE_MIN_AREA_HIGH_PART` (64) pixels (>=
      :data:`NATIVE_MIN_AREA_HIGH_PART_INFERENCE` (49) outside autograd):
      the KxK part is small and the kernel's pointwise product beats oneDNN
      and ``"fused"`` (1.2-5.6x of the best ``nn.Conv2d``;
      ``"fused"`` 0.8-3.5x there).  channels_last input is made NCHW for it
      when M <= :data:`NATIVE_HIGH_PART_MAX_CHANNELS_CL` (128), or outside
      autograd when B*Ho*Wo <= :data:`NATIVE_HIGH_PART_MAX_ROWS_CL` (256);
      on wider layers with more rows the copy costs more than it gains.
    * ``"native"`` (the NCHW kernel, :mod:`hetconv.native`) when it applies
      (contiguous NCHW float32 CPU input, stride 1, dilation 1, "same"
      padding, odd kernel, no autocast, not while torch.compile traces, the
      kernel built with AVX-512) and the output has >= :data:`NATIVE_MIN_AREA`
      (256) pixels, or >= :data:`NATIVE_MIN_AREA_NARROW` (64) on a layer the
      next rule does not send to ``"fused"`` (under autograd there only from
      P = :data:`NATIVE_MIN_PART_NARROW_TRAINING` (4) on).  Stride 2: only
      outside autograd (its backward uses the dense input gradient), M >= 64
      and >= :data:`NATIVE_MIN_AREA_STRIDED` (196) output pixels (1.05-2.0x
      at P >= 4 on ResNet-50's 128->128 56x56 and 256->256 28x28 stride-2
      layers), or M < 64 and >= :data:`NATIVE_MIN_AREA_NARROW` (64) pixels
      (ResNet-56's stride-2 layers: 0.84-1.51x where oneDNN's NCHW dense
      convolution runs at 0.65-0.81x of its channels_last one).  Measured
      (benchmarks/auto_rule_sweep.py): 1.2-4x of the best ``nn.Conv2d`` on
      ResNet-56's and VGG-16's 32x32/16x16 layers in inference, 1.0-2.9x
      forward+backward; on 4x4 and 2x2 outputs it loses (a 16-pixel vector
      row is mostly padding there), so those keep the rules below.
    * A dtype other than float32/bfloat16 (oneDNN does not accelerate e.g.
      float64): ``"dense"``.
    * ``"fused"`` when M >= :data:`FUSED_MIN_IN` (64) and N >=
      :data:`FUSED_MIN_OUT` (128), at any P >= 2, narrow groups (M/P = 1, 2,
      4) included: 1.4-7x at P >= 4 on most such layers (0.75-1.0x on
      ResNet-50's 128-channel stride-2 layer at 56x56), 0.7-1.45x (median
      1.1x) at P = 2, where the dense path is no better (0.5-1.0x: its kernel
      is assembled per call under autograd).
    * ``"fused"`` when the KxK part is a true depthwise convolution (P = M = N)
      with M >= :data:`DEPTHWISE_MIN_CHANNELS` (32): oneDNN's depthwise
      kernel, 1.3-3.4x.
    * Otherwise ``"dense"``: on 16-64-channel layers (ResNet-56, 64->64
      layers, when ``"native"`` does not apply) the grouped convolution plus the two permuting copies cost
      about as much as the dense convolution (``"fused"`` 0.3-1.3x).

    The dense path runs at about the speed of ``nn.Conv2d``: its kernel is
    cached outside autograd, and ``"auto"`` makes channels_last input NCHW
    when the output is small for the channel count
    (:data:`DENSE_NCHW_MAX_ROWS_PER_CHANNEL`).
    ``hetconv.optimize_for_inference`` replaces this rule by a measurement
    per layer.  A GPU path would add its own branch here.
    """
    return _select(x, weight_k, weight_1, stride, dilation, pattern, padding, native)[0]


def _select(x, weight_k, weight_1, stride, dilation, pattern, padding, native=True):
    """``(backend, channels_last)``: :func:`select_backend`'s choice, and whether the input
    is to be made channels_last for it (the channels-last native kernel)."""
    n, m, p = _split_shapes(weight_k, weight_1)
    kh, kw = weight_k.shape[2:]
    if p == 1 or kh * kw == 1:
        return "dense", False
    if padding is None:
        padding = _padding(None, (kh, kw), tuple(dilation))
    if native:
        kernel = _native_nhwc_pick(x, weight_k, n, m, p, stride, dilation, padding, pattern)
        if kernel == "channels_last":
            return "native", True
        if kernel == "nchw" or _native_nchw_pick(x, weight_k, n, m, p, stride, dilation,
                                                 padding):
            return "native", False
    return _select_rest(x, n, m, p), False


def _native_nchw_pick(x, weight_k, n, m, p, stride, dilation, padding) -> bool:
    """``select_backend``'s NCHW native branches (P >= 32, then the others)."""
    return (_native_high_part_pick(x, weight_k, n, m, p, stride, dilation, padding)
            or _native_pick(x, weight_k, n, m, p, stride, dilation, padding))


def _select_rest(x, n, m, p) -> str:
    """The rule's non-native branches."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        return "dense"
    if m >= FUSED_MIN_IN and n >= FUSED_MIN_OUT:
        return "fused"
    if p == m == n and m >= DEPTHWISE_MIN_CHANNELS:
        return "fused"
    return "dense"


def _training(x: torch.Tensor, weight_k: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight_k.requires_grad)


def _is_cl(x: torch.Tensor) -> bool:
    """channels_last input that is not also NCHW-contiguous."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _native_nhwc_pick(x, weight_k, n, m, p, stride, dilation, padding,
                      pattern) -> Optional[str]:
    """``select_backend``'s channels-last native branch (see its docstring): "channels_last"
    when it takes the layer, "nchw" when it found that the NCHW kernel does, else None."""
    if x.dim() != 4:
        return None
    cl, training, strided = _is_cl(x), _training(x, weight_k), tuple(stride) != (1, 1)
    if cl:
        least = NATIVE_NHWC_MIN_CHANNELS
        if strided or (p >= NATIVE_MIN_PART_NARROW_TRAINING and (
                not training or _narrow_tiles(x, weight_k, n, m, pattern, padding, dilation))):
            least = NATIVE_NHWC_MIN_CHANNELS_INFERENCE
    elif x.is_contiguous():
        least = NATIVE_NHWC_MIN_CHANNELS_NCHW
    else:
        return None
    if min(m, n) < least or not _native.nhwc_supported(n, m, p, pattern):
        return None
    if pattern == "shifted" and p > NATIVE_NHWC_BROADCAST_MAX_PART:
        if p == m == n:  # depthwise: oneDNN's kernel ("fused") is faster
            return None
        if n >= NATIVE_NHWC_FULL_BLOCKS * p:  # blocks of 4 vectors, as for P <= 16
            if not cl and _native_nchw_pick(x, weight_k, n, m, p, stride, dilation, padding):
                return "nchw"  # the NCHW kernel on NCHW input, without the copy
        elif strided:
            if not (cl or training):  # NCHW input outside autograd: the NCHW kernel
                return None
        elif not cl or not _high_part_cl_pays(x, weight_k, m, stride, padding, dilation,
                                              training):
            return None
    return "channels_last" if _native_runs(x, weight_k, stride, dilation, padding) else None


def _narrow_tiles(x, weight_k, n, m, pattern, padding, dilation) -> bool:
    """A stride-1 layer the channels-last kernel's 16-channel tiles run (see
    :data:`NATIVE_NHWC_NARROW_MIN_WIDTH`; and rows with every tap inside the image: at
    least 3 of them)."""
    return (m == n == 16 and pattern == "shifted" and tuple(weight_k.shape[2:]) == (3, 3)
            and tuple(padding) == (1, 1) and tuple(dilation) == (1, 1)
            and x.shape[3] >= NATIVE_NHWC_NARROW_MIN_WIDTH and x.shape[2] >= 3)


def _high_part_cl_pays(x, weight_k, m, stride, padding, dilation, training) -> bool:
    """P >= 32 on channels_last input at stride 1: a native kernel beats ``"fused"`` up to
    :data:`NATIVE_HIGH_PART_MAX_CHANNELS_CL` channels, or outside autograd up to
    :data:`NATIVE_HIGH_PART_MAX_ROWS_CL` output rows."""
    area = _out_area(x, tuple(weight_k.shape[2:]), stride, padding, dilation)
    return m <= NATIVE_HIGH_PART_MAX_CHANNELS_CL or (
        not training and x.shape[0] * area <= NATIVE_HIGH_PART_MAX_ROWS_CL)


def _native_high_part_pick(x, weight_k, n, m, p, stride, dilation, padding) -> bool:
    """``select_backend``'s NCHW native branch for P >= :data:`NATIVE_HIGH_PART`."""
    if p < NATIVE_HIGH_PART or p >= m or tuple(stride) != (1, 1) or x.dim() != 4:
        return False
    if not (x.is_contiguous() or _is_cl(x)) or not _native_runs(x, weight_k, stride, dilation,
                                                                padding):
        return False
    training = _training(x, weight_k)
    area = _out_area(x, tuple(weight_k.shape[2:]), stride, padding, dilation)
    if area < (NATIVE_MIN_AREA_HIGH_PART if training else NATIVE_MIN_AREA_HIGH_PART_INFERENCE):
        return False
    return x.is_contiguous() or _high_part_cl_pays(x, weight_k, m, stride, padding, dilation,
                                                   training)


def _native_runs(x, weight_k, stride, dilation, padding) -> bool:
    """The C kernel applies to the call and is built with AVX-512."""
    return (_native.unsupported_reason(x, weight_k, stride, padding, dilation) is None
            and _native.vectorized())


def _native_pick(x, weight_k, n, m, p, stride, dilation, padding) -> bool:
    """``select_backend``'s native branch (see its docstring)."""
    if not x.is_contiguous():
        return False
    if not _native_runs(x, weight_k, stride, dilation, padding):
        return False
    area = _out_area(x, tuple(weight_k.shape[2:]), stride, padding, dilation)
    training = _training(x, weight_k)
    if tuple(stride) != (1, 1):  # stride 2: its input gradient is the dense reference's
        least = NATIVE_MIN_AREA_STRIDED if m >= FUSED_MIN_IN else NATIVE_MIN_AREA_NARROW
        return not training and area >= least
    if area >= NATIVE_MIN_AREA:
        return True
    if area < NATIVE_MIN_AREA_NARROW or (m >= FUSED_MIN_IN and n >= FUSED_MIN_OUT):
        return False
    return not training or p >= NATIVE_MIN_PART_NARROW_TRAINING


def _out_area(x: torch.Tensor, kernel, stride, padding, dilation) -> int:
    """Ho * Wo of the convolution."""
    area = 1
    for size, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation):
        area *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    return area


def _centre_input(x: torch.Tensor, kernel: Tuple[int, int], padding: Tuple[int, int],
                  dilation: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Input and padding for a 1x1 conv that reads what the KxK centre tap reads."""
    pads = []
    for axis, (k, p, d) in enumerate(zip(kernel, padding, dilation)):
        offset = p - d * (k - 1) // 2
        if offset < 0:  # the centre tap never reaches the border: crop instead
            x = x.narrow(2 + axis, -offset, x.shape[2 + axis] + 2 * offset)
            offset = 0
        pads.append(offset)
    return x, (pads[0], pads[1])


def _grouped(x, weight_k, weight_1, bias, stride, padding, dilation, pattern, n, m, p):
    idx = _indices(m, n, p, pattern, x.device)
    kh, kw = weight_k.shape[2:]
    xg = x if idx["identity_channels"] else _class_order(x, idx)
    y = F.conv2d(xg, _to_slots(weight_k, idx), None, stride, padding, dilation, groups=p)
    # Pointwise part, in the grouped output's slot order, bias folded in.
    w1 = _to_slots(_pointwise_matrix(weight_1, m, idx), idx)
    b = _to_slots(bias, idx)
    xc, pc = _centre_input(x, (kh, kw), padding, dilation)
    y1 = F.conv2d(xc, w1[:, :, None, None], b, stride, pc)
    y = y + y1
    if not idx["identity_slots"]:
        y = _filter_order(y, idx)
    return y


# ---------------------------------------------------------------------------
# "fused": channels_last grouped KxK conv + one GEMM accumulated into its output.
# ---------------------------------------------------------------------------

_WEIGHT_CACHE = _native.weight_cache()  # weight_k -> (key, fused weights)
_DENSE_CACHE = _native.weight_cache()  # weight_k -> (key, dense kernel)
_NATIVE_CACHE = _native.weight_cache()  # weight_k -> (key, native kernel block layout)


def clear_caches(model: Optional[nn.Module] = None) -> None:
    """Forget every weight layout the backends prepared (the ``"dense"``, ``"fused"`` and
    ``"native"`` kernels' copies of the weights, the prepared calls of
    :func:`het_conv2d`) and, for ``model``'s modules, their prepared calls.

    They are rebuilt when a weight is replaced or updated in place (PyTorch's version
    counter); the one write they cannot see is one through ``.data`` (``w.data.mul_(2)``,
    ``p.data.clamp_(...)``, ``p.data.copy_(...)``: ``.data`` counts versions of its own).
    After such writes call this, or write under ``torch.no_grad()`` instead.  Models made
    by :func:`hetconv.optimize_for_inference` hold their own copy of the weights: optimize
    again after changing the original's."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    for cache in _native.WEIGHT_CACHES:
        cache.clear()
    _CALL_PLANS.clear()
    if model is not None:
        for module in model.modules():
            if isinstance(module, _native.PlanHolder):
                module.__dict__.pop("_plans", None)


def _cached(cache: WeakIdKeyDictionary, tensors: tuple, extra: tuple, build):
    """``build(*tensors)``, cached in ``cache`` while the result cannot change.

    Outside autograd (inference, ``torch.no_grad``) the result is cached per
    ``tensors[0]`` (weak reference), keyed by every tensor's identity, storage
    pointer and version counter plus ``extra``, so in-place updates,
    ``load_state_dict`` and ``.data`` replacement rebuild it.  Never while
    compiling, never from inference tensors, and the cached tensors are built
    outside inference mode (they are reused under autograd later).  Not seen: a write
    in place through ``.data`` (``w.data.mul_(...)``: ``.data`` has a version counter of
    its own); update weights under ``torch.no_grad()`` instead, or call
    :func:`clear_caches` after such writes.
    """
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    cacheable = not tracked and not torch.compiler.is_compiling() and not any(
        t is not None and t.is_inference() for t in tensors)
    if not cacheable:
        return build(*tensors)
    key = tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in tensors)
    # One entry per ``extra`` (e.g. the pattern): the same weights used with both patterns
    # (a benchmark's twin candidates) keep both packings instead of rebuilding on each switch.
    entries = cache.get(tensors[0])
    if entries is None:
        entries = cache[tensors[0]] = {}
    hit = entries.get(extra)
    # The other tensors are held weakly and compared by identity: a tensor made anew per
    # call (a parametrization's weight_1) may get a dead one's id, storage and version 0.
    if hit is not None and hit[0] == key and all(
            (r is None and t is None) or (r is not None and r() is t)
            for r, t in zip(hit[2], tensors[1:])):
        return hit[1]
    with torch.inference_mode(False):
        out = build(*(None if t is None else t.detach() for t in tensors))
    entries[extra] = (key, out, tuple(None if t is None else weakref.ref(t)
                                      for t in tensors[1:]))
    return out


def _fused_weights(weight_k: torch.Tensor, weight_1: torch.Tensor, bias: Optional[torch.Tensor],
                   pattern: str, idx: dict) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Weights in the layout the fused path wants, cached while they cannot change.

    Returns the grouped kernel in slot order ``(slots, M/P, Kh, Kw)``, the
    pointwise matrix ``(M, N)`` (input channels in natural order, filters in
    the order the GEMM writes them, zero where the filter has a KxK kernel, so
    the permutation of ``pattern="shifted"`` lives in the weights, not the
    activations) and the bias in the grouped conv's slot order (it is added by
    the conv for free).  Building them costs a few small scatters; outside
    autograd the result is cached (:func:`_cached`).
    """
    return _cached(_WEIGHT_CACHE, (weight_k, weight_1, bias),
                   (pattern, weight_k.device, weight_k.dtype),
                   lambda wk, w1, b: _assemble_fused(wk, w1, b, idx))


def _assemble_fused(weight_k, weight_1, bias, idx):
    m = weight_k.shape[1] + weight_1.shape[1]
    w1 = _pointwise_matrix(weight_1, m, idx)
    return _to_slots(weight_k, idx), w1.t(), _to_slots(bias, idx)


def _fused(x, weight_k, weight_1, bias, stride, padding, dilation, pattern, n, m, p):
    """Grouped KxK conv in NHWC, then ``out += x_centre @ W1`` in place.

    * channels_last: oneDNN's grouped convolutions are fast in NHWC and slow in
      NCHW; the pointwise part is then a plain GEMM on the (B*H*W, M) view.
    * one output buffer: the GEMM accumulates into the grouped conv's output
      (``addmm_``), no second activation tensor and no separate sum.
    * ``pattern="shifted"``: the input is copied into class order once, for
      the KxK part only; the pointwise GEMM reads the input as it is, with its
      rows permuted in the weights.  When the filter order differs from the
      grouped conv's slot order, the output is copied once into filter order
      (that copy is the GEMM's accumulation buffer).  Both copies are strided
      transposes (``index_select`` only for ``P`` not dividing ``N``).
    Costs ``FL_K + Do*Do*N*M`` MACs, like ``"grouped"``.  The result is a
    channels_last tensor (``.contiguous()`` gives NCHW memory if needed).
    """
    idx = _indices(m, n, p, pattern, x.device)
    kh, kw = weight_k.shape[2:]
    wk, w1t, b = _fused_weights(weight_k, weight_1, bias, pattern, idx)
    cl = torch.channels_last
    x = x.contiguous(memory_format=cl)
    if idx["identity_channels"]:
        xg = x
    else:  # class order for the grouped conv: one copy in NHWC memory, on the 2-D
        # (B*H*W, M) view ("shifted": a transpose of the (M/P, P) channel view).
        b_, _, h_, w_ = x.shape
        xg = _class_order(x.permute(0, 2, 3, 1).reshape(-1, m), idx)
        xg = xg.view(b_, h_, w_, m).permute(0, 3, 1, 2)
    y = F.conv2d(xg, wk, b, stride, padding, dilation, groups=p)
    y = y.contiguous(memory_format=cl)
    batch, slots, ho, wo = y.shape
    xc, pc = _centre_input(x, (kh, kw), padding, dilation)
    if pc != (0, 0):
        xc = F.pad(xc, (pc[1], pc[1], pc[0], pc[0]))
    xc = xc[:, :, ::stride[0], ::stride[1]]
    xf = xc.permute(0, 2, 3, 1).reshape(-1, m)
    yf = y.permute(0, 2, 3, 1).reshape(-1, slots)
    # Under autocast the conv returns bf16/fp16 while addmm_ (in place) is not autocast.
    xf, w1t = xf.to(yf.dtype), w1t.to(yf.dtype)
    if not idx["identity_slots"]:
        out = _filter_order(yf, idx).addmm_(xf, w1t)  # a fresh buffer: accumulate in place
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (yf, xf, w1t)):
        # In place on a view of the conv's output, autograd would copy the whole buffer
        # back (CopySlices) in the backward pass: out of place is faster when training.
        out = torch.addmm(yf, xf, w1t)
    else:
        out = yf.addmm_(xf, w1t)
    return out.view(batch, ho, wo, n).permute(0, 3, 1, 2)


def _resolve(x: torch.Tensor, weight_k: torch.Tensor, weight_1: torch.Tensor, stride: tuple,
             padding: tuple, dilation: tuple, pattern: str, backend: str, m: int,
             p: int) -> Tuple[str, torch.Tensor]:
    """The backend ``het_conv2d`` runs for this call and its input in the memory layout that
    backend is given (batched ``x``; arguments already checked)."""
    if backend == "native" and (p == 1 or _native.unsupported_reason(
            x, weight_k, stride, padding, dilation) is not None):
        backend = "auto"  # where the kernel does not apply: what "auto" picks among the rest
    if backend == "auto":
        kernel = tuple(weight_k.shape[2:])
        backend, to_cl = _select(x, weight_k, weight_1, stride, dilation, pattern, padding)
        if to_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        if backend == "dense" and x.is_contiguous(memory_format=torch.channels_last) and \
                x.shape[0] * _out_area(x, kernel, stride, padding, dilation) \
                <= DENSE_NCHW_MAX_ROWS_PER_CHANNEL * m:
            x = x.contiguous()  # see DENSE_NCHW_MAX_ROWS_PER_CHANNEL
    return backend, x


def native_plan(x: torch.Tensor, weight_k: torch.Tensor, weight_1: torch.Tensor,
                bias: Optional[torch.Tensor], stride: tuple, padding: tuple, dilation: tuple,
                pattern: str, backend: str) -> Optional["_native.ForwardPlan"]:
    """The prepared native call (:class:`hetconv.native.ForwardPlan`) that
    ``het_conv2d(x, ...)`` makes for a batched ``x`` with these (already checked) arguments,
    or None when that call does not run the native kernel or cannot be kept (autograd...)."""
    n, m, p = _split_shapes(weight_k, weight_1)
    chosen, xb = _resolve(x, weight_k, weight_1, stride, padding, dilation, pattern, backend,
                          m, p)
    if chosen != "native":
        return None
    return _native.ForwardPlan.build(xb, weight_k, weight_1, bias, pattern, False, None,
                                     stride[0])


# het_conv2d's prepared native calls: id(weight_k) -> (a weak reference to weight_k,
# {call signature: _CallPlan, or None where the call does not run the native kernel}).
_CALL_PLANS: dict = {}
#: Signatures kept per weight_k; one more starts its dict over.
CALL_PLANS_MAX = 64


class _CallPlan:
    """A :class:`hetconv.native.ForwardPlan` kept for ``het_conv2d`` calls, holding the
    weights weakly (the cache is keyed on ``weight_k`` weakly: a plan holding the weights
    would keep them alive)."""

    __slots__ = ("plan", "refs")

    def __init__(self, plan: "_native.ForwardPlan") -> None:
        _, w1, b = plan.tensors
        self.refs = (weakref.ref(w1), None if b is None else weakref.ref(b))
        plan.tensors = None
        self.plan = plan

    def run(self, x: torch.Tensor, weight_k: torch.Tensor, weight_1: torch.Tensor,
            bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The call on ``x`` (of the signature it was kept for), or None where the weights
        are not the ones it was made for, or were replaced or updated in place since."""
        plan, (r1, rb) = self.plan, self.refs
        if (r1() is not weight_1 or (None if rb is None else rb()) is not bias
                or not plan.unchanged((weight_k, weight_1, bias))):
            return None
        return plan.launch(x)


def _call_key(x: torch.Tensor, weight_k: torch.Tensor, weight_1: torch.Tensor,
              bias: Optional[torch.Tensor], *args) -> Optional[tuple]:
    """The signature under which a batched inference call of ``het_conv2d`` keeps its
    prepared native call (``args``: its other arguments as given), or None where none is
    kept: autograd recording (or a torch.func transform, forward-mode AD), compiling or
    tracing, unbatched input, unhashable arguments."""
    if (x.dim() != 4 or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or _native._recording(x, (weight_k, weight_1, bias), None)):
        return None
    key = (x.shape, x.stride(), x.dtype, x.device, weight_k.dtype,
           torch.is_autocast_enabled("cpu")) + args
    try:
        hash(key)
    except TypeError:  # e.g. a list as stride
        return None
    return key


def _call_plan(weight_k: torch.Tensor, key: tuple) -> object:
    """What is kept for ``weight_k`` and ``key``: a :class:`_CallPlan`, None (the call does
    not run the native kernel), or False (nothing)."""
    entry = _CALL_PLANS.get(id(weight_k))
    if entry is None or entry[0]() is not weight_k:
        return False
    return entry[1].get(key, False)


def _keep_call_plan(weight_k: torch.Tensor, key: tuple, plan: Optional[_CallPlan]) -> None:
    entry = _CALL_PLANS.get(id(weight_k))
    if entry is None or entry[0]() is not weight_k:
        wid = id(weight_k)

        def drop(ref, wid=wid, plans=_CALL_PLANS):
            # weight_k freed: its plans go (the id may be reused; the dict is bound here, so
            # a tensor freed while the interpreter shuts down finds it still)
            if plans.get(wid, (None,))[0] is ref:
                del plans[wid]

        entry = _CALL_PLANS[wid] = (weakref.ref(weight_k, drop), {})
    if len(entry[1]) >= CALL_PLANS_MAX:
        entry[1].clear()
    entry[1][key] = plan


def het_conv2d(x: torch.Tensor, weight_k: torch.Tensor, weight_1: torch.Tensor,
               bias: Optional[torch.Tensor] = None, stride: IntPair = 1,
               padding: Optional[IntPair] = None, dilation: IntPair = 1,
               pattern: str = "shifted", backend: str = "auto") -> torch.Tensor:
    """Heterogeneous-kernel convolution of ``x`` (B, M, H, W) or (M, H, W).

    ``weight_k`` (N, M/P, Kh, Kw) and ``weight_1`` (N, M - M/P) hold the KxK
    and 1x1 kernels in the layout of :mod:`hetconv.pattern`; P is implied by
    their shapes.  ``padding=None`` keeps the spatial size at stride 1.
    Equal, whatever ``backend``, to
    ``F.conv2d(x, dense_weight(weight_k, weight_1, pattern), bias, stride, padding, dilation)``.

    Batched inference calls (nothing recording autograd) that run the native kernel keep
    the prepared kernel call per ``weight_k`` and call signature (the weights held weakly);
    a repeated call runs it after checking that the weights are the same tensors,
    unchanged (storage and version counter), skipping the backend choice and the packing
    lookups.
    """
    key = _call_key(x, weight_k, weight_1, bias, stride, padding, dilation, pattern, backend)
    if key is not None:
        # a call of this signature seen before: the prepared native call (~30-70 us less
        # per call than the path below; batch-1 layers take 0.1-0.5 ms)
        plan = _call_plan(weight_k, key)
        if plan:
            y = plan.run(x, weight_k, weight_1, bias)
            if y is not None:
                return y
    n, m, p = _split_shapes(weight_k, weight_1)
    _pattern.validate_pattern(pattern)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if x.dim() not in (3, 4) or x.shape[-3] != m:
        raise ValueError(
            f"expected input of shape (B, {m}, H, W) or ({m}, H, W), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    stride_ = _pair(stride, "stride")
    dilation_ = _pair(dilation, "dilation")
    kernel = tuple(weight_k.shape[2:])
    padding_ = _padding(padding, kernel, dilation_)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if backend in ("auto", "native", "fused") and _native._transformed(x, weight_k, weight_1,
                                                                       bias):
        # torch.func (vmap, grad, jvp...) or forward-mode AD: the native kernel has no rule
        # for them, "fused" asks for channels_last memory that vmap cannot give
        backend = "dense"
    backend, x = _resolve(x, weight_k, weight_1, stride_, padding_, dilation_, pattern, backend,
                          m, p)
    if key is not None:
        plan = None if backend != "native" else _native.ForwardPlan.build(
            x, weight_k, weight_1, bias, pattern, False, None, stride_[0])
        if plan is not None:
            _keep_call_plan(weight_k, key, _CallPlan(plan))
            return plan.launch(x)
        if backend != "native":
            _keep_call_plan(weight_k, key, None)
    if backend == "native":
        y = _native.native_conv2d(x, weight_k, weight_1, bias, pattern, stride=stride_[0])
    elif backend == "dense" or p == 1:
        y = F.conv2d(x, _dense_kernel(weight_k, weight_1, pattern, n, m, p), bias, stride_,
                     padding_, dilation_)
    elif backend == "fused":
        y = _fused(x, weight_k, weight_1, bias, stride_, padding_, dilation_, pattern, n, m, p)
    else:
        y = _grouped(x, weight_k, weight_1, bias, stride_, padding_, dilation_, pattern, n, m, p)
    return y.squeeze(0) if unbatched else y
