"""absorb_permutations: shifted HetConv layers run as blocked ones on class-sorted activations."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import hetconv
from hetconv import pattern as P
from hetconv.permute import _blocked_twin, absorb_permutations
from test_deploy import _randomise_bn


def _randomise(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    return _randomise_bn(model)


def _gathers(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.index_select)


def _hets(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, hetconv.HetConv2d)]


def _converted_hets(model: nn.Module):
    """The HetConv2d layers of an optimized model that came from the original's HetConv2d
    layers (not the P = 1 ones it makes of dense convolutions the kernel runs faster)."""
    return [m for m in _hets(model) if m.part != 1]


@pytest.mark.parametrize("m,n,part", [(8, 8, 2), (12, 20, 4), (16, 10, 4), (6, 9, 3), (8, 12, 8),
                                      (12, 7, 3)])
@pytest.mark.parametrize("stride", [1, 2])
def test_blocked_twin_is_the_permuted_layer(m, n, part, stride):
    torch.manual_seed(0)
    layer = hetconv.HetConv2d(m, n, 3, stride=stride, part=part, bias=True)
    twin = _blocked_twin(layer)
    assert twin.pattern == "blocked" and twin.part == layer.part
    pi_in, pi_out = P.channel_order(m, layer.part), P.filter_order(n, layer.part)
    # The definition, on dense kernels: blocked kernel = shifted kernel with rows/columns sorted.
    assert torch.equal(twin.dense_weight(), layer.dense_weight()[pi_out][:, pi_in])
    x = torch.randn(2, m, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(twin(x[:, pi_in]), layer(x)[:, pi_out], rtol=1e-5, atol=1e-5)


def _vgg(part, width=0.25):
    torch.manual_seed(0)
    return _randomise(hetconv.create_model("vgg16_cifar", part=part, width=width))


@pytest.mark.parametrize("with_example", [False, True])
def test_vgg_absorbs_every_permutation(with_example):
    model = _vgg(4)
    x = torch.randn(3, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = absorb_permutations(model, x if with_example else None)
    # Every HetConv is blocked now; all 12 consecutive layers share P = 4, the stem conv's
    # output channels are permuted instead of gathered: one gather is left, before flatten.
    assert [h.pattern for h in _hets(gm)] == ["blocked"] * 12
    assert gm.hetconv_permutations == {"rewritten_layers": 12, "gathers": 1}
    assert _gathers(gm) == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    for k, v in model.state_dict().items():  # the original is left as it was
        assert torch.equal(v, before[k]) and model.training is False
    assert all(h.pattern == "shifted" for h in _hets(model))


def test_vgg_pc_gathers_only_where_widths_change():
    # P = C: a layer's output order (filters sorted by n mod M) is the next layer's input
    # order (identity, one class per channel) only when M == N.
    model = _vgg("C")
    x = torch.randn(2, 3, 32, 32)
    gm = absorb_permutations(model, x)
    widths = [(h.in_channels, h.out_channels) for h in _hets(model)]
    changes = sum(1 for m, n in widths if m != n)
    assert gm.hetconv_permutations["gathers"] == changes + 1  # + the classifier's input
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_resnet_shape_information_keeps_stages_permuted():
    torch.manual_seed(0)
    model = _randomise(hetconv.create_model("resnet56_cifar", part=4, width=0.5))
    x = torch.randn(2, 3, 32, 32)
    plain = absorb_permutations(model)
    shaped = absorb_permutations(model, x)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(plain(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(shaped(x), ref, rtol=1e-4, atol=1e-5)
    assert plain.hetconv_permutations["rewritten_layers"] == 54
    # Without shapes, each residual sum with a natural shortcut gathers back; with them the
    # shortcut is brought into the stored order: only stage transitions and the head gather.
    assert shaped.hetconv_permutations["gathers"] < plain.hetconv_permutations["gathers"]
    # The zero-padded shortcut of each stage transition subsamples and pads the stored
    # order (its new channels keep their places): one gather per transition, where it
    # meets the next block's order, and one before the classifier.
    assert shaped.hetconv_permutations["gathers"] == 2 + 1
    transitions = [n for n in shaped.graph.nodes
                   if n.op == "call_function" and n.target is torch.index_select][:2]
    assert all(n.args[0].target is F.pad for n in transitions)  # on the subsampled tensor


def test_torchvision_resnet_with_downsample_convs():
    torch.manual_seed(0)
    model = _randomise(hetconv.create_model("resnet50", part=4, num_classes=7))
    x = torch.randn(1, 3, 64, 64)
    gm = absorb_permutations(model, x)
    assert gm.hetconv_permutations["rewritten_layers"] == len(_hets(model))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)


class _Branchy(nn.Module):
    """A shared HetConv called twice, a concatenation, a broadcast gate and a dense conv reader."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.het = hetconv.HetConv2d(8, 8, part=2, bias=True)
        self.other = hetconv.HetConv2d(8, 8, part=4)
        self.reader = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(14, 4)

    def forward(self, x):
        a = F.relu(self.stem(x))
        b = self.het(a).relu()
        c = self.het(b)                      # same module, second call site
        d = self.other(c)                    # another P: needs a re-gather
        gate = torch.sigmoid(d.mean((2, 3), keepdim=True))  # natural (B, C, 1, 1) operand
        e = d * gate
        f = self.reader(e + c)               # dense conv reading a permuted sum
        g = torch.cat([e, f], 1)             # unknown consumer: natural order
        return self.head(torch.flatten(F.adaptive_avg_pool2d(g, 1), 1))


@pytest.mark.parametrize("with_example", [False, True])
def test_branches_shared_modules_and_broadcasts(with_example):
    torch.manual_seed(0)
    model = _Branchy().eval()
    x = torch.randn(2, 3, 9, 9)
    gm = absorb_permutations(model, x if with_example else None)
    assert gm.hetconv_permutations["rewritten_layers"] == 3
    assert all(h.pattern == "blocked" for h in _hets(gm))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    assert model.het.pattern == "shifted"


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.het = hetconv.HetConv2d(4, 4, part=2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.het(x)
        return x


def test_untraceable_model_is_reported_and_optimize_falls_back():
    model = _Untraceable().eval()
    with pytest.raises(TypeError, match="torch.fx"):
        absorb_permutations(model)
    x = torch.rand(1, 4, 5, 5)
    with pytest.warns(RuntimeWarning, match="not absorbed"):
        fast = hetconv.optimize_for_inference(model, x, repeats=1)
    assert "error" in fast.hetconv_plan["permutations"]
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        absorb_permutations("vgg")
    with pytest.raises(TypeError, match="example_input"):
        absorb_permutations(nn.Identity(), [1, 2])
    with pytest.raises(TypeError, match="absorb"):
        hetconv.optimize_for_inference(nn.Identity(), absorb="yes")


def test_optimize_for_inference_absorbs_and_matches():
    model = _vgg(4)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = hetconv.optimize_for_inference(model, x, repeats=1, backend="auto")
    assert fast.hetconv_plan["permutations"] == {"rewritten_layers": 12, "gathers": 1}
    assert all(h.pattern == "blocked" for h in _converted_hets(fast))
    assert all(not p.requires_grad for p in fast.parameters())
    # measured: the absorbed and the plain graph are both timed, the faster is kept
    measured = hetconv.optimize_for_inference(model, x, repeats=1)
    plan = measured.hetconv_plan
    assert set(plan["absorb_seconds"]) == {"absorbed", "plain"}
    absorbed = plan["absorb_seconds"]["absorbed"] <= plan["absorb_seconds"]["plain"]
    assert plan["permutations"]["rewritten_layers"] == (12 if absorbed else 0)
    assert all(h.pattern == ("blocked" if absorbed else "shifted")
               for h in _converted_hets(measured))
    with torch.no_grad():
        torch.testing.assert_close(measured(x), model(x), rtol=1e-4, atol=1e-4)
    kept = hetconv.optimize_for_inference(model, x, repeats=1, absorb=False)
    assert all(h.pattern == "shifted" for h in _converted_hets(kept))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def test_export_onnx_without_per_layer_gathers(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _vgg(4)
    x = torch.randn(2, 3, 32, 32)
    counts = {}
    for absorb in (False, True):
        path = hetconv.export_onnx(model, tmp_path / f"m{absorb}.onnx", x, absorb=absorb)
        graph = onnx.load(path).graph
        # Gathers on the channel axis (flatten's shape arithmetic may add others on axis 0).
        counts[absorb] = sum(1 for node in graph.node if node.op_type == "Gather" and any(
            a.name == "axis" and a.i == 1 for a in node.attribute))
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), rtol=1e-3, atol=1e-4)
    assert counts[False] == 2 * 12  # input and output gather per shifted layer
    assert counts[True] == 1


def test_hetconv_fed_by_the_input_and_gathers_shared():
    # The first layer reads the model input (gathered once); its output feeds two readers
    # that need natural order: one gather serves both.
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.het = hetconv.HetConv2d(8, 8, part=4)

        def forward(self, x, y):
            z = self.het(x)
            return torch.cat([z, y], 1), z.flatten(1)

    torch.manual_seed(0)
    model = Two().eval()
    x, y = torch.randn(2, 8, 5, 5), torch.randn(2, 3, 5, 5)
    gm = absorb_permutations(model)
    assert gm.hetconv_permutations == {"rewritten_layers": 1, "gathers": 2}
    with torch.no_grad():
        for got, ref in zip(gm(x, y), model(x, y)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.train()
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.item()


@pytest.mark.parametrize("family", ["vgg16_cifar", "resnet56_cifar"])
def test_shared_parameters_train_the_original(family):
    import copy

    torch.manual_seed(0)
    model = hetconv.create_model(family, part=4, width=0.25)
    reference = copy.deepcopy(model)
    gm = absorb_permutations(model, torch.randn(2, 3, 16, 16), share_parameters=True)
    assert gm.hetconv_permutations["rewritten_layers"] == len(_hets(model))
    # The result owns nothing new: same state_dict keys, the very same tensors.
    assert list(gm.state_dict()) == list(model.state_dict())
    for k, v in gm.state_dict().items():
        assert v.data_ptr() == model.state_dict()[k].data_ptr()
    assert all(h.pattern == "shifted" for h in _hets(model))
    # Training through the rewrite = training the model itself: same loss, the gradients
    # land on the model's parameters, BatchNorm statistics are updated in natural order.
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    assert _train_step(gm, x, y) == pytest.approx(_train_step(reference, x, y), rel=1e-5)
    for (k, a), b in zip(model.named_parameters(), reference.parameters()):
        scale = b.grad.abs().max().item() + 1e-3  # grads under BatchNorm can be ~0
        assert (a.grad - b.grad).abs().max().item() <= 1e-3 * scale, k
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    gm.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-3, atol=1e-4)


def test_shared_parameters_copy_and_modes():
    import copy
    model = _vgg(4)
    gm = absorb_permutations(model, share_parameters=True)
    clone = copy.deepcopy(gm)  # a deep copy owns its own parameters, views included
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(clone(x), model(x), rtol=1e-3, atol=1e-4)
    with pytest.raises(TypeError, match="share_parameters"):
        absorb_permutations(model, share_parameters=1)


class _InPlace(nn.Module):
    """In-place sums whose mutated operand is natural, or permuted with a broadcast partner."""

    def __init__(self, gate_shape):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.het = hetconv.HetConv2d(8, 8, part=4)
        self.register_buffer("gate", torch.rand(gate_shape))

    def forward(self, x):
        a = self.stem(x)
        b = self.het(torch.relu(a))
        a.add_(b)                    # natural operand mutated: it must stay the same tensor
        b.mul_(self.gate)            # permuted operand mutated, broadcast partner
        return a + b.mean((2, 3), keepdim=True), a


@pytest.mark.parametrize("gate_shape", [(1, 8, 1, 1), (1,)])
def test_in_place_operands_are_never_replaced_by_copies(gate_shape):
    torch.manual_seed(0)
    model = _InPlace(gate_shape).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = absorb_permutations(model, x)  # shapes known: the gate is gathered, b stays permuted
    with torch.no_grad():
        for got, ref in zip(gm(x), model(x)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    if gate_shape == (1, 8, 1, 1):  # unknown shapes: b cannot be re-ordered in place
        with pytest.raises(TypeError, match="in-place"):
            absorb_permutations(model)


@pytest.mark.parametrize("m,n,part,bias", [(8, 8, 2, True), (12, 20, 4, False), (6, 9, 3, True)])
def test_blocked_view_weights_and_gradients_equal_the_twin(m, n, part, bias):
    from hetconv.permute import _BlockedView

    torch.manual_seed(0)
    layer = hetconv.HetConv2d(m, n, part=part, bias=bias)
    twin, view = _blocked_twin(layer), _BlockedView(layer)
    x = torch.randn(2, m, 5, 5)
    g = torch.randn(2, n, 5, 5)
    view(x).backward(g)
    twin(x).backward(g)
    with torch.no_grad():
        torch.testing.assert_close(view(x), twin(x), rtol=1e-5, atol=1e-6)
    # The twin's gradients are the layer's, permuted the same way as its weights.
    maps = hetconv.permute._blocked_maps(layer)
    pi_out, cols = maps["pi_out"], maps["w1_cols"]
    torch.testing.assert_close(layer.weight_k.grad[pi_out], twin.weight_k.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight_1.grad[pi_out].gather(1, cols), twin.weight_1.grad,
                               rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(layer.bias.grad[pi_out], twin.bias.grad, rtol=1e-5, atol=1e-6)


class _PadThenHet(nn.Module):
    """Two shifted layers around a subsampling slice and an F.pad."""

    def __init__(self, pad, mode="constant", value=None, extra=0):
        super().__init__()
        self.pad, self.mode, self.value = pad, mode, value
        self.a = hetconv.HetConv2d(8, 8, part=4)
        self.b = hetconv.HetConv2d(8 + extra, 8, part=4)

    def forward(self, x):
        y = self.a(x)[:, :, ::2, 1::2]
        return self.b(F.pad(y, self.pad, mode=self.mode, value=self.value))


@pytest.mark.parametrize("pad,mode,value,extra,gathers", [
    ((1, 1, 2, 0), "constant", None, 0, 0),       # height/width only: order kept
    ((1, 1, 1, 1), "reflect", None, 0, 0),
    ((0, 0, 0, 0, 0, 4), "constant", None, 4, 1),  # new channels after the stored ones
    ((0, 0, 0, 0, 3, 1), "constant", 0.5, 4, 1),   # before and after, not zero
    ((0, 0, 0, 0, 0, -4), "constant", None, -4, 2),  # a crop: back to natural, then in
])
def test_slices_and_pads_keep_or_extend_the_stored_order(pad, mode, value, extra, gathers):
    torch.manual_seed(3)
    model = _PadThenHet(pad, mode, value, extra).eval()
    x = torch.randn(2, 8, 9, 9)
    gm = absorb_permutations(model, x)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    # Only the model's input (read by the first layer) and its output are gathered besides.
    assert gm.hetconv_permutations == {"rewritten_layers": 2, "gathers": 2 + gathers}


class _IndexPool(nn.Module):
    """A shifted layer, then a max-pool returning its indices (a tuple: not channel-wise)."""

    POOLS = {
        "module": lambda m, y: m.pool(y),
        "adaptive_module": lambda m, y: m.adaptive(y),
        "functional": lambda m, y: F.max_pool2d(y, 2, return_indices=True),
        "adaptive_functional": lambda m, y: F.adaptive_max_pool2d(y, 4, True),
    }

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a = hetconv.HetConv2d(16, 16, part=4)
        self.b = hetconv.HetConv2d(16, 16, part=4)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.adaptive = nn.AdaptiveMaxPool2d(4, return_indices=True)

    def forward(self, x):
        y, i = self.POOLS[self.kind](self, self.a(x))
        return self.b(y) + i.to(y.dtype)


@pytest.mark.parametrize("kind", list(_IndexPool.POOLS))
def test_max_pools_returning_indices_are_not_channel_wise(kind, tmp_path):
    torch.manual_seed(6)
    model = _IndexPool(kind).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        want = model(x)
    for example in (None, x):
        gm = absorb_permutations(model, example)
        assert gm.hetconv_permutations["rewritten_layers"] == 2
        with torch.no_grad():
            torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
    fast = hetconv.optimize_for_inference(model, x, repeats=1, backend="auto")  # checks
    assert fast.hetconv_plan["permutations"]["rewritten_layers"] == 2
    ort = pytest.importorskip("onnxruntime")
    path = hetconv.export_onnx(model, tmp_path / "m.onnx", x)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_example", [False, True])
def test_unbatched_input_is_gathered_on_its_channels(with_example):
    """An unbatched (C, H, W) input, which HetConv2d and nn.Conv2d take: its channels are
    dim 0, and the gathers, slices and pads follow them there."""
    torch.manual_seed(7)
    model = nn.Sequential(hetconv.HetConv2d(8, 12, part=4), nn.ReLU(),
                          hetconv.HetConv2d(12, 8, part=2), nn.Conv2d(8, 6, 1)).eval()
    x = torch.randn(8, 7, 7)
    gm = absorb_permutations(model, x if with_example else None)
    assert gm.hetconv_permutations["rewritten_layers"] == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
        if not with_example:  # the same graph takes batches too
            xs = torch.randn(2, 8, 7, 7)
            torch.testing.assert_close(gm(xs), model(xs), rtol=1e-5, atol=1e-5)

    class SliceAndPad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = hetconv.HetConv2d(8, 8, part=4)
            self.b = hetconv.HetConv2d(12, 8, part=4)

        def forward(self, x):  # (C, H, W): the channels are dim 0, padded by pad[4:6]
            y = self.a(x)[:, ::2, 1::2]
            return self.b(F.pad(y, (1, 1, 1, 1, 3, 1), value=0.5))

    model = SliceAndPad().eval()
    gm = absorb_permutations(model, x if with_example else None)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    if with_example:  # the input, the padded channels and the output: as with batches
        assert gm.hetconv_permutations["gathers"] == 3


def test_in_place_ops_on_permuted_tensors_that_are_not_channel_wise_are_refused():
    """An in-place op the rewrite does not know to act per channel writes into a gathered
    copy, not the stored tensor: refused where another reader would miss the write
    (optimize and export keep the permutations then), taken where its result is the only
    reader."""
    class ExpInPlace(nn.Module):
        def __init__(self, reread: bool):
            super().__init__()
            self.reread = reread
            self.a = hetconv.HetConv2d(8, 8, part=4)
            self.b = hetconv.HetConv2d(8, 8, part=4)

        def forward(self, x):
            y = self.a(x)
            z = y.exp_()
            return self.b(y if self.reread else z)

    torch.manual_seed(8)
    x = torch.randn(2, 8, 5, 5)
    alone = ExpInPlace(reread=False).eval()
    gm = absorb_permutations(alone, x)
    assert gm.hetconv_permutations["rewritten_layers"] == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(x), alone(x), rtol=1e-5, atol=1e-5)
    model = ExpInPlace(reread=True).eval()
    with pytest.raises(TypeError, match="in-place op, not channel-wise, on a permuted tensor"):
        absorb_permutations(model, x)
    with pytest.warns(RuntimeWarning, match="not absorbed"):
        fast = hetconv.optimize_for_inference(model, x, repeats=1, backend="auto")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("write", ["zero_", "fill_", "clamp_"])
def test_in_place_writes_through_a_view_of_a_permuted_tensor_are_refused(write):
    """A spatial slice of a permuted tensor is a view of it: an in-place op on the slice
    that is not channel-wise would write into a gathered copy, and the tensor read after it
    would miss the write (0.69 off, silently); refused like a write into the tensor itself."""
    class WriteThroughView(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = hetconv.HetConv2d(16, 16, part=4)
            self.b = hetconv.HetConv2d(16, 16, part=4)

        def forward(self, x):
            h = self.a(x)
            v = h[:, :, :1]  # (item assignment itself is not traceable: a clear error)
            getattr(v, write)(*{"zero_": (), "fill_": (0.5,), "clamp_": (0.0, 0.1)}[write])
            return self.b(h)

    torch.manual_seed(9)
    model, x = WriteThroughView().eval(), torch.randn(2, 16, 8, 8)
    try:
        gm = absorb_permutations(model, x)
    except TypeError as err:
        assert "permuted tensor" in str(err)
    else:  # taken: then it must compute the same
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("case", ["tied_conv", "weight_read", "bn_weight_read", "het_weight_read"])
@pytest.mark.parametrize("share", [False, True])
def test_parameters_something_else_reads_are_never_permuted_in_place(case, share):
    """Absorbing permutes a dense conv's or a BatchNorm's channels in place (or replaces a
    shifted layer by its twin) when the module is called once; its parameters may still be
    read elsewhere: tied to another module's, or read directly by the forward."""
    class Exposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.het = hetconv.HetConv2d(8, 8, part=4)
            self.tied = nn.Conv2d(8, 8, 3, padding=1)
            self.tied.weight = self.conv.weight

        def forward(self, x):
            y = self.het(self.bn(self.conv(x)))
            if case == "tied_conv":
                return y + self.tied(x)
            if case == "weight_read":
                return y + F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
            if case == "bn_weight_read":
                return y * self.bn.weight[:, None, None]
            return y + F.conv2d(x, self.het.weight_k[:, :1].expand(8, 8, 3, 3) / 8, padding=1)

    torch.manual_seed(10)
    model, x = _randomise(Exposed()), torch.randn(2, 8, 6, 6)
    gm = absorb_permutations(model, x, share_parameters=share)
    assert gm.hetconv_permutations["rewritten_layers"] == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_in_place_writes_through_views_see_every_copy():
    """A write through a view made by a function (``torch.flatten``) of a gathered copy is
    refused where the permuted tensor is read again; a copy gathered before a write through
    a view of the tensor is not reused after it."""
    class Flat(nn.Module):
        def __init__(self, write_view: bool):
            super().__init__()
            self.write_view = write_view
            self.a = hetconv.HetConv2d(8, 8, part=4)
            self.b = hetconv.HetConv2d(8, 8, part=4)

        def forward(self, x):
            h = self.a(x)
            if self.write_view:  # a flat copy, written into: h must see it
                torch.flatten(h, 1).relu_()
                return self.b(h)
            before = torch.flatten(h, 1).sum(1)
            h[:, :, ::2].relu_()  # channel-wise, on the stored tensor: h changes
            return before[:, None] + torch.flatten(h, 1)

    torch.manual_seed(11)
    x = torch.randn(2, 8, 6, 6)
    for example in (None, x):
        model = Flat(write_view=False).eval()
        gm = absorb_permutations(model, example)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(TypeError, match="in-place op on a view of a permuted tensor"):
            absorb_permutations(Flat(write_view=True).eval(), example)
