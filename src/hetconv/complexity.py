"""What a model costs: multiply-accumulates (MACs) and parameters, per module and in total.

Convention (the paper's "FLOPs" column)
---------------------------------------
* Counted: multiply-accumulates of convolution and linear layers, per
  example (the counts are divided by the batch size of the input).

  - ``nn.Conv1d/2d/3d``: ``output elements * in_channels/groups * prod(kernel)``,
    so grouped and depthwise convolutions count their true cost.
  - ``nn.ConvTranspose1d/2d/3d``: ``input elements * out_channels/groups * prod(kernel)``.
  - ``nn.Linear``: ``output elements * in_features`` (so a Squeeze-and-Excitation
    block's two fully connected layers are counted: they are ``nn.Linear``).
  - ``nn.MultiheadAttention``: its query, key, value and output projections (linear
    layers it runs on its own weights, so no ``nn.Linear`` hook sees them):
    ``(query + key + value + output elements) * embed_dim``.
  - :class:`~hetconv.HetConv2d`: ``FL_K + FL_1 = Ho*Wo*N*(M/P*Kh*Kw + M - M/P)``
    (paper Eq. 2-4), exactly, whatever backend executes the layer.
  - The modules of :func:`hetconv.optimize_for_inference` count what the layers they
    run would: :class:`~hetconv.deploy.PackedConv2d` as ``nn.Conv2d``,
    :class:`~hetconv.deploy.NativeFused` as its HetConv2d (the fused sum, ReLU and
    pool are not counted), :class:`~hetconv.deploy.NativeSequence` and
    :class:`~hetconv.deploy.NativeChain` as their layers (which one C call runs, so
    their own hooks do not fire), each counted from the shapes they pass on.  So an
    optimized model counts as the model it came from (with its BatchNorms folded).
* Not counted: BatchNorm, activations, pooling, additions, the element-wise
  products of SE gating, padding and the index shuffles of HetConv backends; the
  attention products of ``nn.MultiheadAttention`` (``Q K^T``, weights times ``V``);
  recurrent layers (``nn.RNN``/``LSTM``/``GRU``); weights used by a functional call
  (``F.conv2d(x, self.conv.weight)``) rather than through their module.
* Parameters: every parameter of the model once (shared ones once); the rows
  show each module's own parameters.  A ``PackedConv2d``'s weight and bias, which
  are buffers (an inference module's), count as parameters.  The grouped form
  :func:`hetconv.deploy.export_module` gives a HetConv2d counts as that layer (MACs
  and parameters; its ``form="dense"`` is an ``nn.Conv2d``, counted as one).
* The input: ``(C, H, W)`` is made a batch of one; a tensor is taken batch first,
  except that an input with which the 2-d convolutions run unbatched (a ``(C, H, W)``
  tensor) is one example.  An empty batch cannot be counted per example
  (``ValueError``).

Why a counter by module and not by traced operator
--------------------------------------------------
``torch.utils.flop_counter.FlopCounterMode`` (and fvcore, which traces with
the JIT) count the ``aten`` operators that actually run.  A HetConv layer runs
as ordinary convolutions: the ``"dense"`` backend as one full KxK convolution
(cost ``FL_S``), the ``"grouped"`` backend as a grouped conv plus a full
pointwise conv (``FL_K + Ho*Wo*N*M``).  Neither is the layer's defining cost
``FL_K + FL_1``, and no operator-level rule can tell a HetConv convolution
from any other one.  So the rules here attach to *module types*, through
forward hooks: the layer's cost is computed from its definition and the output
shape observed in a real forward pass, which also gives every row its output
shape.  Other module types can be given a rule with :func:`register_rule`.
Models may live on the ``meta`` device: only shapes are needed.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import native as _native
from ._modes import evaluating
from . import pattern as _pattern
from .deploy import (ChannelPadShortcut, NativeChain, NativeFused, NativeSequence, PackedConv2d,
                     _GroupedExport)
from .layers.hetconv import HetConv2d

__all__ = ["profile", "Profile", "ProfileRow", "register_rule", "RULES", "format_count"]

Rule = Callable[[nn.Module, Tuple, torch.Tensor], int]


def _first_tensor(value) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, dict):
        return _first_tensor(list(value.values()))
    return None


def _arguments(module: nn.Module, args: Tuple, kwargs: dict) -> Tuple:
    """The arguments of a call, positional and keyword ones, in ``forward``'s order."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return tuple(args) + tuple(kwargs.values())
    return tuple(bound.arguments.values())


def _conv_macs(m: nn.Module, inputs: Tuple, out: torch.Tensor) -> int:
    return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _conv_transpose_macs(m: nn.Module, inputs: Tuple, out: torch.Tensor) -> int:
    x = _first_tensor(inputs)
    return x.numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)


def _linear_macs(m: nn.Linear, inputs: Tuple, out: torch.Tensor) -> int:
    return out.numel() * m.in_features


def _attention_macs(m: nn.MultiheadAttention, inputs: Tuple, out: torch.Tensor) -> int:
    """The four projections (linear layers the module runs on its own weights, not through
    its ``out_proj`` module): query, key and value in, the attention output out."""
    q, k, v = [t for t in inputs if isinstance(t, torch.Tensor)][:3]
    return (q.numel() + k.numel() + v.numel() + out.numel()) * m.embed_dim


def _hetconv_macs(m: HetConv2d, inputs: Tuple, out: torch.Tensor) -> int:
    per_map = _pattern.hetconv_macs(m.in_channels, m.out_channels, m.kernel_size,
                                    tuple(out.shape[-2:]), m.part)
    maps = out.numel() // (m.out_channels * out.shape[-2] * out.shape[-1])
    return per_map * maps


# --- the modules of optimize_for_inference: counted from the shapes they pass on, as
# their layers would be (NativeSequence and NativeChain run theirs in one C call)

def _hetconv_step(layer: HetConv2d, shape: Tuple[int, ...]) -> Tuple[int, Tuple[int, ...]]:
    """MACs of ``layer`` on an input of ``shape`` (batched or not), and its output shape."""
    out_hw = tuple(layer.output_size(*shape[-2:]))
    macs = _pattern.hetconv_macs(layer.in_channels, layer.out_channels, layer.kernel_size,
                                 out_hw, layer.part)
    return macs * math.prod(shape[:-3]), (*shape[:-3], layer.out_channels, *out_hw)


def _fused_step(m: NativeFused, shape: Tuple[int, ...]) -> Tuple[int, Tuple[int, ...]]:
    macs, out = _hetconv_step(m.layer, shape)
    pool = m._modules.get("pool")
    if pool is not None:  # (the shape only: a max-pool on the meta device)
        out = tuple(pool(torch.empty(out, device="meta")).shape)
    return macs, out


def _step(m: nn.Module, shape: Tuple[int, ...]) -> Tuple[int, Tuple[int, ...]]:
    """One layer of a NativeSequence / NativeChain: (MACs, output shape)."""
    if isinstance(m, NativeFused):
        return _fused_step(m, shape)
    if isinstance(m, ChannelPadShortcut):  # x[:, :, ::s, ::s], channels padded: no MACs
        s = m.stride
        return 0, (*shape[:-3], shape[-3] + m.front + m.back, -(-shape[-2] // s),
                   -(-shape[-1] // s))
    raise TypeError(f"profile cannot count a {type(m).__name__} inside a native chain or "
                    f"sequence (register_rule for the chain or sequence itself)")


def _native_fused_macs(m: NativeFused, inputs: Tuple, out: torch.Tensor) -> int:
    return _fused_step(m, tuple(_first_tensor(inputs).shape))[0]


def _native_sequence_macs(m: NativeSequence, inputs: Tuple, out: torch.Tensor) -> int:
    shape, total = tuple(_first_tensor(inputs).shape), 0
    for layer in m.layers:
        macs, shape = _step(layer, shape)
        total += macs
    return total


def _native_chain_macs(m: NativeChain, inputs: Tuple, out: torch.Tensor) -> int:
    """The chain's program run on shapes (whether the chain runs in one C call or layer by
    layer, ``enabled`` or not)."""
    shapes = {_native.CHAIN_X: tuple(inputs[0].shape)}
    if len(inputs) > 1 and isinstance(inputs[1], torch.Tensor):
        shapes[_native.CHAIN_X2] = tuple(inputs[1].shape)
    total = 0
    for layer, (i, _, o) in zip(m.layers, m.program):
        macs, shapes[o] = _step(layer, shapes[i])
        total += macs
    return total


RULES: Dict[type, Rule] = {
    nn.Conv1d: _conv_macs, nn.Conv2d: _conv_macs, nn.Conv3d: _conv_macs,
    nn.ConvTranspose1d: _conv_transpose_macs, nn.ConvTranspose2d: _conv_transpose_macs,
    nn.ConvTranspose3d: _conv_transpose_macs,
    nn.Linear: _linear_macs,
    nn.MultiheadAttention: _attention_macs,
    HetConv2d: _hetconv_macs,
    _GroupedExport: _hetconv_macs,  # (export_module's form of a HetConv2d: the same layer)
    PackedConv2d: _conv_macs,
    NativeFused: _native_fused_macs,
    NativeSequence: _native_sequence_macs,
    NativeChain: _native_chain_macs,
}

#: weights that a module type keeps as buffers (an inference module's), counted as parameters
_WEIGHT_BUFFERS: Dict[type, Tuple[str, ...]] = {PackedConv2d: ("weight", "bias")}
_STANDINS: "weakref.WeakKeyDictionary[nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()


def _weights(module: nn.Module, recurse: bool) -> List[torch.Tensor]:
    """``module``'s parameters and the weights its (sub)modules keep as buffers (an
    exported HetConv2d's: a stand-in of the layer's parameter count, made once per module,
    since its buffers hold them with zeros in the grouped conv's slots)."""
    found = list(module.parameters(recurse=recurse))
    for m in (module.modules() if recurse else (module,)):
        if isinstance(m, _GroupedExport):
            if m not in _STANDINS:
                _STANDINS[m] = torch.empty(m.layer_params, device="meta")
            found.append(_STANDINS[m])
        for name in next((names for cls, names in _WEIGHT_BUFFERS.items()
                          if isinstance(m, cls)), ()):
            t = m._buffers.get(name)
            if t is not None:
                found.append(t)
    return found


def _spatial_dims(module: nn.Module) -> Optional[int]:
    """Spatial dimensions of a convolution-like module (None for others): an input with one
    more (no batch dimension) means the model runs on one unbatched example."""
    if isinstance(module, (nn.modules.conv._ConvNd, HetConv2d, PackedConv2d, _GroupedExport)):
        return len(module.kernel_size)
    if isinstance(module, (NativeFused, NativeSequence, NativeChain)):
        return 2
    return None


def register_rule(module_type: type, rule: Rule) -> None:
    """Count ``module_type`` (and its subclasses) with ``rule(module, inputs, output) -> MACs``.

    The rule returns the MACs of one call for the whole batch; the module's
    children (and whatever else runs inside its call) are then not counted
    separately.  ``inputs`` holds the call's arguments in ``forward``'s order, those
    given by keyword included; ``output`` is the first tensor of the output.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(rule):
        raise TypeError(f"rule must be callable, got {rule!r}")
    RULES[module_type] = rule


def _rule_for(module: nn.Module) -> Optional[Rule]:
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls]
    return None


def format_count(n: float) -> str:
    """``313_740_000 -> '313.74M'`` (K, M, G; 2 decimals).  The unit is chosen after
    rounding: ``999_999 -> '1.00M'``, not ``'1000.00K'``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        # (or where the next smaller unit would print 1000.00)
        if abs(n) >= scale or round(abs(n) * 1000 / scale, 2) >= 1000:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if n == int(n) else f"{n:.2f}"


@dataclass
class ProfileRow:
    """One module: qualified name, type, MACs per example, own parameters, output shape."""

    name: str
    type: str
    macs: float
    params: int
    output_shape: Optional[Tuple[int, ...]]
    calls: int = 0


@dataclass
class Profile:
    """Result of :func:`profile`: ``.macs`` and ``.params`` totals, ``.rows`` per module."""

    macs: float
    params: int
    rows: List[ProfileRow] = field(default_factory=list)
    input_shape: Tuple[int, ...] = ()
    #: the input was one example without a batch dimension (shapes have none to leave out)
    unbatched: bool = False

    def row(self, name: str) -> ProfileRow:
        """The row of the module called ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no module named {name!r} in this profile")

    def by_type(self) -> Dict[str, float]:
        """MACs per module type, largest first."""
        out: Dict[str, float] = {}
        for r in self.rows:
            out[r.type] = out.get(r.type, 0) + r.macs
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def table(self, all_rows: bool = False) -> str:
        """Readable table; without ``all_rows`` modules with no MACs and no params are left out."""
        shown = [r for r in self.rows if all_rows or r.macs or r.params]
        skip = 0 if self.unbatched else 1  # the batch dimension, left out of the shapes
        header = ("module", "type", "output", "MACs", "%", "params")
        lines = [header]
        for r in shown:
            shape = "x".join(map(str, r.output_shape[skip:])) if r.output_shape else "-"
            share = f"{100 * r.macs / self.macs:.1f}" if self.macs else "-"
            lines.append((r.name or "(root)", r.type, shape, format_count(r.macs), share,
                          format_count(r.params)))
        lines.append(("total", "", "x".join(map(str, self.input_shape[skip:])) + " in",
                      format_count(self.macs), "100.0" if self.macs else "-",
                      format_count(self.params)))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        right = {3, 4, 5}
        text = []
        for k, line in enumerate(lines):
            if k == len(lines) - 1 or k == 1:
                text.append("  ".join("-" * w for w in widths))
            text.append("  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                                  for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        omitted = len(self.rows) - len(shown)
        if omitted:
            text.append(f"({omitted} modules without MACs or parameters not shown)")
        idle = [r.name or "(root)" for r in self.rows if r.params and not r.calls]
        if idle:  # e.g. weights a parent runs functionally (F.conv2d(x, self.conv.weight))
            names = ", ".join(idle[:5]) + (", ..." if len(idle) > 5 else "")
            text.append(f"({len(idle)} modules with parameters were not called, so count no "
                        f"MACs: {names})")
        text.append("MACs: multiply-accumulates of conv and linear layers per example "
                    "(the paper's FLOPs)")
        return "\n".join(text)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"Profile(macs={format_count(self.macs)}, params={format_count(self.params)})"


def _example(model: nn.Module, input_size) -> torch.Tensor:
    if isinstance(input_size, torch.Tensor):
        return input_size
    if (not isinstance(input_size, (tuple, list, torch.Size)) or not input_size
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                       for s in input_size)):
        raise ValueError(
            f"input_size must be a tensor or a tuple of positive ints (C, H, W) without the "
            f"batch dimension, got {input_size!r}")
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next(model.buffers(), torch.zeros(()))
    # (``dtype``, not ``is_floating_point()``: a lazy module's parameters have no data yet)
    dtype = ref.dtype if ref.dtype.is_floating_point else torch.get_default_dtype()
    return torch.zeros((1, *input_size), device=ref.device, dtype=dtype)


def profile(model: nn.Module, input_size: Union[Sequence[int], torch.Tensor] = (3, 32, 32)
            ) -> Profile:
    """Count MACs and parameters of ``model`` with one forward pass.

    Args:
        model: any ``nn.Module`` (CPU, GPU or ``meta`` device).  It runs in
            eval mode under ``torch.no_grad()``; its training flag is restored.
        input_size: ``(C, H, W)`` (a zero batch of one is made on the model's
            device) or an example input tensor (batch first).

    Returns:
        :class:`Profile` with ``.macs`` (per example, see the module docstring
        for what counts), ``.params`` and ``.rows``; ``print`` it for a table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    script = next((n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)),
                  None)
    if script is not None:  # a traced module runs its graph: no module hook fires (0 MACs)
        raise TypeError(
            f"profile counts with module hooks, which TorchScript modules (torch.jit.trace / "
            f"script) do not run: {'the model' if not script else repr(script)} is one; "
            f"profile the eager module it was made from")
    x = _example(model, input_size)
    if x.dim() > 1 and x.shape[0] == 0:
        raise ValueError(f"the input tensor has an empty batch (shape {tuple(x.shape)}): "
                         "MACs are counted per example, give at least one")
    unbatched = False  # set when a convolution runs on the input without a batch dimension

    rows: Dict[str, ProfileRow] = {}
    counted: Dict[str, Optional[Rule]] = {}
    recurse: Dict[str, bool] = {}  # whether a row's parameters are its submodules' too
    ruled_prefixes: List[str] = []
    for name, m in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in ruled_prefixes):
            continue  # inside a module counted as a whole (the model itself, for p == "")
        rule = _rule_for(m)
        leaf = next(m.children(), None) is None
        own = _weights(m, recurse=rule is not None)
        if rule is None and not leaf and not own:
            continue
        if rule is not None:
            ruled_prefixes.append(name)
        rows[name] = ProfileRow(name, type(m).__name__, 0, 0, None)
        counted[name] = rule
        recurse[name] = rule is not None

    # modules counted as a whole that are running now: what runs inside one of them is in
    # its count (a module registered under another name too has a row and a hook of its own)
    running: List[nn.Module] = []

    def enter(module, inputs):
        running.append(module)

    def hook(name: str):
        def fn(module, inputs, kwargs, output):
            nonlocal unbatched
            if kwargs:  # tensors given by keyword: the rules see them in signature order
                inputs = _arguments(module, inputs, kwargs)
            rule = counted[name]
            if rule is not None:
                running.pop()
            row = rows[name]
            out = _first_tensor(output)
            row.calls += 1
            if out is not None:
                row.output_shape = tuple(out.shape)
            if rule is not None and out is not None and not running:
                row.macs += rule(module, inputs, out)
                dims, xin = _spatial_dims(module), _first_tensor(inputs)
                # the model's input itself without a batch dimension (not a tensor of the
                # model's own, such as a parameter, that a convolution runs on unbatched)
                if dims is not None and xin is not None and xin.dim() == dims + 1 == x.dim():
                    unbatched = True
        return fn

    modules = dict(model.named_modules())
    handles = []
    try:
        for n in rows:
            if counted[n] is not None:
                handles.append(modules[n].register_forward_pre_hook(enter))
            # (always_call: a ruled module that raises, in a model that catches it, leaves
            # the stack of running ones as it found it)
            handles.append(modules[n].register_forward_hook(
                hook(n), with_kwargs=True, always_call=counted[n] is not None))
        with evaluating(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    # per example: a batch-first tensor holds x.shape[0] of them (the counts above are of
    # the whole batch), an unbatched one (the convolutions said so) one
    batched = x.dim() > 1 and not unbatched
    batch = x.shape[0] if batched else 1
    for r in rows.values():
        r.macs = r.macs / batch
        if r.macs == int(r.macs):
            r.macs = int(r.macs)
    # parameters counted after the forward pass: lazy modules have their shapes only then
    for name, r in rows.items():
        r.type = type(modules[name]).__name__  # (a lazy module has become its plain class)
        r.params = sum(p.numel() for p in _weights(modules[name], recurse=recurse[name]))
    seen = {id(p): p.numel() for p in _weights(model, recurse=True)}
    total = sum(r.macs for r in rows.values())
    return Profile(total, sum(seen.values()), list(rows.values()), tuple(x.shape),
                   not batched)
