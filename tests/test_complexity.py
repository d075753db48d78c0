"""profile(): MACs and parameters per module, checked against hand formulas and
torch's own operator-level counter."""

import copy

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from torch.utils.flop_counter import FlopCounterMode

from hetconv import (DepthwisePointwiseConv2d, GroupPointwiseConv2d, HetConv2d, SqueezeExcite,
                     convert, create_model, deploy, fold_batchnorm, native,
                     optimize_for_inference, profile)
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


def _folded(model: nn.Module) -> nn.Module:
    """``model`` with its BatchNorms folded (the parameters an optimized model keeps)."""
    folded = copy.deepcopy(model)
    fold_batchnorm(folded)
    return folded


def _deployed(model: nn.Module) -> set:
    return {type(m).__name__ for m in model.modules() if type(m).__module__ == deploy.__name__}


@pytest.mark.skipif(not native.available(), reason="native kernel unavailable")
@pytest.mark.parametrize("arch,kwargs,memory_format,expect", [
    ("vgg16_cifar", {"part": 4, "width": 0.25}, "channels_last", {"NativeSequence"}),
    ("vgg16_cifar", {"part": 4, "width": 0.25}, "contiguous", {"NativeChain"}),
    ("resnet56_cifar", {"part": 4, "width": 0.5}, "channels_last", {"NativeChain"}),
    ("resnet56_cifar", {"part": 4, "width": 0.5}, "contiguous", {"NativeChain"}),
    ("vgg16_cifar", {"width": 0.25}, "contiguous", {"NativeChain"}),  # dense: part 1
])
def test_optimized_models_count_as_the_models_they_came_from(arch, kwargs, memory_format,
                                                              expect, monkeypatch):
    """optimize_for_inference's modules run their layers in C calls, where the layers'
    hooks do not fire: each counts what its layers would (was 68K MACs for VGG-16 P4
    instead of 26.9M); with the chains and sequences run layer by layer too (no double
    count); parameters as the model's with its BatchNorms folded."""
    torch.manual_seed(0)
    model = create_model(arch, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = optimize_for_inference(model, x, backend="native", memory_format=memory_format,
                                  repeats=1)
    assert expect <= _deployed(fast) and "NativeFused" in _deployed(fast)
    original, folded = profile(model, (3, 32, 32)), profile(_folded(model), (3, 32, 32))
    assert folded.macs == original.macs
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    for inp in ((3, 32, 32), x.contiguous(memory_format=fmt)):
        counted = profile(fast, inp)
        assert (counted.macs, counted.params) == (original.macs, folded.params)
    for chain in (m for m in fast.modules() if isinstance(m, deploy.NativeChain)):
        chain.enabled = False
    monkeypatch.setattr(deploy.NativeSequence, "_sequenced", lambda self, x: None)
    stepwise = profile(fast, x)
    assert (stepwise.macs, stepwise.params) == (original.macs, folded.params)


def test_packed_and_fused_layers_count_as_their_convolutions():
    """PackedConv2d keeps its weights as buffers: they count as parameters; NativeFused
    counts its HetConv2d before the pool; the rows of each."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
                          HetConv2d(16, 16, 3, part=4, padding=1)).eval()
    packed = copy.deepcopy(model)
    for i in (0, 2):
        packed[i] = deploy.PackedConv2d(model[i])
    packed[3] = deploy.NativeFused(model[3], relu=True, residual=False, pool=nn.MaxPool2d(2))
    for inp in ((3, 9, 9), torch.randn(3, 3, 9, 9)):
        want, got = profile(model, inp), profile(packed, inp)
        assert (got.macs, got.params) == (want.macs, want.params) == (
            81 * 8 * 27 + 25 * 16 * 72 + 25 * 16 * (4 * 9 + 12), 8 * 27 + 8 + 16 * 72 + 16 * 48)
        assert [(r.macs, r.params) for r in got.rows] == [(r.macs, r.params) for r in want.rows]
        assert got.row("3").output_shape[1:] == (16, 2, 2)  # pooled


def test_unbatched_and_empty_inputs():
    """A (C, H, W) tensor is one example (its C is no batch size); (B, C, L) for a Conv1d
    model is a batch; an empty batch is refused (was ZeroDivisionError)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), HetConv2d(8, 8, 3, part=2))
    per_example = profile(model, (3, 6, 6)).macs
    assert per_example == 16 * 8 * 27 + 16 * 8 * (4 * 9 + 4)  # HetConv2d pads: 4x4 out
    assert profile(model, torch.zeros(3, 6, 6)).macs == per_example
    assert profile(model, torch.zeros(5, 3, 6, 6)).macs == per_example
    conv1d = nn.Conv1d(4, 6, 3)
    assert profile(conv1d, torch.zeros(5, 4, 10)).macs == profile(conv1d, (4, 10)).macs
    assert profile(conv1d, (4, 10)).macs == 8 * 6 * 12
    assert profile(conv1d, torch.zeros(4, 10)).macs == 8 * 6 * 12  # unbatched Conv1d
    with pytest.raises(ValueError, match="empty batch"):
        profile(model, torch.zeros(0, 3, 6, 6))
