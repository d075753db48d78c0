"""``SqueezeExcite``: channel attention (Hu et al.), as the paper's ``_SE`` variants use it."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["SqueezeExcite"]


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation block: ``x * sigmoid(fc2(relu(fc1(avgpool(x)))))``.

    Args:
        channels: C, channels of the feature map it gates.
        reduction: the hidden width is ``max(1, C // reduction)``; the paper uses 8.
        bias: biases on the two fully connected layers.

    The two fully connected layers are ``nn.Linear`` so that cost accounting
    (:func:`hetconv.profile`) sees them: they cost ``2 * C * C/r`` MACs per
    example, which is what the paper's FLOPs column adds for its ``_SE`` rows.
    Their parameters (``2 * C * C/r`` plus biases) are about twice what the
    paper's params column adds for those rows; the block is the standard one
    and that difference is reported, not imitated.
    """

    def __init__(self, channels: int, reduction: int = 8, bias: bool = True) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("reduction", reduction)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.channels = channels
        self.reduction = reduction
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"SqueezeExcite expected input of shape (B, {self.channels}, H, W), "
                f"got {tuple(x.shape)}")
        s = x.mean(dim=(2, 3))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * s[:, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.channels}, reduction={self.reduction}"
