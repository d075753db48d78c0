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

import copy
import logging
import os
import tempfile
import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as HF
from ._timing import time_interleaved
from .layers import HetConv2d
from .permute import absorb_permutations, has_shifted_layers

__all__ = ["fold_batchnorm", "optimize_for_inference", "export_onnx", "export_module"]

log = logging.getLogger(__name__)

_CONVS = (nn.Conv2d, HetConv2d)
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
EXPORT_FORMS = ("grouped", "dense")


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
    return (isinstance(conv, _CONVS) and isinstance(bn, nn.BatchNorm2d)
            and bn.running_mean is not None and bn.num_features == conv.out_channels)


@torch.no_grad()
def _fold_pair(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    """Scale ``conv``'s weights per filter and set its bias so ``conv`` alone equals ``bn(conv)``."""
    s, t = _bn_scale_shift(bn)
    weights = [conv.weight_k, conv.weight_1] if isinstance(conv, HetConv2d) else [conv.weight]
    for w in weights:
        w.mul_(s.to(w.dtype).reshape((-1,) + (1,) * (w.dim() - 1)))
    ref = weights[0]
    bias = t if conv.bias is None else conv.bias * s + t
    conv.bias = nn.Parameter(bias.to(device=ref.device, dtype=ref.dtype),
                             requires_grad=ref.requires_grad)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, each eval-mode BatchNorm2d that directly follows a conv. Returns the count.

    A pair is recognised (a) inside an ``nn.Sequential`` (a conv immediately
    followed by a BatchNorm2d, as in ``conv -> BN -> ReLU`` units), and
    (b) as sibling attributes ``convK`` / ``bnK`` (torchvision's ResNet
    convention, whose forward applies them back to back).  Convs are
    ``nn.Conv2d`` and :class:`HetConv2d`; the conv gains a bias, the
    BatchNorm becomes ``nn.Identity``.  BatchNorms without running statistics
    are left alone.  Call on a model in eval mode (training-mode BN uses batch
    statistics and cannot be folded).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    folded = 0
    for parent in list(model.modules()):
        names = list(parent._modules)
        pairs: List[Tuple[str, str]] = []
        if isinstance(parent, nn.Sequential):
            pairs = [(a, b) for a, b in zip(names, names[1:])]
        else:
            pairs = [(n, "bn" + n[4:]) for n in names
                     if n.startswith("conv") and n[4:].isdigit() and "bn" + n[4:] in names]
        for conv_name, bn_name in pairs:
            conv, bn = parent._modules[conv_name], parent._modules[bn_name]
            if _foldable(conv, bn):
                _fold_pair(conv, bn)
                parent._modules[bn_name] = nn.Identity()
                folded += 1
    return folded


# ---------------------------------------------------------------------------
# Backend and memory-format selection
# ---------------------------------------------------------------------------

def _capture_inputs(model: nn.Module, example_input: torch.Tensor) -> Dict[nn.Module, torch.Tensor]:
    """The input each HetConv2d of ``model`` sees on ``example_input``."""
    seen: Dict[nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.setdefault(mod, args[0].detach()))
             for m in model.modules() if isinstance(m, HetConv2d)]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _fastest_backend(layer: HetConv2d, x: torch.Tensor, repeats: int) -> Tuple[str, dict]:
    """The backend of ``layer`` that runs fastest on ``x`` (ties go to the rule's choice)."""
    if layer.part == 1:
        return "dense", {}

    def run(backend):
        def call():
            return HF.het_conv2d(x, layer.weight_k, layer.weight_1, layer.bias, layer.stride,
                                 layer.padding, layer.dilation, layer.pattern, backend)
        return call

    with torch.no_grad():
        times = time_interleaved({b: run(b) for b in HF.BACKENDS}, repeats=repeats, warmup=1)
    medians = {b: t.median for b, t in times.items()}
    return min(medians, key=medians.get), medians


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


def _time_model(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        return time_interleaved({"m": lambda: model(x)}, repeats=repeats, warmup=1)["m"].median


def optimize_for_inference(model: nn.Module, example_input: Optional[torch.Tensor] = None, *,
                           fold_bn: bool = True, backend: str = "measure",
                           memory_format: str = "auto", repeats: int = 5, check: bool = True,
                           rtol: float = 1e-4, atol: float = 1e-4,
                           absorb: bool = True) -> nn.Module:
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
        memory_format: ``"auto"`` (measure both), ``"contiguous"`` or ``"channels_last"``.
        repeats: timed repeats per candidate (medians are compared).
        check: compare outputs with ``model``'s on ``example_input``; raise
            ``RuntimeError`` when they differ beyond ``rtol``/``atol``.
        absorb: run ``pattern="shifted"`` layers as blocked ones on class-sorted
            activations (:func:`hetconv.permute.absorb_permutations`): the
            per-layer channel gathers disappear.  The result is then a
            ``torch.fx.GraphModule``; a model fx cannot trace is kept as it is
            (with a warning).

    The returned copy is in eval mode and carries ``hetconv_plan``: a dict with
    the chosen memory format, the number of folded BatchNorms, the absorbed
    permutations and the backend (with measured medians in seconds) of every
    HetConv2d by module name.
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
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor or None, got {type(example_input).__name__}")
    if example_input is None and (backend == "measure" or memory_format == "auto"):
        backend = "auto" if backend == "measure" else backend
        memory_format = "channels_last" if memory_format == "auto" else memory_format

    out = copy.deepcopy(model).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    plan: dict = {"folded_batchnorms": fold_batchnorm(out) if fold_bn else 0, "layers": {}}
    if absorb:
        out, plan["permutations"] = _absorbed(out, example_input)
    names = {m: n for n, m in out.named_modules()}

    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    if memory_format == "auto":
        timed = {}
        for name, fmt in formats.items():
            out.to(memory_format=fmt)
            timed[name] = _time_model(out, example_input.contiguous(memory_format=fmt), repeats)
        memory_format = min(timed, key=timed.get)
        plan["memory_format_seconds"] = timed
    out.to(memory_format=formats[memory_format])
    plan["memory_format"] = memory_format

    hets = [m for m in out.modules() if isinstance(m, HetConv2d)]
    if backend == "measure":
        x = example_input.contiguous(memory_format=formats[memory_format])
        inputs = _capture_inputs(out, x)
        for layer in hets:
            if layer not in inputs:  # not reached by this input: keep the rule
                layer.backend = "auto"
                continue
            layer.backend, medians = _fastest_backend(layer, inputs[layer], repeats)
            plan["layers"][names[layer]] = {"backend": layer.backend, "seconds": medians}
    else:
        for layer in hets:
            layer.backend = backend
            plan["layers"][names[layer]] = {"backend": backend}
    out.hetconv_plan = plan

    if check and example_input is not None:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                ref, got = model(example_input), out(example_input)
        finally:
            model.train(was)
        if not torch.allclose(got.float(), ref.float(), rtol=rtol, atol=atol):
            err = (got.float() - ref.float()).abs().max().item()
            raise RuntimeError(
                f"optimized model differs from the original by up to {err:.3g} "
                f"(rtol={rtol}, atol={atol}); pass fold_bn=False or a looser tolerance")
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
        self.kernel = layer.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xg = x if self.channel_order is None else x.index_select(1, self.channel_order)
        y = F.conv2d(xg, self.wk, self.b, self.stride, self.padding, self.dilation, self.groups)
        xc, pc = HF._centre_input(x, self.kernel, self.padding, self.dilation)
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
        path: the ``.onnx`` file; written to a temporary file and renamed, so an
            existing file is never left half-written.
        example_input: an input batch (fixes every dimension but the batch).
        form: ``"grouped"`` (cheap) or ``"dense"`` (one Conv per layer).
        opset: ONNX opset version.
        dynamic_batch: make the batch dimension symbolic.
        fold_bn: fold BatchNorm into the preceding convs first.
        absorb: for ``form="grouped"``, run shifted layers as blocked ones on
            class-sorted activations (:func:`hetconv.permute.absorb_permutations`),
            so the graph has no per-layer Gather.

    Uses the TorchScript-based exporter (``dynamo=False``), which handles these
    standard ops robustly on this torch version.
    """
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    if not isinstance(opset, int) or opset < 9:
        raise ValueError(f"opset must be an int >= 9, got {opset!r}")
    if not isinstance(absorb, bool):
        raise TypeError(f"absorb must be a bool, got {absorb!r}")
    work = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm(work)
    if absorb and form == "grouped":
        work, _ = _absorbed(work, example_input)
    exportable = export_module(work, form)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=directory)
    os.close(fd)
    dynamic_axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, on purpose
            torch.onnx.export(exportable, (example_input.contiguous(),), tmp,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
