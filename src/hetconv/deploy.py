"""Deployment: fold BatchNorm into convolutions, pick backends, export to ONNX.

``optimize_for_inference(model, example_input)``
    A copy of ``model`` in eval mode with every BatchNorm that directly follows
    a convolution folded into it, each :class:`~hetconv.HetConv2d` set to the
    backend that is fastest *for its own input* (measured once on
    ``example_input``) and the memory format (NCHW or channels_last) that
    makes the whole model fastest.  Outputs are checked against the original.

``export_onnx(model, path, example_input)``
    ONNX with standard operators only.  Each HetConv2d is written either in
    its ``"grouped"`` form (Gather + grouped Conv + 1x1 Conv + Add: the cheap
    form, which onnxruntime runs at grouped-conv cost) or its ``"dense"``
    form (one Conv with the zero-padded kernel: exact, dense cost).
"""

from __future__ import annotations

import collections
import copy
import functools
import inspect
import logging
import operator
import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as HF
from ._files import replacing
from ._modes import evaluating, read_modules, shared_modules
from ._timing import time_interleaved
from .convert import _replace
from .layers import HetConv2d, MaxPool2x2
from .native import ForwardPlan, PlanHolder
from .permute import (PermutationTracer, _inplace_position, absorb_permutations,
                      has_shifted_layers)

__all__ = ["fold_batchnorm", "optimize_for_inference", "export_onnx", "export_module",
           "NativeFused", "NativeChain", "NativeSequence", "ChannelPadShortcut",
           "PackedConv2d", "InputFormat", "plan_summary"]

log = logging.getLogger(__name__)

_CONVS = (nn.Conv2d, HetConv2d)
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
EXPORT_FORMS = ("grouped", "dense")
#: export_onnx's lowest opset: the strided slices of shortcuts (``x[:, :, ::2, ::2]``) need
#: Slice with steps (opset 10)
MIN_OPSET = 10
#: optimize_for_inference's whole-model choices (chained or layer by layer, the measured or
#: the rule's configuration, the memory format) time each candidate for at least this many
#: seconds in all (up to 10x ``repeats`` calls): with 5 calls, a batch-1 model of 2 ms was
#: judged on 10 ms of its calls, less than one of the host's speed swings lasts.
MODEL_DECISION_SECONDS = 0.25
#: optimize_for_inference's choices stop timing a candidate once its fastest call took more
#: than this many times the best median (``time_interleaved``'s ``prune``): the dense and
#: grouped backends of a P = 4 layer, 2-3x slower than the native one, were called as
#: often as the contenders.
DECISION_PRUNE = 1.5


# ---------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------

def _bn_scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with ``bn(z) == z * s + t`` per channel in eval mode."""
    s = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight
    t = -bn.running_mean * s
    if bn.bias is not None:
        t = t + bn.bias
    return s, t


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if isinstance(conv, _CONVS) and isinstance(bn, nn.BatchNorm2d):
        width = conv.out_channels
    elif isinstance(conv, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
        width = conv.out_features
    else:
        return False
    # a training-mode BatchNorm normalises by batch statistics: no fixed affine map to fold
    return bn.running_mean is not None and not bn.training and bn.num_features == width


@torch.no_grad()
def _fold_pair(conv: nn.Module, bn: nn.Module) -> None:
    """Scale ``conv``'s weights per filter (output feature) and set its bias so ``conv``
    alone equals ``bn(conv)``."""
    s, t = _bn_scale_shift(bn)
    weights = [conv.weight_k, conv.weight_1] if isinstance(conv, HetConv2d) else [conv.weight]
    for w in weights:
        w.mul_(s.to(w.dtype).reshape((-1,) + (1,) * (w.dim() - 1)))
    ref = weights[0]
    bias = t if conv.bias is None else conv.bias * s + t
    conv.bias = nn.Parameter(bias.to(device=ref.device, dtype=ref.dtype),
                             requires_grad=ref.requires_grad)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, each eval-mode BatchNorm that directly follows a conv (or a linear
    layer). Returns the count.

    A pair is folded where the model's forward, traced by ``torch.fx``, applies the
    BatchNorm to the conv's output and to nothing else, the conv's output going nowhere
    else, each module called once, registered under one name, its parameters its own and
    not read elsewhere in the forward (``conv -> BN -> ReLU`` units in an ``nn.Sequential``,
    torchvision's ``convK`` / ``bnK`` pairs, a depthwise conv and its BatchNorm inside a
    block, a block's last conv and the BatchNorm after the block).  Names or neighbourhood
    alone are never taken as proof: a ``bn1`` applied to something else than ``conv1``'s
    output, a conv whose output also feeds a residual, a conv called twice stay as they
    are.  A submodule fx cannot trace is kept whole (its own forward is traced on its
    own); a model whose own forward fx cannot trace has its children traced one by one.
    Convs are ``nn.Conv2d`` and :class:`HetConv2d`; the conv (or linear layer) gains a
    bias, the BatchNorm becomes ``nn.Identity``.  BatchNorms without running statistics
    and BatchNorms in training mode (they normalise by batch statistics) are left alone.
    A linear layer and its BatchNorm1d are folded as a head's are: on
    2-d activations (batch, features), where BatchNorm1d normalises the linear layer's
    outputs (on a 3-d one it would normalise dimension 1 instead; ``optimize_for_inference``
    checks its outputs).  Call on a model in eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    folded = 0
    for conv_name, bn_name in _traced_pairs(model):
        _fold_pair(model.get_submodule(conv_name), model.get_submodule(bn_name))
        _replace(model, bn_name, nn.Identity())
        folded += 1
    return folded


class _FoldTracer(torch.fx.Tracer):
    """Traces into every module but torch's own layers, HetConv2d, ``fx_leaf`` classes and
    the modules in ``leaves``: the package's two-layer baselines (a depthwise conv and its
    BatchNorm inside one module) show their convolutions and BatchNorms.  ``failed``: the
    innermost module whose forward the trace failed in (None: the root's own forward)."""

    def __init__(self, leaves: Optional[set] = None) -> None:
        super().__init__()
        self.leaves = leaves if leaves is not None else set()
        self.failed: Optional[Tuple[str, nn.Module]] = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.leaves or isinstance(m, HetConv2d) or \
            getattr(type(m), "fx_leaf", False) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:  # the innermost module raises first
                self.failed = (self.path_of_module(m), m)
            raise


def _traced_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """(conv, BatchNorm) module names that ``model``'s forward applies back to back: the
    BatchNorm's only input is the conv's output, its only use; each module called once and
    registered once, its parameters owned by it alone and read by nothing else.  Modules
    fx cannot trace into are traced on their own (their callers see one node); when the
    model's own forward fails, its children are."""
    shared = shared_modules(model)

    def own(m: nn.Module) -> bool:
        return m not in shared

    pairs: List[Tuple[str, str]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        leaves: Dict[int, str] = {}
        while True:
            tracer = _FoldTracer(set(leaves))
            try:
                graph = tracer.trace(module)
                break
            except Exception:  # data-dependent control flow, unsupported ops
                if tracer.failed is None or id(tracer.failed[1]) in leaves:
                    for name, child in module.named_children():
                        if next(child.children(), None) is not None:
                            visit(child, prefix + name + ".")
                    return
                leaves[id(tracer.failed[1])] = tracer.failed[0]
        pairs.extend((prefix + c, prefix + b) for c, b in _graph_pairs(module, graph, own))
        for name in leaves.values():  # traced on their own: their pairs are theirs alone
            visit(module.get_submodule(name), prefix + name + ".")

    visit(model, "")
    return pairs


def _call_counts(graph: torch.fx.Graph) -> Dict[str, int]:
    """How many times ``graph`` calls each module (by name)."""
    return dict(collections.Counter(n.target for n in graph.nodes if n.op == "call_module"))


def _graph_pairs(model: nn.Module, graph: torch.fx.Graph,
                 own: Callable[[nn.Module], bool]) -> List[Tuple[str, str]]:
    """The (conv, BatchNorm) pairs of one traced ``graph`` of ``model``."""
    calls = _call_counts(graph)
    read = read_modules(model, graph)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[node.target] != 1 or calls[src.target] != 1:
            continue
        conv, bn = model.get_submodule(src.target), model.get_submodule(node.target)
        if own(conv) and own(bn) and not {conv, bn} & read and _foldable(conv, bn):
            pairs.append((src.target, node.target))
    return pairs


# ---------------------------------------------------------------------------
# Backend and memory-format selection
# ---------------------------------------------------------------------------

def _capture_inputs(model: nn.Module, example_input: torch.Tensor,
                    kinds: tuple = (HetConv2d,),
                    strides: Optional[Dict[nn.Module, tuple]] = None
                    ) -> Dict[nn.Module, torch.Tensor]:
    """The input each module of ``kinds`` in ``model`` sees on ``example_input`` (in
    execution order), and into ``strides``, when given, the strides of its output."""
    seen: Dict[nn.Module, torch.Tensor] = {}

    def before(mod, args):  # hooks return None: the module's input and output stay its own
        seen.setdefault(mod, args[0].detach())

    def after(mod, args, y):
        strides.setdefault(mod, y.stride())

    kept = [m for m in model.modules() if isinstance(m, kinds)]
    hooks = [m.register_forward_pre_hook(before) for m in kept]
    if strides is not None:
        hooks += [m.register_forward_hook(after) for m in kept]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _fastest_backend(layer: HetConv2d, x: torch.Tensor, repeats: int) -> Tuple[str, dict]:
    """The backend of ``layer`` that runs fastest on ``x`` (ties go to the earlier of
    :data:`hetconv.BACKENDS`). ``"auto"`` is a candidate too where the rule changes the
    input's memory layout for its backend (wide layers on NCHW input run the channels-last
    kernel): no named backend runs that on ``x``."""
    if layer.part == 1:
        return "dense", {}

    def run(backend):
        def call():
            return HF.het_conv2d(x, layer.weight_k, layer.weight_1, layer.bias, layer.stride,
                                 layer.padding, layer.dilation, layer.pattern, backend)
        return call

    candidates = tuple(HF.BACKENDS)
    _, resolved = HF._resolve(x, layer.weight_k, layer.weight_1, layer.stride, layer.padding,
                              layer.dilation, layer.pattern, "auto", layer.in_channels,
                              layer.part)
    if resolved.stride() != x.stride():
        candidates += ("auto",)
    # settle=1: each timed call follows an untimed one of the same backend, so no backend is
    # timed in the wake of another's (cold caches, other buffers): docs/performance.md.
    with torch.no_grad():
        times = time_interleaved({b: run(b) for b in candidates}, repeats=repeats, warmup=1,
                                 settle=1, prune=DECISION_PRUNE)
    medians = {b: t.median for b, t in times.items()}
    return min(medians, key=medians.get), medians


def _native_dense_ok(conv: nn.Module) -> bool:
    """A dense convolution the NCHW kernel can compute (as a HetConv2d with P = 1)."""
    if type(conv) is not nn.Conv2d:
        return False
    k = tuple(conv.kernel_size)
    return (conv.groups == 1 and tuple(conv.dilation) == (1, 1)
            and conv.padding_mode == "zeros" and all(v % 2 == 1 for v in k)
            and tuple(conv.padding) == (k[0] // 2, k[1] // 2)
            and tuple(conv.stride) in ((1, 1), (2, 2)) and conv.weight.dtype == torch.float32)


def _as_native_p1(conv: nn.Conv2d) -> HetConv2d:
    """``conv`` as a HetConv2d with P = 1 (every tap on every channel: the same dense
    kernel) on the native backend."""
    layer = HetConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      bias=conv.bias is not None, part=1, backend="native",
                      device=conv.weight.device)
    with torch.no_grad():
        layer.weight_k.copy_(conv.weight)
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
    if not torch.equal(layer.dense_weight(), conv.weight):  # P = 1: weight_k is the kernel
        raise AssertionError("P = 1 HetConv2d does not hold the dense kernel as it is")
    layer.requires_grad_(False)
    return layer.eval()


def _swap_if_faster(out: nn.Module, plan: dict, name: str, conv: nn.Module, xin: torch.Tensor,
                    new: nn.Module, backend: str, call, origin: str, repeats: int,
                    relu: bool = False, rivals: Optional[dict] = None) -> bool:
    """Time ``conv`` against ``call`` (``new``'s computation) on ``xin``, interleaved; when
    ``call`` is faster, put ``new`` in ``conv``'s place (``name`` in ``out``) and record both
    medians in ``plan["layers"][name]`` under ``backend``.  Returns whether it did.
    ``relu``: the ReLU that follows ``conv`` (which ``call`` runs fused) is timed after it.
    ``rivals``: more candidates (name: call) timed with them, which ``call`` must beat too
    (another pass can take them)."""
    dense = (lambda: torch.relu_(conv(xin))) if relu else (lambda: conv(xin))
    with torch.no_grad():
        times = time_interleaved({"dense": dense, backend: call, **(rivals or {})},
                                 repeats=repeats, warmup=1, settle=1, prune=DECISION_PRUNE)
    medians = {k: t.median for k, t in times.items()}
    if medians[backend] >= min(m for k, m in medians.items() if k != backend):
        return False
    _replace(out, name, new)
    plan["layers"][name] = {"backend": backend, "seconds": medians, "from": origin,
                            "relu": relu}
    return True


def _relu_after(model: nn.Module) -> set:
    """The ``nn.Conv2d`` modules of ``model`` whose output only a ReLU uses (through
    ``nn.Identity``: a folded BatchNorm), from its fx graph; none where fx cannot trace it."""
    gm = model if isinstance(model, torch.fx.GraphModule) else _traced(model)
    if gm is None:
        return set()
    modules = dict(gm.named_modules())
    return {modules[node.target] for node, _ in _relu_users(
        gm, modules, lambda m: type(m) is nn.Conv2d)}


def _relu_users(gm: torch.fx.GraphModule, modules: dict, kind: Callable[[nn.Module], bool]):
    """``(node, after)`` for each call of a module ``kind`` accepts whose output only a ReLU
    uses: ``after``, the ``nn.Identity`` nodes between them and the ReLU node, in order."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and kind(modules.get(node.target)):
            idents, nxt = _after_identities(node, modules)
            if _is_relu(nxt, modules):
                yield node, idents + [nxt]


def _native_dense_convs(out: nn.Module, x: torch.Tensor, repeats: int,
                        plan: dict, pack: bool = False) -> Dict[str, nn.Conv2d]:
    """Replace the dense convolutions (a stem, say) that the native kernel runs faster than
    ``nn.Conv2d`` on their own input by P = 1 HetConv2d layers on it (their timings go
    to ``plan["layers"]``); returns the replaced convolutions by name. NCHW input runs the
    NCHW kernel; channels_last input the channels-last kernel, on the layers it computes
    (16 | N: the output stays channels_last, as the model's next layer expects). The kernel
    runs them only inside a :class:`NativeFused` (a HetConv2d with P = 1 runs the dense
    convolution): :func:`_configure` puts back those that fusion did not take.  ``pack``:
    the packed convolution (:func:`_packed_dense_convs` runs later) is timed with them, and
    a convolution it runs faster than the kernel is left to it."""
    if not HF._native.vectorized():
        return {}
    names = {m: n for n, m in out.named_modules() if _native_dense_ok(m)}
    if not names:
        return {}
    inputs = _capture_inputs(out, x, (nn.Conv2d,))
    relu_after = _relu_after(out)  # fused with it later (NativeFused): timed with it
    replaced = {}
    for conv, name in names.items():
        xin = inputs.get(conv)
        if xin is None or xin.dim() != 4 or xin.dtype != torch.float32:
            continue
        if not (xin.is_contiguous() or (HF._native.nhwc_supported(
                conv.out_channels, conv.in_channels, 1, "blocked") and xin.is_contiguous(
                memory_format=torch.channels_last))):
            continue
        layer = _as_native_p1(conv)
        relu = conv in relu_after
        args = (layer.weight_k, layer.weight_1, layer.bias, layer.pattern, relu, None,
                layer.stride[0])
        rivals = {}
        if pack and _packing_available() and _packable(conv):
            packed = PackedConv2d(conv)
            packed.relu = relu
            rivals["packed"] = lambda: packed(xin)
        # the kernel itself (HetConv2d runs P = 1 densely; NativeFused does not)
        if _swap_if_faster(out, plan, name, conv, xin, layer, "native",
                           lambda: HF._native.native_conv2d(xin, *args),
                           "nn.Conv2d (as P = 1)", repeats, relu, rivals):
            replaced[name] = conv
    return replaced


def _absorbed(model: nn.Module, example_input: Optional[torch.Tensor]) -> Tuple[nn.Module, dict]:
    """``absorb_permutations(model)`` when it has shifted layers and fx can trace it."""
    if isinstance(model, HetConv2d) or not has_shifted_layers(model):
        return model, {"rewritten_layers": 0, "gathers": 0}
    try:
        out = absorb_permutations(model, example_input)
    except TypeError as exc:
        warnings.warn(f"shifted permutations not absorbed: {exc}", RuntimeWarning, stacklevel=3)
        return model, {"rewritten_layers": 0, "gathers": 0, "error": str(exc)}
    for p in out.parameters():
        p.requires_grad_(False)
    return out, dict(out.hetconv_permutations)


# ---------------------------------------------------------------------------
# Dense convolutions with their weights packed once (oneDNN)
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _packing_available() -> bool:
    """Whether this torch has oneDNN's convolution with pre-packed weights (a property of
    the build: asked once, not on every call)."""
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))
    except (AttributeError, RuntimeError):
        return False


def _pack_weight(weight: torch.Tensor, padding: list, stride: list, dilation: list,
                 groups: int, input_size: list) -> torch.Tensor:
    """``weight`` in the layout oneDNN's convolution wants for inputs of ``input_size``."""
    return torch.ops.mkldnn._reorder_convolution_weight(weight, padding, stride, dilation,
                                                        groups, input_size)


def _packable(conv: nn.Module) -> bool:
    """A dense 2-d convolution :class:`PackedConv2d` takes: ``nn.Conv2d`` itself (not a
    subclass, whose forward may differ) with numeric zero padding, in float32 on the CPU."""
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and conv.weight.dtype == torch.float32
            and conv.weight.device.type == "cpu")


class PackedConv2d(PlanHolder, nn.Module):
    """An ``nn.Conv2d`` for inference whose weights oneDNN reorders once per input shape,
    not on every call.

    ``nn.Conv2d`` hands oneDNN the weights in PyTorch's layout, and oneDNN reorders them
    into its own blocked layout on every call; at batch 1 that reorder (the weights of a
    512-channel 3x3 layer are 9 MB) costs more than the convolution, and for small inputs
    PyTorch takes its slower im2col path instead.  This module packs the weights for an
    input shape on its first call with that shape and keeps them (left out of copies and
    pickles, rebuilt on the next call).  Outputs have the input's memory format, as
    ``nn.Conv2d``'s do.

    ``weight`` and ``bias`` stay the plain tensors (``state_dict``, ONNX export and
    ``torch.compile`` see an ordinary convolution): calls that need gradients, traced or
    compiled calls, and inputs that are not 4-d float32 CPU tensors, dense in NCHW or
    channels_last, run ``F.conv2d`` on them.  In fx graphs it is one node (``fx_leaf``).
    With ``relu`` set, the ReLU after the convolution runs in oneDNN's convolution as it
    writes its output (no second pass over it; ``F.relu`` after ``F.conv2d`` elsewhere).
    :func:`optimize_for_inference` uses it where it measures it faster, and fuses the ReLU
    that follows it in the model's graph.
    """

    #: one node in the package's fx graphs (its forward branches on the input)
    fx_leaf = True

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not _packable(conv):
            raise TypeError("conv must be an nn.Conv2d with numeric zero padding, float32 "
                            f"weights on the CPU, got {conv!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding = tuple(conv.stride), tuple(conv.padding)
        self.dilation, self.groups = tuple(conv.dilation), conv.groups
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.relu = False

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}"
                + (", relu=True" if self.__dict__.get("relu") else ""))

    def _fast(self, x: torch.Tensor) -> bool:
        if (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export()):
            return False  # a graph of standard ops, not of this process's packed weights
        return (x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu"
                and self.weight.device.type == "cpu" and x.shape[1] == self.in_channels
                # a dense NCHW or channels_last input (its output's layout is then plain)
                and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and _packing_available())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    stride=1, padding=0, dilation=1, groups: int = 1) -> "PackedConv2d":
        """The packed convolution with kernel ``weight`` (out, in / groups, kh, kw), as
        ``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` computes it."""
        n, m_g, kh, kw = weight.shape
        conv = nn.Conv2d(m_g * groups, n, (kh, kw), stride, padding, dilation, groups,
                         bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return cls(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = self.__dict__.get("relu", False)  # (modules saved before it existed: False)
        if not self._fast(x):
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                         self.groups)
            return F.relu(y) if relu else y
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        # the weights' storage and version, as a prepared native call checks them
        key = (tuple(x.shape),) + ForwardPlan._state((self.weight,))
        packed = self._plan_for(key)
        if packed is False:
            packed = _pack_weight(self.weight, *args, list(x.shape))
            self._keep_plan(key, packed)
        y = torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, *args,
                                                     "relu" if relu else "none", [], "")
        if x.is_contiguous() and not y.is_contiguous():  # NCHW in, NCHW out
            y = y.contiguous()
        return y


def _packed_dense_convs(out: nn.Module, x: torch.Tensor, repeats: int, plan: dict,
                        fuse: bool = False) -> int:
    """Replace each ``nn.Conv2d`` that a :class:`PackedConv2d` runs faster on its own input
    (in execution order, on ``x``) by one; their timings go to ``plan["layers"]``.  Returns
    how many were replaced.  ``fuse``: a ReLU that follows a convolution will run inside
    the packed one (:func:`_fuse_packed_relus`), so both are timed with it."""
    if not _packing_available():
        return 0
    names = {m: n for n, m in out.named_modules() if _packable(m)}
    if not names:
        return 0
    inputs = _capture_inputs(out, x, (nn.Conv2d,))
    relu_after = _relu_after(out) if fuse else set()
    replaced = 0
    for conv, name in names.items():
        xin = inputs.get(conv)
        if xin is None or xin.dim() != 4:
            continue
        packed = PackedConv2d(conv)
        packed.relu = relu = conv in relu_after
        replaced += _swap_if_faster(out, plan, name, conv, xin, packed, "packed",
                                    lambda: packed(xin), "nn.Conv2d", repeats, relu)
        packed.relu = False  # set again where the graph's ReLU moves into it
    return replaced


# ---------------------------------------------------------------------------
# Fusing what follows a native HetConv2d into its kernel
# ---------------------------------------------------------------------------

class NativeFused(PlanHolder, nn.Module):
    """A :class:`HetConv2d` with the residual sum and/or ReLU after it run in its kernel,
    and a 2x2 max-pool after those.

    ``forward(x[, residual])`` equals ``pool(relu(layer(x) + residual))`` (each part
    optional; ``pool`` an ``nn.MaxPool2d`` of kernel 2 and stride 2, see
    :func:`poolable`).  When the ``"native"`` kernel applies to the call (the layer's
    backend is ``"native"``, float32 input, stride 1 or 2, ...) the sum and the
    ReLU happen as the kernel stores each output value: no extra passes over
    the activations.  The pool does too, outside autograd, where the channels-last kernel
    runs and the layer's output has even height and width: each output value is compared
    with its window's so far as it is stored, and only the pooled activations are written.
    Otherwise the layer runs as usual and the sum, ReLU and pool follow as separate ops.
    Built by :func:`optimize_for_inference`.
    """

    def __init__(self, layer: HetConv2d, relu: bool, residual: bool,
                 pool: Optional[nn.MaxPool2d] = None) -> None:
        super().__init__()
        self.layer, self.relu, self.residual = layer, bool(relu), bool(residual)
        if pool is not None and not poolable(pool):
            raise ValueError(f"pool must be an nn.MaxPool2d of kernel 2, stride 2, no padding "
                             f"or dilation, without indices; got {pool!r}")
        self.pool = None if pool is None else _fast_pool(pool)
        self._verdicts: dict = {}  # call signature -> whether the kernel applies

    def _signature(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> tuple:
        """Every input of whether (and which) kernel applies to a call."""
        layer = self.layer
        return (layer.backend, layer.part, layer.pattern, layer.padding_mode, layer.stride,
                layer.padding, layer.dilation, layer.weight_k.dtype, tuple(x.shape), x.dtype,
                x.device, HF._native._is_channels_last(x), torch.is_autocast_enabled("cpu"),
                None if residual is None else (tuple(residual.shape), residual.dtype))

    def _native(self, key: tuple, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
        """Whether the kernel applies to this call; remembered per call signature (``key``),
        which saves ~20 us per call at batch 1."""
        verdict = self._verdicts.get(key)
        if verdict is None:
            if len(self._verdicts) >= 64:  # many input sizes: start over rather than grow
                self._verdicts.clear()
            verdict = self._verdicts[key] = self._check(x, residual)
        return verdict

    def _check(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
        layer = self.layer
        if getattr(layer, "backend", None) != "native" or x.dim() != 4:
            return False
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            return False
        if HF._native.unsupported_reason(x, layer.weight_k, layer.stride, layer.padding,
                                         layer.dilation) is not None:
            return False
        s = layer.stride[0]
        want = (x.shape[0], layer.out_channels) + tuple(
            HF._native._out_size(size, k, s) for size, k in zip(x.shape[2:], layer.kernel_size))
        return residual is None or (tuple(residual.shape) == want
                                    and residual.dtype == torch.float32)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        pool = self._modules.get("pool")  # (None in modules saved before pools were fused)
        if pool is None:
            return self._conv(x, residual)
        y = self._pooled(x, residual)
        return y if y is not None else pool(self._conv(x, residual))

    def _pooled(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The forward with the pool in the channels-last kernel, or None where it does not
        apply (no kernel call made)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None
        return self._planned(self._signature(x, residual), x, residual, pool=2)

    def _conv(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        """The forward without the pool."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():  # traced: no Python plans
            return self._kernel(x, residual) if self._check(x, residual) else \
                self._unfused(x, residual)
        key = self._signature(x, residual)
        y = self._planned(key, x, residual, pool=0)
        if y is not None:
            return y
        # autograd, inference-mode weights, ...: the kernel without a plan, or the layer
        return self._kernel(x, residual) if self._native(key, x, residual) else \
            self._unfused(x, residual)

    def _kernel(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        """The forward without the pool by the kernel, without a prepared call."""
        layer = self.layer
        return HF._native.native_conv2d(x, layer.weight_k, layer.weight_1, layer.bias,
                                        layer.pattern, self.relu, residual, layer.stride[0])

    @staticmethod
    def _plan_key(key: tuple, pool: int) -> tuple:
        """Where the prepared call of signature ``key`` is kept (pooled calls apart)."""
        return ("pool",) + key if pool else key

    def _prepared(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[ForwardPlan]]:
        """The forward of ``x`` (no residual; the pool in the kernel, if any) through its
        prepared kernel call, and that call: ``(output, plan)``, or ``(None, None)`` where no
        prepared call applies (nothing run)."""
        pool = 2 if self._modules.get("pool") is not None else 0
        key = self._signature(x, None)
        y = self._planned(key, x, None, pool=pool)
        plan = self._plan_for(self._plan_key(key, pool))
        return (y, plan) if y is not None and isinstance(plan, ForwardPlan) else (None, None)

    def _planned(self, key: tuple, x: torch.Tensor, residual: Optional[torch.Tensor],
                 pool: int) -> Optional[torch.Tensor]:
        """The call through the prepared kernel call kept for its signature ``key`` (``pool``
        = 2: with the pool in the kernel), made on its first call: ~30 us less per call than
        :func:`hetconv.native.native_conv2d`.  None where no plan applies now (nothing run):
        the kernel does not apply to the signature (remembered), or the plan does not hold
        for this call (autograd, ...)."""
        layer = self.layer
        params = (layer.weight_k, layer.weight_1, layer.bias)
        pkey = self._plan_key(key, pool)
        plan = self._plan_for(pkey)
        if plan is not False:
            y = None if plan is None else plan.run(x, residual, *params)
            if y is not None or plan is None:
                return y
        if not self._native(key, x, residual):
            self._keep_plan(pkey, None)  # never for this signature
            return None
        plan = HF._native.ForwardPlan.build(x, *params, layer.pattern, self.relu, residual,
                                            layer.stride[0], pool=pool)
        if plan is None:  # autograd, the NCHW kernel with a pool, an odd output size, ...
            return None
        self._keep_plan(pkey, plan)
        return plan.run(x, residual, *params)

    def _unfused(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        y = self.layer(x)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return f"relu={self.relu}, residual={self.residual}"


def poolable(pool: nn.Module) -> bool:
    """Whether :class:`NativeFused` can take ``pool`` into its kernel: an ``nn.MaxPool2d``
    (or :class:`hetconv.layers.MaxPool2x2`) of kernel 2 and stride 2, no padding or
    dilation, not returning indices (``ceil_mode`` does not matter: the kernel takes the
    pool only on outputs of even size)."""
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return (type(pool) in (nn.MaxPool2d, MaxPool2x2) and pair(pool.kernel_size) == (2, 2)
            and pair(pool.stride) == (2, 2) and pair(pool.padding) == (0, 0)
            and pair(pool.dilation) == (1, 1) and not pool.return_indices)


_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _fast_pool(pool: nn.Module) -> nn.Module:
    """A :func:`poolable` ``nn.MaxPool2d`` as the :class:`hetconv.layers.MaxPool2x2` of the
    same ``ceil_mode`` (the same pool; torch's NCHW max-pool kernel is 6-14x slower than
    its NCHW inference path); any other module as it is."""
    return MaxPool2x2(pool.ceil_mode) if type(pool) is nn.MaxPool2d and poolable(pool) else pool


def _fast_pools(model: nn.Module) -> int:
    """Put a :class:`hetconv.layers.MaxPool2x2` in place of each :func:`poolable`
    ``nn.MaxPool2d`` of ``model``; returns how many."""
    swaps = [(name, fast) for name, m in list(model.named_modules())
             if (fast := _fast_pool(m)) is not m]
    for name, fast in swaps:
        _replace(model, name, fast)
    return len(swaps)


def _pool_of(node, modules: dict) -> Optional[nn.MaxPool2d]:
    """The :func:`poolable` max-pool fx ``node`` applies to its one input: its
    ``nn.MaxPool2d``, or one equal to its ``F.max_pool2d`` / ``torch.max_pool2d`` call (constant
    arguments); else None."""
    if node is None:
        return None
    if node.op == "call_module":
        pool = modules.get(node.target)
        return pool if (len(node.args) == 1 and not node.kwargs and isinstance(pool, nn.Module)
                        and poolable(pool)) else None
    if node.op != "call_function" or node.target not in (F.max_pool2d, torch.max_pool2d) \
            or not 2 <= len(node.args) <= 1 + len(_POOL_ARGS):
        return None
    kw = dict(zip(_POOL_ARGS, node.args[1:]))
    if set(kw) & set(node.kwargs) or set(node.kwargs) - set(_POOL_ARGS):
        return None
    kw.update(node.kwargs)
    if any(isinstance(v, torch.fx.Node) for v in kw.values()):
        return None
    if kw.get("stride") in ([], ()):  # torch.max_pool2d's default: the kernel size
        kw["stride"] = None
    try:
        pool = nn.MaxPool2d(**kw)
    except (TypeError, ValueError):
        return None
    return pool if poolable(pool) else None


def _fuse_pools(gm: torch.fx.GraphModule) -> int:
    """Move each :func:`poolable` max-pool (``nn.MaxPool2d``, ``F.max_pool2d``,
    ``torch.max_pool2d``) that is the only user of a :class:`NativeFused` (looking through
    ``nn.Identity``) into it; returns how many."""
    fused, modules = 0, dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(module, NativeFused):
            continue
        if module._modules.get("pool") is not None:
            continue
        chain, nxt = _after_identities(node, modules)
        pool = _pool_of(nxt, modules)
        if pool is None:
            continue
        module.pool = _fast_pool(pool)
        _take_over(gm, node, chain + [nxt])
        fused += 1
    if fused:
        _tidy(gm)
    return fused


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


#: operators that write into their first operand (``x += y``, ``x[i] = v``, ...)
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.imatmul,
                      operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
                      operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.iconcat, operator.setitem, operator.delitem}


def _may_mutate(node, modules: dict) -> bool:
    """Whether fx ``node`` may write into a tensor it reads, conservatively: in-place modules
    (``inplace=True``: ``nn.ReLU``, ``nn.Hardtanh``, ``nn.Dropout``, ...) and modules fx does
    not look into that are neither torch's own nor this package's, methods ending in ``_``,
    functions ending in ``_`` or given ``inplace`` (by keyword or position) or ``out=``, and
    the in-place operators (``+=``, item assignment, ...)."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        if mod is None or getattr(mod, "inplace", False) is not False:
            return True
        return not type(mod).__module__.startswith(("torch.nn.", "hetconv."))
    if node.op == "call_method":
        return node.target.endswith("_") or "out" in node.kwargs
    if node.op != "call_function":
        return False
    fn = node.target
    if fn in _INPLACE_OPERATORS or getattr(fn, "__name__", "").endswith("_") \
            or "out" in node.kwargs or node.kwargs.get("inplace", False) is not False:
        return True
    at = _inplace_position(fn)
    return at is not None and len(node.args) > at and node.args[at] is not False


def _mutation_between(first, last, modules: dict, skip=()) -> bool:
    """Whether a node after ``first`` and before ``last`` in the graph, other than those in
    ``skip``, may write into a tensor (:func:`_may_mutate`): a pass that moves what ``first``
    computes to ``last``'s place (or the other way) could then read a value written in
    between, or miss the write (an ``nn.ReLU(inplace=True)`` on the input of a HetConv2d
    whose residual sum comes later). True, too, where ``last`` does not follow ``first``."""
    node = first.next
    while node is not last:
        if node.op == "root":  # the graph's end: last is not after first
            return True
        if node not in skip and _may_mutate(node, modules):
            return True
        node = node.next
    return False


def _after_identities(node, modules: dict) -> Tuple[list, Optional[torch.fx.Node]]:
    """The ``nn.Identity`` nodes that follow ``node``, each the only user of the one before,
    and the only user after them (None: none, or several)."""
    chain, nxt = [], _only_user(node)
    while nxt is not None and nxt.op == "call_module" and isinstance(modules.get(nxt.target),
                                                                     nn.Identity):
        chain.append(nxt)
        nxt = _only_user(nxt)
    return chain, nxt


def _take_over(gm: torch.fx.GraphModule, node, after: list) -> None:
    """``node`` now computes what the last of ``after`` (the nodes following it, each the
    only user of the one before) did: their uses go to it, and they go."""
    after[-1].replace_all_uses_with(node)
    for n in reversed(after):
        gm.graph.erase_node(n)


def _traced(model: nn.Module) -> Optional[torch.fx.GraphModule]:
    """``model`` traced into an fx graph module (its ``hetconv_permutations`` kept), or None
    where fx cannot trace it (data-dependent control flow, ...)."""
    try:
        graph = PermutationTracer().trace(model)
    except Exception:
        return None
    gm = torch.fx.GraphModule(model, graph, model.__class__.__name__)
    for attr in ("hetconv_permutations",):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return gm


def _tidy(gm: torch.fx.GraphModule) -> None:
    """After a rewrite: check the graph, drop the modules it no longer calls, regenerate."""
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _is_relu(node, modules: dict) -> bool:
    """Whether fx ``node`` applies a ReLU (``nn.ReLU``, ``F.relu`` (in place or not),
    ``x.relu()``, ...) to its one argument; ``modules``: the graph module's
    ``named_modules()``."""
    if node is None:
        return False
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    if node.op == "call_method":
        return node.target in ("relu", "relu_") and len(node.args) == 1
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU)


def _fuse_packed_relus(model: nn.Module) -> Tuple[nn.Module, int]:
    """Move the ReLU that is the only user of a :class:`PackedConv2d` (looking through
    ``nn.Identity``) into it.  Returns the model (traced, unless it was a graph module
    already or nothing was fused) and how many."""
    if not any(isinstance(m, PackedConv2d) for m in model.modules()):
        return model, 0
    gm = model if isinstance(model, torch.fx.GraphModule) else _traced(model)
    if gm is None:
        return model, 0
    modules = dict(gm.named_modules())
    calls = _call_counts(gm.graph)
    fused = 0
    for node, after in _relu_users(gm, modules,
                                   lambda m: isinstance(m, PackedConv2d) and not m.relu):
        if calls[node.target] != 1:  # its ReLU would apply at its other call sites too
            continue
        modules[node.target].relu = True
        _take_over(gm, node, after)
        fused += 1
    if fused:
        _tidy(gm)
    return (gm, fused) if fused else (model, 0)


def _fuse_native(model: nn.Module) -> Tuple[nn.Module, int]:
    """Fuse ``[Identity] -> [+ residual] -> [ReLU]`` after each native HetConv2d into it.

    Returns the (possibly traced) model and the number of fused layers; a
    model torch.fx cannot trace, or with nothing to fuse, comes back as it is.
    """
    if not any(isinstance(m, HetConv2d) and m.backend == "native" for m in model.modules()):
        return model, 0
    gm = _traced(model)
    if gm is None:  # data-dependent control flow: leave the model alone
        return model, 0
    modules = dict(gm.named_modules())

    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), HetConv2d) \
                or modules[node.target].backend != "native" or len(node.args) != 1 \
                or node.kwargs:
            continue
        idents, nxt = _after_identities(node, modules)
        chain = [node] + idents
        cur = chain[-1]
        residual = None
        if nxt is not None and nxt.op == "call_function" and nxt.target in _ADD_FUNCTIONS \
                and len(nxt.args) == 2 and not nxt.kwargs \
                and (nxt.target is not operator.iadd or nxt.args[0] is cur):
            # (``residual += y`` writes into the residual: not the fused layer's sum)
            other = [a for a in nxt.args if a is not cur]
            if len(other) == 1 and isinstance(other[0], torch.fx.Node):
                residual = other[0]
                chain.append(nxt)
                cur, nxt = nxt, _only_user(nxt)
        relu = _is_relu(nxt, modules)
        if relu:
            chain.append(nxt)
        if residual is None and not relu:
            continue
        last = chain[-1]
        if _mutation_between(node, last, modules, chain):
            # the fused layer reads its input (and residual) at ``last``'s place: a write in
            # between (an in-place ReLU on the input, say) would change what it reads
            continue
        name = node.target.replace(".", "_") + "_fused"
        while hasattr(gm, name):  # a layer called at several places: one module per place
            name += "_"
        gm.add_submodule(name, NativeFused(modules[node.target], relu, residual is not None))
        modules[name] = gm.get_submodule(name)
        with gm.graph.inserting_before(last):
            args = (node.args[0],) + ((residual,) if residual is not None else ())
            new = gm.graph.call_module(name, args)
        last.replace_all_uses_with(new)
        for n in reversed(chain):
            gm.graph.erase_node(n)
        fused += 1
    if not fused:
        return model, 0
    _tidy(gm)
    return gm, fused


class ChannelPadShortcut(nn.Module):
    """``F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, front, back))``, then (``order``
    given) ``index_select(., 1, order)``: the parameter-free ("option A") shortcut of the
    CIFAR ResNets, as one module, so a :class:`NativeChain` can run it. Built by
    :func:`optimize_for_inference` from those operations in the traced graph."""

    def __init__(self, stride: int, front: int, back: int,
                 order: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.stride, self.front, self.back = int(stride), int(front), int(back)
        self.register_buffer("order", None if order is None else order.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        y = F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.front, self.back))
        return y if self.order is None else torch.index_select(y, 1, self.order)

    def extra_repr(self) -> str:
        return (f"stride={self.stride}, front={self.front}, back={self.back}, "
                f"order={'yes' if self.order is not None else 'no'}")


def _shortcut_pattern(gm: torch.fx.GraphModule, node) -> Optional[tuple]:
    """``(input, stride, front, back, order, nodes)`` when ``node`` (a getitem) starts
    ``x[:, :, ::s, ::s] -> F.pad(., (0, 0, 0, 0, front, back)) [-> index_select(., 1, t)]``
    whose intermediate values have no other user; else None."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    index = node.args[1]
    full = slice(None, None, None)
    if not (isinstance(index, tuple) and len(index) == 4 and index[0] == full
            and index[1] == full and all(isinstance(i, slice) for i in index[2:])):
        return None
    s = index[2].step
    if (index[2] != index[3] or index[2].start not in (None, 0) or index[2].stop is not None
            or not isinstance(s, int) or s < 1 or len(node.users) != 1):
        return None
    pad = next(iter(node.users))
    kwargs = dict(pad.kwargs)
    if pad.op != "call_function" or pad.target is not F.pad or len(pad.args) < 2:
        return None
    amounts = pad.args[1]
    mode = pad.args[2] if len(pad.args) > 2 else kwargs.get("mode", "constant")
    value = pad.args[3] if len(pad.args) > 3 else kwargs.get("value", None)
    if (not isinstance(amounts, (tuple, list)) or len(amounts) != 6
            or any(not isinstance(v, int) or v < 0 for v in amounts) or any(amounts[:4])
            or mode != "constant" or value not in (None, 0, 0.0)):
        return None
    nodes, end, order = [node, pad], pad, None
    if len(pad.users) == 1:
        sel = next(iter(pad.users))
        if (sel.op == "call_function" and sel.target is torch.index_select and len(sel.args) == 3
                and not sel.kwargs and sel.args[1] in (1, -3)
                and isinstance(sel.args[2], torch.fx.Node)
                and sel.args[2].op == "get_attr"):
            order = getattr(gm, sel.args[2].target, None)
            if isinstance(order, torch.Tensor):
                nodes.append(sel)
                end = sel
            else:
                order = None
    return node.args[0], s, amounts[4], amounts[5], order, nodes, end


def _fuse_shortcuts(gm: torch.fx.GraphModule) -> int:
    """Replace each option-A shortcut (:func:`_shortcut_pattern`) by a
    :class:`ChannelPadShortcut` module; returns how many."""
    made, modules = 0, dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        found = _shortcut_pattern(gm, node)
        if found is None:
            continue
        value, s, front, back, order, nodes, end = found
        if _mutation_between(node, end, modules, nodes):
            continue  # the module reads ``value`` at ``end``'s place: a write in between
        name = f"pad_shortcut_{made}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, ChannelPadShortcut(s, front, back, order))
        modules[name] = gm.get_submodule(name)
        with gm.graph.inserting_before(end):
            new = gm.graph.call_module(name, (value,))
        end.replace_all_uses_with(new)
        for n in reversed(nodes):
            if not n.users:
                gm.graph.erase_node(n)
        made += 1
    for node in list(gm.graph.nodes):  # orders now held by the modules
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    return made


class NativeChain(PlanHolder, nn.Module):
    """Consecutive :class:`NativeFused` layers run image by image in one kernel call.

    ``forward(x[, x2])`` equals running ``layers`` in turn as ``program`` says: entry ``i``
    is ``(input, residual, output)``, each a place: the inputs ``x`` and ``x2``
    (``native.CHAIN_X``, ``native.CHAIN_X2``), the result (``native.CHAIN_Y``, the last
    layer's output), no residual (``native.CHAIN_NONE``) or an intermediate value
    (0, 1, ...: ``nbuf`` of them, reused once dead). Outside autograd, on contiguous
    float32 input, with every layer on the NCHW kernel, one C call runs the whole chain
    image by image: each thread takes whole images, the activations between the layers in
    small per-thread buffers (L2) in the layout the next layer reads in place; with fewer
    images than threads, all threads work on each image, splitting every layer's filters.
    Otherwise (autograd, channels_last input, other backends) the layers run one after
    another, as the original graph did. Also ops that are not HetConv layers:
    :class:`ChannelPadShortcut`. Built by :func:`optimize_for_inference`.
    """

    def __init__(self, layers: List[nn.Module], program: List[Tuple[int, int, int]],
                 nbuf: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.program = [tuple(int(v) for v in entry) for entry in program]
        self.nbuf = int(nbuf)
        self.enabled = True  # False: always layer by layer (optimize_for_inference measures)

    def forward(self, x: torch.Tensor, x2: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.enabled and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            y = self._chained(x, x2)
            if y is not None:
                return y
        return self._stepwise(x, x2)

    def _stepwise(self, x: torch.Tensor, x2: Optional[torch.Tensor]) -> torch.Tensor:
        nat = HF._native
        values = {nat.CHAIN_X: x, nat.CHAIN_X2: x2}
        for layer, (i, r, o) in zip(self.layers, self.program):
            values[o] = layer(values[i]) if r == nat.CHAIN_NONE else layer(values[i], values[r])
        return values[nat.CHAIN_Y]

    def _chained(self, x: torch.Tensor, x2: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The chain in one C call, or None where it does not apply."""
        nat = HF._native
        inputs = (x,) if x2 is None else (x, x2)
        if (any(t.dim() != 4 or t.dtype != torch.float32 or t.device.type != "cpu"
                or not t.is_contiguous() or t.shape[0] != x.shape[0] for t in inputs)
                or torch.is_autocast_enabled("cpu")
                or (torch.is_grad_enabled() and (any(t.requires_grad for t in inputs) or any(
                    p.requires_grad for p in self.parameters())))):
            return None
        key = (tuple(x.shape[1:]), None if x2 is None else tuple(x2.shape[1:]),
               tuple(getattr(m, "layer", m).__dict__.get("backend") for m in self.layers))
        entry = self._plan_for(key)
        if entry is False:
            entry = self._prepare(x, x2)
            self._keep_plan(key, entry)
        if entry is None:
            return None
        for plan, m in zip(entry.plans, self.layers):
            if isinstance(m, NativeFused) and not plan.holds(
                    m.layer.weight_k, m.layer.weight_1, m.layer.bias):
                self._keep_plan(key, False)  # weights replaced or updated: prepare again
                return self._chained(x, x2)
        return nat.run_chain(entry, x, x2)

    def _prepare(self, x: torch.Tensor, x2: Optional[torch.Tensor]) -> Optional[object]:
        """The :class:`hetconv.native.Chain` for inputs of these shapes, or None when a
        layer would not run the NCHW kernel on them."""
        nat = HF._native
        if not nat.available():
            return None
        shapes = {nat.CHAIN_X: tuple(x.shape[1:]),
                  nat.CHAIN_X2: None if x2 is None else tuple(x2.shape[1:])}
        plans = []
        for m, (i, r, o) in zip(self.layers, self.program):
            shape = shapes.get(i)
            if shape is None or (r != nat.CHAIN_NONE and shapes.get(r) is None):
                return None
            if isinstance(m, ChannelPadShortcut):
                if r != nat.CHAIN_NONE or len(shape) != 3:
                    return None
                plan = nat.ShortcutPlan((1,) + shape, m.stride, m.front, m.back, m.order)
                plans.append(plan)
                shapes[o] = tuple(plan.shape[1:])
                continue
            layer = m.layer
            probe = torch.empty((1,) + shape)
            res = None if r == nat.CHAIN_NONE else torch.empty((1,) + shapes[r])
            if not m._check(probe, res):
                return None
            plan = nat.ForwardPlan.build(probe, layer.weight_k, layer.weight_1, layer.bias,
                                         layer.pattern, m.relu, res, layer.stride[0])
            if plan is None or plan.fmt != torch.contiguous_format:
                return None
            if res is not None and tuple(res.shape) != plan.shape:
                return None
            plans.append(plan)
            shapes[o] = tuple(plan.shape[1:])
        chain = nat.Chain(plans, self.program)
        return chain if chain.nbuf <= self.nbuf and chain.in_shapes[1] == shapes[
            nat.CHAIN_X2] else None

    def extra_repr(self) -> str:
        return f"layers={len(self.layers)}, buffers={self.nbuf}, enabled={self.enabled}"


def _chain_native(gm: torch.fx.GraphModule) -> int:
    """Replace runs of :class:`NativeFused` nodes by :class:`NativeChain` modules.

    A run takes at most two outside values (the chain's inputs; ``nn.Identity`` nodes are
    looked through), every member's output but the last is used by members only (so it
    need not exist outside the chain), and no node between its members may write into a
    tensor (the chain reads its inputs at its last member's place). Runs of at least two
    layers with one kernel size are replaced. Returns how many chains were made.
    """
    nat = HF._native
    modules = dict(gm.named_modules())

    def of(node, kind):
        return node.op == "call_module" and isinstance(gm.get_submodule(node.target), kind)

    def resolve(value):
        while isinstance(value, torch.fx.Node) and of(value, nn.Identity) \
                and len(value.args) == 1:
            value = value.args[0]
        return value

    def uses(node):
        """The nodes using node's value, looking through nn.Identity."""
        for user in node.users:
            if of(user, nn.Identity):
                yield from uses(user)
            else:
                yield user

    def candidate(node):
        if of(node, ChannelPadShortcut):
            return len(node.args) == 1 and not node.kwargs and isinstance(node.args[0],
                                                                           torch.fx.Node)
        if not of(node, NativeFused) or node.kwargs or not 1 <= len(node.args) <= 2:
            return False
        if gm.get_submodule(node.target)._modules.get("pool") is not None:
            return False  # the NCHW kernel's chains do not pool
        layer = gm.get_submodule(node.target).layer
        return layer.backend == "native" and all(isinstance(a, torch.fx.Node) for a in node.args)

    def kernel(node):
        """A layer's kernel size; None for a shortcut (it fits any chain)."""
        module = gm.get_submodule(node.target)
        return tuple(module.layer.kernel_size) if isinstance(module, NativeFused) else None

    nodes = [n for n in gm.graph.nodes if candidate(n)]
    made, start = 0, 0
    while start < len(nodes):
        members, inputs, best, size = [], [], 0, None
        for node in nodes[start:]:
            if members and _mutation_between(members[-1], node, modules):
                break  # a write between: the members after it would read what it wrote
            if kernel(node) is not None:
                if size is not None and kernel(node) != size:
                    break
                size = kernel(node)
            args = [resolve(a) for a in node.args]
            new = [a for a in args if a not in members and a not in inputs]
            if len(inputs) + len(dict.fromkeys(new)) > 2:
                break
            members.append(node)
            inputs.extend(dict.fromkeys(new))
            # closable here: every earlier member's output is used by members only
            if all(all(u in members for u in uses(m)) for m in members[:-1]):
                best = len(members)
        while best and kernel(members[best - 1]) is None:  # do not end on a shortcut
            best -= 1
        if best < 2 or all(kernel(m) is None for m in members[:best]):
            start += 1
            continue
        members = members[:best]
        args_of = {m: [resolve(a) for a in m.args] for m in members}
        inputs = list(dict.fromkeys(a for m in members for a in args_of[m] if a not in members))
        place = {inputs[0]: nat.CHAIN_X}
        if len(inputs) > 1:
            place[inputs[1]] = nat.CHAIN_X2
        last_use = {m: max((k for k, n in enumerate(members) if m in args_of[n]), default=j)
                    for j, m in enumerate(members[:-1])}
        program, free, nbuf, live = [], [], 0, {}
        for k, m in enumerate(members):
            i_val = args_of[m][0]
            r_val = args_of[m][1] if len(args_of[m]) > 1 else None
            i_place = place[i_val] if i_val in place else live[i_val]
            r_place = nat.CHAIN_NONE if r_val is None else (
                place[r_val] if r_val in place else live[r_val])
            if k == len(members) - 1:
                out = nat.CHAIN_Y
            else:
                out = free.pop() if free else nbuf
                nbuf = max(nbuf, out + 1)
                live[m] = out
            program.append((i_place, r_place, out))
            for v in list(live):  # values whose last use this was
                if v is not m and last_use[v] == k:
                    free.append(live.pop(v))
        name = f"native_chain_{made}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, NativeChain([gm.get_submodule(m.target) for m in members],
                                           program, nbuf))
        modules[name] = gm.get_submodule(name)
        with gm.graph.inserting_before(members[-1]):
            chain = gm.graph.call_module(name, tuple(inputs))
        members[-1].replace_all_uses_with(chain)
        for m in reversed(members):
            idents = [u for u in m.users if of(u, nn.Identity)]
            for ident in idents:  # identities of intermediate values, used by members only
                if not ident.users:
                    gm.graph.erase_node(ident)
            if not m.users:
                gm.graph.erase_node(m)
        made += 1
        start = nodes.index(members[-1]) + 1
    for node in list(gm.graph.nodes):  # identities left without users
        if of(node, nn.Identity) and not node.users:
            gm.graph.erase_node(node)
    return made


class NativeSequence(PlanHolder, nn.Module):
    """Consecutive :class:`NativeFused` layers of a channels_last model, each reading the one
    before (no residual sums): a VGG's feature extractor, pools included.

    ``forward(x)`` equals running ``layers`` in turn.  Where nothing records autograd (no
    grad mode, or neither the input nor a weight requiring a gradient), on float32 CPU
    input, the layers' prepared kernel calls run as one C call
    (:class:`hetconv.native.SequencePlan`: the layers between write two scratch buffers in
    turn, kept between calls: :attr:`scratch_bytes`), after the input and each layer's
    weights are checked; called as modules, each
    layer costs ~25 us of Python more at batch 1.  Where a layer's prepared call does not
    apply (autograd, the NCHW kernel with a pool, odd sizes, other backends) the layers run
    one after another as modules.  Built by :func:`optimize_for_inference` for
    channels_last models.
    """

    def __init__(self, layers: List[nn.Module]) -> None:
        super().__init__()
        if len(layers) < 2 or not all(isinstance(m, NativeFused) and not m.residual
                                      for m in layers):
            raise ValueError("layers must be at least two NativeFused layers without residual")
        self.layers = nn.ModuleList(layers)

    TRANSIENT = PlanHolder.TRANSIENT + ("_scratch",)

    @property
    def scratch_bytes(self) -> int:
        """Memory this sequence keeps between calls for its layers' intermediate outputs (the
        largest one, twice, of the inputs it ran on; shared by its input shapes, one call at
        a time): 0 before its first sequenced call."""
        scratch = self.__dict__.get("_scratch")
        return 0 if scratch is None else scratch.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            y = self._sequenced(x)
            if y is not None:
                return y
        for layer in self.layers:
            x = layer(x)
        return x

    def _sequenced(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The layers' prepared calls back to back, or None where they do not apply."""
        if (x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu"
                or torch.is_autocast_enabled("cpu")):
            return None
        grad = torch.is_grad_enabled()
        if grad and x.requires_grad:
            return None  # autograd records: the layers run as modules
        key = (tuple(x.shape), x.stride())
        steps = self._plan_for(key)
        if isinstance(steps, _SequenceSteps) and steps.holds():
            # the kept weights are the layers' parameters: whether one requires a gradient
            # is read from them (~3 us; a walk of self.parameters() took ~50 us per call)
            if grad and steps.requires_grad():
                return None
            scratch = self.__dict__.get("_scratch")
            if scratch is None:
                scratch = self.__dict__["_scratch"] = HF._native.Scratch()
            return steps.run(x, scratch)
        if grad and any(p.requires_grad for p in self.parameters()):
            return None
        if (not isinstance(steps, _SequenceSteps) and steps is not False
                and steps == self._backends()):
            return None  # the layers' prepared calls do not apply to this input
        # first call of this input, or weights replaced or updated, or a layer's backend
        # changed: prepare by running the layers' own prepared calls
        steps, y = self._prepare(x)
        self._keep_plan(key, self._backends() if steps is None else steps)
        return y

    def _backends(self) -> tuple:
        return tuple(layer.layer.__dict__.get("backend") for layer in self.layers)

    def _prepare(self, x: torch.Tensor) -> Tuple[Optional["_SequenceSteps"],
                                                  Optional[torch.Tensor]]:
        """Each layer's prepared call, made by running it: ``(steps, output)``, or
        ``(None, None)`` where one of them has none (nothing kept for this input; the caller
        runs the layers as modules)."""
        steps, y = [], x
        for layer in self.layers:
            y, plan = layer._prepared(y)
            if plan is None:
                return None, None
            steps.append((layer, plan))
        return _SequenceSteps(steps), y

    def extra_repr(self) -> str:
        return f"{len(self.layers)} layers"


class _SequenceSteps:
    """What :class:`NativeSequence` keeps per input signature: its layers' prepared calls,
    run as one C call (:class:`hetconv.native.SequencePlan`) where all are channels-last
    kernel calls, else one after another."""

    __slots__ = ("plans", "checks", "tensors", "state", "seq")

    def __init__(self, steps: List[Tuple["NativeFused", ForwardPlan]]) -> None:
        self.plans = [plan for _, plan in steps]
        # per layer: its submodules (the HetConv2d it runs), that layer's attribute and
        # parameter dicts, read directly (nn.Module attribute lookups cost ~0.6 us each
        # here, as much as the rest of a batch-1 layer's Python), its backend and the
        # weights the plan was made for
        self.checks = [(layer._modules, layer.layer, layer.layer.__dict__,
                        layer.layer._parameters, layer.layer.__dict__.get("backend"),
                        plan.tensors) for layer, plan in steps]
        # every plan's weights, and their state when each plan was made (its key)
        self.tensors = tuple(t for plan in self.plans for t in plan.tensors)
        self.state = tuple(s for plan in self.plans for s in plan.key)
        self.seq = HF._native.SequencePlan.build(self.plans)

    def holds(self) -> bool:
        """Whether every plan still stands: each layer running the HetConv2d it ran, on the
        backend it had, its weights the tensors the plan was made for, not replaced
        (``.data``) or updated in place."""
        for mods, inner, attrs, params, backend, (wk, w1, b) in self.checks:
            if (mods.get("layer") is not inner or attrs.get("backend") != backend
                    or params.get("weight_k") is not wk
                    or params.get("weight_1") is not w1 or params.get("bias") is not b):
                return False
        return ForwardPlan._state(self.tensors) == self.state

    def requires_grad(self) -> bool:
        """Whether one of the plans' weights requires a gradient (they are the layers'
        parameters while :meth:`holds`)."""
        return any(t is not None and t.requires_grad for t in self.tensors)

    def run(self, x: torch.Tensor, scratch: Optional["HF._native.Scratch"] = None
            ) -> torch.Tensor:
        if self.seq is not None:
            return self.seq.run(x, scratch)
        for plan in self.plans:
            x = plan.launch(x)
        return x


def _sequence_native(gm: torch.fx.GraphModule) -> int:
    """Replace runs of :class:`NativeFused` nodes without residual, each the only user of the
    one before (looking through ``nn.Identity``), no node between them that may write into a
    tensor (the sequence reads its input at its last member's place), by
    :class:`NativeSequence` modules.  Returns how many layers went into sequences."""
    modules = dict(gm.named_modules())

    def member(node) -> bool:
        return (node.op == "call_module" and not node.kwargs and len(node.args) == 1
                and isinstance(node.args[0], torch.fx.Node)
                and isinstance(modules.get(node.target), NativeFused)
                and not modules[node.target].residual)

    # runs of members; a member's entry: (node, the identities between it and the next)
    runs, run = [], []
    for node in gm.graph.nodes:
        if not member(node):
            continue
        if run:
            idents, nxt = _after_identities(run[-1][0], modules)
            if nxt is node and not _mutation_between(run[-1][0], node, modules):
                run[-1] = (run[-1][0], idents)
                run.append((node, []))
                continue
            runs.append(run)
        run = [(node, [])]
    runs.append(run)
    sequenced = 0
    for k, run in enumerate(r for r in runs if len(r) >= 2):
        name = f"native_sequence_{k}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, NativeSequence([modules[n.target] for n, _ in run]))
        first, last = run[0][0], run[-1][0]
        with gm.graph.inserting_after(last):
            seq = gm.graph.call_module(name, (first.args[0],))
        last.replace_all_uses_with(seq)
        for node, idents in reversed(run):  # each member after the identities it feeds
            for ident in reversed(idents):
                gm.graph.erase_node(ident)
            gm.graph.erase_node(node)
        sequenced += len(run)
    if sequenced:
        _tidy(gm)
    return sequenced


_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _configure(out: nn.Module, plan: dict, example_input: Optional[torch.Tensor], backend: str,
               memory_format: str, repeats: int, fuse: bool, pack: bool = True) -> nn.Module:
    """Per-layer backends and fusion of one candidate model in ``memory_format``
    ("contiguous" or "channels_last"; fills ``plan``)."""
    names = {m: n for n, m in out.named_modules()}
    out.to(memory_format=_FORMATS[memory_format])
    plan["memory_format"] = memory_format
    x = None if example_input is None else in_format(example_input, _FORMATS[memory_format])
    rule = None
    if backend == "measure" and x is not None:
        # The rule's configuration, timed against the measured one at the end: layers
        # timed one by one can add up to a slower model (before the layers were measured in
        # execution order, VGG-16 P8 "blocked" ran 1.3x slower so: its 512-channel layers
        # were timed on the rule's channels_last activations, then got NCHW ones).
        rule = copy.deepcopy(out)
        for m in rule.modules():
            if isinstance(m, HetConv2d):
                m.backend = "auto"

    hets = [m for m in out.modules() if isinstance(m, HetConv2d)]
    if backend == "measure":
        strides: Dict[nn.Module, tuple] = {}
        inputs = _capture_inputs(out, x, strides=strides)
        for layer in hets:
            if layer not in inputs:  # not reached by this input: keep the rule
                layer.backend = "auto"
        # In execution order, each layer timed on the input the layers chosen before it
        # produce: a choice upstream can change the memory layout a layer receives (the
        # channels-last kernel hands channels_last activations on, the NCHW kernel NCHW ones),
        # and with it what the layer's backends cost.  The inputs are captured again (one
        # forward pass) only after a choice that changed its layer's output layout.
        stale = False
        for layer in list(inputs):
            if stale:
                strides = {}
                inputs, stale = _capture_inputs(out, x, strides=strides), False
            before = layer.backend
            layer.backend, medians = _fastest_backend(layer, inputs[layer], repeats)
            plan["layers"][names[layer]] = {"backend": layer.backend, "seconds": medians}
            if layer.backend != before:
                with torch.no_grad():
                    stale = layer(inputs[layer]).stride() != strides[layer]
    else:
        for layer in hets:
            layer.backend = backend
            plan["layers"][names[layer]] = {"backend": backend}
    converted = {}
    if fuse and example_input is not None and backend in ("measure", "native"):
        converted = _native_dense_convs(out, x, repeats, plan,
                                        pack and backend == "measure")
    plan["fused_native"] = plan["chained_native"] = plan["fused_pools"] = 0
    plan["sequenced_native"] = 0
    if fuse:
        out, plan["fused_native"] = _fuse_native(out)
        if memory_format == "channels_last" and isinstance(out, torch.fx.GraphModule):
            # the channels-last kernel pools in its epilogue (the NCHW one does not)
            plan["fused_pools"] = _fuse_pools(out)
            plan["sequenced_native"] = _sequence_native(out)
    fused_layers = {m.layer for m in out.modules() if isinstance(m, NativeFused)}
    for name, conv in converted.items():  # not fused: the dense convolution as it was
        try:
            layer = out.get_submodule(name)
        except AttributeError:
            continue
        if layer not in fused_layers:
            _replace(out, name, conv)
            plan["layers"].pop(name, None)
    plan["native_dense"] = sum(1 for name in converted if name in plan["layers"])
    if plan["fused_native"] and isinstance(out, torch.fx.GraphModule):
        _fuse_shortcuts(out)
        plan["chained_native"] = _chain_native(out)
        _tidy(out)
        chains = [m for m in out.modules() if isinstance(m, NativeChain)]
        if chains and backend == "measure" and example_input is not None:
            # depth-first or layer by layer: whichever runs this input faster
            def run(enabled):
                def call():
                    for m in chains:
                        m.enabled = enabled
                    return out(x)
                return call
            timed = _model_medians({"chained": run(True), "layer_by_layer": run(False)},
                                   repeats)
            for m in chains:
                m.enabled = timed["chained"] <= timed["layer_by_layer"]
            plan["chain_seconds"] = timed
    plan["packed_dense"] = plan["packed_relus"] = 0
    if pack and backend == "measure" and x is not None:
        plan["packed_dense"] = _packed_dense_convs(out, x, repeats, plan, fuse)
        if fuse:
            out, plan["packed_relus"] = _fuse_packed_relus(out)
    if rule is not None:
        kept = _keep_faster(out, rule, plan, x, repeats)
        if kept is rule and pack:  # the rule's configuration gets its packed convolutions too
            plan["packed_dense"] = _packed_dense_convs(rule, x, repeats, plan)
        return kept
    return out


def in_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``x.contiguous(memory_format=memory_format)`` whose strides say so.  A 4-d tensor of
    one channel is contiguous in both layouts (the same memory) and torch leaves its
    strides as they are; the kernels read ``stride(1)`` (1: channels-last, H*W: NCHW) to
    tell which layout it is, and so which layout their output takes: it gets the format's
    ``stride(1)`` here (a view, no copy).  Before, a one-channel image batch (Fashion-MNIST)
    made channels_last kept NCHW strides, its first layer ran the NCHW kernel and handed
    NCHW activations on, and an optimized channels_last model ran its layers on their
    slow paths: 2.1x the time of the rule's configuration, which was kept instead."""
    x = x.contiguous(memory_format=memory_format)
    if x.dim() == 4 and x.shape[1] == 1:  # views that trace as views (no fixed strides)
        if memory_format == torch.channels_last:
            return x.squeeze(1).unsqueeze(-1).permute(0, 3, 1, 2)
        return x.squeeze(1).unsqueeze(1)
    return x


class InputFormat(nn.Module):
    """The first step of a model :func:`optimize_for_inference` returns: its input, when it
    is a 4-d tensor, in ``memory_format`` (``"contiguous"`` or ``"channels_last"``: the
    format the model was configured for); other values, and tensors of other ranks, pass
    unchanged, and a tensor already in that format is not copied.

    In an fx ``GraphModule`` it is a submodule (``hetconv_input_format``) called on the
    graph's first input, so copies and pickles keep it; other models call it from a forward
    pre-hook on their first input, positional or by name (:meth:`hook`).  Where it copies,
    the model computes on the copy: a model that returns or changes its input in place
    then returns or changes the copy, not the caller's tensor."""

    #: one node in the package's fx graphs (its forward branches on the input)
    fx_leaf = True

    def __init__(self, memory_format: str) -> None:
        super().__init__()
        if memory_format not in _FORMATS:
            raise ValueError(f"memory_format must be one of {tuple(_FORMATS)}, "
                             f"got {memory_format!r}")
        self.memory_format = memory_format

    def forward(self, x):
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            return in_format(x, _FORMATS[self.memory_format])
        return x

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        """A forward pre-hook (``with_kwargs=True``): ``(args, kwargs)`` with the module's
        first input through :meth:`forward`: the first positional argument, or else the
        keyword argument of ``forward``'s first parameter (None, nothing changed, when it
        needed no copy)."""
        if args:
            x = self(args[0])
            return None if x is args[0] else ((x,) + tuple(args[1:]), kwargs)
        name = _first_parameter(module)
        if name is not None and name in kwargs:
            x = self(kwargs[name])
            if x is not kwargs[name]:
                return args, {**kwargs, name: x}
        return None

    def extra_repr(self) -> str:
        return repr(self.memory_format)


def _first_parameter(module: nn.Module) -> Optional[str]:
    """The name of ``module.forward``'s first parameter that a keyword can pass, if any."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return next((p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                      p.KEYWORD_ONLY)), None)


def _take_input_format(out: nn.Module, memory_format: str) -> None:
    """Make ``out`` put its input in ``memory_format`` first (:class:`InputFormat`)."""
    fmt = InputFormat(memory_format)
    if isinstance(out, torch.fx.GraphModule):
        inputs = [n for n in out.graph.nodes if n.op == "placeholder"]
        if inputs:
            out.add_submodule("hetconv_input_format", fmt)
            with out.graph.inserting_after(inputs[-1]):  # after every input, before the rest
                node = out.graph.call_module("hetconv_input_format", (inputs[0],))
            inputs[0].replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
            out.recompile()
            return
    out.register_forward_pre_hook(fmt.hook, with_kwargs=True)


def _drop_input_format(model: nn.Module) -> None:
    """Remove the :class:`InputFormat` step an earlier :func:`optimize_for_inference` gave
    ``model`` (a copy being optimized again: it is configured and timed in its own format,
    and gets its own step at the end)."""
    hooks = model._forward_pre_hooks
    for key, fn in list(hooks.items()):
        if isinstance(getattr(fn, "__self__", None), InputFormat):
            del hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    if isinstance(model, torch.fx.GraphModule):
        modules = dict(model.named_modules())
        steps = [n for n in model.graph.nodes if n.op == "call_module"
                 and isinstance(modules.get(n.target), InputFormat)]
        for node in steps:
            node.replace_all_uses_with(node.args[0])
            model.graph.erase_node(node)
        for target in {n.target for n in steps}:
            model.delete_submodule(target)
        if steps:
            model.recompile()


def _keep_faster(measured: nn.Module, rule: nn.Module, plan: dict, x: torch.Tensor,
                 repeats: int) -> nn.Module:
    """``measured`` (the per-layer measurements' configuration) or ``rule`` (every HetConv2d
    on ``backend="auto"``, nothing fused), whichever runs ``x`` faster; fills ``plan``
    (``model_seconds``, ``kept``, and for the rule its layers and counts)."""
    plan["model_seconds"] = _model_medians(
        {"measured": lambda: measured(x), "rule": lambda: rule(x)}, repeats)
    if plan["model_seconds"]["measured"] <= plan["model_seconds"]["rule"]:
        plan["kept"] = "measured"
        return measured
    plan["kept"] = "rule"
    measured_layers = plan["layers"]
    plan["layers"] = {}
    for name, m in rule.named_modules():
        if isinstance(m, HetConv2d):
            plan["layers"][name] = {"backend": "auto"}
            if "seconds" in measured_layers.get(name, {}):
                plan["layers"][name]["seconds"] = measured_layers[name]["seconds"]
    plan["fused_native"] = plan["chained_native"] = plan["native_dense"] = 0
    plan["packed_dense"] = plan["fused_pools"] = plan["packed_relus"] = 0
    plan["sequenced_native"] = 0
    plan.pop("chain_seconds", None)
    return rule


#: The counts of :func:`optimize_for_inference`'s plan that :func:`plan_summary` keeps.
PLAN_KEYS = ("memory_format", "kept", "fused_native", "chained_native", "sequenced_native",
             "native_dense", "packed_dense", "fused_pools", "fast_pools")


def plan_summary(plan: dict) -> dict:
    """The short form of an optimized model's ``hetconv_plan`` (what the benchmark's rows and
    ``hetconv evaluate --optimize`` record): the memory format, which configuration was
    kept, the fusion counts and how many layers took each backend (two processes'
    optimizations of one model can differ: their measured choices)."""
    out = {k: plan[k] for k in PLAN_KEYS if k in plan}
    backends: Dict[str, int] = {}
    for info in plan.get("layers", {}).values():
        name = info.get("backend") if isinstance(info, dict) else None
        if name is not None:
            backends[name] = backends.get(name, 0) + 1
    out["backends"] = dict(sorted(backends.items()))
    return out


def _model_medians(candidates: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """A whole-model choice: each candidate's median call time, interleaved in steady state
    for at least :data:`MODEL_DECISION_SECONDS` in all (up to 10x ``repeats`` calls)."""
    with torch.no_grad():
        times = time_interleaved(candidates, repeats=repeats, warmup=1, settle=1,
                                 min_seconds=MODEL_DECISION_SECONDS, prune=DECISION_PRUNE)
    return {k: t.median for k, t in times.items()}


def _output_difference(got, ref, rtol: float, atol: float) -> Optional[float]:
    """None where the outputs ``got`` and ``ref`` (a tensor, or tuples, lists, dicts of them,
    as a model may return) are close; else the largest absolute difference (inf where their
    structure, a shape or a non-tensor value differs)."""
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    ref_leaves, ref_spec = torch.utils._pytree.tree_flatten(ref)
    if got_spec != ref_spec:
        return float("inf")
    worst = None
    for g, r in zip(got_leaves, ref_leaves):
        if not isinstance(r, torch.Tensor) or not isinstance(g, torch.Tensor):
            if type(g) is not type(r) or g != r:
                return float("inf")
            continue
        if g.shape != r.shape:
            return float("inf")
        if not torch.allclose(g.float(), r.float(), rtol=rtol, atol=atol):
            err = (g.float() - r.float()).abs().max().item() if g.numel() else 0.0
            worst = err if worst is None else max(worst, err)
    return worst


def optimize_for_inference(model: nn.Module, example_input: Optional[torch.Tensor] = None, *,
                           fold_bn: bool = True, backend: str = "measure",
                           memory_format: str = "auto", repeats: int = 5, check: bool = True,
                           rtol: float = 1e-4, atol: float = 1e-4,
                           absorb: bool = True, fuse: bool = True,
                           pack: bool = True) -> nn.Module:
    """A faster copy of ``model`` for inference (``model`` itself is left untouched).

    Args:
        model: any ``nn.Module`` (HetConv2d layers anywhere in it).
        example_input: a representative input batch.  Needed for
            ``backend="measure"``, ``memory_format="auto"`` and ``check``;
            without it the documented ``"auto"`` rule and channels_last are used.
        fold_bn: fold BatchNorm into the preceding conv (:func:`fold_batchnorm`).
        backend: ``"measure"`` (time every backend of :data:`hetconv.BACKENDS`
            on each layer's real input, keep the fastest), ``"auto"`` (the
            rule of :func:`hetconv.functional.select_backend`) or a backend name.
            With ``"measure"`` the configured model (fusion and chains included) is
            finally timed against the same model on the ``"auto"`` rule, nothing fused,
            and the faster is returned (``hetconv_plan["model_seconds"]`` and
            ``hetconv_plan["kept"]``: ``"measured"`` or ``"rule"``): the fastest
            backend of each layer alone does not always make the fastest model (the
            rule's configuration, when kept, then gets its packed convolutions: ``pack``).
        memory_format: ``"auto"`` (the model configured in both, backends, fusion and
            all, and the faster kept: ``hetconv_plan["memory_format_seconds"]``),
            ``"contiguous"`` or ``"channels_last"``.
        repeats: timed repeats per candidate (medians are compared); the whole-model
            choices take more, up to 10x, until each candidate ran
            :data:`MODEL_DECISION_SECONDS` in all.
        check: compare outputs with ``model``'s on ``example_input``; raise
            ``RuntimeError`` when they differ beyond ``rtol``/``atol``.
        absorb: run ``pattern="shifted"`` layers as blocked ones on class-sorted
            activations (:func:`hetconv.permute.absorb_permutations`): the
            per-layer channel gathers disappear.  The result is then a
            ``torch.fx.GraphModule``; a model fx cannot trace is kept as it is
            (with a warning).  With ``backend="measure"`` the model is also
            configured without absorbing (the ``"native"`` backend needs no
            permutation, while the absorbed graph keeps a few gathers) and the
            faster of the two is returned (``hetconv_plan["absorb_seconds"]``).
        fuse: a residual sum and/or ReLU right after a HetConv2d that runs the
            ``"native"`` backend is computed inside its kernel
            (:class:`NativeFused`; needs an fx-traceable model; not where a node between
            them may write into a tensor, an in-place ReLU, say), and runs of such
            layers (a ResNet stage, say) become one :class:`NativeChain`: one C call
            runs them image by image on batches of at least two images per thread, the
            activations between them kept in per-thread buffers in L2. With
            ``backend="measure"`` chained and layer-by-layer runs are both timed and the
            faster kept (``hetconv_plan["chain_seconds"]``). In a channels_last
            model, a max-pool of kernel 2 and stride 2 right after such a layer
            (``nn.MaxPool2d``, ``F.max_pool2d``) is taken into it too (``hetconv_plan["fused_pools"]``): the channels-last kernel
            writes only the pooled activations, and runs of such layers without residual
            sums, each reading the one before (a VGG's feature extractor), become one
            :class:`NativeSequence`: their prepared kernel calls made back to back, the
            input checked once (``hetconv_plan["sequenced_native"]``: layers in sequences).
        pack: with ``backend="measure"``, each remaining ``nn.Conv2d`` (a stem, a shortcut,
            every layer of a dense model) that :class:`PackedConv2d` runs faster on its
            example input is replaced by one: its weights packed for oneDNN once, not
            reordered on every call (at batch 1 that reorder can cost more than the
            convolution).  ``hetconv_plan["packed_dense"]`` counts them; their timings
            are in ``hetconv_plan["layers"]`` with backend ``"packed"``. With ``fuse``, in
            an fx-traceable model, the ReLU right after one runs inside it
            (``hetconv_plan["packed_relus"]``).

    The returned copy puts a 4-d tensor given as its first input in the chosen memory
    format before it runs (:class:`InputFormat`; no copy when it already is): its layers
    were configured and timed on that format, and on the other one they run slower (the
    channels_last VGG-16 P4 at batch 64 took 2.1x the time on NCHW input before it did
    so).  Outputs are those of the model's last layers (a feature map may be channels_last
    where the original's was not; the values are the same).

    The returned copy is in eval mode and carries ``hetconv_plan``: a dict with
    the chosen memory format, the number of folded BatchNorms, the absorbed
    permutations, the number of native layers with a fused sum/ReLU
    (``fused_native``), of chains (``chained_native``) and of dense convolutions run by the
    native kernel as P = 1 layers (``native_dense``; with ``backend`` "measure" or
    "native" and ``fuse``: those the kernel ran faster on their example input and fusion
    took; channels_last ones on the channels-last kernel when 16 divides their filters), of
    max-pools fused into native layers (``fused_pools``), of dense convolutions with packed
    weights (``packed_dense``), and the
    backend (with measured medians in seconds) of every HetConv2d by module name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    choices = ("measure", "auto") + tuple(HF.BACKENDS)
    if backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if not isinstance(absorb, bool):
        raise TypeError(f"absorb must be a bool, got {absorb!r}")
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be a bool, got {fuse!r}")
    if not isinstance(pack, bool):
        raise TypeError(f"pack must be a bool, got {pack!r}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor or None, got {type(example_input).__name__}")
    if example_input is None and (backend == "measure" or memory_format == "auto"):
        backend = "auto" if backend == "measure" else backend
        memory_format = "channels_last" if memory_format == "auto" else memory_format

    out = copy.deepcopy(model).eval()
    _drop_input_format(out)  # a model optimized before: configured for its format anew
    for p in out.parameters():
        p.requires_grad_(False)
    folded = fold_batchnorm(out) if fold_bn else 0
    pooled = _fast_pools(out)
    variants = [(out, None)]
    if absorb:
        absorbed, info = _absorbed(out, example_input)
        if info["rewritten_layers"]:
            # The native kernel runs "shifted" layers without any permutation; the absorbed
            # graph keeps a few gathers.  With measurements, both are configured and timed.
            variants = [(absorbed, info)] + (
                [(out, {"rewritten_layers": 0, "gathers": 0})]
                if backend == "measure" and example_input is not None else [])
        else:
            variants = [(out, info)]
    # Each variant configured in each memory format to try, all timed at the end: a format
    # judged on the model before its layers are configured can lose that way and win
    # configured (the dense ResNet-56 at batch 1: NCHW 2.9x slower as built, 1.8x faster
    # once its convolutions run the native kernel, chained).
    formats = tuple(_FORMATS) if memory_format == "auto" else (memory_format,)
    configs = [(candidate, info, fmt) for candidate, info in variants for fmt in formats]
    built = []
    for k, (candidate, info, fmt) in enumerate(configs):
        plan: dict = {"folded_batchnorms": folded, "fast_pools": pooled, "layers": {}}
        if absorb:
            plan["permutations"] = info
        if any(c is candidate for c, _, _ in configs[k + 1:]):
            candidate = copy.deepcopy(candidate)  # configured in place: the next one is fresh
        built.append((_configure(candidate, plan, example_input, backend, fmt, repeats, fuse,
                                 pack), plan, info))
    if len(built) > 1:
        xs = [in_format(example_input, _FORMATS[p["memory_format"]]) for _, p, _ in built]
        times = _model_medians({str(k): (lambda m=m, x=x: m(x))
                                for k, ((m, _, _), x) in enumerate(zip(built, xs))}, repeats)
        for k, (_, p, _) in enumerate(built):
            p["seconds"] = times[str(k)]
    out, plan, info = min(built, key=lambda b: b[1].get("seconds", 0.0))
    if len(formats) > 1:  # what the format gave, the permutations as chosen
        plan["memory_format_seconds"] = {p["memory_format"]: p["seconds"]
                                         for _, p, i in built if i is info}
    if len(variants) > 1:  # what absorbing the permutations gave, the format as chosen
        plan["absorb_seconds"] = {"absorbed" if i["rewritten_layers"] else "plain": p["seconds"]
                                  for _, p, i in built
                                  if p["memory_format"] == plan["memory_format"]}
    out.hetconv_plan = plan
    _take_input_format(out, plan["memory_format"])

    if check and example_input is not None:
        with evaluating(model), torch.no_grad():
            ref, got = model(example_input), out(example_input)
        err = _output_difference(got, ref, rtol, atol)
        if err is not None:
            raise RuntimeError(
                f"optimized model differs from the original by up to {err:.3g} "
                f"(rtol={rtol}, atol={atol}); to find the step at fault, pass fold_bn=False, "
                "absorb=False or fuse=False (or a looser tolerance, for float rounding)")
    return out


# ---------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------

class _GroupedExport(nn.Module):
    """HetConv2d in standard ops: [Gather] -> grouped Conv, 1x1 Conv, Add, [Gather].

    The same computation as the ``"grouped"`` backend with the weights
    assembled once (buffers), so the exported graph has no scatter.
    """

    def __init__(self, layer: HetConv2d) -> None:
        super().__init__()
        n, m, p = layer.out_channels, layer.in_channels, layer.part
        idx = HF._indices(m, n, p, layer.pattern, layer.weight_k.device)
        with torch.no_grad():
            wk, w1t, b = HF._assemble_fused(layer.weight_k.detach(), layer.weight_1.detach(),
                                            None if layer.bias is None else layer.bias.detach(),
                                            idx)
        self.register_buffer("wk", wk.clone())
        # The pointwise conv writes the grouped conv's slot order, so one Add joins them.
        w1 = HF._to_slots(w1t.t(), idx)
        self.register_buffer("w1", w1[:, :, None, None].clone())
        self.register_buffer("b", None if b is None else b.clone())
        self.register_buffer("channel_order", None if idx["identity_channels"]
                             else idx["channel_order"].clone())
        self.register_buffer("slot", None if idx["identity_slots"] else idx["slot"].clone())
        self.stride, self.padding, self.dilation, self.groups = (
            layer.stride, layer.padding, layer.dilation, p)
        # what hetconv.profile counts: the layer's MACs and parameters (the buffers above
        # hold the weights in the grouped conv's slots, with zeros where a filter has none)
        self.in_channels, self.out_channels, self.part = m, n, p
        self.kernel_size = layer.kernel_size
        self.layer_params = sum(t.numel() for t in layer.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # unbatched (C, H, W), as HetConv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        xg = x if self.channel_order is None else x.index_select(1, self.channel_order)
        y = F.conv2d(xg, self.wk, self.b, self.stride, self.padding, self.dilation, self.groups)
        xc, pc = HF._centre_input(x, self.kernel_size, self.padding, self.dilation)
        y = y + F.conv2d(xc, self.w1, None, self.stride, pc)
        return y if self.slot is None else y.index_select(1, self.slot)


def export_module(model: nn.Module, form: str = "grouped") -> nn.Module:
    """A copy of ``model`` in eval mode with each HetConv2d replaced by standard ops.

    ``form="grouped"``: gathers + grouped conv + 1x1 conv (cheap);
    ``form="dense"``: one ``nn.Conv2d`` with the zero-padded kernel (dense cost).
    Outputs equal ``model``'s (up to float rounding).
    """
    if form not in EXPORT_FORMS:
        raise ValueError(f"form must be one of {EXPORT_FORMS}, got {form!r}")
    out = copy.deepcopy(model).eval()
    targets = [(name, m) for name, m in out.named_modules() if isinstance(m, HetConv2d)]
    for name, layer in targets:
        new = layer.to_conv2d() if form == "dense" or layer.part == 1 else _GroupedExport(layer)
        if not name:  # the model itself is a HetConv2d
            return new.eval()
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, new.eval())
    return out


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], example_input: torch.Tensor, *,
                form: str = "grouped", opset: int = 17, dynamic_batch: bool = True,
                fold_bn: bool = True, absorb: bool = True) -> str:
    """Write ``model`` as ONNX (standard operators only) to ``path``; returns the path.

    Args:
        model: any module; HetConv2d layers are rewritten by :func:`export_module`.
        path: the ``.onnx`` file (not a directory); written to a temporary file and
            renamed, so an existing file is never left half-written.
        example_input: an input batch (fixes every dimension but the batch), or one
            unbatched (C, H, W) input (then the model takes exactly that shape).
        form: ``"grouped"`` (cheap) or ``"dense"`` (one Conv per layer).
        opset: ONNX opset version, at least :data:`MIN_OPSET` (10: strided slices).
        dynamic_batch: make the batch dimension symbolic (batched input only).
        fold_bn: fold BatchNorm into the preceding convs first.
        absorb: for ``form="grouped"``, run shifted layers as blocked ones on
            class-sorted activations (:func:`hetconv.permute.absorb_permutations`),
            so the graph has no per-layer Gather.

    Uses the TorchScript-based exporter (``dynamo=False``), which handles these
    standard ops robustly on this torch version.
    """
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET} (strided slices, as in ResNet "
                         f"shortcuts, need Slice with steps), got {opset!r}")
    if not isinstance(absorb, bool):
        raise TypeError(f"absorb must be a bool, got {absorb!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"path must name the .onnx file to write, got the directory {path!r}")
    work = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm(work)
    if absorb and form == "grouped":
        work, _ = _absorbed(work, example_input)
    exportable = export_module(work, form)
    # an unbatched (C, H, W) input has no batch dimension to make symbolic
    dynamic_axes = {"input": {0: "batch"}, "output": {0: "batch"}} if (
        dynamic_batch and example_input.dim() != 3) else None
    with replacing(path, suffix=".onnx.tmp") as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, on purpose
            # the exporter tries to constant-fold every Slice and says so for the stride-2
            # slices of shortcuts (x[:, :, ::2, ::2]), which take the input, not a constant:
            # three lines per slice in every export of a ResNet, about nothing
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1",
                                    category=UserWarning)
            torch.onnx.export(exportable, (example_input.contiguous(),), tmp,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
    return path
