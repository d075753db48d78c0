"""Kernel placement and cost formulas of HetConv (Singh et al., CVPR 2019).

This module is the single source of truth for *which* kernels of a HetConv
layer are KxK and which are 1x1, and for what the layer costs on paper.  It
knows nothing about ``nn.Module``; every other part of the package builds on it.

Placement
---------
A HetConv layer with ``M`` input channels, ``N`` filters and part ``P`` gives
each filter ``M/P`` KxK kernels and ``M - M/P`` 1x1 kernels.  Input channel
``i`` belongs to *channel class* ``class_of_channel(i)`` and filter ``n`` to
*filter class* ``class_of_filter(n)``; a filter has KxK kernels exactly on the
input channels of its own class.

``"shifted"`` (the paper's Figure 3)
    channel ``i`` is in class ``i mod P``, filter ``n`` in class ``n mod P``:
    filter ``n`` has KxK kernels at channels ``i`` with ``(i - n) mod P == 0``.
``"blocked"``
    channel ``i`` is in class ``i // (M/P)`` (contiguous blocks); filters are
    split into ``P`` contiguous blocks with the same class sizes as
    ``"shifted"`` (the first ``N mod P`` blocks one filter larger).  It is the
    shifted pattern with input channels and filters permuted, so both span the
    same function class; ``"blocked"`` is cheaper to execute because no
    activation needs permuting.

Weight layout (no redundancy)
-----------------------------
``weight_k`` has shape ``(N, M/P, Kh, Kw)``: ``weight_k[n, j]`` is filter
``n``'s ``j``-th KxK kernel, on its ``j``-th KxK channel in increasing channel
order (:func:`kxk_channels`).  ``weight_1`` has shape ``(N, M - M/P)``:
``weight_1[n, t]`` is filter ``n``'s ``t``-th 1x1 kernel, on its ``t``-th
remaining channel in increasing order (:func:`pointwise_channels`).
"""

from __future__ import annotations

from typing import Union

import torch

__all__ = [
    "PATTERNS",
    "Part",
    "resolve_part",
    "validate_pattern",
    "class_of_filter",
    "class_of_channel",
    "kernel_mask",
    "kxk_channels",
    "pointwise_channels",
    "filter_order",
    "channel_order",
    "hetconv_macs",
    "hetconv_params",
    "standard_macs",
    "hetconv_ratio",
    "dwc_pwc_ratio",
    "gwc_pwc_ratio",
    "speedup",
]

PATTERNS = ("shifted", "blocked")

Part = Union[int, str]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_part(part: Part, in_channels: int) -> int:
    """Return the integer P for ``part`` (an int, or ``"C"`` for P = in_channels).

    Raises ``TypeError``/``ValueError`` naming ``part`` when it is not an int
    >= 1 dividing ``in_channels`` and not the string ``"C"``.
    """
    if not _is_int(in_channels) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if isinstance(part, str):
        if part.upper() == "C":
            return in_channels
        raise ValueError(
            f"part must be a positive int dividing in_channels or the string 'C' "
            f"(P = in_channels), got {part!r}"
        )
    if not _is_int(part):
        raise TypeError(
            f"part must be an int or the string 'C', got {type(part).__name__} {part!r}"
        )
    if part < 1:
        raise ValueError(f"part must be >= 1, got {part}")
    if in_channels % part:
        divisors = [d for d in range(1, in_channels + 1) if in_channels % d == 0]
        raise ValueError(
            f"part={part} must divide in_channels={in_channels}; "
            f"allowed values: {divisors} or 'C'"
        )
    return part


def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is one of :data:`PATTERNS`, else raise ``ValueError``."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    return pattern


def _class_sizes(n: int, part: int) -> list[int]:
    """Filters per class: the first ``n mod part`` classes get one more."""
    q, r = divmod(n, part)
    return [q + 1 if c < r else q for c in range(part)]


def class_of_filter(out_channels: int, part: int, pattern: str = "shifted") -> torch.Tensor:
    """Long tensor (N,): the channel class whose inputs filter ``n`` sees as KxK."""
    validate_pattern(pattern)
    n = torch.arange(out_channels)
    if pattern == "shifted":
        return n % part
    # blocks of _class_sizes: the first r classes q + 1 filters each, the others q.  In
    # closed form (repeat_interleave by a tensor has a data-dependent size: torch.compile
    # broke its graph at every "blocked" layer)
    q, r = divmod(out_channels, part)
    big = r * (q + 1)
    return torch.where(n < big, n // (q + 1), r + (n - big) // max(q, 1))


def class_of_channel(in_channels: int, part: int, pattern: str = "shifted") -> torch.Tensor:
    """Long tensor (M,): the class of each input channel."""
    validate_pattern(pattern)
    i = torch.arange(in_channels)
    if pattern == "shifted":
        return i % part
    return i // (in_channels // part)


def kernel_mask(in_channels: int, out_channels: int, part: Part = 1,
                pattern: str = "shifted") -> torch.Tensor:
    """Bool tensor (out_channels, in_channels): True where the filter has a KxK kernel."""
    if not _is_int(out_channels) or out_channels < 1:
        raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
    p = resolve_part(part, in_channels)
    return (class_of_filter(out_channels, p, pattern)[:, None]
            == class_of_channel(in_channels, p, pattern)[None, :])


def kxk_channels(in_channels: int, out_channels: int, part: int,
                 pattern: str = "shifted") -> torch.Tensor:
    """Long tensor (N, M/P): the input channel of each of ``weight_k``'s kernels."""
    m_k = in_channels // part
    c = class_of_filter(out_channels, part, pattern)[:, None]
    j = torch.arange(m_k)[None, :]
    if pattern == "shifted":
        return c + j * part
    return c * m_k + j


def pointwise_channels(in_channels: int, out_channels: int, part: int,
                       pattern: str = "shifted") -> torch.Tensor:
    """Long tensor (N, M - M/P): the input channel of each of ``weight_1``'s kernels."""
    m_k = in_channels // part
    c = class_of_filter(out_channels, part, pattern)[:, None]
    t = torch.arange(in_channels - m_k)[None, :]
    if pattern == "shifted":
        # Channel j*P + r, r running over the P - 1 classes other than c.
        j, r = t // max(part - 1, 1), t % max(part - 1, 1)
        return j * part + r + (r >= c).long()
    return t + (t >= c * m_k).long() * m_k


def filter_order(out_channels: int, part: int, pattern: str = "shifted") -> torch.Tensor:
    """Filters sorted by class (stable): the output order of a grouped KxK conv."""
    return torch.argsort(class_of_filter(out_channels, part, pattern), stable=True)


def channel_order(in_channels: int, part: int, pattern: str = "shifted") -> torch.Tensor:
    """Input channels sorted by class (stable): the input order a grouped conv needs."""
    return torch.argsort(class_of_channel(in_channels, part, pattern), stable=True)


# ---------------------------------------------------------------------------
# Cost formulas (paper Eq. 1-12).  MACs = multiply-accumulates ("FLOPs" in the
# paper's tables).  ``out_size`` is Do (square) or (Ho, Wo).
# ---------------------------------------------------------------------------

def _area(out_size) -> int:
    if isinstance(out_size, (tuple, list)):
        h, w = out_size
        return int(h) * int(w)
    return int(out_size) * int(out_size)


def _kk(kernel_size) -> int:
    if isinstance(kernel_size, (tuple, list)):
        return int(kernel_size[0]) * int(kernel_size[1])
    return int(kernel_size) ** 2


def standard_macs(in_channels: int, out_channels: int, kernel_size=3, out_size=1) -> int:
    """FL_S = Do*Do*M*N*K*K (Eq. 1)."""
    return _area(out_size) * in_channels * out_channels * _kk(kernel_size)


def hetconv_macs(in_channels: int, out_channels: int, kernel_size=3, out_size=1,
                 part: Part = 1) -> int:
    """FL_HC = FL_K + FL_1 = Do*Do*N*(M/P*K*K + M - M/P) (Eq. 2-4)."""
    p = resolve_part(part, in_channels)
    m_k = in_channels // p
    return _area(out_size) * out_channels * (m_k * _kk(kernel_size) + in_channels - m_k)


def hetconv_params(in_channels: int, out_channels: int, kernel_size=3, part: Part = 1,
                   bias: bool = False) -> int:
    """N*(M/P*K*K + M - M/P) (+ N with bias)."""
    p = resolve_part(part, in_channels)
    m_k = in_channels // p
    return out_channels * (m_k * _kk(kernel_size) + in_channels - m_k + int(bias))


def hetconv_ratio(part: float, kernel_size: int = 3) -> float:
    """FL_HC / FL_S = 1/P + (1 - 1/P)/K^2 (Eq. 5)."""
    if part < 1:
        raise ValueError(f"part must be >= 1, got {part}")
    k2 = _kk(kernel_size)
    return 1.0 / part + (1.0 - 1.0 / part) / k2


def dwc_pwc_ratio(out_channels: int, kernel_size: int = 3) -> float:
    """(DWC + PWC) / FL_S = 1/N + 1/K^2 (Eq. 8)."""
    if out_channels < 1:
        raise ValueError(f"out_channels must be >= 1, got {out_channels}")
    return 1.0 / out_channels + 1.0 / _kk(kernel_size)


def gwc_pwc_ratio(groups: int, kernel_size: int = 3) -> float:
    """(GWC(G) + PWC) / FL_S = 1/G + 1/K^2 (Eq. 11)."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    return 1.0 / groups + 1.0 / _kk(kernel_size)


def speedup(part: float, kernel_size: int = 3) -> float:
    """Theoretical HetConv speedup over a standard conv: 1 / hetconv_ratio (Fig. 5)."""
    return 1.0 / hetconv_ratio(part, kernel_size)
