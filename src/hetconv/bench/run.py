"""One entry point for the whole benchmark (used by ``hetconv bench``)."""

from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import torch

from .layers import LAYER_SUITES, layer_shapes, parts_for, run_layers
from .models import MODEL_SUITES, run_models
from .._timing import IDLE_MS, SETTLE_MS, check_settle, retain_freed_memory
from .report import environment, write_report
from .. import native
from .. import pattern as _pattern

__all__ = ["run", "PRESETS"]

#: the FMA rate changed by more than this factor during a run: the report says so
RATE_DRIFT = 1.2


def machine_rates(rates: Sequence[tuple]) -> tuple:
    """The environment entry and the report notes for the FMA rates measured during a run
    (``(when, GFLOP/s or None)`` pairs): ``(entry or None, notes)``. A note when the rates
    differ by more than ``RATE_DRIFT``x: the host changed speed while the candidates ran
    (ratios of candidates timed together still compare; absolute times across items do not)."""
    known = [(when, r) for when, r in rates if r is not None]
    if not known:
        return None, []
    entry = ", ".join(f"{r:.0f} {when}" for when, r in known)
    lo, hi = min(r for _, r in known), max(r for _, r in known)
    notes = []
    if hi > RATE_DRIFT * lo:
        notes.append(f"The machine's FMA rate varied {hi / lo:.2f}x during this run ({entry} "
                     "GFLOP/s): the host was shared and changed speed. Ratios of candidates "
                     "timed together (interleaved) still compare; absolute times of items "
                     "timed at different moments do not.")
    return entry + f" (GFLOP/s, {torch.get_num_threads()} threads)", notes


#: ``quick``: about a minute; ``full``: the issue's complete set (about 30-35 min on the
#: project's 2-core machine).  ``repeats``: timed samples per layer candidate,
#: ``model_repeats``: per model candidate.
PRESETS: Dict[str, dict] = {
    "quick": {"layer_suites": ("vgg16_cifar",), "max_shapes": 3, "batch_scale": 0.25,
              "parts": (1, 4), "repeats": 3, "model_repeats": 3, "families": ("vgg16_cifar",),
              "model_parts": {"vgg16_cifar": (1, 4)}, "model_batch": 16,
              "metrics": ("throughput_b64",), "compile": False},
    "full": {"layer_suites": tuple(LAYER_SUITES), "max_shapes": None, "batch_scale": 1.0,
             "parts": (1, 2, 4, 8, 16, 32, 64, "C"), "repeats": 5, "model_repeats": 9,
             "families": tuple(MODEL_SUITES), "model_parts": None, "model_batch": 64,
             "metrics": ("latency_b1", "throughput_b64", "train_step_b64"), "compile": True},
}


def _not_measured(what, cfg: dict, shapes, layer_rows, model_rows) -> str:
    """What of the preset's items the rows lack ("" when none), e.g. after a deadline."""
    out = []
    if "models" in what:
        want = len(cfg["families"]) * len(cfg["metrics"])
        got = len({(r["family"], r["metric"]) for r in model_rows})
        if got < want:
            out.append(f"{want - got} of {want} model items")
    if "layers" in what:
        want = sum(len(parts_for(s.in_ch, cfg["parts"])) for s in shapes) * 2  # infer, train
        got = len({(r["suite"], r["layer"], r["batch"], r["mode"], r["part"])
                   for r in layer_rows})
        if got < want:
            out.append(f"{want - got} of {want} layer items")
    return " and ".join(out)


def _progress(enabled: bool):
    """A callable that advances a tqdm bar (or prints) per finished item; silent when disabled."""
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        return (lambda msg: print(msg, flush=True)), lambda: None
    bar = tqdm(unit="item", dynamic_ncols=True)

    def step(msg):
        bar.set_description(msg[:60])
        bar.update(1)
    return step, bar.close


def run(preset: str = "quick", out_dir: str = "docs", what: Sequence[str] = ("layers", "models"),
        threads: Optional[int] = 2, repeats: Optional[int] = None,
        compile: Optional[bool] = None,
        onnx: bool = True, pattern: str = "shifted", progress: bool = True,
        name: Optional[str] = None, max_minutes: Optional[float] = None,
        settle: int = 1, retain_memory: bool = True, isolate: bool = True,
        settle_ms: float = SETTLE_MS, idle_ms: float = IDLE_MS) -> Dict[str, str]:
    """Run the benchmark ``preset`` and write its report to ``out_dir``; returns the written paths.

    Models are measured first (the headline targets), then layers.  ``compile`` adds the
    ``torch.compile``d dense convolutions to the per-layer baselines and the compiled
    channels_last models to the inference variants (None: the preset's choice, on in
    ``"full"``, off in ``"quick"``).  With
    ``max_minutes`` no new item starts after that budget; the report then
    holds what was measured.  ``settle`` untimed calls of a candidate precede each timed
    one, and more of them until they took ``settle_ms`` milliseconds (defaults 1 and 10:
    steady-state timings, no candidate pays for what ran before it, short calls too).  The
    models' candidates are each preceded by ``idle_ms`` milliseconds of sleep (default 5): the
    threads another runtime (onnxruntime) leaves spinning after its call park then, instead
    of sharing the cores with the next candidate's calls (see :mod:`hetconv._timing`).
    ``retain_memory`` keeps freed memory in the process
    (:func:`hetconv._timing.retain_freed_memory`, glibc), so no torch candidate pays for
    page-faulting in the activations another candidate's calls gave back to the system;
    the report's environment says which setting was used.  ``isolate`` times the models of
    each (family, metric) in a fresh process (:func:`hetconv.bench.run_models`): none pays
    for what earlier items' models left in the process (the torch candidates ran 8-10%
    slower after others, onnxruntime did not); also recorded in the environment.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    bad = set(what) - {"layers", "models"}
    if bad or not what:
        raise ValueError(f"what must be a non-empty subset of ('layers', 'models'), got {what!r}")
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        torch.set_num_threads(threads)
    _pattern.validate_pattern(pattern)  # before the models' minutes, not after them
    check_settle(settle, settle_ms, "settle_ms")
    check_settle(0, idle_ms, "idle_ms")
    malloc = ((retain_freed_memory() if retain_memory else None)
              or "default (glibc may return freed memory to the system)")
    cfg = PRESETS[preset]
    compile = cfg["compile"] if compile is None else bool(compile)
    reps = repeats or cfg["repeats"]
    # the models' samples cost about a third of their part of the run (the optimizations
    # and processes the rest): more of them there, where single verdicts moved most
    model_reps = repeats or cfg["model_repeats"]
    # a partial run gets a name of its own: "--what models" must not replace the full
    # report's layer tables (docs/full_results.*) with none
    name = name or (preset if set(what) == {"layers", "models"} else f"{preset}_{sorted(what)[0]}")
    shapes = layer_shapes(cfg["layer_suites"], cfg["batch_scale"], cfg["max_shapes"])
    step, close = _progress(progress)
    t0 = time.perf_counter()
    deadline = None if max_minutes is None else t0 + 60 * max_minutes
    layer_rows, model_rows = [], []
    rates = [("at the start", native.fma_rate())]
    try:
        if "models" in what:
            model_rows = run_models(cfg["families"], cfg["metrics"], cfg["model_parts"],
                                    repeats=model_reps, batch=cfg["model_batch"], compile=compile,
                                    onnx=onnx, progress=step, deadline=deadline, settle=settle,
                                    settle_seconds=settle_ms / 1000,
                                    idle_seconds=idle_ms / 1000, isolate=isolate, retain_memory=retain_memory)
        if "layers" in what:
            if "models" in what:
                rates.append(("after the models", native.fma_rate()))
            layer_rows = run_layers(shapes, cfg["parts"], repeats=reps, compile=compile,
                                    pattern=pattern, progress=step, deadline=deadline,
                                    settle=settle, settle_seconds=settle_ms / 1000)
    finally:
        close()
    rates.append(("at the end", native.fma_rate()))
    env = environment()
    fma, notes = machine_rates(rates)
    skipped = _not_measured(what, cfg, shapes, layer_rows, model_rows)
    if skipped and max_minutes is not None:
        notes.append(f"The run stopped at its time budget ({max_minutes:g} min, "
                     f"--max-minutes) before {skipped}: the tables and targets hold only "
                     "what was measured.")
    if fma:
        env["fma_rate"] = fma
    env["malloc"] = malloc
    env["torch_compile"] = ("compiled dense baselines and models timed too" if compile
                            else "not timed (eager baselines only)")
    env["settle"] = (f"{settle} untimed call(s), at least {settle_ms:g} ms, before each timed one"
                     if settle else "no untimed calls before the timed ones")
    if "models" in what:
        env["settle"] += f"; models: after {idle_ms:g} ms of sleep"
    if "models" in what:
        env["model_processes"] = ("a fresh process per family and metric" if isolate
                                  else "the benchmark's own process")
        pools = sorted({r["ort_threads"] for r in model_rows if "ort_threads" in r})
        if pools:
            env["onnxruntime_threads"] = "; ".join(pools)
    return write_report(layer_rows, model_rows, out_dir, env, time.perf_counter() - t0,
                        name, notes=notes)
