"""The "native" backend (C kernel): same function as the dense reference, forward and backward."""

import functools
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import hetconv
from hetconv import functional as HF
from hetconv import native
from hetconv.pattern import PATTERNS

HAS_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(not native.available(),
                                  reason=f"native kernel unavailable: {native.build_error()}")


def _count_calls(monkeypatch, what):
    """Input shapes of the forward-kernel launches (every forward, input gradient and
    prepared call goes through native._launch) of the kernel named ``what``."""
    calls = []
    real = native._launch

    def counting(x, shape, fmt, call, residual, name):
        if name == what:
            calls.append(x.shape)
        return real(x, shape, fmt, call, residual, name)
    monkeypatch.setattr(native, "_launch", counting)
    return calls


@pytest.fixture
def runs(monkeypatch):
    """Counts calls of the C kernel (so a test knows the native path really ran)."""
    return _count_calls(monkeypatch, "native kernel")


@pytest.fixture
def nhwc_runs(monkeypatch):
    """Counts calls of the channels-last C kernel."""
    return _count_calls(monkeypatch, "channels-last kernel")


def _weights(m, n, p, k=3, requires_grad=False, dtype=torch.float32):
    wk = torch.randn(n, m // p, k, k, dtype=dtype, requires_grad=requires_grad)
    w1 = torch.randn(n, m - m // p, dtype=dtype, requires_grad=requires_grad)
    return wk, w1


def _reference(x, wk, w1, bias, pattern, padding=None, stride=1):
    kh, kw = wk.shape[2:]
    pad = (kh // 2, kw // 2) if padding is None else padding
    return F.conv2d(x, HF.dense_weight(wk, w1, pattern), bias, stride, pad)


def _assert_same_grads(y, ref, inputs, tol):
    """The gradients of ``y`` and of ``ref`` with respect to ``inputs`` agree (one random
    output gradient); returns y's."""
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    return got


@pytest.mark.skipif(not HAS_CC or not sys.platform.startswith("linux"),
                    reason="needs a C compiler on Linux")
def test_kernel_builds_where_a_compiler_exists():
    assert native.available(), native.build_error()
    assert native.build_error() is None


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(m_k=st.integers(1, 6), p=st.integers(1, 6), n=st.integers(1, 13),
       h=st.integers(1, 19), w=st.integers(1, 23), batch=st.integers(0, 3),
       k=st.sampled_from([(3, 3), (5, 5), (1, 3), (3, 1), (5, 3)]),
       pattern=st.sampled_from(PATTERNS), bias=st.booleans(), stride=st.sampled_from([1, 2]))
def test_forward_and_backward_match_dense_reference(m_k, p, n, h, w, batch, k, pattern, bias,
                                                    stride):
    m = m_k * p
    torch.manual_seed(m * 1000 + n * 10 + h)
    wk = torch.randn(n, m_k, *k, requires_grad=True)
    w1 = torch.randn(n, m - m_k, requires_grad=True)
    b = torch.randn(n, requires_grad=True) if bias else None
    x = torch.randn(batch, m, h, w, requires_grad=True)
    y = native.native_conv2d(x, wk, w1, b, pattern, stride=stride)
    ref = _reference(x, wk, w1, b, pattern, stride=stride)
    assert y.shape == ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    leaves = [t for t in (x, wk, w1, b) if t is not None]
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("m,n,p", [(16, 16, 4), (16, 16, 16), (12, 10, 3), (8, 5, 4), (6, 9, 2),
                                   (32, 64, 8)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_forward_and_backward_match_dense(m, n, p, pattern, runs):
    torch.manual_seed(0)
    x = torch.randn(3, m, 9, 11, requires_grad=True)
    wk, w1 = _weights(m, n, p, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    y = HF.het_conv2d(x, wk, w1, b, pattern=pattern, backend="native")
    assert runs, "the C kernel did not run"
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, wk, w1, b), g)
    ref = _reference(x, wk, w1, b, pattern)
    ref_grads = torch.autograd.grad(ref, (x, wk, w1, b), g)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_fused_relu_forward_and_backward():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    wk, w1 = _weights(8, 8, 4, requires_grad=True)
    y = native.native_conv2d(x, wk, w1, None, "shifted", relu=True)
    ref = F.relu(_reference(x, wk, w1, None, "shifted"))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, wk, w1), g),
                         torch.autograd.grad(ref, (x, wk, w1), g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_result_does_not_depend_on_thread_count():
    torch.manual_seed(2)
    x = torch.randn(5, 16, 12, 12)
    wk, w1 = _weights(16, 24, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.native_conv2d(x, wk, w1)
        torch.set_num_threads(max(2, threads))
        many = native.native_conv2d(x, wk, w1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_kernel
def test_packed_weights_follow_in_place_updates(runs):
    torch.manual_seed(3)
    x = torch.randn(2, 8, 6, 6)
    wk, w1 = _weights(8, 8, 2)
    with torch.no_grad():
        first = HF.het_conv2d(x, wk, w1, backend="native")
        wk.mul_(2)
        w1.mul_(2)
        second = HF.het_conv2d(x, wk, w1, backend="native")
    torch.testing.assert_close(second, 2 * first, rtol=1e-5, atol=1e-5)
    assert len(runs) == 2


@needs_kernel
def test_channels_last_input_is_accepted():
    torch.manual_seed(4)
    x = torch.randn(2, 8, 6, 7).contiguous(memory_format=torch.channels_last)
    wk, w1 = _weights(8, 4, 4)
    y = HF.het_conv2d(x, wk, w1, backend="native")
    torch.testing.assert_close(y, _reference(x, wk, w1, None, "shifted"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,dtype", [
    ({"stride": 3}, torch.float32), ({"stride": (1, 2)}, torch.float32),
    ({"dilation": 2}, torch.float32),
    ({"padding": 0}, torch.float32), ({}, torch.float64)])
def test_unsupported_calls_fall_back_to_the_other_backends(kwargs, dtype, runs):
    torch.manual_seed(5)
    x = torch.randn(2, 8, 9, 9, dtype=dtype, requires_grad=True)
    wk, w1 = _weights(8, 6, 4, dtype=dtype, requires_grad=True)
    y = HF.het_conv2d(x, wk, w1, backend="native", **kwargs)
    stride = HF._pair(kwargs.get("stride", 1), "stride")
    dilation = HF._pair(kwargs.get("dilation", 1), "dilation")
    padding = HF._padding(kwargs.get("padding"), (3, 3), dilation)
    ref = F.conv2d(x, HF.dense_weight(wk, w1), None, stride, padding, dilation)
    torch.testing.assert_close(y, ref)
    assert not runs
    assert native.unsupported_reason(x, wk, stride, padding, dilation) is not None


def test_even_kernels_are_not_native():
    x = torch.randn(1, 4, 6, 6)
    wk = torch.randn(3, 2, 2, 2)
    assert "odd kernels" in native.unsupported_reason(x, wk, (1, 1), (1, 1), (1, 1))


@needs_kernel
def test_auto_picks_native_for_narrow_nchw_layers_only():
    wk, w1 = _weights(16, 16, 4)
    big = torch.randn(2, 16, 32, 32)
    assert HF.select_backend(big, wk, w1, padding=(1, 1)) == (
        "native" if native.vectorized() else "dense")
    # channels_last input under autograd (16 channels): the channels-last kernel's 16-channel
    # tiles from P = 4 on rows of at least 26 pixels (3x3, "shifted"), else not native;
    # stride 3, small outputs, P = 1: not native
    big_cl = big.contiguous(memory_format=torch.channels_last)
    assert HF.select_backend(big_cl, wk.detach().requires_grad_(), w1) == (
        "native" if native.vectorized() else "dense")
    narrow_cl = torch.randn(2, 16, 32, 25).contiguous(memory_format=torch.channels_last)
    assert HF.select_backend(narrow_cl, wk.detach().requires_grad_(), w1) != "native"
    flat_cl = torch.randn(2, 16, 2, 32).contiguous(memory_format=torch.channels_last)
    assert HF.select_backend(flat_cl, wk.detach().requires_grad_(), w1) != "native"
    assert HF.select_backend(big_cl, wk.detach().requires_grad_(), w1, pattern="blocked") \
        != "native"
    k2, w12 = _weights(16, 16, 2)
    assert HF.select_backend(big_cl, k2.requires_grad_(), w12) != "native"
    k5, w15 = _weights(16, 16, 4, k=5)
    assert HF.select_backend(big_cl, k5.requires_grad_(), w15) != "native"
    assert HF.select_backend(big, wk, w1, stride=(3, 3)) != "native"
    assert HF.select_backend(torch.randn(2, 16, 4, 4), wk, w1) != "native"
    assert HF.select_backend(big, torch.randn(16, 16, 3, 3), torch.randn(16, 0)) == "dense"
    assert HF.select_backend(big, wk, w1, native=False) != "native"
    # stride 2: wide layers with large outputs, outside autograd only (P = 3: the
    # channels-last kernel does not apply)
    wide_k, wide_1 = _weights(96, 96, 3)
    wide = torch.randn(1, 96, 56, 56)
    assert HF.select_backend(wide, wide_k, wide_1, stride=(2, 2)) == (
        "native" if native.vectorized() else "fused")
    assert HF.select_backend(wide, wide_k.requires_grad_(), wide_1, stride=(2, 2)) != "native"
    # narrow (M < 64) stride-2 layers: from 64 output pixels, outside autograd only
    native_or_not = "native" if native.vectorized() else "dense"
    assert HF.select_backend(big, wk, w1, stride=(2, 2)) == native_or_not
    assert HF.select_backend(torch.randn(2, 16, 16, 16), wk, w1, stride=(2, 2)) == native_or_not
    assert HF.select_backend(torch.randn(2, 16, 14, 14), wk, w1, stride=(2, 2)) != "native"
    assert HF.select_backend(big, wk.detach().requires_grad_(), w1, stride=(2, 2)) != "native"


def _auto_pick(cl, m, n, p, size=4, batch=2, stride=1, grad=False, pattern="shifted"):
    """``(backend, to channels_last)`` that "auto" picks for a 3x3 layer on a (batch, m,
    size, size) input, channels_last if ``cl``, under autograd if ``grad``."""
    wk, w1 = _weights(m, n, p)
    x = torch.randn(batch, m, size, size)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    return HF._select(x, wk.requires_grad_(grad), w1, (stride, stride), (1, 1), pattern, (1, 1))


@needs_kernel
@pytest.mark.parametrize("cl", [False, True])
def test_auto_picks_the_channels_last_kernel_for_wide_layers(cl):
    pick = functools.partial(_auto_pick, cl)

    if not native.vectorized():
        pytest.skip("the kernel was built without AVX-512: auto never picks it")
    want = ("native", True)
    for p in (2, 4, 8, 16):
        assert pick(128, 128, p) == want
        assert pick(512, 512, p, size=2, grad=True) == want
    # 64 channels: channels_last input only (NCHW input keeps the NCHW kernel there)
    assert pick(64, 64, 4, size=16) == (want if cl else ("native", False))
    assert pick(128, 128, 4, pattern="blocked") == want
    assert pick(128, 256, 4, size=8, stride=2, grad=True) == want
    # not: P neither in {2, 4, 8, 16} nor a multiple of 16 "shifted", N/P not a multiple
    # of 16 "blocked"
    assert not pick(96, 96, 3)[1]
    assert pick(64, 64, 32, size=16)[1] == cl  # one vector per block (see the P >= 32 test)
    assert not pick(128, 128, 16, pattern="blocked")[1]
    assert pick(256, 256, 4, size=8, stride=2, grad=True) == want
    # 16-63 channels: channels_last input only; 32 channels and up also under autograd, 16
    # at stride 2, and outside autograd from P = 4 on
    narrow = [(32, 64, 4, 1, True), (64, 32, 2, 2, True), (32, 32, 2, 1, True),
              (16, 16, 4, 1, False), (16, 32, 2, 2, False), (16, 32, 2, 2, True),
              (16, 32, 8, 2, True)]
    for m, n, p, stride, grad in narrow:
        assert pick(m, n, p, size=16, stride=stride, grad=grad)[1] == cl
    assert not pick(16, 16, 2, size=16)[1]
    assert not pick(16, 16, 4, size=16, grad=True)[1]
    # and het_conv2d runs it: a channels_last result equal to the dense reference
    wk, w1 = _weights(128, 128, 4)
    x = torch.randn(2, 128, 6, 6)
    y = HF.het_conv2d(x, wk, w1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.conv2d(x, HF.dense_weight(wk, w1), None, 1, 1),
                               rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("cl", [False, True])
def test_auto_picks_the_nchw_kernel_from_p_32(cl):
    """P >= 32 below depthwise: the NCHW kernel at stride 1 on outputs of >= 64 pixels (>= 49
    outside autograd). On channels_last input the channels-last kernel ("shifted", 16 | P:
    vectors P filters apart): with N >= 4P (blocks of 4 vectors) always; with narrower
    blocks where the NCHW one would pay for its copy (up to 128 channels, or 256 output rows
    outside autograd), and at stride 2. On NCHW input with N >= 4P the channels-last kernel
    (input copied, >= 128 channels) where the NCHW kernel does not run. The NCHW kernel with
    its copy where only that one applies ("blocked" with N/P not a multiple of 16)."""
    pick = functools.partial(_auto_pick, cl)

    if not native.vectorized():
        pytest.skip("the kernel was built without AVX-512: auto never picks it")
    want = ("native", False)
    here = ("native", True) if cl else want  # the kernel for this layout
    fused, nhwc = ("fused", False), ("native", True)
    for grad in (False, True):
        # N = 2P: blocks of 2 vectors
        assert pick(64, 64, 32, 8, grad=grad) == here
        assert pick(128, 128, 32, 8, grad=grad, pattern="blocked") == want
        if cl:  # wide, many rows: "fused"
            assert pick(256, 512, 256, 8, batch=8, grad=grad) == fused
        # N >= 4P: blocks of 4 vectors
        assert pick(128, 256, 64, 8, grad=grad) == here
        assert pick(256, 256, 32, 8, batch=8, grad=grad) == here
        assert pick(512, 512, 32, 4, grad=grad) == nhwc  # 16 pixels: the NCHW kernel does not run
        if cl:  # depthwise: oneDNN's kernel ("fused"); NCHW input keeps the narrow rule
            assert pick(64, 64, 64, 8, grad=grad) == fused
        # stride 2: the channels-last kernel on channels_last input, and on NCHW input
        # (copied, >= 128 channels) where the NCHW kernel does not run (under autograd; 64
        # output pixels outside it)
        assert pick(128, 128, 32, 16, stride=2, grad=grad) == nhwc
        if cl:  # P = M but N = 2M: not depthwise (ResNet-56's 32->64 stride-2 layer at P32)
            assert pick(32, 64, 32, 16, stride=2, grad=grad) == ("native", True)
        # N = 2P, stride 2: NCHW input only under autograd
        assert pick(128, 256, 128, 16, stride=2, grad=grad) == (
            nhwc if cl or grad else ("fused", False))
    assert pick(512, 512, 32, 7, batch=1) == here  # 49 pixels, 49 rows
    assert pick(512, 512, 32, 7, batch=6) == here  # 294 rows
    assert pick(512, 512, 32, 7, batch=1, grad=True) == nhwc  # < 64 pixels under autograd
    # and het_conv2d runs it on channels_last input, forward and backward, equal to the
    # dense reference
    wk, w1 = _weights(64, 64, 32, requires_grad=True)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    gy = torch.randn(2, 64, 8, 8)
    y = HF.het_conv2d(x, wk, w1)
    grads = torch.autograd.grad(y, (x, wk, w1), gy)
    y_ref = F.conv2d(x, HF.dense_weight(wk, w1), None, 1, 1)
    grads_ref = torch.autograd.grad(y_ref, (x, wk, w1), gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-3)


def _nhwc_sizes(p: int, m_k: int, vectors: int, pattern: str) -> tuple:
    """(P, M/P, M, N) of a layer the channels-last kernel runs, from drawn P, M/P and filter
    vectors: "blocked" needs 16 | N/P; vectors > 4 gives blocks of unequal width (4 + rest);
    P = 1 is a dense layer (optimize_for_inference's dense convolutions of channels_last
    models); "shifted" with P = 32, 64: blocks of vectors P filters apart (16 classes each),
    so 2 * vectors vectors give blocks of 1-4 (and of unequal width)."""
    if pattern == "blocked":
        p = min(p, 16)
    if p == 1:  # a dense layer; one input channel would be NCHW and channels_last at once
        m_k += 1
    m, n = m_k * p, 16 * vectors * (p if pattern == "blocked" and vectors <= 2 else 1)
    if pattern == "shifted" and p > 16:
        n *= 2
    if pattern == "blocked" and n % (16 * p):
        n = 16 * p
    assert native.nhwc_supported(n, m, p, pattern)
    return p, m_k, m, n


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(p=st.sampled_from([1, 2, 4, 8, 16, 32, 64]), m_k=st.integers(1, 5),
       vectors=st.integers(1, 6),
       h=st.integers(1, 11), w=st.integers(1, 13), batch=st.integers(0, 10),
       k=st.sampled_from([(3, 3), (5, 5), (1, 3), (3, 1), (5, 3)]),
       pattern=st.sampled_from(PATTERNS), bias=st.booleans(), stride=st.sampled_from([1, 2]),
       epilogue=st.sampled_from(["none", "relu", "residual", "both"]))
def test_channels_last_kernel_matches_dense_reference(p, m_k, vectors, h, w, batch, k, pattern,
                                                      bias, stride, epilogue):
    p, m_k, m, n = _nhwc_sizes(p, m_k, vectors, pattern)
    torch.manual_seed(m * 1000 + n * 10 + h)
    cl = torch.channels_last
    wk, w1 = _weights(m, n, p, k=k[0], requires_grad=True)
    wk = torch.randn(n, m_k, *k, requires_grad=True)
    b = torch.randn(n, requires_grad=True) if bias else None
    x = torch.randn(batch, m, h, w).contiguous(memory_format=cl).requires_grad_()
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    res = (torch.randn(batch, n, ho, wo).contiguous(memory_format=cl).requires_grad_()
           if epilogue in ("residual", "both") else None)
    relu = epilogue in ("relu", "both")
    y = native.native_conv2d(x, wk, w1, b, pattern, relu=relu, residual=res, stride=stride)
    ref = _reference(x, wk, w1, b, pattern, stride=stride)
    if res is not None:
        ref = ref + res
    if relu:  # the kernel's own zeros: a sum within rounding of 0 (-6e-8 here, 2e-7 in the
        on = y.detach() > 0  # reference) may fall either side, and with it the gradient
        assert not ((on != (ref > 0)) & (ref.abs() > 1e-4)).any()  # only there
        ref = ref * on
    assert y.shape == ref.shape and y.is_contiguous(memory_format=cl)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    leaves = [t for t in (x, wk, w1, b, res) if t is not None]
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("m,n,stride,size,batch", [(3, 64, 1, 32, 1), (3, 16, 2, 17, 3),
                                                   (24, 32, 1, 9, 5), (3, 32, 1, 32, 2)])
def test_channels_last_kernel_computes_dense_layers(m, n, stride, size, batch, pattern):
    """P = 1 (a dense convolution: a stem's 3 input channels, say) on the channels-last
    kernel, as optimize_for_inference runs dense convolutions of channels_last models:
    forward with its ReLU, and both gradients, equal to the dense convolution's."""
    assert native.nhwc_supported(n, m, 1, pattern)
    assert not native.nhwc_supported(n + 8, m, 1, pattern)  # 16 | N still
    torch.manual_seed(m + n + size)
    cl = torch.channels_last
    wk = torch.randn(n, m, 3, 3, requires_grad=True)
    w1 = torch.zeros(n, 0, requires_grad=True)  # P = 1: no 1x1 part
    b = torch.randn(n, requires_grad=True)
    x = torch.randn(batch, m, size, size).contiguous(memory_format=cl).requires_grad_()
    y = native.native_conv2d(x, wk, w1, b, pattern, relu=True, stride=stride)
    ref = F.relu(F.conv2d(x, wk, b, stride, 1))
    assert y.is_contiguous(memory_format=cl) and y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, wk, b), g),
                         torch.autograd.grad(ref, (x, wk, b), g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,stride,pattern,p", [(128, 1, "shifted", 4), (80, 2, "shifted", 4),
                                                (128, 2, "blocked", 4), (160, 1, "shifted", 32)])
def test_channels_last_forward_over_many_pixels_matches_dense_reference(n, stride, pattern, p,
                                                                         threads):
    """Enough pixels and filter blocks for the pixel-major work split (each item runs every
    filter block over a chunk of pixels); N = 80: blocks of 4 and 1 vectors; P = 32: blocks
    of vectors 32 filters apart (4, 4, 1 and 1 vectors)."""
    m = 32
    torch.manual_seed(n + stride)
    wk, w1 = _weights(m, n, p)
    b = torch.randn(n)
    x = torch.randn(5, m, 28 * stride, 28 * stride).contiguous(memory_format=torch.channels_last)
    res = torch.randn(5, n, 28, 28).contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = native.native_conv2d(x, wk, w1, b, pattern, relu=True, residual=res, stride=stride)
    finally:
        torch.set_num_threads(before)
    ref = F.relu(_reference(x, wk, w1, b, pattern, stride=stride) + res)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("stride,size,batch", [(1, 32, 12), (2, 56, 4)])
def test_channels_last_forward_of_inputs_larger_than_l2_matches_dense_reference(stride, size,
                                                                               batch):
    """Inputs over 2 MiB prefetch the next output row's input as they go (image-major
    order): 2.4-3.1 MB here, tiles at every edge, and the transposed (input-gradient) pass
    of the stride-1 layer on a gradient as large."""
    m = n = 64
    torch.manual_seed(size)
    wk, w1 = _weights(m, n, 4)
    x = torch.randn(batch, m, size, size).contiguous(memory_format=torch.channels_last)
    assert x.numel() * 4 > 2 << 20
    x.requires_grad_(stride == 1)
    y = native.native_conv2d(x, wk, w1, None, "shifted", stride=stride)
    ref = _reference(x, wk, w1, None, "shifted", stride=stride)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    if stride == 1:
        g = torch.randn_like(y)
        got, = torch.autograd.grad(y, x, g)
        want, = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("m,n,p,size,batch", [(64, 64, 4, 8, 3), (128, 256, 8, 4, 9),
                                              (32, 48, 2, 7, 2), (64, 64, 16, 2, 17)])
@pytest.mark.parametrize("stride", [1, 2])
def test_channels_last_layer_runs_the_channels_last_kernel(m, n, p, size, batch, pattern, stride,
                                                           nhwc_runs):
    if pattern == "blocked" and (n // p) % 16:
        n = 16 * p
    torch.manual_seed(7)
    layer = hetconv.HetConv2d(m, n, 3, part=p, pattern=pattern, bias=True, stride=stride,
                              backend="native")
    x = torch.randn(batch, m, size, size).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = layer(x)
    assert nhwc_runs, "the channels-last kernel did not run"
    ref = _reference(x, layer.weight_k, layer.weight_1, layer.bias, pattern, stride=stride)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    leaves = (x, layer.weight_k, layer.weight_1, layer.bias)
    for got, want in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the transposed kernel (input gradient; at stride 2 a transposed strided convolution)
    # ran too where the transposed layer is one of its cases (outputs: the M channels), else
    # the NCHW kernel (stride 1) or the dense reference (stride 2) did
    assert len(nhwc_runs) == (2 if native.nhwc_supported(m, n, p, pattern) else 1)


def test_channels_last_blocks_of_shifted_high_part_are_vectors_p_filters_apart():
    """"shifted" with 16 | P: filters n and n + P share their class, so a block's vectors are
    P filters apart and read the same 16 channels - 4 vectors per block where N >= 4P (with
    consecutive filters every block would be one vector)."""
    lay = native._nhwc_layout(160, 64, 32, "shifted", 3, 3)
    assert lay["vs"] == 32 and lay["lw"] == 16
    assert lay["blk_n0"].tolist() == [0, 16, 128, 144]
    assert lay["blk_v"].tolist() == [4, 4, 1, 1]
    assert lay["blk_p0"].tolist() == [0, 64, 128, 144]  # packed: the blocks one after another
    assert lay["blk_toff"].tolist() == [0, 16, 0, 16]  # the first lane's class
    # the transposed layer (input gradient: 64 outputs over the 160 filters) likewise
    lay_t = native._nhwc_layout(160, 64, 32, "shifted", 3, 3, transposed=True)
    assert lay_t["vs"] == 32 and lay_t["blk_v"].tolist() == [2, 2]
    # P | 16 and "blocked" keep consecutive filters
    for p, pattern in ((8, "shifted"), (4, "blocked")):
        lay = native._nhwc_layout(256, 64, p, pattern, 3, 3)
        assert lay["vs"] == 16 and lay["blk_p0"].tolist() == lay["blk_n0"].tolist()
    # a block's centre weights: lane l of step c is filter n0 + l // 16 * 32 + l % 16's weight
    # on channel c (the packing gathers through these indices)
    lay = native._nhwc_layout(128, 64, 32, "shifted", 3, 3)
    lanes = torch.arange(64)
    want_rows = 16 + lanes // 16 * 32 + lanes % 16  # block 1: n0 = 16
    got = lay["w1_index"][64 * 64:128 * 64].view(64, 64).long()  # (channel, lane), flat (N, M)
    assert torch.equal(got // 64, want_rows.expand(64, 64))
    assert torch.equal(got % 64, torch.arange(64)[:, None].expand(64, 64))


@needs_kernel
@pytest.mark.parametrize("stride", [1, 2])
def test_channels_last_kernel_vectors_p_filters_apart_match_dense_reference(stride, nhwc_runs):
    """Blocks of 4, 4, 1 and 1 vectors 32 filters apart: forward with bias, residual and ReLU,
    the input gradient (its transposed layer: blocks of 2 vectors) and the weight gradient."""
    m, n, p = 64, 160, 32
    torch.manual_seed(stride)
    cl = torch.channels_last
    wk, w1 = _weights(m, n, p, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    x = torch.randn(3, m, 10, 9).contiguous(memory_format=cl).requires_grad_()
    ho, wo = (10 - 1) // stride + 1, (9 - 1) // stride + 1
    res = torch.randn(3, n, ho, wo).contiguous(memory_format=cl).requires_grad_()
    y = native.native_conv2d(x, wk, w1, b, "shifted", relu=True, residual=res, stride=stride)
    ref = F.relu(_reference(x, wk, w1, b, "shifted", stride=stride) + res)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    leaves = (x, wk, w1, b, res)
    for got, want in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(nhwc_runs) == 2  # the forward and the input gradient


@needs_kernel
@pytest.mark.parametrize("channels", [64, 32])
@pytest.mark.parametrize("batch,size,stride", [(1, 7, 1), (1, 5, 1), (16, 3, 1), (5, 1, 1),
                                               (3, 14, 2), (2, 9, 2)])
def test_channels_last_kernel_tail_tiles_match_dense_reference(batch, size, stride, channels):
    """Blocks of 4 vectors (N = M = 64: the input gradient's too) with tiles of 6 pixels, and
    the 4- and 2-pixel tiles for what is left: 49 and 25 pixels of one image, positions of 16
    images (position-major: 6 + 6 + 4) or of 5, and at stride 2 the input gradient's
    residue-order rows (14 columns: 7 + 7, 9 columns: 5 + 4). With 2 vectors (32 channels)
    tiles of 8, then 4 and 2 (5 pixels: 4 + 2); the weight gradient's channel tiles likewise
    (M/P = 16 with 4 vectors: 6 + 6 + 4; 8 with 2: 8)."""
    m = n = channels
    p = 4
    torch.manual_seed(batch * 100 + size)
    cl = torch.channels_last
    wk, w1 = _weights(m, n, p, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    x = torch.randn(batch, m, size, size).contiguous(memory_format=cl).requires_grad_()
    y = native.native_conv2d(x, wk, w1, b, "shifted", relu=True, stride=stride)
    ref = F.relu(_reference(x, wk, w1, b, "shifted", stride=stride))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    leaves = (x, wk, w1, b)
    for got, want in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
@settings(max_examples=50, deadline=None)
@given(p=st.sampled_from([1, 2, 4, 32]), m_k=st.integers(1, 4), vectors=st.integers(1, 6),
       half_h=st.integers(1, 7), half_w=st.integers(1, 9), batch=st.integers(1, 20),
       pattern=st.sampled_from(PATTERNS), bias=st.booleans(), stride=st.sampled_from([1, 2]),
       epilogue=st.sampled_from(["none", "relu", "residual", "both"]),
       threads=st.sampled_from([1, 2, 3]))
def test_channels_last_kernel_fused_max_pool_matches_conv_then_pool(
        p, m_k, vectors, half_h, half_w, batch, pattern, bias, stride, epilogue, threads):
    """pool = 2: the kernel writes F.max_pool2d(relu(conv + residual), 2) only. Planes of
    every size (position-major up to 64 pixels with several images, image-major tiles that
    cross output rows), filter blocks of 1-4 vectors, 1-3 threads (a window's four pixels
    must be one thread's: the first stores, the others take the maximum)."""
    p, _, m, n = _nhwc_sizes(p, m_k, vectors, pattern)
    torch.manual_seed(batch * 1000 + half_h * 10 + half_w)
    cl = torch.channels_last
    wk = torch.randn(n, m // p, 3, 3)
    w1 = torch.randn(n, m - m // p)
    b = torch.randn(n) if bias else None
    h, w = 2 * half_h * stride, 2 * half_w * stride  # even outputs: 2 half_h x 2 half_w
    x = torch.randn(batch, m, h, w).contiguous(memory_format=cl)
    res = (torch.randn(batch, n, 2 * half_h, 2 * half_w).contiguous(memory_format=cl)
           if epilogue in ("residual", "both") else None)
    relu = epilogue in ("relu", "both")
    pk = native._nhwc_packed(wk, w1, b, pattern, n, m, p)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = native._run_nhwc(x, pk, n, relu=relu, residual=res, stride=stride, pool=2)
    finally:
        torch.set_num_threads(before)
    ref = _reference(x, wk, w1, b, pattern, stride=stride)
    if res is not None:
        ref = ref + res
    ref = F.max_pool2d(F.relu(ref) if relu else ref, 2)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=cl)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_channels_last_kernel_refuses_a_pool_it_cannot_fuse():
    cl = torch.channels_last
    wk, w1 = _weights(16, 16, 4)
    pk = native._nhwc_packed(wk, w1, None, "shifted", 16, 16, 4)
    x = torch.randn(2, 16, 5, 6).contiguous(memory_format=cl)  # a 5x6 output: odd height
    x4 = torch.randn(2, 16, 4, 6).contiguous(memory_format=cl)
    with pytest.raises(ValueError, match="pool must be 0 or 2.*5x6"):
        native._run_nhwc(x, pk, 16, pool=2)
    with pytest.raises(ValueError, match="pool must be 0 or 2"):
        native._run_nhwc(x4, pk, 16, pool=3)
    # the residual is the unpooled output's shape
    with pytest.raises(ValueError, match=r"residual must be .*\(2, 16, 4, 6\)"):
        native._run_nhwc(x4, pk, 16, pool=2, residual=torch.randn(2, 16, 2, 3))
    # the plans: none for a pool on the NCHW kernel or on an odd output
    assert native.ForwardPlan.build(x4.contiguous(), wk, w1, None, "shifted", True,
                                    None, 1, pool=2) is None
    assert native.ForwardPlan.build(x, wk, w1, None, "shifted", True, None, 1, pool=2) is None
    plan = native.ForwardPlan.build(x4, wk, w1, None, "shifted", True, None, 1, pool=2)
    assert plan.shape == (2, 16, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(plan.run(x4, None, wk, w1, None), F.max_pool2d(
            F.relu(_reference(x4, wk, w1, None, "shifted")), 2), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_channels_last_kernel_refuses_blocks_outside_the_layer():
    """The C side checks the filter blocks it is handed: a block whose vectors or packed
    weights reach past N, or with more than 4 vectors, is refused (code -1), not run."""
    cl = torch.channels_last
    wk, w1 = _weights(64, 64, 4)
    x = torch.randn(1, 64, 5, 5).contiguous(memory_format=cl)
    pk = native._nhwc_packed(wk, w1, None, "shifted", 64, 64, 4)
    assert pk["nfb"] == 1 and pk["blk_v"].tolist() == [4]
    for field, bad in (("blk_n0", 16), ("blk_p0", 16), ("blk_v", 5), ("blk_v", 0)):
        shape, call = native._nhwc_call(tuple(x.shape), pk, 64, False, 1)
        y = torch.empty(shape).contiguous(memory_format=cl)
        assert call(x, y, None) == 0
        t = torch.tensor([bad], dtype=torch.int32)
        setattr(call.args, field, t.data_ptr())  # this call's struct only, not the packing
        assert call(x, y, None) == -1, (field, bad)
    torch.testing.assert_close(native._run_nhwc(x, pk, 64),
                               _reference(x, wk, w1, None, "shifted"), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_channels_last_kernel_refuses_a_pixel_order_its_stride_does_not_take():
    """The transposed strided layer (up > 1: a stride-2 input gradient) runs in residue order
    only, and the residue order only with it: the C side refuses (code -1) any other pairing
    or an order it does not know, and runs the pairings Python hands it."""
    cl = torch.channels_last
    torch.manual_seed(5)
    wk, w1 = _weights(32, 32, 4)
    pk = native._nhwc_packed(wk, w1, None, "shifted", 32, 32, 4, True)
    gy = torch.randn(2, 32, 4, 4).contiguous(memory_format=cl)
    shape, call = native._nhwc_call(tuple(gy.shape), pk, 32, False, 1, up=2, out_size=(8, 8))
    y = torch.empty(shape).contiguous(memory_format=cl)
    assert call.args.posmajor == 2 and call(gy, y, None) == 0
    # the gradient of a stride-2 layer with these weights at its input (independent: autograd
    # through the dense reference)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    out = _reference(x, wk, w1, None, "shifted", stride=2)
    want, = torch.autograd.grad(out, x, gy)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    for up, order in ((2, 0), (2, 1), (1, 2), (2, 3), (1, -1), (0, 0)):
        call.args.up, call.args.posmajor = up, order
        assert call(gy, y, None) == -1, (up, order)


@needs_kernel
@pytest.mark.parametrize("offset", [0, 1, 4])
def test_channels_last_kernel_writes_any_output_alignment(offset):
    """The forward streams its output past the caches where a row is 64-byte aligned (a
    torch allocation is) and stores it plainly elsewhere: an output 4 and 16 bytes off a
    cache line gets the same values, with and without a residual, and nothing around it."""
    cl = torch.channels_last
    torch.manual_seed(11)
    wk, w1 = _weights(32, 64, 4)
    x = torch.randn(3, 32, 7, 7).contiguous(memory_format=cl)
    res = torch.randn(3, 64, 7, 7).contiguous(memory_format=cl)
    pk = native._nhwc_packed(wk, w1, None, "shifted", 64, 32, 4)
    shape, call = native._nhwc_call(tuple(x.shape), pk, 64, True, 1)
    n = 3 * 64 * 7 * 7
    for r in (None, res):
        buf = torch.full((n + 8,), -7.0)
        y = buf[offset:offset + n].view(3, 7, 7, 64).permute(0, 3, 1, 2)  # channels_last
        assert y.is_contiguous(memory_format=cl) and y.data_ptr() % 64 == 4 * offset % 64
        assert call(x, y, r) == 0
        want = F.relu(_reference(x, wk, w1, None, "shifted") + (0 if r is None else r))
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
        assert (buf[:offset] == -7).all() and (buf[offset + n:] == -7).all()


@needs_kernel
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("n_out, part", [(64, 4), (48, 8)])  # tiles of 6 and of 8 pixels
def test_channels_last_forward_interior_tiles(stride, n_out, part):
    """Large planes (image-major order): most tiles lie in one output row with every tap
    inside the image and take the short set-up (rows at fixed offsets from the first
    pixel's); the others (row ends, borders, tails) the general one. With bias, residual and
    ReLU, both equal the dense reference, and so does the input gradient through the same
    kernel."""
    cl = torch.channels_last
    torch.manual_seed(12 + stride)
    wk, w1 = _weights(32, n_out, part, requires_grad=True)
    bias = torch.randn(n_out)
    x = torch.randn(2, 32, 31, 31).contiguous(memory_format=cl).requires_grad_(True)
    ho = (31 + 2 - 3) // stride + 1  # 31 or 16 columns: whole interior tiles in each row
    res = torch.randn(2, n_out, ho, ho).contiguous(memory_format=cl)
    y = native.native_conv2d(x, wk, w1, bias, "shifted", True, res, stride)
    want = F.relu(_reference(x, wk, w1, bias, "shifted", stride=stride) + res)
    assert y.is_contiguous(memory_format=cl)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    _assert_same_grads(y, want, (x, wk, w1), 1e-3)


@needs_kernel
@pytest.mark.parametrize("part", [2, 4])
def test_channels_last_one_by_one_layer_trains(part, nhwc_runs):
    """A 1x1 HetConv on channels_last input: no taps beside the centre, so no tap map; its
    weight gradient ran into the kernel's argument check (code -1) before. Forward and
    backward against the dense reference."""
    cl = torch.channels_last
    torch.manual_seed(part)
    wk, w1 = _weights(32, 32, part, k=1, requires_grad=True)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=cl).requires_grad_(True)
    y = native.native_conv2d(x, wk, w1, None, "shifted")
    want = _reference(x, wk, w1, None, "shifted")
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    _assert_same_grads(y, want, (x, wk, w1), 1e-3)
    assert nhwc_runs


@needs_kernel
@pytest.mark.parametrize("part", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("batch,h,w", [(2, 32, 32), (1, 9, 26), (3, 5, 50), (1, 30, 25)])
def test_channels_last_16_channel_tiles_match_dense_reference(part, batch, h, w, nhwc_runs):
    """16 -> 16 channels at stride 1 ("shifted"): the forward and the input gradient take
    the rows' interior stretches in tiles of 24 pixels (one base for all their rows), the
    weight gradient the interior pixels' taps and centre in passes of up to 24 sums; the
    border pixels, the row ends and 25-column rows (23 interior pixels: no such tile) the
    general tiles (P = 1: the weight gradient's general passes, its 16 steps per tap). With
    bias, residual and ReLU: the dense reference, forward and backward, and the same bits on
    1 and 3 threads."""
    cl = torch.channels_last
    torch.manual_seed(part * 100 + w)
    wk, w1 = _weights(16, 16, part, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    x = torch.randn(batch, 16, h, w).contiguous(memory_format=cl).requires_grad_(True)
    res = torch.randn(batch, 16, h, w).contiguous(memory_format=cl)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            y = native.native_conv2d(x, wk, w1, bias, "shifted", True, res)
            want = F.relu(_reference(x, wk, w1, bias, "shifted") + res)
            torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
            outs.append((y, *_assert_same_grads(y, want, (x, wk, w1, bias), 1e-3)))
    finally:
        torch.set_num_threads(threads)
    assert len(nhwc_runs) >= 4  # each forward and input gradient in the channels-last kernel
    torch.manual_seed(0)
    gy = torch.randn(batch, 16, h, w).contiguous(memory_format=cl)
    grads = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            grads.append(native._weight_grad(x.detach(), gy, wk.detach(), w1.detach(),
                                             "shifted", 1))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert torch.equal(outs[0][0], outs[1][0])


@needs_kernel
@pytest.mark.parametrize("batch,size", [(5, 9), (1, 7), (2, 3)])
def test_channels_last_kernel_does_not_depend_on_thread_count(batch, size):
    """1 thread and 2-3: the same bits. 5 x 9 x 9 pixels: the forward's items taken
    dynamically; 1 x 7 x 7 and 2 x 3 x 3 (fewer than 64 pixels): split statically."""
    torch.manual_seed(8)
    x = torch.randn(batch, 64, size, size).contiguous(memory_format=torch.channels_last)
    wk, w1 = _weights(64, 80, 4)
    gy = torch.randn(batch, 80, size, size).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, max(2, threads), 3):
            torch.set_num_threads(t)
            out.append((native.native_conv2d(x, wk, w1),
                        *native._weight_grad(x, gy, wk, w1, "shifted", 1)))
    finally:
        torch.set_num_threads(threads)
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert torch.equal(a, b)


@needs_kernel
@pytest.mark.parametrize("batch,size", [(1, 57), (3, 56), (2, 9)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_channels_last_strided_input_gradient_matches_dense_reference(batch, size, pattern):
    """The stride-2 input gradient (a transposed strided convolution, run in residue order:
    a tile's pixels in one row, one column residue) on odd and even sizes."""
    torch.manual_seed(batch * 100 + size)
    m, n, p = 64, 32, 2  # the transposed layer: 64 outputs reading 32 channels
    wk, w1 = _weights(m, n, p, requires_grad=True)
    x = torch.randn(batch, m, size, size).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = native.native_conv2d(x, wk, w1, None, pattern, stride=2)
    gy = torch.randn_like(y)
    got = native._input_grad(gy.contiguous(memory_format=torch.channels_last), wk.detach(),
                             w1.detach(), pattern, 2, size, size)
    want, = torch.autograd.grad(_reference(x, wk, w1, None, pattern, stride=2), x, gy)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch,size", [(4, 64), (3, 45), (5, 45)])
def test_channels_last_weight_gradient_over_many_pixels(stride, batch, size):
    """Enough pixel ranges for the pixel-major split of the weight gradient (1 thread: each
    range runs every filter block) and a thread count where it is block-major (3): the same
    bits, and the dense reference's gradient. 3 x 45 x 45 pixels: ranges of 2025, which the
    passes' chunks (256 pixels at stride 1, 64 at stride 2) do not divide; 5 x 45 x 45: 5
    ranges rounded up to 8, of 1266 pixels (the last 1263)."""
    torch.manual_seed(9 + stride)
    m, n, p = 32, 80, 4  # N = 80: filter blocks of 4 and 1 vectors
    x = torch.randn(batch, m, size * stride, size * stride).contiguous(
        memory_format=torch.channels_last)
    wk, w1 = _weights(m, n, p, requires_grad=True)
    gy = torch.randn(batch, n, size, size).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            out.append(native._weight_grad(x, gy, wk.detach(), w1.detach(), "shifted", stride))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*out):
        assert torch.equal(a, b)
    ref = torch.autograd.grad(_reference(x, wk, w1, None, "shifted", stride=stride), (wk, w1), gy)
    for got, want in zip(out[0], ref):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("channels,cl,cl_params", [(8, False, False), (32, True, False),
                                                   (32, True, True), (8, False, True)])
def test_compiled_layer_runs_native_as_one_op(channels, cl, cl_params):
    # NCHW: the pixel-vectorised kernel; channels_last: the channels-last one; cl_params: the
    # layer's 4-D parameters in channels_last too (model.to(memory_format=...) does that)
    torch._dynamo.reset()  # each case compiles afresh (no recompile limit across cases)
    torch.manual_seed(6)
    layer = hetconv.HetConv2d(channels, channels, 3, part=4, bias=True, backend="native")
    fmt = torch.channels_last if cl else torch.contiguous_format
    if cl_params:
        layer.to(memory_format=torch.channels_last)
    x = torch.randn(2, channels, 10, 10).contiguous(memory_format=fmt)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, layer(x))
    x.requires_grad_(True)
    compiled(x).sum().backward()
    ref = [t.grad.clone() for t in (x, layer.weight_k, layer.weight_1)]
    x.grad = layer.weight_k.grad = layer.weight_1.grad = None
    layer(x).sum().backward()
    for t, want in zip((x, layer.weight_k, layer.weight_1), ref):
        torch.testing.assert_close(t.grad, want)
    assert layer.weight_k.grad.stride() == layer.weight_k.stride()


@needs_kernel
@pytest.mark.parametrize("weights", ["channels_last", "strided"])
@pytest.mark.parametrize("input_cl", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_weights_in_either_layout_or_strided(weights, input_cl, pattern):
    """The packings gather from, and the weight gradient scatters into, weight_k's own
    storage order: channels_last parameters (``model.to(memory_format=...)``) and
    non-dense views give the dense reference's results, forward and backward."""
    torch.manual_seed(7)
    n, m, p = 32, 32, 4
    if weights == "channels_last":
        wk = torch.randn(n, m // p, 3, 3).contiguous(memory_format=torch.channels_last)
    else:  # every other channel of a larger tensor: neither layout
        wk = torch.randn(n, 2 * m // p, 3, 3)[:, ::2]
    wk = wk.detach().requires_grad_(True)
    w1 = torch.randn(n, m - m // p, requires_grad=True)
    x = torch.randn(3, m, 7, 6)
    if input_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = native.native_conv2d(x, wk, w1, None, pattern)
    ref = _reference(x, wk, w1, None, pattern)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    got = _assert_same_grads(y, ref, (x, wk, w1), 1e-4)
    if weights == "channels_last":  # in the parameter's layout: autograd keeps it as it is
        assert got[1].stride() == wk.stride()


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)


CHECK = """
    import torch, torch.nn.functional as F
    from hetconv import native, functional as HF
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9)
    wk, w1 = torch.randn(6, 2, 3, 3), torch.randn(6, 6)
    y = HF.het_conv2d(x, wk, w1, backend="native")
    ref = F.conv2d(x, HF.dense_weight(wk, w1), None, 1, 1)
    assert (y - ref).abs().max() < 1e-4, (y - ref).abs().max()
    leaves = [t.requires_grad_() for t in (x, wk, w1)]
    g = torch.randn_like(ref)
    y = HF.het_conv2d(x, wk, w1, backend="native")
    ref = F.conv2d(x, HF.dense_weight(wk, w1), None, 1, 1)
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g)):
        assert (a - b).abs().max() < 1e-3, (a - b).abs().max()
    y2 = HF.het_conv2d(x, wk, w1, stride=2, backend="native")
    ref2 = F.conv2d(x, HF.dense_weight(wk, w1), None, 2, 1)
    assert (y2 - ref2).abs().max() < 1e-4, (y2 - ref2).abs().max()
    # the channels-last kernel: forward and backward; 96 and 128 filters are two filter
    # blocks (the second's filter offset is not zero; "blocked": nor its channel offset),
    # stride 2 runs the input gradient in residue order
    xc = torch.randn(3, 32, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    for n, s, pat in ((32, 1, "shifted"), (96, 1, "shifted"), (96, 2, "shifted"),
                      (128, 1, "blocked")):
        wc, w1c = torch.randn(n, 8, 3, 3).requires_grad_(), torch.randn(n, 24).requires_grad_()
        y3 = HF.het_conv2d(xc, wc, w1c, stride=s, pattern=pat, backend="native")
        assert y3.is_contiguous(memory_format=torch.channels_last) or not native.available()
        ref3 = F.conv2d(xc, HF.dense_weight(wc, w1c, pat), None, s, 1)
        assert (y3 - ref3).abs().max() < 1e-3, (n, s, pat, (y3 - ref3).abs().max())
        g3 = torch.randn_like(ref3)
        for a, b in zip(torch.autograd.grad(y3, (xc, wc, w1c), g3),
                        torch.autograd.grad(ref3, (xc, wc, w1c), g3)):
            assert (a - b).abs().max() < 1e-2, (n, s, pat, (a - b).abs().max())
    # ... with a 2x2 max-pool in its epilogue (residual and ReLU before it)
    if native.available():
        with torch.no_grad():
            wc, w1c, bc = torch.randn(96, 8, 3, 3), torch.randn(96, 24), torch.randn(96)
            xp = xc.detach()[:, :, :4]
            r = torch.randn(3, 96, 4, 6).contiguous(memory_format=torch.channels_last)
            pk = native._nhwc_packed(wc, w1c, bc, "shifted", 96, 32, 4)
            y4 = native._run_nhwc(xp, pk, 96, relu=True, residual=r, pool=2)
            ref4 = F.max_pool2d(F.relu(F.conv2d(xp, HF.dense_weight(wc, w1c), bc, 1, 1) + r), 2)
            assert (y4 - ref4).abs().max() < 1e-3, (y4 - ref4).abs().max()
    print(native.available(), native.vectorized(), native.build_error())
"""


def test_disabled_kernel_falls_back(tmp_path):
    out = _python(CHECK, {"HETCONV_DISABLE_NATIVE": "1", "HETCONV_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False False") and "HETCONV_DISABLE_NATIVE" in out.stdout


def test_failed_build_falls_back_and_says_why(tmp_path):
    out = _python(CHECK, {"CC": "false", "HETCONV_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False False") and "false failed" in out.stdout
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".so")]


@pytest.mark.skipif(not HAS_CC or not sys.platform.startswith("linux")
                    or platform.machine() != "x86_64", reason="needs a C compiler on x86-64 Linux")
def test_portable_build_without_avx512_is_correct(tmp_path):
    # The scalar loops (what a CPU without AVX-512 runs) against the dense reference.
    out = _python(CHECK, {"HETCONV_NATIVE_MARCH": "x86-64", "HETCONV_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True False None")


@needs_kernel
@pytest.mark.parametrize("relu", [False, True])
def test_fused_residual_forward_and_backward(relu):
    torch.manual_seed(7)
    x = torch.randn(3, 8, 9, 7, requires_grad=True)
    wk, w1 = _weights(8, 12, 4, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    r = torch.randn(3, 12, 9, 7, requires_grad=True)
    y = native.native_conv2d(x, wk, w1, b, "shifted", relu=relu, residual=r)
    ref = _reference(x, wk, w1, b, "shifted") + r
    ref = F.relu(ref) if relu else ref
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    leaves = (x, wk, w1, b, r)
    for got, want in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_residual_of_the_wrong_shape_is_refused():
    x = torch.randn(2, 8, 5, 5)
    wk, w1 = _weights(8, 4, 4)
    with pytest.raises(ValueError, match="residual must be"):
        native.native_conv2d(x, wk, w1, residual=torch.randn(2, 4, 5, 4))


@needs_kernel
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("size", [(16, 16), (15, 9), (2, 3)])
def test_stride_two_with_fused_epilogue(size, relu, runs):
    torch.manual_seed(8)
    x = torch.randn(2, 16, *size, requires_grad=True)
    wk, w1 = _weights(16, 8, 4, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    ref = _reference(x, wk, w1, b, "shifted", stride=2)
    r = torch.randn_like(ref, requires_grad=True)
    y = HF.het_conv2d(x, wk, w1, b, stride=2, backend="native")
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    fused = native.native_conv2d(x, wk, w1, b, "shifted", relu=relu, residual=r, stride=2)
    want = F.relu(ref + r) if relu else ref + r
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)
    assert len(runs) == 2
    g = torch.randn_like(want)
    leaves = (x, wk, w1, b, r)
    for got, exp in zip(torch.autograd.grad(fused, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)


def _chunks(positions):
    return -(-positions // 16)


@needs_kernel
@pytest.mark.skipif(not native.vectorized(), reason="in-place reads are AVX-512 only")
@pytest.mark.parametrize("kernel", [(3, 3), (5, 5), (1, 3), (3, 1), (1, 1)])
def test_stride_one_reads_in_place_where_that_computes_fewer_positions(kernel):
    """In place: H*W positions; padded copies: H rows of W + kw // 2 (the zero columns
    between rows are computed too). The kernel reads in place from 10% fewer chunks."""
    kh, kw = kernel
    for h in range(1, 40):
        for w in (h, h + 3, 2 * h):
            fewer = 10 * _chunks(h * w) <= 9 * _chunks(h * (w + kw // 2))
            assert native.reads_in_place(h, w, kernel) == fewer, (h, w, kernel)
    assert native.reads_in_place(8, 8) and native.reads_in_place(4, 4)
    assert not native.reads_in_place(7, 7) and not native.reads_in_place(32, 32)


@needs_kernel
@pytest.mark.skipif(not native.vectorized(), reason="in-place reads are AVX-512 only")
@pytest.mark.parametrize("m,n,p", [(16, 16, 4), (40, 24, 2), (64, 8, 8), (12, 6, 3)])
@pytest.mark.parametrize("size,kernel", [((8, 8), (3, 3)), ((4, 4), (3, 3)), ((12, 12), (5, 5)),
                                         ((8, 8), (1, 3)), ((8, 8), (5, 3)), ((4, 12), (3, 3))])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_in_place_reads_match_dense_reference(m, n, p, size, kernel, pattern, runs):
    """Planes read in place (border taps masked off): classes of more than 16 channels
    (the tap loop's runs), blocks mixing classes (n < 4p), residual, ReLU, bias, the input
    gradient (the same kernel, transposed) and a batch spread over both threads."""
    assert native.reads_in_place(*size, kernel)
    torch.manual_seed(m + n + p + size[1] + kernel[1])
    x = torch.randn(5, m, *size, requires_grad=True)
    wk = torch.randn(n, m // p, *kernel, requires_grad=True)
    w1 = torch.randn(n, m - m // p, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    ref = _reference(x, wk, w1, b, pattern)
    r = torch.randn_like(ref, requires_grad=True)
    y = native.native_conv2d(x, wk, w1, b, pattern, relu=True, residual=r)
    want = F.relu(ref + r)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(want)
    leaves = (x, wk, w1, b, r)
    for got, exp in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)
    assert len(runs) == 2  # forward and input gradient
    with torch.no_grad():
        torch.testing.assert_close(native.native_conv2d(x[:1], wk, w1, None, pattern),
                                   _reference(x[:1], wk, w1, None, pattern),
                                   rtol=1e-4, atol=1e-4)


def test_unwritable_cache_dir_falls_back_to_a_temp_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env = {"HETCONV_CACHE_DIR": str(blocker / "cache"), "TMPDIR": str(tmp_path)}
    out = _python(CHECK, env)
    assert out.returncode == 0, out.stderr
    if HAS_CC and sys.platform.startswith("linux"):
        assert out.stdout.startswith("True")
        assert any(p.startswith("hetconv-") for p in os.listdir(tmp_path))


@needs_kernel
def test_empty_channels_last_batch_gives_a_channels_last_result():
    """An empty batch is contiguous in both layouts; its strides say it is channels_last."""
    x = torch.randn(0, 32, 3, 4).contiguous(memory_format=torch.channels_last)
    wk, w1 = _weights(32, 16, 2)
    y = native.native_conv2d(x, wk, w1, None, "shifted")
    assert y.shape == (0, 16, 3, 4) and y.is_contiguous(memory_format=torch.channels_last)
    assert y.stride(1) == 1
    y = native.native_conv2d(torch.randn(0, 32, 3, 4), wk, w1, None, "shifted")
    assert y.stride(3) == 1 and y.stride(1) != 1  # NCHW stays NCHW


@needs_kernel
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("m, n, p, stride", [(16, 16, 4, 1), (32, 64, 4, 2), (64, 64, 8, 1)])
def test_layer_inference_calls_reuse_a_prepared_kernel_call(m, n, p, stride, layout, monkeypatch):
    """HetConv2d's inference calls that run the native kernel prepare the call once per input
    signature; what they return (values and memory layout) is what het_conv2d returns, and
    every weight change shows in the next call."""
    torch.manual_seed(m + n + p + stride)
    cl = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    layer = hetconv.HetConv2d(m, n, 3, stride=stride, part=p, bias=True).eval()
    x = torch.randn(3, m, 10, 10).contiguous(memory_format=cl)
    builds, picks = [], []
    real_build, real_select = native.ForwardPlan.build, HF._select
    monkeypatch.setattr(native.ForwardPlan, "build",
                        lambda *a, **k: builds.append(1) or real_build(*a, **k))
    monkeypatch.setattr(HF, "_select", lambda *a, **k: picks.append(1) or real_select(*a, **k))

    def check():
        with torch.no_grad():
            got = layer(x)
            want = HF.het_conv2d(x, layer.weight_k, layer.weight_1, layer.bias, layer.stride,
                                 layer.padding, layer.dilation, layer.pattern, layer.backend)
            ref = F.conv2d(x, layer.dense_weight(), layer.bias, stride, 1)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got.stride() == want.stride()

    with torch.no_grad():
        first = HF._select(x, layer.weight_k, layer.weight_1, layer.stride, layer.dilation,
                           layer.pattern, layer.padding)[0]
    picks.clear()
    for _ in range(3):
        check()
    native_run = first == "native"
    # native: the backend chosen once per signature, then the prepared call, by the layer
    # and by het_conv2d (check()'s reference calls); otherwise the full path each time, by
    # both (plus the layer's one choice to learn that)
    assert len(picks) == (2 if native_run else 3 + 1 + 3)
    assert len(builds) == 2 * int(native_run)
    with torch.no_grad():
        layer.weight_k.mul_(-2.0)
    check()
    layer.weight_1.data = torch.randn_like(layer.weight_1)
    check()
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
    check()
    layer.backend = "dense"  # another backend: its own signature, no stale kernel call
    calls = []
    real_launch = native._launch
    monkeypatch.setattr(native, "_launch", lambda *a, **k: calls.append(1) or real_launch(*a, **k))
    check()
    assert not calls
    layer.backend = "auto"
    # under autograd: the recorded path, gradients as the dense reference's
    xg = x.clone().requires_grad_()
    out = layer(xg)
    out.square().sum().backward()
    ref_x = x.clone().requires_grad_()
    F.conv2d(ref_x, layer.dense_weight(), layer.bias, stride, 1).square().sum().backward()
    torch.testing.assert_close(xg.grad, ref_x.grad, rtol=1e-3, atol=1e-3)


@needs_kernel
def test_layer_with_prepared_calls_copies_and_pickles():
    import copy
    import io

    layer = hetconv.HetConv2d(16, 16, 3, part=4, backend="native").eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        want = layer(x)
        assert layer.__dict__.get("_plans")
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        for other in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):
            assert not other.__dict__.get("_plans")
            torch.testing.assert_close(other(x), want)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_caches_survive_many_shapes_in_turn(threads):
    """The NCHW kernel keeps its per-thread padded buffers and geometries between calls:
    cycling through more shapes than it keeps (sizes, strides, channel counts, in turn, twice),
    every call still equals the dense reference, borders included."""
    torch.manual_seed(11)
    layers = {m: hetconv.HetConv2d(m, 8, 3, part=4, bias=True) for m in (4, 8, 12)}
    cases = [(m, size, stride) for size in range(5, 15) for stride in (1, 2)
             for m in ((4, 8) if size % 2 else (12,))]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for _ in range(2):
                for m, size, stride in cases:
                    layer = layers[m]
                    x = torch.randn(2, m, size, size + 1) * 3 + 1  # no zero mean: borders show
                    got = native.native_conv2d(x, layer.weight_k, layer.weight_1, layer.bias,
                                               layer.pattern, stride=stride)
                    want = F.conv2d(x, layer.dense_weight(), layer.bias, stride, 1)
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(old)


def _padded_image_bytes(m, h, w):
    """Bytes of one image's zero-padded planes for a 3x3 kernel at stride 1 (each plane:
    h + 2 rows of w + 1 floats plus one: csrc/hetconv_cpu.c, "Geometry")."""
    return 4 * m * ((h + 2) * (w + 1) + 1)


@needs_kernel
def test_release_buffers_frees_the_per_thread_scratch():
    """release_buffers() frees the padded-image buffers of the calling thread's team and
    reports how much; the counts drop by that; calls afterwards allocate again and are
    still right."""
    torch.manual_seed(5)
    layer = hetconv.HetConv2d(24, 16, 3, part=4, backend="native").eval()
    x = torch.randn(3, 24, 20, 18)
    with torch.no_grad():
        layer(x)
        before = native.scratch_held()
        assert before["pad_bytes"] >= _padded_image_bytes(24, 20, 18)
        assert before["geometries"] >= 1
        freed = native.release_buffers()
        after = native.scratch_held()
        assert freed >= _padded_image_bytes(24, 20, 18)
        assert after["pad_bytes"] <= before["pad_bytes"] - freed  # (< if another thread exited)
        assert after["geometries"] < before["geometries"]
        assert native.release_buffers() == 0
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.dense_weight(), layer.bias,
                                                      1, 1), rtol=1e-4, atol=1e-4)
        assert native.scratch_held()["pad_bytes"] > after["pad_bytes"]


@needs_kernel
def test_scratch_of_exited_threads_is_freed():
    """Threads that ran the kernel and exited (each with its own OpenMP team) leave no
    scratch behind: what all threads hold comes back to what it was."""
    torch.manual_seed(6)
    layer = hetconv.HetConv2d(32, 32, 3, part=4, backend="native").eval()
    x = torch.randn(1, 32, 24, 24)
    results = []

    def work():
        with torch.no_grad():
            results.append(layer(x))
    import threading
    import time

    base = native.scratch_held()
    for _ in range(6):
        t = threading.Thread(target=work)
        t.start()
        t.join()
    assert len(results) == 6
    deadline = time.monotonic() + 10  # a team's threads exit just after their master

    def left():  # what the exited threads would have left (another thread's own exit, if
        held = native.scratch_held()  # any, can only lower it)
        return [held[k] - base[k] for k in held if held[k] > base[k]]
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left()
    want = F.conv2d(x, layer.dense_weight(), layer.bias, 1, 1)
    for got in results:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [0, -2, 1.5, "2", True])
def test_release_buffers_refuses_a_bad_thread_count(threads):
    with pytest.raises(ValueError, match="threads must be a positive int"):
        native.release_buffers(threads)


@needs_kernel
def test_fma_loop_runs_every_step_of_every_chain():
    """The FMA loop behind native.fma_rate computes a = a * b + c, iters times, in
    16 * 24 lanes per thread: from a = 0 that is iters (b = 1) or 2^iters - 1 (b = 2)."""
    lanes = native.FMA_LOOP_FLOPS // 2
    assert lanes == 16 * 24
    lib = native._load()
    assert lib.hetconv_fma_loop(1000, 2, 1.0, 1.0) == lanes * 1000 * 2
    assert lib.hetconv_fma_loop(10, 1, 2.0, 1.0) == lanes * (2 ** 10 - 1)
    assert lib.hetconv_fma_loop(0, 3, 1.0, 1.0) == 0


@needs_kernel
def test_fma_rate_is_flops_over_the_median_call():
    # A fake clock: each reading advances by the next duration, so every call "takes" the
    # listed time. Calibration: one call of 0.01 s >= seconds / 4, so iters = 1000 * 0.04 /
    # 0.01 = 4000; then 5 timed calls whose median is 0.02 s.
    durations = iter([0.01, 0.03, 0.02, 0.01, 0.05, 0.02])
    now = [0.0]

    def clock():
        if clock.started:
            now[0] += next(durations)
        clock.started = not clock.started
        return now[0]
    clock.started = False
    rate = native.fma_rate(threads=2, seconds=0.04, repeats=5, timer=clock)
    assert rate == pytest.approx(2 * 16 * 24 * 4000 * 2 / 0.02 / 1e9)


def test_fma_rate_rejects_bad_arguments():
    for kwargs, name in (({"threads": 0}, "threads"), ({"threads": True}, "threads"),
                         ({"repeats": 0}, "repeats"), ({"seconds": -1.0}, "seconds"),
                         ({"seconds": float("nan")}, "seconds")):
        with pytest.raises(ValueError, match=name):
            native.fma_rate(**kwargs)


@needs_kernel
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_functional_calls_keep_their_prepared_native_call(layout, monkeypatch):
    """het_conv2d keeps an inference call's prepared native call per weight_k and call
    signature: a repeated call runs it (no backend choice, no packing lookup), bit-equal to
    the first; weights updated in place, replaced or another bias are followed; calls that
    do not run the kernel are remembered as such; autograd, lists as arguments and
    unbatched input take the full path; the kept calls do not keep the weights alive."""
    import gc
    import weakref

    torch.manual_seed(21)
    wk, w1, b = torch.randn(32, 8, 3, 3), torch.randn(32, 24), torch.randn(32)
    x = torch.randn(2, 32, 9, 9).contiguous(memory_format=layout)

    def ref(bias=b):
        return F.conv2d(x, HF.dense_weight(wk, w1, "shifted"), bias, 1, 1)

    with torch.no_grad():
        first = HF.het_conv2d(x, wk, w1, b, backend="native")
        entry = HF._CALL_PLANS[id(wk)]
        plan, = entry[1].values()
        assert isinstance(plan, HF._CallPlan)
        # the repeat runs the kept call alone
        monkeypatch.setattr(HF, "_resolve", None)
        monkeypatch.setattr(native, "_nhwc_packed", None)
        monkeypatch.setattr(native, "_packed", None)
        assert torch.equal(HF.het_conv2d(x, wk, w1, b, backend="native"), first)
        monkeypatch.undo()
        torch.testing.assert_close(first, ref(), rtol=1e-4, atol=1e-4)
        w1.mul_(-1.0)  # in place: prepared again
        torch.testing.assert_close(HF.het_conv2d(x, wk, w1, b, backend="native"), ref(),
                                   rtol=1e-4, atol=1e-4)
        # views of the same storage (same pointer and version): the tensors' identity
        bz = b.as_strided((32,), (0,))
        torch.testing.assert_close(HF.het_conv2d(x, wk, w1, bz, backend="native"), ref(bz),
                                   rtol=1e-4, atol=1e-4)
        b2 = torch.randn(32)  # another bias tensor, the same signature
        torch.testing.assert_close(HF.het_conv2d(x, wk, w1, b2, backend="native"), ref(b2),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(HF.het_conv2d(x, wk, w1, None, backend="native"), ref(None),
                                   rtol=1e-4, atol=1e-4)
        wks, w1s = torch.randn(24, 8, 3, 3), torch.randn(24, 24)  # a square weight_1
        for w in (w1s, w1s.t()):
            torch.testing.assert_close(
                HF.het_conv2d(x, wks, w, None, backend="native"),
                F.conv2d(x, HF.dense_weight(wks, w, "shifted"), None, 1, 1), rtol=1e-4, atol=1e-4)
        w1.data = torch.randn(32, 24)  # storage replaced
        torch.testing.assert_close(HF.het_conv2d(x, wk, w1, b, backend="native"), ref(),
                                   rtol=1e-4, atol=1e-4)
        # a call that does not run the kernel: remembered (None), computed by its backend
        dense = HF.het_conv2d(x, wk, w1, b, backend="dense")
        assert None in HF._CALL_PLANS[id(wk)][1].values()
        torch.testing.assert_close(HF.het_conv2d(x, wk, w1, b, backend="dense"), dense)
        torch.testing.assert_close(dense, ref(), rtol=1e-4, atol=1e-4)
        # lists as arguments, unbatched input: the full path, correct
        torch.testing.assert_close(HF.het_conv2d(x, wk, w1, b, [1, 1], [1, 1],
                                                 backend="native"), ref(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(HF.het_conv2d(x[0], wk, w1, b, backend="native"), ref()[0],
                                   rtol=1e-4, atol=1e-4)
    # autograd: nothing kept, gradients flow
    wg = wk.clone().requires_grad_()
    count = len(HF._CALL_PLANS)
    HF.het_conv2d(x, wg, w1, b, backend="native").sum().backward()
    assert wg.grad is not None and id(wg) not in HF._CALL_PLANS and len(HF._CALL_PLANS) == count
    # the kept calls hold the weights weakly: freed with them
    gone = [weakref.ref(t) for t in (wk, w1, b)]
    key = id(wk)
    del wk, w1, b, b2, bz, wg, ref  # (ref: b as its default; bz: a view of b)
    gc.collect()
    assert all(r() is None for r in gone) and key not in HF._CALL_PLANS


def test_compiler_tuning_is_asked_once_per_compiler_and_cpu(tmp_path, monkeypatch):
    """The compiler's tuning report is kept in the cache directory: the next process (here:
    call) reads it without running the compiler; a changed compiler file or CPU asks
    again; an unwritable cache still answers (asking each time)."""
    runs = []
    real_run = subprocess.run
    monkeypatch.setattr(native.subprocess, "run",
                        lambda cmd, **kw: runs.append(cmd[0]) or real_run(cmd, **kw))
    monkeypatch.setenv("HETCONV_CACHE_DIR", str(tmp_path / "cache"))
    cc = tmp_path / "cc"

    def write_cc(tune):
        cc.write_text(f"#!/bin/sh\nprintf '  -mtune=   \\t\\t{tune}\\n'\n")
        cc.chmod(0o755)

    write_cc("skylake")
    assert native._native_tune(str(cc)) == "skylake" and len(runs) == 1
    assert native._native_tune(str(cc)) == "skylake" and len(runs) == 1  # kept
    kept = list((tmp_path / "cache").glob("tune_*.txt"))
    assert len(kept) == 1 and kept[0].read_text().strip() == "skylake"
    write_cc("znver4")  # the compiler changed (size, time): asked again
    os.utime(cc, ns=(1, 10 ** 18))
    assert native._native_tune(str(cc)) == "znver4" and len(runs) == 2
    assert native._native_tune(str(cc)) == "znver4" and len(runs) == 2
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags\t\t: another cpu\n")
    assert native._native_tune(str(cc)) == "znver4" and len(runs) == 3
    monkeypatch.setattr(native, "_writable_cache_dir", lambda: None)
    assert native._native_tune(str(cc)) == "znver4" and len(runs) == 4
    assert native._native_tune(str(cc)) == "znver4" and len(runs) == 5


def test_unknown_intel_cpu_gets_a_server_tuning(tmp_path, monkeypatch):
    """-march=native tunes for "generic" where the compiler does not know the CPU: an AVX-512
    Intel CPU then gets -mtune=icelake-server; a known CPU, another vendor, no AVX-512 or an
    explicit HETCONV_NATIVE_MARCH keep the flags as they were.  The tuning is read from the
    compiler's own report (a fake compiler here)."""
    def fake_cc(tune):
        path = tmp_path / f"cc-{tune}"
        path.write_text("#!/bin/sh\nprintf '  -march=   \\t\\ticelake-client\\n"
                        f"  -mtune=   \\t\\t{tune}\\n'\n")
        path.chmod(0o755)
        return str(path)

    monkeypatch.setenv("HETCONV_CACHE_DIR", str(tmp_path / "cache"))
    assert native._native_tune(fake_cc("generic")) == "generic"
    assert native._native_tune(fake_cc("sapphirerapids")) == "sapphirerapids"
    assert native._native_tune(str(tmp_path / "missing")) is None
    monkeypatch.delenv("HETCONV_NATIVE_MARCH", raising=False)
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    monkeypatch.setattr(native, "_cpu_info", lambda f: "GenuineIntel" if f == "vendor_id" else None)
    tune = f"-mtune={native.UNKNOWN_INTEL_TUNE}"
    assert native._flags(fake_cc("generic"))[-1] == tune
    assert tune not in native._flags(fake_cc("sapphirerapids"))
    assert tune not in native._flags(None)
    monkeypatch.setenv("HETCONV_NATIVE_MARCH", "x86-64-v4")
    assert tune not in native._flags(fake_cc("generic"))
    monkeypatch.delenv("HETCONV_NATIVE_MARCH")
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags\t\t: fpu sse2 avx2\n")
    assert tune not in native._flags(fake_cc("generic"))
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags\t\t: avx512f\n")
    monkeypatch.setattr(native, "_cpu_info", lambda f: "AuthenticAMD")
    assert tune not in native._flags(fake_cc("generic"))


@needs_kernel
@pytest.mark.parametrize("layout, stride, relu", [("nchw", 1, False), ("nchw", 2, True),
                                                  ("cl", 1, True), ("cl", 2, False)])
def test_double_backward_matches_dense_reference(layout, stride, relu):
    """create_graph=True through the native kernel (a gradient penalty): the gradients have
    a graph, and the second-order gradients are the dense reference's (the C kernels'
    gradients had none: a penalty on them added nothing, silently)."""
    torch.manual_seed(0)
    m, n, p = (16, 16, 4) if layout == "nchw" else (32, 32, 4)
    wk, w1 = _weights(m, n, p, requires_grad=True)
    wk, w1 = (wk * 0.2).detach().requires_grad_(), (w1 * 0.2).detach().requires_grad_()
    b = torch.randn(n, requires_grad=True)
    x = torch.randn(2, m, 10, 10)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ins = [x, wk, w1, b]

    def second_order(y):
        gs = torch.autograd.grad(y.square().sum(), ins, create_graph=True)
        assert all(g.requires_grad for g in gs)
        return torch.autograd.grad(sum(g.square().sum() for g in gs), ins)

    got = second_order(native.native_conv2d(x, wk, w1, b, "shifted", relu, None, stride))
    ref = _reference(x, wk, w1, b, "shifted", stride=stride)
    want = second_order(ref.relu() if relu else ref)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=2e-3, atol=5e-2)
