"""Review of the cost accounting, the model zoo and conversion: each test pins a silent bug
found by checking the code against independent counts (from first principles or the paper);
every expected number here is computed by hand, never copied from the code's output."""

import torch
import torch.nn as nn

from hetconv import HetConv2d, deploy, profile
from hetconv.complexity import RULES, register_rule


def het_macs(m, n, k, out_hw, p):
    """FL_K + FL_1 (paper Eq. 2-4) for an Ho x Wo output."""
    ho, wo = out_hw
    return ho * wo * n * (m // p * k * k + m - m // p)


# --------------------------------------------------------------------------- profile

def test_a_module_counted_as_a_whole_is_counted_once_when_it_is_the_model():
    """profile(NativeFused(...)) or profile(a block with a registered rule) counted the
    module by its rule and its children by theirs as well: 2x the MACs (9,600 instead of
    4,800 for a fused HetConv2d; 15,400 instead of 1,000 for a ruled block)."""
    layer = HetConv2d(8, 8, 3, part=4).eval()
    expected = het_macs(8, 8, 3, (5, 5), 4)
    assert expected == 4800
    fused = deploy.NativeFused(layer, relu=True, residual=False).eval()
    got = profile(fused, (8, 5, 5))
    assert got.macs == expected
    assert got.params == 8 * (2 * 9 + 6)
    assert [r.name for r in got.rows] == [""]  # its layer is inside its count, no row

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    register_rule(Block, lambda m, inputs, out: 1000)
    try:
        assert profile(Block(), (8, 5, 5)).macs == 1000
        assert profile(nn.Sequential(Block()), (8, 5, 5)).macs == 1000
    finally:
        del RULES[Block]


def test_a_layer_inside_a_fused_module_and_registered_elsewhere_is_counted_once():
    """A HetConv2d registered both as ``model.conv`` and inside a NativeFused counted its
    MACs in the fused module's rule and again through its own hook (named_modules lists
    it under its first name only, so the prefix rule did not see it inside the fused one)."""
    layer = HetConv2d(8, 8, 3, part=4).eval()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = layer
            self.fused = deploy.NativeFused(layer, relu=True, residual=False)

        def forward(self, x):
            return self.fused(x)

    got = profile(Model().eval(), (8, 5, 5))
    assert got.macs == het_macs(8, 8, 3, (5, 5), 4)
    assert got.params == 8 * (2 * 9 + 6)


def test_a_convolution_of_a_parameter_does_not_make_a_batch_one_example():
    """A convolution run on a tensor of the model's own without a batch dimension (a
    positional-encoding conv of a (C, H, W) parameter) set the 'unbatched input' flag, so
    a batch of 8 was counted as ONE example: 36,288 MACs per example instead of 4,536
    (the stem's 3,888 per example plus the parameter conv's 5,184 per batch of 8)."""

    class PosConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.pos = nn.Parameter(torch.zeros(4, 6, 6))
            self.pconv = nn.Conv2d(4, 4, 3, padding=1, bias=False)

        def forward(self, x):
            return self.stem(x) + self.pconv(self.pos)

    stem, pconv = 36 * 4 * 3 * 9, 36 * 4 * 4 * 9
    model = PosConv()
    assert profile(model, (3, 6, 6)).macs == stem + pconv
    assert profile(model, torch.zeros(8, 3, 6, 6)).macs == stem + pconv / 8
    assert profile(model, torch.zeros(3, 6, 6)).macs == stem + pconv  # unbatched input


# --------------------------------------------------------------------------- convert

def test_convert_a_model_that_is_itself_a_conv():
    """convert(conv, P) reported '1 converted' but returned the unchanged nn.Conv2d (with
    the replacement set as a child named ''); a HetConv2d root kept its old part."""
    from hetconv import convert

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=True)
    model, report = convert(conv, 4, skip_first=False)
    assert isinstance(model, HetConv2d) and model.part == 4 and len(report) == 1
    assert list(model.named_children()) == []
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(model(x), HetConv2d.from_conv2d(conv, 4)(x))
    model, _ = convert(conv, 4, skip_first=False, inplace=True)
    assert isinstance(model, HetConv2d) and model.part == 4
    assert "" not in dict(conv.named_children())  # the user's conv is not given a child
    het = HetConv2d(8, 8, 3, part=4, backend="dense")
    model, _ = convert(het, 8, skip_first=False)
    assert isinstance(model, HetConv2d) and model.part == 8 and model.backend == "dense"
    model, _ = convert(het, 1, skip_first=False)
    assert type(model) is nn.Conv2d
    torch.testing.assert_close(model(x), het(x))  # P=1: exactly the dense weight


def test_convert_on_meta_keeps_a_hetconv_layers_backend():
    """Re-parting a HetConv2d built on the meta device dropped its backend ('auto')."""
    from hetconv import convert

    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), HetConv2d(8, 8, 3, part=4, backend="dense"))
    converted, _ = convert(model, 8)
    assert converted[1].part == 8 and converted[1].backend == "dense"


def test_convert_leaves_weight_reparametrized_convs_alone():
    """A conv under torch.nn.utils.spectral_norm was converted and its SpectralNorm hook
    carried over, so the converted model failed on its first call ('HetConv2d' object has
    no attribute 'weight_orig'); it is left alone now, with the reason."""
    from hetconv import convert

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                          nn.utils.spectral_norm(nn.Conv2d(8, 8, 3, padding=1))).eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():  # (a call with grad leaves a non-leaf weight: no deepcopy)
        want = model(x)
    for inplace in (False, True):
        converted, report = convert(model, 4, inplace=inplace)
        assert len(report) == 0
        assert "SpectralNorm" in report.entries[1].reason
        with torch.no_grad():
            torch.testing.assert_close(converted(x), want)


def test_table_of_an_unbatched_input_keeps_the_channels():
    """The table leaves the batch dimension out of the shapes; for an unbatched (C, H, W)
    input it left out the channels instead ('8x8 in' for a 3x8x8 input, '8x6' for an
    output of 4x8x6)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=(1, 0)))
    batched = profile(model, torch.zeros(2, 3, 8, 8)).table().splitlines()
    single = profile(model, torch.zeros(3, 8, 8)).table().splitlines()
    assert any(line.startswith("0 ") and " 4x8x6 " in line for line in batched)
    assert any(line.startswith("0 ") and " 4x8x6 " in line for line in single)
    assert any(line.startswith("total") and "3x8x8 in" in line for line in single)
    assert any(line.startswith("total") and "3x8x8 in" in line for line in batched)
    linear = profile(nn.Linear(5, 7), torch.zeros(5)).table()
    assert " 7 " in linear and "5 in" in linear


# --------------------------------------------------------------------------- models

def test_se_must_be_a_bool():
    """se="False" (what ``--model-arg se=False`` passes: not JSON, so kept as a string) is
    truthy: the model silently got 13 SE blocks (VGG-16: +0.46M params) instead of none."""
    import pytest

    from hetconv import create_model

    for name in ("vgg16_cifar", "resnet56_cifar", "mobilenet_cifar", "resnet34"):
        with pytest.raises(ValueError, match="se must be a bool"):
            create_model(name, se="False")
    from hetconv.layers import SqueezeExcite

    plain = create_model("vgg16_cifar", se=False)
    assert not any(isinstance(m, SqueezeExcite) for m in plain.modules())
    assert sum(p.numel() for p in plain.parameters()) == sum(
        p.numel() for p in create_model("vgg16_cifar").parameters())


def test_lazy_modules_are_counted():
    """A model with lazy modules (nn.LazyConv2d / nn.LazyLinear) could not be profiled:
    the parameters were counted before the forward pass that gives them their shapes
    (ValueError: uninitialized parameter)."""
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.Flatten(), nn.LazyLinear(4))
    got = profile(model, (3, 6, 6))
    assert got.macs == 16 * 8 * 27 + 4 * 128
    assert got.params == 8 * 27 + 8 + 128 * 4 + 4
    assert [(r.type, r.params) for r in got.rows if r.params] == [("Conv2d", 224),
                                                                  ("Linear", 516)]


def test_multihead_attention_projections_are_counted():
    """nn.MultiheadAttention runs its projections on its own weights (F.linear), so no
    nn.Linear hook saw them: a TransformerEncoderLayer(64, 4, 128) counted 163,840 MACs
    per example on 10 tokens, half its linear layers' 327,680."""
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    tokens, e, ff = 10, 64, 128
    projections = 4 * tokens * e * e               # q, k, v and output: E x E each
    feed_forward = 2 * tokens * e * ff             # linear1, linear2
    assert profile(layer, (tokens, e)).macs == projections + feed_forward
    attn = nn.MultiheadAttention(64, 4, kdim=32, vdim=16, batch_first=True)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):  # key and value of other widths, given by keyword
            kv = x[:, :7]
            return self.attn(x, value=kv[..., :16], key=kv[..., :32])[0]

    got = profile(Cross(), (10, 64))
    assert got.macs == 10 * 64 * 64 + 7 * 32 * 64 + 7 * 16 * 64 + 10 * 64 * 64
    assert [r.name for r in got.rows if r.macs] == ["attn"]  # out_proj is inside its count


def test_an_input_given_by_keyword_is_seen_by_the_rules():
    """A transposed conv called as ``conv(input=x)``: its rule (input elements x
    out_channels/groups x kernel) found no input and profile crashed."""
    conv = nn.ConvTranspose2d(4, 6, 3)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(input=x)

    assert profile(Model(), torch.zeros(2, 4, 5, 5)).macs == 4 * 25 * 6 * 9


def test_convert_leaves_pruned_convs_alone():
    """A conv pruned with torch.nn.utils.prune (its pre-hook sets weight = weight_orig *
    weight_mask) was converted and the hook carried over: the model failed on its first
    call."""
    import torch.nn.utils.prune as prune

    from hetconv import convert

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        want = model(x)
        converted, report = convert(model, 4, inplace=True)
        assert len(report) == 0 and "L1Unstructured" in report.entries[1].reason
        torch.testing.assert_close(converted(x), want)


def test_format_count_picks_the_unit_after_rounding():
    """999,999 MACs printed as '1000.00K' (and 999,995,000 as '1000.00M')."""
    from hetconv.complexity import format_count

    assert format_count(999_999) == "1.00M"
    assert format_count(999_995_000) == "1.00G"
    assert format_count(999.999) == "1.00K"
    assert format_count(999_994) == "999.99K"
    assert format_count(313_740_000) == "313.74M"
    assert format_count(999) == "999" and format_count(12.5) == "12.50"


def test_a_traced_model_is_refused_not_counted_as_zero():
    """A torch.jit.trace-d model ran its graph, where no module hook fires: profile
    reported 0 MACs for a conv of 2,304."""
    import warnings

    import pytest

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.zeros(1, 3, 6, 6))
    with pytest.raises(TypeError, match="TorchScript"):
        profile(traced, (3, 6, 6))
    with pytest.raises(TypeError, match="TorchScript"):
        profile(nn.Sequential(traced), (3, 6, 6))
    assert profile(model, (3, 6, 6)).macs == 16 * 4 * 27


def test_a_counted_module_that_raises_inside_a_model_that_catches_it():
    """(Guard for the fix above: the modules counted as a whole that are running are kept on
    a stack; one that raises, caught by the model, must not keep what follows uncounted.)"""

    class Raises(nn.Linear):
        def forward(self, x):
            raise RuntimeError("no")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bad, self.conv = Raises(4, 4), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            try:
                self.bad(x)
            except RuntimeError:
                pass
            return self.conv(x)

    assert profile(Model(), (4, 3, 3)).macs == 9 * 4 * 4


def test_a_models_bad_part_is_not_told_a_callable_would_do():
    """create_model(..., part="D") said 'part must be a positive int, 'C' or a callable' and
    then refused a callable the same way (callables are convert's, not the models')."""
    import pytest

    from hetconv import convert, create_model

    for bad in ("D", lambda name, conv: 4, 4.0):
        with pytest.raises((TypeError, ValueError), match="part must be a positive int") as exc:
            create_model("vgg16_cifar", part=bad)
        assert "or a callable" not in str(exc.value)
    with pytest.raises(ValueError, match="'C' or a callable"):
        convert(nn.Conv2d(3, 3, 3), "D")  # convert's part may be a callable
    with pytest.raises(TypeError) as exc:
        convert(nn.Sequential(nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3)), lambda n, c: 2.5)
    assert "returned by the callable" in str(exc.value) and "callable," not in str(exc.value)


def test_table_says_which_modules_with_weights_were_not_called():
    """A conv whose weight the model uses functionally (F.conv2d(x, self.conv.weight)) counts
    0 MACs; the table showed the row as if it were counted.  It now says so."""
    import torch.nn.functional as F

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return F.conv2d(x, self.conv.weight, self.conv.bias)

    text = profile(Functional(), (3, 6, 6)).table()
    assert "1 modules with parameters were not called, so count no MACs: conv" in text
    assert "not called" not in profile(nn.Conv2d(3, 4, 3), (3, 6, 6)).table()


def test_the_export_form_of_a_hetconv_model_counts_as_the_model():
    """export_module's form of a HetConv2d (a grouped conv and a pointwise conv on weight
    buffers) counted 0 MACs and 0 parameters; it counts as the layer now, whose pointwise
    buffer also holds the grouped part's channels as zeros (not parameters).  Here P = 3
    does not divide N = 8 either (the grouped conv has 9 slots, one empty)."""
    model = nn.Sequential(HetConv2d(6, 8, 3, padding=1, part=3, bias=True), nn.ReLU(),
                          HetConv2d(8, 8, 3, stride=2, padding=1, part=4)).eval()
    exported = deploy.export_module(model)
    assert not any(isinstance(m, HetConv2d) for m in exported.modules())
    want_macs = het_macs(6, 8, 3, (7, 7), 3) + het_macs(8, 8, 3, (4, 4), 4)
    want_params = (8 * (2 * 9 + 4) + 8) + 8 * (2 * 9 + 6)
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(exported(x), model(x))
    for m in (model, exported):
        got = profile(m, (6, 7, 7))
        assert (got.macs, got.params) == (want_macs, want_params), type(m[0]).__name__
        assert [r.macs for r in got.rows if r.macs] == [het_macs(6, 8, 3, (7, 7), 3),
                                                       het_macs(8, 8, 3, (4, 4), 4)]
