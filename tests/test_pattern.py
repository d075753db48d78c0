"""Kernel placement (``kernel_mask`` and the layout helpers), ``resolve_part`` and the cost formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hetconv
from hetconv import pattern as hp
from _hetconv_reference import divisors, filter_blocks, loop_mask


@st.composite
def shapes(draw, max_in: int = 24, max_out: int = 20):
    m = draw(st.integers(1, max_in))
    part = draw(st.sampled_from(divisors(m) + ["C"]))
    n = draw(st.integers(1, max_out))
    return m, n, part, (m if part == "C" else part)


PATTERNS = st.sampled_from(["shifted", "blocked"])


# ---------------------------------------------------------------------------
# kernel_mask
# ---------------------------------------------------------------------------

@given(shapes(), PATTERNS)
def test_kernel_mask_matches_loop_rule(shape, pattern):
    m, n, part, p = shape
    mask = hetconv.kernel_mask(m, n, part, pattern)
    assert mask.dtype == torch.bool and mask.shape == (n, m)
    assert mask.tolist() == loop_mask(m, n, p, pattern)


def test_kernel_mask_shifted_small_example():
    # Paper Figure 3 with M = 4, P = 2: filter 0 is KxK on channels 0, 2; filter 1 on 1, 3.
    expected = [[True, False, True, False],
                [False, True, False, True],
                [True, False, True, False]]
    assert hetconv.kernel_mask(4, 3, 2).tolist() == expected
    assert hetconv.kernel_mask(4, 3, 2, "shifted").tolist() == expected


def test_kernel_mask_blocked_small_example():
    # N = 5, P = 2: filter blocks of sizes 3, 2 (the first N mod P blocks one larger);
    # block b sees input block b (channels 0-1, then 2-3) as KxK.
    expected = [[True, True, False, False]] * 3 + [[False, False, True, True]] * 2
    assert hetconv.kernel_mask(4, 5, 2, "blocked").tolist() == expected


@given(shapes(), PATTERNS)
def test_kernel_mask_counts(shape, pattern):
    m, n, part, p = shape
    mask = hetconv.kernel_mask(m, n, part, pattern)
    # Every filter has exactly M/P KxK kernels.
    assert mask.sum(1).tolist() == [m // p] * n
    assert int(mask.sum()) == n * m // p
    # Column i is KxK for every filter of i's class: ceil((N - c) / P) filters for class c
    # under "shifted", the size of block c under "blocked"; the same multiset both ways.
    cls = [i % p for i in range(m)] if pattern == "shifted" else [i // (m // p) for i in range(m)]
    sizes = [len(range(c, n, p)) for c in range(p)]
    assert sizes == [filter_blocks(n, p).count(c) for c in range(p)]
    assert mask.sum(0).tolist() == [sizes[c] for c in cls]


@given(shapes())
def test_blocked_is_a_permutation_of_shifted(shape):
    m, n, part, p = shape
    shifted = hetconv.kernel_mask(m, n, part, "shifted")
    blocked = hetconv.kernel_mask(m, n, part, "blocked")
    # Sort filters and channels of "shifted" by class (stably): that is "blocked".
    rows = sorted(range(n), key=lambda f: f % p)
    cols = sorted(range(m), key=lambda i: i % p)
    assert sorted(rows) == list(range(n)) and sorted(cols) == list(range(m))
    assert torch.equal(shifted[rows][:, cols], blocked)
    # And the library's own orders are exactly those permutations.
    assert hp.filter_order(n, p, "shifted").tolist() == rows
    assert hp.channel_order(m, p, "shifted").tolist() == cols
    assert hp.filter_order(n, p, "blocked").tolist() == list(range(n))
    assert hp.channel_order(m, p, "blocked").tolist() == list(range(m))


@pytest.mark.parametrize("pattern", ["shifted", "blocked"])
@pytest.mark.parametrize("m,n", [(1, 1), (4, 7), (16, 3)])
def test_part_one_is_all_kxk_and_part_c_one_per_row(m, n, pattern):
    assert hetconv.kernel_mask(m, n, 1, pattern).all()
    mask = hetconv.kernel_mask(m, n, "C", pattern)
    assert mask.sum(1).tolist() == [1] * n
    assert torch.equal(mask, hetconv.kernel_mask(m, n, m, pattern))
    if pattern == "shifted":  # filter f is KxK on channel f mod M
        assert mask.float().argmax(1).tolist() == [f % m for f in range(n)]


@given(shapes(), PATTERNS)
def test_layout_helpers_list_mask_channels_in_increasing_order(shape, pattern):
    m, n, _, p = shape
    mask = loop_mask(m, n, p, pattern)
    kxk = hp.kxk_channels(m, n, p, pattern)
    pw = hp.pointwise_channels(m, n, p, pattern)
    assert kxk.shape == (n, m // p) and pw.shape == (n, m - m // p)
    for f in range(n):
        assert kxk[f].tolist() == [i for i in range(m) if mask[f][i]]
        assert pw[f].tolist() == [i for i in range(m) if not mask[f][i]]


def test_class_helpers():
    assert hp.class_of_filter(7, 3, "shifted").tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert hp.class_of_filter(7, 3, "blocked").tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert hp.class_of_channel(6, 3, "shifted").tolist() == [0, 1, 2, 0, 1, 2]
    assert hp.class_of_channel(6, 3, "blocked").tolist() == [0, 0, 1, 1, 2, 2]


def test_kernel_mask_bad_arguments():
    with pytest.raises(ValueError, match="pattern"):
        hetconv.kernel_mask(4, 4, 2, "diagonal")
    with pytest.raises(ValueError, match="out_channels"):
        hetconv.kernel_mask(4, 0, 2)
    with pytest.raises(ValueError, match="in_channels"):
        hetconv.kernel_mask(0, 4, 1)
    with pytest.raises(ValueError, match="part"):
        hetconv.kernel_mask(4, 4, 3)


# ---------------------------------------------------------------------------
# resolve_part
# ---------------------------------------------------------------------------

def test_resolve_part_accepts_divisors_and_c():
    assert [hp.resolve_part(d, 12) for d in divisors(12)] == divisors(12)
    assert hp.resolve_part("C", 12) == 12
    # "C" is case-insensitive: "c" is accepted too.
    assert hp.resolve_part("c", 12) == 12


@pytest.mark.parametrize("part", [0, -1, -4])
def test_resolve_part_rejects_small(part):
    with pytest.raises(ValueError, match="part must be >= 1"):
        hp.resolve_part(part, 8)


def test_resolve_part_not_dividing_lists_allowed_values():
    with pytest.raises(ValueError, match="part=3") as info:
        hp.resolve_part(3, 8)
    assert "[1, 2, 4, 8]" in str(info.value) and "'C'" in str(info.value)


@pytest.mark.parametrize("part", ["PC", "X", "", " C", "CC", "M"])
def test_resolve_part_rejects_misspelled_c(part):
    with pytest.raises(ValueError, match="part") as info:
        hp.resolve_part(part, 8)
    assert "'C'" in str(info.value)


@pytest.mark.parametrize("part", [2.0, True, None, [2]])
def test_resolve_part_rejects_non_int(part):
    with pytest.raises(TypeError, match="part"):
        hp.resolve_part(part, 8)


def test_validate_pattern():
    assert hp.validate_pattern("shifted") == "shifted"
    assert hp.validate_pattern("blocked") == "blocked"
    with pytest.raises(ValueError, match="pattern must be one of"):
        hp.validate_pattern("Shifted")


# ---------------------------------------------------------------------------
# Cost formulas (paper Eq. 1-12, Figure 5)
# ---------------------------------------------------------------------------

# Figure 5 of the paper (speedup of HetConv over a standard 3x3 convolution).
FIGURE_5 = {2: 1.8, 4: 3.0, 8: 4.5, 32: 7.2, 64: 8.0}


@pytest.mark.parametrize("part,paper", sorted(FIGURE_5.items()))
def test_speedup_matches_figure_5(part, paper):
    assert hp.speedup(part, 3) == pytest.approx(paper, rel=0.01)
    assert hp.hetconv_ratio(part, 3) == pytest.approx(1 / paper, rel=0.01)


def test_speedup_p16_formula_vs_paper_figure():
    # Paper quirk: Figure 5 prints 5.76x for P = 16, but Eq. 5 gives
    # 1 / (1/16 + (15/16)/9) = 144/24 = 6.0x exactly.  The library implements the formula;
    # this test pins both facts so that neither changes silently.
    assert hp.speedup(16, 3) == pytest.approx(6.0, rel=1e-12)
    assert hp.speedup(16, 3) != pytest.approx(5.76, rel=0.01)


@given(st.integers(1, 256), st.sampled_from([1, 3, 5, 7, (3, 5)]))
def test_hetconv_ratio_formula(part, kernel):
    k2 = kernel[0] * kernel[1] if isinstance(kernel, tuple) else kernel * kernel
    assert hp.hetconv_ratio(part, kernel) == pytest.approx(1 / part + (1 - 1 / part) / k2)
    assert hp.speedup(part, kernel) == pytest.approx(1 / hp.hetconv_ratio(part, kernel))


def test_ratio_limits():
    assert hp.hetconv_ratio(1, 3) == 1.0  # P = 1 is a standard conv
    assert hp.hetconv_ratio(7, 1) == pytest.approx(1.0)  # 1x1 kernels: nothing to save
    assert hp.speedup(10 ** 9, 3) == pytest.approx(9.0, rel=1e-6)  # bound K^2


@given(st.integers(1, 512), st.integers(1, 512), st.sampled_from([1, 3, 5]), st.integers(1, 32))
def test_baseline_ratios_from_mac_counts(m, n, k, do):
    # Eq. 6-11 written out as MAC counts, divided by the standard conv's (Eq. 1).
    standard = do * do * m * n * k * k
    assert hp.standard_macs(m, n, k, do) == standard
    dwc_pwc = do * do * m * k * k + m * n * do * do
    assert hp.dwc_pwc_ratio(n, k) == pytest.approx(dwc_pwc / standard)
    for g in [d for d in (1, 2, 4, 8, 16) if m % d == 0]:
        gwc_pwc = do * do * m * n * k * k / g + m * n * do * do
        assert hp.gwc_pwc_ratio(g, k) == pytest.approx(gwc_pwc / standard)


@given(shapes(max_in=64, max_out=64), st.sampled_from([1, 3, 5, (3, 5), (5, 1)]),
       st.one_of(st.integers(1, 16), st.tuples(st.integers(1, 16), st.integers(1, 16))))
def test_hetconv_macs_and_params_by_counting(shape, kernel, out_size):
    m, n, part, p = shape
    kk = kernel[0] * kernel[1] if isinstance(kernel, tuple) else kernel * kernel
    area = out_size[0] * out_size[1] if isinstance(out_size, tuple) else out_size * out_size
    mask = loop_mask(m, n, p)
    # Per output position every filter does K*K MACs per KxK kernel and 1 per 1x1 kernel.
    weights = sum(kk if mask[f][i] else 1 for f in range(n) for i in range(m))
    assert hp.hetconv_params(m, n, kernel, part) == weights
    assert hp.hetconv_params(m, n, kernel, part, bias=True) == weights + n
    assert hp.hetconv_macs(m, n, kernel, out_size, part) == area * weights
    # Paper Eq. 4 / parameter formula, written out.
    assert weights == n * (m // p * kk + m - m // p)
    # And the ratio of Eq. 5, against the standard count (exact for P | M).
    standard = hp.standard_macs(m, n, kernel, out_size)
    assert hp.hetconv_macs(m, n, kernel, out_size, part) / standard == pytest.approx(
        hp.hetconv_ratio(p, kernel))


def test_cost_formula_bad_arguments():
    with pytest.raises(ValueError, match="part"):
        hp.hetconv_ratio(0)
    with pytest.raises(ValueError, match="part"):
        hp.speedup(0.5)
    with pytest.raises(ValueError, match="out_channels"):
        hp.dwc_pwc_ratio(0)
    with pytest.raises(ValueError, match="groups"):
        hp.gwc_pwc_ratio(0)
    with pytest.raises(ValueError, match="part"):
        hp.hetconv_macs(8, 8, 3, 4, part=3)
    with pytest.raises(ValueError, match="part"):
        hp.hetconv_params(8, 8, 3, part="PC")


def test_paper_example_layer_costs():
    # A 64 -> 64 3x3 layer at P = 4: 64 * (16*9 + 48) = 12,288 weights (the number),
    # a third of the 36,864 of the standard conv (Figure 5: 3.0x).
    assert hp.hetconv_params(64, 64, 3, 4) == 12_288
    assert hp.standard_macs(64, 64, 3, 1) == 36_864
    assert math.isclose(hp.hetconv_macs(64, 64, 3, 32, 4) / hp.standard_macs(64, 64, 3, 32), 1 / 3)


def test_blocked_classes_are_contiguous_blocks_in_filter_order():
    """class_of_filter("blocked"): the first N mod P classes hold one filter more, in
    contiguous blocks (written in closed form: repeat_interleave by a tensor broke
    torch.compile's graph at every blocked layer).  Checked against the blocks built
    one by one."""
    for n in range(1, 40):
        for p in range(1, n + 4):
            q, r = divmod(n, p)
            want = [c for c in range(p) for _ in range(q + 1 if c < r else q)]
            got = hp.class_of_filter(n, p, "blocked")
            assert got.dtype == torch.int64 and got.tolist() == want, (n, p)


@pytest.mark.parametrize("backend", ["dense", "auto"])
@pytest.mark.parametrize("pattern", ["shifted", "blocked"])
def test_inference_compiles_in_one_graph(pattern, backend):
    """torch.compile of an inference call (no_grad: the dense kernel is assembled from
    index tensors, built afresh while compiling): the "blocked" layer's index building
    broke the graph, so a compiled model compiled each of its layers on its own, and past
    dynamo's recompile limit ran them eagerly (VGG-16 P4 blocked, compiled: 102 ms against
    69 for the shifted twin at batch 64)."""
    import torch._dynamo

    from hetconv import HetConv2d

    layer = HetConv2d(16, 24, 3, part=4, pattern=pattern, backend=backend).eval()
    x = torch.randn(1, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = layer(x)
            explained = torch._dynamo.explain(layer)(x)
            got = torch.compile(layer, backend="eager")(x)
    finally:
        torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
        [b.reason for b in explained.break_reasons]
    torch.testing.assert_close(got, want)
