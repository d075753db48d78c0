"""Model registry and the paper's architectures (CIFAR and ImageNet)."""

from . import cifar, imagenet  # noqa: F401  (registers the models)
from .registry import create_model, is_model, list_models, parse_model_name, register_model

__all__ = ["create_model", "is_model", "list_models", "parse_model_name", "register_model"]
