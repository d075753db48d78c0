"""The paper's ImageNet architectures: torchvision's VGG-16, ResNet-34 and ResNet-50
(``weights=None``) passed through :func:`hetconv.convert`.

``part`` converts every KxK convolution except the first (for ResNet-50 only
its 3x3 convs are KxK, so only they change; its 1x1 convs stay).  ``se`` adds
a Squeeze-and-Excitation block (reduction 8): after every conv's ReLU in VGG,
after the last BN of every residual block in the ResNets (SENet's place).
``in_chans`` replaces the first conv.  Weights are never downloaded.
"""

from __future__ import annotations

from typing import Optional, Union

import torch.nn as nn

from ..convert import convert
from ..layers import SqueezeExcite
from .common import ConvSpec, check_se
from .registry import register_model

__all__ = ["vgg16", "resnet34", "resnet50"]

Part = Optional[Union[int, str]]


def _first_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    if in_chans == conv.in_channels:
        return conv
    return nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, bias=conv.bias is not None)


def _check(conv: Optional[str], part: Part, groups, pattern: str, indivisible: str,
           width: float, se: bool) -> None:
    """Validate the options before anything is built."""
    check_se(se)
    if conv not in (None, "het"):
        raise ValueError(f"conv={conv!r}: the ImageNet models support conv='het' only")
    if width != 1:
        raise ValueError(f"width={width!r}: the ImageNet models support width=1 only")
    ConvSpec("het", part, groups, pattern, indivisible)


def _finish(model: nn.Module, part: Part, pattern: str, indivisible: str) -> nn.Module:
    if part is None or part == 1:
        return model
    model, _ = convert(model, part, pattern=pattern, indivisible=indivisible, inplace=True)
    return model


@register_model(variants=("p4", "p4_se"))
def vgg16(*, num_classes: int = 1000, in_chans: int = 3, part: Part = None, se: bool = False,
          conv: Optional[str] = None, groups: Optional[int] = None, width: float = 1.0,
          pattern: str = "shifted", indivisible: str = "skip") -> nn.Module:
    """torchvision VGG-16 (no BN), Table 5: 15.5G MACs at 224x224."""
    import torchvision.models as tvm  # lazy: keeps ``import hetconv`` cheap

    _check(conv, part, groups, pattern, indivisible, width, se)
    model = tvm.vgg16(weights=None, num_classes=num_classes)
    model.features[0] = _first_conv(model.features[0], in_chans)
    if se:
        feats = list(model.features)
        out = []
        for i, m in enumerate(feats):
            out.append(m)
            if isinstance(m, nn.ReLU) and i > 0 and isinstance(feats[i - 1], nn.Conv2d):
                out.append(SqueezeExcite(feats[i - 1].out_channels, 8))
        model.features = nn.Sequential(*out)
    return _finish(model, part, pattern, indivisible)


def _resnet(name: str, last_bn: str, num_classes: int, in_chans: int, se: bool) -> nn.Module:
    import torchvision.models as tvm  # lazy: keeps ``import hetconv`` cheap

    model = getattr(tvm, name)(weights=None, num_classes=num_classes)
    model.conv1 = _first_conv(model.conv1, in_chans)
    if se:
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:
                bn = getattr(block, last_bn)
                setattr(block, last_bn, nn.Sequential(bn, SqueezeExcite(bn.num_features, 8)))
    return model


@register_model(variants=("p4", "p4_se"))
def resnet34(*, num_classes: int = 1000, in_chans: int = 3, part: Part = None, se: bool = False,
             conv: Optional[str] = None, groups: Optional[int] = None, width: float = 1.0,
             pattern: str = "shifted", indivisible: str = "skip") -> nn.Module:
    """torchvision ResNet-34, Table 6: 3.6G MACs at 224x224."""
    _check(conv, part, groups, pattern, indivisible, width, se)
    model = _resnet("resnet34", "bn2", num_classes, in_chans, se)
    return _finish(model, part, pattern, indivisible)


@register_model(variants=("p4", "p4_se"))
def resnet50(*, num_classes: int = 1000, in_chans: int = 3, part: Part = None, se: bool = False,
             conv: Optional[str] = None, groups: Optional[int] = None, width: float = 1.0,
             pattern: str = "shifted", indivisible: str = "skip") -> nn.Module:
    """torchvision ResNet-50 (v1.5, stride on the 3x3), Table 7: 4.1G MACs at 224x224."""
    _check(conv, part, groups, pattern, indivisible, width, se)
    model = _resnet("resnet50", "bn3", num_classes, in_chans, se)
    return _finish(model, part, pattern, indivisible)
