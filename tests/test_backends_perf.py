"""The fast paths' specific cases (layouts, weight cache, auto rule) and a smoke test of the bench.

Every backend is also compared with "dense" on random shapes in test_functional.py;
here are the cases that only the "fused" path has.  No timing is asserted.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

import hetconv
from hetconv import bench
from hetconv import functional as HF
from hetconv import deploy
from bench_helpers import fake_run, load_script


def _ref(x, layer):
    return F.conv2d(x, layer.dense_weight(), layer.bias, layer.stride, layer.padding, layer.dilation)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("pattern", ["shifted", "blocked"])
@pytest.mark.parametrize("n,p,stride,padding,dilation", [
    (12, 4, 1, None, 1), (10, 4, 2, 1, 1), (8, 2, 1, 0, 1), (8, 4, 1, 3, 2), (6, 8, 2, 2, 1)])
def test_fused_layouts_and_geometry(fmt, pattern, n, p, stride, padding, dilation):
    layer = hetconv.HetConv2d(8, n, 3, stride, padding, dilation, bias=True, part=p,
                              pattern=pattern, backend="fused")
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=fmt).requires_grad_(True)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)  # the fused path's output layout
    x2 = x.detach().clone().requires_grad_(True)
    ref = _ref(x2, layer)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, [x, layer.weight_k, layer.weight_1, layer.bias], g)
    exp = torch.autograd.grad(ref, [x2, layer.weight_k, layer.weight_1, layer.bias], g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,cache,bumped", [
    ("fused", "_WEIGHT_CACHE", "weight_1"), ("dense", "_DENSE_CACHE", "weight_k")])
def test_weight_cache_hits_and_invalidates(backend, cache, bumped):
    layer = hetconv.HetConv2d(8, 8, part=2, backend=backend)
    cache = getattr(HF, cache)
    x = torch.randn(1, 8, 5, 5)
    def cached():
        (entry,) = cache[layer.weight_k].values()
        return entry[1]

    with torch.no_grad():
        layer(x)
        first = cached()
        layer(x)
        assert cached() is first  # reused, not rebuilt
        getattr(layer, bumped).mul_(-1)  # version bump: must rebuild
        y = layer(x)
        assert cached() is not first
        torch.testing.assert_close(y, _ref(x, layer), rtol=1e-4, atol=1e-5)
    # Under autograd nothing is cached: gradients flow into the parameters.
    layer(x).sum().backward()
    assert layer.weight_k.grad is not None and layer.weight_1.grad is not None


@pytest.mark.parametrize("backend,cache", [("fused", "_WEIGHT_CACHE"), ("dense", "_DENSE_CACHE")])
def test_weights_used_with_both_patterns_keep_both_cache_entries(backend, cache):
    wk, w1 = torch.randn(8, 4, 3, 3), torch.randn(8, 4)
    x = torch.randn(1, 8, 5, 5)
    cache = getattr(HF, cache)
    with torch.no_grad():
        a = HF.het_conv2d(x, wk, w1, pattern="shifted", backend=backend)
        b = HF.het_conv2d(x, wk, w1, pattern="blocked", backend=backend)
        entries = dict(cache[wk])
        assert len(entries) == 2
        again = HF.het_conv2d(x, wk, w1, pattern="shifted", backend=backend)
        assert all(cache[wk][k][1] is v[1] for k, v in entries.items())  # nothing rebuilt
    torch.testing.assert_close(again, a)
    for y, pat in ((a, "shifted"), (b, "blocked")):
        torch.testing.assert_close(y, F.conv2d(x, HF.dense_weight(wk, w1, pat), None, 1, 1),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["fused", "dense"])
def test_cache_from_inference_mode_usable_with_autograd(backend):
    layer = hetconv.HetConv2d(16, 16, part=4, backend=backend)
    x = torch.randn(2, 16, 6, 6)
    with torch.inference_mode():
        a = layer(x)
    xr = x.clone().requires_grad_(True)
    b = layer(xr)
    b.sum().backward()
    torch.testing.assert_close(a, b.detach())
    assert xr.grad is not None


@pytest.mark.parametrize("m,n,p,k,dtype,expected", [
    (64, 64, 1, 3, torch.float32, "dense"),       # P = 1: a plain convolution
    (128, 128, 4, 1, torch.float32, "dense"),     # 1x1 kernel
    (128, 128, 4, 3, torch.float64, "dense"),     # oneDNN does not accelerate float64
    (128, 128, 2, 3, torch.float32, "fused"),     # M >= 64, N >= 128, any P >= 2
    (512, 512, 2, 3, torch.float32, "fused"),
    (64, 64, 2, 3, torch.float32, "dense"),       # N < 128
    (32, 32, 2, 3, torch.float32, "dense"),
    (128, 128, 4, 3, torch.float32, "fused"),
    (128, 128, 4, 3, torch.bfloat16, "fused"),
    (64, 128, 16, 3, torch.float32, "fused"),     # narrow groups (M/P = 4)
    (128, 256, 64, 3, torch.float32, "fused"),
    (512, 512, 512, 3, torch.float32, "fused"),
    (32, 128, 4, 3, torch.float32, "dense"),      # M < 64
    (128, 64, 4, 3, torch.float32, "dense"),      # N < 128
    (64, 64, 8, 3, torch.float32, "dense"),
    (64, 64, 64, 3, torch.float32, "fused"),      # depthwise KxK part (P = M = N), M >= 32
    (32, 32, 32, 3, torch.float32, "fused"),
    (32, 64, 32, 3, torch.float32, "dense"),      # M/P = 1 but N != M
    (16, 16, 16, 3, torch.float32, "dense"),      # depthwise but M < 32
    (16, 16, 4, 3, torch.float32, "dense")])
def test_auto_rule(m, n, p, k, dtype, expected):
    """The rule where the native kernels do not apply (tests/test_native.py covers those)."""
    x = torch.randn(1, m, 4, 4, dtype=dtype)
    wk = torch.randn(n, m // p, k, k, dtype=dtype)
    w1 = torch.randn(n, m - m // p, dtype=dtype)
    assert HF.select_backend(x, wk, w1, native=False) == expected


@pytest.mark.parametrize("batch,size,stride,nchw", [
    (1, 8, 1, True), (4, 4, 1, True), (1, 9, 1, False), (2, 6, 1, False), (2, 8, 2, True),
    (2, 12, 2, False)])
def test_auto_dense_layout(batch, size, stride, nchw):
    """auto's dense path makes channels_last input NCHW iff B*Ho*Wo <= 4*M (here M = 16)."""
    wk, w1 = torch.randn(8, 8, 3, 3), torch.randn(8, 8)
    x = torch.randn(batch, 16, size, size).contiguous(memory_format=torch.channels_last)
    assert HF.select_backend(x, wk, w1) == "dense"
    y = HF.het_conv2d(x, wk, w1, stride=stride)
    assert y.is_contiguous() == nchw
    assert y.is_contiguous(memory_format=torch.channels_last) != nchw
    torch.testing.assert_close(y, HF.het_conv2d(x, wk, w1, stride=stride, backend="dense"))
    # NCHW input stays NCHW whatever the size.
    assert HF.het_conv2d(x.contiguous(), wk, w1, stride=stride).is_contiguous()


def test_bench_layer_candidates_agree():
    """Every per-layer candidate runs, forward and backward (values are not the point)."""
    shape = bench.LayerShape("t", "8->8", 1, 8, 8, 6, 2)
    for train in (False, True):
        cands = bench.layer_candidates(shape, 2, train)
        assert {"dense_nchw", "dense_cl", "het_fused", "het_auto", "masked_dense", "branches",
                "grouped_plus_pw", "gwc_pwc", "dwc_pwc"} <= set(cands)
        # packed weights: inference only (a training call would run the plain convolution)
        packed = {"dense_packed", "dense_cl_packed"} & set(cands)
        assert packed == (set() if train or not deploy._packing_available()
                          else {"dense_packed", "dense_cl_packed"})
        for fn in cands.values():
            fn()


def test_bench_training_step_backpropagates_a_full_gradient_in_the_outputs_layout():
    """The per-layer training step hands the output a materialised gradient of ones in the
    output's own layout (a network's next layer does), not a broadcast one to copy first."""
    from hetconv.bench.layers import _runner

    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    seen = []

    def fn():
        y = x * 2.0
        y.register_hook(lambda g: seen.append((g.stride(), g.clone())))
        return y

    step = _runner(fn, True, (x,))
    for _ in range(2):
        step()
        stride, g = seen.pop()
        assert stride == x.stride() and 0 not in stride
        assert torch.equal(g, torch.ones_like(g))
        torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))  # reset, not accumulated


def test_bench_run_layers_and_report(tmp_path):
    shapes = bench.layer_shapes(["resnet56_cifar"], batch_scale=1 / 128, max_shapes=1)
    assert shapes[0].batch == 1 and shapes[0].in_ch == 16
    rows = bench.run_layers(shapes, parts=(1, 2, "C"), modes=("infer",), repeats=1, warmup=0)
    assert {r["part"] for r in rows} == {1, 2, 16}
    for r in rows:
        assert r["ms"] > 0 and r["theory"] == pytest.approx(hetconv.pattern.speedup(r["part"]))
    paths = bench.write_report(rows, [], str(tmp_path), name="t")
    text = open(paths["markdown"]).read()
    assert "## Layers" in text and "never slower" in text
    assert json.load(open(paths["json"]))["layers"] == rows


def test_bench_bad_arguments():
    with pytest.raises(ValueError, match="suite"):
        bench.layer_shapes(["lenet"])
    with pytest.raises(ValueError, match="preset"):
        bench.run("huge")
    with pytest.raises(ValueError, match="settle"):
        bench.run("quick", settle=-1)
    with pytest.raises(ValueError, match="settle_ms"):
        bench.run("quick", settle_ms=-5)
    with pytest.raises(ValueError, match="idle_ms"):
        bench.run("quick", idle_ms=-1)
    with pytest.raises(ValueError, match="family"):
        bench.run_models(["lenet"])


def test_bench_run_models_smoke():
    from hetconv.bench.report import target_checks

    rows = bench.run_models(["vgg16_cifar"], ["throughput_b64", "train_step_b64"],
                            parts={"vgg16_cifar": (1, 4, "4b")}, repeats=1, warmup=0, batch=2,
                            width=0.125, onnx=False)
    variants = {(r["model"], r["metric"], r["variant"]) for r in rows}
    assert ("P4", "throughput_b64", "optimized") in variants
    assert ("P4b", "throughput_b64", "optimized") in variants
    assert ("P4", "train_step_b64", "eager_cl") in variants
    assert ("P4", "train_step_b64", "absorbed_cl") in variants
    assert ("P4b", "train_step_b64", "absorbed_cl") not in variants  # nothing to absorb
    assert all(r["ratio"] > 0 for r in rows)
    assert sum(r["best"] for r in rows) == 6  # one best variant per (model, metric)
    for r in rows:
        if r["model"] in ("P4", "P4b"):
            assert r["theory_layer"] == pytest.approx(hetconv.pattern.speedup(4))
    lines = target_checks([], rows)
    assert any("blocked', vgg16_cifar P4 throughput_b64" in line for line in lines)
    # the optimized rows record their model's plan (memory format, per-layer backends)
    for r in rows:
        assert ("plan" in r) == (r["variant"] == "optimized")
        if "plan" in r:
            assert r["plan"]["memory_format"] in ("contiguous", "channels_last")
            assert r["plan"]["backends"] and set(r["plan"]["backends"]) <= {
                "native", "packed", "dense", "fused", "grouped"}


def test_bench_models_isolated_in_fresh_processes(monkeypatch):
    """isolate=True times each (family, metric) in a spawned process: a model builder broken
    in this process is not the one that runs."""
    from hetconv.bench import models as bm

    def broken(*args):
        raise RuntimeError("built in the parent process")
    monkeypatch.setattr(bm, "_build", broken)
    kwargs = dict(parts={"vgg16_cifar": (1, 4)}, repeats=1, warmup=0, batch=2, width=0.125,
                  onnx=False)
    with pytest.raises(RuntimeError, match="parent"):
        bench.run_models(["vgg16_cifar"], ["throughput_b64"], **kwargs)
    rows = bench.run_models(["vgg16_cifar"], ["throughput_b64", "latency_b1"], isolate=True,
                            retain_memory=True, **kwargs)
    assert {(r["model"], r["metric"]) for r in rows} == {
        (m, k) for m in ("P1", "P4") for k in ("throughput_b64", "latency_b1")}
    assert {r["batch"] for r in rows if r["metric"] == "latency_b1"} == {1}
    assert sum(r["best"] for r in rows) == 4
    with pytest.raises(TypeError, match="isolate"):
        bench.run_models(["vgg16_cifar"], isolate="yes")


def test_bench_onnxruntime_sessions_share_one_thread_pool():
    """The onnxruntime variants of a family run on one global pool of torch's thread count
    (one pool per session slowed every candidate of a batch-1 family 1.3-2x), recorded per
    row; in a process whose global pools exist already, each session gets its own."""
    pytest.importorskip("onnxruntime")
    rows = bench.run_models(["vgg16_cifar"], ["latency_b1"], parts={"vgg16_cifar": (1, 4)},
                            repeats=1, warmup=0, width=0.125, isolate=True)
    ort_rows = [r for r in rows if r["variant"] == "onnxruntime"]
    assert len(ort_rows) == 2
    pool = f"one global pool of {torch.get_num_threads()} threads"
    assert all(r["ort_threads"] == pool for r in ort_rows)
    assert all("ort_threads" not in r for r in rows if r["variant"] != "onnxruntime")


def test_bench_latency_gets_more_samples(monkeypatch):
    from hetconv.bench import models as bm

    seen, idle = {}, set()
    real = bm.time_interleaved

    def spy(cands, **kw):
        seen[len(seen)] = kw["repeats"]
        idle.add(kw["idle_seconds"])
        return real(cands, **kw)
    monkeypatch.setattr(bm, "time_interleaved", spy)
    rows = bench.run_models(["vgg16_cifar"], ["throughput_b64", "latency_b1"],
                            parts={"vgg16_cifar": (1,)}, repeats=2, warmup=0, batch=2,
                            width=0.125, onnx=False, settle_seconds=0.0, idle_seconds=0.001)
    assert [r["metric"] for r in rows][-1] == "latency_b1"
    assert seen == {0: 2, 1: 2 * bm.LATENCY_SAMPLES} and bm.LATENCY_SAMPLES > 1
    assert idle == {0.001}  # the pause before each candidate reaches every timing


def test_bench_onnxruntime_session_options(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from hetconv.bench import models as bm

    made = []
    monkeypatch.setattr(ort, "InferenceSession", lambda path, opts, providers: made.append(opts))
    sizes = []
    monkeypatch.setattr(ort, "set_global_thread_pool_sizes", lambda *a: sizes.append(a))
    monkeypatch.setattr(bm, "_ORT_POOL", None)
    bm._ort_session(ort, "m.onnx", 3)
    bm._ort_session(ort, "m.onnx", 3)
    assert sizes == [(3, 1)] and bm.ort_thread_pool() == 3  # set up once
    assert [o.use_per_session_threads for o in made] == [False, False]
    bm._ort_session(ort, "m.onnx", 2)  # another thread count: a pool of its own
    assert made[-1].use_per_session_threads and made[-1].intra_op_num_threads == 2

    def taken(*a):
        raise ort.capi.onnxruntime_pybind11_state.Fail("global pools exist")
    monkeypatch.setattr(ort, "set_global_thread_pool_sizes", taken)
    monkeypatch.setattr(bm, "_ORT_POOL", None)
    bm._ort_session(ort, "m.onnx", 3)
    assert bm.ort_thread_pool() == 0
    assert made[-1].use_per_session_threads and made[-1].intra_op_num_threads == 3


def test_bench_blocked_twin_models():
    from hetconv.bench.models import _build

    twin, default = _build("vgg16_cifar", "4b", 0.125), _build("vgg16_cifar", 4, 0.125)
    hets = lambda m: [h for h in m.modules() if isinstance(h, hetconv.HetConv2d)]  # noqa: E731
    assert {(h.part, h.pattern) for h in hets(twin)} == {(4, "blocked")}
    assert {(h.part, h.pattern) for h in hets(default)} == {(4, "shifted")}


def test_model_time_split_script_accounts_for_every_native_layer():
    """benchmarks/model_time_split.py: one kernel launch per HetConv2d of ResNet-56
    (27 blocks x 2) per forward pass, and the kernels' time is inside the forward passes
    it was measured in (an accounting identity, not a speed claim: the total of separate
    calls is not compared, it varies with the load)."""
    mts = load_script("model_time_split")
    out = mts.split("resnet56_cifar", 4, batch=2, width=0.25, repeats=2,
                    memory_format="contiguous", backend="native")
    if not hetconv.native.available():
        assert out["layers"] == []
        return
    # (+ the stem where the kernel ran it faster as a P = 1 layer)
    assert sum(calls for _, calls, _ in out["layers"]) == 27 * 2 + out["native_dense"]
    assert {key[3] for key, _, _ in out["layers"]} == {False, True}  # fused residuals too
    assert 0 < out["kernels_ms"] < out["pass_ms"]
    # the counted work: 2 flops per multiply-add of the P = 4 model, per image of the batch
    macs = hetconv.profile(hetconv.create_model("resnet56_cifar", width=0.25, part=4),
                           (3, 32, 32)).macs
    assert out["macs_per_image"] == macs
    assert out["gflops"] == pytest.approx(2 * macs * 2 / out["total_ms"] / 1e6)
    assert out["fma_gflops"] > 0
    chained = mts.split("resnet56_cifar", 4, batch=8, width=0.25, repeats=2,
                        memory_format="contiguous", backend="native", chains=True)
    if torch.get_num_threads() * 2 <= 8:  # chains run on >= 2 images per thread
        assert [(key[0], calls) for key, calls, _ in chained["layers"]] == [("native chain", 1)]
    assert hetconv.native._launch.__name__ == "_launch"  # put back
    with pytest.raises(SystemExit):
        mts.main(["--batch", "0"])
    # a model name with its own P: that P (not the default 4 on top of it)
    named = mts.split("resnet56_cifar_p4", None, batch=2, width=0.25, repeats=1,
                      memory_format="contiguous", backend="native")
    assert named["macs_per_image"] == macs


@pytest.mark.parametrize("argv, says", [
    (["--model", "nosuch"], "--model"), (["--part", "0"], "--part"),
    (["--part", "x"], "--part"), (["--backend", "nope"], "--backend"),
    (["--model", "vgg16_cifar_p4", "--part", "8"], "--part")])
def test_model_time_split_script_refuses_bad_arguments(argv, says, capsys):
    """Bad arguments: an argparse error naming the option, not a traceback."""
    mts = load_script("model_time_split")
    with pytest.raises(SystemExit):
        mts.main(argv)
    assert says in capsys.readouterr().err


def test_model_time_split_script_sees_the_layers_of_a_native_sequence():
    """benchmarks/model_time_split.py on a channels-last VGG-16, whose feature extractor
    runs as one sequenced C call (``NativeSequence``; full width: the narrow layers of a
    thinner one run the NCHW kernel, which is not sequenced): by default one kernel launch per
    layer (13 convolutions), with ``chains`` one row for the whole sequence; the
    sequence's run is put back afterwards."""
    if not hetconv.native.available():
        pytest.skip("no native kernel")
    mts = load_script("model_time_split")
    real = hetconv.native.SequencePlan.run
    kw = dict(batch=2, width=1.0, repeats=2, memory_format="channels_last", backend="native")
    out = mts.split("vgg16_cifar", 4, **kw)
    assert sum(calls for _, calls, _ in out["layers"]) == 13
    assert {key[0] for key, _, _ in out["layers"]} <= {"channels-last kernel", "native kernel"}
    assert 0 < out["kernels_ms"] < out["pass_ms"]
    whole = mts.split("vgg16_cifar", 4, chains=True, **kw)
    assert [(key[0], key[1], calls) for key, calls, _ in whole["layers"]] == [
        ("native sequence", (3, 32, 32), 1)]
    assert 0 < whole["kernels_ms"] < whole["pass_ms"]
    assert hetconv.native.SequencePlan.run is real


def test_bench_reports_the_machine_rate_and_its_drift(tmp_path):
    from hetconv.bench.run import RATE_DRIFT, machine_rates

    assert machine_rates([("at the start", None)]) == (None, [])
    entry, notes = machine_rates([("at the start", 500.0), ("at the end", 490.0)])
    assert entry.startswith("500 at the start, 490 at the end (GFLOP/s,") and notes == []
    entry, notes = machine_rates([("at the start", 530.0), ("after the models", None),
                                  ("at the end", 212.0)])
    assert "after the models" not in entry and len(notes) == 1
    assert f"{530 / 212:.2f}x" in notes[0] and RATE_DRIFT < 530 / 212
    paths = bench.write_report([], [], str(tmp_path), env={"cpu": "x", "fma_rate": entry},
                               name="t", notes=notes)
    assert notes[0] in open(paths["markdown"]).read()
    data = json.load(open(paths["json"]))
    assert data["notes"] == notes and data["environment"]["fma_rate"] == entry


def test_bench_machine_describes_the_machine_and_benchmarks_nothing(tmp_path, capsys, monkeypatch):
    from hetconv import native
    from hetconv.cli import main

    calls = []
    monkeypatch.setattr(native, "fma_rate", lambda threads=None: calls.append(threads) or 123.4)
    monkeypatch.setattr("hetconv.bench.run", lambda *a, **k: pytest.fail("benchmark ran"))
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--machine", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "torch_threads: 1" in out and f"torch: {torch.__version__}" in out
    if native.available():
        assert calls == [1] and "fma_rate: 123 GFLOP/s on 1 thread(s)" in out
    else:
        assert calls == [] and "native kernel: unavailable" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, bad, allowed, good", [
    ("--threads", "0", "an int >= 1", "1"),
    ("--threads", "two", "an int >= 1", "2"),
    ("--repeats", "-2", "an int >= 1", "1"),
    ("--settle", "-1", "an int >= 0", "0"),
    ("--settle-ms", "-5", "a number >= 0", "0"),
    ("--settle-ms", "nan", "a number >= 0", "2.5"),
    ("--idle-ms", "-1", "a number >= 0", "0"),
    ("--max-minutes", "0", "a number > 0", "0.5"),
])
def test_bench_cli_rejects_bad_numbers_before_running(option, bad, allowed, good, capsys,
                                                       monkeypatch):
    from hetconv.cli import build_parser, main

    monkeypatch.setattr("hetconv.bench.run", lambda *a, **k: pytest.fail("benchmark ran"))
    for extra in ([], ["--machine"]):  # one check for both paths
        with pytest.raises(SystemExit) as exc:
            main(["bench", *extra, option, bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {option}: must be {allowed}, got '{bad}'" in err
        assert "Traceback" not in err
    value = getattr(build_parser().parse_args(["bench", option, good]), option[2:].replace("-", "_"))
    want = int(good) if "int" in allowed else float(good)
    assert value == want and type(value) is type(want)


def test_bench_idle_ms_reaches_the_models_timings(tmp_path, monkeypatch):
    import sys

    from hetconv.cli import main

    got = {}
    report = tmp_path / "r.md"
    report.write_text("## Targets\n\n- a target: MET\n")
    monkeypatch.setattr("hetconv.bench.run", lambda *a, **k: got.update(k) or {"markdown": str(report)})
    assert main(["bench", "--quick", "--idle-ms", "2.5"]) == 0
    assert got["idle_ms"] == 2.5
    monkeypatch.undo()
    run_mod = sys.modules["hetconv.bench.run"]
    seen = {}
    monkeypatch.setattr(run_mod, "run_models", lambda *a, **k: seen.update(k) or [])
    monkeypatch.setattr(run_mod, "write_report", lambda *a, **k: {"env": a[3]})
    out = bench.run("quick", out_dir=str(tmp_path), what=("models",), idle_ms=3.0,
                    progress=False)
    assert seen["idle_seconds"] == pytest.approx(0.003)
    assert "models: after 3 ms of sleep" in out["env"]["settle"]


def test_bench_cli_prints_the_reports_notes(tmp_path, capsys, monkeypatch):
    from hetconv.cli import main

    report = tmp_path / "t_results.md"  # the shape write_report gives it: head, targets, tables
    report.write_text("# Benchmark results (t)\n\n| cpu |\n|---|\n| x |\n\nRun time: 1.0 min.\n\n"
                      "**Note.** The machine's FMA rate varied 2.50x during this run.\n\n"
                      "## Targets\n\n- a target: MET\n\n## Models\n\n| a table |\n")
    monkeypatch.setattr("hetconv.bench.run", lambda *a, **k: {"markdown": str(report)})
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "- a target: MET" in out and "| a table |" not in out and "| cpu |" not in out
    assert "**Note.** The machine's FMA rate varied 2.50x" in out


def test_bench_cli_prints_targets_that_end_the_report(tmp_path, capsys, monkeypatch):
    from hetconv.cli import main

    report = tmp_path / "t_results.md"
    report.write_text("# Benchmark results (t)\n\n## Targets\n\n- the last target: MET")
    monkeypatch.setattr("hetconv.bench.run", lambda *a, **k: {"markdown": str(report)})
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    assert "- the last target: MET\n" in capsys.readouterr().out


@pytest.mark.parametrize("args,want", [(["--quick"], False), ([], True),
                                       (["--no-compile"], False), (["--quick", "--compile"], True)])
def test_bench_compiles_the_baselines_in_the_full_run(tmp_path, monkeypatch, args, want):
    """The issue's dense baseline is the best of eager and torch.compile: the full run times
    the compiled variants unless told not to; the quick one only when asked."""
    from hetconv.cli import main

    report = tmp_path / "r.md"
    report.write_text("## Targets\n")
    got = {}
    monkeypatch.setattr("hetconv.bench.run", lambda *a, **k: got.update(k) or {"markdown": str(report)})
    assert main(["bench", *args]) == 0
    monkeypatch.undo()
    seen = fake_run(monkeypatch)
    bench.run("quick" if "--quick" in args else "full", out_dir=str(tmp_path),
              what=("models",), progress=False, threads=None, compile=got["compile"])
    assert seen["models"]["compile"] is want
    assert seen["env"]["torch_compile"].startswith("compiled" if want else "not timed")


@pytest.mark.skipif(not hetconv.native.available(), reason="native kernel unavailable")
@pytest.mark.parametrize("stride", [1, 2])
def test_kernel_split_script_times_each_checked_kernel(stride, monkeypatch):
    """benchmarks/kernel_split.py: one row per kernel of a training step (forward, input
    gradient, weight gradient), each checked against the dense reference before it is timed
    (a wrong kernel stops the run), with the counted work of the layer and Eq. 5's speedup."""
    ks = load_script("kernel_split")
    shape = bench.LayerShape("t", "32->48 10x10", 2, 32, 48, 10, stride)
    rows = ks.split(shape, 4, repeats=1)
    assert [r["kernel"] for r in rows] == ["forward", "input_grad", "weight_grad"]
    b, out = 2, (10 - 1) // stride + 1
    # per output value: M / P 3x3 kernels and M - M / P 1x1 ones (paper Eq. 5), dense 9 M
    assert all(r["het_macs"] == b * out * out * 48 * (8 * 9 + 24) for r in rows)
    assert all(r["dense_macs"] == b * out * out * 48 * 32 * 9 for r in rows)
    assert all(r["theory"] == pytest.approx(9 * 4 / (4 + 8)) for r in rows)
    assert all(r["het_ms"] > 0 and r["dense_ms"] > 0 for r in rows)
    assert all(r["speedup"] == pytest.approx(r["dense_ms"] / r["het_ms"]) for r in rows)
    # the forward's baseline may be the convolution with packed weights, never the gradients'
    assert rows[0]["dense_layout"] in ("nchw", "channels_last", "nchw_packed",
                                       "channels_last_packed")
    assert {r["dense_layout"] for r in rows[1:]} <= {"nchw", "channels_last"}
    table = ks.format_rows(rows, 100.0)
    assert table.count("\n") == 2 + 3 and "| t | 32->48 10x10 | 2 | 4 | weight_grad |" in table
    real = hetconv.native._weight_grad
    monkeypatch.setattr(hetconv.native, "_weight_grad",
                        lambda *a: tuple(torch.zeros_like(g) for g in real(*a)))
    with pytest.raises(RuntimeError, match="weight_grad kernel disagrees"):
        ks.split(shape, 4, repeats=1)


@pytest.mark.skipif(not hetconv.native.available(), reason="native kernel unavailable")
def test_kernel_split_script_command_line(tmp_path, capsys):
    ks = load_script("kernel_split")
    out = tmp_path / "split.md"
    args = ["--suites", "vgg16_cifar", "--min-channels", "512", "--batch-scale", "0.02",
            "--parts", "8", "--repeats", "1", "--threads", "1", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        assert ks.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert text == capsys.readouterr().out
    # VGG-16's 512->512 layers (4x4, 2x2) at batch 1: three kernels each
    assert text.count("| vgg16_cifar | 512->512 ") == 2 * 3 and "FMA rate:" in text
    for bad in (["--parts", "0"], ["--min-channels", "100000"], ["--batch-scale", "0"]):
        with pytest.raises(SystemExit):
            ks.main(bad)


def test_full_bench_times_each_model_candidate_more_often_than_each_layer(tmp_path, monkeypatch):
    """The full preset takes 9 samples per model candidate and 5 per layer candidate (the
    models' samples cost little next to their optimization); ``repeats`` given sets both."""
    run_mod = sys.modules["hetconv.bench.run"]
    seen = {}
    monkeypatch.setattr(run_mod, "run_models", lambda *a, **k: seen.update(models=k["repeats"]) or [])
    monkeypatch.setattr(run_mod, "run_layers", lambda *a, **k: seen.update(layers=k["repeats"]) or [])
    monkeypatch.setattr(run_mod, "write_report", lambda *a, **k: {})
    monkeypatch.setattr(run_mod.native, "fma_rate", lambda *a, **k: None)
    bench.run("full", out_dir=str(tmp_path), progress=False)
    assert seen == {"models": 9, "layers": 5}
    bench.run("full", out_dir=str(tmp_path), progress=False, repeats=2)
    assert seen == {"models": 2, "layers": 2}
    bench.run("quick", out_dir=str(tmp_path), progress=False)
    assert seen == {"models": 3, "layers": 3}


@pytest.mark.parametrize("argv, says", [
    (["--parts", "0"], "--parts"), (["--parts", "x"], "--parts"),
    (["--summary", "/nonexistent/s.jsonl"], "--summary"), (["--shapes", "999"], "--shapes"),
    (["--suites", "resnet56_cifar", "--batches", "1"], "batch"), (["--repeats", "0"], "--repeats")])
def test_auto_rule_sweep_script_refuses_bad_arguments(argv, says, capsys):
    """Bad arguments, or a selection with no layer: an argparse error saying why (was a
    ZeroDivisionError, a traceback, or an empty table)."""
    ars = load_script("auto_rule_sweep")
    with pytest.raises(SystemExit):
        ars.main(argv)
    assert says in capsys.readouterr().err
