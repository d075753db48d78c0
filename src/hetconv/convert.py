"""Model surgery: swap the KxK convolutions of any model for :class:`HetConv2d`.

``convert(model, part)`` walks ``model.named_modules()`` (registration order,
which is execution order for torchvision's models) and replaces every
``nn.Conv2d`` that has a spatial, odd kernel and ``groups == 1`` by a
``HetConv2d`` with the same channels, stride, padding, dilation and bias.
Everything it leaves alone is listed in the report with the reason: 1x1
convs (nothing to split), grouped and depthwise convs (a HetConv filter needs
all input channels), even kernels (no centre tap for the 1x1 kernels),
non-zero padding modes, weights reparametrized by ``weight_norm`` / ``spectral_norm`` /
``prune`` hooks, ``nn.Conv2d`` subclasses (their ``forward`` may not be
a plain convolution), the first KxK conv (``skip_first``, the paper's rule),
names filtered out by ``include``/``exclude`` and layers whose ``in_channels``
``part`` does not divide (``indivisible``).

A conv registered under several names (``block.a = block.b = conv``) is one
layer: it is looked at once and its replacement is set under every name, so
the names stay tied (the report lists the other names).  Distinct convs sharing a weight
tensor (``b.weight = a.weight``) and converted alike get replacements that share theirs
(and their bias where the old ones shared it); where they are converted differently (or
one not at all) the tie cannot hold, and the report says so.  Forward and backward hooks
registered on a replaced conv are carried over to its replacement (their handles still
remove them).  The new layer's
weights require gradients as the old layer's did: a frozen conv stays frozen.

Existing ``HetConv2d`` layers are re-parted (via their dense weight), so
``convert(convert(m, 4)[0], 8)`` equals ``convert(m, 8)`` in structure.  A
resolved part of 1 means a standard convolution: the layer stays (or
becomes) an ``nn.Conv2d``.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
from torch.nn.utils.prune import BasePruningMethod as _Pruning
from torch.nn.utils.spectral_norm import SpectralNorm as _SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _WeightNorm

from . import pattern as _pattern
from .layers.hetconv import HetConv2d

__all__ = ["convert", "ConvertReport", "ConvertEntry", "layer_part", "INDIVISIBLE", "INITS"]

INDIVISIBLE = ("skip", "nearest", "error")
INITS = ("from_dense", "reinit")

PartSpec = Union[int, str, Callable[[str, nn.Module], Optional[Union[int, str]]]]
Patterns = Optional[Union[str, Sequence[str]]]


def _check_part_value(part, name: str = "part", callable_ok: bool = False) -> None:
    """``part`` is an int >= 1 or ``"C"``; the message names a callable as a choice only
    where one is (``convert``'s own ``part``, not a model's nor a callable's result)."""
    kinds = "a positive int, 'C' or a callable" if callable_ok else "a positive int or 'C'"
    if isinstance(part, str):
        if part.upper() != "C":
            raise ValueError(f"{name} must be {kinds}, got {part!r}")
    elif not isinstance(part, int) or isinstance(part, bool):
        raise TypeError(f"{name} must be {kinds}, got {part!r}")
    elif part < 1:
        raise ValueError(f"{name} must be >= 1, got {part}")


def layer_part(part: Union[int, str], in_channels: int,
               indivisible: str = "skip") -> Tuple[Optional[Union[int, str]], str]:
    """The part one layer gets, and why: ``(part or None, note)``.

    ``part`` is an int or ``"C"`` (kept as ``"C"``: P = in_channels).  When an
    int ``part`` does not divide ``in_channels``: ``indivisible="skip"``
    returns ``None`` (leave the layer standard), ``"nearest"`` the largest
    divisor of ``in_channels`` not above ``part``, ``"error"`` raises
    ``ValueError``.  Models and :func:`convert` share this one policy.
    """
    _check_part_value(part)
    if indivisible not in INDIVISIBLE:
        raise ValueError(f"indivisible must be one of {INDIVISIBLE}, got {indivisible!r}")
    if isinstance(part, str):
        return "C", ""
    if in_channels % part == 0:
        return part, ""
    if indivisible == "error":
        _pattern.resolve_part(part, in_channels)  # raises the descriptive ValueError
    if indivisible == "skip":
        return None, f"part={part} does not divide in_channels={in_channels}"
    nearest = max(d for d in range(1, min(part, in_channels) + 1) if in_channels % d == 0)
    return nearest, f"part={part} -> {nearest} (nearest divisor of in_channels={in_channels})"


@dataclass
class ConvertEntry:
    """One KxK-or-not convolution ``convert`` looked at."""

    name: str
    kind: str                 # "Conv2d", "HetConv2d", ...
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    groups: int
    old_part: int             # 1 for a standard conv
    new_part: Optional[int]   # None when left alone
    reason: str = ""          # why it was left alone, or a note on the part chosen
    aliases: Tuple[str, ...] = ()  # other names of the same module (replaced with it)

    @property
    def converted(self) -> bool:
        return self.new_part is not None


@dataclass
class ConvertReport:
    """What :func:`convert` did: every convolution it saw, converted or not and why."""

    part: object
    pattern: str
    entries: List[ConvertEntry] = field(default_factory=list)

    @property
    def converted(self) -> List[ConvertEntry]:
        return [e for e in self.entries if e.converted]

    @property
    def skipped(self) -> List[ConvertEntry]:
        return [e for e in self.entries if not e.converted]

    def __len__(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        part = getattr(self.part, "__name__", None) or repr(self.part)
        head = (f"convert(part={part}, pattern={self.pattern!r}): {len(self.converted)} "
                f"converted, {len(self.skipped)} left as they were")
        rows = [("name", "type", "in->out", "kernel", "stride", "part", "note")]
        for e in self.entries:
            part = str(e.old_part) if e.new_part is None else f"{e.old_part}->{e.new_part}"
            note = e.reason
            if e.aliases:
                note = (note + "; " if note else "") + "also registered as " + ", ".join(
                    e.aliases)
            rows.append((e.name or "(root)", e.kind, f"{e.in_channels}->{e.out_channels}",
                         "x".join(map(str, e.kernel_size)), "x".join(map(str, e.stride)),
                         part, note))
        reasons: dict = {}
        for e in self.skipped:
            key = e.reason.split(" (")[0].split(";")[0]
            reasons[key] = reasons.get(key, 0) + 1
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = [head]
        if reasons:
            lines.append("left alone: " + ", ".join(f"{n} {k}" for k, n in reasons.items()))
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        return "\n".join(line.rstrip() for line in lines)

    __repr__ = __str__


def _patterns(value: Patterns, name: str) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{name} must be None, a glob string or a list of glob strings, got {value!r}")


#: The pre-hooks of ``torch.nn.utils.weight_norm`` / ``spectral_norm`` / ``prune``: they set
#: ``weight`` from ``weight_g``/``weight_v`` (``weight_orig``, ``weight_mask``...) before every
#: call; carried over to a HetConv2d they would fail on its first call, so such convs are
#: left alone.
_WEIGHT_REPARAMETRIZATIONS = (_WeightNorm, _SpectralNorm, _Pruning)


def _why_not(module: nn.Module) -> str:
    """Why a conv module cannot be a HetConv2d ('' when it can)."""
    if isinstance(module, HetConv2d):
        return ""
    if type(module) is not nn.Conv2d:
        return f"{type(module).__name__} subclasses nn.Conv2d (its forward may differ)"
    kh, kw = module.kernel_size
    if kh * kw == 1:
        return "1x1 kernel (nothing to split)"
    if module.groups == module.in_channels and module.groups > 1:
        return f"depthwise (groups={module.groups})"
    if module.groups != 1:
        return f"grouped (groups={module.groups})"
    if kh % 2 == 0 or kw % 2 == 0:
        return f"even kernel {kh}x{kw} (no centre for the 1x1 kernels)"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
    norm = next((type(h).__name__ for h in module._forward_pre_hooks.values()
                 if isinstance(h, _WEIGHT_REPARAMETRIZATIONS)), None)
    if norm is not None:  # its hook computes ``weight`` from tensors a HetConv2d lacks
        return f"weight reparametrized by a {norm} hook (its forward recomputes the weight)"
    return ""


def _padding(conv: nn.Conv2d) -> Tuple[int, int]:
    if isinstance(conv.padding, str):  # 'same' / 'valid'
        return (0, 0) if conv.padding == "valid" else tuple(
            d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return tuple(conv.padding)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _carry_requires_grad(old: nn.Module, new: nn.Module) -> None:
    """Give ``new``'s weights the ``requires_grad`` of the ``old`` layer's they come from:
    a HetConv2d's ``weight_k`` / ``weight_1`` that of a dense ``weight`` (or of the old
    HetConv2d's own), a dense ``weight`` that of ``weight_k`` and ``weight_1`` (False when
    either is frozen), ``bias`` that of ``bias``."""
    if isinstance(old, HetConv2d):
        flags = {"weight_k": old.weight_k.requires_grad, "weight_1": old.weight_1.requires_grad}
        flags["weight"] = flags["weight_k"] and flags["weight_1"]
    else:
        flags = dict.fromkeys(("weight", "weight_k", "weight_1"), old.weight.requires_grad)
    if old.bias is not None:
        flags["bias"] = old.bias.requires_grad
    for name, p in new.named_parameters(recurse=False):
        if name in flags:
            p.requires_grad_(flags[name])


def _weights(conv: nn.Module) -> Tuple[nn.Parameter, ...]:
    """A conv's weight tensors (a HetConv2d's two, an nn.Conv2d's one)."""
    return (conv.weight_k, conv.weight_1) if isinstance(conv, HetConv2d) else (conv.weight,)


def _tie(new: nn.Module, conv: nn.Module, made: dict, key: tuple) -> None:
    """Keep weights ``conv`` shares with a conv converted before it shared by their
    replacements: ``new`` takes the earlier replacement's weights (same source weights, same
    conversion) and bias (same source bias)."""
    names = [n for n, _ in new.named_parameters(recurse=False) if n != "bias"]
    if key in made:
        for n in names:
            setattr(new, n, getattr(made[key], n))
    else:
        made[key] = new
    if conv.bias is not None:
        bias_key = ("bias", id(conv.bias))
        if bias_key in made:
            new.bias = made[bias_key].bias
        else:
            made[bias_key] = new


#: The hook dicts of ``nn.Module`` a replacement takes over (the same dict objects, so the
#: handles the user holds still remove them).
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_pre_hooks", "_backward_hooks")


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """``new`` runs the forward (and backward) hooks registered on ``old``."""
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if hooks:
            setattr(new, attr, hooks)
    if old._backward_hooks:
        new._is_full_backward_hook = old._is_full_backward_hook


def _note_broken_ties(report: ConvertReport, convs: list, outcome: dict) -> None:
    """Convs that shared a weight tensor but were converted differently (or one of them not
    at all) no longer share it: say so in their entries."""
    by_weight: dict = {}
    for name, conv in convs:
        by_weight.setdefault(tuple(id(t) for t in _weights(conv)), []).append(name)
    entries = {e.name: e for e in report.entries}
    for names in by_weight.values():
        if len(names) > 1 and len({outcome[n] for n in names}) > 1:
            for n in names:
                others = ", ".join(o for o in names if o != n)
                note = f"shared its weight with {others}: no longer tied (converted differently)"
                entries[n].reason = (entries[n].reason + "; " if entries[n].reason else "") + note


def convert(model: nn.Module, part: PartSpec, *, pattern: str = "shifted",
            skip_first: bool = True, include: Patterns = None, exclude: Patterns = None,
            indivisible: str = "skip", init: str = "from_dense",
            inplace: bool = False) -> Tuple[nn.Module, ConvertReport]:
    """Replace the KxK convolutions of ``model`` by :class:`HetConv2d` layers.

    Args:
        model: any ``nn.Module``; it is deep-copied first unless ``inplace``.
        part: P for every converted layer: an int, ``"C"`` (P = the layer's
            in_channels, the paper's "PC") or a callable ``(name, conv) -> part
            or None`` for per-layer choices (``None`` leaves that layer alone).
        pattern: kernel placement, ``"shifted"`` (the paper's) or ``"blocked"``.
        skip_first: keep the first convertible KxK conv (in ``named_modules``
            order) standard, as the paper does with CONV_1.
        include, exclude: glob pattern(s) on module names (``fnmatch``); a conv
            is converted only if it matches some ``include`` pattern (when
            given) and no ``exclude`` pattern.
        indivisible: when an int part does not divide a layer's in_channels:
            ``"skip"`` (leave it standard), ``"nearest"`` (largest divisor of
            in_channels <= part) or ``"error"``.
        init: ``"from_dense"`` copies the dense weights onto the pattern
            (:meth:`HetConv2d.from_conv2d`); ``"reinit"`` draws fresh ones.
        inplace: modify ``model`` itself instead of a copy (a ``model`` that is itself
            a convolution cannot be changed into another type: use the returned one).

    Returns:
        ``(converted_model, report)``; ``print(report)`` lists every conv, its
        old and new part, and why it was left alone if it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(part):
        _check_part_value(part, callable_ok=True)
    _pattern.validate_pattern(pattern)
    if indivisible not in INDIVISIBLE:
        raise ValueError(f"indivisible must be one of {INDIVISIBLE}, got {indivisible!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    includes = _patterns(include, "include")
    excludes = _patterns(exclude, "exclude")
    if not inplace:
        model = copy.deepcopy(model)

    report = ConvertReport(part=part, pattern=pattern)
    # every name of each conv (named_modules() gives a module once, under its first name)
    names_of: dict = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (nn.Conv2d, HetConv2d)):
            names_of.setdefault(id(m), []).append(n)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, HetConv2d))]
    first_seen = False
    made: dict = {}  # conversion key -> the first replacement made for it (weight ties)
    outcome = {name: None for name, _ in convs}  # how each conv was converted (None: not)
    for name, conv in convs:
        names = names_of[id(conv)]
        old_part = conv.part if isinstance(conv, HetConv2d) else 1
        entry = ConvertEntry(name, type(conv).__name__, conv.in_channels, conv.out_channels,
                             tuple(conv.kernel_size), tuple(conv.stride),
                             getattr(conv, "groups", 1), old_part, None,
                             aliases=tuple(n for n in names if n != name))
        report.entries.append(entry)
        entry.reason = _why_not(conv)
        if entry.reason:
            continue
        if not first_seen:
            first_seen = True
            if skip_first:
                entry.reason = "first KxK conv (skip_first=True)"
                continue
        # one module, one decision: included if one of its names is, excluded if one is
        if includes is not None and not any(fnmatch.fnmatchcase(n, p)
                                            for n in names for p in includes):
            entry.reason = "not matched by include"
            continue
        if excludes is not None and any(fnmatch.fnmatchcase(n, p)
                                        for n in names for p in excludes):
            entry.reason = "matched by exclude"
            continue
        wanted = part(name, conv) if callable(part) else part
        if wanted is None:
            entry.reason = "part callable returned None"
            continue
        _check_part_value(wanted, "part (returned by the callable)")
        chosen, note = layer_part(wanted, conv.in_channels, indivisible)
        if chosen is None:
            entry.reason = note
            continue
        entry.reason = note
        p = _pattern.resolve_part(chosen, conv.in_channels)
        if p == old_part and (not isinstance(conv, HetConv2d) or conv.pattern == pattern):
            entry.reason = (note + "; " if note else "") + f"already part={p}"
            continue
        dense = conv.to_conv2d() if isinstance(conv, HetConv2d) else conv
        if p == 1:
            new = dense
        elif dense.weight.is_meta:  # no values to carry over (e.g. built for counting)
            new = HetConv2d(dense.in_channels, dense.out_channels, dense.kernel_size,
                            dense.stride, _padding(dense), dense.dilation,
                            bias=dense.bias is not None, part=chosen, pattern=pattern,
                            device="meta", dtype=dense.weight.dtype)
        else:
            new = HetConv2d.from_conv2d(dense, chosen, pattern)
        if p > 1 and isinstance(conv, HetConv2d):
            new.backend = conv.backend
        if init == "reinit":
            new.reset_parameters()
        _carry_requires_grad(conv, new)
        outcome[name] = (p, pattern if p > 1 else None)
        _tie(new, conv, made, (tuple(id(t) for t in _weights(conv)),) + outcome[name])
        _carry_hooks(conv, new)
        new.train(conv.training)
        for n in names:  # the module's every name: they stay one (tied) layer
            if n:
                _replace(model, n, new)
            else:  # the model is itself the conv: its replacement is the result
                model = new
        entry.new_part = p
    _note_broken_ties(report, convs, outcome)
    return model, report
