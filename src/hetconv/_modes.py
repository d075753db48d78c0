"""Module-mode helpers shared by the passes that run a user's model once to look at it."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block (no BatchNorm statistics update, no dropout);
    after it, every submodule's own ``training`` flag as it was (``model.train(was)`` would
    overwrite a submodule the user had put in the other mode)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
