"""``het_conv2d`` and ``dense_weight``: the reference against loops, every backend against the reference.

Every name in ``hetconv.BACKENDS`` is collected here, so a newly added backend is checked
automatically, forward and backward, over random shapes and geometry.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import hetconv
from hetconv import functional as HF
from _hetconv_reference import conv_cases, loop_dense, make_input, tolerances

ALL_BACKENDS = list(hetconv.BACKENDS) + ["auto"]


def random_weights(case: dict, requires_grad: bool = True):
    """weight_k, weight_1 and bias (or None) for ``case``, leaf tensors."""
    n, m, p, dtype = case["n"], case["m"], case["p"], case["dtype"]
    wk = torch.randn(n, m // p, *case["kernel"], dtype=dtype)
    w1 = torch.randn(n, m - m // p, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if case["bias"] else None
    leaves = [t for t in (wk, w1, b) if t is not None]
    for t in leaves:
        t.requires_grad_(requires_grad)
    return wk, w1, b


def call(case: dict, x, wk, w1, b, backend: str):
    return HF.het_conv2d(x, wk, w1, b, case["stride"], case["padding"], case["dilation"],
                         case["pattern"], backend)


def grads(out: torch.Tensor, inputs, upstream: torch.Tensor):
    # The loop reference leaves the empty weight_1 of P = 1 out of its graph: its gradient
    # is then an empty zero tensor (het_conv2d itself always connects it, tested below).
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True, materialize_grads=True)


# ---------------------------------------------------------------------------
# "dense" is the definition: check it against an independent construction.
# ---------------------------------------------------------------------------

@given(conv_cases())
def test_dense_weight_equals_loop_construction(case):
    wk, w1, _ = random_weights(case, requires_grad=False)
    expected = loop_dense(wk, w1, case["p"], case["pattern"])
    got = HF.dense_weight(wk, w1, case["pattern"])
    assert got.shape == (case["n"], case["m"]) + case["kernel"]
    assert torch.equal(got, expected)


@given(conv_cases())
def test_dense_backend_equals_conv_with_loop_weight(case):
    x = make_input(case).requires_grad_(True)
    wk, w1, b = random_weights(case)
    y = call(case, x, wk, w1, b, "dense")
    ref = F.conv2d(x, loop_dense(wk, w1, case["p"], case["pattern"]), b, case["stride"],
                   case["pads"], case["dilation"])
    assert y.shape == ref.shape and y.dtype == case["dtype"]
    tol = tolerances(case["dtype"])
    torch.testing.assert_close(y, ref, **tol)
    inputs = [t for t in (x, wk, w1, b) if t is not None]
    g = torch.randn_like(ref)
    for got, exp in zip(grads(y, inputs, g), grads(ref, inputs, g)):
        torch.testing.assert_close(got, exp, **tol)


def test_dense_reference_by_hand():
    # 2 input channels, 2 filters, P = 2, 3x3, shifted: filter 0 is 3x3 on channel 0 and
    # 1x1 on channel 1; filter 1 is 1x1 on channel 0 and 3x3 on channel 1.
    x = torch.arange(2 * 3 * 3, dtype=torch.float64).reshape(1, 2, 3, 3)
    wk = torch.ones(2, 1, 3, 3, dtype=torch.float64)
    w1 = torch.tensor([[10.0], [100.0]], dtype=torch.float64)
    y = HF.het_conv2d(x, wk, w1, padding=0, backend="dense")
    # Output is 1x1 (no padding): a sum over the 3x3 window plus w1 times the centre pixel.
    x0, x1 = x[0, 0], x[0, 1]
    assert y.shape == (1, 2, 1, 1)
    assert y[0, 0, 0, 0].item() == x0.sum().item() + 10.0 * x1[1, 1].item()
    assert y[0, 1, 0, 0].item() == 100.0 * x0[1, 1].item() + x1.sum().item()


# ---------------------------------------------------------------------------
# Every backend equals "dense", forward and backward.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@settings(max_examples=120)
@given(case=conv_cases())
def test_backend_equals_dense(backend, case):
    x = make_input(case).requires_grad_(True)
    wk, w1, b = random_weights(case)
    y = call(case, x, wk, w1, b, backend)
    ref = call(case, x, wk, w1, b, "dense")
    assert y.shape == ref.shape and y.dtype == ref.dtype
    tol = tolerances(case["dtype"])
    torch.testing.assert_close(y, ref, **tol)
    inputs = [t for t in (x, wk, w1, b) if t is not None]
    g = torch.randn_like(ref)
    for name, got, exp in zip(["input", "weight_k", "weight_1", "bias"],
                              grads(y, inputs, g), grads(ref, inputs, g)):
        torch.testing.assert_close(got, exp, **tol, msg=lambda s: f"{backend} grad {name}: {s}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("pattern", ["shifted", "blocked"])
def test_backend_gradcheck_float64(backend, pattern):
    # Analytic gradients of each backend against finite differences (tiny problem, P = 2).
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    wk = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: HF.het_conv2d(*a, stride=(1, 2), padding=(2, 1), dilation=(2, 1),
                                 pattern=pattern, backend=backend),
        (x, wk, w1, b))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("part", [1, 2, 4])
def test_empty_batch(backend, part):
    x = torch.randn(0, 4, 6, 5, requires_grad=True)
    wk = torch.randn(3, 4 // part, 3, 3, requires_grad=True)
    w1 = torch.randn(3, 4 - 4 // part, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    y = HF.het_conv2d(x, wk, w1, b, stride=2, backend=backend)
    assert y.shape == (0, 3, 3, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (wk, w1, b):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_unbatched_equals_batched(backend):
    x = torch.randn(6, 7, 5)
    wk, w1 = torch.randn(4, 2, 3, 5), torch.randn(4, 4)
    y = HF.het_conv2d(x, wk, w1, stride=(2, 1), pattern="blocked", backend=backend)
    assert y.shape == (4, 4, 5)
    torch.testing.assert_close(
        y, HF.het_conv2d(x[None], wk, w1, stride=(2, 1), pattern="blocked", backend=backend)[0])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_padding_none_keeps_size_at_stride_one(backend):
    x = torch.randn(1, 4, 9, 6)
    for kernel, dilation in [((3, 3), 1), ((5, 3), (2, 1)), ((1, 5), 2)]:
        wk, w1 = torch.randn(5, 2, *kernel), torch.randn(5, 2)
        y = HF.het_conv2d(x, wk, w1, dilation=dilation, backend=backend)
        assert y.shape == (1, 5, 9, 6)


@given(conv_cases())
def test_grouped_output_slots(case):
    # The grouped conv's output slot of filter f: class-major, ceil(N/P) slots per class,
    # filters in order inside a class; "identity_slots" exactly when that is the identity.
    n, p, pattern = case["n"], case["p"], case["pattern"]
    idx = HF._indices(case["m"], n, p, pattern, torch.device("cpu"))
    per_group = -(-n // p)
    cls = hetconv.pattern.class_of_filter(n, p, pattern).tolist()
    slots = [cls[f] * per_group + cls[:f].count(cls[f]) for f in range(n)]
    assert idx["slot"].tolist() == slots and idx["slots"] == per_group * p
    assert idx["identity_slots"] == (slots == list(range(n)) and per_group * p == n)


def test_select_backend_returns_a_backend():
    x = torch.randn(1, 8, 6, 6)
    for p, k in [(1, 3), (2, 3), (8, 3), (4, 1), (2, 5)]:
        wk, w1 = torch.randn(4, 8 // p, k, k), torch.randn(4, 8 - 8 // p)
        for pattern in ("shifted", "blocked"):
            assert HF.select_backend(x, wk, w1, (1, 1), (1, 1), pattern) in hetconv.BACKENDS


def test_backends_tuple():
    assert isinstance(hetconv.BACKENDS, tuple)
    assert hetconv.BACKENDS[0] == "dense" and len(hetconv.BACKENDS) >= 2
    assert "auto" not in hetconv.BACKENDS


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def test_het_conv2d_bad_input():
    x = torch.randn(2, 4, 6, 6)
    wk, w1 = torch.randn(3, 2, 3, 3), torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        HF.het_conv2d(torch.randn(2, 5, 6, 6), wk, w1)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        HF.het_conv2d(torch.randn(4, 6), wk, w1)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        HF.het_conv2d(torch.randn(1, 2, 4, 6, 6), wk, w1)
    with pytest.raises(ValueError, match="backend"):
        HF.het_conv2d(x, wk, w1, backend="fast")
    with pytest.raises(ValueError, match="pattern"):
        HF.het_conv2d(x, wk, w1, pattern="diagonal")
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        HF.het_conv2d(x, wk, w1, torch.randn(4))
    with pytest.raises(ValueError, match="weight_k"):
        HF.het_conv2d(x, torch.randn(3, 2, 3), w1)
    with pytest.raises(ValueError, match="weight_1"):
        HF.het_conv2d(x, wk, torch.randn(2, 2))
    with pytest.raises(ValueError, match="M/P must divide"):
        HF.het_conv2d(torch.randn(2, 5, 6, 6), wk, torch.randn(3, 3))
    with pytest.raises(ValueError, match="odd"):
        HF.het_conv2d(x, torch.randn(3, 2, 2, 3), w1)
    with pytest.raises(ValueError, match="padding"):
        HF.het_conv2d(x, wk, w1, padding=-1)
    with pytest.raises(TypeError, match="stride"):
        HF.het_conv2d(x, wk, w1, stride=1.5)
    with pytest.raises(ValueError, match="dilation"):
        HF.het_conv2d(x, wk, w1, dilation=(1, 1, 1))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("cl", [False, True])
def test_vmap_and_forward_ad_after_kept_calls(backend, cl):
    """het_conv2d under vmap and forward-mode AD after inference calls of the same signature
    (which keep a prepared native call): the reference's values and tangents (vmap crashed
    on the layout query or the kernel's raw pointers; the tangent was dropped)."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    m = 32 if cl else 16
    wk, w1 = torch.randn(m, m // 4, 3, 3), torch.randn(m, m - m // 4)
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(2, m, 20, 20).contiguous(memory_format=fmt)
    t = torch.randn_like(x)

    def f(inp):
        return HF.het_conv2d(inp, wk, w1, None, backend=backend)

    def ref(inp):
        return F.conv2d(inp, HF.dense_weight(wk, w1), None, 1, 1)

    f(x), f(x)
    xs = torch.stack([x, 2 * x])
    torch.testing.assert_close(torch.func.vmap(f)(xs), torch.stack([ref(a) for a in xs]),
                               rtol=1e-4, atol=1e-4)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, ref(t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cl", [False, True])
def test_weights_made_anew_per_call_are_never_served_stale(cl):
    """weight_1 made anew for each inference call (what a parametrization such as weight
    norm does) often gets the freed one's id, storage and version: the weights cached or
    packed from the old tensor must not be served (they were, for "fused", "dense" and
    the native packings)."""
    torch.manual_seed(0)
    m = 16  # weight_1 of 768 bytes: malloc hands the freed block out again
    wk, base = torch.randn(m, m // 4, 3, 3), torch.randn(m, m - m // 4)
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(2, m, 20, 20).contiguous(memory_format=fmt)
    with torch.no_grad():
        for backend in ALL_BACKENDS:
            for scale in (1.0, -2.0, 3.0, 0.5):
                w1 = torch.empty_like(base)  # a new tensor, the previous one freed
                torch.mul(base, scale, out=w1)
                y = HF.het_conv2d(x, wk, w1, None, backend=backend)
                want = F.conv2d(x, HF.dense_weight(wk, w1), None, 1, 1)
                torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4, msg=backend)
                del y, want
                del w1  # freed last: the next weight_1 takes its place
