"""Model registry and the paper's architectures (CIFAR and ImageNet)."""

from . import cifar, imagenet  # noqa: F401  (registers the models)
from .registry import (AllDenseWarning, create_model, default_input_size, is_model,
                       list_models, parse_model_name, profile_model, register_model)

__all__ = ["AllDenseWarning", "create_model", "default_input_size", "is_model", "list_models",
           "parse_model_name", "profile_model", "register_model"]
