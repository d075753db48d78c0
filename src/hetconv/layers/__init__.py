"""Layers: HetConv2d and the modules the paper compares it with."""

from .hetconv import HetConv2d

__all__ = ["HetConv2d"]
