"""The benchmark harness measures and reports what it says (no timing asserts: the numbers
each test expects come from the rows it builds or the timings it fakes)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn

import hetconv
import hetconv.functional as HF
from hetconv import bench
from hetconv._timing import Timing
from hetconv.bench import layers as bl
from hetconv.bench import models as bm
from hetconv.bench.report import layer_table, model_table, target_checks

from bench_helpers import fake_run, load_script

bench_run = importlib.import_module("hetconv.bench.run")  # the module, not bench.run()

TINY = bench.LayerShape("t", "8->8 6x6", 2, 8, 8, 6, 1)


def _break_backend(monkeypatch, backend, how):
    real = HF.het_conv2d

    def het_conv2d(x, wk, w1, bias=None, stride=1, padding=None, dilation=1,
                   pattern="shifted", backend_=None, *args, **kwargs):
        chosen = kwargs.pop("backend", backend_)
        if chosen == backend:
            return how(real, x, wk, w1, bias, stride, padding, dilation, pattern, chosen)
        return real(x, wk, w1, bias, stride, padding, dilation, pattern, chosen,
                    *args, **kwargs)
    monkeypatch.setattr(HF, "het_conv2d", het_conv2d)


def test_layer_candidates_are_checked_against_the_definition_before_timing(monkeypatch):
    """A backend computing another layer (here: the other pattern, as fast as the right
    one) must not be timed as if it computed this one."""
    bl.check_candidates(bl.layer_candidates(TINY, 2), False)  # all fine as they are

    def wrong_pattern(real, x, wk, w1, bias, s, pad, dil, pattern, backend):
        other = "blocked" if pattern == "shifted" else "shifted"
        return real(x, wk, w1, bias, s, pad, dil, other, backend)
    _break_backend(monkeypatch, "grouped", wrong_pattern)
    with pytest.raises(RuntimeError, match="het_grouped"):
        bench.run_layers([TINY], parts=(1, 2), modes=("infer",), repeats=1, warmup=0,
                         settle=0, settle_seconds=0.0)


def test_layer_training_candidates_are_checked_for_their_gradients(monkeypatch):
    """A training step whose backward drops a weight's gradient is cheaper: caught."""
    bl.check_candidates(bl.layer_candidates(TINY, 2, train=True), True)

    def no_kxk_gradient(real, x, wk, w1, bias, s, pad, dil, pattern, backend):
        return real(x, wk.detach(), w1, bias, s, pad, dil, pattern, "dense")
    _break_backend(monkeypatch, "grouped", no_kxk_gradient)
    with pytest.raises(RuntimeError, match="het_grouped .*gradient of leaf 1"):
        bench.run_layers([TINY], parts=(2,), modes=("train",), repeats=1, warmup=0,
                         settle=0, settle_seconds=0.0)


def test_dense_baselines_and_public_designs_carry_references():
    cands = bl.layer_candidates(TINY, 2)
    named = {k for k, v in cands.items() if getattr(v, "reference", None) is not None}
    assert {"dense_cl", "branches"} <= named
    assert {k for k in cands if k.startswith("het_")} <= named


def _time_a_broken_variant(monkeypatch, module, name: str, change, metric: str, batch: int):
    """Run the VGG-16 P4 family's ``metric`` with ``module.name`` (a model pass) returning
    a model whose output ``change`` alters."""
    real = getattr(module, name)

    def broken(model, x, **kw):
        m = real(model, x, **kw)
        m.register_forward_hook(lambda mod, inp, out: change(out))
        return m
    monkeypatch.setattr(module, name, broken)
    bench.run_models(["vgg16_cifar"], [metric], parts={"vgg16_cifar": (4,)}, repeats=1,
                     warmup=0, batch=batch, width=0.125, onnx=False, settle_seconds=0.0,
                     idle_seconds=0.0)


def test_model_variants_are_checked_against_the_model(monkeypatch):
    """An optimized model that computes something else must not be timed."""
    import hetconv.deploy as deploy

    with pytest.raises(RuntimeError, match="optimized"):
        _time_a_broken_variant(monkeypatch, deploy, "optimize_for_inference",
                               lambda out: out + 1.0, "throughput_b64", 2)


def test_model_training_variants_are_checked_against_the_model(monkeypatch):
    import hetconv.permute as permute

    with pytest.raises(RuntimeError, match="absorbed_cl"):
        _time_a_broken_variant(monkeypatch, permute, "absorb_permutations",
                               lambda out: out * 1.5, "train_step_b64", 4)


def test_check_variants_passes_equal_results_and_names_the_wrong_one():
    def variant(value):
        fn = lambda: None  # noqa: E731
        fn.output = lambda: [torch.tensor([value]), torch.tensor([2.0, 0.0])]
        return fn
    bm.check_variants({"eager_nchw": variant(1.0), "eager_cl": variant(1.0 + 1e-6)})
    with pytest.raises(RuntimeError, match="optimized"):
        bm.check_variants({"eager_nchw": variant(1.0), "eager_cl": variant(1.0),
                           "optimized": variant(1.5)})


def test_check_variants_takes_training_gradients_in_norm():
    """A ReLU whose input is 0 up to rounding stops the gradient in one variant and not the
    other: one element of a weight gradient 1.3% of the largest off (VGG-16 P1 at batch 64,
    NCHW vs channels_last) must pass; gradients wrong by 15% in norm must not."""
    torch.manual_seed(0)
    grads = [torch.randn(64, 64, 3, 3), torch.randn(64)]

    def variant(loss, gs):
        fn = lambda: None  # noqa: E731
        fn.output = lambda: [torch.tensor(loss)] + gs
        return fn
    flipped = [g.clone() for g in grads]
    flipped[0].view(-1)[7] += 0.013 * max(g.abs().max() for g in grads)
    bm.check_variants({"eager_nchw": variant(2.3, grads), "eager_cl": variant(2.3, flipped)})
    wrong = [g * 1.15 for g in grads]
    with pytest.raises(RuntimeError, match="optimized.*relative error 0.15"):
        bm.check_variants({"eager_nchw": variant(2.3, grads), "optimized": variant(2.3, wrong)})
    with pytest.raises(RuntimeError, match="absorbed_cl.*output"):
        bm.check_variants({"eager_nchw": variant(2.3, grads),
                           "absorbed_cl": variant(2.4, grads)})


def _layer_row(cand, ms, pattern, part=4, mode="infer"):
    return {"suite": "s", "layer": "128->128 8x8", "batch": 1, "in_ch": 128, "out_ch": 128,
            "size": 8, "stride": 1, "part": part, "mode": mode, "candidate": cand, "ms": ms,
            "speedup": 4.0 / ms, "theory": hetconv.pattern.speedup(part), "pattern": pattern}


def test_blocked_pattern_runs_label_the_pattern_twins_by_pattern():
    """With --pattern blocked, het_fused is the blocked layer and het_fused_shifted the
    shifted one: the shifted-vs-blocked check and the tables must not lose or swap them."""
    rows = [_layer_row("dense_nchw", 4.0, "blocked"), _layer_row("het_auto", 2.0, "blocked"),
            _layer_row("het_fused", 1.0, "blocked"),        # blocked: 1 ms
            _layer_row("het_fused_shifted", 2.0, "blocked")]  # shifted: 2 ms
    lines = [x for x in target_checks(rows, []) if "single layers (fused backend)" in x]
    assert len(lines) == 1 and "0/1 cases" in lines[0] and "2.000" in lines[0]
    assert lines[0].endswith("NOT MET")
    table = layer_table(rows).splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    row = dict(zip(head, cells))
    assert row["het_fused"] == "2.00" and row["het_fused_blocked"] == "4.00"
    tables = load_script("performance_tables")
    wide = tables.wide_layer_table(rows).splitlines()
    head = [c.strip() for c in wide[0].strip("|").split("|")]
    cells = dict(zip(head, [c.strip() for c in wide[2].strip("|").split("|")]))
    assert cells["fused shifted"] == "2.00" and cells["fused blocked"] == "4.00"
    # the default pattern: names unchanged
    same = [_layer_row("dense_nchw", 4.0, "shifted"), _layer_row("het_fused", 2.0, "shifted"),
            _layer_row("het_fused_blocked", 1.0, "shifted")]
    lines = [x for x in target_checks(same, []) if "single layers (fused backend)" in x]
    assert len(lines) == 1 and "2.000" in lines[0]


def _model_row(model, metric, batch, ratio, ms=1.0):
    return {"family": "vgg16_cifar", "model": model, "metric": metric, "variant": "eager_cl",
            "batch": batch, "ms": ms, "images_per_s": batch / ms * 1e3, "best": True,
            "ratio": ratio, "theory_layer": None}


def test_model_metrics_say_the_batch_they_ran_at():
    """The quick preset times 'throughput_b64' at batch 16: the report says so."""
    rows = [_model_row("P1", "throughput_b64", 16, 1.0), _model_row("P4", "throughput_b64", 16, 2.6)]
    assert "throughput_b64 (batch 16)" in model_table(rows)
    line = [x for x in target_checks([], rows) if x.startswith("vgg16_cifar P4")][0]
    assert "(batch 16)" in line
    full = [_model_row("P1", "throughput_b64", 64, 1.0), _model_row("P4", "latency_b1", 1, 2.6)]
    assert "(batch" not in model_table(full)


def test_model_ratios_are_against_p1_wherever_the_parts_list_it(monkeypatch):
    """parts=(4, 1): the ratio is still P4 against P1 (it was against the first listed)."""
    medians = {"P4": 0.001, "P1": 0.003}
    monkeypatch.setattr(bm, "_build", lambda family, part, width: nn.Identity())
    monkeypatch.setattr(bm, "_train_variants", lambda model, x: {"eager_nchw": lambda: None})

    def fake_timings(cands, **kw):
        return {k: Timing.from_samples([medians[k.split("|")[0]]]) for k in cands}
    monkeypatch.setattr(bm, "time_interleaved", fake_timings)
    rows = bench.run_models(["vgg16_cifar"], ["train_step_b64"],
                            parts={"vgg16_cifar": (4, 1)}, repeats=1, warmup=0)
    ratio = {r["model"]: r["ratio"] for r in rows}
    assert ratio == {"P4": pytest.approx(3.0), "P1": pytest.approx(1.0)}
    assert {r["reference"] for r in rows} == {"P1"}


def test_partial_runs_do_not_replace_the_full_report(monkeypatch, tmp_path):
    """`hetconv bench --what models` wrote docs/full_results.* with no layer tables."""
    seen = fake_run(monkeypatch)
    bench.run("full", out_dir=str(tmp_path), what=("models",), progress=False, threads=None)
    assert seen["name"] == "full_models"
    bench.run("quick", out_dir=str(tmp_path), what=("layers",), progress=False, threads=None)
    assert seen["name"] == "quick_layers"
    bench.run("full", out_dir=str(tmp_path), progress=False, threads=None)
    assert seen["name"] == "full"
    bench.run("full", out_dir=str(tmp_path), what=("models",), name="run99", progress=False,
              threads=None)
    assert seen["name"] == "run99"


def test_a_run_cut_short_by_max_minutes_says_so(monkeypatch, tmp_path):
    one = [{"family": "vgg16_cifar", "metric": "throughput_b64"}]
    seen = fake_run(monkeypatch, model_rows=one)
    bench.run("full", out_dir=str(tmp_path), what=("models",), max_minutes=1.0,
              progress=False, threads=None)
    n = len(bench_run.PRESETS["full"]["families"]) * len(bench_run.PRESETS["full"]["metrics"])
    assert any(f"{n - 1} of {n} model items" in note for note in seen["notes"])
    bench.run("quick", out_dir=str(tmp_path), what=("models",), max_minutes=1.0,
              progress=False, threads=None)  # quick: that one item is all of it
    assert seen["notes"] == []


def test_a_bad_pattern_is_refused_before_the_models_run(monkeypatch, tmp_path):
    def models(*a, **k):
        raise AssertionError("the models ran")
    monkeypatch.setattr(bench_run, "run_models", models)
    with pytest.raises(ValueError, match="pattern"):
        bench.run("quick", out_dir=str(tmp_path), pattern="diagonal", progress=False,
                  threads=None)



def _conv2d_layouts(monkeypatch) -> list:
    """Record (input channels_last?, weight channels_last?) of every F.conv2d call."""
    seen = []
    real = torch.nn.functional.conv2d

    def spy(x, w, *args, **kwargs):
        seen.append((x.is_contiguous(memory_format=torch.channels_last),
                     w.is_contiguous(memory_format=torch.channels_last)))
        return real(x, w, *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    return seen


@pytest.mark.parametrize("train", [False, True])
def test_channels_last_dense_baseline_has_channels_last_weights(monkeypatch, train):
    """nn.Conv2d in channels_last (a model after .to(memory_format=channels_last)) has its
    weights in channels_last too; the baseline ran NCHW weights on channels_last input,
    which are reordered every call (a slower, weaker baseline)."""
    shape = bench.LayerShape("t", "16->16 6x6", 2, 16, 16, 6, 1)
    cands = bl.layer_candidates(shape, 1, train)
    seen = _conv2d_layouts(monkeypatch)
    cands["dense_cl"]()
    assert seen and seen[0] == (True, True)
    seen.clear()
    cands["dense_nchw"]()
    assert seen and seen[0] == (False, False)


def test_auto_rule_sweep_channels_last_baseline_has_channels_last_weights(monkeypatch):
    sweep = load_script("auto_rule_sweep")
    cands = sweep.candidates(bench.LayerShape("t", "16->16 6x6", 2, 16, 16, 6, 1), 1, True)
    seen = _conv2d_layouts(monkeypatch)
    cands["dense_cl"]()
    assert seen and seen[0] == (True, True)


@pytest.mark.skipif(not hetconv.native.available(), reason="native kernel unavailable")
def test_kernel_split_check_counts_the_weight_gradients(monkeypatch):
    """benchmarks/kernel_split.py compared the kernels' results with zip: a weight-gradient
    kernel that returned only the KxK gradient (not the pointwise one) passed the check."""
    ks = load_script("kernel_split")
    real = hetconv.native._weight_grad
    monkeypatch.setattr(hetconv.native, "_weight_grad", lambda *a: real(*a)[:1])
    with pytest.raises(RuntimeError, match="weight_grad kernel"):
        ks.split(bench.LayerShape("t", "32->48 8x8", 1, 32, 48, 8, 1), 4, repeats=1)


def test_environment_names_the_hetconv_version():
    """The issue asks for the versions printed: the report named torch's and Python's but
    not the version of hetconv it measured."""
    from hetconv.bench.report import environment

    env = environment()
    assert env["hetconv"] == hetconv.__version__
    assert env["torch"] == torch.__version__ and env["torch_threads"] == str(torch.get_num_threads())


@pytest.mark.parametrize("train", [False, True])
def test_public_designs_on_channels_last_input_have_channels_last_weights(monkeypatch, train):
    """masked dense, GWC+PWC and DWC+PWC run on channels_last input: their weights must be
    channels_last too (as in a model converted with .to(memory_format=channels_last)), or
    each call reorders them and the public designs look slower than they are."""
    shape = bench.LayerShape("t", "16->16 6x6", 2, 16, 16, 6, 1)
    cands = bl.layer_candidates(shape, 4, train)
    seen = _conv2d_layouts(monkeypatch)
    for name in ("masked_dense", "gwc_pwc", "dwc_pwc"):
        seen.clear()
        cands[name]()
        assert seen and all(x_cl for x_cl, _ in seen), name
        assert all(w_cl for _, w_cl in seen), name


def test_compiled_dense_baseline_is_compiled_for_every_shape(monkeypatch):
    """Every shape's compiled baseline compiles the same lambda (one code object): past
    dynamo's recompile limit it ran eagerly while reported as compiled.  Each item's
    candidates start from a reset dynamo, so every shape and layout gets its graph."""
    import torch._dynamo

    graphs = []

    def counting(gm, example_inputs):
        graphs.append({t.shape[-1] for t in example_inputs if isinstance(t, torch.Tensor)})
        return gm.forward
    real = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kw: real(fn, backend=counting, dynamic=False))
    sizes = (4, 5, 6)
    # (config.patch, not monkeypatch: monkeypatch's undo deletes the config entry, which
    # breaks every later torch.compile in the process)
    try:
        with torch._dynamo.config.patch(recompile_limit=2):
            for size in sizes:
                shape = bench.LayerShape("t", f"8->8 {size}x{size}", 1, 8, 8, size, 1)
                cands = bl.layer_candidates(shape, 1, False, compile=True)
                cands["dense_nchw_compiled"]()
                cands["dense_cl_compiled"]()
    finally:
        torch._dynamo.reset()  # nothing compiled with the counting backend stays behind
    # each size: its NCHW and its channels_last graph (without the reset, the third size
    # found the limit reached and ran eagerly: no graph)
    assert all(sum(size in g for g in graphs) >= 2 for size in sizes), graphs


def test_every_compiled_model_of_a_family_is_compiled(monkeypatch):
    """A family's models share their code objects (ResNet.forward, ...): dynamo keeps one
    compiled entry per model, and past its recompile limit (8; VGG-16's family has 10
    models) ran the later models' forwards eagerly while they were timed as "compiled".
    Here the limit is 1 and three models are compiled: each gets a whole-model graph (one
    whose inputs include the images)."""
    import torch._dynamo

    graphs = []

    def counting(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=counting))
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            rows = bm._measure("resnet56_cifar", "throughput_b64", (1, 2, 4), 1, 0, 2, 0.25,
                               True, False, 0, 0.0)
    finally:
        torch._dynamo.reset()
    assert {r["model"] for r in rows if r["variant"] == "compiled"} == {"P1", "P2", "P4"}
    whole = [g for g in graphs if (2, 3, 32, 32) in g]
    assert len(whole) >= 3, graphs


def _conv_wrong_on_channels_last_weights(monkeypatch) -> None:
    """F.conv2d made 1.5x wrong where its weight is in channels_last memory (only)."""
    real = torch.nn.functional.conv2d

    def wrong_on_cl_weights(x, w, *args, **kwargs):
        y = real(x, w, *args, **kwargs)
        cl_only = (w.is_contiguous(memory_format=torch.channels_last)
                   and not w.is_contiguous())
        return y * 1.5 if cl_only else y
    monkeypatch.setattr(torch.nn.functional, "conv2d", wrong_on_cl_weights)


@pytest.mark.parametrize("train", [False, True])
def test_a_broken_channels_last_dense_baseline_is_caught_and_named(monkeypatch, train):
    """dense_cl's reference is computed in NCHW: were it the expression dense_cl times, a
    convolution wrong only on channels_last weights would pass its own check."""
    shape = bench.LayerShape("t", "16->16 6x6", 2, 16, 16, 6, 1)
    cands = bl.layer_candidates(shape, 1, train)
    _conv_wrong_on_channels_last_weights(monkeypatch)
    with pytest.raises(RuntimeError) as err:
        bl.check_candidates(cands, train)
    assert "dense_cl (" in str(err.value) and "dense_nchw" not in str(err.value)


@pytest.mark.parametrize("train", [False, True])
def test_the_masked_dense_design_is_checked_too(monkeypatch, train):
    """The public masked-dense design had no reference: wrong on channels_last memory (where
    it runs), it would have been timed.  Its reference is the same leaves in NCHW."""
    shape = bench.LayerShape("t", "16->16 6x6", 2, 16, 16, 6, 1)
    cands = bl.layer_candidates(shape, 4, train)
    bl.check_candidates(cands, train)  # (right as it is)
    _conv_wrong_on_channels_last_weights(monkeypatch)
    with pytest.raises(RuntimeError) as err:
        bl.check_candidates(cands, train)
    assert "masked_dense (" in str(err.value)


def test_a_training_candidate_that_drops_the_gradient_is_named(monkeypatch):
    """A backend whose training output carries no gradient (detached) must be reported by
    name as missing its gradients, not stop the check with autograd's unnamed error."""
    from hetconv import functional as HF

    real = HF.het_conv2d

    def detaching(*args, **kwargs):
        y = real(*args, **kwargs)
        return y.detach() if kwargs.get("backend", args[-1] if len(args) > 8 else None) == \
            "grouped" else y
    monkeypatch.setattr(HF, "het_conv2d", detaching)
    shape = bench.LayerShape("t", "16->16 6x6", 2, 16, 16, 6, 1)
    cands = bl.layer_candidates(shape, 4, True)
    with pytest.raises(RuntimeError, match=r"het_grouped \(gradient of leaf 0: missing\)"):
        bl.check_candidates(cands, True)
