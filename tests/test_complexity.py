"""profile(): MACs and parameters per module, checked against hand formulas and
torch's own operator-level counter."""

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from torch.utils.flop_counter import FlopCounterMode

from hetconv import (DepthwisePointwiseConv2d, GroupPointwiseConv2d, HetConv2d, SqueezeExcite,
                     convert, profile)
from hetconv.complexity import register_rule, RULES


def torch_macs(model: nn.Module, x: torch.Tensor) -> float:
    """Independent count: torch's FlopCounterMode (2 FLOPs per MAC) per example."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "regnet_x_400mf"])
def test_plain_models_match_flop_counter(arch):
    """Without HetConv layers both counters count conv + linear: they must agree exactly
    (grouped and depthwise convs included)."""
    model = getattr(tvm, arch)(weights=None, num_classes=10)
    x = torch.zeros(1, 3, 64, 64)
    assert profile(model, (3, 64, 64)).macs == torch_macs(model, x)


@pytest.mark.parametrize("backend", ["dense", "grouped"])
@pytest.mark.parametrize("part", [1, 2, 4, "C"])
def test_hetconv_counts_its_definition_whatever_the_backend(backend, part):
    m, n, size, stride = 16, 32, 11, 2
    layer = HetConv2d(m, n, 3, stride=stride, part=part, backend=backend)
    p = 16 if part == "C" else part
    do = (size + 2 - 3) // stride + 1
    expected = do * do * n * (m // p * 9 + m - m // p)   # FL_K + FL_1, Eq. 2-4
    result = profile(layer, (m, size, size))
    assert result.macs == expected
    assert result.params == n * (m // p * 9 + m - m // p)
    assert result.rows[0].output_shape == (1, n, do, do)
    # The operator-level counter sees what the backend executes instead.
    ops = torch_macs(layer, torch.zeros(1, m, size, size))
    if backend == "dense" or p == 1:
        assert ops == do * do * n * m * 9
    else:
        assert ops == do * do * n * (m // p * 9) + do * do * n * m


def test_conv_rules_grouped_depthwise_transpose_linear():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2),   # 9x9 -> 5x5
        nn.Conv2d(8, 8, 5, padding=2, groups=8),             # depthwise
        nn.ConvTranspose2d(8, 6, 2, stride=2),               # 5x5 -> 10x10
        nn.Flatten(2), nn.Linear(100, 7),                    # applied to (B, 6, 100)
    )
    result = profile(model, (4, 9, 9))
    expected = [25 * 8 * 2 * 9, 25 * 8 * 1 * 25, 25 * 8 * 6 * 4, 6 * 7 * 100]
    assert [result.row(str(i)).macs for i in (0, 1, 2, 4)] == expected
    assert result.macs == sum(expected)
    assert result.macs == torch_macs(model, torch.zeros(1, 4, 9, 9))


def test_se_and_baseline_blocks():
    se = SqueezeExcite(64, 8)
    assert profile(se, (64, 5, 5)).macs == 2 * 64 * 8
    m, n, g, d = 16, 24, 4, 6
    gwc = profile(GroupPointwiseConv2d(m, n, 3, groups=g), (m, d, d))
    assert gwc.macs == d * d * (m * m * 9 // g + m * n)         # Eq. 9-10
    dwc = profile(DepthwisePointwiseConv2d(m, n, 3), (m, d, d))
    assert dwc.macs == d * d * (m * 9 + m * n)                  # Eq. 6-7


def test_per_example_totals_params_shared_and_state():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          shared, nn.ReLU(), shared, nn.BatchNorm1d(8))
    model.train()
    one = profile(model, (3, 6, 6))
    batch = profile(model, torch.randn(4, 3, 6, 6))
    assert one.macs == batch.macs == 16 * 8 * 27 + 2 * 64
    assert one.params == sum(p.numel() for p in model.parameters())
    assert one.row("3").calls == 2 and one.row("3").macs == 128
    assert model.training and all(m.training for m in model.modules())
    assert one.row("0").output_shape == (1, 8, 4, 4)


def test_meta_device_equals_cpu():
    model = convert(tvm.resnet18(weights=None), 4)[0]
    with torch.device("meta"):
        meta = convert(tvm.resnet18(weights=None), 4)[0]
    a, b = profile(model, (3, 64, 64)), profile(meta, (3, 64, 64))
    assert (a.macs, a.params) == (b.macs, b.params)
    assert [(r.name, r.macs, r.output_shape) for r in a.rows] == \
        [(r.name, r.macs, r.output_shape) for r in b.rows]


def test_table_is_readable():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), HetConv2d(8, 8, 3, part=4))
    result = profile(model, (3, 8, 8))
    text = str(result)
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["module", "type", "output", "MACs", "%", "params"]
    assert any(line.startswith("2 ") and "HetConv2d" in line and "8x8x8" in line for line in lines)
    assert any(line.startswith("total") for line in lines)
    assert "ReLU" not in text and "ReLU" in result.table(all_rows=True)
    assert "1 modules without MACs" in text
    assert repr(result).startswith("Profile(macs=")
    assert list(result.by_type()) == ["Conv2d", "HetConv2d", "ReLU"]  # 13824 > 12288


def test_custom_rule():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(x) * 3

    register_rule(Scale, lambda m, inputs, out: 5 * out.numel())
    try:
        result = profile(nn.Sequential(Scale()), (4,))
        assert result.macs == 20
        assert [r.name for r in result.rows] == ["0"]  # children counted by the rule, once
        assert result.rows[0].params == 20
    finally:
        RULES.pop(Scale)
    with pytest.raises(TypeError, match="module_type"):
        register_rule(int, lambda *a: 0)


@pytest.mark.parametrize("size", [(0, 3, 3), (), "3x32x32", (3.0, 32, 32)])
def test_bad_input_size(size):
    with pytest.raises(ValueError, match="input_size"):
        profile(nn.Conv2d(3, 3, 3), size)


def test_bad_model_and_row():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        profile("resnet", (3, 8, 8))
    with pytest.raises(KeyError, match="no module named"):
        profile(nn.Conv2d(3, 3, 3), (3, 8, 8)).row("nope")
