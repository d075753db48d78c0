"""Model registry, timm-style: ``register_model``, ``create_model``, ``list_models``.

Architectures register under a base name (``vgg16_cifar``).  The paper's
variant names resolve by parsing suffixes after a registered base name:

=================  =====================================
suffix             keyword arguments
=================  =====================================
``_p<int>``        ``part=<int>``
``_pc``            ``part="C"`` (P = in_channels per layer)
``_se``            ``se=True``
``_gwc<int>_pwc``  ``conv="gwc_pwc", groups=<int>``
``_dwc_pwc``       ``conv="dwc_pwc"``
=================  =====================================

so ``create_model("vgg16_cifar_p4_se")`` is
``create_model("vgg16_cifar", part=4, se=True)``.  A keyword given both in the
name and as an argument is an error (never silently overridden).
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch.nn as nn

__all__ = ["register_model", "create_model", "list_models", "parse_model_name", "is_model",
           "default_input_size", "profile_model", "AllDenseWarning"]


class AllDenseWarning(UserWarning):
    """``create_model`` was asked for a HetConv part P that divides no layer's input
    channels: every layer stayed a dense convolution."""

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}
_VARIANTS: Dict[str, Tuple[str, ...]] = {}
_INPUT_SIZE: Dict[str, Tuple[int, int, int]] = {}

_SUFFIX = re.compile(r"_(?:p(?P<part>\d+|c)|(?P<se>se)|gwc(?P<groups>\d+)_pwc|(?P<dwc>dwc_pwc))")


def register_model(fn: Optional[Callable[..., nn.Module]] = None, *, name: Optional[str] = None,
                   variants: Iterable[str] = (), input_size: Tuple[int, int, int] = (3, 224, 224)):
    """Register a builder ``fn(*, num_classes, in_chans, **kwargs) -> nn.Module``.

    Usable as ``@register_model`` or ``@register_model(name=..., variants=[...])``.
    ``variants`` are suffixes (``"p4_se"``) whose full names ``list_models``
    lists next to the base name; any parseable suffix resolves, listed or not.
    ``input_size`` is the (C, H, W) the architecture is usually fed (what
    ``hetconv profile`` and the paper's tables count at).
    """
    def deco(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
            raise ValueError(f"model name must be lower-case letters, digits and '_', got {key!r}")
        if key in _REGISTRY and _REGISTRY[key] is not f:
            raise ValueError(f"a model named {key!r} is already registered")
        _REGISTRY[key] = f
        _VARIANTS[key] = tuple(variants)
        _INPUT_SIZE[key] = tuple(input_size)
        return f

    return deco(fn) if fn is not None else deco


def _parse_suffix(rest: str) -> Optional[dict]:
    kwargs: dict = {}
    pos = 0
    while pos < len(rest):
        m = _SUFFIX.match(rest, pos)
        if m is None:
            return None
        if m.group("part") is not None:
            key, value = "part", ("C" if m.group("part") == "c" else int(m.group("part")))
        elif m.group("se"):
            key, value = "se", True
        elif m.group("groups") is not None:
            if "conv" in kwargs:
                return None
            kwargs["conv"] = "gwc_pwc"
            key, value = "groups", int(m.group("groups"))
        else:
            key, value = "conv", "dwc_pwc"
        if key in kwargs:
            return None
        kwargs[key] = value
        pos = m.end()
    return kwargs


def parse_model_name(name: str) -> Tuple[str, dict]:
    """``"vgg16_cifar_p4_se"`` -> ``("vgg16_cifar", {"part": 4, "se": True})``.

    Raises ``ValueError`` listing close names when ``name`` is not a
    registered model nor one followed by valid suffixes.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key in _REGISTRY:
        return key, {}
    for base in sorted(_REGISTRY, key=len, reverse=True):
        if key.startswith(base + "_"):
            kwargs = _parse_suffix(key[len(base):])
            if kwargs is not None:
                return base, kwargs
    close = [n for n in _REGISTRY if n.split("_")[0] == key.split("_")[0]] or sorted(_REGISTRY)
    raise ValueError(
        f"unknown model {name!r}; registered: {close} (suffixes: _p<int>, _pc, _se, "
        f"_gwc<int>_pwc, _dwc_pwc)")


def requested_part(name: str, kwargs: Optional[dict] = None):
    """The HetConv part P that ``create_model(name, **kwargs)`` asks for (``kwargs``'
    ``part``, else the name's ``_p<P>`` / ``_pc`` suffix), or None for a dense model."""
    part = (kwargs or {}).get("part", parse_model_name(name)[1].get("part"))
    return None if part in (None, 1) else part


def all_dense_warning(name: str, kwargs: Optional[dict], hetconv_layers: int) -> Optional[str]:
    """A warning when ``create_model(name, **kwargs)`` asked for a part P but no layer became
    a HetConv2d (P divides no layer's input channels: they stay dense, as
    ``indivisible="skip"`` says), else None."""
    part = requested_part(name, kwargs)
    if part is None or hetconv_layers:
        return None
    return (f"part {part} divides the input channels of no layer of {name}: every layer "
            f"stays a dense convolution (indivisible='skip'); choose a P that divides them "
            f"(e.g. 2, 4, 8, 16) for a HetConv model")


def is_model(name: str) -> bool:
    """Whether ``name`` resolves to a model."""
    try:
        parse_model_name(name)
    except (ValueError, TypeError):
        return False
    return True


def create_model(name: str, *, num_classes: Optional[int] = None, in_chans: int = 3,
                 **kwargs) -> nn.Module:
    """Build the model ``name`` (a registered name or a paper variant name).

    Args:
        name: e.g. ``"vgg16_cifar"``, ``"vgg16_cifar_p4_se"``, ``"resnet50_p4"``.
        num_classes: classifier outputs; ``None`` is the architecture's default
            (10 for the CIFAR models, 1000 for the ImageNet ones).
        in_chans: input channels (1 for Fashion-MNIST).
        **kwargs: architecture options (``part``, ``se``, ``conv``, ``groups``,
            ``width``, ...; see each builder's docstring).

    A part P that divides no layer's input channels leaves every layer dense (the
    builders' ``indivisible="skip"``): :class:`AllDenseWarning` says so.
    """
    model, warning = build_model_checked(name, num_classes=num_classes, in_chans=in_chans,
                                         **kwargs)
    if warning:
        warnings.warn(warning, AllDenseWarning, stacklevel=2)
    return model


def build_model_checked(name: str, *, num_classes: Optional[int] = None, in_chans: int = 3,
                        **kwargs) -> Tuple[nn.Module, Optional[str]]:
    """:func:`create_model`'s model and its :class:`AllDenseWarning` message (None if none),
    not warned: for callers that say it their own way (the trainer's log)."""
    base, from_name = parse_model_name(name)
    clash = sorted(set(from_name) & set(kwargs))
    if clash:
        raise ValueError(
            f"{clash} given both in the model name {name!r} ({ {k: from_name[k] for k in clash} }) "
            f"and as keyword arguments ({ {k: kwargs[k] for k in clash} }); give each once")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    args = {**from_name, **kwargs, "in_chans": in_chans}
    if num_classes is not None:
        args["num_classes"] = num_classes
    model = _REGISTRY[base](**args)
    from ..layers.hetconv import HetConv2d

    return model, all_dense_warning(name, kwargs,
                                    sum(isinstance(m, HetConv2d) for m in model.modules()))


def default_input_size(name: str) -> Tuple[int, int, int]:
    """The (C, H, W) the model ``name`` is registered with (3x32x32 for CIFAR models)."""
    return _INPUT_SIZE[parse_model_name(name)[0]]


def profile_model(name: str, *, input_size: Optional[Tuple[int, int, int]] = None,
                  meta: bool = True, **kwargs):
    """Build ``name`` (``create_model`` arguments in ``kwargs``) and :func:`hetconv.profile` it.

    ``input_size`` defaults to the model's registered size with ``in_chans``
    channels; ``in_chans`` defaults to ``input_size``'s channels.  With
    ``meta`` the model is built on the ``meta`` device (no memory for
    weights, no initialisation time; counts are the same).
    """
    import torch

    from ..complexity import profile

    if input_size is None:
        c, h, w = default_input_size(name)
        input_size = (kwargs.get("in_chans", c), h, w)
    kwargs.setdefault("in_chans", input_size[0])
    if meta:
        with torch.device("meta"):
            model = create_model(name, **kwargs)
    else:
        model = create_model(name, **kwargs)
    return profile(model, input_size)


def list_models(filter: str = "*", *, variants: bool = True) -> List[str]:
    """Sorted model names matching the glob ``filter`` (case-insensitive).

    With ``variants`` the paper's named variants of each architecture
    (``vgg16_cifar_p4_se``, ...) are listed too.
    """
    names = set(_REGISTRY)
    if variants:
        names.update(f"{base}_{v}" for base, vs in _VARIANTS.items() for v in vs)
    pat = filter.lower()
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pat))
