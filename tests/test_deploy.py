"""Deployment: BatchNorm folding, optimize_for_inference and ONNX export (run in onnxruntime)."""

from __future__ import annotations

import copy
import ctypes
import io
import os
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hetconv
from hetconv import deploy
from hetconv._timing import Timing


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding is really exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model.eval()


def _handmade(pattern: str = "shifted") -> nn.Sequential:
    return _randomise_bn(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=True), nn.BatchNorm2d(16), nn.ReLU(),
        hetconv.HetConv2d(16, 24, 3, part=4, pattern=pattern), nn.BatchNorm2d(24), nn.ReLU(),
        hetconv.HetConv2d(24, 16, 3, stride=2, part=2, bias=True, pattern=pattern),
        nn.BatchNorm2d(16), nn.ReLU(),
        hetconv.HetConv2d(16, 16, 3, part="C"), nn.BatchNorm2d(16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)))


class _TorchvisionStyle(nn.Module):
    """convK / bnK sibling attributes, as in torchvision's ResNet blocks."""

    def __init__(self):
        super().__init__()
        self.conv1 = hetconv.HetConv2d(8, 8, 3, part=2)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x


@pytest.mark.parametrize("pattern", ["shifted", "blocked"])
def test_fold_batchnorm_sequential_matches_and_counts(pattern):
    model = _handmade(pattern)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
    folded = deploy.fold_batchnorm(model)
    assert folded == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, hetconv.HetConv2d))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_named_pairs():
    model = _randomise_bn(_TorchvisionStyle())
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ref = model(x)
    assert deploy.fold_batchnorm(model) == 2
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.bn2, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_folds_a_heads_linear_and_batchnorm1d():
    torch.manual_seed(0)
    head = _randomise_bn(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(),
                                       nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4)))
    x = torch.randn(7, 6)
    with torch.no_grad():
        ref = head(x)
    assert deploy.fold_batchnorm(head) == 2
    assert isinstance(head[1], nn.Identity) and isinstance(head[4], nn.Identity)
    assert head[3].bias is not None  # gained one
    with torch.no_grad():
        torch.testing.assert_close(head(x), ref, rtol=1e-4, atol=1e-5)
    # a BatchNorm1d after a conv, a BatchNorm2d after a linear layer, other widths: left
    odd = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm1d(3), nn.Linear(3, 3),
                        nn.BatchNorm2d(3), nn.Linear(3, 2), nn.BatchNorm1d(3))
    assert deploy.fold_batchnorm(odd) == 0


def test_optimize_for_inference_folds_the_classifiers_batchnorm():
    model = hetconv.create_model("vgg16_cifar", part=4, width=0.125).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 32, 32)
    fast = deploy.optimize_for_inference(model, x, backend="auto", memory_format="contiguous",
                                         absorb=False)  # check=True: outputs compared
    assert fast.hetconv_plan["folded_batchnorms"] == 14  # 13 after convs, 1 in the head
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fast.modules())


class _TracedPairs(nn.Module):
    """BatchNorms fx finds after a conv: inside a depthwise + pointwise block (its own BN
    after the depthwise conv) and after the block (a Sequential neighbour that is no conv);
    and three that must stay: the conv's output also used elsewhere, a conv called twice,
    an op between conv and BN."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(hetconv.DepthwisePointwiseConv2d(4, 8), nn.BatchNorm2d(8))
        self.used_twice, self.bn_a = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.called_twice, self.bn_b = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.op_between, self.bn_c = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.block(x)
        y = self.used_twice(x)
        x = self.bn_a(y) + y
        x = self.called_twice(self.bn_b(self.called_twice(x)))
        return self.bn_c(self.op_between(x) * 2)


def test_fold_batchnorm_folds_the_pairs_the_traced_forward_applies_back_to_back():
    torch.manual_seed(1)
    model = _randomise_bn(_TracedPairs())
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = model(x)
    assert deploy.fold_batchnorm(model) == 2
    assert isinstance(model.block[0].bn, nn.Identity) and isinstance(model.block[1], nn.Identity)
    assert all(isinstance(getattr(model, n), nn.BatchNorm2d) for n in ("bn_a", "bn_b", "bn_c"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_of_a_model_fx_cannot_trace_keeps_the_structural_rules():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            x = self.seq(x)
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent: fx fails

    model = _randomise_bn(Branchy())
    assert deploy.fold_batchnorm(model) == 1 and isinstance(model.bn, nn.BatchNorm2d)


def test_fold_batchnorm_skips_bn_without_stats_and_mismatched():
    model = nn.Sequential(hetconv.HetConv2d(4, 4, part=2), nn.BatchNorm2d(4, track_running_stats=False))
    assert deploy.fold_batchnorm(model) == 0
    with pytest.raises(TypeError, match="model"):
        deploy.fold_batchnorm("not a model")


class _MisleadingPairs(nn.Module):
    """Pairs whose names or neighbourhood suggest a fold that would change the outputs."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        if case == "tied":
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.conv2.weight = self.conv1.weight

    def forward(self, x):
        c = self.case
        if c == "bn_before_conv":
            return self.conv1(self.bn1(x))
        if c == "conv_used_twice":
            y = self.conv1(x)
            return self.bn1(y) + y
        if c == "residual_before_bn":
            return self.bn1(self.conv1(x) + x)
        if c == "conv_called_twice":
            return self.bn1(self.conv1(x)) + self.conv1(x)
        if c == "bn_called_twice":
            return self.bn1(self.conv1(x)) + self.bn1(self.conv2(x))
        if c == "sequential_parts_apart":
            return self.seq[0](x) + self.seq[1](x)
        if c == "weight_read_elsewhere":
            return self.bn1(self.conv1(x)) + F.conv2d(x, self.conv1.weight, padding=1)
        if c == "tied":
            return self.bn1(self.conv1(x)) + self.conv2(x)
        if c == "swapped":  # conv1 -> bn2, conv2 -> bn1: folded, each with its own
            return self.bn2(self.conv1(x)) * self.bn1(self.conv2(x))
        raise AssertionError(c)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = hetconv.HetConv2d(4, 4, 3, part=2), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv1(x)
        return self.bn1(y) + y if y.sum() > -1e9 else y  # data-dependent: fx fails


@pytest.mark.parametrize("case", ["bn_before_conv", "conv_used_twice", "residual_before_bn",
                                  "conv_called_twice", "bn_called_twice",
                                  "sequential_parts_apart", "weight_read_elsewhere", "tied",
                                  "swapped", "untraceable"])
def test_fold_batchnorm_never_trusts_names_or_neighbours_alone(case):
    torch.manual_seed(2)
    model = _randomise_bn(_Untraceable() if case == "untraceable" else _MisleadingPairs(case))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = model(x)
    assert deploy.fold_batchnorm(model) == (2 if case == "swapped" else 0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_keeps_training_mode_batchnorms_and_folds_around_untraceable_parts():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          hetconv.HetConv2d(8, 8, 3, part=4), nn.BatchNorm2d(8))
    model.train()
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)  # batch statistics (running ones updated: the same in both calls)
    assert deploy.fold_batchnorm(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    # an fx-untraceable layer inside a Sequential is kept whole: the pairs around it fold
    se = _randomise_bn(nn.Sequential(hetconv.HetConv2d(8, 8, 3, part=4), nn.BatchNorm2d(8),
                                     hetconv.SqueezeExcite(8), nn.Conv2d(8, 8, 1),
                                     nn.BatchNorm2d(8)))
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ref = se(x)
    assert deploy.fold_batchnorm(se) == 2
    with torch.no_grad():
        torch.testing.assert_close(se(x), ref, rtol=1e-4, atol=1e-5)


def test_optimize_for_inference_leaves_each_modules_training_mode_as_it_was():
    """A model in training mode with a frozen (eval-mode) BatchNorm, or in eval mode with a
    training-mode dropout: the output check runs it in eval mode and puts every module's
    mode back, not the root's on all."""
    model = _handmade()
    x = torch.randn(2, 3, 12, 12)
    for root, odd in ((True, 1), (False, 2)):
        model.train(root)
        model[odd].train(not root)
        modes = [m.training for m in model.modules()]
        fast = hetconv.optimize_for_inference(model, x, backend="auto", repeats=1,
                                              memory_format="contiguous", absorb=False)
        assert [m.training for m in model.modules()] == modes
        assert not fast.training
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)

class _TwoOutputs(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.het, self.fc = hetconv.HetConv2d(8, 8, 3, part=4), nn.Linear(8, 2)

    def forward(self, x):
        f = self.het(torch.relu(self.bn(self.conv(x))))
        logits = self.fc(f.mean((2, 3)))
        return {"logits": logits, "features": f} if self.kind == "dict" else (logits, [f])


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_optimize_for_inference_checks_models_returning_several_outputs(kind, monkeypatch):
    """The output check compares every tensor a model returns (tuple, list, dict); it
    crashed on ``got.float()`` of a tuple."""
    torch.manual_seed(4)
    model = _randomise_bn(_TwoOutputs(kind))
    x = torch.randn(2, 3, 8, 8)
    fast = hetconv.optimize_for_inference(model, x, backend="auto", repeats=1,
                                          memory_format="contiguous")
    got, ref = fast(x), model(x)
    assert type(got) is type(ref)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    # a wrong optimized model is still caught, in any of the outputs
    monkeypatch.setattr(deploy, "fold_batchnorm",
                        lambda m: [b.running_mean.add_(1) for b in m.modules()
                                   if isinstance(b, nn.BatchNorm2d)] and 0)
    with pytest.raises(RuntimeError, match="differs from the original"):
        hetconv.optimize_for_inference(model, x, backend="auto", repeats=1,
                                       memory_format="contiguous")

@pytest.mark.parametrize("backend", ["measure", "auto", "fused"])
def test_optimize_for_inference_matches_and_leaves_original(backend):
    model = _handmade()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 12, 12)
    fast = hetconv.optimize_for_inference(model, x, backend=backend, repeats=1)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # original untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    plan = fast.hetconv_plan
    assert plan["folded_batchnorms"] == 4
    assert plan["memory_format"] in ("contiguous", "channels_last")
    layers = [m for m in fast.modules() if isinstance(m, hetconv.HetConv2d)]
    # plus the dense stem, where the native kernel ran it faster (as P = 1)
    assert len(layers) == 3 + plan["native_dense"]
    # and the dense convolutions that run faster with packed weights
    packed = [m for m in fast.modules() if isinstance(m, deploy.PackedConv2d)]
    assert len(plan["layers"]) == len(layers) + len(packed)
    assert len(packed) == plan["packed_dense"] <= (1 if backend == "measure" else 0)
    expected = set(hetconv.BACKENDS) if backend == "measure" else {backend}
    assert {layer.backend for layer in layers} <= expected
    assert not fast.training


def test_optimize_for_inference_registry_model():
    model = _randomise_bn(hetconv.create_model("resnet56_cifar_p2", width=0.5))
    x = torch.randn(2, 3, 16, 16)
    fast = hetconv.optimize_for_inference(model, x, repeats=1)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    assert fast.hetconv_plan["folded_batchnorms"] == 55


def test_optimize_for_inference_without_input_uses_rule():
    fast = hetconv.optimize_for_inference(_handmade())
    assert fast.hetconv_plan["memory_format"] == "channels_last"
    assert {m.backend for m in fast.modules() if isinstance(m, hetconv.HetConv2d)} == {"auto"}


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("graph", [True, False], ids=["fx_graph", "module"])
def test_optimized_model_takes_input_in_either_format(fmt, graph):
    """The optimized model runs its layers on the memory format it was configured for,
    whichever format the caller's input has: its first layer sees that format (no copy
    when the input already has it), outputs match; copies and pickles keep the step (a
    GraphModule's in its graph, another model's in a forward pre-hook)."""
    model = _handmade()
    x = torch.randn(2, 3, 12, 12)
    fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format=fmt,
                                          absorb=graph, fuse=graph)
    assert isinstance(fast, torch.fx.GraphModule) == graph
    want_format = deploy._FORMATS[fmt]
    other = deploy._FORMATS["channels_last" if fmt == "contiguous" else "contiguous"]
    with torch.no_grad():
        want = model(x)
    for twin in (fast, copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        seen = []  # what the root's first submodule to run gets
        handles = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
                   for m in twin.children() if not isinstance(m, deploy.InputFormat)]
        try:
            for given in (x.contiguous(memory_format=other),
                          x.contiguous(memory_format=want_format)):
                for call in (lambda: twin(given), lambda: twin(input=given)):  # or by name
                    seen.clear()
                    with torch.no_grad():
                        torch.testing.assert_close(call(), want, rtol=1e-4, atol=1e-4)
                    assert seen[0].shape == x.shape  # the first layer run got the input
                    assert seen[0].is_contiguous(memory_format=want_format)
        finally:
            for handle in handles:
                handle.remove()
    # optimized again: the copy loses the old step first (else it would be configured and
    # timed in the old format), and gets one step, for its own format
    bare = copy.deepcopy(fast)
    deploy._drop_input_format(bare)
    assert not [m for m in bare.modules() if isinstance(m, deploy.InputFormat)]
    assert not bare._forward_pre_hooks
    seen = []
    handles = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
               for m in bare.children()]
    with torch.no_grad():
        torch.testing.assert_close(bare(x.contiguous(memory_format=other)), want,
                                   rtol=1e-4, atol=1e-4)
    assert seen[0].is_contiguous(memory_format=other)  # the input as given
    for handle in handles:
        handle.remove()
    other_name = "channels_last" if fmt == "contiguous" else "contiguous"
    again = hetconv.optimize_for_inference(fast, x, backend="native", absorb=graph,
                                           fuse=graph, memory_format=other_name)
    steps = [m for m in again.modules() if isinstance(m, deploy.InputFormat)]
    hooks = [h.__self__ for h in again._forward_pre_hooks.values()
             if isinstance(getattr(h, "__self__", None), deploy.InputFormat)]
    assert [s.memory_format for s in steps + hooks] == [other_name]
    step = deploy.InputFormat(fmt)
    already = x.contiguous(memory_format=want_format)
    assert step(already) is already and step.hook(fast, (already,), {}) is None  # no copy
    assert step.hook(fast, (), {"input": already}) is None
    unbatched = x[0]
    assert step(unbatched) is unbatched and step("text") == "text"  # as given
    (moved, extra), kw = step.hook(fast, (x.contiguous(memory_format=other), "extra"),
                                   {"k": 1})
    assert moved.is_contiguous(memory_format=want_format) and torch.equal(moved, x)
    assert extra == "extra" and kw == {"k": 1}
    args, kw = step.hook(fast, (), {"input": x.contiguous(memory_format=other), "k": 1})
    assert args == () and kw["k"] == 1 and kw["input"].is_contiguous(memory_format=want_format)
    assert step.hook(fast, (), {"other": x.contiguous(memory_format=other)}) is None
    with pytest.raises(ValueError, match="memory_format"):
        deploy.InputFormat("nhwc")


def test_optimize_for_inference_bad_arguments():
    model = _handmade()
    with pytest.raises(ValueError, match="backend"):
        hetconv.optimize_for_inference(model, backend="fastest")
    with pytest.raises(ValueError, match="memory_format"):
        hetconv.optimize_for_inference(model, memory_format="nhwc")
    with pytest.raises(TypeError, match="example_input"):
        hetconv.optimize_for_inference(model, [1, 2])


@pytest.mark.parametrize("form", ["grouped", "dense"])
def test_export_module_equals_model(form):
    model = _handmade("shifted")
    x = torch.randn(2, 3, 12, 12)
    exported = deploy.export_module(model, form)
    assert not any(isinstance(m, hetconv.HetConv2d) for m in exported.modules())
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form,pattern", [("grouped", "shifted"), ("grouped", "blocked"),
                                          ("dense", "shifted")])
def test_export_onnx_runs_in_onnxruntime(tmp_path, form, pattern):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _handmade(pattern)
    x = torch.randn(2, 3, 12, 12)
    path = hetconv.export_onnx(model, tmp_path / "m.onnx", x, form=form)
    assert os.path.exists(path) and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    graph = onnx.load(path).graph
    ops = {node.op_type for node in graph.node}
    assert "Conv" in ops and all(node.domain in ("", "ai.onnx") for node in graph.node)
    if form == "grouped":
        assert any(a.name == "group" and a.i > 1 for node in graph.node for a in node.attribute)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 3, 12, 12)  # dynamic batch
    got = torch.from_numpy(session.run(None, {"input": x5.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model(x5), rtol=1e-4, atol=1e-4)


def test_export_onnx_of_a_resnet_is_quiet_and_runs(tmp_path):
    """The stride-2 shortcuts' slices export without the exporter's constant-folding
    warnings (three per slice), and the model runs in onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    from hetconv.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet56_cifar", part=4, width=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = hetconv.export_onnx(model, tmp_path / "r.onnx", x)
    assert not [w for w in caught if "Constant folding" in str(w.message)]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)


def test_export_onnx_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="form"):
        hetconv.export_onnx(_handmade(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), form="sparse")
    with pytest.raises(TypeError, match="example_input"):
        hetconv.export_onnx(_handmade(), tmp_path / "m.onnx", None)


def test_export_onnx_refuses_opsets_without_strided_slices_and_a_directory(tmp_path):
    with pytest.raises(ValueError, match=r"opset must be an int >= 10 \(strided slices"):
        hetconv.export_onnx(_handmade(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), opset=9)
    with pytest.raises(ValueError, match="path must name the .onnx file to write, got the "
                                         "directory"):
        hetconv.export_onnx(_handmade(), tmp_path, torch.randn(1, 3, 8, 8))
    assert os.listdir(tmp_path) == []  # no temporary file left behind either
    # the lowest opset accepted exports a ResNet's stride-2 shortcut slices
    ort = pytest.importorskip("onnxruntime")
    from hetconv.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet56_cifar", part=4, width=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    path = hetconv.export_onnx(model, tmp_path / "r.onnx", x, opset=deploy.MIN_OPSET)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["grouped", "dense"])
def test_export_of_unbatched_input(tmp_path, form):
    """An unbatched (C, H, W) input, which HetConv2d takes, exports as it runs: the channel
    gathers on dim 0 (a layer alone; a model whose permutations are absorbed)."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(2)
    layer = hetconv.HetConv2d(16, 16, 3, part=4, bias=True).eval()
    uncropped = hetconv.HetConv2d(16, 12, 3, padding=0, part=4).eval()  # the centre crops
    model = nn.Sequential(hetconv.HetConv2d(16, 24, 3, part=4), nn.ReLU(),
                          hetconv.HetConv2d(24, 16, 3, stride=2, part=2, bias=True)).eval()
    x = torch.randn(16, 9, 9)
    for k, m in enumerate((layer, uncropped, model)):
        with torch.no_grad():
            want = m(x)
            torch.testing.assert_close(deploy.export_module(m, form)(x), want,
                                       rtol=1e-5, atol=1e-5)
        path = hetconv.export_onnx(m, tmp_path / f"m{k}.onnx", x, form=form)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- native fusion
needs_native = pytest.mark.skipif(not hetconv.native.available(),
                                  reason="native kernel unavailable")


def _fused(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, deploy.NativeFused)]


def _copy_and_reload(model: nn.Module):
    """A deep copy of ``model`` and ``model`` saved and loaded again."""
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return copy.deepcopy(model), torch.load(buf, weights_only=False)


def _planners(model: nn.Module):
    """The modules of an optimized model that keep prepared kernel calls."""
    return [m for m in model.modules()
            if isinstance(m, (deploy.NativeFused, deploy.NativeChain, deploy.NativeSequence))]


@needs_native
@pytest.mark.parametrize("pattern", ["shifted", "blocked"])
def test_optimize_fuses_residual_and_relu_into_native_layers(pattern):
    torch.manual_seed(0)
    model = _randomise_bn(hetconv.create_model("resnet56_cifar",
                                               part=4, width=0.5, pattern=pattern)).eval()
    x = torch.randn(2, 3, 16, 16)
    fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format="contiguous")
    fused = _fused(fast)
    # every block: unit1 conv (+ReLU) and unit2 conv (+ shortcut sum + ReLU); stride-2 layers
    # fall back inside NativeFused but are fused in the graph all the same
    # (and the stem, where the native kernel ran it faster as a P = 1 layer)
    assert fast.hetconv_plan["fused_native"] == len(fused) == 54 + fast.hetconv_plan[
        "native_dense"]
    assert sum(f.residual for f in fused) == 27 and all(f.relu for f in fused)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    plain = hetconv.optimize_for_inference(model, x, backend="native", fuse=False)
    assert plain.hetconv_plan["fused_native"] == 0 and not _fused(plain)


@needs_native
def test_fusion_skips_outputs_used_twice_and_other_backends():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = hetconv.HetConv2d(8, 8, 3, part=4)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y) + y

    torch.manual_seed(1)
    x = torch.randn(2, 8, 8, 8)
    model = Twice().eval()
    fast = hetconv.optimize_for_inference(model, x, backend="native", absorb=False)
    assert fast.hetconv_plan["fused_native"] == 0
    seq = nn.Sequential(hetconv.HetConv2d(8, 8, 3, part=4), nn.ReLU()).eval()
    dense = hetconv.optimize_for_inference(seq, x, backend="dense")
    assert dense.hetconv_plan["fused_native"] == 0
    native = hetconv.optimize_for_inference(seq, x, backend="native")
    assert native.hetconv_plan["fused_native"] == 1
    with torch.no_grad():
        torch.testing.assert_close(native(x), seq(x), rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_a_layer_called_at_two_places_is_fused_at_each_its_own_way(fmt):
    """One HetConv2d called twice, with a residual sum at one place and a ReLU at the other:
    each place gets a fused module of its own (the second replaced the first, and both
    places ran with the ReLU)."""
    class CalledTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = hetconv.HetConv2d(16, 16, 3, part=4, pattern="blocked")

        def forward(self, x):
            a = self.conv(x) + x
            return a + torch.relu(self.conv(a))

    torch.manual_seed(5)
    x = torch.randn(2, 16, 8, 8)
    model = CalledTwice().eval()
    fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format=fmt,
                                          repeats=1)  # check=True: outputs compared
    assert fast.hetconv_plan["fused_native"] == 2
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not deploy._packing_available(), reason="weight packing unavailable")
def test_a_packed_conv_called_at_two_places_keeps_its_relu_outside():
    """A PackedConv2d runs the ReLU after it inside only where it is called once: at its
    other call sites the ReLU would apply too."""
    class CalledTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = deploy.PackedConv2d(nn.Conv2d(8, 8, 3, padding=1).eval())

        def forward(self, x):
            return torch.relu(self.conv(x)) + self.conv(x)

    torch.manual_seed(6)
    model, x = CalledTwice().eval(), torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ref = model(x)
    fused, count = deploy._fuse_packed_relus(model)
    assert count == 0 and not model.conv.relu
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref)

class _WriteBetween(nn.Module):
    """``d(c(x))`` summed with ``op(c(x))``: ``op`` (in place, where ``inplace``) runs after
    ``d`` reads its input and before the sum that ``d`` would be fused with."""

    OPS = {
        "module": lambda m, y: m.relu(y),
        "hardtanh": lambda m, y: m.tanh(y),
        "positional": lambda m, y: F.relu(y, m.inplace),      # the flag by position
        "keyword": lambda m, y: F.hardtanh(y, -0.1, 0.1, inplace=m.inplace),
        "method": lambda m, y: y.relu_() if m.inplace else y.relu(),
        "function": lambda m, y: torch.relu_(y) if m.inplace else torch.relu(y),
    }

    def __init__(self, op: str, inplace: bool = True, pattern: str = "shifted"):
        super().__init__()
        self.op, self.inplace = op, inplace
        self.c = hetconv.HetConv2d(32, 32, 3, part=4, pattern=pattern)
        self.d = hetconv.HetConv2d(32, 32, 3, part=4, pattern=pattern)
        self.relu = nn.ReLU(inplace=inplace)
        self.tanh = nn.Hardtanh(-0.1, 0.1, inplace=inplace)

    def forward(self, x):
        y = self.c(x)
        z = self.d(y)
        return self.OPS[self.op](self, y) + z


@needs_native
@pytest.mark.parametrize("op", list(_WriteBetween.OPS))
def test_fusion_keeps_the_writes_between_a_layer_and_its_sum(op):
    """A layer fused with the sum after it reads its input where the sum was: a write into
    that input in between (an in-place ReLU, ...) keeps the layer and the sum apart."""
    torch.manual_seed(4)
    x = torch.randn(2, 32, 8, 8)
    for inplace in (True, False):
        model = _WriteBetween(op, inplace).eval()
        with torch.no_grad():
            want = model(x)
        fast = hetconv.optimize_for_inference(model, x, backend="native",
                                              memory_format="contiguous")  # checks too
        assert fast.hetconv_plan["fused_native"] == (0 if inplace else 1)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), want, rtol=1e-4, atol=1e-4)


class _WriteInsideARun(nn.Module):
    """Two native layers a chain (``kind="chain"``: the second with a residual sum) or a
    channels-last sequence (``"sequence"``) would run together, with a write into the first
    one's input between them; or an option-A shortcut with a write into its input between
    its pad and its gather (``"shortcut"``)."""

    def __init__(self, kind: str, inplace: bool):
        super().__init__()
        self.kind, self.inplace = kind, inplace
        width = 16 if kind == "shortcut" else 32
        self.c = hetconv.HetConv2d(width, width, 3, part=4, pattern="blocked")
        self.d = hetconv.HetConv2d(width, width, 3, part=4, pattern="blocked")
        self.relu = nn.ReLU(inplace=inplace)
        self.register_buffer("order", torch.randperm(2 * width))

    def forward(self, x):
        x = x * 1.0  # the caller's input is not written
        if self.kind == "shortcut":
            x = F.relu(self.c(x))
            a = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
            x = x.mul_(2.0) if self.inplace else x * 2.0
            return torch.index_select(a, 1, self.order) + x[:, :1, ::2, ::2]
        y = F.relu(self.c(x))
        t = self.relu(x)
        if self.kind == "chain":
            return F.relu(self.d(y) + t)
        return F.relu(self.d(y)) + t


@needs_native
@pytest.mark.parametrize("kind", ["chain", "sequence", "shortcut"])
def test_chains_sequences_and_shortcuts_keep_the_writes_between_their_parts(kind):
    """A chain or sequence reads its inputs where its last layer was, the shortcut module its
    input where its gather was: a write in between keeps them from forming."""
    counts = {"chain": ("chained_native", deploy.NativeChain),
              "sequence": ("sequenced_native", deploy.NativeSequence),
              "shortcut": (None, deploy.ChannelPadShortcut)}
    key, kind_of = counts[kind]
    fmt = "channels_last" if kind == "sequence" else "contiguous"
    torch.manual_seed(5)
    x = torch.randn(4, 16 if kind == "shortcut" else 32, 8, 8)
    for inplace in (True, False):
        model = _WriteInsideARun(kind, inplace).eval()
        with torch.no_grad():
            want = model(x)
        fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format=fmt)
        made = [m for m in fast.modules() if isinstance(m, kind_of)]
        assert bool(made) is not inplace
        if key is not None:
            assert bool(fast.hetconv_plan[key]) is not inplace
        with torch.no_grad():
            torch.testing.assert_close(fast(x.contiguous(memory_format=deploy._FORMATS[fmt])), want,
                                       rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "stride2", "stride3", "float64"])
def test_native_fused_falls_back_where_the_kernel_does_not_apply(layout, monkeypatch):
    torch.manual_seed(2)
    stride = {"stride2": 2, "stride3": 3}.get(layout, 1)
    dtype = torch.float64 if layout == "float64" else torch.float32
    layer = hetconv.HetConv2d(8, 6, 3, stride=stride, part=2, bias=True, backend="native").to(dtype)
    fused = deploy.NativeFused(layer, relu=True, residual=True)
    x = torch.randn(2, 8, 10, 10, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = (10 - 1) // stride + 1
    r = torch.randn(2, 6, out, out, dtype=dtype)
    calls = []
    real = hetconv.native._launch  # every kernel run, planned or not
    monkeypatch.setattr(hetconv.native, "_launch",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        got = fused(x, r)
    with torch.no_grad():
        want = torch.relu(layer(x) + r)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # NCHW, channels_last (converted) and stride 2 run the kernel; stride 3, float64 fall back
    assert bool(calls) == (layout in ("nchw", "channels_last", "stride2"))


@needs_native
def test_native_fused_remembers_its_verdict_per_call_signature(monkeypatch):
    torch.manual_seed(3)
    layer = hetconv.HetConv2d(8, 8, 3, part=2, backend="native").eval()
    fused = deploy.NativeFused(layer, relu=True, residual=False)
    checks, calls = [], []
    real_check, real_run = hetconv.native.unsupported_reason, hetconv.native._launch
    monkeypatch.setattr(hetconv.native, "unsupported_reason",
                        lambda *a, **k: checks.append(1) or real_check(*a, **k))
    monkeypatch.setattr(hetconv.native, "_launch",
                        lambda *a, **k: calls.append(1) or real_run(*a, **k))
    x, x2 = torch.randn(2, 8, 6, 6), torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        for _ in range(3):
            fused(x)
        assert (len(checks), len(calls)) == (1, 3)  # checked once, the kernel ran each time
        fused(x2)
        assert (len(checks), len(calls)) == (2, 4)  # a new input shape is checked again
        layer.backend = "dense"  # the verdict depends on the backend: no stale "native"
        torch.testing.assert_close(fused(x), torch.relu(layer(x)))
        assert len(calls) == 4
        layer.backend = "native"
        fused(x)
        assert (len(checks), len(calls)) == (2, 5)  # back to the first verdict


@needs_native
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_native_fused_prepared_calls_follow_every_weight_change(layout, monkeypatch):
    """Inference calls of a known signature reuse one prepared kernel call (ForwardPlan), and
    every way a weight can change after it was prepared shows in the next result."""
    torch.manual_seed(4)
    cl = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    layer = hetconv.HetConv2d(16, 32, 3, part=4, bias=True, backend="native").eval()
    fused = deploy.NativeFused(layer, relu=True, residual=True)
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=cl)
    r = torch.randn(2, 32, 9, 9).contiguous(memory_format=cl)
    builds, full = [], []
    real_build, real_conv = hetconv.native.ForwardPlan.build, hetconv.native.native_conv2d
    monkeypatch.setattr(hetconv.native.ForwardPlan, "build",
                        lambda *a, **k: builds.append(1) or real_build(*a, **k))
    monkeypatch.setattr(hetconv.native, "native_conv2d",
                        lambda *a, **k: full.append(1) or real_conv(*a, **k))

    def check():
        with torch.no_grad():
            got = fused(x, r)
            want = torch.relu(F.conv2d(x, layer.dense_weight(), layer.bias, padding=1) + r)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert got.is_contiguous(memory_format=cl)

    for _ in range(3):
        check()
    assert (len(builds), len(full)) == (1, 0)  # prepared once, reused
    with torch.no_grad():
        layer.weight_k.mul_(-1.5)  # in place
        layer.bias.add_(0.25)
    check()
    layer.weight_1.data = torch.randn_like(layer.weight_1)  # .data replaced
    check()
    layer.weight_k = nn.Parameter(torch.randn_like(layer.weight_k))  # another tensor
    check()
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
    check()
    assert len(builds) == 5 and not full
    x = torch.randn(3, 16, 7, 7).contiguous(memory_format=cl)  # another shape: its own plan
    r = torch.randn(3, 32, 7, 7).contiguous(memory_format=cl)
    check()
    assert len(builds) == 6
    # under autograd nothing is prepared: the recorded path, with gradients
    xg = x.clone().requires_grad_()
    out = fused(xg, r)
    out.sum().backward()
    assert len(builds) == 7 and len(full) == 1 and xg.grad is not None
    want = torch.relu(F.conv2d(xg, layer.dense_weight(), layer.bias, padding=1) + r)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


@needs_native
def test_optimized_model_copies_and_saves_after_calls():
    """Prepared kernel calls (raw pointers) stay out of copies and pickles; the copies compute
    the same and prepare their own."""
    torch.manual_seed(5)
    model = hetconv.create_model("resnet56_cifar", part=4, width=0.5).eval()
    x = torch.randn(2, 3, 16, 16)
    fast = hetconv.optimize_for_inference(model, x, backend="native", memory_format="contiguous")
    with torch.no_grad():
        want = fast(x)
        assert any(f.__dict__.get("_plans") for f in _planners(fast))
        for other in _copy_and_reload(fast):
            assert not any(f.__dict__.get("_plans") for f in _planners(other))
            torch.testing.assert_close(other(x), want)
            assert any(f.__dict__.get("_plans") for f in _planners(other))


def _pooled_model() -> nn.Sequential:
    """Native HetConv layers followed by 2x2 max-pools (with and without ceil_mode; one
    through an nn.Identity), and by a 3x3 one the kernel does not take."""
    return _randomise_bn(nn.Sequential(
        hetconv.HetConv2d(16, 32, 3, part=4), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        hetconv.HetConv2d(32, 32, 3, part=4, bias=True), nn.ReLU(), nn.Identity(),
        nn.MaxPool2d(2, 2, ceil_mode=True),
        hetconv.HetConv2d(32, 32, 3, part=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Flatten()))


@needs_native
def test_optimize_fuses_2x2_max_pools_into_channels_last_layers(monkeypatch):
    torch.manual_seed(11)
    model = _pooled_model()
    cl = torch.channels_last
    x = torch.randn(3, 16, 16, 16)
    # (absorb=False: "shifted" stays, which the channels-last kernel runs at 32 filters, P 4)
    fast = hetconv.optimize_for_inference(model, x, backend="native", absorb=False,
                                          memory_format="channels_last")
    assert fast.hetconv_plan["fused_pools"] == 2
    pooled = [f for f in _fused(fast) if f.pool is not None]
    assert len(pooled) == 2 and all(f.relu for f in pooled)
    assert sum(isinstance(m, nn.MaxPool2d) and m.kernel_size == 3 for m in fast.modules()) == 1
    # a copy: no prepared sequence yet (the check call made one), each layer's launch seen;
    # no InputFormat step: the layers themselves get NCHW input below
    fast = copy.deepcopy(fast)
    fast.hetconv_input_format = nn.Identity()
    shapes = []
    real = hetconv.native._launch
    monkeypatch.setattr(hetconv.native, "_launch",
                        lambda x, shape, *a: shapes.append(shape) or real(x, shape, *a))
    with torch.no_grad():
        for inp in (x.contiguous(memory_format=cl), x):
            want = model(inp)
            shapes.clear()
            torch.testing.assert_close(fast(inp), want, rtol=1e-4, atol=1e-4)
            # channels_last: the kernel writes the pooled activations only; NCHW input runs
            # the NCHW kernel (unpooled), then the pool
            assert shapes[:2] == ([(3, 32, 8, 8), (3, 32, 4, 4)] if inp is not x
                                  else [(3, 32, 16, 16), (3, 32, 8, 8)]), shapes
        # odd sizes: the first pool's output, 7x7, is pooled after the second layer
        odd = torch.randn(2, 16, 14, 14).contiguous(memory_format=cl)
        want = model(odd)
        shapes.clear()
        torch.testing.assert_close(fast(odd), want, rtol=1e-4, atol=1e-4)
        assert shapes[:2] == [(2, 32, 7, 7), (2, 32, 7, 7)], shapes
    # autograd: the layer, then the pool, as in the model
    xs = [x.clone().contiguous(memory_format=cl).requires_grad_() for _ in range(2)]
    g = torch.randn_like(model(xs[1]))
    got = torch.autograd.grad(fast(xs[0]), [xs[0]], g)
    want = torch.autograd.grad(model(xs[1]), [xs[1]], g)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for other in _copy_and_reload(fast):
            torch.testing.assert_close(other(x.contiguous(memory_format=cl)), model(x),
                                       rtol=1e-4, atol=1e-4)
    # NCHW models keep their pools: the NCHW kernel (and its chains) does not pool
    nchw = hetconv.optimize_for_inference(model, x, backend="native", memory_format="contiguous")
    assert nchw.hetconv_plan["fused_pools"] == 0
    assert not any(f.pool is not None for f in _fused(nchw))


def _sequenced_model(seed: int, batch: int):
    """The pooled model, a channels-last input and the model optimized for it on the native
    backend, with its NativeSequence modules: ``(model, x, fast, sequences)``."""
    torch.manual_seed(seed)
    model = _pooled_model()
    x = torch.randn(batch, 16, 16, 16).contiguous(memory_format=torch.channels_last)
    fast = hetconv.optimize_for_inference(model, x, backend="native", absorb=False,
                                          memory_format="channels_last")
    return model, x, fast, [m for m in fast.modules() if isinstance(m, deploy.NativeSequence)]


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 5, 7, 9), (3, 2, 1, 4), (0, 4, 6, 6),
                                   (2, 3, 2, 2)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_nchw_2x2_max_pool_by_maxima_equals_the_pool(shape, ceil_mode):
    torch.manual_seed(3)
    x = torch.randn(*shape)
    if x.numel():
        x.view(-1)[::7] = float("nan")  # NaN wins its window, as in the pool
        x.view(-1)[1::5] = 0.0  # ties
    pool = hetconv.layers.MaxPool2x2(ceil_mode)
    if min(shape[2:]) < 2 and not ceil_mode:  # no window: the pool's error, not an empty output
        assert hetconv.layers.max_pool_2x2(x, ceil_mode) is None
        with pytest.raises(RuntimeError, match="[Oo]utput size"):
            pool(x)
        return
    want = F.max_pool2d(x, 2, ceil_mode=ceil_mode)
    got = hetconv.layers.max_pool_2x2(x, ceil_mode)
    odd = shape[2] % 2 or shape[3] % 2
    if ceil_mode and odd:
        assert got is None  # the pool's partial windows: left to it
        return
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
    # the module: the same values on every path, nn.MaxPool2d's gradients
    ref = nn.MaxPool2d(2, 2, ceil_mode=ceil_mode)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        assert hetconv.layers.max_pool_2x2(inp, ceil_mode) is None or inp.is_contiguous()
        with torch.no_grad():
            out = pool(inp)
        assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref(inp)))
    a, b = (torch.randn(*shape).requires_grad_() for _ in range(2))
    with torch.no_grad():
        b.copy_(a)
    assert hetconv.layers.max_pool_2x2(a, ceil_mode) is None  # autograd: the pool itself
    pool(a).sum().backward()
    ref(b).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_optimize_puts_fast_2x2_pools_in_place_of_the_slow_nchw_ones(monkeypatch):
    """An NCHW model's 2x2 max-pools run as two elementwise maxima (torch's NCHW max-pool
    kernel was 6-14x slower); other pools stay; the outputs are the model's."""
    torch.manual_seed(4)
    model = nn.Sequential(
        hetconv.HetConv2d(4, 8, 3, part=2), nn.ReLU(), nn.MaxPool2d(2),
        hetconv.HetConv2d(8, 8, 3, part=2), nn.ReLU(), nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.MaxPool2d(3, 1), nn.Flatten()).eval()
    x = torch.randn(2, 4, 16, 16)
    fast = hetconv.optimize_for_inference(model, x, backend="auto", memory_format="contiguous",
                                          fuse=False, absorb=False)
    assert fast.hetconv_plan["fast_pools"] == 2
    assert [type(m) for m in fast.modules() if isinstance(m, nn.MaxPool2d)] == \
        [hetconv.layers.MaxPool2x2, hetconv.layers.MaxPool2x2, nn.MaxPool2d]
    pooled = []
    real = F.max_pool2d
    monkeypatch.setattr(F, "max_pool2d", lambda inp, *a, **k: pooled.append(
        tuple(inp.shape)) or real(inp, *a, **k))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    # the model's three pools, the optimized one's 3x3 one only
    assert pooled[3:] == [(2, 8, 4, 4)], pooled


@needs_native
def test_one_channel_input_runs_the_channels_last_sequence():
    """A one-channel image batch is contiguous in both layouts and torch keeps its NCHW
    strides when asked for channels_last: the optimized model gives it channels-last
    strides, so its native layers, the one-channel stem first, run as one prepared
    channels-last sequence (before, the stem ran the NCHW kernel and handed NCHW
    activations on: the sequence could not prepare, every layer ran its slow path)."""
    torch.manual_seed(5)
    model = nn.Sequential(
        hetconv.HetConv2d(1, 16, 3, part=1, bias=True), nn.ReLU(),
        hetconv.HetConv2d(16, 32, 3, part=4), nn.ReLU(), nn.MaxPool2d(2),
        hetconv.HetConv2d(32, 32, 3, part=4, bias=True), nn.ReLU(), nn.Flatten()).eval()
    x = torch.randn(3, 1, 16, 16)
    fast = hetconv.optimize_for_inference(model, x, backend="native", absorb=False,
                                          memory_format="channels_last")
    seq, = [m for m in fast.modules() if isinstance(m, deploy.NativeSequence)]
    assert len(seq.layers) == 3
    with torch.no_grad():
        want = model(x)
        for given in (x, x.contiguous(memory_format=torch.channels_last),
                      torch.empty(x.shape, memory_format=torch.channels_last).copy_(x)):
            torch.testing.assert_close(fast(given), want, rtol=1e-4, atol=1e-4)
    xin = deploy.in_format(x, torch.channels_last)
    assert isinstance(seq._plan_for((tuple(xin.shape), xin.stride())), deploy._SequenceSteps)
    # the layout of one channel: stride(1) tells (1: channels-last), set by views
    nchw = deploy.in_format(xin, torch.contiguous_format)
    assert xin.data_ptr() == x.data_ptr() == nchw.data_ptr()  # no copy
    assert xin.stride(1) == 1 and nchw.stride(1) == 256
    assert torch.equal(xin, x) and torch.equal(nchw, x)
    assert hetconv.native._is_channels_last(xin)
    assert not hetconv.native._is_channels_last(nchw)
    assert not hetconv.native._is_channels_last(x.contiguous(memory_format=torch.channels_last))
    # views that trace as views: a traced step reads another input size right
    for fmt in ("channels_last", "contiguous"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the tracer's notes on Python conditions)
            traced = torch.jit.trace(deploy.InputFormat(fmt), torch.randn(2, 1, 16, 16))
        other = torch.randn(3, 1, 20, 12)
        assert torch.equal(traced(other), other)
        assert traced(other).stride(1) == (1 if fmt == "channels_last" else 240)


@needs_native
def test_channels_last_layers_in_a_row_run_as_one_sequence(monkeypatch):
    """Native layers each reading the one before (pools fused) become one NativeSequence:
    its first call prepares by running the layers' plans, later calls run the plans alone,
    not the modules; the results are the modules' bit for bit and follow weight updates;
    NCHW input, odd sizes, autograd and copies run correctly."""
    model, x, fast, seqs = _sequenced_model(12, batch=3)
    cl = torch.channels_last
    assert fast.hetconv_plan["sequenced_native"] == 3 and len(seqs) == 1
    assert len(seqs[0].layers) == 3
    assert not any(isinstance(m, deploy.NativeChain) for m in fast.modules())
    calls = []
    real = deploy.NativeFused.forward
    monkeypatch.setattr(deploy.NativeFused, "forward",
                        lambda self, *a: calls.append(self) or real(self, *a))
    sequenced = deploy.NativeSequence._sequenced

    def by_modules(inp):
        monkeypatch.setattr(deploy.NativeSequence, "_sequenced", lambda self, x: None)
        try:
            return fast(inp)
        finally:
            monkeypatch.setattr(deploy.NativeSequence, "_sequenced", sequenced)

    weight = seqs[0].layers[1].layer.weight_k
    with torch.no_grad():
        first, second = fast(x), fast(x)
        assert calls == []
        want = by_modules(x)
        assert len(calls) == 3 and torch.equal(first, want) and torch.equal(second, want)
        torch.testing.assert_close(second, model(x), rtol=1e-4, atol=1e-4)
        weight.mul_(0.5)  # updated in place: prepared again, and followed
        calls.clear()
        updated = fast(x)
        assert calls == [] and not torch.equal(updated, want)
        assert torch.equal(updated, by_modules(x))
        weight.mul_(2.0)
        # a layer moved to another backend: the modules (which run that backend)
        seqs[0].layers[2].layer.backend = "fused"
        calls.clear()
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
        assert len(calls) == 3
        seqs[0].layers[2].layer.backend = "native"
        calls.clear()
        assert torch.equal(fast(x), want) and calls == []
        # NCHW input (the NCHW kernel does not pool) and odd sizes (a 7x7 output the kernel
        # cannot pool): the modules (the sequence itself gets the NCHW input)
        fast.hetconv_input_format = nn.Identity()
        for inp in (x.contiguous(), torch.randn(2, 16, 14, 14).contiguous(memory_format=cl)):
            calls.clear()
            torch.testing.assert_close(fast(inp), model(inp), rtol=1e-4, atol=1e-4)
            assert calls
    # autograd: the modules, with the model's gradients
    xs = [x.clone().requires_grad_() for _ in range(2)]
    got, = torch.autograd.grad(fast(xs[0]).sum(), [xs[0]])
    want, = torch.autograd.grad(model(xs[1]).sum(), [xs[1]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for other in _copy_and_reload(fast):
            torch.testing.assert_close(other(x), model(x), rtol=1e-4, atol=1e-4)


@needs_native
def test_sequence_runs_its_layers_in_one_kernel_call(monkeypatch):
    """After its first call a sequence of channels-last kernel calls runs them in one C call
    (no per-layer launch), bit-equal to the modules; it follows a layer's HetConv2d being
    replaced; it runs in grad mode where nothing requires a gradient, and steps aside where
    the input does; empty batches; the C entry refuses layers whose shapes do not chain."""
    model, x, fast, (seq,) = _sequenced_model(14, batch=2)
    calls, lib = [], hetconv.native._load()

    class Counting:  # the library, counting the sequence entry's calls
        def __getattr__(self, name):
            fn = getattr(lib, name)
            return (lambda *a: calls.append(name) or fn(*a)) if name.endswith("sequence") else fn

    with torch.no_grad():
        want, empty = fast(x), fast(x[:0])  # each prepares
        entry = seq._plans[(tuple(x.shape), x.stride())]
        assert isinstance(entry.seq, hetconv.native.SequencePlan)
        monkeypatch.setattr(hetconv.native, "_load", lambda: Counting())
        monkeypatch.setattr(hetconv.native, "_launch", None)  # any per-layer launch fails
        got = fast(x)
        assert calls == ["hetconv_nhwc_sequence"] and torch.equal(got, want)
        assert empty.shape == fast(x[:0]).shape == (0,) + want.shape[1:]
        assert calls == ["hetconv_nhwc_sequence"]  # an empty batch: no kernel call
        monkeypatch.undo()
    modules_calls = []
    real = deploy.NativeFused.forward
    monkeypatch.setattr(deploy.NativeFused, "forward",
                        lambda self, *a: modules_calls.append(self) or real(self, *a))
    # grad mode, nothing requiring a gradient (the optimized model's weights do not): the
    # sequence; an input requiring one: the modules, with the model's gradient
    assert torch.is_grad_enabled() and torch.equal(fast(x), want) and modules_calls == []
    xg = x.clone().requires_grad_()
    got, = torch.autograd.grad(fast(xg).sum(), [xg])
    assert modules_calls
    xm = x.clone().requires_grad_()
    ref, = torch.autograd.grad(model(xm).sum(), [xm])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # a kept layer's weight made to require a gradient (the same tensor: the kept calls
    # still hold): the modules, with that weight's gradient; then the sequence again
    w = seq.layers[0].layer.weight_k
    modules_calls.clear()
    w.requires_grad_(True)
    try:
        out = fast(x)
        assert modules_calls and out.requires_grad
        gw, = torch.autograd.grad(out.sum(), [w])
        assert gw.abs().sum() > 0
    finally:
        w.requires_grad_(False)
    modules_calls.clear()
    assert torch.equal(fast(x), want) and modules_calls == []
    # a layer's HetConv2d replaced: prepared again for the new one
    with torch.no_grad():
        old = seq.layers[1].layer
        new = copy.deepcopy(old)
        new.weight_k.mul_(-1.0)
        seq.layers[1].layer = new
        changed = fast(x)
        assert not torch.equal(changed, want)
        seq.layers[1].layer = old
        assert torch.equal(fast(x), want)
    # the C entry checks that each layer reads the previous one's output
    plans = entry.plans
    assert hetconv.native.SequencePlan.build(plans[::-1]) is None
    ptrs = (ctypes.c_void_p * len(plans))(*(ctypes.addressof(p.call.args) for p in plans[::-1]))
    assert lib.hetconv_nhwc_sequence(ptrs, len(plans), 0, 0, 0, 0, 1) == -1


@needs_native
def test_sequence_keeps_its_scratch_between_calls():
    """The layers' intermediate outputs go to one buffer kept between calls: the largest
    intermediate output twice, grown for a larger input, not shrunk; a call that finds it
    taken (another thread's) leaves it alone and uses its own; copies and pickles leave it
    out."""
    model, x, fast, (seq,) = _sequenced_model(15, batch=2)
    x4 = torch.randn(4, *x.shape[1:]).contiguous(memory_format=torch.channels_last)

    def expected_bytes(inp):  # from the layers run as modules: all outputs but the last
        sizes = []
        for layer in seq.layers:
            inp = layer(inp)
            sizes.append(inp.numel())
        return max(sizes[:-1]) * (2 if len(sizes) > 2 else 1) * 4

    with torch.no_grad():
        want, want4 = model(x), model(x4)
        first = fast(x)  # prepares
        assert seq.scratch_bytes == 0 or seq.scratch_bytes == expected_bytes(x)
        torch.testing.assert_close(fast(x), first, rtol=0, atol=0)
        assert seq.scratch_bytes == expected_bytes(x) > 0
        ptr = seq._scratch._buf.data_ptr()
        assert torch.equal(fast(x), first) and seq._scratch._buf.data_ptr() == ptr
        torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-4)
        fast(x4)
        got4 = fast(x4)
        assert seq.scratch_bytes == expected_bytes(x4) > expected_bytes(x)
        torch.testing.assert_close(got4, want4, rtol=1e-4, atol=1e-4)
        big = seq._scratch._buf.data_ptr()
        assert torch.equal(fast(x), first) and seq._scratch._buf.data_ptr() == big
        # taken by another call: this one computes the same without touching it
        scratch = seq._scratch
        assert scratch._lock.acquire(blocking=False)
        try:
            scratch._buf.fill_(float("nan"))
            assert torch.equal(fast(x), first)
            assert scratch._buf.isnan().all()
        finally:
            scratch._lock.release()
        assert torch.equal(fast(x), first)
    # a failed allocation (out of memory) leaves the buffer free for the next call
    fresh = hetconv.native.Scratch()
    with pytest.raises(RuntimeError):
        fresh.take(-1)
    assert fresh.take(8) is not None and fresh.nbytes == 32
    fresh.give_back()
    clone = copy.deepcopy(fast)
    (cseq,) = [m for m in clone.modules() if isinstance(m, deploy.NativeSequence)]
    assert cseq.scratch_bytes == 0 and "_scratch" in seq.__dict__
    restored = pickle.loads(pickle.dumps(seq))
    assert restored.scratch_bytes == 0
    with torch.no_grad():
        assert torch.equal(clone(x), first) and torch.equal(clone(x), first)
        assert cseq.scratch_bytes == expected_bytes(x)


@needs_native
def test_sequence_pass_takes_identities_between_layers():
    """nn.Identity nodes between two layers go with them into the sequence; a layer whose
    output is also used elsewhere ends its run."""
    torch.manual_seed(13)
    layers = [deploy.NativeFused(hetconv.HetConv2d(16, 16, 3, part=4, backend="native"),
                                 True, False) for _ in range(3)]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = layers
            self.keep = nn.Identity()

        def forward(self, x):
            y = self.b(self.keep(self.a(x)))
            return self.c(y) + y  # b's output used twice: the run ends at b

    class Leaves(torch.fx.Tracer):  # the layers as one node each, as fusion leaves them
        def is_leaf_module(self, m, qualname):
            return isinstance(m, deploy.NativeFused) or super().is_leaf_module(m, qualname)

    model = Model().eval()
    gm = torch.fx.GraphModule(model, Leaves().trace(model))
    assert deploy._sequence_native(gm) == 2
    seqs = [m for m in gm.modules() if isinstance(m, deploy.NativeSequence)]
    assert len(seqs) == 1 and list(seqs[0].layers) == layers[:2]
    assert not any(n.op == "call_module" and n.target == "keep" for n in gm.graph.nodes)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(gm(x), gm(x))
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_native_sequence_refuses_layers_it_cannot_run():
    layer = hetconv.HetConv2d(8, 8, 3, part=2)
    with pytest.raises(ValueError, match="at least two NativeFused layers without residual"):
        deploy.NativeSequence([deploy.NativeFused(layer, True, False)])
    with pytest.raises(ValueError, match="without residual"):
        deploy.NativeSequence([deploy.NativeFused(layer, True, False),
                               deploy.NativeFused(layer, True, True)])


def test_relu_after_finds_the_convs_only_a_relu_uses():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
            self.fold, self.relu = nn.Identity(), nn.ReLU()

        def forward(self, x):
            x = self.relu(self.fold(self.a(x)))  # a: through an Identity (a folded BN)
            x = F.relu(self.b(x))                 # b: the functional ReLU
            y = self.c(x)                         # c: its output used twice
            x = torch.relu(y) + y
            return torch.sigmoid(self.d(x))       # d: not a ReLU

    model = Model()
    assert deploy._relu_after(model) == {model.a, model.b}

    class Untraceable(Model):
        def forward(self, x):
            return self.relu(self.a(x)) if x.sum() > 0 else x
    assert deploy._relu_after(Untraceable()) == set()


@needs_native
def test_optimize_fuses_functional_max_pools_too():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = hetconv.HetConv2d(16, 32, 3, part=4)
            self.b = hetconv.HetConv2d(32, 32, 3, part=4)
            self.c = hetconv.HetConv2d(32, 32, 3, part=2)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.a(x)), 2)                    # fused
            x = torch.max_pool2d(torch.relu(self.b(x)), 2, 2)         # fused
            return F.max_pool2d(torch.relu(self.c(x)), 3, 2, ceil_mode=True)  # not: 3x3

    torch.manual_seed(12)
    model = Functional().eval()
    x = torch.randn(2, 16, 16, 16)
    fast = hetconv.optimize_for_inference(model, x, backend="native", absorb=False,
                                          memory_format="channels_last")
    assert fast.hetconv_plan["fused_pools"] == 2
    pools = [f.pool for f in _fused(fast) if f.pool is not None]
    assert all(deploy.poolable(p) for p in pools) and len(pools) == 2
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)),
                                   model(x), rtol=1e-4, atol=1e-4)
    # what does not describe a 2x2 pool of stride 2 is left alone
    graph = torch.fx.symbolic_trace(nn.Sequential(nn.MaxPool2d(2)))
    node = [n for n in graph.graph.nodes if n.op == "call_module"][0]
    assert deploy._pool_of(node, dict(graph.named_modules())) is not None
    gm = deploy._traced(Functional())
    calls = [n for n in gm.graph.nodes
             if n.op == "call_function" and n.target in (F.max_pool2d, torch.max_pool2d)]
    got = [deploy._pool_of(n, {}) for n in calls]
    assert [g is not None for g in got] == [True, True, False]


def test_native_fused_refuses_a_pool_it_cannot_fuse():
    layer = hetconv.HetConv2d(16, 16, 3, part=4, backend="native")
    for pool in (nn.MaxPool2d(3, 2), nn.MaxPool2d(2, 1), nn.MaxPool2d(2, padding=1),
                 nn.MaxPool2d(2, return_indices=True), nn.AvgPool2d(2)):
        with pytest.raises(ValueError, match="pool must be an nn.MaxPool2d of kernel 2"):
            deploy.NativeFused(layer, True, False, pool)
    assert deploy.poolable(nn.MaxPool2d((2, 2), ceil_mode=True))


def test_forward_plan_refuses_what_it_cannot_keep():
    layer = hetconv.HetConv2d(8, 16, 3, part=2, bias=True)
    args = (layer.weight_k, layer.weight_1, layer.bias, layer.pattern, False, None, 1)
    x = torch.randn(1, 8, 6, 6)
    build = hetconv.native.ForwardPlan.build
    assert build(x, *args) is None  # autograd would record the call (weights require grad)
    with torch.no_grad():
        assert build(x.double(), *args) is None
        assert build(x, *args[:-1], 3) is None
        plan = build(x, *args)
        assert plan is not None
        assert plan.run(torch.randn(2, 8, 6, 6), None, *args[:3]) is None  # another shape
        assert plan.run(x, None, layer.weight_k.clone(), *args[1:3]) is None  # other tensors
    assert plan.run(x, None, *args[:3]) is None  # autograd recording
    with torch.inference_mode():
        w = [t.clone() for t in args[:3]]
        assert build(x, *w, *args[3:]) is None  # inference-mode weights are never cached


def test_backend_measurement_times_each_backend_in_steady_state(monkeypatch):
    """Every timed call of a backend follows an untimed call of the same backend, so none is
    timed in the wake of another (the bias `hetconv bench --settle` removes)."""
    layer = hetconv.HetConv2d(16, 16, 3, part=4)
    x = torch.randn(2, 16, 8, 8)
    calls = []
    original = deploy.HF.het_conv2d

    def recording(*args):
        calls.append(args[-1])
        return original(*args)

    monkeypatch.setattr(deploy.HF, "het_conv2d", recording)
    for prune in (0, deploy.DECISION_PRUNE):  # off: every backend every round
        monkeypatch.setattr(deploy, "DECISION_PRUNE", prune)
        calls.clear()
        best, medians = deploy._fastest_backend(layer, x, repeats=3)
        assert best in hetconv.BACKENDS and set(medians) == set(hetconv.BACKENDS)
        timed = calls[len(hetconv.BACKENDS):]  # after one warm-up call each
        if not prune:
            assert len(timed) == 2 * 3 * len(hetconv.BACKENDS)
        assert all(a == b for a, b in zip(timed[::2], timed[1::2]))


@pytest.mark.skipif(not hetconv.native.available(), reason="native kernel unavailable")
def test_measured_layers_see_the_layout_the_chosen_layers_upstream_produce(monkeypatch):
    """Layers are measured in execution order, each on the input the layers already chosen
    produce. Here the rule runs the wide first layer on the channels-last kernel (its output
    channels_last); chosen "native" on NCHW input, it hands NCHW on, and the second layer is
    timed on that."""
    torch.manual_seed(3)
    model = nn.Sequential(hetconv.HetConv2d(128, 128, 3, part=4), nn.ReLU(),
                          hetconv.HetConv2d(128, 128, 3, part=4)).eval()
    x = torch.randn(2, 128, 6, 6)
    rule_inputs = deploy._capture_inputs(model, x)
    assert rule_inputs[model[2]].is_contiguous(memory_format=torch.channels_last)
    seen = []

    def fake(layer, xin, repeats):
        seen.append((layer, xin.is_contiguous()))
        return "native", {"native": 0.0}
    monkeypatch.setattr(deploy, "_fastest_backend", fake)
    fast = hetconv.optimize_for_inference(model, x, memory_format="contiguous", absorb=False,
                                          fuse=False)
    assert [(layer.in_channels, nchw) for layer, nchw in seen] == [(128, True), (128, True)]
    assert seen[0][0] is not seen[1][0]
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not hetconv.native.available(), reason="native kernel unavailable")
@pytest.mark.parametrize("channels, choice, captures, nchw_after", [
    # every layer keeps its backend: the first capture serves them all (the channels-last
    # kernel of "auto" hands channels_last on)
    (128, "auto", 1, False),
    # another backend, NCHW out as "auto" gave on these narrow layers: nothing changes
    (16, "dense", 1, True),
    # NCHW out where "auto" handed channels_last on: captured again after each of the first
    # two layers (nothing follows the last)
    (128, "native", 3, True),
])
def test_measurement_captures_again_only_after_a_layout_change(monkeypatch, channels, choice,
                                                               captures, nchw_after):
    """Measuring in execution order costs a forward pass per layer only where a layer's
    chosen backend changes the layout of what it hands on."""
    torch.manual_seed(5)
    model = nn.Sequential(*[hetconv.HetConv2d(channels, channels, 3, part=4)
                            for _ in range(3)]).eval()
    x = torch.randn(2, channels, 6, 6)
    calls = []
    capture = deploy._capture_inputs

    def counting(model, example_input, kinds=(hetconv.HetConv2d,), strides=None):
        calls.append(kinds)
        return capture(model, example_input, kinds, strides)
    monkeypatch.setattr(deploy, "_capture_inputs", counting)
    seen = []

    def fake(layer, xin, repeats):
        seen.append(xin.is_contiguous())
        return choice, {choice: 0.0}
    monkeypatch.setattr(deploy, "_fastest_backend", fake)
    fast = hetconv.optimize_for_inference(model, x, memory_format="contiguous", absorb=False,
                                          fuse=False)
    assert calls.count((hetconv.HetConv2d,)) == captures
    assert seen == [True] + [nchw_after] * 2
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not hetconv.native.available(), reason="native kernel unavailable")
def test_auto_is_timed_where_it_changes_the_input_layout(monkeypatch):
    """"auto" runs wide layers on NCHW input on the channels-last kernel after a layout
    change, which no named backend does on that input: it is a candidate there, and only
    there."""
    timed = []
    monkeypatch.setattr(deploy, "time_interleaved", lambda fns, **kw: timed.append(sorted(fns))
                        or {k: Timing.from_samples([1.0]) for k in fns})
    layer = hetconv.HetConv2d(128, 128, 3, part=4).eval()
    x = torch.randn(2, 128, 6, 6)
    for inp, has_auto in ((x, True), (x.contiguous(memory_format=torch.channels_last), False)):
        deploy._fastest_backend(layer, inp, 1)
        assert ("auto" in timed[-1]) == has_auto
        assert set(timed[-1]) >= set(hetconv.BACKENDS)


# ---------------------------------------------------------------------------
# Dense convolutions with packed weights
# ---------------------------------------------------------------------------

needs_packing = pytest.mark.skipif(not deploy._packing_available(),
                                   reason="this torch has no oneDNN weight packing")


def _packed_calls(monkeypatch):
    """Count the calls that pack weights (the real op runs)."""
    calls = []
    real = deploy._pack_weight

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(deploy, "_pack_weight", counting)
    return calls


@needs_packing
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_packed_conv_with_relu_runs_it_in_the_convolution(fmt, monkeypatch):
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 16, 3, padding=1).eval()
    packed = deploy.PackedConv2d(conv)
    packed.relu = True
    assert repr(packed).endswith("relu=True)")
    attrs = []
    real = torch.ops.mkldnn._convolution_pointwise

    class Ops:  # the namespace the module calls through, recording the fused op's attr
        @staticmethod
        def _convolution_pointwise(*args):
            attrs.append(args[7])
            return real(*args)
    monkeypatch.setattr(torch.ops, "mkldnn", type("mkldnn", (), {
        "_convolution_pointwise": Ops._convolution_pointwise,
        "_reorder_convolution_weight": torch.ops.mkldnn._reorder_convolution_weight}))
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=fmt)
    with torch.no_grad():
        got = packed(x)
        want = torch.relu(conv(x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=fmt) and (got == 0).any() and attrs == ["relu"]
    # gradients: the plain convolution, then F.relu
    xg = x.clone().requires_grad_()
    y = packed(xg)
    (gx,) = torch.autograd.grad(y, xg, torch.ones_like(y))
    xr = x.clone().requires_grad_()
    (rx,) = torch.autograd.grad(torch.relu(conv(xr)), xr, torch.ones_like(y))
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    assert attrs == ["relu"]


@needs_packing
@pytest.mark.parametrize("kw", [
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
    dict(in_channels=8, out_channels=12, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=8, out_channels=8, kernel_size=3, padding=2, dilation=2),
    dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),
    dict(in_channels=8, out_channels=16, kernel_size=(1, 3), padding=(0, 1), groups=2),
    dict(in_channels=8, out_channels=4, kernel_size=1),
    dict(in_channels=3, out_channels=16, kernel_size=5, stride=2, padding=0),
])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_packed_conv_matches_conv2d_and_keeps_the_memory_format(kw, fmt, monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kw).eval()
    packed = deploy.PackedConv2d(conv)
    # the same convolution built from its kernel, as F.conv2d takes it
    twin = deploy.PackedConv2d.from_weight(conv.weight.detach(), conv.bias, conv.stride,
                                           conv.padding, conv.dilation, conv.groups)
    assert repr(twin) == repr(packed)
    with torch.no_grad():
        x = torch.randn(2, kw["in_channels"], 11, 9).contiguous(memory_format=fmt)
        torch.testing.assert_close(twin(x), conv(x), rtol=1e-5, atol=1e-5)
    calls = _packed_calls(monkeypatch)
    for batch in (1, 3):
        x = torch.randn(batch, kw["in_channels"], 11, 9).contiguous(memory_format=fmt)
        with torch.no_grad():
            want = conv(x)
            for _ in range(2):
                got = packed(x.clone())  # another tensor of the same shape
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                assert got.is_contiguous(memory_format=fmt)
    assert len(calls) == 2  # once per input shape, not per call
    # views dense in neither layout: the plain convolution, whose output layout they get
    x = torch.randn(2, kw["in_channels"], 12, 10).contiguous(memory_format=fmt)[:, :, 1::2]
    with torch.no_grad():
        got, want = packed(x), conv(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.stride() == want.stride() and len(calls) == 2


@needs_packing
def test_packed_conv_follows_weight_changes_and_falls_back_for_gradients(monkeypatch):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    packed = deploy.PackedConv2d(conv)
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        packed(x)
        packed.weight.mul_(-2)  # in place: the packed copy is stale
        conv.weight.mul_(-2)
        torch.testing.assert_close(packed(x), conv(x), rtol=1e-5, atol=1e-5)
    calls = _packed_calls(monkeypatch)
    xg = x.clone().requires_grad_()
    y = packed(xg)  # autograd: the plain convolution, with its gradient
    y.square().sum().backward()
    xr = x.clone().requires_grad_()
    conv(xr).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)
    assert not calls
    monkeypatch.setattr(deploy, "_packing_available", lambda: False)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), conv(x), rtol=1e-5, atol=1e-5)
    assert not calls


@needs_packing
def test_packed_conv_copies_saves_and_exports_as_a_plain_conv():
    torch.manual_seed(2)
    model = nn.Sequential(deploy.PackedConv2d(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    assert model[0].__dict__.get("_plans")
    assert set(model.state_dict()) == {"0.weight", "0.bias"}
    for other in _copy_and_reload(model):
        assert not other[0].__dict__.get("_plans")
        with torch.no_grad():
            torch.testing.assert_close(other(x), want)
    exported = torch.export.export(model, (x,))  # traced calls: the plain convolution
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("conv" in op for op in ops) and not any("mkldnn" in op for op in ops)
    torch.testing.assert_close(exported.module()(x), want, rtol=1e-5, atol=1e-5)


@needs_packing
def test_models_with_packed_convs_absorb_permutations_and_export(tmp_path):
    """fx keeps a PackedConv2d as one node (its forward branches on the input), so a model
    holding one still absorbs its permutations and exports to ONNX."""
    torch.manual_seed(4)
    model = nn.Sequential(deploy.PackedConv2d(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(),
                          hetconv.HetConv2d(8, 8, 3, part=2), nn.ReLU(),
                          hetconv.HetConv2d(8, 4, 3, part=2)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        absorbed = hetconv.absorb_permutations(model)
    assert absorbed.hetconv_permutations["rewritten_layers"] == 2
    with torch.no_grad():
        torch.testing.assert_close(absorbed(x), want, rtol=1e-5, atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "packed.onnx"
    hetconv.export_onnx(model, str(path), x)
    sess = ort.InferenceSession(str(path))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_packed_conv_refuses_what_it_cannot_pack():
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        deploy.PackedConv2d(nn.Conv2d(3, 8, 3, padding="same"))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        deploy.PackedConv2d(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        deploy.PackedConv2d(nn.Conv2d(3, 8, 3).double())
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        deploy.PackedConv2d(nn.Conv1d(3, 8, 3))


@needs_packing
@pytest.mark.parametrize("faster", ["contiguous", "channels_last"])
def test_auto_memory_format_keeps_the_faster_configured_model(faster, monkeypatch):
    """memory_format="auto" configures the model in both formats (backends measured, fusion)
    and keeps the one whose configured model ran faster (timing faked), not the format the
    unconfigured model ran faster in."""
    seen = []
    real_configure, real_timing = deploy._configure, deploy.time_interleaved

    def configure(out, plan, x, backend, fmt, *args):
        seen.append(fmt)
        return real_configure(out, plan, x, backend, fmt, *args)

    def timed(fns, **kw):
        if set(fns) == {"0", "1"}:  # the two configured models, in the formats' order
            wins = str(("contiguous", "channels_last").index(faster))
            return {k: Timing.from_samples([1.0 if k == wins else 2.0]) for k in fns}
        return real_timing(fns, **kw)

    monkeypatch.setattr(deploy, "_configure", configure)
    monkeypatch.setattr(deploy, "time_interleaved", timed)
    model = _handmade()
    x = torch.randn(2, 3, 12, 12)
    # absorb=False: one variant, two formats; check=True: outputs compared
    fast = hetconv.optimize_for_inference(model, x, repeats=1, absorb=False)
    plan = fast.hetconv_plan
    assert seen == ["contiguous", "channels_last"]
    assert plan["memory_format"] == faster and plan["seconds"] == 1.0
    assert plan["memory_format_seconds"] == {faster: 1.0, ({"contiguous", "channels_last"} - {
        faster}).pop(): 2.0}
    seen.clear()
    one = hetconv.optimize_for_inference(model, x, repeats=1, memory_format="contiguous",
                                         absorb=False)
    assert seen == ["contiguous"] and "memory_format_seconds" not in one.hetconv_plan


def test_optimize_packs_the_dense_convs_it_measures_faster(monkeypatch):
    torch.manual_seed(3)
    model = _randomise_bn(hetconv.create_model("vgg16_cifar", width=0.25))
    x = torch.randn(1, 3, 32, 32)
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]

    def timed(fns, **kw):  # "packed" faster on every other layer; the measured model wins
        if set(fns) == {"dense", "packed"}:
            timed.n += 1
            fast = "packed" if timed.n % 2 else "dense"
            with torch.no_grad():  # both candidates as timed: with the ReLU after them
                timed.outs.append((fns["dense"](), fns["packed"]()))
        elif "native" in fns and "dense" in fns:  # the native kernel as P = 1: slower here
            fast = "dense"
        elif set(fns) == {"measured", "rule"}:
            fast = "measured"
        else:
            return real(fns, **kw)
        return {k: Timing.from_samples([1.0 if k == fast else 2.0]) for k in fns}

    timed.n, timed.outs = 0, []
    real = deploy.time_interleaved
    monkeypatch.setattr(deploy, "time_interleaved", timed)
    fast = hetconv.optimize_for_inference(model, x, repeats=1, memory_format="channels_last")
    plan = fast.hetconv_plan
    assert plan["kept"] == "measured"
    packed = {n for n, m in fast.named_modules() if isinstance(m, deploy.PackedConv2d)}
    assert packed == set(dense[0::2]) and plan["packed_dense"] == len(packed)
    assert all(plan["layers"][n]["backend"] == "packed" for n in packed)
    # each is followed by its (folded) BatchNorm and a ReLU: the ReLU runs inside it, and
    # both candidates were timed with it
    assert plan["packed_relus"] == len(packed)
    assert all(plan["layers"][n]["relu"] for n in packed) and len(timed.outs) == len(dense)
    for dense_out, packed_out in timed.outs:
        assert dense_out.min() == 0 and packed_out.min() == 0
        torch.testing.assert_close(packed_out, dense_out, rtol=1e-4, atol=1e-4)
    assert all(m.relu for m in fast.modules() if isinstance(m, deploy.PackedConv2d))
    assert sum(isinstance(m, nn.ReLU) for m in fast.modules()) == sum(
        isinstance(m, nn.ReLU) for m in model.modules()) - len(packed)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    # the rule's configuration, when it is the faster model, is packed the same way
    timed.n, rule_wins = 0, {"dense": 2.0, "packed": 1.0, "native": 2.0, "rule": 1.0,
                             "measured": 2.0}
    monkeypatch.setattr(deploy, "time_interleaved", lambda fns, **kw: {
        k: Timing.from_samples([rule_wins[k]]) for k in fns} if set(fns) <= set(rule_wins)
        else real(fns, **kw))
    ruled = hetconv.optimize_for_inference(model, x, repeats=1, memory_format="channels_last")
    assert ruled.hetconv_plan["kept"] == "rule"
    packed = {n for n, m in ruled.named_modules() if isinstance(m, deploy.PackedConv2d)}
    assert packed == set(dense) and ruled.hetconv_plan["packed_dense"] == len(dense)
    with torch.no_grad():
        torch.testing.assert_close(ruled(x), model(x), rtol=1e-4, atol=1e-4)
    none = hetconv.optimize_for_inference(model, x, repeats=1, pack=False)
    assert none.hetconv_plan["packed_dense"] == 0
    assert not any(isinstance(m, deploy.PackedConv2d) for m in none.modules())
    with pytest.raises(TypeError, match="pack must be a bool"):
        hetconv.optimize_for_inference(model, x, pack="yes")
