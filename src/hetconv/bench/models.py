"""Per-model benchmark: inference latency (batch 1), throughput (batch 64), training step.

For each family every P variant is timed in one interleaved batch per
metric, in several execution variants, and the best variant of each model is
compared with the best variant of the family's reference (P = 1, or the
depthwise+pointwise MobileNet).  Each timed call follows an untimed call of the
same variant, and more of them up to 10 ms (``settle=1, settle_seconds=0.01``, the
defaults, of :func:`hetconv._timing.time_interleaved`): the numbers are steady-state, as in
a loop of calls to one model, and no variant pays for the caches or threads another runtime
(onnxruntime) left behind - at batch 1 one untimed call was not enough.  Each variant's
calls follow 5 ms of sleep (``idle_seconds``, ``hetconv bench --idle-ms``): onnxruntime's
threads spin after its call, and through another variant's busy calls too, until the cores
go idle.

* ``eager_nchw`` / ``eager_cl``: the model as built (``backend="auto"``), NCHW
  or channels_last model and input;
* ``optimized``: :func:`hetconv.optimize_for_inference` (BN folded, backend per
  layer and memory format measured) - inference only;
* ``onnxruntime``: :func:`hetconv.export_onnx` (grouped form) run by
  onnxruntime with the same thread count, all sessions of a process on one global thread
  pool - inference only, when installed;
* ``compiled``: ``torch.compile`` of the eager channels_last model, when asked;
* ``absorbed_cl`` (training, models with shifted layers): the channels_last
  model run through :func:`hetconv.absorb_permutations` with
  ``share_parameters=True``, as ``hetconv train --absorb-permutations`` does.

Before anything is timed, every variant of a model is checked against ``eager_nchw``
(:func:`check_variants`: the outputs; in training the loss and the parameters' gradients):
a variant that computes something else raises instead of being timed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .._timing import IDLE_MS, SETTLE_MS, time_interleaved

__all__ = ["MODEL_SUITES", "METRICS", "run_models", "check_variants"]

#: family -> parts (None = the family's reference architecture; a trailing "b", e.g.
#: ``"4b"``, builds the same model with ``pattern="blocked"``: the default "shifted"
#: pattern is compared with it at model level).
MODEL_SUITES: Dict[str, tuple] = {
    "vgg16_cifar": (1, 2, 4, "4b", 8, "8b", 16, 32, 64, "C"),
    "resnet56_cifar": (1, 2, 4, "4b"),
    "mobilenet_cifar": (None, 32),
}

METRICS = ("latency_b1", "throughput_b64", "train_step_b64")

#: ``latency_b1`` takes this many times the ``repeats`` samples per variant.
LATENCY_SAMPLES = 3


def _label(part) -> str:
    return "ref" if part is None else f"P{part}"


def _split_part(part):
    """``4`` -> (4, "shifted"); ``"4b"`` -> (4, "blocked"); ``"C"`` -> ("C", "shifted")."""
    if isinstance(part, str) and part.endswith("b"):
        return int(part[:-1]), "blocked"
    return part, "shifted"


def _build(family: str, part, width: float) -> nn.Module:
    from ..models import create_model

    kwargs = {"width": width}
    part, pattern = _split_part(part)
    if part is not None and part != 1:
        kwargs.update(part=part, pattern=pattern)
    torch.manual_seed(0)
    return create_model(family, **kwargs)


def _inference_variants(model: nn.Module, x: torch.Tensor, compile: bool,
                        onnx: bool, tmpdir: str, tag: str) -> Dict[str, Callable[[], None]]:
    from ..deploy import export_onnx, optimize_for_inference, plan_summary

    cl = torch.channels_last
    out: Dict[str, Callable[[], None]] = {}
    model = model.eval()
    nchw = model
    out["eager_nchw"] = _no_grad(nchw, x)
    import copy
    m_cl = copy.deepcopy(model).to(memory_format=cl)
    x_cl = x.contiguous(memory_format=cl)
    out["eager_cl"] = _no_grad(m_cl, x_cl)
    opt = optimize_for_inference(model, x, repeats=3, check=False)
    x_opt = x.contiguous(memory_format=cl if opt.hetconv_plan["memory_format"] == "channels_last"
                         else torch.contiguous_format)
    out["optimized"] = _no_grad(opt, x_opt)
    out["optimized"].plan = plan_summary(opt.hetconv_plan)
    if compile:
        compiled = torch.compile(m_cl)
        out["compiled"] = _no_grad(compiled, x_cl)
    if onnx:
        try:
            import onnxruntime as ort
        except ImportError:  # optional extra
            ort = None
        if ort is not None:
            path = export_onnx(model, os.path.join(tmpdir, f"{tag}.onnx"), x)
            sess = _ort_session(ort, path, torch.get_num_threads())
            feed = {"input": x.numpy()}
            out["onnxruntime"] = lambda: sess.run(None, feed)
            out["onnxruntime"].output = lambda: torch.from_numpy(sess.run(None, feed)[0])
    return out


#: Threads of the onnxruntime global thread pool this process set up (None: not yet; 0: it
#: could not, another caller created global pools first).
_ORT_POOL: Optional[int] = None


def ort_thread_pool() -> Optional[int]:
    """Threads of the onnxruntime thread pool the benchmark's sessions share in this process
    (None before the first session, 0 when each session has its own)."""
    return _ORT_POOL


def _ort_session(ort, path: str, threads: int):
    """An onnxruntime session on the process's global thread pool of ``threads`` threads.

    Every session with a pool of its own keeps its workers polling for work while the
    other candidates run: with the ten VGG-16 sessions of a batch-1 family alive, each
    session's call took 1.4-1.5 ms instead of 0.65 ms and the optimized torch model's
    1.30 ms instead of 0.97 ms.  One pool shared by all sessions, as onnxruntime offers
    for processes that hold many, removes that (0.63-0.71 ms and 1.04 ms).
    """
    global _ORT_POOL
    if _ORT_POOL is None:
        try:
            ort.set_global_thread_pool_sizes(threads, 1)
            _ORT_POOL = threads
        except ort.capi.onnxruntime_pybind11_state.Fail:  # the process's global pools exist
            _ORT_POOL = 0                                   # already (sizes unknown)
    opts = ort.SessionOptions()
    if _ORT_POOL == threads:
        opts.use_per_session_threads = False
    else:  # other sizes, or not ours: a pool of the session's own, as before
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _no_grad(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def call():
        with torch.no_grad():
            model(x)

    def output():
        with torch.no_grad():
            return model(x)
    call.output = output
    return call


def _train_variants(model: nn.Module, x: torch.Tensor) -> Dict[str, Callable[[], None]]:
    import copy

    from ..permute import absorb_permutations, has_shifted_layers

    out = {}
    target = torch.randint(0, 10, (x.shape[0],))
    variants = [("eager_nchw", torch.contiguous_format, False),
                ("eager_cl", torch.channels_last, False)]
    if has_shifted_layers(model):
        variants.append(("absorbed_cl", torch.channels_last, True))
    for name, fmt, absorb in variants:
        m = copy.deepcopy(model).train().to(memory_format=fmt)
        xx = x.contiguous(memory_format=fmt)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        if absorb:  # trains m's own parameters (hetconv train --absorb-permutations)
            m = absorb_permutations(m, xx[:1], share_parameters=True)

        def step(m=m, xx=xx, opt=opt):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(xx), target).backward()
            opt.step()

        def output(m=m, xx=xx, params=list(opt.param_groups[0]["params"])):
            """The loss and the gradients a step applies (none applied, none kept)."""
            with torch.random.fork_rng():  # the same draws for every variant, if any
                torch.manual_seed(0)
                loss = nn.functional.cross_entropy(m(xx), target)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            return [loss.detach()] + [None if g is None else g.detach() for g in grads]
        step.output = output
        out[name] = step
    return out


#: relative tolerances of :func:`check_variants`: outputs and losses within
#: ``CHECK_RTOL`` of their largest magnitude; a training variant's parameter gradients, each
#: in norm, within ``CHECK_GRAD_RTOL`` of its own norm (or of a thousandth of the largest
#: gradient's, for those that are 0 up to rounding, e.g. a bias before BatchNorm).  The
#: gradient of a network at initialisation is ill-conditioned: VGG-16 P1 at batch 64 in fp32
#: is 0.5% (NCHW) and 1.4% (channels_last) off its float64 value in norm for every layer
#: before the last block (one ReLU or max-pool decision there, taken at rounding level,
#: reroutes the gradient of everything upstream), 1e-5 after it; every benchmarked model's
#: variants at batch 64 within 0.7-2.4% of its NCHW eager model.  A broken layer is off by
#: the order of the values.
CHECK_RTOL: float = 1e-2
CHECK_GRAD_RTOL: float = 1e-1


def check_variants(variants: Dict[str, Callable[[], None]], rtol: float = CHECK_RTOL,
                   grad_rtol: float = CHECK_GRAD_RTOL) -> None:
    """Raise RuntimeError unless every variant of one model computes what its first variant
    (``eager_nchw``, the model as built) does: the inference variants' outputs and the
    training variants' losses within ``rtol`` of their largest magnitude, the training
    variants' parameter gradients each within ``grad_rtol`` in norm (see
    :data:`CHECK_GRAD_RTOL`).  A variant that computed something else (a broken
    optimization or export) must not be timed: it could look fast."""
    from .layers import _mismatch

    def results(call):
        got = call.output()
        return list(got) if isinstance(got, (list, tuple)) else [got]

    names = [k for k, v in variants.items() if hasattr(v, "output")]
    if len(names) < 2:
        return
    want = results(variants[names[0]])
    bad = []
    for name in names[1:]:
        got = results(variants[name])
        # shapes, missing and non-finite results, and the output (loss) elementwise
        why = _mismatch(got, want, float("inf")) or _mismatch(
            got[:1], want[:1], rtol)
        if not why and len(want) > 1:  # the parameter gradients, each in norm
            norms = [0.0 if b is None else float(b.double().norm()) for b in want[1:]]
            floor = 1e-3 * max(norms + [1e-12])
            for i, (a, b, size) in enumerate(zip(got[1:], want[1:], norms)):
                if b is None:
                    continue
                rel = float((a.double() - b.double()).norm()) / max(size, floor)
                if rel > grad_rtol:
                    why = f"gradient of parameter {i}: relative error {rel:.3g} in norm"
                    break
        if why:
            bad.append(f"{name} ({why})")
    if bad:
        raise RuntimeError(f"model variants differ from {names[0]}: " + "; ".join(bad))


def _room_to_compile(models: int, compile: bool = True):
    """Dynamo's recompile limits raised for ``models`` compiled models in one process: the
    models of a family share their code objects (``VGG.forward``, each block's), one
    compiled entry per model, and past the limit (8 by default) dynamo runs a code object
    eagerly: a family's later models (VGG-16's P16 to PC, its blocked twins) were timed as
    "compiled" while their forwards ran layer by layer in eager mode."""
    if not compile:
        return contextlib.nullcontext()
    import torch._dynamo

    cfg = torch._dynamo.config
    # (torch < 2.7 calls them cache_size_limit and accumulated_cache_size_limit)
    one, total = (("recompile_limit", "accumulated_recompile_limit")
                  if hasattr(cfg, "recompile_limit")
                  else ("cache_size_limit", "accumulated_cache_size_limit"))
    need = 2 * models + 8
    return cfg.patch({one: max(getattr(cfg, one), need),
                      total: max(getattr(cfg, total), 64 * need)})


def _measure(family: str, metric: str, fam_parts: Sequence, repeats: int, warmup: int,
             batch: int, width: float, compile: bool, onnx: bool, settle: int,
             settle_seconds: float, idle_seconds: float = 0.0) -> List[dict]:
    """The rows of one (family, metric): every model of the family in every variant, timed
    interleaved."""
    from .. import pattern as _pattern

    rows: List[dict] = []
    b = 1 if metric == "latency_b1" else batch
    x = torch.randn(b, 3, 32, 32)
    cands: Dict[str, Callable[[], None]] = {}
    with tempfile.TemporaryDirectory() as tmpdir, _room_to_compile(len(fam_parts), compile):
        for part in fam_parts:
            model = _build(family, part, width)
            tag = f"{family}_{_label(part)}"
            if metric == "train_step_b64":
                vs = _train_variants(model, x)
            else:
                vs = _inference_variants(model, x, compile, onnx, tmpdir, f"{tag}_{b}")
            try:
                check_variants(vs)
            except RuntimeError as e:
                raise RuntimeError(f"{family} {_label(part)} {metric}: {e}") from None
            cands.update({f"{_label(part)}|{k}": v for k, v in vs.items()})
        # batch-1 calls take ~1 ms of the ~11 ms a sample costs (settling included) and vary
        # most: LATENCY_SAMPLES times the samples, a few seconds per family
        reps = repeats * LATENCY_SAMPLES if metric == "latency_b1" else repeats
        times = time_interleaved(cands, repeats=reps, warmup=warmup, settle=settle,
                                 settle_seconds=settle_seconds, idle_seconds=idle_seconds)
    best: Dict[str, float] = {}
    for key, t in times.items():
        label = key.split("|")[0]
        best[label] = min(best.get(label, float("inf")), t.median)
    # the reference: P = 1 (or the family's reference model), wherever ``parts`` lists it
    ref_label = next((lab for lab in ("P1", "ref") if lab in best), _label(fam_parts[0]))
    ref = best[ref_label]
    for key, t in times.items():
        label, variant = key.split("|")
        part = _split_part(label[1:])[0] if label.startswith("P") else None
        rows.append({
            "family": family, "model": label, "metric": metric, "variant": variant,
            "batch": b, "ms": t.median * 1e3, "images_per_s": b / t.median,
            "best": t.median == best[label], "ratio": ref / best[label], "reference": ref_label,
            "theory_layer": None if part in (None, "C") else _pattern.speedup(int(part))})
        plan = getattr(cands[key], "plan", None)
        if plan is not None:
            rows[-1]["plan"] = plan
        if variant == "onnxruntime":
            rows[-1]["ort_threads"] = (f"one global pool of {_ORT_POOL} threads" if _ORT_POOL
                                       else "a pool per session")
    return rows


def _measure_isolated(threads: int, retain_memory: bool, *args) -> List[dict]:
    """:func:`_measure` in the fresh process this runs in: torch's thread count and the
    benchmark's memory setting first, as in the parent."""
    from .._timing import retain_freed_memory

    torch.set_num_threads(threads)
    if retain_memory:
        retain_freed_memory()
    return _measure(*args)


def run_models(families: Sequence[str] = tuple(MODEL_SUITES), metrics: Sequence[str] = METRICS,
               parts: Optional[Dict[str, Sequence]] = None, repeats: int = 5, warmup: int = 1,
               batch: int = 64, width: float = 1.0, compile: bool = False, onnx: bool = True,
               progress=None, deadline: Optional[float] = None, settle: int = 1,
               isolate: bool = False, retain_memory: bool = False,
               settle_seconds: float = SETTLE_MS / 1000,
               idle_seconds: float = IDLE_MS / 1000) -> List[dict]:
    """One row per (family, model, metric, variant): median ms, images/s and ratio to the reference.

    Each variant is timed ``repeats`` times (``latency_b1``: :data:`LATENCY_SAMPLES` times
    as often).  ``ratio`` compares the model's best variant with the reference model's best
    variant of the same metric (higher = faster); ``best`` marks that variant.
    ``isolate`` times each (family, metric) in a fresh process (spawned; torch's
    thread count passed on, and :func:`hetconv._timing.retain_freed_memory` applied
    there when ``retain_memory``): no item runs in a process that earlier items'
    models have used, which slowed the torch candidates (not onnxruntime) by 8-10%
    or more on the project's machine.
    """
    for family in families:
        if family not in MODEL_SUITES:
            raise ValueError(f"family must be one of {tuple(MODEL_SUITES)}, got {family!r}")
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not isinstance(isolate, bool):
        raise TypeError(f"isolate must be a bool, got {isolate!r}")
    pool = None
    if isolate:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                   max_tasks_per_child=1)
    rows: List[dict] = []
    try:
        for family in families:
            fam_parts = tuple((parts or {}).get(family, MODEL_SUITES[family]))
            for metric in metrics:
                if deadline is not None and time.perf_counter() > deadline:
                    return rows
                args = (family, metric, fam_parts, repeats, warmup, batch, width, compile,
                        onnx, settle, settle_seconds, idle_seconds)
                if pool is None:
                    rows += _measure(*args)
                else:
                    rows += pool.submit(_measure_isolated, torch.get_num_threads(),
                                        retain_memory, *args).result()
                if progress is not None:
                    progress(f"{family} {metric}")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # Ctrl-C reaches the child too (same group)
    return rows
