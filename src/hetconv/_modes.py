"""Helpers shared by the passes that look at a user's model (deploy, permute, complexity):
its modes while it runs once, and which of its modules are not private to one call."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Set

import torch.fx
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


def shared_modules(root: nn.Module) -> Set[nn.Module]:
    """The modules under ``root`` holding a parameter or buffer that is held under another
    name too: tied to another module's, or the module itself registered under two names.
    A pass that rewrites such a module's tensors in place, or replaces it under one name,
    changes what the other holder computes."""
    holders: Dict[int, Dict[str, nn.Module]] = {}  # tensor id -> {module path: module}
    for path, mod in root.named_modules(remove_duplicate=False):
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            holders.setdefault(id(t), {})[path] = mod
    return {m for paths in holders.values() if len(paths) > 1 for m in paths.values()}


def read_modules(root: nn.Module, graph: torch.fx.Graph) -> Set[nn.Module]:
    """The modules of ``root`` whose parameters or buffers ``graph`` (traced from ``root``)
    reads directly (``self.conv.weight`` in a forward: a ``get_attr`` node)."""
    read = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            try:
                read.add(root.get_submodule(node.target.rpartition(".")[0]))
            except AttributeError:
                pass
    return read
