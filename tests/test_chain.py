"""Native layers chained by optimize_for_inference: one C call runs them image by image
(hetconv_native_chain). Checked against the same layers run one after another (bitwise: the
same arithmetic per output) and against the original model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hetconv
from hetconv import deploy, native
from hetconv._timing import Timing

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernel unavailable")

X, Y, NONE, X2 = native.CHAIN_X, native.CHAIN_Y, native.CHAIN_NONE, native.CHAIN_X2


def _chains(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, deploy.NativeChain)]


def _counting(monkeypatch):
    """Counts the C chain calls."""
    calls = []
    real = native.run_chain

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(native, "run_chain", counted)
    return calls


def _stepwise(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model with its chains run layer by layer."""
    chains = _chains(model)
    for c in chains:
        c.enabled = False
    try:
        return model(x)
    finally:
        for c in chains:
            c.enabled = True


def _resnet(size: int = 16, batch: int = 8, part: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = hetconv.create_model("resnet56_cifar", part=part, width=0.5).eval()
    with torch.no_grad():  # non-trivial BatchNorms, so the folded biases are not zero
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(batch, 3, size, size)
    return model, x


@pytest.mark.parametrize("size", [16, 32, 20])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("absorb", [True, False])
def test_resnet_chained_matches_layer_by_layer(size, threads, absorb, monkeypatch):
    """ResNet-56 becomes one chain: its 54 HetConv layers, the two stage transitions'
    shortcuts (in the absorbed graph with their channel orders) and the stem when the
    kernel ran it faster. Padded geometries (32x32, 16x16, 20x20), planes read in place
    (8x8, 4x4), stride-2 layers reading the intermediate buffers: the same numbers as layer
    by layer, bit for bit, and the original model's within tolerance."""
    model, x = _resnet(size)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = hetconv.optimize_for_inference(model, x, backend="native",
                                              memory_format="contiguous", absorb=absorb)
        plan = fast.hetconv_plan
        assert plan["chained_native"] == 1
        (chain,) = _chains(fast)
        kinds = [type(m).__name__ for m in chain.layers]
        assert kinds.count("ChannelPadShortcut") == 2
        assert kinds.count("NativeFused") == 54 + plan["native_dense"]
        calls = _counting(monkeypatch)
        with torch.no_grad():
            got = fast(x)
            assert len(calls) == 1
            want = _stepwise(fast, x)
            assert len(calls) == 1
            ref = model(x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got, want)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_resnet_chain_program_reuses_three_buffers(monkeypatch):
    monkeypatch.setattr(deploy, "_native_dense_convs", lambda *args: {})  # the stem stays dense
    model, x = _resnet()
    fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format="contiguous")
    (chain,) = _chains(fast)
    # a block: conv1 reads the block input, conv2 reads conv1's output plus the block input
    assert chain.program[:4] == [(X, NONE, 0), (0, X, 1), (1, NONE, 0), (0, 1, 2)]
    shortcuts = [k for k, m in enumerate(chain.layers) if isinstance(m, deploy.ChannelPadShortcut)]
    assert len(shortcuts) == 2
    for k in shortcuts:  # a transition: conv1 and the shortcut read the block input, conv2
        i, r, o = chain.program[k]  # adds the shortcut
        assert r == NONE and chain.program[k - 1][0] == i and chain.program[k + 1][1] == o
    assert chain.program[-1][2] == Y
    assert chain.nbuf == 3
    for k, (i, r, o) in enumerate(chain.program):  # nothing overwritten while still read
        assert o not in (i, r)
        if k < len(chain.program) - 1:
            assert o >= 0


class _Plain(nn.Module):
    """Convolutions with ReLUs and a residual sum that reaches back two layers: channel
    counts change, a 5x5 kernel set, stride 2 in the middle."""

    def __init__(self):
        super().__init__()
        self.a = hetconv.HetConv2d(8, 16, 5, part=4, bias=True)
        self.b = hetconv.HetConv2d(16, 16, 5, part=2, bias=True, pattern="blocked")
        self.c = hetconv.HetConv2d(16, 24, 5, stride=2, part=8, bias=True)
        self.d = hetconv.HetConv2d(24, 24, 5, part=4, bias=True)
        self.e = hetconv.HetConv2d(24, 24, 5, part=3, bias=True)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = F.relu(self.b(x))
        y = F.relu(self.c(x))
        z = F.relu(self.d(y))
        return torch.relu(self.e(z) + y)


@pytest.mark.parametrize("size", [(24, 24), (19, 13)])
def test_generic_chain_matches(size, monkeypatch):
    torch.manual_seed(1)
    model = _Plain().eval()
    x = torch.randn(6, 8, *size)
    fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format="contiguous",
                                          absorb=False)
    assert [len(c.layers) for c in _chains(fast)] == [5]
    calls = _counting(monkeypatch)
    with torch.no_grad():
        got = fast(x)
        assert len(calls) == 1
        assert torch.equal(got, _stepwise(fast, x))
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_small_batches_chained_too(batch, monkeypatch):
    """Fewer images than threads: all threads on each image, each layer's filter blocks
    split between them (a barrier after each layer); the same numbers, bit for bit."""
    model, x = _resnet(batch=8)
    fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format="contiguous")
    calls = _counting(monkeypatch)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            got = fast(x[:batch])
            assert len(calls) == 1
            assert torch.equal(got, _stepwise(fast, x[:batch]))
            torch.testing.assert_close(got, model(x[:batch]), rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(old)


def test_autograd_and_other_layouts_run_layer_by_layer(monkeypatch):
    model, x = _resnet(batch=8)
    fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format="contiguous")
    fast.hetconv_input_format = nn.Identity()  # the chain itself gets channels_last input
    calls = _counting(monkeypatch)
    with torch.no_grad():
        cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(fast(cl), model(x), rtol=1e-4, atol=1e-4)
        assert not calls  # channels_last: not the NCHW kernel's input
    xg = x.clone().requires_grad_()
    out = fast(xg)
    out.sum().backward()
    assert not calls and xg.grad is not None
    torch.testing.assert_close(out.detach(), model(x).detach(), rtol=1e-4, atol=1e-4)


def test_chain_sees_weights_changed_after_a_call(monkeypatch):
    """Weights updated in place or replaced after a chained call: the next call prepares
    again and uses them."""
    model, x = _resnet()
    fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format="contiguous")
    calls = _counting(monkeypatch)
    first = _chains(fast)[0]
    with torch.no_grad():
        before = fast(x)
        first.layers[3].layer.weight_k.mul_(-2.0)  # in place
        after = fast(x)
        assert not torch.equal(after, before)
        assert torch.equal(after, _stepwise(fast, x))
        first.layers[5].layer.weight_1 = nn.Parameter(first.layers[5].layer.weight_1 * 3,
                                                      requires_grad=False)  # replaced
        again = fast(x)
        assert torch.equal(again, _stepwise(fast, x))
        assert not torch.equal(again, after)
    assert len(calls) == 3


def test_chained_model_copies_and_pickles(tmp_path):
    model, x = _resnet()
    fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format="contiguous")
    with torch.no_grad():
        want = fast(x)
        twin = copy.deepcopy(fast)
        torch.save(fast, tmp_path / "m.pt")
        loaded = torch.load(tmp_path / "m.pt", weights_only=False)
        for other in (twin, loaded):
            assert all(not c.__dict__.get("_plans") for c in _chains(other))
            assert torch.equal(other(x), want)


def test_measured_optimization_keeps_the_faster_way():
    model, x = _resnet()
    fast = hetconv.optimize_for_inference(model, x, repeats=1)
    plan = fast.hetconv_plan
    if plan["chained_native"]:
        seconds = plan["chain_seconds"]
        want = seconds["chained"] <= seconds["layer_by_layer"]
        assert all(c.enabled == want for c in _chains(fast))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def test_whole_model_choices_are_timed_interleaved_for_the_minimum_time(monkeypatch):
    """The whole-model choices (chained or layer by layer, the measured configuration or the
    rule's, the memory format) time their candidates interleaved and for at least
    MODEL_DECISION_SECONDS each; the per-layer choices keep their plain repeats."""
    calls = []
    real = deploy.time_interleaved

    def timed(fns, **kw):
        calls.append((frozenset(fns), kw.get("min_seconds", 0.0)))
        return real(fns, **{**kw, "min_seconds": 0.0})  # the test does not wait for it

    monkeypatch.setattr(deploy, "time_interleaved", timed)
    model, x = _resnet()
    fast = hetconv.optimize_for_inference(model, x, repeats=1, absorb=False)
    assert "chained_native" in fast.hetconv_plan  # whether the chain won depends on timing
    whole = {frozenset({"chained", "layer_by_layer"}), frozenset({"measured", "rule"}),
             frozenset({"0", "1"})}
    assert whole <= {keys for keys, _ in calls}
    for keys, seconds in calls:
        want = deploy.MODEL_DECISION_SECONDS if keys in whole else 0.0
        assert seconds == want, (sorted(keys), seconds)


def test_inconsistent_chains_are_refused():
    """run_chain checks the inputs against the chain; the C side checks the program: reading
    a buffer nothing wrote, the output written before the end, a second input nobody gave,
    shapes that do not follow from one layer to the next."""
    torch.manual_seed(2)
    layers = [hetconv.HetConv2d(8, 8, 3, part=4, bias=True).eval() for _ in range(2)]
    wide = hetconv.HetConv2d(16, 8, 3, part=4).eval()
    with torch.no_grad():
        def plan(m, c=8):
            return native.ForwardPlan.build(torch.empty(1, c, 6, 6), m.weight_k, m.weight_1,
                                            m.bias, m.pattern, True, None, 1)
        plans = [plan(m) for m in layers]
        x = torch.randn(4, 8, 6, 6)
        good = native.Chain(plans, [(X, NONE, 0), (0, X, Y)])
        assert good.nbuf == 1 and good.in_shapes == ((8, 6, 6), None)
        want = F.relu(layers[1](F.relu(layers[0](x))) + x)
        torch.testing.assert_close(native.run_chain(good, x), want, rtol=1e-4, atol=1e-4)
        for program in ([(X, NONE, 1), (0, X, Y)],  # buffer 0 read, never written
                        [(X, NONE, Y), (X, NONE, 0)]):  # y written before the end
            chain = native.Chain(plans, program)
            with pytest.raises(RuntimeError, match="chain failed"):
                native.run_chain(chain, x)
        x2_chain = native.Chain(plans, [(X, X2, 0), (0, NONE, Y)])
        with pytest.raises(ValueError, match="x2 must be"):
            native.run_chain(x2_chain, x)
        mismatch = native.Chain([plans[0], plan(wide, 16)], [(X, NONE, 0), (0, NONE, Y)])
        with pytest.raises(RuntimeError, match="chain failed"):  # 8 channels into 16
            native.run_chain(mismatch, x)
        with pytest.raises(ValueError, match=r"x must be .* \(B, 8, 6, 6\)"):
            native.run_chain(good, torch.randn(4, 8, 5, 5))
        with pytest.raises(ValueError, match="x must be"):
            native.run_chain(good, x.contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_convolution_as_a_native_layer(stride, bias):
    """A dense stem the NCHW kernel computes as a P = 1 layer: its taps are the dense kernel,
    fused with its ReLU it equals the convolution."""
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 16, 3, stride=stride, padding=1, bias=bias).eval()
    assert deploy._native_dense_ok(conv)
    layer = deploy._as_native_p1(conv)
    assert layer.part == 1 and layer.backend == "native"
    fused = deploy.NativeFused(layer, relu=True, residual=False)
    x = torch.randn(4, 3, 17, 15)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), F.relu(conv(x)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 16, 3, padding=0), nn.Conv2d(4, 16, 3, padding=1, groups=2),
    nn.Conv2d(3, 16, 4, padding=2), nn.Conv2d(3, 16, 3, padding=2, dilation=2),
    nn.Conv2d(3, 16, 3, stride=3, padding=1), nn.Conv2d(3, 16, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(3, 16, 3, padding=1).double(), hetconv.HetConv2d(4, 16, 3, part=2)])
def test_dense_convolutions_the_kernel_does_not_take(conv):
    assert not deploy._native_dense_ok(conv)


class _Shortcuts(nn.Module):
    """Two option-A shortcuts as traced code writes them: channels padded at both ends and
    reordered, and padded at the end only (stride 1)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("order", torch.randperm(13))

    def forward(self, x):
        a = torch.index_select(F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 3)), 1, self.order)
        b = F.pad(x[:, :, ::1, ::1], (0, 0, 0, 0, 0, 4))
        c = F.pad(x[:, :, ::2, ::2], (1, 0, 0, 0, 0, 4))  # a spatial pad: not a shortcut
        return a.sum() + b.sum() * 2 + c.sum() * 3, a, b, c


def test_shortcut_patterns_become_modules_and_chain_ops():
    torch.manual_seed(4)
    model = _Shortcuts()
    gm = torch.fx.symbolic_trace(model)
    assert deploy._fuse_shortcuts(gm) == 2
    gm.recompile()
    mods = [m for m in gm.modules() if isinstance(m, deploy.ChannelPadShortcut)]
    assert sorted((m.stride, m.front, m.back, m.order is not None) for m in mods) == [
        (1, 0, 4, False), (2, 2, 3, True)]
    x = torch.randn(3, 8, 7, 6)
    for got, want in zip(gm(x), model(x)):
        assert torch.equal(got, want)
    for m in mods:  # the C op (run as a one-op chain's first op) computes the same
        plan = native.ShortcutPlan((1, 8, 7, 6), m.stride, m.front, m.back, m.order)
        ref = m(x)
        assert plan.shape[1:] == tuple(ref.shape[1:])
        layer = hetconv.HetConv2d(ref.shape[1], 8, 3, part=1, bias=True).eval()
        with torch.no_grad():
            conv = native.ForwardPlan.build(torch.empty(plan.shape), layer.weight_k,
                                            layer.weight_1, layer.bias, "shifted", False,
                                            None, 1)
            got = native.run_chain(native.Chain([plan, conv], [(X, NONE, 0), (0, NONE, Y)]), x)
            want = F.conv2d(ref, layer.dense_weight(), layer.bias, 1, 1)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_chain_arguments_are_checked():
    with pytest.raises(ValueError, match="one .input, residual, output. entry per plan"):
        native.Chain([native.ShortcutPlan((1, 4, 6, 6), 2, 0, 4)], [])
    with pytest.raises(ValueError, match="stride must be a positive int"):
        native.ShortcutPlan((1, 4, 6, 6), 0, 0, 4)
    with pytest.raises(ValueError, match="order must list the 8 channels"):
        native.ShortcutPlan((1, 4, 6, 6), 2, 0, 4, torch.arange(7))


@pytest.mark.parametrize("n_stem, native_stem", [(16, True), (24, False)])
def test_channels_last_dense_stem_runs_the_channels_last_kernel(n_stem, native_stem,
                                                                 monkeypatch):
    """In a channels_last model a dense convolution the kernel runs faster (timing faked:
    the kernel wins) becomes a P = 1 layer on the channels-last kernel, fused with its ReLU:
    its output stays channels_last for the next layer. A stem of filters the channels-last
    kernel does not take (16 does not divide 24) stays nn.Conv2d: the NCHW kernel would hand
    NCHW activations to a channels_last model."""
    monkeypatch.setattr(deploy, "time_interleaved", lambda fns, **kw: {
        k: Timing.from_samples([1.0 if k in ("dense", "rule") else 0.0]) for k in fns})
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, n_stem, 3, padding=1), nn.ReLU(),
                          hetconv.HetConv2d(n_stem, 32, 3, part=4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 12, 12)
    fast = hetconv.optimize_for_inference(model, x, backend="measure",
                                          memory_format="channels_last", absorb=False,
                                          pack=False)
    assert fast.hetconv_plan["native_dense"] == int(native_stem)
    assert any(type(m) is nn.Conv2d for m in fast.modules()) != native_stem
    launches = []
    real = native._launch
    monkeypatch.setattr(native, "_launch", lambda x_, shape, fmt, *a: launches.append(
        (x_.shape[1], fmt)) or real(x_, shape, fmt, *a))
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = fast(xc)
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)
    # the first kernel launch (input channels, output memory format): the stem's, or the
    # HetConv layer's after nn.Conv2d
    if native_stem:
        assert launches[0] == (3, torch.channels_last)
    else:
        assert launches[0][0] == n_stem


@pytest.mark.skipif(not deploy._packing_available(), reason="no oneDNN packed convolution")
def test_dense_convolution_the_packed_one_runs_faster_is_left_to_it(monkeypatch):
    """The native kernel is timed against nn.Conv2d and the packed convolution together,
    each with the ReLU that follows (faked: native beats nn.Conv2d, packed beats both): the
    stem is not converted, the packing pass takes it, with the ReLU inside."""
    seen = []
    fake = {"dense": 3.0, "native": 2.0, "packed": 1.0, "rule": 2.0, "measured": 1.0}

    def timed(fns, **kw):
        seen.append(set(fns))
        return {k: Timing.from_samples([fake.get(k, 5.0)]) for k in fns}
    monkeypatch.setattr(deploy, "time_interleaved", timed)
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          hetconv.HetConv2d(16, 32, 3, part=4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 12, 12)
    fast = hetconv.optimize_for_inference(model, x, backend="measure",
                                          memory_format="channels_last", absorb=False)
    plan = fast.hetconv_plan
    assert {"dense", "native", "packed"} in seen
    assert plan["native_dense"] == 0 and plan["packed_dense"] == plan["packed_relus"] == 1
    (stem,) = [m for m in fast.modules() if isinstance(m, deploy.PackedConv2d)]
    assert stem.relu and plan["layers"]["0"]["backend"] == "packed"
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)),
                                   model(x), rtol=1e-4, atol=1e-4)


def test_dense_convolution_left_alone_where_nothing_fuses_it(monkeypatch):
    """A dense convolution converted for the kernel runs it only inside a fused layer: with
    nothing after it to fuse (no ReLU, no sum) it goes back to nn.Conv2d, although the
    timing (faked here: the kernel faster) chose the kernel."""
    monkeypatch.setattr(deploy, "time_interleaved", lambda fns, **kw: {
        k: Timing.from_samples([0.0 if k == "native" else 1.0]) for k in fns})
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), hetconv.HetConv2d(16, 16, 3, part=4),
                          nn.ReLU()).eval()
    x = torch.randn(4, 3, 16, 16)
    fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format="contiguous")
    assert fast.hetconv_plan["native_dense"] == 0
    convs = [m for m in fast.modules() if type(m) is nn.Conv2d]
    assert len(convs) == 1 and "0" not in fast.hetconv_plan["layers"]
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks traced as constants
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # torch deprecates it; still used
def test_jit_trace_of_native_models_records_the_kernel():
    """torch.jit.trace of models whose layers run the C kernel: the trace records the
    kernel as its op (a ctypes call would not be recorded, and the trace would replay an
    uninitialised output); chains run layer by layer while tracing."""
    model, x = _resnet()
    fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format="contiguous")
    plain = nn.Sequential(hetconv.HetConv2d(3, 16, 3, part=1, backend="native"), nn.ReLU(),
                          hetconv.HetConv2d(16, 8, 3, part=4, backend="native")).eval()
    for m in (fast, plain):
        with torch.no_grad():
            traced = torch.jit.trace(m, x, check_trace=False)
            other = torch.randn_like(x)
            torch.testing.assert_close(traced(other), m(other), rtol=1e-4, atol=1e-4)


def test_chain_runs_under_inference_mode(monkeypatch):
    model, x = _resnet()
    fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format="contiguous")
    calls = _counting(monkeypatch)
    with torch.inference_mode():
        got = fast(x)
    assert len(calls) == 1
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("faster", ["rule", "measured"])
def test_measured_optimization_checks_the_whole_model_against_the_rule(faster, monkeypatch):
    """With backend "measure" the configured model (each layer's fastest backend, fused,
    chained) is timed against the same model on the "auto" rule, and the faster kept: timed
    one by one, layers can add up to a slower model. The timings are faked here: every
    candidate 1 s, the one that should win 0 s."""
    calls = []

    def fake(fns, **kw):  # per layer, the native kernel wins (so layers fuse and chain)
        calls.append(sorted(fns))
        return {k: Timing.from_samples([0.0 if k == faster else 0.5 if k == "native" else 1.0])
                for k in fns}
    monkeypatch.setattr(deploy, "time_interleaved", fake)
    model, x = _resnet()
    fast = hetconv.optimize_for_inference(model, x, absorb=False)
    plan = fast.hetconv_plan
    assert ["measured", "rule"] in calls
    assert plan["kept"] == faster and plan["model_seconds"] == {
        "measured": 0.0 if faster == "measured" else 1.0, "rule": 0.0 if faster == "rule" else 1.0}
    hets = {n: m for n, m in fast.named_modules() if isinstance(m, hetconv.HetConv2d)}
    fused = [m for m in fast.modules() if isinstance(m, (deploy.NativeFused, deploy.NativeChain))]
    if faster == "rule":
        assert not fused and "chain_seconds" not in plan
        assert plan["fused_native"] == plan["chained_native"] == plan["native_dense"] == 0
        assert set(plan["layers"]) == set(hets) and len(hets) == 54  # the stem stays nn.Conv2d
        assert all(m.backend == "auto" for m in hets.values())
        assert all(e["backend"] == "auto" and "seconds" in e for n, e in plan["layers"].items()
                   if hets[n].part != 1)
    else:
        assert fused and plan["fused_native"] > 0 and plan["chained_native"] > 0
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def test_optimization_without_measuring_times_no_whole_model(monkeypatch):
    monkeypatch.setattr(deploy, "time_interleaved", lambda fns, **kw: pytest.fail("timed"))
    model, x = _resnet()
    plan = hetconv.optimize_for_inference(model, x, backend="auto", memory_format="contiguous",
                                          absorb=False).hetconv_plan
    assert "model_seconds" not in plan and "kept" not in plan
