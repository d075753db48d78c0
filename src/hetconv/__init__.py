"""hetconv: heterogeneous-kernel convolutions (HetConv, CVPR 2019) for PyTorch."""

from . import functional, pattern
from .functional import BACKENDS
from .layers import HetConv2d
from .pattern import kernel_mask

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "HetConv2d",
    "functional",
    "kernel_mask",
    "pattern",
    "__version__",
]
