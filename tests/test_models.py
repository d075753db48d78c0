"""Model registry and architectures: names, options, shapes, structure."""

import pytest
import torch
import torch.nn as nn

from hetconv import (DepthwisePointwiseConv2d, GroupPointwiseConv2d, HetConv2d, SqueezeExcite,
                     create_model, list_models, profile, register_model)
from hetconv.cli import main
from hetconv.models import AllDenseWarning, default_input_size, is_model, parse_model_name


def count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def spatial_convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,expected", [
    ("vgg16_cifar", ("vgg16_cifar", {})),
    ("vgg16_cifar_p4", ("vgg16_cifar", {"part": 4})),
    ("VGG16_CIFAR_P4_SE", ("vgg16_cifar", {"part": 4, "se": True})),
    ("vgg16_cifar_pc", ("vgg16_cifar", {"part": "C"})),
    ("vgg16_cifar_gwc4_pwc", ("vgg16_cifar", {"conv": "gwc_pwc", "groups": 4})),
    ("vgg16_cifar_dwc_pwc", ("vgg16_cifar", {"conv": "dwc_pwc"})),
    ("resnet56_cifar_p2_se", ("resnet56_cifar", {"part": 2, "se": True})),
    ("mobilenet_cifar_p32", ("mobilenet_cifar", {"part": 32})),
    ("resnet34_p4_se", ("resnet34", {"part": 4, "se": True})),
    ("resnet50_p4", ("resnet50", {"part": 4})),
    ("vgg16_p4", ("vgg16", {"part": 4})),  # not vgg16_cifar: the longest base must match whole
])
def test_parse_names(name, expected):
    assert parse_model_name(name) == expected


@pytest.mark.parametrize("name", ["vgg17", "vgg16_cifar_p4_p8", "vgg16_cifar_q4", "vgg16_cifar_",
                                  "vgg16_cifar_gwc4_pwc_dwc_pwc"])
def test_unknown_names(name):
    assert not is_model(name)
    with pytest.raises(ValueError, match="unknown model"):
        create_model(name)


def test_list_models():
    names = list_models()
    for n in ("vgg16_cifar", "vgg16_cifar_p4_se", "vgg16_cifar_pc", "vgg16_cifar_gwc4_pwc",
              "vgg16_cifar_dwc_pwc", "resnet56_cifar_p2_se", "mobilenet_cifar_p32", "resnet34_p4_se",
              "resnet50_p4", "vgg16_p4"):
        assert n in names and is_model(n)
    assert list_models("resnet5*", variants=False) == ["resnet50", "resnet56_cifar"]
    assert list_models("VGG16_CIFAR_P6*") == ["vgg16_cifar_p64", "vgg16_cifar_p64_se"]
    assert default_input_size("vgg16_cifar_p4") == (3, 32, 32)
    assert default_input_size("resnet50") == (3, 224, 224)


def test_alias_equals_kwargs_and_clash():
    a = create_model("vgg16_cifar_p4_se")
    b = create_model("vgg16_cifar", part=4, se=True)
    assert str(a) == str(b)
    with pytest.raises(ValueError, match=r"\['part'\] given both"):
        create_model("vgg16_cifar_p4", part=8)


def test_register_model():
    @register_model(name="tiny_test_net", variants=("p2",), input_size=(1, 8, 8))
    def tiny(*, num_classes=3, in_chans=1, part=None):
        return nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))

    assert "tiny_test_net_p2" in list_models("tiny*")
    assert default_input_size("tiny_test_net") == (1, 8, 8)
    with pytest.warns(AllDenseWarning):  # (its builder makes no HetConv2d of part 2)
        assert isinstance(create_model("tiny_test_net_p2", in_chans=1), nn.Sequential)
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda **kw: None, name="tiny_test_net")
    with pytest.raises(ValueError, match="model name must be"):
        register_model(lambda **kw: None, name="Bad-Name")


CIFAR = ["vgg16_cifar", "resnet56_cifar", "mobilenet_cifar"]


@pytest.mark.parametrize("name", CIFAR)
@pytest.mark.parametrize("kwargs", [
    {}, {"part": 4}, {"part": "C", "se": True}, {"conv": "gwc_pwc", "groups": 4},
    {"conv": "dwc_pwc"},
])
def test_cifar_models_forward_backward(name, kwargs):
    model = create_model(name, width=0.25, num_classes=7, **kwargs)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", CIFAR)
@pytest.mark.parametrize("size", [28, 32, 40])
def test_fashion_mnist_and_other_sizes(name, size):
    model = create_model(name, in_chans=1, part=4, width=0.25).eval()
    assert model(torch.randn(1, 1, size, size)).shape == (1, 10)


def test_vgg16_cifar_structure():
    model = create_model("vgg16_cifar_p4")
    convs = spatial_convs(model)
    hets = [m for m in model.modules() if isinstance(m, HetConv2d)]
    assert len(convs) == 1 and convs[0].in_channels == 3       # CONV_1 stays standard
    assert len(hets) == 12 and all(h.part == 4 for h in hets)
    assert [h.out_channels for h in hets] == [64, 128, 128, 256, 256, 256] + [512] * 6
    pc = create_model("vgg16_cifar_pc")
    assert all(h.part == h.in_channels for h in pc.modules() if isinstance(h, HetConv2d))
    assert count(create_model("vgg16_cifar_se"), SqueezeExcite) == 13
    gwc = create_model("vgg16_cifar_gwc4_pwc")
    assert count(gwc, GroupPointwiseConv2d) == 12
    assert all(m.spatial.groups == 4 for m in gwc.modules() if isinstance(m, GroupPointwiseConv2d))
    assert count(create_model("vgg16_cifar_dwc_pwc"), DepthwisePointwiseConv2d) == 12
    assert count(create_model("vgg16_cifar_p1"), HetConv2d) == 0
    # The classifier: 512 -> 512 -> classes with BN and ReLU between.
    kinds = [type(m).__name__ for m in model.classifier]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script:FutureWarning")  # torch deprecates it
def test_vgg_pools_run_fast_in_nchw_inference_and_train_as_before(monkeypatch):
    """The CIFAR VGGs pool with MaxPool2x2: NCHW inference runs two elementwise maxima
    instead of torch's NCHW max-pool kernel (6-14x slower), with the same outputs; training
    (autograd) and channels_last calls run nn.MaxPool2d, so gradients are unchanged."""
    from hetconv.layers import MaxPool2x2

    torch.manual_seed(0)
    model = create_model("vgg16_cifar_p4", width=0.125).eval()
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(type(m) is MaxPool2x2 and m.ceil_mode for m in pools)
    twin = create_model("vgg16_cifar_p4", width=0.125).eval()
    twin.load_state_dict(model.state_dict())
    for i, m in enumerate(twin.features):  # the plain pools, for reference
        if isinstance(m, MaxPool2x2):
            twin.features[i] = nn.MaxPool2d(2, 2, ceil_mode=True)
    calls = []
    real = nn.functional.max_pool2d
    monkeypatch.setattr(nn.functional, "max_pool2d",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = model(x)
        assert calls == []  # no torch max-pool kernel
        assert torch.equal(got, twin(x))
        assert len(calls) == 5
        calls.clear()
        model(x.contiguous(memory_format=torch.channels_last))
        assert len(calls) == 5  # channels_last: the pool itself
    model.train()
    twin.train()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    grads = [torch.autograd.grad(m(xi).square().sum(), [xi] + list(m.parameters()))
             for m, xi in zip((model, twin), xs)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    # forward-mode AD: the pool's tangent (all of a tied window's to its first maximum)
    ties, tangent = torch.zeros(1, 1, 2, 2), torch.tensor([1.0, 2, 3, 4]).view(1, 1, 2, 2)
    got = torch.func.jvp(MaxPool2x2(), (ties,), (tangent,))[1]
    assert torch.equal(got, torch.func.jvp(nn.MaxPool2d(2), (ties,), (tangent,))[1])
    # fx symbolic tracing (the pool one node) and TorchScript of the dense model still work
    monkeypatch.undo()
    model.eval()
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))
        dense = create_model("vgg16_cifar", width=0.125).eval()
        assert torch.equal(torch.jit.script(dense)(x), dense(x))


def test_resnet56_structure_and_indivisible():
    model = create_model("resnet56_cifar_p2")
    assert count(model, HetConv2d) == 54 and len(spatial_convs(model)) == 1
    assert 0.84e6 < n_params(create_model("resnet56_cifar")) < 0.86e6
    # part 32 does not divide the 16-channel stage: skip leaves it standard, nearest uses 16.
    skip = create_model("resnet56_cifar", part=32)
    widths = sorted({h.in_channels for h in skip.modules() if isinstance(h, HetConv2d)})
    assert widths == [32, 64] and len(spatial_convs(skip)) == 1 + 19
    nearest = create_model("resnet56_cifar", part=32, indivisible="nearest")
    assert {h.part for h in nearest.modules() if isinstance(h, HetConv2d)} == {16, 32}
    with pytest.raises(ValueError, match="must divide"):
        create_model("resnet56_cifar", part=32, indivisible="error")


def test_mobilenet_pairs_become_one_hetconv():
    plain = create_model("mobilenet_cifar")
    het = create_model("mobilenet_cifar_p32")
    pairs = [m for m in plain.modules() if isinstance(m, DepthwisePointwiseConv2d)]
    hets = [m for m in het.modules() if isinstance(m, HetConv2d)]
    assert len(pairs) == len(hets) == 13
    assert count(het, DepthwisePointwiseConv2d) == 0
    for pair, h in zip(pairs, hets):
        assert (h.in_channels, h.out_channels, h.stride) == \
            (pair.in_channels, pair.out_channels, pair.spatial.stride)
        assert h.part == 32
    assert [h.stride[0] for h in hets].count(2) == 4


def test_imagenet_models_on_meta():
    with torch.device("meta"):
        r50 = create_model("resnet50_p4", num_classes=5)
        r34 = create_model("resnet34_p4_se", in_chans=1)
        vgg = create_model("vgg16_p4")
    assert count(r50, HetConv2d) == 16          # only the bottlenecks' 3x3 convs
    assert r50.conv1.kernel_size == (7, 7) and r50.fc.out_features == 5
    assert count(r34, HetConv2d) == 32 and count(r34, SqueezeExcite) == 16
    assert r34.conv1.in_channels == 1
    assert count(vgg, HetConv2d) == 12


def test_imagenet_model_trains():
    model = create_model("resnet34_p4", num_classes=3)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3)
    out.sum().backward()
    assert model.layer4[1].conv2.weight_k.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"conv": "mixed"}, "conv must be one of"),
    ({"conv": "gwc_pwc"}, "needs groups"),
    ({"groups": 4}, "groups only applies"),
    ({"conv": "dwc_pwc", "part": 4}, "only applies to conv='het'"),
    ({"width": 0}, "width must be a positive number"),
    ({"part": 0}, "part must be >= 1"),
    ({"indivisible": "round", "part": 2}, "indivisible must be one of"),
    ({"num_classes": 0}, "num_classes must be"),
    ({"in_chans": 0}, "in_chans must be"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("vgg16_cifar", **kwargs)


def test_imagenet_options_rejected():
    with pytest.raises(ValueError, match="conv='het' only"):
        create_model("resnet50", conv="dwc_pwc")


def test_profile_command(capsys):
    assert main(["profile", "vgg16_cifar", "--part", "4", "--input", "1x28x28", "--total"]) == 0
    out = capsys.readouterr().out
    expected = create_model("vgg16_cifar", part=4, in_chans=1)
    assert f"{profile(expected, (1, 28, 28)).macs:,} MACs" in out
    assert main(["profile", "mobilenet_cifar_p32"]) == 0
    assert "HetConv2d" in capsys.readouterr().out
    assert main(["profile", "vgg16_cifar_p4", "--part", "8"]) == 2
    assert "given both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", "vgg16_cifar", "--input", "32x32"])
    assert main(["models", "mobilenet*"]) == 0
    assert capsys.readouterr().out.split() == list_models("mobilenet*")


@pytest.mark.parametrize("bad", ["0", "-4", "four", "1.5"])
def test_part_option_rejects_bad_values_naming_it(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["profile", "vgg16_cifar", "--part", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --part: must be an int >= 1 or C, got '{bad}'" in err
    assert "Traceback" not in err
    for good, part in (("c", "C"), ("8", 8)):
        assert main(["profile", "vgg16_cifar", "--part", good, "--total"]) == 0
        want = profile(create_model("vgg16_cifar", part=part), (3, 32, 32)).macs
        assert f"{want:,} MACs" in capsys.readouterr().out


def test_squeeze_excite_semantics():
    se = SqueezeExcite(16, 8)
    assert se.fc1.out_features == 2 and se.fc2.out_features == 16
    x = torch.randn(3, 16, 5, 4)
    s = x.mean(dim=(2, 3))
    gate = torch.sigmoid(se.fc2.weight @ torch.relu(se.fc1.weight @ s.T + se.fc1.bias[:, None])
                         + se.fc2.bias[:, None]).T
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 16, H, W\)"):
        se(torch.randn(3, 8, 5, 5))
    with pytest.raises(ValueError, match="reduction must be a positive int"):
        SqueezeExcite(16, 0)


def test_group_pointwise_semantics():
    block = GroupPointwiseConv2d(8, 12, 3, stride=2, groups=4).eval()
    x = torch.randn(2, 8, 9, 9)
    y = torch.nn.functional.conv2d(x, block.spatial.weight, None, 2, 1, groups=4)
    y = torch.relu(block.bn(y))
    torch.testing.assert_close(block(x), torch.nn.functional.conv2d(y, block.pointwise.weight))
    assert block(x).shape == (2, 12, 5, 5)
    dw = DepthwisePointwiseConv2d(8, 4)
    assert dw.spatial.groups == 8 and dw.pointwise.out_channels == 4
    with pytest.raises(ValueError, match="groups=3 must divide in_channels=8"):
        GroupPointwiseConv2d(8, 12, groups=3)
