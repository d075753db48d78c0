"""``HetConv2d``: the heterogeneous-kernel convolution as an ``nn.Module``."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import functional as HF
from .. import pattern as _pattern
from ..native import PlanHolder

__all__ = ["HetConv2d"]


def _check_input(x: torch.Tensor, in_channels: int) -> None:
    if x.dim() not in (3, 4) or x.shape[-3] != in_channels:
        raise ValueError(
            f"HetConv2d expected input of shape (B, {in_channels}, H, W) or "
            f"({in_channels}, H, W), got {tuple(x.shape)}")


def het_conv2d_call(x: torch.Tensor, weight_k: torch.Tensor, weight_1: torch.Tensor,
                    bias: Optional[torch.Tensor], in_channels: int, stride: Tuple[int, int],
                    padding: Tuple[int, int], dilation: Tuple[int, int], pattern: str,
                    backend: str) -> torch.Tensor:
    """What ``HetConv2d.forward`` computes, as one function of its tensors and settings.

    ``torch.fx.symbolic_trace`` of a model records each HetConv2d as one call of this
    function (it is ``torch.fx.wrap``-ed): the layer's backend choice depends on the input's
    shape, which symbolic tracing cannot branch on."""
    _check_input(x, in_channels)
    return HF.het_conv2d(x, weight_k, weight_1, bias, stride, padding, dilation, pattern,
                         backend)


torch.fx.wrap("het_conv2d_call")


class HetConv2d(PlanHolder, nn.Module):
    """Heterogeneous-kernel convolution (Singh et al., CVPR 2019).

    Each of the ``out_channels`` filters has ``in_channels / P`` KxK kernels and
    ``in_channels - in_channels / P`` 1x1 kernels (on the KxK centre), placed
    by ``pattern`` (see :mod:`hetconv.pattern`).  ``part=1`` is exactly
    ``nn.Conv2d``; ``part="C"`` is the paper's "PC" (one KxK kernel per filter).

    Args:
        in_channels: M, input channels.
        out_channels: N, filters (any positive int).
        kernel_size: K, odd int or pair of odd ints.
        stride, dilation: int or pair, as in ``nn.Conv2d``.
        padding: int or pair; ``None`` keeps the spatial size at stride 1.
        bias: add a learnable bias.
        part: P, an int dividing ``in_channels`` or ``"C"`` (P = in_channels).
        pattern: ``"shifted"`` (the paper's Figure 3) or ``"blocked"``.
        backend: ``"auto"`` or one of :data:`hetconv.BACKENDS`; all exact.
        padding_mode: only ``"zeros"`` is supported.

    Parameters (no redundancy): ``weight_k`` (N, M/P, Kh, Kw) and ``weight_1``
    (N, M - M/P), plus ``bias`` (N,) when asked.
    """

    __constants__ = ["in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "part", "pattern", "backend"]

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 padding=None, dilation=1, bias: bool = False, part: _pattern.Part = 1,
                 pattern: str = "shifted", backend: str = "auto", padding_mode: str = "zeros",
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        kernel = HF._pair(kernel_size, "kernel_size")
        if any(k < 1 or k % 2 == 0 for k in kernel):
            raise ValueError(
                f"kernel_size must be odd and >= 1 (the 1x1 kernels sit on the KxK centre), "
                f"got {kernel_size!r}")
        stride_ = HF._pair(stride, "stride")
        dilation_ = HF._pair(dilation, "dilation")
        for name, value in (("stride", stride_), ("dilation", dilation_)):
            if min(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if isinstance(padding, str):
            raise ValueError(
                f"padding must be None (keep the size at stride 1), an int or a pair, got {padding!r}")
        padding_ = HF._padding(padding, kernel, dilation_)
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros' (the only mode supported), got {padding_mode!r}")
        _pattern.validate_pattern(pattern)
        if backend != "auto" and backend not in HF.BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {HF.BACKENDS}, got {backend!r}")
        p = _pattern.resolve_part(part, in_channels)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size: Tuple[int, int] = kernel
        self.stride: Tuple[int, int] = stride_
        self.padding: Tuple[int, int] = padding_
        self.dilation: Tuple[int, int] = dilation_
        self.part = p
        self.part_spec = part  # as given: an int or "C"
        self.pattern = pattern
        self.backend = backend
        self.padding_mode = padding_mode
        factory = {"device": device, "dtype": dtype}
        m_k = in_channels // p
        self.weight_k = nn.Parameter(torch.empty(out_channels, m_k, *kernel, **factory))
        self.weight_1 = nn.Parameter(torch.empty(out_channels, in_channels - m_k, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # -- construction -----------------------------------------------------
    @property
    def fan_in(self) -> int:
        """True fan-in of a filter: M/P*Kh*Kw + M - M/P."""
        kh, kw = self.kernel_size
        m_k = self.in_channels // self.part
        return m_k * kh * kw + self.in_channels - m_k

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s rule (kaiming-uniform, a=sqrt(5)) with the true fan-in.

        Weights and bias are drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)); with
        ``part=1`` the draws are identical to ``nn.Conv2d``'s for the same seed.
        """
        bound = 1.0 / math.sqrt(self.fan_in)
        with torch.no_grad():
            self.weight_k.uniform_(-bound, bound)
            self.weight_1.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, part: _pattern.Part, pattern: str = "shifted",
                    backend: str = "auto") -> "HetConv2d":
        """A HetConv2d initialised from a dense ``nn.Conv2d``.

        KxK kernels are copied where :meth:`kernel_mask` is True, the centre tap
        elsewhere; bias, stride, padding, dilation, device and dtype carry over.
        With ``part=1`` the result computes exactly what ``conv`` computes.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"conv must have groups=1, got groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv must have padding_mode='zeros', got {conv.padding_mode!r}")
        kh, kw = conv.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"conv must have an odd kernel size, got {conv.kernel_size}")
        padding = conv.padding
        if isinstance(padding, str):  # 'same' / 'valid' (only legal at stride 1)
            padding = (0, 0) if padding == "valid" else tuple(
                d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    tuple(padding), conv.dilation, bias=conv.bias is not None, part=part,
                    pattern=pattern, backend=backend, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            idx = HF._indices(layer.in_channels, layer.out_channels, layer.part, pattern, w.device)
            layer.weight_k.copy_(torch.gather(
                w, 1, idx["kxk"][:, :, None, None].expand_as(layer.weight_k)))
            layer.weight_1.copy_(torch.gather(w[:, :, kh // 2, kw // 2], 1, idx["pw"]))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.train(conv.training)
        return layer

    # -- state dict -----------------------------------------------------------
    # The pattern places the KxK kernels; "shifted" and "blocked" weights have the same
    # shapes, so a state dict of one loads into the other without complaint and computes
    # another function.  Each state dict records its layers' patterns in its metadata (no
    # extra keys: state dicts of other versions and tools load as before) and loading one
    # saved with another pattern is an error.
    _PATTERN_KEY = "hetconv_pattern"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        meta = getattr(destination, "_metadata", None)
        if meta is not None and prefix[:-1] in meta:  # this module's entry, made just before
            meta[prefix[:-1]][self._PATTERN_KEY] = self.pattern

    def _same_placement(self, pattern) -> bool:
        """Whether ``pattern`` puts this layer's weights where its own pattern does (at P = 1
        and P = M the two patterns coincide)."""
        if pattern not in _pattern.PATTERNS:
            return False
        m, n, p = self.in_channels, self.out_channels, self.part
        return all(torch.equal(f(m, n, p, pattern), f(m, n, p, self.pattern))
                   for f in (_pattern.kxk_channels, _pattern.pointwise_channels))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        saved = (local_metadata or {}).get(self._PATTERN_KEY)
        if saved is not None and saved != self.pattern and not self._same_placement(saved):
            error_msgs.append(
                f"{prefix[:-1] or 'HetConv2d'}: the state dict was saved from a layer with "
                f"pattern={saved!r}, this one has pattern={self.pattern!r}: the weights have "
                f"the same shapes but place the KxK kernels differently, so the layer would "
                f"compute another function; build it with pattern={saved!r}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    # -- views of the layer -------------------------------------------------
    def kernel_mask(self) -> torch.Tensor:
        """Bool (N, M): True where the filter has a KxK kernel."""
        return _pattern.kernel_mask(self.in_channels, self.out_channels, self.part, self.pattern)

    def dense_weight(self) -> torch.Tensor:
        """Differentiable (N, M, Kh, Kw) kernel: ``F.conv2d`` with it equals ``self(x)``."""
        return HF.dense_weight(self.weight_k, self.weight_1, self.pattern)

    def to_conv2d(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the dense weight: same outputs, dense cost."""
        w = self.weight_k
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, bias=self.bias is not None,
                         device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Spatial output size for an input of ``height`` x ``width``."""
        return tuple(
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip((height, width), self.padding, self.dilation,
                                      self.kernel_size, self.stride))

    # -- forward ------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):  # fx symbolic tracing: one node for the layer
            return het_conv2d_call(x, self.weight_k, self.weight_1, self.bias,
                                   self.in_channels, self.stride, self.padding, self.dilation,
                                   self.pattern, self.backend)
        _check_input(x, self.in_channels)
        if x.dim() == 4 and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            y = self._planned(x)
            if y is not None:
                return y
        return HF.het_conv2d(x, self.weight_k, self.weight_1, self.bias, self.stride,
                             self.padding, self.dilation, self.pattern, self.backend)

    def _planned(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Inference calls that run the native kernel: the call prepared on the first call of
        each input signature (:class:`hetconv.native.ForwardPlan`), which skips the backend
        choice and the packing lookups (~30 us per call; batch-1 models call many small
        layers).  None: run the full path (autograd, another backend, a changed weight...)."""
        weight_k, weight_1, bias = self.weight_k, self.weight_1, self.bias
        key = (tuple(x.shape), x.dtype, x.device, HF._native._is_channels_last(x), self.backend,
               self.pattern, self.stride, self.padding, self.dilation, weight_k.dtype,
               torch.is_autocast_enabled("cpu"))
        plan = self._plan_for(key)
        if plan is None:  # this signature does not run the native kernel
            return None
        if plan is not False:
            y = plan.run(x, None, weight_k, weight_1, bias)
            if y is not None:
                return y
        if HF._native._recording(x, (weight_k, weight_1, bias), None) or key[-1] \
                or not x.is_floating_point():
            return None  # nothing to prepare (and no verdict to remember) for this call
        plan = HF.native_plan(x, weight_k, weight_1, bias, self.stride, self.padding,
                              self.dilation, self.pattern, self.backend)
        self._keep_plan(key, plan)
        return None if plan is None else plan.run(x, None, weight_k, weight_1, bias)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        s += ", part='C'" if isinstance(self.part_spec, str) else f", part={self.part}"
        s += f", pattern={self.pattern}, backend={self.backend}"
        return s
