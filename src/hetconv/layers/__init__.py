"""Layers: HetConv2d and the modules the paper compares it with."""

from .baselines import DepthwisePointwiseConv2d, GroupPointwiseConv2d
from .hetconv import HetConv2d
from .pool import MaxPool2x2, max_pool_2x2
from .se import SqueezeExcite

__all__ = ["DepthwisePointwiseConv2d", "GroupPointwiseConv2d", "HetConv2d", "MaxPool2x2",
           "SqueezeExcite", "max_pool_2x2"]
