"""The two-layer factorisations the paper compares HetConv with (its "latency one" baselines).

``GroupPointwiseConv2d`` is the paper's ``GWC + PWC``: an M -> M groupwise KxK
convolution with G groups, BatchNorm, ReLU, then an M -> N pointwise
convolution (the MobileNet arrangement).  ``DepthwisePointwiseConv2d`` is the
same with G = M (``DWC + PWC``).  Cost per output position:
``M*M*K*K/G + M*N`` MACs.  The paper's cost list writes the groupwise part as
``M*N*K*K/G`` (an M -> N groupwise conv); the two agree where M = N, and with M -> M,
as here, the models' totals match Table 1's GWC / DWC rows
(``tests/test_paper_tables.py``).  The block does not end in BatchNorm /
ReLU: like a plain convolution, what follows it is up to the model.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import functional as HF

__all__ = ["GroupPointwiseConv2d", "DepthwisePointwiseConv2d"]


class GroupPointwiseConv2d(nn.Module):
    """Groupwise KxK conv (M -> M, ``groups`` groups) + BN + ReLU + pointwise conv (M -> N).

    Args:
        in_channels: M.
        out_channels: N.
        kernel_size, stride, dilation: of the groupwise conv (the pointwise one is 1x1, stride 1).
        padding: ``None`` keeps the size at stride 1.
        groups: G, must divide ``in_channels``.
        bias: bias on the pointwise conv (the groupwise one is followed by BN and has none).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 padding=None, dilation=1, groups: int = 1, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("groups", groups)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if in_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels}")
        kernel = HF._pair(kernel_size, "kernel_size")
        dilation_ = HF._pair(dilation, "dilation")
        padding_ = HF._padding(padding, kernel, dilation_)
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.spatial = nn.Conv2d(in_channels, in_channels, kernel, stride, padding_, dilation_,
                                 groups=groups, bias=False, **factory)
        self.bn = nn.BatchNorm2d(in_channels, **factory)
        self.relu = nn.ReLU(inplace=True)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.relu(self.bn(self.spatial(x))))


class DepthwisePointwiseConv2d(GroupPointwiseConv2d):
    """Depthwise KxK conv + BN + ReLU + pointwise conv: ``GroupPointwiseConv2d`` with G = M."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 padding=None, dilation=1, bias: bool = False, device=None, dtype=None) -> None:
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups=in_channels, bias=bias, device=device, dtype=dtype)
