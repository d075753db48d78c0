"""Independent, loop-based statements of HetConv's semantics, shared by the layer tests.

Everything here is written from the paper's placement rule and the weight layout that
``hetconv.pattern`` documents, with plain Python loops and no call into ``hetconv``, so the
library's own reference backend (``"dense"``) is checked against something it did not build.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

#: Kernel sizes the property tests draw from (square and non-square, all odd).
KERNELS = [(1, 1), (3, 3), (5, 5), (3, 5), (5, 3), (1, 3)]


def divisors(m: int) -> list[int]:
    return [d for d in range(1, m + 1) if m % d == 0]


def filter_blocks(n: int, p: int) -> list[int]:
    """Block of each filter under ``"blocked"``: P contiguous blocks, the first N mod P larger."""
    blocks = []
    for b in range(p):
        size = n // p + (1 if b < n % p else 0)
        blocks.extend([b] * size)
    return blocks


def loop_mask(m: int, n: int, p: int, pattern: str = "shifted") -> list[list[bool]]:
    """mask[f][i]: does filter f have a KxK kernel on input channel i?"""
    if pattern == "shifted":  # paper, Figure 3: (i - n) mod P == 0
        return [[(i - f) % p == 0 for i in range(m)] for f in range(n)]
    blocks = filter_blocks(n, p)
    return [[blocks[f] == i // (m // p) for i in range(m)] for f in range(n)]


def loop_dense(weight_k: torch.Tensor, weight_1: torch.Tensor, p: int,
               pattern: str = "shifted") -> torch.Tensor:
    """(N, M, Kh, Kw) kernel from the non-redundant weights, filled channel by channel.

    Filter f's j-th KxK kernel goes on its j-th KxK channel (increasing order), its t-th
    1x1 kernel on the centre tap of its t-th remaining channel.  Differentiable.
    """
    n, m_k, kh, kw = weight_k.shape
    m = m_k * p
    mask = loop_mask(m, n, p, pattern)
    dense = torch.zeros(n, m, kh, kw, dtype=weight_k.dtype)
    for f in range(n):
        j = t = 0
        for i in range(m):
            if mask[f][i]:
                dense[f, i] = weight_k[f, j]
                j += 1
            else:
                dense[f, i, kh // 2, kw // 2] = weight_1[f, t]
                t += 1
        assert j == m_k and t == m - m_k
    return dense


def resolved_padding(padding, kernel, dilation) -> tuple[int, int]:
    """``None`` -> "same at stride 1"; int -> pair."""
    if padding is None:
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    return (padding, padding) if isinstance(padding, int) else tuple(padding)


@st.composite
def conv_cases(draw, max_in: int = 12, max_out: int = 10, max_batch: int = 4) -> dict:
    """A random HetConv problem: shapes, part (divisor of M or "C"), conv geometry, flags."""
    m = draw(st.integers(1, max_in))
    part = draw(st.sampled_from(divisors(m) + ["C"]))
    p = m if part == "C" else part
    n = draw(st.integers(1, max_out))
    kernel = draw(st.sampled_from(KERNELS))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # None ("same"), 0, or explicit values up to beyond "same" (5 > 4 = same for K=5, d=2).
    padding = draw(st.one_of(st.none(), st.integers(0, 5),
                             st.tuples(st.integers(0, 5), st.integers(0, 5))))
    pads = resolved_padding(padding, kernel, dilation)
    # Smallest input that still gives a non-empty output, plus a little (non-square).
    min_hw = [max(1, d * (k - 1) + 1 - 2 * q) for k, d, q in zip(kernel, dilation, pads)]
    h = draw(st.integers(min_hw[0], min_hw[0] + 5))
    w = draw(st.integers(min_hw[1], min_hw[1] + 5))
    unbatched = draw(st.booleans())
    return {
        "m": m, "n": n, "part": part, "p": p, "kernel": kernel, "stride": stride,
        "dilation": dilation, "padding": padding, "pads": pads, "h": h, "w": w,
        "batch": None if unbatched else draw(st.integers(1, max_batch)),
        "bias": draw(st.booleans()),
        "pattern": draw(st.sampled_from(["shifted", "blocked"])),
        "channels_last": not unbatched and draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
    }


def make_input(case: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random input for ``case`` (batched or not, channels_last if asked)."""
    shape = (case["m"], case["h"], case["w"])
    if case["batch"] is not None:
        shape = (case["batch"],) + shape
    x = torch.randn(shape, dtype=case["dtype"], generator=generator)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def tolerances(dtype: torch.dtype) -> dict:
    """fp32 tolerance for sums of a few hundred products; float64 much tighter."""
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-12}
    return {"rtol": 1e-4, "atol": 2e-5}
