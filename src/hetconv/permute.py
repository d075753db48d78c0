"""Absorb the channel permutations of ``pattern="shifted"`` into a whole model.

A shifted HetConv2d is a blocked one with its input channels and filters
permuted: with ``pi_in = channel_order(M, P)`` and ``pi_out = filter_order(N, P)``
(both sort channels by class ``i mod P``, stably),

    shifted(x)[:, pi_out] == blocked'(x[:, pi_in])

where ``blocked'`` has the same weights, rearranged.  Executing a shifted layer
on its own costs two activation gathers (input into class order, output back
into filter order).  In a network the gathers of consecutive layers cancel:
if every activation is *stored* in class order, each shifted layer reads its
input already sorted and writes its output already sorted, and every layer in
between that acts channel by channel (BatchNorm, ReLU, pooling, dropout, the
sum of a residual block) just needs its per-channel parameters permuted.

:func:`absorb_permutations` does this rewrite on a ``torch.fx`` graph:

* each shifted HetConv2d (P > 1) becomes a ``pattern="blocked"`` HetConv2d on
  stored channels; a gather is inserted only where its input arrives in
  another order (e.g. after a layer with a different P);
* a dense ``nn.Conv2d`` (or BatchNorm) feeding it through channel-wise layers
  has its output channels permuted instead, so the first HetConv2d of a
  VGG/ResNet needs no gather either; a dense ``nn.Conv2d`` reading a permuted
  tensor has its input channels permuted;
* anything else (flatten, Linear, concatenation, unknown modules, the
  model's outputs) gets its input gathered back into natural order.

The rewritten model computes the same function (up to float summation order)
and is meant for inference (:func:`hetconv.optimize_for_inference` and
:func:`hetconv.export_onnx` use it); its parameters are laid out differently
from the original's, so train and checkpoint the original.
"""

from __future__ import annotations

import copy
import operator
from typing import Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import functional as HF
from . import pattern as _pattern
from .layers import HetConv2d

__all__ = ["absorb_permutations", "PermutationTracer"]

# Modules and functions that act on each channel of dim 1 separately (and keep dim 1).
_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.GELU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.BatchNorm2d, nn.ZeroPad2d)
_CHANNELWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.silu, F.gelu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.relu, torch.sigmoid, torch.tanh,
    torch.relu_, F.relu_}
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp",
                        "clamp_", "clamp_min", "clamp_min_", "contiguous"}
# Element-wise binary ops: stored orders of tensor operands must agree.
_BINARY = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub,
           operator.isub, torch.add, torch.mul, torch.sub}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}


class PermutationTracer(fx.Tracer):
    """fx tracer that keeps HetConv2d and the package's own layers as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m).__module__.startswith("hetconv.layers"):
            return True
        return super().is_leaf_module(m, qualname)


def _shifted(m: nn.Module) -> bool:
    return isinstance(m, HetConv2d) and m.pattern == "shifted" and m.part > 1


def _blocked_twin(layer: HetConv2d) -> HetConv2d:
    """The blocked HetConv2d computing ``layer`` on class-sorted channels, in class-sorted filters."""
    m, n, p = layer.in_channels, layer.out_channels, layer.part
    pi_in = _pattern.channel_order(m, p, "shifted").to(layer.weight_k.device)
    pi_out = _pattern.filter_order(n, p, "shifted").to(layer.weight_k.device)
    twin = HetConv2d(m, n, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                     bias=layer.bias is not None, part=layer.part_spec, pattern="blocked",
                     backend=layer.backend, device=layer.weight_k.device,
                     dtype=layer.weight_k.dtype)
    kh, kw = layer.kernel_size
    with torch.no_grad():
        dense = layer.dense_weight()[pi_out][:, pi_in]
        idx = HF._indices(m, n, p, "blocked", dense.device)
        twin.weight_k.copy_(torch.gather(dense, 1, idx["kxk"][:, :, None, None].expand_as(
            twin.weight_k)))
        twin.weight_1.copy_(torch.gather(dense[:, :, kh // 2, kw // 2], 1, idx["pw"]))
        if layer.bias is not None:
            twin.bias.copy_(layer.bias[pi_out])
        if not torch.equal(twin.dense_weight(), dense):  # a pattern that is not a permutation
            raise AssertionError("internal error: shifted -> blocked rewrite is not exact")
    twin.train(layer.training)
    twin.weight_k.requires_grad_(layer.weight_k.requires_grad)
    twin.weight_1.requires_grad_(layer.weight_1.requires_grad)
    if twin.bias is not None:
        twin.bias.requires_grad_(layer.bias.requires_grad)
    return twin


def _permute_channels_(m: nn.Module, order: torch.Tensor, side: str) -> None:
    """Permute a module's per-channel parameters in place: new channel k = old ``order[k]``."""
    with torch.no_grad():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                if t is not None:
                    t.copy_(t[order])
        elif isinstance(m, nn.Conv2d) and side == "out":
            m.weight.copy_(m.weight[order])
            if m.bias is not None:
                m.bias.copy_(m.bias[order])
        elif isinstance(m, nn.Conv2d) and side == "in":
            m.weight.copy_(m.weight[:, order])
        else:
            raise AssertionError(f"cannot permute {type(m).__name__}")


class _Rewriter:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.modules = dict(gm.named_modules())
        self.perm: Dict[fx.Node, torch.Tensor] = {}  # stored channel k = natural channel perm[k]
        self.calls = {}  # module -> number of call sites
        for node in self.graph.nodes:
            if node.op == "call_module":
                mod = self.modules[node.target]
                self.calls[mod] = self.calls.get(mod, 0) + 1
        self.reordered: Dict[tuple, fx.Node] = {}  # (node, order) -> gathered node
        self.done: set = set()  # nodes already rewritten (their inputs' orders are fixed)
        self.n_buffers = 0
        self.gathers = 0
        self.rewritten = 0

    # -- helpers -----------------------------------------------------------
    def _module(self, node) -> Optional[nn.Module]:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def _private(self, node) -> bool:
        """The node's module is called only here (safe to change its parameters)."""
        mod = self._module(node)
        return mod is not None and self.calls.get(mod) == 1

    def _gather(self, node: fx.Node, index: torch.Tensor, before: fx.Node) -> fx.Node:
        name = f"_hetconv_order_{self.n_buffers}"
        self.n_buffers += 1
        self.gm.register_buffer(name, index.clone())
        with self.graph.inserting_before(before):
            buf = self.graph.get_attr(name)
            out = self.graph.call_function(torch.index_select, (node, 1, buf))
        self.gathers += 1
        return out

    def _reorder(self, node: fx.Node, want: Optional[torch.Tensor]) -> fx.Node:
        """``node`` re-stored in order ``want`` (None = natural), gathering if needed."""
        have = self.perm.get(node)
        if have is None and want is None:
            return node
        if have is not None and want is not None and torch.equal(have, want):
            return node
        key = (node, None if want is None else tuple(want.tolist()))
        if key in self.reordered:  # the same tensor already gathered into this order
            return self.reordered[key]
        if have is None:
            index = want
        else:  # position of natural channel c in storage: inverse of ``have``
            inverse = torch.empty_like(have)
            inverse[have] = torch.arange(have.numel(), device=have.device)
            index = inverse if want is None else inverse[want]
        # Insert right after ``node`` (after the inputs, for an input): every later user
        # may reuse the gathered tensor.
        at = node.next
        while at.op == "placeholder":
            at = at.next
        out = self._gather(node, index, at)
        if want is not None:
            self.perm[out] = want
        self.reordered[key] = out
        return out

    def _materialize(self, node: fx.Node) -> None:
        """Every permuted tensor argument of ``node`` back in natural order."""
        def fix(arg):
            return self._reorder(arg, None) if arg in self.perm else arg
        node.args = fx.map_arg(node.args, fix)
        node.kwargs = fx.map_arg(node.kwargs, fix)

    def _pull_back(self, node: fx.Node, want: torch.Tensor) -> bool:
        """Make ``node`` produce order ``want`` by permuting its producer's output channels.

        Walks up a chain of channel-wise nodes to a privately used dense
        ``nn.Conv2d`` (groups=1); permutes it and every BatchNorm on the way.
        Users of the chain not yet rewritten see the new order and adapt to it.
        """
        chain, cur, prev = [], node, None
        while True:
            # Users already rewritten read ``cur`` in natural order: it cannot change
            # (``prev``, the chain's next link, is rewritten below).
            if cur in self.perm or any(u in self.done and u is not prev for u in cur.users):
                return False
            mod = self._module(cur)
            if isinstance(mod, nn.Conv2d) and mod.groups == 1 and self._private(cur):
                if mod.out_channels != want.numel():
                    return False
                chain.append(cur)
                break
            if not self._channelwise(cur, with_params=True):
                return False
            chain.append(cur)
            prev, cur = cur, cur.args[0]
            if not isinstance(cur, fx.Node):
                return False
        for n in chain:
            mod = self._module(n)
            if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d)):
                _permute_channels_(mod, want, "out")
            self.perm[n] = want
        return True

    def _channelwise(self, node: fx.Node, with_params: bool = False) -> bool:
        """A unary op acting per channel on its first argument (BatchNorm only if private)."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        if node.op == "call_module":
            mod = self._module(node)
            if isinstance(mod, nn.BatchNorm2d):
                return self._private(node)
            return isinstance(mod, _CHANNELWISE_MODULES)
        if node.op == "call_function":
            return node.target in _CHANNELWISE_FUNCTIONS and not any(
                isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values()))
        if node.op == "call_method":
            return node.target in _CHANNELWISE_METHODS and not any(
                isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values()))
        return False

    # -- the pass ----------------------------------------------------------
    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op in ("placeholder", "get_attr"):
                continue
            mod = self._module(node)
            if mod is not None and _shifted(mod) and isinstance(node.args[0], fx.Node) \
                    and len(node.args) == 1 and not node.kwargs:
                self._hetconv(node, mod)
            elif self._channelwise(node):
                src = node.args[0]
                if src in self.perm:
                    if isinstance(mod, nn.BatchNorm2d):
                        _permute_channels_(mod, self.perm[src], "out")
                    self.perm[node] = self.perm[src]
            elif (node.op == "call_function" and node.target in _BINARY) or (
                    node.op == "call_method" and node.target in _BINARY_METHODS):
                self._binary(node)
            elif isinstance(mod, nn.Conv2d) and mod.groups == 1 and self._private(node) \
                    and len(node.args) == 1 and node.args[0] in self.perm:
                # A dense conv reads the stored order: permute its input channels instead.
                _permute_channels_(mod, self.perm[node.args[0]], "in")
            else:
                self._materialize(node)
            self.done.add(node)

    def _hetconv(self, node: fx.Node, layer: HetConv2d) -> None:
        m, n, p = layer.in_channels, layer.out_channels, layer.part
        pi_in = _pattern.channel_order(m, p, "shifted").to(layer.weight_k.device)
        pi_out = _pattern.filter_order(n, p, "shifted").to(layer.weight_k.device)
        src = node.args[0]
        if src not in self.perm:
            self._pull_back(src, pi_in)  # else _reorder gathers
        node.args = (self._reorder(src, pi_in),)
        twin = _blocked_twin(layer)
        name = node.target
        if self.calls.get(layer) == 1:
            parent, _, child = name.rpartition(".")
            setattr(self.gm.get_submodule(parent) if parent else self.gm, child, twin)
        else:  # shared module: a twin of its own for this call site
            name = f"_hetconv_blocked_{self.rewritten}"
            self.gm.add_submodule(name, twin)
            node.target = name
        self.modules[node.target] = twin
        self.calls[twin] = 1
        self.perm[node] = pi_out
        self.rewritten += 1

    def _binary(self, node: fx.Node) -> None:
        tensors = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        orders = [self.perm.get(a) for a in tensors]
        first = next((o for o in orders if o is not None), None)
        if first is None:
            return
        lead = tensors[orders.index(first)]
        shape = self._shape(lead)
        # Natural operands are brought into the stored order only when their shape is
        # known to equal the permuted operand's (else they may broadcast): otherwise the
        # permuted operands go back to natural order.
        if all(o is not None or (shape is not None and self._shape(a) == shape)
               for a, o in zip(tensors, orders)):
            fix = lambda a: self._reorder(a, first)  # noqa: E731
            node.args = fx.map_arg(node.args, fix)
            node.kwargs = fx.map_arg(node.kwargs, fix)
            self.perm[node] = first
        else:
            self._materialize(node)

    @staticmethod
    def _shape(node: fx.Node):
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def absorb_permutations(model: nn.Module, example_input: Optional[torch.Tensor] = None,
                        ) -> fx.GraphModule:
    """A copy of ``model`` with every shifted HetConv2d run as a blocked one on class-sorted channels.

    Args:
        model: a module traceable by ``torch.fx`` (HetConv2d and the package's
            layers are kept as leaves).  Left untouched.
        example_input: optional input batch; with it, shapes are propagated and a
            residual sum of a permuted and a natural tensor gathers the natural
            one into the stored order (keeping the rest of the network permuted)
            instead of gathering the permuted one back.

    Returns a ``torch.fx.GraphModule`` computing the same function (float
    summation order aside).  ``hetconv_permutations`` on it reports the number
    of rewritten layers and of remaining gathers.  Raises ``TypeError`` when
    ``model`` cannot be traced symbolically (data-dependent control flow).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor or None, got {type(example_input).__name__}")
    root = copy.deepcopy(model)
    try:
        graph = PermutationTracer().trace(root)
    except Exception as exc:  # fx raises many types for untraceable code
        raise TypeError(f"model cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
                        "absorb_permutations needs a symbolically traceable model") from exc
    gm = fx.GraphModule(root, graph, root.__class__.__name__)
    gm.train(model.training)
    if example_input is not None:
        from torch.fx.passes.shape_prop import ShapeProp
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    rewriter = _Rewriter(gm)
    rewriter.run()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.hetconv_permutations = {"rewritten_layers": rewriter.rewritten, "gathers": rewriter.gathers}
    return gm
