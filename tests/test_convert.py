"""convert(): which convolutions become HetConv2d, with which part, and what they compute."""

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

from hetconv import HetConv2d, convert, pattern


def eligible(model: nn.Module):
    """Names of the convs the paper's rule replaces: plain nn.Conv2d, groups 1, odd K > 1."""
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Conv2d and m.groups == 1 and m.kernel_size[0] > 1
             and m.kernel_size[0] % 2 == 1 and m.kernel_size[1] % 2 == 1
             and m.padding_mode == "zeros"]
    return names


def masked_copy(conv: nn.Conv2d, part: int) -> torch.Tensor:
    """The dense kernel a HetConv initialised from ``conv`` must have: KxK taps where the
    pattern's mask is True, only the centre tap elsewhere."""
    w = conv.weight.detach().clone()
    mask = pattern.kernel_mask(conv.in_channels, conv.out_channels, part)
    kh, kw = conv.kernel_size
    centre = torch.zeros(kh, kw, dtype=torch.bool)
    centre[kh // 2, kw // 2] = True
    keep = mask[:, :, None, None] | centre
    return w * keep


def _small_head(vgg: nn.Module) -> nn.Module:
    """VGG-16's 13 convs with a 10-way linear head (its 120M-weight classifier only costs time)."""
    vgg.classifier = nn.Linear(512 * 7 * 7, 10)
    return vgg


TORCHVISION = {
    "resnet18": lambda: tvm.resnet18(weights=None, num_classes=10),
    "resnet50": lambda: tvm.resnet50(weights=None, num_classes=10),
    "vgg16": lambda: _small_head(tvm.vgg16(weights=None)),
    "mobilenet_v2": lambda: tvm.mobilenet_v2(weights=None, num_classes=10),
    "mobilenet_v3_small": lambda: tvm.mobilenet_v3_small(weights=None, num_classes=10),
    "efficientnet_b0": lambda: tvm.efficientnet_b0(weights=None, num_classes=10),
    "regnet_x_400mf": lambda: tvm.regnet_x_400mf(weights=None, num_classes=10),
    "densenet121": lambda: tvm.densenet121(weights=None, num_classes=10),
}


@pytest.mark.parametrize("arch", list(TORCHVISION))
def test_torchvision_models_convert_and_train(arch):
    model = TORCHVISION[arch]()
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        want_shape = model(x).shape
    expected = eligible(model)[1:]  # skip_first
    grouped = {n: m.groups for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and m.groups > 1}

    het, report = convert(model, 4, indivisible="skip")
    converted = {e.name for e in report.converted}
    divisible = {n for n in expected if model.get_submodule(n).in_channels % 4 == 0}
    assert converted == divisible
    for name in converted:
        layer = het.get_submodule(name)
        assert isinstance(layer, HetConv2d) and layer.part == 4
    # Everything else untouched: grouped / depthwise keep their groups, others stay Conv2d.
    for name, groups in grouped.items():
        assert type(het.get_submodule(name)) is nn.Conv2d
        assert het.get_submodule(name).groups == groups
    for e in report.skipped:
        assert e.reason, f"{e.name} skipped without a reason"
    assert not any(isinstance(m, HetConv2d) for m in model.modules()), "original was modified"

    het.train()
    out = het(x)
    assert out.shape == want_shape
    out.square().mean().backward()
    for name in converted:
        layer = het.get_submodule(name)
        for p in (layer.weight_k, layer.weight_1):
            assert p.grad is not None and torch.isfinite(p.grad).all()
        assert layer.weight_k.grad.abs().sum() > 0


def test_depthwise_and_grouped_reasons():
    model = tvm.mobilenet_v2(weights=None)
    _, report = convert(model, 4)
    reasons = {e.name: e.reason for e in report.skipped}
    assert reasons["features.0.0"] == "first KxK conv (skip_first=True)"
    assert reasons["features.1.conv.0.0"].startswith("depthwise")
    assert reasons["features.1.conv.1"].startswith("1x1")
    regnet = tvm.regnet_x_400mf(weights=None)
    _, report = convert(regnet, 4)
    assert any(e.reason.startswith("grouped (groups=") for e in report.skipped)


class Custom(nn.Conv2d):
    """A conv subclass with its own forward (must not be swapped)."""

    def forward(self, x):
        return super().forward(x) * 2


def user_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),            # 0 first
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),           # 2 -> HetConv
        nn.Conv2d(16, 16, 1),                     # 3 1x1
        nn.Conv2d(16, 16, 3, padding=1, groups=4),  # 4 grouped
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # 5 depthwise
        nn.Conv2d(16, 16, 2, padding=1),          # 6 even kernel -> 17x17
        nn.Conv2d(16, 12, 5, stride=2, padding=4, dilation=2, bias=False),  # 7 -> HetConv
        Custom(12, 12, 3, padding=1),             # 8 subclass
        nn.Conv2d(12, 12, 3, padding=1, padding_mode="reflect"),  # 9 reflect
        nn.Conv2d(12, 6, 3, padding="same"),      # 10 -> HetConv
    )


def test_user_tree_reasons_and_exact_init():
    model = user_model().eval()
    het, report = convert(model, 4)
    kinds = {e.name: (e.new_part, e.reason) for e in report.entries}
    assert kinds["0"] == (None, "first KxK conv (skip_first=True)")
    assert kinds["2"] == (4, "") and kinds["7"] == (4, "") and kinds["10"] == (4, "")
    assert kinds["3"][1].startswith("1x1")
    assert kinds["4"][1] == "grouped (groups=4)"
    assert kinds["5"][1] == "depthwise (groups=16)"
    assert kinds["6"][1].startswith("even kernel 2x2")
    assert "subclasses nn.Conv2d" in kinds["8"][1]
    assert "padding_mode='reflect'" in kinds["9"][1]
    assert type(het[8]) is Custom
    layer = het[7]
    assert (layer.stride, layer.padding, layer.dilation, layer.bias) == ((2, 2), (4, 4), (2, 2), None)
    assert het[2].bias is not None

    # from_dense: the converted net equals the original with masked kernels.
    reference = user_model()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i in (2, 7, 10):
            reference[i].weight.copy_(masked_copy(model[i], 4))
    x = torch.randn(2, 3, 15, 15)
    torch.testing.assert_close(het(x), reference.eval()(x), rtol=1e-4, atol=1e-5)

    text = str(report)
    assert "3 converted" in text and "depthwise (groups=16)" in text and "1->4" in text
    summary = text.splitlines()[1]
    assert summary.startswith("left alone: 1 first KxK conv, 1 1x1 kernel, 1 grouped, 1 depthwise")


def test_skip_first_false_and_part_c():
    model = user_model()
    het, report = convert(model, "C", skip_first=False)
    assert [e.name for e in report.converted] == ["0", "2", "7", "10"]
    for name, m in (("0", 3), ("2", 8), ("7", 16), ("10", 12)):
        layer = het.get_submodule(name)
        assert layer.part == m and layer.part_spec == "C"


def test_callable_part_include_exclude():
    model = user_model()
    seen = []

    def choose(name, conv):
        seen.append((name, conv.in_channels))
        return None if name == "10" else 2

    het, report = convert(model, choose)
    assert seen == [("2", 8), ("7", 16), ("10", 12)]
    assert [e.name for e in report.converted] == ["2", "7"]
    assert dict((e.name, e.reason) for e in report.skipped)["10"] == "part callable returned None"

    _, report = convert(model, 2, include=["7", "1*"])
    assert [e.name for e in report.converted] == ["7", "10"]
    _, report = convert(model, 2, exclude="1?")
    assert [e.name for e in report.converted] == ["2", "7"]
    assert dict((e.name, e.reason) for e in report.skipped)["10"] == "matched by exclude"


def test_indivisible_policies():
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.Conv2d(12, 8, 3), nn.Conv2d(8, 8, 3))
    _, report = convert(model, 8, indivisible="skip")
    assert [e.name for e in report.converted] == ["2"]
    assert "does not divide in_channels=12" in report.entries[1].reason
    het, report = convert(model, 8, indivisible="nearest")
    assert het[1].part == 6 and het[2].part == 8
    assert "nearest divisor" in report.entries[1].reason
    with pytest.raises(ValueError, match="part=8 must divide in_channels=12"):
        convert(model, 8, indivisible="error")


def test_reinit_inplace_and_repart():
    model = user_model()
    het, _ = convert(model, 4, init="reinit")
    assert not torch.equal(het[2].dense_weight(), masked_copy(model[2], 4))
    same, _ = convert(model, 4, inplace=True)
    assert same is model and isinstance(model[2], HetConv2d)
    # Re-part an already converted model; part 1 turns layers back into nn.Conv2d.
    re8, report = convert(model, 2)
    assert re8[2].part == 2 and [e.old_part for e in report.converted] == [4, 4, 4]
    back, _ = convert(model, 1)
    assert type(back[2]) is nn.Conv2d
    torch.testing.assert_close(back[2].weight, model[2].dense_weight())
    _, report = convert(model, 4)
    assert not report.converted and "already part=4" in report.entries[1].reason


def test_meta_device_model():
    with torch.device("meta"):
        model = tvm.resnet18(weights=None)
    het, report = convert(model, 4)
    assert len(report) == 16  # all 16 3x3 convs: the 7x7 stem is the first, kept
    assert het.layer1[0].conv1.weight_k.is_meta


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"part": 0}, ValueError, "part must be >= 1"),
    ({"part": "D"}, ValueError, "part must be"),
    ({"part": 2.0}, TypeError, "part must be"),
    ({"part": 2, "indivisible": "round"}, ValueError, "indivisible must be one of"),
    ({"part": 2, "init": "zeros"}, ValueError, "init must be one of"),
    ({"part": 2, "pattern": "random"}, ValueError, "pattern must be one of"),
    ({"part": 2, "include": 3}, TypeError, "include must be"),
    ({"part": lambda n, c: 0}, ValueError, r"part \(returned by the callable\) must be >= 1"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        convert(user_model(), **kwargs)


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert(lambda x: x, 2)


@pytest.mark.parametrize("init", ["from_dense", "reinit"])
def test_frozen_weights_stay_frozen(init):
    """requires_grad=False on a conv's weight or bias carries over to the layer replacing it
    (a frozen backbone must not become trainable), through re-parting and part 1 too."""
    model = user_model()
    model[2].weight.requires_grad_(False)           # weight frozen, bias trainable
    model[7].requires_grad_(False)                  # whole layer frozen (no bias)
    model[10].bias.requires_grad_(False)            # bias frozen only
    het, _ = convert(model, 4, init=init)
    flags = {n: p.requires_grad for n, p in het.named_parameters()}
    assert flags["2.weight_k"] is flags["2.weight_1"] is False and flags["2.bias"]
    assert flags["7.weight_k"] is flags["7.weight_1"] is False
    assert flags["10.weight_k"] and flags["10.weight_1"] and flags["10.bias"] is False
    assert flags["0.weight"] and flags["3.weight"]  # untouched layers as they were
    # re-parting keeps each HetConv weight's flag; back to part 1 the dense weight is
    # frozen where its HetConv weights were
    het[10].weight_1.requires_grad_(False)
    re2, _ = convert(het, 2)
    assert not re2[2].weight_k.requires_grad and re2[2].bias.requires_grad
    assert re2[10].weight_k.requires_grad and not re2[10].weight_1.requires_grad
    dense, _ = convert(het, 1)
    assert type(dense[2]) is nn.Conv2d
    assert not dense[2].weight.requires_grad and dense[2].bias.requires_grad
    assert not dense[7].weight.requires_grad and not dense[10].weight.requires_grad
    assert not dense[10].bias.requires_grad
    with torch.device("meta"):
        meta = user_model()
    meta[2].requires_grad_(False)
    het, _ = convert(meta, 4)
    assert not any(p.requires_grad for p in het[2].parameters())


class Shared(nn.Module):
    """One conv registered under two names (weight tying), and a shared block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.block = self.again = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x):
        return self.again(self.block(self.b(self.a(self.stem(x)))))


def test_a_module_under_two_names_is_replaced_under_both():
    model = Shared().eval()
    het, report = convert(model, 4)
    assert isinstance(het.a, HetConv2d) and het.b is het.a
    assert isinstance(het.block[0], HetConv2d) and het.again is het.block
    assert len(report) == 2 and [e.name for e in report.entries] == ["stem", "a", "block.0"]
    assert report.entries[1].aliases == ("b",) and report.entries[2].aliases == ("again.0",)
    assert "also registered as b" in str(report) and "also registered as again.0" in str(report)
    # still one set of weights: the state dict (which has every name) and the outputs
    state = het.state_dict()
    assert state["a.weight_k"].data_ptr() == state["b.weight_k"].data_ptr()
    reference = Shared()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.a.weight.copy_(masked_copy(model.a, 4))
        reference.block[0].weight.copy_(masked_copy(model.block[0], 4))
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(het(x), reference.eval()(x), rtol=1e-4, atol=1e-5)
    # one module, one decision: excluded (or included) by any of its names
    _, report = convert(model, 4, exclude="b")
    assert [e.name for e in report.converted] == ["block.0"]
    het, report = convert(model, 4, include="again.*")
    assert [e.name for e in report.converted] == ["block.0"] and type(het.b) is nn.Conv2d
    # a module shared by a Sequential's two slots
    conv = nn.Conv2d(8, 8, 3, padding=1)
    het, report = convert(nn.Sequential(nn.Conv2d(3, 8, 3), conv, conv), 2)
    assert isinstance(het[1], HetConv2d) and het[2] is het[1]
    assert report.entries[1].aliases == ("2",) and len(report.entries) == 2


class TiedWeights(nn.Module):
    """Two distinct convs sharing one weight tensor and one bias (as in weight-tied or
    recurrent models)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias

    def forward(self, x):
        return self.b(torch.relu(self.a(self.stem(x))))


def test_convs_sharing_a_weight_keep_sharing_it():
    torch.manual_seed(0)
    model = TiedWeights().eval()
    het, report = convert(model, 4)
    assert isinstance(het.a, HetConv2d) and isinstance(het.b, HetConv2d) and het.a is not het.b
    assert het.b.weight_k is het.a.weight_k and het.b.weight_1 is het.a.weight_1
    assert het.b.bias is het.a.bias
    assert len(list(het.parameters())) == 2 + 3  # the stem's two, the tied layers' three
    assert "no longer tied" not in str(report)
    # the reference: the same model with the tied dense weight masked onto the pattern
    reference = TiedWeights()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.a.weight.copy_(masked_copy(model.a, 4))
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(het(x), reference.eval()(x), rtol=1e-4, atol=1e-5)
    # converted differently (b excluded): the tie cannot hold, and the report says so
    het, report = convert(model, 4, exclude="b")
    assert isinstance(het.a, HetConv2d) and type(het.b) is nn.Conv2d
    notes = {e.name: e.reason for e in report.entries}
    assert "shared its weight with b: no longer tied" in notes["a"]
    assert "shared its weight with a: no longer tied" in notes["b"]


def test_hooks_of_a_replaced_conv_move_to_its_replacement():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    seen = []
    handles = [
        model[1].register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m)))),
        model[1].register_forward_hook(lambda m, args, out: seen.append(("out", out.clone()))),
        model[1].register_full_backward_hook(
            lambda m, gin, gout: seen.append(("back", type(m)))),
    ]
    het, _ = convert(model, 4, inplace=True)
    assert isinstance(het[1], HetConv2d)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y = het(x)
    y.sum().backward()
    assert [s[0] for s in seen] == ["pre", "out", "back"]
    assert seen[0][1] is HetConv2d and seen[2][1] is HetConv2d
    torch.testing.assert_close(seen[1][1], y.detach())
    for h in handles:  # the user's handles still remove them
        h.remove()
    seen.clear()
    het(x).sum().backward()
    assert seen == []
