"""Layers: HetConv2d and the modules the paper compares it with."""

from .baselines import DepthwisePointwiseConv2d, GroupPointwiseConv2d
from .hetconv import HetConv2d
from .se import SqueezeExcite

__all__ = ["DepthwisePointwiseConv2d", "GroupPointwiseConv2d", "HetConv2d", "SqueezeExcite"]
