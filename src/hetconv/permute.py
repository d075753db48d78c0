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
* slicing that keeps the channels whole (``x[:, :, ::2, ::2]``) keeps the stored
  order, and ``F.pad`` of a 4-d tensor extends it: padded height/width keep
  it, constant-padded channels (the zero-padded shortcut of the CIFAR
  ResNets) keep their natural places around the permuted ones, so a stage
  transition gathers its subsampled, padded shortcut once, not its input;
* anything else (flatten, Linear, concatenation, unknown modules, the
  model's outputs) gets its input gathered back into natural order.

The channels are dim 1 of a batch (N, C, H, W) and dim 0 of an unbatched (C, H, W)
input: the gathers work on either - a graph made without ``example_input`` on both; one
made with it writes its gathers for that input's rank (dim 1 of a batch, as exported
graphs have it), so call it on inputs of that rank.  The rewritten model computes the same function (up to
float summation order).
By default it is a copy with its weights stored permuted, for inference
(:func:`hetconv.optimize_for_inference` and :func:`hetconv.export_onnx` use
it); with ``share_parameters=True`` it runs on the original's own parameters,
permuting them per call, so training it trains (and checkpoints) the original.
"""

from __future__ import annotations

import copy
import functools
import inspect
import operator
from typing import Dict, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import functional as HF
from ._modes import evaluating, read_modules, shared_modules
from . import pattern as _pattern
from .layers import HetConv2d

__all__ = ["absorb_permutations", "has_shifted_layers", "PermutationTracer"]

# Modules and functions that act on each channel (dim 1 of a batch) separately (and keep it).
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
_INPLACE = {operator.iadd, operator.imul, operator.isub}
# Max-pools that can return (values, indices): a tuple, not a tensor with channels.
_INDEX_POOL_FUNCTIONS = {F.max_pool2d: 6, F.adaptive_max_pool2d: 2}  # return_indices' position
#: Where the channels are, counted from the end: dim 1 of a batch (N, C, H, W), dim 0 of an
#: unbatched (C, H, W) input (which HetConv2d and nn.Conv2d accept too).
_CHANNELS = -3
#: methods whose result may share memory with the tensor they are called on
_VIEW_METHODS = frozenset({"view", "view_as", "reshape", "reshape_as", "narrow", "expand",
                           "expand_as", "contiguous", "flatten", "unflatten", "squeeze",
                           "unsqueeze", "permute", "transpose", "t", "select", "as_strided",
                           "detach", "__getitem__", "chunk", "split", "unbind", "movedim",
                           "swapaxes", "swapdims", "unfold", "diagonal", "tensor_split"})
#: functions whose result may share memory with their first argument
_VIEW_FUNCTIONS = frozenset({operator.getitem, torch.flatten, torch.reshape, torch.squeeze,
                             torch.unsqueeze, torch.permute, torch.transpose, torch.narrow,
                             torch.select, torch.movedim, torch.swapaxes, torch.t,
                             torch.chunk, torch.split, torch.unbind, torch.detach,
                             torch.tensor_split, torch.unflatten})


def _inplace_position(fn) -> Optional[int]:
    """Where function ``fn`` takes an ``inplace`` flag positionally (``F.relu``: 1), else
    None (no such parameter, no signature, unhashable)."""
    try:
        return _inplace_index(fn)
    except TypeError:
        return None


@functools.lru_cache(maxsize=None)
def _inplace_index(fn) -> Optional[int]:
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


class PermutationTracer(fx.Tracer):
    """fx tracer that keeps HetConv2d and the package's own layers as leaves (and modules
    whose class sets ``fx_leaf = True``: their forward branches on the input)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m).__module__.startswith("hetconv.layers") or getattr(type(m), "fx_leaf", False):
            return True
        return super().is_leaf_module(m, qualname)


def _shifted(m: nn.Module) -> bool:
    return isinstance(m, HetConv2d) and m.pattern == "shifted" and m.part > 1


def has_shifted_layers(model: nn.Module) -> bool:
    """Does ``model`` hold a shifted HetConv2d with P > 1 (something to absorb)?"""
    return any(_shifted(m) for m in model.modules())


def _inverse(index: torch.Tensor) -> torch.Tensor:
    """The inverse of the permutation ``index`` (1-D): ``inverse[index[k]] = k``."""
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel(), device=index.device)
    return inverse


def _blocked_maps(layer: HetConv2d) -> Dict[str, torch.Tensor]:
    """Index maps from a shifted layer to its blocked twin on class-sorted channels.

    ``pi_in``/``pi_out``: stored channel/filter k is natural channel/filter
    ``pi_*[k]``.  The twin's weights are ``weight_k[pi_out]``,
    ``weight_1[pi_out].gather(1, w1_cols)`` and ``bias[pi_out]``: row
    permutations and a column reorder, cheap and differentiable.
    """
    m, n, p = layer.in_channels, layer.out_channels, layer.part
    pi_in = _pattern.channel_order(m, p, "shifted")
    pi_out = _pattern.filter_order(n, p, "shifted")
    pw_s = _pattern.pointwise_channels(m, n, p, "shifted")   # natural channels, per filter
    pw_b = _pattern.pointwise_channels(m, n, p, "blocked")   # stored channels, per stored filter
    # pos[f, c]: where natural channel c sits in filter f's shifted 1x1 list.
    pos = torch.full((n, m), -1, dtype=torch.long).scatter_(
        1, pw_s, torch.arange(pw_s.shape[1]).expand_as(pw_s).contiguous())
    w1_cols = pos[pi_out].gather(1, pi_in[pw_b])
    device = layer.weight_k.device
    return {"pi_in": pi_in.to(device), "pi_out": pi_out.to(device), "w1_cols": w1_cols.to(device)}


def _blocked_weights(layer: HetConv2d, maps: Dict[str, torch.Tensor]):
    wk = layer.weight_k.index_select(0, maps["pi_out"])
    w1 = layer.weight_1.index_select(0, maps["pi_out"]).gather(1, maps["w1_cols"])
    bias = None if layer.bias is None else layer.bias.index_select(0, maps["pi_out"])
    return wk, w1, bias


def _blocked_twin(layer: HetConv2d) -> HetConv2d:
    """The blocked HetConv2d computing ``layer`` on class-sorted channels, in class-sorted filters."""
    maps = _blocked_maps(layer)
    twin = HetConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                     layer.padding, layer.dilation, bias=layer.bias is not None,
                     part=layer.part_spec, pattern="blocked", backend=layer.backend,
                     device=layer.weight_k.device, dtype=layer.weight_k.dtype)
    with torch.no_grad():
        for dst, src in zip((twin.weight_k, twin.weight_1, twin.bias),
                            _blocked_weights(layer, maps)):
            if dst is not None:
                dst.copy_(src)
        # The definition: the twin's kernel is the layer's with rows and columns sorted.
        dense = layer.dense_weight()[maps["pi_out"]][:, maps["pi_in"]]
        if not torch.equal(twin.dense_weight(), dense):
            raise AssertionError("internal error: shifted -> blocked rewrite is not exact")
    for dst, src in zip(twin.parameters(), (layer.weight_k, layer.weight_1, layer.bias)):
        dst.requires_grad_(src.requires_grad)
    twin.train(layer.training)
    return twin


class _Borrowed(nn.Module):
    """Runs a module of the original model with permuted parameters, computed per call.

    The original is referenced, not registered: parameters, buffers and the
    state_dict stay the original model's (``share_parameters=True``).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.__dict__["module"] = module  # not a submodule

    def set_order(self, name: str, order: torch.Tensor) -> None:
        self.register_buffer(name, order.clone(), persistent=False)


class _Permute(torch.autograd.Function):
    """``src.reshape(-1)[index]`` for a bijective ``index``, differentiable.

    The backward pass gathers with the inverse permutation instead of
    scattering (autograd's index_add/scatter_add backward is the slow part of
    permuting weights on every training step).
    """

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor):
        ctx.save_for_backward(inverse)
        ctx.src_shape = src.shape
        return src.reshape(-1).index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.reshape(-1).index_select(0, inverse).view(ctx.src_shape), None, None


class _BlockedView(_Borrowed):
    """A shifted HetConv2d of the original model, executed as its blocked twin."""

    def __init__(self, layer: HetConv2d) -> None:
        super().__init__(layer)
        maps = _blocked_maps(layer)
        pi_out, w1_cols = maps["pi_out"], maps["w1_cols"]
        per_row_k = layer.weight_k[0].numel()
        per_row_1 = layer.weight_1.shape[1]
        rows = torch.arange(per_row_k, device=pi_out.device)
        flat = {"k": pi_out[:, None] * per_row_k + rows,       # whole rows of weight_k
                "1": pi_out[:, None] * per_row_1 + w1_cols,    # rows, then columns, of weight_1
                "b": pi_out}
        for key, index in flat.items():
            index = index.reshape(-1)
            self.set_order(f"index_{key}", index)
            self.set_order(f"inverse_{key}", _inverse(index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.module
        wk = _Permute.apply(layer.weight_k, self.index_k, self.inverse_k).view(
            layer.weight_k.shape)
        w1 = _Permute.apply(layer.weight_1, self.index_1, self.inverse_1).view(
            layer.weight_1.shape)
        bias = None if layer.bias is None else _Permute.apply(layer.bias, self.index_b,
                                                              self.inverse_b)
        return HF.het_conv2d(x, wk, w1, bias, layer.stride, layer.padding, layer.dilation,
                             "blocked", layer.backend)


class _PermutedModule(_Borrowed):
    """A dense conv (input and/or output channels) or BatchNorm (channels) of the original
    model with permuted parameters; BatchNorm statistics are written back in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        out, inp = getattr(self, "out_order", None), getattr(self, "in_order", None)
        if isinstance(m, nn.Conv2d):
            w, b = m.weight, m.bias
            if inp is not None:
                w = w.index_select(1, inp)
            if out is not None:
                w = w.index_select(0, out)
                b = None if b is None else b.index_select(0, out)
            return m._conv_forward(x, w, b)
        return self._batch_norm(m, x, out)

    @staticmethod
    def _batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        # nn.BatchNorm2d.forward, with every per-channel tensor taken in ``order``.
        bn._check_input_dim(x)
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
        track = not bn.training or bn.track_running_stats
        pick = lambda t: None if t is None else t.index_select(0, order)  # noqa: E731
        mean = pick(bn.running_mean) if track else None
        var = pick(bn.running_var) if track else None
        y = F.batch_norm(x, mean, var, pick(bn.weight), pick(bn.bias), use_batch, factor, bn.eps)
        if bn.training and mean is not None:  # updated statistics, back in natural order
            with torch.no_grad():
                bn.running_mean.index_copy_(0, order, mean)
                bn.running_var.index_copy_(0, order, var)
        return y


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


def _base(m: Optional[nn.Module]) -> Optional[nn.Module]:
    """The original module behind a view made by the rewrite (or ``m`` itself)."""
    return m.module if isinstance(m, _Borrowed) else m


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, share: bool) -> None:
        self.gm = gm
        self.share = share
        self.graph = gm.graph
        self.modules = dict(gm.named_modules())
        self.perm: Dict[fx.Node, torch.Tensor] = {}  # stored channel k = natural channel perm[k]
        self.calls = {}  # module -> number of call sites
        for node in self.graph.nodes:
            if node.op == "call_module":
                mod = self.modules[node.target]
                self.calls[mod] = self.calls.get(mod, 0) + 1
        # Modules whose parameters or buffers something else sees too: tied to another
        # module's, or read directly by the forward (``self.conv.weight``).  Permuting
        # them in place (or replacing the module) would change what that reads.
        self.exposed = shared_modules(gm) | read_modules(gm, self.graph)
        self.gathered: Dict[fx.Node, fx.Node] = {}  # gather node -> the node it gathers
        self.reordered: Dict[tuple, fx.Node] = {}  # (node, dim, order) -> gathered node
        self.done: set = set()  # nodes already rewritten (their inputs' orders are fixed)
        self.n_buffers = 0
        self.n_views = 0
        self.gathers = 0
        self.rewritten = 0

    # -- helpers -----------------------------------------------------------
    def _module(self, node) -> Optional[nn.Module]:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def _private(self, node) -> bool:
        """Its parameters may be permuted for this call site: views permute per call;
        in-place permutation needs a module called only here."""
        mod = self._module(node)
        return mod is not None and (self.share or (self.calls.get(mod) == 1
                                                   and mod not in self.exposed))

    def _add_view(self, node: fx.Node, view: nn.Module) -> None:
        name = f"_hetconv_view_{self.n_views}"
        self.n_views += 1
        self.gm.add_submodule(name, view)
        node.target = name
        self.modules[name] = view

    def _permute(self, node: fx.Node, order: torch.Tensor, side: str) -> None:
        """Channels of the node's conv/BatchNorm permuted (``side`` "in" or "out")."""
        mod = self._module(node)
        if not self.share:
            _permute_channels_(mod, order, side)
            return
        if not isinstance(mod, _PermutedModule):
            mod = _PermutedModule(mod)
            self._add_view(node, mod)
        mod.set_order(f"{side}_order", order)

    def _gather(self, node: fx.Node, index: torch.Tensor, before: fx.Node,
                dim: int = _CHANNELS) -> fx.Node:
        """``index_select(node, dim, index)`` just before ``before``.  ``dim`` is counted
        from the end; where ``node``'s rank is known it is written counted from the start
        (dim 1 of a batch, as exported graphs have had it), else as it is (any rank)."""
        name = f"_hetconv_order_{self.n_buffers}"
        self.n_buffers += 1
        self.gm.register_buffer(name, index.clone(), persistent=False)
        shape = self._shape(node)
        if dim < 0 and shape is not None and len(shape) >= -dim:
            dim += len(shape)
        with self.graph.inserting_before(before):
            buf = self.graph.get_attr(name)
            out = self.graph.call_function(torch.index_select, (node, dim, buf))
        self.gathered[out] = node
        if "tensor_meta" in node.meta:  # a permutation keeps the shape
            out.meta["tensor_meta"] = node.meta["tensor_meta"]
        self.gathers += 1
        return out

    def _reorder(self, node: fx.Node, want: Optional[torch.Tensor], before: fx.Node,
                 dim: int = _CHANNELS) -> fx.Node:
        """``node`` re-stored in order ``want`` (None = natural) along ``dim`` (counted from
        the end) for the consumer ``before``, gathering (just before it) if needed."""
        have = self.perm.get(node)
        if have is None and want is None:
            return node
        if have is not None and want is not None and torch.equal(have, want):
            return node
        key = (node, dim, None if want is None else tuple(want.tolist()))
        if key in self.reordered:  # already gathered into this order (and not mutated since)
            return self.reordered[key]
        if have is None:
            index = want
        else:  # position of natural channel c in storage: inverse of ``have``
            inverse = _inverse(have)
            index = inverse if want is None else inverse[want]
        out = self._gather(node, index, before, dim)
        if want is not None and dim == _CHANNELS:
            self.perm[out] = want
        self.reordered[key] = out
        return out

    def _materialize(self, node: fx.Node) -> None:
        """Every permuted tensor argument of ``node`` back in natural order."""
        def fix(arg):
            return self._reorder(arg, None, node) if arg in self.perm else arg
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
            mod = _base(self._module(cur))
            if isinstance(mod, nn.Conv2d) and mod.groups == 1 and self._private(cur):
                if mod.out_channels != want.numel():
                    return False
                chain.append(cur)
                break
            if not self._channelwise(cur):
                return False
            chain.append(cur)
            prev, cur = cur, cur.args[0]
            if not isinstance(cur, fx.Node):
                return False
        for n in chain:
            if isinstance(_base(self._module(n)), (nn.Conv2d, nn.BatchNorm2d)):
                self._permute(n, want, "out")
            self.perm[n] = want
        return True

    def _channelwise(self, node: fx.Node) -> bool:
        """A unary op acting per channel on its first argument (BatchNorm only if private)."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        if node.op == "call_module":
            mod = _base(self._module(node))
            if isinstance(mod, nn.BatchNorm2d):
                return self._private(node)
            # a max-pool returning indices returns a tuple (values, indices)
            return isinstance(mod, _CHANNELWISE_MODULES) and not getattr(
                mod, "return_indices", False)
        if node.op == "call_function" and node.target is operator.getitem:
            return self._spatial_slices(node.args[1:], self._shape(node.args[0]))
        if node.op == "call_function" and node.target in _INDEX_POOL_FUNCTIONS:
            at = _INDEX_POOL_FUNCTIONS[node.target]
            flag = node.args[at] if len(node.args) > at else node.kwargs.get("return_indices",
                                                                             False)
            if flag is not False:  # True, or not known while tracing: a tuple, maybe
                return False
        known = {"call_function": _CHANNELWISE_FUNCTIONS, "call_method": _CHANNELWISE_METHODS}
        return node.target in known.get(node.op, ()) and not any(  # no second tensor operand
            isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values()))

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
                        self._permute(node, self.perm[src], "out")
                    self.perm[node] = self.perm[src]
            elif (node.op == "call_function" and node.target in _BINARY) or (
                    node.op == "call_method" and node.target in _BINARY_METHODS):
                self._binary(node)
            elif isinstance(mod, nn.Conv2d) and mod.groups == 1 and self._private(node) \
                    and len(node.args) == 1 and node.args[0] in self.perm:
                # A dense conv reads the stored order: permute its input channels instead.
                self._permute(node, self.perm[node.args[0]], "in")
            elif (order := self._padded_order(node)) is not None:
                self.perm[node] = order
            elif self._mutates(node) and node.args[0] in self.perm \
                    and any(len(n.users) > 1 for n in self._aliased(node.args[0])):
                # it would write into a gathered copy, which the tensor's other readers
                # (and views of it, or the tensor it is a view of) do not see
                raise TypeError(f"{node.format_node()}: an in-place op, not channel-wise, on a "
                                "permuted tensor read elsewhere too")
            else:
                self._materialize(node)
            if self._mutates(node):
                self._written(node)
            self.done.add(node)

    def _written(self, node: fx.Node) -> None:
        """``node`` writes into its first argument (and the tensors that shares memory with)."""
        chain = list(self._aliased(node.args[0]))
        for k, n in enumerate(chain):
            if n in self.gathered:  # a view of a gathered copy: the write stays in the copy
                seen = chain[:k + 1] + list(self._aliased(self.gathered[n]))
                if any(len(m.users) > 1 for m in seen):
                    raise TypeError(f"{node.format_node()}: an in-place op on a view of a "
                                    "permuted tensor read elsewhere too")
        # gathered copies of anything sharing memory with it are stale from here on
        root = chain[-1]
        self.reordered = {k: v for k, v in self.reordered.items()
                          if list(self._aliased(k[0]))[-1] is not root}

    def _hetconv(self, node: fx.Node, layer: HetConv2d) -> None:
        maps = _blocked_maps(layer)
        pi_in, pi_out = maps["pi_in"], maps["pi_out"]
        src = node.args[0]
        if src not in self.perm:
            self._pull_back(src, pi_in)  # else _reorder gathers
        node.args = (self._reorder(src, pi_in, node),)
        self.perm[node] = pi_out
        self.rewritten += 1
        if self.share:
            self._add_view(node, _BlockedView(layer))
            return
        twin = _blocked_twin(layer)
        name = node.target
        if self.calls.get(layer) == 1 and layer not in self.exposed:
            parent, _, child = name.rpartition(".")
            setattr(self.gm.get_submodule(parent) if parent else self.gm, child, twin)
        else:  # shared module: a twin of its own for this call site
            name = f"_hetconv_blocked_{self.rewritten}"
            self.gm.add_submodule(name, twin)
            node.target = name
        self.modules[node.target] = twin
        self.calls[twin] = 1

    def _binary(self, node: fx.Node) -> None:
        tensors = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        orders = [self.perm.get(a) for a in tensors]
        inplace = self._inplace(node) and isinstance(node.args[0], fx.Node)
        if inplace:  # the mutated operand must not be replaced by a copy: its order wins
            first = self.perm.get(node.args[0])
            if first is None:
                self._materialize(node)  # gathers the other operands only
                return
            lead = node.args[0]
        else:
            first = next((o for o in orders if o is not None), None)
            if first is None:
                return
            lead = tensors[[o is first for o in orders].index(True)]
        # How each natural operand follows the stored order: gathered along the dim that
        # broadcasts against the channels, left alone when it has no channel extent.
        # Unknown shapes (no example_input) cannot be told from broadcasts: give up.
        dims = {}
        for a, o in zip(tensors, orders):
            dims[a] = _CHANNELS if o is not None else self._channel_dim(a, self._shape(lead))
        if all(d is not False for d in dims.values()):
            def fix(a):
                if not isinstance(a, fx.Node) or dims[a] is None:
                    return a
                return self._reorder(a, first, node, dims[a])
            node.args = fx.map_arg(node.args, fix)
            node.kwargs = fx.map_arg(node.kwargs, fix)
            self.perm[node] = first
        elif inplace:
            raise TypeError(f"{node.format_node()}: an in-place op on a permuted tensor with an "
                            "operand of unknown shape; pass example_input")
        else:
            self._materialize(node)

    def _channel_dim(self, node: fx.Node, lead_shape):
        """Dim of ``node`` (counted from the end) that broadcasts against the channels of a
        ``lead_shape`` tensor (None: size 1 or absent, nothing to reorder; False: unknown or
        incompatible)."""
        shape = self._shape(node)
        if shape is None or lead_shape is None or len(shape) > len(lead_shape) \
                or len(lead_shape) < -_CHANNELS:
            return False
        if len(shape) < -_CHANNELS or shape[_CHANNELS] == 1:
            return None
        return _CHANNELS if shape[_CHANNELS] == lead_shape[_CHANNELS] else False

    @staticmethod
    def _spatial_slices(args: tuple, shape: Optional[tuple]) -> bool:
        """``args`` of ``x[args]`` (``x`` of ``shape``, None: unknown): constant slices that
        keep the channels whole (``x[:, :, ::2]`` of a batch: each channel sliced alike,
        e.g. a subsampling shortcut).  The channels are dim 1 of a batch, dim 0 of an
        unbatched (C, H, W) tensor: of unknown rank, both are kept whole unless the index
        has four entries (a 3-d tensor does not take them)."""
        if len(args) != 1 or not isinstance(args[0], tuple) or len(args[0]) < 2:
            return False
        index = args[0]
        if shape is not None:
            if len(shape) < -_CHANNELS or len(index) > len(shape):
                return False
            whole = (len(shape) + _CHANNELS,)
        else:
            whole = (1,) if len(index) >= 4 else (0, 1)
        return (all(isinstance(s, slice) and all(v is None or type(v) is int
                                                 for v in (s.start, s.stop, s.step))
                    for s in index)
                and all(index[k] == slice(None) for k in whole))

    def _padded_order(self, node: fx.Node) -> Optional[torch.Tensor]:
        """Stored order of ``F.pad(x, pad, ...)`` on a 4-d (or unbatched 3-d) ``x`` stored
        permuted: padding only height and width keeps the order; constant padding of the
        channels (a zero-padded shortcut) adds channels that keep their natural places
        around the permuted ones. None: not such a pad (or shapes unknown)."""
        if node.op != "call_function" or node.target is not F.pad or not node.args:
            return None
        src, rest = node.args[0], list(node.args[1:]) + list(node.kwargs.values())
        have, shape = self.perm.get(src), self._shape(src)
        if have is None or shape is None or len(shape) not in (3, 4) or any(
                isinstance(a, fx.Node) for a in rest):
            return None
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        if not isinstance(pad, (tuple, list)) or len(pad) % 2 or len(pad) > 8 or not all(
                type(v) is int for v in pad):
            return None
        pad = list(pad) + [0] * (8 - len(pad))
        front, back = pad[4], pad[5]
        if pad[6] or pad[7] or front < 0 or back < 0 or ((front or back) and mode != "constant"):
            return None
        c = have.numel()
        return torch.cat([torch.arange(front), have + front,
                          torch.arange(front + c, front + c + back)])

    @staticmethod
    def _aliased(node: fx.Node):
        """``node`` and the tensors it may be a view of (through indexing and view-like
        methods), whose memory a write into ``node`` changes too."""
        yield node
        while isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node) \
                and ((node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
                     or (node.op == "call_method" and node.target in _VIEW_METHODS)):
            node = node.args[0]
            yield node

    def _mutates(self, node: fx.Node) -> bool:
        """May ``node`` write into its first argument?"""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        mod = _base(self._module(node))
        if node.op == "call_function":
            at = _inplace_position(node.target)
            if at is not None and len(node.args) > at and node.args[at] is True:
                return True  # F.relu(x, True), F.hardtanh(x, -1, 1, True), ...
        return self._inplace(node) or node.kwargs.get("inplace") is True or (
            node.op == "call_function" and node.target in (torch.relu_, F.relu_,
                                                           operator.setitem)) or (
            mod is not None and getattr(mod, "inplace", False) is True)

    @staticmethod
    def _inplace(node: fx.Node) -> bool:
        return (node.op == "call_function" and node.target in _INPLACE) or (
            node.op == "call_method" and node.target.endswith("_"))

    @staticmethod
    def _shape(node: fx.Node):
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def absorb_permutations(model: nn.Module, example_input: Optional[torch.Tensor] = None, *,
                        share_parameters: bool = False) -> fx.GraphModule:
    """``model`` with every shifted HetConv2d run as a blocked one on class-sorted channels.

    Args:
        model: a module traceable by ``torch.fx`` (HetConv2d and the package's
            layers are kept as leaves).
        example_input: optional input batch; with it, shapes are propagated (in
            eval mode) and a residual sum of a permuted and a natural tensor
            gathers the natural one into the stored order (keeping the rest of
            the network permuted) instead of gathering the permuted one back.
        share_parameters: ``False`` (inference, the default): work on a copy
            and store the permuted weights (``model`` is left untouched).
            ``True`` (training): the result runs on ``model``'s own parameters
            and buffers, permuting them per call (weight-sized, differentiable
            index ops; BatchNorm statistics are written back in natural order),
            so its ``state_dict`` is ``model``'s, optimizers and checkpoints of
            ``model`` keep working, and training it trains ``model``.

    Returns a ``torch.fx.GraphModule`` computing the same function (float
    summation order aside).  ``hetconv_permutations`` on it reports the number
    of rewritten layers and of remaining gathers.  Raises ``TypeError`` when
    ``model`` cannot be traced symbolically (data-dependent control flow).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor or None, got {type(example_input).__name__}")
    if not isinstance(share_parameters, bool):
        raise TypeError(f"share_parameters must be a bool, got {share_parameters!r}")
    root = model if share_parameters else copy.deepcopy(model)
    try:
        graph = PermutationTracer().trace(root)
    except Exception as exc:  # fx raises many types for untraceable code
        raise TypeError(f"model cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
                        "absorb_permutations needs a symbolically traceable model") from exc
    # Built before the rewrite: every module the model calls is registered in it, under
    # its own name (shared, not copied, with share_parameters).
    gm = fx.GraphModule(root, graph, root.__class__.__name__)
    if example_input is not None:
        from torch.fx.passes.shape_prop import ShapeProp
        with evaluating(gm), torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    gm.training = model.training
    rewriter = _Rewriter(gm, share_parameters)
    rewriter.run()
    gm.graph.lint()
    if not share_parameters:  # the views keep the originals registered (state_dict)
        gm.delete_all_unused_submodules()
    gm.recompile()
    gm.hetconv_permutations = {"rewritten_layers": rewriter.rewritten, "gathers": rewriter.gathers}
    return gm
