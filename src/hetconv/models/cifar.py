"""The paper's CIFAR-10 architectures: VGG-16, ResNet-56 and MobileNet (v1).

Every builder takes the same options:

``part``
    P of the HetConv layers (int or ``"C"``); ``None``/1 is the standard model.
    The first convolution (CONV_1) always stays standard, as in the paper.
``conv``
    ``"het"`` (HetConv / standard), ``"gwc_pwc"`` (with ``groups``) or
    ``"dwc_pwc"``: what each replaceable 3x3 convolution becomes.
``se``
    a Squeeze-and-Excitation block (reduction 8) after every convolution's
    BN + ReLU (in a residual block, after the second conv's BN, before the sum).
``width``
    channel multiplier; ``in_chans`` (1 for Fashion-MNIST); ``num_classes``;
    ``pattern`` and ``indivisible`` (see :func:`hetconv.convert`).

Input size: any.  VGG-16's five max-pools use ``ceil_mode=True`` (identical
to floor mode on 32x32, and 28x28 -> 14 -> 7 -> 4 -> 2 -> 1 instead of
reaching 0) and an adaptive average pool feeds the classifier, so 28x28
(Fashion-MNIST), 32x32 and larger inputs all work.  ResNet-56 and MobileNet
end in adaptive average pooling.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import MaxPool2x2
from .common import ConvSpec, check_se, check_width, conv_unit, scaled
from .registry import register_model

__all__ = ["VGGCifar", "ResNetCifar", "MobileNetCifar", "vgg16_cifar", "resnet56_cifar",
           "mobilenet_cifar"]

_PARTS = ("p2", "p4", "p8", "p16", "p32", "p64", "pc")


def _variants(parts=_PARTS, extra=()) -> List[str]:
    return ["p1_se"] + [p for p in parts] + [f"{p}_se" for p in parts] + list(extra)


# --------------------------------------------------------------------------- VGG
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M")


class VGGCifar(nn.Module):
    """VGG-16 for CIFAR (Li et al.'s variant): 13 3x3 convs with BN, classifier C-C-classes.

    ``cfg`` lists conv widths and ``"M"`` for a 2x2 max-pool (``ceil_mode``).
    """

    def __init__(self, cfg=VGG16_CFG, num_classes: int = 10, in_chans: int = 3,
                 spec: Optional[ConvSpec] = None, se: bool = False, width: float = 1.0) -> None:
        super().__init__()
        spec = spec or ConvSpec()
        width, se = check_width(width), check_se(se)
        layers: List[nn.Module] = []
        c_in, first = in_chans, True
        for v in cfg:
            if v == "M":
                layers.append(MaxPool2x2(ceil_mode=True))
                continue
            c_out = scaled(v, width)
            conv = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False) if first else spec(c_in, c_out)
            layers.append(conv_unit(conv, c_out, se))
            c_in, first = c_out, False
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Linear(c_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------- ResNet
class _PadShortcut(nn.Module):
    """Option-A shortcut of the CIFAR ResNets: subsample, zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; parameter-free (option A) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, spec: ConvSpec,
                 se: bool) -> None:
        super().__init__()
        self.unit1 = conv_unit(spec(in_channels, out_channels, stride), out_channels, se)
        self.unit2 = conv_unit(spec(out_channels, out_channels), out_channels, se, relu=False)
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                         else _PadShortcut(in_channels, out_channels, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.unit2(self.unit1(x)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al.): conv 3x3 -> 3 stages of n blocks, 16-32-64."""

    def __init__(self, depth: int = 56, num_classes: int = 10, in_chans: int = 3,
                 spec: Optional[ConvSpec] = None, se: bool = False, width: float = 1.0) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}")
        spec = spec or ConvSpec()
        width, se = check_width(width), check_se(se)
        n = (depth - 2) // 6
        c = scaled(16, width)
        self.stem = conv_unit(nn.Conv2d(in_chans, c, 3, 1, 1, bias=False), c, se)
        stages = []
        for i, base in enumerate((16, 32, 64)):
            c_out = scaled(base, width)
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c, c_out, 2 if (i > 0 and j == 0) else 1, spec, se))
                c = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- MobileNet
MOBILENET_CFG = (64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512,
                 (1024, 2), 1024)


class MobileNetCifar(nn.Module):
    """MobileNet v1 for CIFAR: conv 3x3 (32) then 13 units, avg-pool, linear.

    Each unit is ``spec(in, out, stride) -> BN -> ReLU``: with the default
    ``conv="dwc_pwc"`` it is MobileNet's depthwise + BN + ReLU + pointwise
    (+ BN + ReLU); with ``conv="het"`` the pair becomes ONE HetConv layer of
    the same stride and output width, as in the paper.

    ``part=32`` (the paper's ``MobileNet_P32``): every unit's in_channels
    (32, 64, ..., 1024) is a multiple of 32, so no ``indivisible`` policy is
    involved at width 1; the first unit (32 -> 64) is then P = in_channels
    (one 3x3 kernel per filter).  This counts 55.95M MACs against the paper's
    55.94M.  At other widths ``indivisible`` applies as everywhere.
    """

    def __init__(self, cfg=MOBILENET_CFG, num_classes: int = 10, in_chans: int = 3,
                 spec: Optional[ConvSpec] = None, se: bool = False, width: float = 1.0) -> None:
        super().__init__()
        spec = spec or ConvSpec("dwc_pwc")
        width, se = check_width(width), check_se(se)
        c = scaled(32, width)
        units = [conv_unit(nn.Conv2d(in_chans, c, 3, 1, 1, bias=False), c, se)]
        for v in cfg:
            c_out, stride = (v if isinstance(v, tuple) else (v, 1))
            c_out = scaled(c_out, width)
            units.append(conv_unit(spec(c, c_out, stride), c_out, se))
            c = c_out
        self.features = nn.Sequential(*units)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------- builders
def _spec(conv: Optional[str], part, groups, pattern: str, indivisible: str,
          default_conv: str = "het") -> ConvSpec:
    if conv is None:
        conv = "het" if part is not None else default_conv
    return ConvSpec(conv, part, groups, pattern, indivisible)


Part = Optional[Union[int, str]]


@register_model(variants=_variants(extra=("gwc4_pwc", "dwc_pwc")), input_size=(3, 32, 32))
def vgg16_cifar(*, num_classes: int = 10, in_chans: int = 3, part: Part = None,
                se: bool = False, conv: Optional[str] = None, groups: Optional[int] = None,
                width: float = 1.0, pattern: str = "shifted", indivisible: str = "skip") -> VGGCifar:
    """VGG-16 for CIFAR-10 (Table 1): 313.7M MACs, 15.0M params at 32x32."""
    return VGGCifar(VGG16_CFG, num_classes, in_chans,
                    _spec(conv, part, groups, pattern, indivisible), se, width)


@register_model(variants=("p1_se", "p2", "p4", "p2_se", "p4_se"), input_size=(3, 32, 32))
def resnet56_cifar(*, num_classes: int = 10, in_chans: int = 3, part: Part = None,
                   se: bool = False, conv: Optional[str] = None, groups: Optional[int] = None,
                   width: float = 1.0, pattern: str = "shifted",
                   indivisible: str = "skip") -> ResNetCifar:
    """ResNet-56 for CIFAR-10 (Table 3): about 126M MACs, 0.85M params at 32x32."""
    return ResNetCifar(56, num_classes, in_chans,
                       _spec(conv, part, groups, pattern, indivisible), se, width)


@register_model(variants=("p32", "p32_se", "pc"), input_size=(3, 32, 32))
def mobilenet_cifar(*, num_classes: int = 10, in_chans: int = 3, part: Part = None,
                    se: bool = False, conv: Optional[str] = None, groups: Optional[int] = None,
                    width: float = 1.0, pattern: str = "shifted",
                    indivisible: str = "skip") -> MobileNetCifar:
    """MobileNet v1 for CIFAR-10 (Table 4): 46.4M MACs; with ``part`` each
    depthwise + pointwise pair is one HetConv layer (``_p32``: 55.9M)."""
    return MobileNetCifar(MOBILENET_CFG, num_classes, in_chans,
                          _spec(conv, part, groups, pattern, indivisible, "dwc_pwc"), se, width)
