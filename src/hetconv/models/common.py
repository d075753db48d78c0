"""Building blocks shared by the architectures: the conv factory and option checks."""

from __future__ import annotations

from typing import Optional, Union

import torch.nn as nn

from ..convert import INDIVISIBLE, layer_part
from ..layers import DepthwisePointwiseConv2d, GroupPointwiseConv2d, HetConv2d, SqueezeExcite
from ..pattern import validate_pattern

__all__ = ["CONVS", "ConvSpec", "check_se", "check_width", "conv_unit", "scaled"]

CONVS = ("het", "gwc_pwc", "dwc_pwc")


class ConvSpec:
    """How an architecture's replaceable KxK convolutions are built.

    ``conv="het"`` with ``part`` None or 1 is a standard ``nn.Conv2d``; any
    other part a :class:`HetConv2d` (part per layer by
    :func:`hetconv.convert.layer_part`, so ``indivisible`` decides what a part
    that does not divide a layer's in_channels does).  ``"gwc_pwc"`` /
    ``"dwc_pwc"`` are the paper's two-layer baselines (``groups`` for GWC).
    """

    def __init__(self, conv: str = "het", part: Optional[Union[int, str]] = None,
                 groups: Optional[int] = None, pattern: str = "shifted",
                 indivisible: str = "skip") -> None:
        if conv not in CONVS:
            raise ValueError(f"conv must be one of {CONVS}, got {conv!r}")
        if conv != "het" and part not in (None, 1):
            raise ValueError(f"part={part!r} only applies to conv='het', got conv={conv!r}")
        if conv == "gwc_pwc":
            if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
                raise ValueError(f"conv='gwc_pwc' needs groups, a positive int, got {groups!r}")
        elif groups is not None:
            raise ValueError(f"groups only applies to conv='gwc_pwc', got conv={conv!r}")
        if part is not None:
            layer_part(part, 1 if isinstance(part, str) else part)  # validates the value
        validate_pattern(pattern)
        if indivisible not in INDIVISIBLE:
            raise ValueError(f"indivisible must be one of {INDIVISIBLE}, got {indivisible!r}")
        self.conv, self.part, self.groups = conv, part, groups
        self.pattern, self.indivisible = pattern, indivisible

    def __call__(self, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
        """One replaceable 3x3 convolution (padding 1, no bias: BN follows)."""
        if self.conv == "gwc_pwc":
            return GroupPointwiseConv2d(in_channels, out_channels, 3, stride, groups=self.groups)
        if self.conv == "dwc_pwc":
            return DepthwisePointwiseConv2d(in_channels, out_channels, 3, stride)
        part = None
        if self.part is not None:
            part, _ = layer_part(self.part, in_channels, self.indivisible)
        if part is None or part == 1:
            return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        return HetConv2d(in_channels, out_channels, 3, stride, 1, part=part, pattern=self.pattern)


def conv_unit(conv: nn.Module, out_channels: int, se: bool, relu: bool = True) -> nn.Sequential:
    """``conv -> BN -> ReLU -> [SE]``: the paper puts SE (reduction 8) after each conv."""
    layers = [conv, nn.BatchNorm2d(out_channels)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    if se:
        layers.append(SqueezeExcite(out_channels, 8))
    return nn.Sequential(*layers)


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, int(round(channels * width)))


def check_se(se) -> bool:
    """``se`` must be a bool: a string such as ``"False"`` (``--model-arg se=False``) is
    truthy and would silently add the SE blocks."""
    if not isinstance(se, bool):
        raise ValueError(f"se must be a bool (True or False), got {se!r}")
    return se


def check_width(width) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    return float(width)
