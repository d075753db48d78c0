"""``HetConv2d``: construction, parameters, init, conversions, serialisation, compile, bad input."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given

import hetconv
from hetconv import HetConv2d
from hetconv import pattern as hp
from _hetconv_reference import conv_cases, loop_dense, loop_mask, make_input, tolerances


def layer_for(case: dict, **kwargs) -> HetConv2d:
    return HetConv2d(case["m"], case["n"], case["kernel"], case["stride"], case["padding"],
                     case["dilation"], bias=case["bias"], part=case["part"],
                     pattern=case["pattern"], dtype=case["dtype"], **kwargs)


def expected_params(m: int, n: int, p: int, kernel, bias: bool) -> int:
    kh, kw = kernel
    return n * (m // p * kh * kw + m - m // p) + (n if bias else 0)


def masked_dense(weight: torch.Tensor, m: int, n: int, p: int, pattern: str) -> torch.Tensor:
    """A dense conv weight with only the HetConv taps kept (KxK where the mask says, else centre)."""
    kh, kw = weight.shape[2:]
    mask = loop_mask(m, n, p, pattern)
    out = torch.zeros_like(weight)
    for f in range(n):
        for i in range(m):
            if mask[f][i]:
                out[f, i] = weight[f, i]
            else:
                out[f, i, kh // 2, kw // 2] = weight[f, i, kh // 2, kw // 2]
    return out


# ---------------------------------------------------------------------------
# The layer's contract on random shapes
# ---------------------------------------------------------------------------

@given(conv_cases(max_in=10, max_out=8))
def test_layer_contract(case):
    layer = layer_for(case)
    m, n, p = case["m"], case["n"], case["p"]
    # Parameters hold no redundancy.
    assert layer.part == p and layer.part_spec == case["part"]
    assert layer.weight_k.shape == (n, m // p) + case["kernel"]
    assert layer.weight_1.shape == (n, m - m // p)
    total = sum(t.numel() for t in layer.parameters())
    assert total == expected_params(m, n, p, case["kernel"], case["bias"])
    assert total == hp.hetconv_params(m, n, case["kernel"], case["part"], case["bias"])
    assert layer.fan_in == m // p * case["kernel"][0] * case["kernel"][1] + m - m // p
    # Mask and dense weight agree with the loop-based construction.
    assert layer.kernel_mask().tolist() == loop_mask(m, n, p, case["pattern"])
    dense = layer.dense_weight()
    assert torch.equal(dense, loop_dense(layer.weight_k, layer.weight_1, p, case["pattern"]))
    # The non-zeros of the dense kernel are exactly the parameters (uniform draws are non-zero).
    assert int(torch.count_nonzero(dense)) == hp.hetconv_params(m, n, case["kernel"], case["part"])
    # F.conv2d with the dense weight equals the layer; output_size predicts the shape.
    x = make_input(case)
    y = layer(x)
    ref = F.conv2d(x, dense.detach(), layer.bias, layer.stride, layer.padding, layer.dilation)
    torch.testing.assert_close(y, ref, **tolerances(case["dtype"]))
    assert tuple(y.shape[-2:]) == layer.output_size(case["h"], case["w"])
    assert layer.padding == case["pads"]


@pytest.mark.parametrize("backend", list(hetconv.BACKENDS) + ["auto"])
@pytest.mark.parametrize("pattern", ["shifted", "blocked"])
def test_layer_backends_agree(backend, pattern):
    torch.manual_seed(1)
    ref = HetConv2d(8, 6, (3, 5), stride=(1, 2), bias=True, part=4, pattern=pattern,
                    backend="dense")
    layer = HetConv2d(8, 6, (3, 5), stride=(1, 2), bias=True, part=4, pattern=pattern,
                      backend=backend)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 8, 7, 9).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-4, atol=1e-5)


def test_paper_layer_has_12288_weights():
    layer = HetConv2d(64, 64, 3, part=4)
    assert sum(t.numel() for t in layer.parameters()) == 12_288
    assert sum(t.numel() for t in HetConv2d(64, 64, 3, part=4, bias=True).parameters()) == 12_352
    assert sum(t.numel() for t in HetConv2d(64, 64, 3, part="C").parameters()) == 64 * (9 + 63)


# ---------------------------------------------------------------------------
# P = 1 is nn.Conv2d
# ---------------------------------------------------------------------------

GEOMETRIES = [
    dict(kernel_size=3, stride=1, padding=1, dilation=1),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(0, 3), dilation=(2, 1)),
    dict(kernel_size=5, stride=2, padding=4, dilation=2),
    dict(kernel_size=1, stride=1, padding=0, dilation=1),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("bias", [False, True])
def test_part_one_equals_conv2d(geometry, bias):
    conv = nn.Conv2d(5, 7, bias=bias, **geometry)
    layer = HetConv2d(5, 7, bias=bias, part=1, **geometry)
    with torch.no_grad():
        layer.weight_k.copy_(conv.weight)
        if bias:
            layer.bias.copy_(conv.bias)
    x = torch.randn(2, 5, 11, 10)
    assert torch.equal(layer(x), conv(x))
    assert torch.equal(layer.dense_weight(), conv.weight)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("bias", [False, True])
def test_from_conv2d_part_one_is_exact(geometry, bias):
    conv = nn.Conv2d(5, 7, bias=bias, **geometry)
    layer = HetConv2d.from_conv2d(conv, part=1)
    assert layer.stride == conv.stride and layer.padding == conv.padding
    assert layer.dilation == conv.dilation and layer.kernel_size == conv.kernel_size
    x = torch.randn(2, 5, 11, 10)
    assert torch.equal(layer(x), conv(x))


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_from_conv2d_string_padding(padding):
    conv = nn.Conv2d(4, 3, (3, 5), padding=padding, dilation=(1, 2))
    layer = HetConv2d.from_conv2d(conv, part=1)
    x = torch.randn(1, 4, 9, 12)
    assert torch.equal(layer(x), conv(x))


@pytest.mark.parametrize("pattern", ["shifted", "blocked"])
@pytest.mark.parametrize("part", [2, 3, "C"])
def test_from_conv2d_keeps_the_pattern_taps(part, pattern):
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=2, dilation=2, bias=True)
    layer = HetConv2d.from_conv2d(conv, part=part, pattern=pattern)
    p = 6 if part == "C" else part
    expected = masked_dense(conv.weight.detach(), 6, 5, p, pattern)
    assert torch.equal(layer.dense_weight().detach(), expected)
    assert torch.equal(layer.bias.detach(), conv.bias.detach())
    x = torch.randn(2, 6, 9, 8)
    torch.testing.assert_close(
        layer(x), F.conv2d(x, expected, conv.bias, 2, 2, 2), rtol=1e-4, atol=1e-5)


def test_from_conv2d_carries_dtype_and_mode():
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=True).double().eval()
    layer = HetConv2d.from_conv2d(conv, part=2, pattern="blocked", backend="dense")
    assert all(t.dtype == torch.float64 for t in layer.parameters())
    assert not layer.training and layer.pattern == "blocked" and layer.backend == "dense"
    assert HetConv2d.from_conv2d(conv.train(), part=2).training
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert layer(x).dtype == torch.float64


def test_from_conv2d_rejects_unsupported():
    with pytest.raises(ValueError, match="groups"):
        HetConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2), part=2)
    with pytest.raises(ValueError, match="odd"):
        HetConv2d.from_conv2d(nn.Conv2d(4, 4, 2), part=2)
    with pytest.raises(ValueError, match="padding_mode"):
        HetConv2d.from_conv2d(nn.Conv2d(4, 4, 3, padding_mode="reflect"), part=2)
    for bad in (nn.Conv1d(4, 4, 3), nn.Linear(4, 4), nn.ConvTranspose2d(4, 4, 3)):
        with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
            HetConv2d.from_conv2d(bad, part=2)
    with pytest.raises(ValueError, match="part"):
        HetConv2d.from_conv2d(nn.Conv2d(4, 4, 3), part=3)


def test_to_conv2d_equals_layer():
    layer = HetConv2d(6, 4, (5, 3), stride=(2, 1), padding=(3, 0), dilation=(1, 2), bias=True,
                      part=3, pattern="blocked")
    conv = layer.to_conv2d()
    assert type(conv) is nn.Conv2d
    assert torch.equal(conv.weight, layer.dense_weight().detach())
    x = torch.randn(2, 6, 10, 9)
    torch.testing.assert_close(conv(x), layer(x), rtol=1e-4, atol=1e-5)
    # And back: from_conv2d(to_conv2d()) is the same layer.
    again = HetConv2d.from_conv2d(conv, part=3, pattern="blocked")
    for name, t in layer.state_dict().items():
        assert torch.equal(again.state_dict()[name], t)


# ---------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------

def test_reset_parameters_uses_true_fan_in():
    layer = HetConv2d(64, 64, 3, bias=True, part=4)
    fan_in = 64 // 4 * 9 + 64 - 64 // 4  # 192, not the dense 576
    assert layer.fan_in == fan_in
    bound = 1 / math.sqrt(fan_in)
    for t in (layer.weight_k, layer.weight_1):
        assert t.abs().max() <= bound
        # 9,216 / 3,072 uniform draws: the extremes sit within 1% of the bound.
        assert t.max() > 0.99 * bound and t.min() < -0.99 * bound
        assert abs(float(t.detach().mean())) < 0.05 * bound
    assert layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0.8 * bound
    before = layer.weight_k.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight_k)


@pytest.mark.parametrize("bias", [False, True])
def test_part_one_init_draws_equal_conv2d(bias):
    torch.manual_seed(123)
    conv = nn.Conv2d(6, 5, (3, 5), bias=bias)
    torch.manual_seed(123)
    layer = HetConv2d(6, 5, (3, 5), bias=bias, part=1)
    assert torch.equal(layer.weight_k, conv.weight)
    if bias:
        assert torch.equal(layer.bias, conv.bias)


def test_factory_kwargs():
    layer = HetConv2d(4, 4, 3, bias=True, part=2, dtype=torch.float64, device="cpu")
    assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in layer.parameters())
    meta = HetConv2d(4, 4, 3, part=2, device="meta")
    assert meta.weight_k.is_meta


# ---------------------------------------------------------------------------
# Autograd, serialisation, compile, autocast
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["shifted", "blocked"])
def test_dense_weight_gradcheck(pattern):
    layer = HetConv2d(4, 3, (3, 5), part=2, pattern=pattern, dtype=torch.float64)
    wk = layer.weight_k.detach().clone().requires_grad_(True)
    w1 = layer.weight_1.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: hetconv.functional.dense_weight(a, b, pattern), (wk, w1))
    # The layer's own dense_weight() is connected to its parameters.
    layer.dense_weight().pow(2).sum().backward()
    torch.testing.assert_close(layer.weight_k.grad, 2 * layer.weight_k.detach())
    torch.testing.assert_close(layer.weight_1.grad, 2 * layer.weight_1.detach())


def _same_layer(a: HetConv2d, b: HetConv2d) -> None:
    assert (a.part, a.part_spec, a.pattern, a.backend, a.stride, a.padding, a.dilation) == \
        (b.part, b.part_spec, b.pattern, b.backend, b.stride, b.padding, b.dilation)
    x = torch.randn(2, a.in_channels, 7, 6)
    assert torch.equal(a(x), b(x))


def test_state_dict_round_trip():
    layer = HetConv2d(8, 6, 3, bias=True, part=4, pattern="blocked")
    assert set(layer.state_dict()) == {"weight_k", "weight_1", "bias"}
    fresh = HetConv2d(8, 6, 3, bias=True, part=4, pattern="blocked")
    fresh.load_state_dict(layer.state_dict())
    _same_layer(layer, fresh)
    with pytest.raises(RuntimeError, match="size mismatch"):
        HetConv2d(8, 6, 3, bias=True, part=2, pattern="blocked").load_state_dict(layer.state_dict())


def test_state_dict_of_another_pattern_is_refused():
    """"shifted" and "blocked" weights have the same shapes: a state dict records its
    layers' patterns (in its metadata, saved by torch.save) and loading one into a layer
    of the other pattern raises, leaving the layer's weights as they were; a state dict
    without the record (another tool's, a plain dict) loads as before."""
    import io

    torch.manual_seed(0)
    src = nn.Sequential(nn.Identity(), HetConv2d(8, 8, 3, part=4, pattern="blocked"))
    dst = nn.Sequential(nn.Identity(), HetConv2d(8, 8, 3, part=4))  # "shifted"
    before = [t.clone() for t in dst.state_dict().values()]
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"1: the state dict was saved from a layer with "
                           r"pattern='blocked', this one has pattern='shifted'"):
            dst.load_state_dict(saved, strict=strict)
    assert all(torch.equal(a, b) for a, b in zip(before, dst.state_dict().values()))
    twin = nn.Sequential(nn.Identity(), HetConv2d(8, 8, 3, part=4, pattern="blocked"))
    twin.load_state_dict(saved)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(twin(x), src(x))
    dst.load_state_dict(dict(saved))  # no metadata: nothing to check against
    assert torch.equal(dst[1].weight_k, src[1].weight_k)
    for part in (1, "C"):  # where both patterns place every weight alike, nothing to refuse
        same = HetConv2d(8, 8, 3, part=part, pattern="blocked")
        HetConv2d(8, 8, 3, part=part).load_state_dict(same.state_dict())


def test_deepcopy_and_pickle_round_trip():
    layer = HetConv2d(6, 5, (3, 5), stride=2, bias=True, part="C", backend="grouped")
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        _same_layer(layer, clone)
        assert clone.weight_k.data_ptr() != layer.weight_k.data_ptr()
        with torch.no_grad():
            clone.weight_k.add_(1.0)
        assert not torch.equal(clone.weight_k, layer.weight_k)


def _compiled_matches_eager(layer: HetConv2d, compiler: str) -> None:
    """Forward and backward of ``torch.compile(layer, fullgraph=True)`` equal eager."""
    torch._dynamo.reset()
    x = torch.randn(2, layer.in_channels, 6, 5, requires_grad=True)
    compiled = torch.compile(layer, backend=compiler, fullgraph=True)
    y_c, y_e = compiled(x), layer(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5)
    leaves = (x, layer.weight_k, layer.weight_1, layer.bias)
    g = torch.randn_like(y_e)
    for a, b in zip(torch.autograd.grad(y_c, leaves, g), torch.autograd.grad(y_e, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    # inductor works on this CPU (a C++ compiler is present): one small case, with N not a
    # multiple of P so the grouped path's filter re-ordering is compiled too.
    _compiled_matches_eager(HetConv2d(4, 5, 3, bias=True, part=2), "inductor")


@pytest.mark.parametrize("backend", list(hetconv.BACKENDS) + ["auto"])
@pytest.mark.parametrize("pattern", ["shifted", "blocked"])
def test_torch_compile_every_backend_traces_in_one_graph(backend, pattern):
    # aot_eager traces forward and backward like inductor does, without the C++ build.
    layer = HetConv2d(6, 5, 3, bias=True, part=3, pattern=pattern, backend=backend)
    _compiled_matches_eager(layer, "aot_eager")


@pytest.mark.parametrize("backend", list(hetconv.BACKENDS) + ["auto"])
def test_bf16_autocast_close_to_fp32(backend):
    layer = HetConv2d(8, 6, 3, bias=True, part=4, backend=backend)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y32 = layer(x)
    # bf16 keeps 8 bits of mantissa: compare relative to the output scale.
    err = (y.float() - y32).abs().max() / y32.abs().max()
    assert err < 0.05
    y.float().sum().backward()
    assert layer.weight_k.grad is not None and torch.isfinite(layer.weight_k.grad).all()


@pytest.mark.parametrize("backend", list(hetconv.BACKENDS) + ["auto"])
@pytest.mark.parametrize("part", [1, 2, "C"])
def test_every_parameter_gets_a_gradient(backend, part):
    # DistributedDataParallel (find_unused_parameters=False) fails on a parameter without a
    # gradient; with P = 1 weight_1 is empty (N, 0) but must still receive one.
    layer = HetConv2d(4, 3, 3, bias=True, part=part, backend=backend)
    layer(torch.randn(2, 4, 5, 5)).sum().backward()
    for name, t in layer.named_parameters():
        assert t.grad is not None and t.grad.shape == t.shape, name


@pytest.mark.parametrize("backend", list(hetconv.BACKENDS) + ["auto"])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_weight_changes_are_seen_without_autograd(backend, mode):
    # A backend may cache re-laid-out weights for inference: in-place updates, a loaded
    # state_dict and a replaced .data must all invalidate it.
    layer = HetConv2d(6, 5, 3, bias=True, part=3, pattern="shifted", backend=backend)
    ref = HetConv2d(6, 5, 3, bias=True, part=3, pattern="shifted", backend="dense")
    x = torch.randn(2, 6, 5, 4)

    def check():
        ref.load_state_dict(layer.state_dict())
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-4, atol=1e-5)

    with mode():
        check()
        layer.weight_k.add_(1.0)
        check()
        layer.weight_1.mul_(-2.0)
        layer.bias.sub_(0.5)
        check()
    layer.load_state_dict(HetConv2d(6, 5, 3, bias=True, part=3).state_dict())
    with mode():
        check()
    layer.weight_k.data = torch.randn_like(layer.weight_k)
    with mode():
        check()


def test_extra_repr():
    text = repr(HetConv2d(8, 4, 3, part=4, pattern="blocked", backend="grouped"))
    assert "part=4" in text and "pattern=blocked" in text and "backend=grouped" in text
    assert "part='C'" in repr(HetConv2d(8, 4, 3, part="C"))
    assert "part='C'" in repr(HetConv2d(8, 4, 3, part="c"))
    assert "backend=auto" in repr(HetConv2d(8, 4, 3))


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(part=0), ValueError, "part must be >= 1"),
    (dict(part=-2), ValueError, "part must be >= 1"),
    (dict(part=3), ValueError, r"allowed values: \[1, 2, 4, 8\]"),
    (dict(part="PC"), ValueError, "part"),
    (dict(part="X"), ValueError, "part"),
    (dict(part=2.0), TypeError, "part"),
    (dict(part=True), TypeError, "part"),
    (dict(kernel_size=2), ValueError, "kernel_size must be odd"),
    (dict(kernel_size=(3, 4)), ValueError, "kernel_size must be odd"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=3.0), TypeError, "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
    (dict(in_channels=0), ValueError, "in_channels"),
    (dict(in_channels=-8), ValueError, "in_channels"),
    (dict(out_channels=0), ValueError, "out_channels"),
    (dict(in_channels=8.0), (TypeError, ValueError), "in_channels"),
    (dict(out_channels="4"), (TypeError, ValueError), "out_channels"),
    (dict(pattern="diagonal"), ValueError, "pattern must be one of"),
    (dict(backend="fast"), ValueError, "backend must be 'auto' or one of"),
    (dict(padding_mode="reflect"), ValueError, "padding_mode"),
    (dict(stride=0), ValueError, "stride"),
    (dict(stride=1.5), TypeError, "stride"),
    (dict(dilation=0), ValueError, "dilation"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(padding="same"), ValueError, "padding"),
    (dict(padding=(1, 2, 3)), ValueError, "padding"),
    (dict(bias="yes"), TypeError, "bias"),
])
def test_bad_construction(kwargs, error, match):
    args = dict(in_channels=8, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        HetConv2d(**args)


def test_part_c_is_case_insensitive():
    assert HetConv2d(8, 4, 3, part="c").part == 8
    assert HetConv2d(8, 4, 3, part="C").part == 8


@pytest.mark.parametrize("shape", [(2, 5, 6, 6), (5, 6, 6), (6, 6), (1, 2, 4, 6, 6), (4,)])
def test_forward_bad_shape_names_expected(shape):
    layer = HetConv2d(4, 3, 3, part=2)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\) or \(4, H, W\)"):
        layer(torch.randn(shape))


@pytest.mark.parametrize("backend", list(hetconv.BACKENDS) + ["auto"])
def test_empty_batch_and_unbatched(backend):
    layer = HetConv2d(4, 3, 3, stride=2, bias=True, part=2, backend=backend)
    x = torch.randn(0, 4, 7, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3) + layer.output_size(7, 5)
    y.sum().backward()
    assert torch.equal(layer.bias.grad, torch.zeros(3))
    single = torch.randn(4, 7, 5)
    out = layer(single)
    assert out.shape == (3, 4, 3)
    torch.testing.assert_close(out, layer(single[None])[0])


@pytest.mark.parametrize("bias", [False, True])
def test_fx_symbolic_trace_records_one_call_per_layer(bias):
    """``torch.fx.symbolic_trace`` of a model with HetConv2d layers (the backend choice
    branches on the input's shape, which symbolic tracing cannot): each layer is one
    call_function node; the GraphModule's outputs and gradients are the model's."""
    torch.manual_seed(0)
    model = nn.Sequential(HetConv2d(16, 32, 3, part=4, bias=bias), nn.ReLU(),
                          HetConv2d(32, 32, 3, part=8, pattern="blocked", bias=bias))
    gm = torch.fx.symbolic_trace(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target is hetconv.layers.hetconv.het_conv2d_call]
    assert len(calls) == 2
    x = torch.randn(2, 16, 9, 7)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = model(x1), gm(x2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
        gm(torch.randn(2, 15, 9, 7))


@pytest.mark.parametrize("backend", list(hetconv.BACKENDS) + ["auto"])
@pytest.mark.parametrize("cl", [False, True])
def test_torch_func_and_forward_ad_match_dense_reference(backend, cl):
    """torch.func (vmap, per-sample grad, jvp) and forward-mode AD on a layer that has run
    (and kept prepared native calls) before: the reference's values and tangents (the
    layout query crashed under vmap, the native kernel refused torch.func and dropped
    forward-mode tangents of a frozen layer, silently)."""
    from torch.func import functional_call, grad, jvp, vmap
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    m, n = (32, 32) if cl else (16, 16)
    layer = HetConv2d(m, n, 3, part=4, bias=True, backend=backend)
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(2, m, 20, 20).contiguous(memory_format=fmt)
    t = torch.randn_like(x)

    def ref(inp, params=None):
        p = dict(layer.named_parameters()) if params is None else params
        return F.conv2d(inp, hetconv.functional.dense_weight(p["weight_k"], p["weight_1"]),
                        p["bias"], 1, 1)

    with torch.no_grad():
        layer(x), layer(x)
    tol = dict(rtol=1e-4, atol=1e-4)
    xs = torch.stack([x, 2 * x])
    torch.testing.assert_close(vmap(layer)(xs), vmap(ref)(xs), **tol)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, inp, f):
        return f(p, inp[None]).square().sum()

    ours = vmap(grad(loss), in_dims=(None, 0, None))(
        params, x, lambda p, inp: functional_call(layer, p, (inp,)))
    want = vmap(grad(loss), in_dims=(None, 0, None))(params, x, lambda p, inp: ref(inp, p))
    for k in params:
        torch.testing.assert_close(ours[k], want[k], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(jvp(layer, (x,), (t,))[1], ref(t) - layer.bias[:, None, None],
                               **tol)
    layer.requires_grad_(False)
    with torch.no_grad():
        layer(x)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, t))).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, ref(t) - layer.bias[:, None, None], **tol)


@pytest.mark.parametrize("backend", ["native", "auto"])
def test_gradient_penalty_through_the_layer(backend):
    """A gradient penalty (create_graph=True) on a layer that runs the native kernel: the
    weights' gradients are the dense reference's (the penalty's part was missing)."""
    torch.manual_seed(0)
    layer = HetConv2d(16, 16, 3, part=4, bias=True, backend=backend)
    ref = copy.deepcopy(layer)
    x = torch.randn(2, 16, 20, 20, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    for mod, inp, out in ((layer, x, layer(x)),
                          (ref, xr, F.conv2d(xr, ref.dense_weight(), ref.bias, 1, 1))):
        g, = torch.autograd.grad(out.square().sum(), inp, create_graph=True)
        (out.sum() + g.square().sum()).backward()
    for a, b in zip(layer.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("backend", list(hetconv.BACKENDS) + ["auto"])
def test_parametrized_weight_changes_are_seen_without_autograd(backend):
    """A parametrization recomputes weight_1 per call (a new tensor, which may reuse the
    freed one's id and storage): an update of the original between inference calls must be
    seen (cached "fused"/"dense"/native weights were served stale)."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    layer = HetConv2d(16, 16, 3, part=4, bias=True, backend=backend)
    parametrize.register_parametrization(layer, "weight_1", Double())
    x = torch.randn(2, 16, 20, 20)
    with torch.no_grad():
        for _ in range(4):
            y = layer(x)
            want = F.conv2d(x, layer.dense_weight(), layer.bias, 1, 1)
            torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
            del y, want
            layer.parametrizations.weight_1.original.mul_(-1.5)


@pytest.mark.parametrize("backend", list(hetconv.BACKENDS) + ["auto"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_clear_caches_after_writes_through_data(backend, layout):
    """A write through ``.data`` bypasses the version counter the weight caches watch:
    after ``hetconv.clear_caches(model)`` every backend (and the functional form, whose
    prepared calls are global) computes with the new weights."""
    torch.manual_seed(0)
    model = nn.Sequential(HetConv2d(32, 32, 3, part=4, bias=True, backend=backend)).eval()
    layer = model[0]
    x = torch.randn(2, 32, 8, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(2):  # the second call runs what the first one prepared
            model(x)
            hetconv.functional.het_conv2d(x, layer.weight_k, layer.weight_1, layer.bias,
                                          backend=backend)
        layer.weight_k.data.mul_(-1.5)
        layer.weight_1.data.mul_(2.0)
        layer.bias.data.add_(1.0)
        hetconv.clear_caches(model)
        ref = F.conv2d(x, hetconv.functional.dense_weight(
            layer.weight_k.clone(), layer.weight_1.clone(), layer.pattern), layer.bias, 1, 1)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            hetconv.functional.het_conv2d(x, layer.weight_k, layer.weight_1, layer.bias, backend=backend), ref,
            rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="model must be an nn.Module or None"):
        hetconv.clear_caches("model")


def test_clear_caches_covers_every_weight_cache():
    """Every cache of prepared weights any hetconv module holds is registered, so
    ``clear_caches`` empties it: a cache made without ``native.weight_cache()`` (and so
    forgotten by ``clear_caches``) fails here."""
    import importlib
    import pkgutil

    from torch.utils.weak import WeakIdKeyDictionary

    caches = []
    for info in pkgutil.walk_packages(hetconv.__path__, "hetconv."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        caches += [v for v in vars(module).values() if isinstance(v, WeakIdKeyDictionary)]
    registered = {id(c) for c in hetconv.native.WEIGHT_CACHES}
    assert caches and all(id(c) in registered for c in caches)
    x = torch.randn(2, 32, 8, 8)
    layers = [HetConv2d(32, 32, 3, part=4, backend=b).eval() for b in hetconv.BACKENDS]
    with torch.no_grad():
        for layer in layers:
            for xx in (x, x.contiguous(memory_format=torch.channels_last)):
                layer(xx)
    assert sum(len(c) for c in caches) > 0
    hetconv.clear_caches()
    assert all(len(c) == 0 for c in caches)


@pytest.mark.parametrize("train", [False, True])
def test_torch_compile_of_auto_runs_the_native_kernel_where_eager_does(train):
    """backend="auto" never picked the native kernel while torch.compile traced (a rule
    from before the kernel was a torch.library op): a compiled HetConv model ran the fused
    backend, slower than eager (VGG-16 P4, batch 64: 99 ms compiled against 66 eager in
    run 68).  The compiled graph now holds the native op where eager runs the kernel, and
    matches eager forward and backward."""
    import torch._dynamo

    layer = HetConv2d(64, 64, 3, part=4).train(train)
    x = torch.randn(2, 64, 12, 12).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(train)
    assert hetconv.functional.select_backend(x, layer.weight_k, layer.weight_1) == "native"
    targets = []

    def recording(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward
    torch._dynamo.reset()
    try:
        with torch.set_grad_enabled(train):
            got = torch.compile(layer, backend=recording, fullgraph=True)(x)
            want = layer(x)
    finally:
        torch._dynamo.reset()
    assert any("hetconv.native_conv2d" in t for t in targets), sorted(set(targets))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if train:
        g = torch.randn_like(want)
        leaves = (x, layer.weight_k, layer.weight_1)
        for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
