"""hetconv: heterogeneous-kernel convolutions (HetConv, CVPR 2019) for PyTorch."""

from . import functional, native, pattern
from .functional import BACKENDS, clear_caches
from .complexity import profile
from .convert import convert
from .deploy import export_onnx, fold_batchnorm, optimize_for_inference
from .permute import absorb_permutations
from .layers import DepthwisePointwiseConv2d, GroupPointwiseConv2d, HetConv2d, SqueezeExcite
from .models import create_model, list_models, register_model
from .pattern import kernel_mask
from .train import TrainConfig, fit

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DepthwisePointwiseConv2d",
    "GroupPointwiseConv2d",
    "HetConv2d",
    "SqueezeExcite",
    "TrainConfig",
    "absorb_permutations",
    "clear_caches",
    "convert",
    "create_model",
    "export_onnx",
    "fit",
    "fold_batchnorm",
    "list_models",
    "optimize_for_inference",
    "profile",
    "register_model",
    "functional",
    "native",
    "kernel_mask",
    "pattern",
    "__version__",
]
