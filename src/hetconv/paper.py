"""The paper's complexity figures (Tables 1, 3-7) and their reproduction by counting.

Each :class:`PaperRow` holds what the paper prints for one model (FLOPs,
params and/or "FLOPs reduced"); :func:`reproduce` builds the model from the
registry (on the ``meta`` device: only shapes are needed), counts it with
:func:`hetconv.profile` and returns the paper's figure beside the computed
one.  ``hetconv paper-tables`` prints the result.

How the figures are computed
----------------------------
* FLOPs = MACs of conv and linear layers per image (see :mod:`hetconv.complexity`);
  CIFAR models at 3x32x32, ImageNet models at 3x224x224.
* "FLOPs reduced" = ``1 - macs(model) / macs(baseline)``, the baseline being
  the plain architecture (P = 1; MobileNet's depthwise + pointwise original)
  with the same ``se`` setting.
* Params: every parameter, BatchNorm included.  The paper's ``_SE`` rows add
  about half the parameters two reduction-8 FC layers after every conv have
  (while their FLOPs deltas match): the implementation is not bent to that,
  so those rows differ (see PAPER.md's known quirk); they are reported, not
  asserted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .complexity import format_count, profile
from .models import create_model, default_input_size, parse_model_name

__all__ = ["PaperRow", "Reproduced", "PAPER_ROWS", "reproduce", "format_reproduction",
           "baseline_name"]


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper: table number, paper label, registry name, printed figures."""

    table: int
    label: str
    model: str
    flops: Optional[float] = None       # MACs, as printed (e.g. 313.74e6)
    params: Optional[float] = None
    reduction: Optional[float] = None   # "FLOPs reduced", percent

    @property
    def input_size(self) -> Tuple[int, int, int]:
        """What the model is counted at: 3x32x32 (CIFAR) or 3x224x224 (ImageNet)."""
        return default_input_size(self.model)


def _t1(label: str, flops: float, params: float) -> PaperRow:
    name = "vgg16_cifar" + label[len("VGG-16"):].lower()
    return PaperRow(1, label, name, flops * 1e6, params * 1e6)


PAPER_ROWS: Tuple[PaperRow, ...] = (
    _t1("VGG-16_P1", 313.74, 15.00), _t1("VGG-16_P1_SE", 314.19, 15.22),
    _t1("VGG-16_P2", 175.23, 8.45), _t1("VGG-16_P2_SE", 175.67, 8.68),
    _t1("VGG-16_P4", 105.98, 5.17), _t1("VGG-16_P4_SE", 106.42, 5.41),
    _t1("VGG-16_GWC4_PWC", 107.67, 5.42),
    _t1("VGG-16_P8", 71.35, 3.54), _t1("VGG-16_P8_SE", 71.79, 3.77),
    _t1("VGG-16_P16", 54.04, 2.72), _t1("VGG-16_P16_SE", 54.48, 2.95),
    _t1("VGG-16_P32", 45.38, 2.31), _t1("VGG-16_P32_SE", 45.82, 2.54),
    _t1("VGG-16_P64", 41.05, 2.11), _t1("VGG-16_P64_SE", 41.49, 2.34),
    _t1("VGG-16_DWC_PWC", 38.53, 1.97),
    _t1("VGG-16_PC", 38.18, 1.93), _t1("VGG-16_PC_SE", 38.62, 2.15),
    PaperRow(3, "ResNet-56_P1", "resnet56_cifar"),
    PaperRow(3, "ResNet-56_P2", "resnet56_cifar_p2", reduction=44.30),
    PaperRow(3, "ResNet-56_P4", "resnet56_cifar_p4", reduction=66.45),
    PaperRow(3, "ResNet-56_P1_SE", "resnet56_cifar_p1_se"),
    PaperRow(3, "ResNet-56_P2_SE", "resnet56_cifar_p2_se", reduction=44.27),
    PaperRow(3, "ResNet-56_P4_SE", "resnet56_cifar_p4_se", reduction=66.42),
    PaperRow(4, "MobileNet", "mobilenet_cifar", flops=46.36e6),
    PaperRow(4, "MobileNet_P32", "mobilenet_cifar_p32", flops=55.94e6),
    PaperRow(4, "MobileNet_P32_SE", "mobilenet_cifar_p32_se", flops=56.91e6),
    PaperRow(5, "VGG-16_P1", "vgg16"),
    PaperRow(5, "VGG-16_P4", "vgg16_p4", reduction=65.8),
    PaperRow(6, "ResNet-34_P1", "resnet34", flops=3.6e9),
    PaperRow(6, "ResNet-34_P4", "resnet34_p4", flops=1.3e9, reduction=64.48),
    PaperRow(6, "ResNet-34_P4_SE", "resnet34_p4_se", flops=1.3e9, reduction=64.48),
    PaperRow(7, "ResNet-50_P1", "resnet50", flops=4.09e9),
    PaperRow(7, "ResNet-50_P4", "resnet50_p4", flops=2.85e9, reduction=30.32),
)


def baseline_name(model: str) -> Optional[str]:
    """The plain architecture with the same SE setting (``"resnet56_cifar_p4_se"`` ->
    ``"resnet56_cifar_se"``); ``None`` when ``model`` is itself one.  For
    MobileNet the plain model is the depthwise + pointwise original."""
    base, kwargs = parse_model_name(model)
    if kwargs.get("part") in (None, 1) and "conv" not in kwargs:
        return None
    return base + ("_se" if kwargs.get("se") else "")


@dataclass
class Reproduced:
    """A paper row with the computed figures (``None`` where the paper prints none)."""

    row: PaperRow
    macs: float
    params: int
    reduction: Optional[float]

    @staticmethod
    def _rel(paper: Optional[float], ours: Optional[float]) -> Optional[float]:
        return None if paper is None or ours is None else 100.0 * (ours - paper) / paper

    @property
    def flops_diff(self) -> Optional[float]:
        """Computed minus paper FLOPs, in percent of the paper's figure."""
        return self._rel(self.row.flops, self.macs)

    @property
    def params_diff(self) -> Optional[float]:
        """Computed minus paper params, in percent of the paper's figure."""
        return self._rel(self.row.params, self.params)

    @property
    def reduction_diff(self) -> Optional[float]:
        """Computed minus paper reduction, in percentage points."""
        if self.row.reduction is None or self.reduction is None:
            return None
        return self.reduction - self.row.reduction


def _count(model: str, input_size) -> Tuple[float, int]:
    with torch.device("meta"):
        net = create_model(model)
    p = profile(net, input_size)
    return p.macs, p.params


def reproduce(rows: Iterable[PaperRow] = PAPER_ROWS, progress: bool = False) -> List[Reproduced]:
    """Build and count every model of ``rows``; baselines are counted once and shared."""
    rows = list(rows)
    cache: Dict[str, Tuple[float, int]] = {}

    def count(name: str, size) -> Tuple[float, int]:
        if name not in cache:
            cache[name] = _count(name, size)
        return cache[name]

    it = rows
    if progress:
        try:
            from tqdm import tqdm
            import sys
            it = tqdm(rows, desc="paper tables", disable=not sys.stderr.isatty())
        except ImportError:
            pass
    out = []
    for row in it:
        macs, params = count(row.model, row.input_size)
        base = baseline_name(row.model)
        reduction = None
        if base is not None:
            base_macs, _ = count(base, row.input_size)
            reduction = 100.0 * (1.0 - macs / base_macs)
        out.append(Reproduced(row, macs, params, reduction))
    return out


def _fmt(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_reproduction(results: Iterable[Reproduced]) -> str:
    """One table per paper table: paper | computed | difference for FLOPs, params, reduction."""
    header = ("model", "FLOPs paper", "ours", "diff%", "params paper", "ours", "diff%",
              "reduced% paper", "ours", "diff pp")
    by_table: Dict[int, List[Reproduced]] = {}
    for r in results:
        by_table.setdefault(r.row.table, []).append(r)
    blocks = []
    for table, rs in sorted(by_table.items()):
        lines = [header]
        for r in rs:
            lines.append((
                r.row.label,
                "-" if r.row.flops is None else format_count(r.row.flops), format_count(r.macs),
                _fmt(r.flops_diff, "+.2f"),
                "-" if r.row.params is None else format_count(r.row.params),
                format_count(r.params), _fmt(r.params_diff, "+.2f"),
                _fmt(r.row.reduction, ".2f"), _fmt(r.reduction, ".2f"),
                _fmt(r.reduction_diff, "+.2f")))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = [f"Table {table} ({'x'.join(map(str, rs[0].row.input_size))} input)"]
        for k, line in enumerate(lines):
            text.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(line, widths))))
            if k == 0:
                text.append("  ".join("-" * w for w in widths))
        blocks.append("\n".join(text))
    note = ("FLOPs = MACs of conv + linear layers; reduced% against the plain model "
            "(P=1, same SE setting).\nSE rows' params exceed the paper's: it counts about half "
            "of two reduction-8 FC layers per conv (PAPER.md, known quirk).")
    return "\n\n".join(blocks) + "\n\n" + note
